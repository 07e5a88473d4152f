"""Files a reader can trust: atomic writes, directories that appear whole or not at all, and
locks shared between processes (xdist workers, launchers) that a killed holder cannot keep."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from filelock import FileLock, Timeout

from stance_harness.core.errors import HarnessError


def atomic_write(path: Path, content: str | bytes) -> None:
    """Write beside the target, then rename: a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb" if isinstance(content, bytes) else "w",
                       **({} if isinstance(content, bytes) else {"encoding": "utf-8"})) as handle:
            handle.write(content)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; reports are for CI artifacts and colleagues
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_directory(target: Path):
    """Yield a temporary directory beside `target`; on success it becomes `target` in one rename.

    An exception, or a kill, leaves `target` as it was: a half-written directory is only ever
    a dot-named temporary, which `stale_temporaries` finds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    try:
        yield tmp
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def stale_temporaries(directory: Path) -> list[Path]:
    """The temporaries that interrupted `atomic_directory` calls left in `directory`."""
    directory = Path(directory)
    return sorted(p for p in directory.glob(".*.tmp-*") if p.is_dir()) if directory.is_dir() else []


@contextlib.contextmanager
def file_lock(path: Path, timeout: float = -1, what: str = "lock"):
    """An exclusive lock between processes. It is an OS lock on an open file, so a holder that is
    killed releases it; `timeout` seconds (-1: wait for ever) before a clear error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=timeout)
    except Timeout:
        raise HarnessError(f"{what}: {path} is still held by another process after {timeout:g}s") from None
    try:
        yield
    finally:
        lock.release()


def check_writable_directory(path: Path, option: str) -> None:
    """`path` is (or can be made) a directory this process can write to, checked by writing."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise HarnessError(f"{option} {path}: it is a file, not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=path, prefix=".write-check-", delete=True)
        probe.close()
    except OSError as exc:
        raise HarnessError(f"{option} {path}: cannot write there ({exc.strerror or exc})") from None


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes, read in blocks."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def read_json(path: Path, what: str, error: type[HarnessError] = HarnessError):
    """The JSON in `path`; unreadable or malformed, an `error` naming `what` and the file."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise error(f"{what} {path} is not valid JSON ({err.msg} at line {err.lineno})") from None
    except OSError as err:
        raise error(f"cannot read {what} {path}: {err.strerror or err}") from None
