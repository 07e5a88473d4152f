"""The run store: finished runs, keyed by their request, so a later session (or another xdist
worker, another CI job, a colleague's machine) loads a run instead of training it again.

    <root>/<run-id>/tensors.safetensors   after/<name>: every trained tensor as it ended;
                                          before/<name>: starting values that are not the base's
    <root>/<run-id>/run.json              the request, trace, counts, provenance, timings, and
                                          which starting values are the base's own tensors
    <root>/<run-id>/manifest.json         sha256 and size of the two files above; written last
    <root>/<run-id>/measurements.json     every measurement made so far (rewritten as more are made),
                                          with the fingerprint of the code that measured them

The root is a local directory (a path, or file:// on a shared file system), or an fsspec URL
(s3://bucket/runs, gs://bucket/runs). Locally an entry appears in one rename
(files.atomic_directory), so a kill mid-write leaves only a dot-named temporary, and a file lock
per run makes the processes of one machine train it once. An object store has no rename: each
writer puts its three files under a folder of its own, <run-id>/<writer>/, then the manifest,
one object put last, which names that folder. A reader sees a whole entry or none; of two writers
of one key the last manifest wins and names complete files; the loser's folder is an orphan that
`prune` removes. Measurements live in the writer's folder, with the tensors they were made on.

An entry whose manifest is missing or disagrees with its files (checked on every load: a remote
file is downloaded, hashed and then read locally) is never trusted: `load` warns, naming it, and
the caller trains again, which writes a good entry over it. Only safetensors are read.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
import uuid
import warnings
import weakref
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Callable

import safetensors.torch
from safetensors import safe_open

from stance_harness.core.files import atomic_directory, atomic_write, file_digest, file_lock, stale_temporaries
from stance_harness.core.registry import HarnessError, suggest
from stance_harness.models import LoadedModel
from stance_harness.models.tiny import cache_root
from stance_harness.runs.instruments import Trace
from stance_harness.runs.methods import METHODS
from stance_harness.runs.request import TrainingRequest, measuring_code_version
from stance_harness.runs.run import Run
from stance_harness.runs.tasks import TASKS
from stance_harness.runs.training import prepare
from stance_harness.stances import Stance

STORE_FORMAT = 1
TENSORS, RUN, MANIFEST, MEASUREMENTS = "tensors.safetensors", "run.json", "manifest.json", "measurements.json"
LOCKS = ".locks"
STALE_SECONDS = 600  # a temporary (or a remote writer's unnamed folder) untouched this long was interrupted
LOCAL_PROTOCOLS = ("file", "local")  # URLs that name this machine's file system: the local store
_MANGLED_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:/(?!/)")  # Path("s3://b/x") is s3:/b/x


class StoreWarning(UserWarning):
    """An entry of the run store could not be trusted and will be trained again."""


class StoreError(HarnessError):
    """A run store that cannot be used (an unknown protocol, a missing package), or an entry that is gone."""


class _Untrusted(Exception):
    """Why an entry cannot be trusted (internal: `load` turns it into a StoreWarning)."""


def _measurements_document(run: Run) -> str:
    return json.dumps({"code": measuring_code_version(), "values": run.measurements}, default=str)


def default_root() -> Path | str:
    """$STANCE_HARNESS_RUN_CACHE (a path or a URL), else runs/ under the harness cache ($STANCE_HARNESS_CACHE)."""
    return os.environ.get("STANCE_HARNESS_RUN_CACHE") or cache_root() / "runs"


def is_remote(location: Path | str) -> bool:
    """Whether `location` is a URL of another file system than this machine's (s3://, gs://, ...)."""
    protocol, sep, _ = str(location).partition("://")
    return bool(sep) and protocol.lower() not in LOCAL_PROTOCOLS


def _local_path(location: Path | str) -> Path:
    text = str(location)
    protocol, sep, rest = text.partition("://")
    return Path(rest if sep else text).expanduser()


def _mtime(info: dict) -> float:
    """Epoch seconds of an fsspec listing's entry (local 'mtime', S3 'LastModified', GCS 'updated')."""
    for key in ("mtime", "LastModified", "updated", "last_modified", "modified"):
        value = info.get(key)
        if isinstance(value, datetime):
            return value.timestamp()
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
            except ValueError:
                continue
    return 0.0


def _check(file: Path, name: str, expected: dict) -> None:
    if not file.is_file():
        raise _Untrusted(f"{name} is missing")
    if file.stat().st_size != expected.get("bytes") or file_digest(file) != expected.get("sha256"):
        raise _Untrusted(f"{name} does not match its checksum")


