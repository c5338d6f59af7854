#!/usr/bin/env bash
# One command for a fresh clone: create .venv, install tmjax, and run the demo on SmolLM2-135M-Instruct.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh demo
exec .venv/bin/tmjax demo "$@"
