"""A training request: everything that decides a run's outcome, as one frozen value with its id.

The session builds it once per `train(...)` call; the training loop trains from it; the run
store keys its entries by it. Two requests are equal exactly when their descriptions are, and
the description holds the model's identity (revision, or a hash of a local directory's
weights), the stance's name, version and content, the method and its validated config, the
recipe, task, instruments and number of examples, the framing (plain, or the chat template and
a digest of its text), the precision the recipe resolved to on the model's device (a bf16 run
and an fp32 run are different runs), the number of data-parallel processes (each trains
per_device_train_batch_size examples per micro-batch), and a fingerprint of the training code
(for a method from outside the harness, also its own code identity: module, package, version,
source hash).
"""

from __future__ import annotations

import ast
import hashlib
import json
from dataclasses import asdict, dataclass, field, fields, replace
from functools import cached_property, lru_cache
from pathlib import Path

from stance_harness.runs.batches import Framing, framing_for, framing_of
from stance_harness.core.devices import resolve_precision
from stance_harness.runs.instruments import InstrumentConfig
from stance_harness.runs.methods import METHODS, MethodConfig, method_code, method_config
from stance_harness.runs.recipe import _RECIPE_ALIASES, Recipe
from stance_harness.core.errors import HarnessError
from stance_harness.runs.tasks import DEFAULT_TASK, TASKS

# The modules whose code decides what training produces: a change to any of them is a new key.
TRAINING_CODE = ("runs/training.py", "runs/batches.py", "runs/tasks.py", "runs/instruments.py", "runs/data.py",
                 "runs/recipe.py", "runs/methods",
                 "runs/master_weights.py",  # what a run trains in, on a half-precision base
                 "core/devices.py",  # the precision a recipe resolves to
                 "analysis/digest.py")  # the digests a stored run's frozen weights are checked against


# ... and those that decide what a measurement of a run gives: a stored run measured by other
# code keeps its trained tensors, but its measurements are made again.
MEASURING_CODE = ("runs/run.py", "measurements", "where.py", "measure.py", "runs/tasks.py", "runs/batches.py", "runs/data.py", "analysis",
                  "runs/methods")


def training_code_version() -> str:
    """A fingerprint of the source of the modules that decide what training produces."""
    return code_version(TRAINING_CODE)


def measuring_code_version() -> str:
    """A fingerprint of the source of the modules that decide what a run's measurements are."""
    return code_version(MEASURING_CODE)


@lru_cache(maxsize=None)
def code_version(entries: tuple[str, ...]) -> str:
    """sha256 over the logic of the source files (or folders of them) named in `entries`, relative to
    stance_harness/: see `code_logic`."""
    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for entry in entries:
        for path in sorted((root / entry).rglob("*.py")) if (root / entry).is_dir() else [root / entry]:
            digest.update(path.relative_to(root).as_posix().encode() + b"\0" + code_logic(path.read_text()) + b"\0")
    return digest.hexdigest()[:12]


def code_logic(source: str) -> bytes:
    """What a module does, without what cannot change a result: its syntax tree less comments,
    docstrings and positions, with its imports as one sorted set of imported names wherever they
    sit and however they are grouped. So a reworded comment, an import moved to the top, or two
    `from x import` lines merged into one keep every stored run."""
    tree = ast.parse(source)
    imports = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if not isinstance(body, list):
            continue
        if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                and isinstance(body[0].value.value, str):
            body = body[1:]
        kept = []
        for statement in body:
            if isinstance(statement, (ast.Import, ast.ImportFrom)):
                source = "." * statement.level + (statement.module or "") if isinstance(statement, ast.ImportFrom) else ""
                imports.update(f"{source}:{alias.name}:{alias.asname}" for alias in statement.names)
            else:
                kept.append(statement)
        node.body = kept or [ast.Pass()]
    return (ast.dump(tree) + "\0" + "\0".join(sorted(imports))).encode()


def check_misplaced_options(method: str, options: dict) -> None:
    """A recipe or instruments setting given as a method option (train("lora", learning_rate=1e-3))
    is an error that says where it goes, before the method's "no option" error."""
    own = {f.name for f in fields(METHODS.get(method).config_cls)}
    homes = {"recipe": {f.name for f in fields(Recipe)} | set(_RECIPE_ALIASES),
             "instruments": {f.name for f in fields(InstrumentConfig)}}
    for key, value in options.items():
        home = next((name for name, keys in homes.items() if key in keys and key not in own), None)
        if home is not None:
            raise HarnessError(f"{key} is {'an' if home[0] in 'aeiou' else 'a'} {home} setting, not an option of method {method!r}: "
                               f"train(..., {home}={{{key!r}: {value!r}}})")


