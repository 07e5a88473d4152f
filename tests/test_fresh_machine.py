"""A machine that has never run the harness: every embedded model builds from a cache that lacks
it, in a process of its own, also when two processes race for the same one.

A warm ~/.cache/stance-harness once hid a crash in the first build from every test and from CI.
The race is always run in an empty directory of this module's. Each other model is built in the
session's cache where that lacks it (CI gives every run a new, empty one), so a cold run builds it
once and other tests that need it wait on its lock; where the session's cache has it, it is built
in the empty directory. These tests are collected first (tests/conftest.py), so on a cold run they build first.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from stance_harness.models.loading import local_weights_hash
from stance_harness.models.tiny import TINY_CHAT_VARIANTS, TINY_RECIPES, cache_root, embedded_entry

pytestmark = pytest.mark.fresh_machine

# Build (through the public loader) and use the model once: a forward pass with finite logits.
BUILD_AND_USE = """
import json, sys
import torch
from stance_harness.models import load_model
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


def _finish(proc: subprocess.Popen, timeout: float = 900) -> tuple[dict, str]:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"the build exited {proc.returncode}:\n{out[-4000:]}"
    result = [line for line in out.splitlines() if line.startswith("result: ")]
    assert result, out[-4000:]
    return json.loads(result[-1].removeprefix("result: ")), out


@pytest.fixture(scope="module")
def empty_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("fresh-machine-cache")
    assert not any(cache.iterdir())
    return cache


def _cache_lacking(name: str, empty_cache: Path) -> Path:
    """The session's cache where it lacks `name`, else this module's empty one."""
    if not (cache_root() / "models" / embedded_entry(name) / "model.safetensors").exists():
        return cache_root()
    return empty_cache


def _same_as_cached(name: str, entry: Path) -> None:
    """A build in the empty cache gives the model the session's cache holds (where it holds one),
    bit for bit: the build may get faster, never different."""
    cached = cache_root() / "models" / embedded_entry(name)
    if (cached / "model.safetensors").exists() and cached != entry:
        assert local_weights_hash(entry) == local_weights_hash(cached), (
            f"{name} built again is not the model in {cached}: the same recipe must give the same weights")


def _no_half_built_entry(cache: Path, entry: str) -> None:
    leftovers = [p.name for p in (cache / "models").glob(f".{entry}-*")]
    assert leftovers == [], f"half-built temporary directories left behind: {leftovers}"


def test_two_processes_racing_for_the_default_model_build_it_once(empty_cache):
    # always in the empty cache: in the session's, a test on the other xdist worker may start the
    # build first, and then neither of these two builds
    cache = empty_cache
    first, second = _start("tiny-qwen2", cache), _start("tiny-qwen2", cache)
    (a, out_a), (b, out_b) = _finish(first), _finish(second)
    assert a == b and a["finite"] and a["layers"] == 24
    builds = [out for out in (out_a, out_b) if "building embedded model tiny-qwen2" in out]
    assert len(builds) == 1, "exactly one process builds; the other waits on the lock and loads its result"
    assert Path(a["dir"]) == cache / "models" / embedded_entry("tiny-qwen2")
    _no_half_built_entry(cache, embedded_entry("tiny-qwen2"))
    _same_as_cached("tiny-qwen2", Path(a["dir"]))


@pytest.mark.parametrize("name", [n for n in [*TINY_CHAT_VARIANTS, *TINY_RECIPES] if n != "tiny-qwen2"])
def test_every_embedded_model_builds_from_a_cache_that_lacks_it(empty_cache, name):
    cache = _cache_lacking(name, empty_cache)
    result, out = _finish(_start(name, cache))
    assert result["finite"]
    entry = Path(result["dir"])
    assert entry == cache / "models" / embedded_entry(name) and (entry / "model.safetensors").exists()
    if name in TINY_RECIPES:
        assert f"building embedded model {name}" in out
        assert result["layers"] == TINY_RECIPES[name].num_layers
        if cache == empty_cache:  # the session's cache has its own build
            _same_as_cached(name, entry)
    _no_half_built_entry(cache, embedded_entry(name))
