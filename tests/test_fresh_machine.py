"""A machine that has never run the harness: every embedded model builds from an empty cache, in
a process of its own, also when two processes race for the same one.

A warm ~/.cache/stance-harness once hid a crash in the first build from every test and from CI.
These builds go to a cache of their own, whatever the session's cache holds; each finished model
is then copied into the session's cache where that lacks it, so a cold CI builds each one once.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from harness.models.tiny import TINY_CHAT_VARIANTS, TINY_RECIPES, cache_root

pytestmark = pytest.mark.fresh_machine

# Build (through the public loader) and use the model once: a forward pass with finite logits.
BUILD_AND_USE = """
import json, sys
import torch
from harness.models import load_model
loaded = load_model(sys.argv[1], progress=lambda m: print("progress:", m, flush=True))
ids = loaded.tokenizer("The quick brown fox", return_tensors="pt")["input_ids"]
with torch.no_grad():
    logits = loaded.base(input_ids=ids).logits
print("result:", json.dumps({"dir": str(loaded.path), "finite": bool(torch.isfinite(logits).all()),
                             "layers": loaded.anatomy.num_layers}), flush=True)
"""


def _start(name: str, cache: Path) -> subprocess.Popen:
    env = {**os.environ, "STANCE_HARNESS_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", BUILD_AND_USE, name], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _finish(proc: subprocess.Popen, timeout: float = 600) -> tuple[dict, str]:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"the build exited {proc.returncode}:\n{out[-4000:]}"
    result = [line for line in out.splitlines() if line.startswith("result: ")]
    assert result, out[-4000:]
    return json.loads(result[-1].removeprefix("result: ")), out


def _share_with_session(built: Path) -> None:
    """Copy a freshly built entry into the session's cache when that lacks it (atomic move)."""
    target = cache_root() / "models" / built.name
    if (target / "model.safetensors").exists():
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{built.name}-copy-"))
    try:
        shutil.copytree(built, tmp, dirs_exist_ok=True)
        os.replace(tmp, target)
    except OSError:  # another worker moved its copy in first
        pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def empty_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("fresh-machine-cache")
    assert not any(cache.iterdir())
    return cache


def test_two_processes_racing_for_the_default_model_build_it_once(empty_cache):
    first, second = _start("tiny-qwen2", empty_cache), _start("tiny-qwen2", empty_cache)
    (a, out_a), (b, out_b) = _finish(first), _finish(second)
    assert a == b and a["finite"] and a["layers"] == 24
    builds = [out for out in (out_a, out_b) if "building embedded model tiny-qwen2" in out]
    assert len(builds) == 1, "exactly one process builds; the other waits on the lock and loads its result"
    models = empty_cache / "models"
    assert sorted(p.name for p in models.iterdir() if not p.name.endswith(".lock")) == [Path(a["dir"]).name], \
        "nothing is left behind but the finished entry (no half-built temporary directory)"
    _share_with_session(Path(a["dir"]))


@pytest.mark.parametrize("name", [n for n in [*TINY_CHAT_VARIANTS, *TINY_RECIPES] if n != "tiny-qwen2"])
def test_every_embedded_model_builds_from_a_cache_that_lacks_it(empty_cache, name):
    result, out = _finish(_start(name, empty_cache))
    assert result["finite"]
    entry = Path(result["dir"])
    assert entry.parent == empty_cache / "models" and (entry / "model.safetensors").exists()
    if name in TINY_RECIPES:
        assert f"building embedded model {name}" in out
        assert result["layers"] == TINY_RECIPES[name].num_layers
    _share_with_session(entry)
