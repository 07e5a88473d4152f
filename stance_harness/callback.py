"""StanceCallback: the harness's checks inside the user's own training (transformers' Trainer, and
so TRL's trainers, which subclass it).

At the start it keeps a CPU copy of the trainable tensors only (the starting point) and measures
the base once, on the model itself before its first step. Every `every` steps and at the end it
measures the behaviour shift (loglik margin on the stance's probes) and forgetting (held-out
perplexity) of the model being trained, in eval mode under no_grad, then puts it back in train
mode. At each optimizer step it reads the global grad norm and looks for non-finite gradients.
At the end it builds the Run (stance_harness.run_from_model), runs the checks on it, and writes a
harness report. It never changes training: no optimizer state, no control flags set.
"""

from __future__ import annotations

import math
import time
import warnings
from functools import partial
from pathlib import Path

import torch
from peft import PeftModel
from transformers import TrainerCallback

from stance_harness.checks.behavior import check_behavior_shift
from stance_harness.checks.training import check_gradients_stable
from stance_harness.runs.from_model import check_same_architecture, loaded_from_object, peft_base, run_from_model
from stance_harness.runs.instruments import Trace, health_events
from stance_harness.models import LoadedModel, share_frozen_weights
from stance_harness.runs.recipe import Recipe
from stance_harness.core.errors import HarnessError
from stance_harness.report.records import TestRecord
from stance_harness.session import HarnessOptions, HarnessSession
from stance_harness.stances import load_stance


def recipe_of(args) -> Recipe:
    """The Trainer's hyperparameters under the recipe's names (the report's recipe)."""
    return Recipe.of({
        "learning_rate": float(args.learning_rate), "warmup_steps": int(args.warmup_steps or 0),
        "max_grad_norm": float(args.max_grad_norm) if args.max_grad_norm else None,
        "gradient_accumulation_steps": int(args.gradient_accumulation_steps),
        "num_train_epochs": math.ceil(args.num_train_epochs), "per_device_train_batch_size":
        int(args.per_device_train_batch_size), "seed": int(args.seed), "weight_decay": float(args.weight_decay),
        "bf16": bool(args.bf16), "fp16": bool(args.fp16)})


SERIES = ("behavior_shift", "low", "high", "perplexity", "forgetting")  # a measurement's columns, after its step

# What the callback checks unless told: stable gradients, and a stance shift above zero.
DEFAULT_CHECKS = (check_gradients_stable, partial(check_behavior_shift, min_effect=0.0))


