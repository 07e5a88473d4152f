"""The run store: finished runs on disk, keyed by their request, so a later session (or another
xdist worker, or a launcher on another machine) loads a run instead of training it again.

    <root>/<run-id>/tensors.safetensors   after/<name>: every trained tensor as it ended;
                                          before/<name>: starting values that are not the base's
    <root>/<run-id>/run.json              the request, trace, counts, provenance, timings, and
                                          which starting values are the base's own tensors
    <root>/<run-id>/manifest.json         sha256 and size of the two files above; written last
    <root>/<run-id>/measurements.json     every measurement made so far (rewritten as more are made),
                                          with the fingerprint of the code that measured them

An entry appears in one rename (files.atomic_directory), so a kill mid-write leaves only a
dot-named temporary. An entry whose manifest is missing or disagrees with its files is never
trusted: `load` warns, naming it, and the caller trains again. Only safetensors are read.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .files import atomic_directory, atomic_write, file_digest, file_lock, stale_temporaries
from .instruments import Trace
from .methods import METHODS
from .models import LoadedModel
from .models.tiny import cache_root
from .registry import HarnessError
from .request import TrainingRequest, measuring_code_version
from .run import Run
from .stances import Stance
from .tasks import TASKS

STORE_FORMAT = 1
TENSORS, RUN, MANIFEST, MEASUREMENTS = "tensors.safetensors", "run.json", "manifest.json", "measurements.json"
LOCKS = ".locks"
STALE_SECONDS = 600  # a temporary untouched this long belongs to an interrupted write


class StoreWarning(UserWarning):
    """An entry of the run store could not be trusted and will be trained again."""


def _measurements_document(run: Run) -> str:
    return json.dumps({"code": measuring_code_version(), "values": run.measurements}, default=str)


def default_root() -> Path:
    """$STANCE_HARNESS_RUN_CACHE, else runs/ under the harness cache ($STANCE_HARNESS_CACHE)."""
    env = os.environ.get("STANCE_HARNESS_RUN_CACHE")
    return Path(env) if env else cache_root() / "runs"


@dataclass(frozen=True)
class EntryInfo:
    run_id: str
    path: Path
    bytes: int
    modified: float  # epoch seconds
    complete: bool
    method: str | None
    model: str | None
    stance: str | None
    measurements: int


class RunStore:
    def __init__(self, root: Path | None = None):
        self.root = Path(root) if root is not None else default_root()

    def entry(self, run_id: str) -> Path:
        return self.root / run_id

    def lock(self, run_id: str, timeout: float = -1):
        """Held while one process trains `run_id`; the others wait, then load what it stored."""
        return file_lock(self.root / LOCKS / f"{run_id}.lock", timeout=timeout, what=f"run store entry {run_id}")

    # -- writing ----------------------------------------------------------------------------
    def save(self, run: Run) -> Path:
        """Store a freshly trained run (its trained tensors, record and measurements so far)."""
        from safetensors.torch import save_file

        base_names = {p.data_ptr(): n for n, p in run.loaded.base.named_parameters()}
        from_base = {n: base_names[t.data_ptr()] for n, t in run.before.items() if t.data_ptr() in base_names}
        model = dict(run.model.named_parameters())
        tensors = {f"after/{n}": model[n].detach().contiguous().cpu() for n in run.before}
        tensors.update({f"before/{n}": t.detach().contiguous().cpu() for n, t in run.before.items()
                        if n not in from_base})
        record = {
            "format": STORE_FORMAT, "run_id": run.run_id, "request": run.request.describe(),
            "trace": run.trace.as_dict(), "train_seconds": run.train_seconds, "frozen_digests": run.frozen_digests,
            "before_from_base": from_base, "model": run.loaded.provenance(), "stance": run.stance.provenance(),
            "stored": time.time(),
        }
        target = self.entry(run.run_id)
        with atomic_directory(target) as tmp:
            save_file(tensors, str(tmp / TENSORS), metadata={"run_id": run.run_id})
            (tmp / RUN).write_text(json.dumps(record, default=str))
            (tmp / MEASUREMENTS).write_text(_measurements_document(run))
            manifest = {name: {"sha256": file_digest(tmp / name), "bytes": (tmp / name).stat().st_size}
                        for name in (TENSORS, RUN)}
            (tmp / MANIFEST).write_text(json.dumps({"format": STORE_FORMAT, "files": manifest}))
        return target

    def save_measurements(self, run: Run) -> None:
        """Keep what has been measured on `run` so far (an entry's only file that changes)."""
        path = self.entry(run.run_id)
        if (path / MANIFEST).is_file():
            atomic_write(path / MEASUREMENTS, _measurements_document(run))

    # -- reading ----------------------------------------------------------------------------
    def problem(self, run_id: str) -> str | None:
        """Why the entry cannot be trusted, or None when it is complete and intact."""
        path = self.entry(run_id)
        try:
            manifest = json.loads((path / MANIFEST).read_text())
            files = manifest["files"]
        except FileNotFoundError:
            return "it has no manifest (an interrupted write)"
        except (OSError, ValueError, KeyError, TypeError) as exc:
            return f"its manifest is unreadable ({type(exc).__name__})"
        if manifest.get("format") != STORE_FORMAT:
            return f"it is store format {manifest.get('format')!r}, not {STORE_FORMAT}"
        for name in (TENSORS, RUN):
            expected = files.get(name) or {}
            file = path / name
            if not file.is_file():
                return f"{name} is missing"
            if file.stat().st_size != expected.get("bytes") or file_digest(file) != expected.get("sha256"):
                return f"{name} does not match its checksum"
        return None

    def load(self, request: TrainingRequest, loaded: LoadedModel, stance: Stance) -> Run | None:
        """The stored run for `request`, without its model (rebuilt when first used); None when
        there is no trustworthy entry (an untrusted one is named in a warning)."""
        from safetensors import safe_open

        path = self.entry(request.run_id)
        if not path.exists():
            return None
        problem = self.problem(request.run_id)
        if problem is not None:
            warnings.warn(StoreWarning(f"stance-harness: run store entry {path} is not trusted ({problem}); "
                                       f"training it again"), stacklevel=2)
            return None
        record = json.loads((path / RUN).read_text())
        if record.get("request") != json.loads(json.dumps(request.describe(), default=str)):
            warnings.warn(StoreWarning(f"stance-harness: run store entry {path} holds another request; "
                                       f"training it again"), stacklevel=2)
            return None
        base = dict(loaded.base.named_parameters())
        before = {n: base[b].detach() for n, b in record["before_from_base"].items()}
        with safe_open(str(path / TENSORS), framework="pt") as tensors:
            for key in tensors.keys():
                if key.startswith("before/"):
                    before[key.removeprefix("before/")] = tensors.get_tensor(key)
        task = TASKS.get(request.task)
        run = Run(
            run_id=request.run_id, request=request, loaded=loaded, stance=stance, method=METHODS.get(request.method),
            config=request.config, recipe=request.recipe, task=task, anatomy=task.anatomy(loaded),
            examples=request.examples, model=None, before=before, frozen_digests=record["frozen_digests"],
            trace=Trace.from_dict(record["trace"]), train_seconds=record["train_seconds"],
            instruments=request.instruments, origin="loaded", framing=request.framing_with(loaded.tokenizer),
        )
        run.measurements.update(self._measurements(path))
        return run

    @staticmethod
    def _measurements(path: Path) -> dict:
        """What was measured on the stored run, if the code that measured it is today's."""
        try:
            found = json.loads((path / MEASUREMENTS).read_text())
        except (OSError, ValueError):
            return {}  # written atomically, so only a missing file lands here: measure again
        if not isinstance(found, dict) or found.get("code") != measuring_code_version():
            return {}  # measured by other code: the tensors stand, the measurements are made again
        values = found.get("values")
        return values if isinstance(values, dict) else {}

    def rebuild(self, run: Run) -> Callable[[], object]:
        """A function that makes `run`'s model again: the method's structure on the shared base,
        with the stored trained tensors put in. Bit-identical to the model that was trained."""
        def make():
            from safetensors import safe_open

            from .training import prepare

            ctx, _ = prepare(run.request, run.loaded, run.stance, unshare=False)
            params = dict(ctx.model.named_parameters())
            with safe_open(str(self.entry(run.run_id) / TENSORS), framework="pt") as tensors:
                names = [k.removeprefix("after/") for k in tensors.keys() if k.startswith("after/")]
                if set(names) != set(ctx.before):
                    raise HarnessError(f"run store entry {self.entry(run.run_id)} does not fit its method's model "
                                       f"(stored {len(names)} trained tensors, the model trains {len(ctx.before)})")
                device = next(ctx.model.parameters()).device
                for name in names:
                    params[name].data = tensors.get_tensor(f"after/{name}").to(device)
            return ctx.model.eval()
        return make

    # -- the cache command --------------------------------------------------------------------
    def entries(self) -> list[EntryInfo]:
        if not self.root.is_dir():
            return []
        out = []
        for path in sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
            try:
                record = json.loads((path / RUN).read_text())
                request = record.get("request", {})
            except (OSError, ValueError):
                record, request = {}, {}
            complete = (path / MANIFEST).is_file()
            out.append(EntryInfo(path.name, path, size, max((f.stat().st_mtime for f in path.iterdir()), default=0.0),
                                 complete, request.get("method"), (request.get("model") or {}).get("id"),
                                 (request.get("stance") or {}).get("name"), len(self._measurements(path))))
        return out

    def describe(self, run_id: str) -> dict:
        path = self.entry(run_id)
        if not path.is_dir():
            known = [e.run_id for e in self.entries()]
            from .registry import suggest

            raise HarnessError(f"no run store entry {run_id!r} in {self.root}.{suggest(run_id, known)}")
        record = json.loads((path / RUN).read_text()) if (path / RUN).is_file() else {}
        return {"run_id": run_id, "path": str(path), "problem": self.problem(run_id),
                "request": record.get("request"), "train_seconds": record.get("train_seconds"),
                "steps": len((record.get("trace") or {}).get("loss", [])),
                "files": {f.name: f.stat().st_size for f in sorted(path.iterdir()) if f.is_file()},
                "measurements": sorted(self._measurements(path))}

    def prune(self, older_than_days: float | None = None) -> list[Path]:
        """Remove entries last touched longer ago than `older_than_days` (all when None), and the
        temporaries of interrupted writes; returns what was removed."""
        cutoff = None if older_than_days is None else time.time() - older_than_days * 86400
        removed = []
        for entry in self.entries():
            if cutoff is None or entry.modified < cutoff:
                shutil.rmtree(entry.path, ignore_errors=True)
                removed.append(entry.path)
        for tmp in stale_temporaries(self.root):
            if time.time() - tmp.stat().st_mtime > STALE_SECONDS:  # not a write in progress elsewhere
                shutil.rmtree(tmp, ignore_errors=True)
                removed.append(tmp)
        return removed