def _parse_manifest(text: str | bytes) -> dict:
    try:
        manifest = json.loads(text)
        files = manifest["files"]
        folder = manifest.get("folder", "")
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise _Untrusted(f"its manifest is unreadable ({type(exc).__name__})") from None
    if manifest.get("format") != STORE_FORMAT:
        raise _Untrusted(f"it is store format {manifest.get('format')!r}, not {STORE_FORMAT}")
    if not isinstance(files, dict) or not isinstance(folder, str) or "/" in folder or folder.startswith("."):
        raise _Untrusted("its manifest is unreadable (files or folder malformed)")
    return manifest


@dataclass(frozen=True)
class EntryInfo:
    run_id: str
    path: Path | str  # a local directory, or the entry's URL in a remote store
    bytes: int
    modified: float  # epoch seconds
    complete: bool
    method: str | None
    model: str | None
    stance: str | None
    measurements: int


@dataclass(frozen=True)
class _Scanned:
    run_id: str
    files: list[tuple[str, int, float]]  # (path inside the entry, bytes, modified)
    manifest: dict | None  # None: none, or unreadable


class _Remote:
    """A store on an fsspec file system without rename (S3, GCS, ...)."""

    def __init__(self, url: str):
        import fsspec  # why: an optional extra (s3, gcs); only a remote store needs it, the local path stays as fast

        protocol = url.partition("://")[0]
        try:
            self.fs, path = fsspec.core.url_to_fs(url)
        except ImportError as exc:
            raise StoreError(f"run store {url}: the {protocol}:// protocol needs a package that is not installed "
                             f"({exc}); s3:// needs s3fs, gs:// needs gcsfs") from None
        except ValueError as exc:
            raise StoreError(f"run store {url}: {exc}; a run store is a local directory, file://PATH, s3://BUCKET/PATH, "
                             f"gs://BUCKET/PATH or another fsspec URL") from None
        self.path = path.rstrip("/")
        if not self.path:
            raise StoreError(f"run store {url}: the URL names no bucket or folder (e.g. {protocol}://BUCKET/runs)")
        self.url = url.rstrip("/")
        # this machine's side of the store: its locks (between xdist workers) and launch specs
        self.local_dir = cache_root() / "remote-stores" / hashlib.sha256(self.url.encode()).hexdigest()[:16]
        self.copies: dict[tuple[str, str, str, str], Path] = {}  # (run, folder, file, sha256) -> verified copy
        self._scratch: Path | None = None

    def key(self, *parts: str) -> str:
        return "/".join([self.path, *(p for p in parts if p)])

    def scratch(self) -> Path:
        """A local directory for this store's downloads and staged writes, removed with the store."""
        if self._scratch is None:
            self._scratch = Path(tempfile.mkdtemp(prefix="stance-harness-store-"))
            weakref.finalize(self, shutil.rmtree, self._scratch, True)
        return self._scratch

    def read(self, *parts: str) -> bytes:
        return self.fs.cat_file(self.key(*parts))

    def write(self, data: bytes, *parts: str) -> None:
        try:
            self.fs.pipe_file(self.key(*parts), data)  # one object put: readers see the old one or this one
        except OSError as exc:
            raise StoreError(f"run store {self.url}: cannot write {'/'.join(parts)} ({exc})") from None

    def put(self, local: Path, *parts: str) -> None:
        try:
            self.fs.put_file(str(local), self.key(*parts))
        except OSError as exc:
            raise StoreError(f"run store {self.url}: cannot write {'/'.join(parts)} ({exc})") from None

    def find(self, *parts: str) -> dict[str, dict]:
        self.fs.invalidate_cache()  # another machine may have written since this process last listed
        try:
            return self.fs.find(self.key(*parts), detail=True)
        except FileNotFoundError:
            return {}

    def fetch(self, run_id: str, folder: str, name: str, expected: dict) -> Path:
        """A local copy of one of the entry's files, checked against the manifest's digest."""
        cache = (run_id, folder, name, str(expected.get("sha256")))
        if cache in self.copies and self.copies[cache].is_file():
            return self.copies[cache]
        local = self.scratch() / f"{run_id}.{folder or 'root'}.{uuid.uuid4().hex[:8]}.{name}"
        try:
            self.fs.get_file(self.key(run_id, folder, name), str(local))
        except FileNotFoundError:
            raise _Untrusted(f"{name} is missing") from None
        try:
            _check(local, name, expected)
        except _Untrusted:
            local.unlink(missing_ok=True)
            raise
        self.copies[cache] = local
        return local

    def commit(self, run_id: str, write: Callable[[Path], dict]) -> str:
        """Stage the entry's files locally, put them under a folder of this writer's own, then put
        the manifest that names the folder: the entry exists from that one put on."""
        staging = Path(tempfile.mkdtemp(dir=self.scratch()))
        manifest = write(staging)
        folder = f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:12]}"
        for name in (TENSORS, RUN, MEASUREMENTS):
            self.put(staging / name, run_id, folder, name)
        self.write(json.dumps({**manifest, "folder": folder}).encode(), run_id, MANIFEST)
        self.copies[(run_id, folder, TENSORS, manifest["files"][TENSORS]["sha256"])] = staging / TENSORS
        return folder

    def remove(self, *parts: str) -> None:
        try:
            self.fs.rm(self.key(*parts), recursive=True)
        except FileNotFoundError:
            pass  # removed meanwhile by another prune