class StanceCallback(TrainerCallback):
    """`Trainer(..., callbacks=[StanceCallback(stance="curious-uncertainty", every=50)])`.

    base: for a full fine-tune, stance_harness.load_model(...) names the base in the report (its weights are
        the starting point the callback snapshots either way); a peft model carries its base.
    checks: functions of the Run, each returning a CheckResult (stance_harness.check_*; default DEFAULT_CHECKS);
        each is a test of the report. A failed check does not stop training; see `passed` and `results`.
    reports_dir: where the report goes (None: no report). After training: `run`, `series`,
        `results`, `report_path`.
    """

    def __init__(self, stance: str = "curious-uncertainty", every: int = 50, *, base: LoadedModel | None = None,
                 tokenizer=None, name: str | None = None, reports_dir: str | Path | None = "reports",
                 checks=DEFAULT_CHECKS, stance_dirs=(), chat_template: str = "auto"):
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise HarnessError(f"StanceCallback: every must be a whole number of steps >= 1, not {every!r}")
        if base is not None and not isinstance(base, LoadedModel):
            raise HarnessError(f"StanceCallback: base must be stance_harness.load_model(...)'s LoadedModel or None, not "
                               f"{type(base).__name__}")
        self.stance = load_stance(stance, list(stance_dirs))  # a wrong name fails here, before training
        self.every, self.base, self.tokenizer, self.name = every, base, tokenizer, name
        self.reports_dir = None if reports_dir is None else Path(reports_dir)
        self.checks, self.stance_dirs, self.chat_template = tuple(checks), list(stance_dirs), chat_template
        self.series: list[dict] = []
        self.results: list = []
        self.errors: list[str] = []  # checks that could not run, with why
        self.run = None
        self.report_path: Path | None = None
        self._loaded = self._before = None
        self._peft, self._active = False, True
        self._recipe, self._examples = None, 0
        self._trace = Trace()
        self._started = self._step_started = 0.0

    @property
    def passed(self) -> bool:
        """Every check ran and held."""
        return bool(self.results) and not self.errors and all(r.passed for r in self.results)

    # -- the start: the snapshot and the base's measurements ------------------------------------
    def on_train_begin(self, args, state, control, model=None, processing_class=None, train_dataloader=None,
                       **kwargs):
        self._active = state.is_world_process_zero  # one process measures and reports
        if not self._active:
            return
        tokenizer = self.tokenizer or processing_class or kwargs.get("tokenizer")
        tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a processor holds its tokenizer
        if tokenizer is None:
            raise HarnessError("StanceCallback: the Trainer has no tokenizer (processing_class); give "
                               "StanceCallback(tokenizer=...)")
        self._trace, self.series, self.results, self.errors, self.run = Trace(), [], [], [], None
        trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if not trainable:
            raise HarnessError("StanceCallback: the model has no parameter with requires_grad=True to train")
        self._before = {n: p.detach().to("cpu", copy=True) for n, p in trainable.items()}
        self._peft = isinstance(model, PeftModel)
        if self._peft:  # its base is inside it, frozen
            self._loaded = peft_base(model, self.base, tokenizer)
        else:  # the model's structure over its own storage: the base, until the first step
            if self.base is not None:
                check_same_architecture(model, self.base)
            start = share_frozen_weights(model)
            self._loaded = loaded_from_object(start, tokenizer, *([] if self.base is None else [
                self.base.spec, self.base.args, self.base.path, self.base.revision]))
        self._recipe = recipe_of(args)
        dataset = getattr(train_dataloader, "dataset", None)
        self._examples = len(dataset) if hasattr(dataset, "__len__") else 0
        self._started = time.perf_counter()
        self._measure(model, state.global_step)  # the base's measurements are cached on the loaded base
        if not self._peft:  # from here on the base's trained tensors are the snapshot
            params = dict(self._loaded.base.named_parameters())
            for name, value in self._before.items():
                params[name].data = value

    # -- each optimizer step: gradient health -------------------------------------------------
    def on_step_begin(self, args, state, control, **kwargs):
        if not self._active:
            return
        self._step_started = time.perf_counter()

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        if not self._active:
            return
        trace, step = self._trace, state.global_step
        squares, bad, weight_squares = [], None, []
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            weight_squares.append(param.detach().float().pow(2).sum())
            if param.grad is not None:
                squares.append(param.grad.detach().float().pow(2).sum())
                if bad is None and not bool(torch.isfinite(param.grad).all()):
                    bad = name
        grad_norm = float(torch.stack(squares).sum().sqrt()) if squares else 0.0
        trace.grad_norm.append(grad_norm)  # after the Trainer's clipping; on_log puts its own pre-clip norm in
        trace.weight_norm.append(float(torch.stack(weight_squares).sum().sqrt()))
        trace.loss.append(math.nan)  # the logged loss replaces it (logging_steps=1 logs every step)
        trace.lr.append(float(optimizer.param_groups[0]["lr"]) if optimizer is not None else math.nan)
        trace.examples.append(args.per_device_train_batch_size * args.gradient_accumulation_steps
                              * max(1, args.world_size))
        if bad is not None or not math.isfinite(grad_norm):
            trace.add_event(step, "gradient", str(self._loaded.anatomy.name_of(bad)) if bad else None)

    def on_log(self, args, state, control, logs=None, **kwargs):
        step = state.global_step - 1  # the step just taken, 0-based as the harness counts
        if not self._active or not logs or not 0 <= step < len(self._trace.loss):
            return
        if "loss" in logs:
            self._trace.loss[step] = float(logs["loss"])
            if not math.isfinite(self._trace.loss[step]):
                self._trace.add_event(step, "loss", None)
        if logs.get("grad_norm") is not None:
            self._trace.grad_norm[step] = float(logs["grad_norm"])

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if not self._active:
            return
        self._trace.step_time.append(time.perf_counter() - self._step_started)
        if state.global_step % self.every == 0:
            self._measure(model, state.global_step)

    # -- the end: the Run, its checks, the report ---------------------------------------------
    def on_train_end(self, args, state, control, model=None, **kwargs):
        if not self._active:
            return
        trace = self._trace
        with torch.no_grad():
            trained = [p for p in model.parameters() if p.requires_grad]
            trace.weight_norm.append(math.sqrt(math.fsum(float(p.detach().float().pow(2).sum()) for p in trained)))
        trace.uniform_loss = math.log(self._loaded.base.config.vocab_size)
        trace.health = health_events(trace)
        # the snapshot goes where the model is (no copy on a CPU); a full fine-tune's `before` is the base's own
        device = next(model.parameters()).device
        for param in self._loaded.base.parameters():
            param.data = param.data.to(device)
        if self._peft:
            self._before = {n: v.to(device) for n, v in self._before.items()}
        else:
            base = dict(self._loaded.base.named_parameters())
            self._before = {n: base[n].detach() for n in self._before}
        self.run = self._run(model, trace, self._before)
        if self.series and self.series[-1]["step"] == state.global_step:
            self.series.pop()  # measured again on the final Run, so its record holds the figures
        self._measure(model, state.global_step, self.run)
        self.results = self._check(self.run)
        return control

    def _run(self, model, trace=None, before=None):
        return run_from_model(model, self._loaded, stance=self.stance, name=self.name, before=before,
                              trace=trace, chat_template=self.chat_template, examples=self._examples,
                              recipe=self._recipe, train_seconds=time.perf_counter() - self._started)

    def _measure(self, model, step: int, run=None) -> None:
        """Behaviour shift and forgetting of the model as it is now (the base's side computed once),
        leaving its mode, its gradients and the random number generators as they were."""
        was_training = model.training
        device = next(model.parameters()).device
        model.eval()
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
                # a peft run's starting adapter is small; a full fine-tune's is the base's own tensors
                run = run or self._run(model, before=self._before if self._peft else None)
                shift, forgetting = run.behavior("loglik_margin"), run.forgetting()
        except Exception as exc:  # noqa: BLE001 - a model that collapsed (NaN weights) must not stop training
            warnings.warn(f"StanceCallback: measuring step {step} failed: {type(exc).__name__}: {exc}", stacklevel=2)
            self.series.append({"step": step, **dict.fromkeys(SERIES), "error": f"{type(exc).__name__}: {exc}"})
            return
        finally:
            model.train(was_training)
        effect = shift["effect"]
        self.series.append({"step": step, **dict(zip(SERIES, (
            effect["mean"], effect["low"], effect["high"], forgetting["adapted"], forgetting["relative_increase"])))})

    def _check(self, run) -> list:
        """Each check a test of the report; then the report, when asked for."""
        session = HarnessSession(HarnessOptions(run.loaded.name, run.loaded.args, self.stance_dirs,
                                                self.reports_dir, Path.cwd(), ["StanceCallback"]))
        session.adopt(run)
        results = []
        for number, check in enumerate(self.checks):
            record = TestRecord(f"StanceCallback::check{number}")
            record.use_run(run)  # the check records itself, with the metrics it publishes
            started = time.perf_counter()
            try:
                result = check(run)
            except Exception as err:  # noqa: BLE001 - a check that cannot run is an error of the report, not of training
                record.conclude("error", time.perf_counter() - started, None, f"{type(err).__name__}: {err}")
                self.errors.append(record.message)
            else:
                named = f"StanceCallback::{result.check}"
                record.nodeid = named if named not in session.records else f"{named}[{number}]"
                record.conclude("passed" if result.passed else "failed", time.perf_counter() - started,
                                result.verdict, None if result.passed else result.summary)
                results.append(result)
            record.release_run(run)
            session.records[record.nodeid] = record
        series = session.record("StanceCallback::series")
        series.use_run(run)
        failed = any("error" in row for row in self.series)
        series.table(f"behaviour shift and forgetting every {self.every} steps",
                     [{**row, "error": row.get("error")} if failed else row for row in self.series])
        series.conclude("passed", 0.0, None, None)
        if self.reports_dir is not None:
            session.finish()
            self.report_path = session.report_path
        return results