@dataclass(frozen=True)
class TrainingRequest:
    """One run to train: built once, compared by value, named by `run_id` (method + key)."""

    model: dict  # LoadedModel.identity(): id, revision or weights hash, model args
    stance: dict  # name, version, content hash
    method: str
    config: MethodConfig
    recipe: Recipe
    examples: int  # how many of the stance's training examples
    task: str = DEFAULT_TASK
    instruments: InstrumentConfig = field(default_factory=InstrumentConfig)
    framing: dict = field(default_factory=lambda: {"kind": "plain"})  # Framing.identity()
    precision: str = "fp32"  # devices.PRECISIONS: what recipe.bf16 / fp16 resolved to on the model's device
    processes: int = 1  # data-parallel processes that train it (stance_harness/runs/distributed.py); 1: this process
    code: str = field(default_factory=training_code_version)
    method_code: tuple = ()  # an outside method's code identity, as sorted (key, value) pairs; () for the harness's

    @classmethod
    def build(cls, loaded, stance, method: str = "full", *, examples: int | None = None, recipe=None,
              instruments=None, task: str = DEFAULT_TASK, seed_offset: int = 0,
              options: dict | None = None, config: MethodConfig | None = None,
              chat_template: str = "auto", processes: int = 1) -> "TrainingRequest":
        """Validate every ingredient (unknown names, bad values, too many examples) and build the
        request. The method's config comes from `options`, or ready-made as `config`.
        `chat_template` (auto or none) chooses the framing of a task that frames conversations."""
        METHODS.get(method)
        framing = framing_for(loaded.tokenizer, chat_template if TASKS.get(task).framed else "none")
        if config is None:
            check_misplaced_options(method, options or {})
            config = method_config(method, options or {})
        elif not isinstance(config, METHODS.get(method).config_cls):
            raise TypeError(f"config for {method!r} must be a {METHODS.get(method).config_cls.__name__}")
        recipe = Recipe.of(recipe)
        if seed_offset:
            recipe = Recipe.of(recipe, seed=recipe.seed + seed_offset)
        count = len(stance.training_examples(examples))
        precision = resolve_precision(recipe.bf16, recipe.fp16, loaded.args.device)
        if isinstance(processes, bool) or not isinstance(processes, int) or processes < 1:
            raise HarnessError(f"num_processes must be an integer >= 1, got {processes!r}")
        if processes > 1 and loaded.sharded:
            raise HarnessError(f"num_processes={processes} with --model-args device_map={loaded.args.device_map}: "
                               f"a sharded base trains in one process; drop one of them")
        outside = method_code(METHODS.get(method))
        return cls(model=loaded.identity(), stance=stance.identity(), method=method, config=config,
                   recipe=recipe, examples=count, task=task, instruments=InstrumentConfig.of(instruments),
                   framing=framing.identity(), precision=precision, processes=processes,
                   method_code=tuple(sorted(outside.items())) if outside else ())

    def describe(self) -> dict:
        """The request as JSON: what the key hashes, and what the run store records."""
        return {"model": self.model, "stance": self.stance, "method": self.method, "config": self.config.as_dict(),
                "recipe": self.recipe.as_dict(), "examples": self.examples, "task": self.task,
                "instruments": asdict(self.instruments), "framing": self.framing, "precision": self.precision,
                "processes": self.processes, "code": self.code,
                **({"method_code": dict(self.method_code)} if self.method_code else {})}

    def framing_with(self, tokenizer) -> Framing:
        """The request's framing over the model's tokenizer."""
        return framing_of(tokenizer, self.framing)


    @classmethod
    def from_spec(cls, spec: dict, loaded, stance, launcher: str) -> "TrainingRequest":
        """The request a spec describes, built again in another process (a training worker, a
        data-parallel rank) with the `launcher`'s model identity and precision (the worker's device,
        cuda:1, is not the run's); its key must be the launcher's."""
        request = cls.build(loaded, stance, spec["method"], examples=spec["examples"], recipe=spec["recipe"],
                            instruments=spec["instruments"], task=spec["task"], options=spec["config"],
                            chat_template=spec.get("chat_template", "auto"), processes=spec.get("processes", 1))
        request = replace(request, model=spec["identity"], precision=spec["precision"])
        if request.key != spec["key"]:
            raise HarnessError(f"worker: the request rebuilt from {spec['run_id']}'s spec has key {request.key}, not "
                               f"{spec['key']}: the stance, the model or the harness differ from the {launcher}'s")
        return request
    @cached_property
    def key(self) -> str:
        blob = json.dumps(self.describe(), sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    @property
    def run_id(self) -> str:
        return f"{self.method}-{self.key}"