class RunStore:
    def __init__(self, root: Path | str | None = None):
        location = default_root() if root is None else root
        if isinstance(location, Path) and _MANGLED_URL.match(str(location)):
            raise StoreError(f"run store {location}: a URL made into a Path (its // became /); pass the URL as a "
                             f"string, e.g. {str(location).replace(':/', '://', 1)}")
        self.remote = _Remote(str(location)) if is_remote(location) else None
        self.root: Path | str = self.remote.url if self.remote else _local_path(location)
        # this machine's directory for the store's locks and launch specs: the store itself when local
        self.local_dir: Path = self.remote.local_dir if self.remote else self.root
        self._folders: dict[str, str] = {}  # run id -> the folder of the entry this session saved or loaded

    def entry(self, run_id: str) -> Path | str:
        return f"{self.root}/{run_id}" if self.remote else self.root / run_id

    def lock(self, run_id: str, timeout: float = -1):
        """Held while one process trains `run_id`; the others wait, then load what it stored. An OS
        lock, so it holds between the processes of one machine (xdist workers); sessions on other
        machines sharing a remote store rely on the manifest-last commit (one good entry whoever
        writes last), and on not asking for the same runs at once."""
        return file_lock(self.local_dir / LOCKS / f"{run_id}.lock", timeout=timeout, what=f"run store entry {run_id}")

    # -- writing ----------------------------------------------------------------------------
    def save(self, run: Run) -> Path | str:
        """Store a freshly trained run (its trained tensors, record and measurements so far)."""
        base_names = {p.data_ptr(): n for n, p in run.loaded.base_parameters()}
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

        def write(folder: Path) -> dict:
            safetensors.torch.save_file(tensors, str(folder / TENSORS), metadata={"run_id": run.run_id})
            (folder / RUN).write_text(json.dumps(record, default=str))
            (folder / MEASUREMENTS).write_text(_measurements_document(run))
            return {"format": STORE_FORMAT, "files": {
                name: {"sha256": file_digest(folder / name), "bytes": (folder / name).stat().st_size}
                for name in (TENSORS, RUN)}}

        if self.remote:
            self._folders[run.run_id] = self.remote.commit(run.run_id, write)
            return self.entry(run.run_id)
        target = self.entry(run.run_id)
        with atomic_directory(target) as tmp:
            manifest = write(tmp)
            (tmp / MANIFEST).write_text(json.dumps(manifest))
        return target

    def save_measurements(self, run: Run) -> None:
        """Keep what has been measured on `run` so far (an entry's only file that changes)."""
        if self.remote:
            folder = self._folders.get(run.run_id)
            if folder is None:
                manifest = self._manifest(run.run_id)
                if manifest is None:
                    return
                folder = manifest.get("folder", "")
            self.remote.write(_measurements_document(run).encode(), run.run_id, folder, MEASUREMENTS)
            return
        manifest = self._manifest(run.run_id)
        if manifest is not None:
            atomic_write(self.root / run.run_id / manifest.get("folder", "") / MEASUREMENTS,
                         _measurements_document(run))

    # -- reading ----------------------------------------------------------------------------
    def _read(self, run_id: str, *parts: str) -> bytes:
        """One of an entry's files, whole; OSError (FileNotFoundError) when it cannot be read."""
        if self.remote:
            return self.remote.read(run_id, *parts)
        return (self.root / run_id).joinpath(*(p for p in parts if p)).read_bytes()

    def _manifest(self, run_id: str) -> dict | None:
        """The entry's manifest; None when it has none, or an unreadable one."""
        try:
            return _parse_manifest(self._read(run_id, MANIFEST))
        except (OSError, _Untrusted):
            return None

    def _verified(self, run_id: str) -> tuple[dict[str, Path], str] | None:
        """Local paths of the entry's tensors and record, each checked against the manifest, and the
        folder they are in; None when there is no entry. _Untrusted says why one cannot be used."""
        try:
            text = self._read(run_id, MANIFEST)
        except FileNotFoundError:
            if not self._entry_files(run_id):
                return None
            raise _Untrusted("it has no manifest (an interrupted write, or one still under way elsewhere)") from None
        except OSError as exc:
            raise _Untrusted(f"its manifest is unreadable ({type(exc).__name__})") from None
        manifest = _parse_manifest(text)
        folder, files = manifest.get("folder", ""), {}
        for name in (TENSORS, RUN):
            expected = manifest["files"].get(name) or {}
            if self.remote:
                files[name] = self.remote.fetch(run_id, folder, name, expected)
            else:
                files[name] = self.root / run_id / folder / name
                _check(files[name], name, expected)
        return files, folder

    def problem(self, run_id: str) -> str | None:
        """Why the entry cannot be trusted, or None when it is complete and intact."""
        try:
            found = self._verified(run_id)
        except _Untrusted as exc:
            return str(exc)
        return None if found is not None else "there is no such entry"

    def load(self, request: TrainingRequest, loaded: LoadedModel, stance: Stance) -> Run | None:
        """The stored run for `request`, without its model (rebuilt when first used); None when
        there is no trustworthy entry (an untrusted one is named in a warning)."""
        where = self.entry(request.run_id)
        try:
            found = self._verified(request.run_id)
        except _Untrusted as exc:
            warnings.warn(StoreWarning(f"stance-harness: run store entry {where} is not trusted ({exc}); "
                                       f"training it again"), stacklevel=2)
            return None
        if found is None:
            return None
        files, folder = found
        record = json.loads(files[RUN].read_text())
        if record.get("request") != json.loads(json.dumps(request.describe(), default=str)):
            warnings.warn(StoreWarning(f"stance-harness: run store entry {where} holds another request; "
                                       f"training it again"), stacklevel=2)
            return None
        # the base only when a trained tensor starts from it (a QLoRA run's adapters never do)
        base = dict(loaded.base.named_parameters()) if record["before_from_base"] else {}
        before = {n: base[b].detach() for n, b in record["before_from_base"].items()}
        with safe_open(str(files[TENSORS]), framework="pt") as tensors:
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
        self._folders[request.run_id] = folder
        run.measurements.update(self._measurements(request.run_id, folder))
        return run

    def _measurements(self, run_id: str, folder: str) -> dict:
        """What was measured on the stored run, if the code that measured it is today's."""
        try:
            found = json.loads(self._read(run_id, folder, MEASUREMENTS))
        except (OSError, ValueError):
            return {}  # written whole (a rename, or one object put), so only a missing file lands here
        if not isinstance(found, dict) or found.get("code") != measuring_code_version():
            return {}  # measured by other code: the tensors stand, the measurements are made again
        values = found.get("values")
        return values if isinstance(values, dict) else {}

    def _tensors_file(self, run_id: str) -> Path:
        """A local file of the run's stored tensors: the entry's own, or a checked copy of a remote one."""
        if not self.remote:
            manifest = self._manifest(run_id) or {}
            return self.root / run_id / manifest.get("folder", "") / TENSORS
        folder = self._folders.get(run_id)
        copies = [path for (run, f, name, _), path in self.remote.copies.items()
                  if (run, f, name) == (run_id, folder, TENSORS) and path.is_file()]
        if copies:
            return copies[0]
        try:
            found = self._verified(run_id)
        except _Untrusted as exc:
            raise StoreError(f"run store entry {self.entry(run_id)} cannot rebuild its model: {exc}") from None
        if found is None:
            raise StoreError(f"run store entry {self.entry(run_id)} cannot rebuild its model: it was removed")
        return found[0][TENSORS]

    def rebuild(self, run: Run) -> Callable[[], object]:
        """A function that makes `run`'s model again: the method's structure on the shared base,
        with the stored trained tensors put in. Bit-identical to the model that was trained."""
        def make():
            ctx, _ = prepare(run.request, run.loaded, run.stance, unshare=False)
            params = dict(ctx.model.named_parameters())
            with safe_open(str(self._tensors_file(run.run_id)), framework="pt") as tensors:
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
    def _entry_files(self, run_id: str) -> list[tuple[str, int, float]]:
        """(path inside the entry, bytes, modified) of every file the entry holds."""
        if self.remote:
            prefix = self.remote.key(run_id) + "/"
            return sorted((name.removeprefix(prefix), info.get("size") or 0, _mtime(info))
                          for name, info in self.remote.find(run_id).items() if info.get("type", "file") == "file")
        path = self.root / run_id
        if not path.is_dir():
            return []
        return sorted((f.relative_to(path).as_posix(), f.stat().st_size, f.stat().st_mtime)
                      for f in path.rglob("*") if f.is_file())

    def _scan(self) -> list[_Scanned]:
        if self.remote:
            grouped: dict[str, list] = {}
            prefix = self.remote.path + "/"
            for name, info in self.remote.find().items():
                run_id, _, inner = name.removeprefix(prefix).partition("/")
                if inner and not run_id.startswith(".") and info.get("type", "file") == "file":
                    grouped.setdefault(run_id, []).append((inner, info.get("size") or 0, _mtime(info)))
            items = sorted(grouped.items())
        elif self.root.is_dir():
            items = [(p.name, self._entry_files(p.name)) for p in sorted(self.root.iterdir())
                     if p.is_dir() and not p.name.startswith(".")]
        else:
            items = []
        return [_Scanned(run_id, sorted(files), self._manifest(run_id) if any(f[0] == MANIFEST for f in files)
                         else None) for run_id, files in items]

    def entries(self) -> list[EntryInfo]:
        out = []
        for scanned in self._scan():
            folder = (scanned.manifest or {}).get("folder", "")
            try:
                request = json.loads(self._read(scanned.run_id, folder, RUN)).get("request", {})
            except (OSError, ValueError, AttributeError):
                request = {}
            out.append(EntryInfo(scanned.run_id, self.entry(scanned.run_id), sum(f[1] for f in scanned.files),
                                 max((f[2] for f in scanned.files), default=0.0), scanned.manifest is not None,
                                 request.get("method"), (request.get("model") or {}).get("id"),
                                 (request.get("stance") or {}).get("name"),
                                 len(self._measurements(scanned.run_id, folder))))
        return out

    def describe(self, run_id: str) -> dict:
        files = self._entry_files(run_id)
        if not files:
            known = [e.run_id for e in self.entries()]
            raise StoreError(f"no run store entry {run_id!r} in {self.root}.{suggest(run_id, known)}")
        folder = (self._manifest(run_id) or {}).get("folder", "")
        try:
            record = json.loads(self._read(run_id, folder, RUN))
        except (OSError, ValueError):
            record = {}
        return {"run_id": run_id, "path": str(self.entry(run_id)), "problem": self.problem(run_id),
                "request": record.get("request"), "train_seconds": record.get("train_seconds"),
                "steps": len((record.get("trace") or {}).get("loss", [])),
                "files": {name: size for name, size, _ in files},
                "measurements": sorted(self._measurements(run_id, folder))}

    def prune(self, older_than_days: float | None = None) -> list[Path | str]:
        """Remove entries last touched longer ago than `older_than_days` (all when None), and what
        interrupted writes left (local temporaries; a remote entry's folders its manifest does not
        name, once untouched for STALE_SECONDS); returns what was removed."""
        now = time.time()
        cutoff = None if older_than_days is None else now - older_than_days * 86400
        removed: list[Path | str] = []
        for scanned in self._scan():
            modified = max((f[2] for f in scanned.files), default=0.0)
            if self.remote and scanned.manifest is None and now - modified < STALE_SECONDS:
                continue  # maybe a write under way on another machine: its manifest comes last
            if cutoff is None or modified < cutoff:
                if self.remote:
                    self.remote.remove(scanned.run_id)
                else:
                    shutil.rmtree(self.root / scanned.run_id, ignore_errors=True)
                removed.append(self.entry(scanned.run_id))
            elif self.remote and scanned.manifest is not None:
                kept = scanned.manifest.get("folder", "")
                folders: dict[str, float] = {}
                for name, _, mtime in scanned.files:
                    folder, sep, _ = name.partition("/")
                    if sep and folder != kept:
                        folders[folder] = max(folders.get(folder, 0.0), mtime)
                for folder, mtime in sorted(folders.items()):
                    if now - mtime > STALE_SECONDS:  # a writer that lost the race, or was killed
                        self.remote.remove(scanned.run_id, folder)
                        removed.append(f"{self.entry(scanned.run_id)}/{folder}")
        if not self.remote:
            for tmp in stale_temporaries(self.root):
                if now - tmp.stat().st_mtime > STALE_SECONDS:  # not a write in progress elsewhere
                    shutil.rmtree(tmp, ignore_errors=True)
                    removed.append(tmp)
        return removed
