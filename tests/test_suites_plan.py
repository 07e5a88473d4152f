"""The shipped suites on every architecture the anatomy supports: with --plan, every run they ask
for is built and checked (task, method, layers, schedule lengths) and every test that needs no
training runs, on a tiny model of each architecture. None may fail or error."""

import subprocess
import sys
from pathlib import Path

import pytest

from direct_training import save_tiny_gpt2

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_gpt2_dir(tmp_path_factory):
    return save_tiny_gpt2(tmp_path_factory.mktemp("tiny-gpt2-12"), layers=12, positions=256)  # GPT-2's 12 layers


@pytest.mark.parametrize("model", ["tiny-qwen2", "tiny-phi", "tiny-llama", "minilm-l6", "gpt2-architecture"])
def test_no_suite_fails_or_errors_on_any_architecture(model, tiny_gpt2_dir):
    name = str(tiny_gpt2_dir) if model == "gpt2-architecture" else model
    done = subprocess.run([sys.executable, "-m", "pytest", "suites/", "--plan", "--model", name, "-q", "--no-reports",
                           "-p", "no:cacheprovider", "-rfE"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    tail = done.stdout[-3000:] + done.stderr[-2000:]
    assert done.returncode == 0, tail
    summary = done.stdout.strip().splitlines()[-1]
    assert "failed" not in summary and "error" not in summary and "skipped" in summary, summary
