#!/usr/bin/env bash
# The suite's torch-free subset under the newest jax that pyproject.toml's ranges allow, in a second
# venv (.venv-newest, ignored by git) on Python 3.12: a user on Python >= 3.12 resolves a newer jax than
# the main venv's Python 3.11 does, and torch (the transformers comparisons) has no 3.12 wheel here.
# The subset imports every module (tests/test_imports.py) and checks attention, tables, layouts, the
# estimators and the decoder against numpy and dense references. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
python="${TMJAX_NEWEST_PYTHON:-}"
if [ -z "$python" ]; then
  # a pyenv shim named python3.12 may exist without 3.12 being active: take the first that runs as 3.12
  for candidate in python3.12 "$HOME"/.pyenv/versions/3.12*/bin/python3.12 /root/.pyenv/versions/3.12*/bin/python3.12; do
    if "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' >/dev/null 2>&1; then
      python="$candidate"; break
    fi
  done
fi
if [ -z "$python" ]; then
  echo "scripts/test-newest-jax.sh: no python3.12 found (set TMJAX_NEWEST_PYTHON)" >&2
  exit 1
fi
if [ ! -x .venv-newest/bin/python ]; then
  "$python" -m venv .venv-newest
fi
pip=(.venv-newest/bin/python -m pip install --quiet --disable-pip-version-check)
"${pip[@]}" --upgrade pip
# --upgrade on jax and jaxlib: the newest release inside pyproject.toml's range, each run.
"${pip[@]}" --upgrade -e ".[core-test]" jax jaxlib
.venv-newest/bin/python -c 'import jax, sys; print(f"newest-jax subset: jax {jax.__version__}, Python {sys.version.split()[0]}")'
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
exec .venv-newest/bin/python -m pytest -q -p no:cacheprovider "$@" \
  tests/test_imports.py tests/test_decoder_numpy.py tests/test_attention.py tests/test_tables.py \
  tests/test_layout.py tests/test_block_tables.py tests/test_api_misuse.py tests/test_vs_budgets.py \
  tests/test_tuning.py tests/test_memory_bounds.py
