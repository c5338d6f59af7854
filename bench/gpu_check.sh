#!/usr/bin/env bash
# The one script run on the GPU machine: install tmjax (no deps: the machine has jax with CUDA),
# run the GPU test grid (error figures -> $OUT/attention-gpu-errors.json), then the attention
# benchmark beside cuDNN and the peers (copied to .carry/peers, which travels ignored by git).
#   bash bench/gpu_check.sh [tests|bench|all] [seqs]
# The device tool allows 10 minutes a call: run 'tests' and 'bench' as two calls.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/out}"
mkdir -p "$OUT"
what="${1:-all}"
seqs="${2:-8192,32768,131072}"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/pip.log" 2>&1 || { tail -20 "$OUT/pip.log"; exit 1; }
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,memory.used --format=csv,noheader
if [[ "$what" == tests || "$what" == all ]]; then
  TMJAX_ERRORS_JSON="$OUT/attention-gpu-errors.json" timeout 580 \
    python3 -m pytest tests/test_gpu.py -q -x -p no:cacheprovider 2>&1 | tee "$OUT/test_gpu.log" | tail -40
fi
if [[ "$what" == bench || "$what" == all ]]; then
  peers=()
  [[ -d .carry/peers ]] && peers=(--peers .carry/peers)
  python3 bench/attention.py --seqs "$seqs" --out "$OUT" "${peers[@]}" 2>&1 | tee "$OUT/bench.log" | grep -v "^ROW" | tail -60
fi
