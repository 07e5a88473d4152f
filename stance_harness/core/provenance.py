"""Where a result came from: the commit, the machine and the library versions."""

from __future__ import annotations

import os
import platform
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from stance_harness.core.devices import _torch  # torch at first use (pytest's start-up imports this module)

LIBRARIES = ("stance-harness", "torch", "transformers", "peft", "bitsandbytes", "safetensors", "accelerate", "pytest")


def git_info(root: Path) -> dict:
    def git(*args):
        try:
            out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    return {"commit": commit, "dirty": bool(git("status", "--porcelain")) if commit else None,
            "branch": git("rev-parse", "--abbrev-ref", "HEAD")}


def library_versions(names=LIBRARIES) -> dict:
    versions = {}
    for name in names:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    return versions


def environment_info() -> dict:
    machine = {"python": platform.python_version(), "platform": platform.platform(),
               "machine": platform.machine(), "processor": platform.processor(), "cpus": os.cpu_count()}
    try:
        torch = _torch()
        machine["torch_threads"] = torch.get_num_threads()
        machine["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        pass
    return {"libraries": library_versions(), "machine": machine}
