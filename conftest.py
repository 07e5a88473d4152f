"""Repo-level defaults for running the suites and tests from a checkout."""

import os

# Offline first: a run from a checkout never reaches a model hub, even if the shell forgot.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
