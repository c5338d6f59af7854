#!/usr/bin/env bash
# Issue 22: the authors' TriangleMix (microsoft/MInference tri_mix, tri_mix_minference and their dense
# baseline) beside ours, TTFT at Llama-3.1-8B shapes with random weights, on one GPU in ONE device call.
#
# Carry (the device tool's `carry`): [".carry/minference"]  (~2.6 MB, ignored by git). Make it with
#   git --git-dir=<mirror of github:microsoft/MInference> archive <commit> minference csrc setup.py LICENSE \
#       TriangleMix/speed_test.py | tar -x -C .carry/minference && echo <commit> > .carry/minference/COMMIT
# (commit 37e9073 or later; fb56c917f618e8645f1cfc37535afd7424d78f0d is the one prepared).
# Command: bash bench/minference_gpu.sh          (timeout_s 600; LENGTHS=... to change the lengths)
#
# Steps, each under its own `timeout`, all inside one DEADLINE (default 570 s) counted from the start;
# expected times on an H200 (machine start excluded):
#   0. pip install -e . --no-deps (~15 s); their CUDA extension (csrc/*.cu) builds in the background (~60 s)
#   1. check   bench/peers/minference_agree.py: one layer's q/k/v at 32K, their triangle vs ours vs float32
#              dense under the triangle mask (~45 s)
#   2. ours    bench/ttft.py: dense, TriangleMix(16), TriangleMix(16) + vertical-slash with their pattern's
#              budgets (512 verticals, 2048 slashes) and their per-head selection (~210 s)
#   3. theirs  bench/peers/minference_ttft.py: dense, tri_mix, tri_mix_minference (~180 s)
#   4. table   bench/peers/minference_table.py -> $OUT/minference-vs-tmjax.{json,md} (ratios ours/theirs)
# Lengths run longest first, so a step cut short by its timeout still leaves the 128K rows; every row is
# printed as it finishes and the table falls back to the logs' ROW lines.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/out}"
SOURCE="${MINFERENCE_SOURCE:-.carry/minference}"
LENGTHS="${LENGTHS:-131072,65536,32768}"
DEADLINE="${DEADLINE:-570}"
EXT_DIR=/tmp/minference-extension
mkdir -p "$OUT/ours"
export PYTHONUNBUFFERED=1

# Seconds for the next step: its cap, or what the deadline leaves after reserving $2 s for later steps.
budget() {
  local left=$((DEADLINE - SECONDS - $2))
  ((left < 10)) && left=10
  echo $(($1 < left ? $1 : left))
}
step() {  # step NAME CAP RESERVE COMMAND...: run with a timeout, log to $OUT/NAME.log, say how it ended
  local name=$1 limit
  limit=$(budget "$2" "$3")
  shift 3
  echo "== $name (timeout ${limit} s, at ${SECONDS} s)"
  timeout --kill-after=5 "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  grep -v '^ROW' "$OUT/$name.log" | tail -25
  echo "== $name: exit $rc$( ((rc == 124 || rc == 137)) && echo ' (TIMED OUT)') after ${SECONDS} s"
}

if [[ ! -f "$SOURCE/minference/modules/tri_mix.py" ]]; then
  echo "no MInference source in $SOURCE: carry .carry/minference"
  exit 2
fi
echo "MInference commit: $(cat "$SOURCE/COMMIT" 2>/dev/null || echo unknown)"
if ! python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/pip.log" 2>&1; then
  tail -20 "$OUT/pip.log"
  exit 1
fi
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,memory.used --format=csv,noheader
timeout 240 python3 bench/peers/minference_source.py "$SOURCE" "$EXT_DIR" >"$OUT/extension.log" 2>&1 &
ext_pid=$!

step check 100 330 python3 bench/peers/minference_agree.py "$SOURCE" --length 32768 --implementation mosaic_gpu \
  --out "$OUT"
step ours 270 170 python3 bench/ttft.py --lengths "$LENGTHS" --configs dense,tm,tm+vs --switch-layer 16 \
  --vertical 512 --slash 2048 --selection head --implementation mosaic_gpu --repeats 3 --out "$OUT/ours"
wait "$ext_pid"
ext_rc=$?
echo "== extension (exit $ext_rc): $(tail -1 "$OUT/extension.log")"
ext_failed=()
((ext_rc != 0)) && ext_failed=(--extension-failed "exit $ext_rc: $(tail -c 400 "$OUT/extension.log")")
step theirs 250 10 python3 bench/peers/minference_ttft.py "$SOURCE" --lengths "$LENGTHS" --repeats 3 \
  --switch-layer 16 --extension-dir "$EXT_DIR" "${ext_failed[@]}" --out "$OUT"
python3 bench/peers/minference_table.py --ours "$OUT/ours/ttft.json" "$OUT/ours.log" \
  --theirs "$OUT/minference-ttft.json" "$OUT/theirs.log" --agree "$OUT/minference-agree.json" --out "$OUT"
echo "== done after ${SECONDS} s"
