#!/usr/bin/env bash
# One command for a fresh clone: create .venv, install tmjax with test extras, and run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
exec .venv/bin/python -m pytest -q "$@"
