#!/usr/bin/env bash
# The one script run on the GPU machine: install tmjax (no deps: the machine has jax with CUDA) and the
# wheels carried in .whl (flash-attn3-jax, einops, gguf), then one of:
#   tests  the GPU test grid (error figures -> $OUT/attention-gpu-errors.json): triangle, causal,
#          vertical-slash, key-block-list and padding-poison cases for every implementation
#          (TESTS_K="triangle_grid" / TESTS_K="not triangle_grid": the grid in two calls)
#   bench  bench/attention.py beside cuDNN, FlashAttention-3 (when its wheel loads) and the peers in
#          .carry/peers; then the same at SmolLM2's heads (9 q / 3 KV, head_dim 64); SWEEP=1 adds the tuning
#          sweep (--sweep) and writes each head shape's fastest rows as a tuning table to $OUT; VARIANTS adds
#          --variants (see the variants mode)
#   variants  GPU tests TESTS_K, then bench/attention.py --variants VARIANTS (mosaic_gpu Tuning fields changed
#          from the table's, e.g. 'items=2;guard=nonfinite') at both head shapes [seqs] (issue 21)
#   vs     bench/smollm2_vs_indices.py (SmolLM2's own picks), bench/vertical_slash.py (local/real/random)
#          and bench/ttft.py for SmolLM2 (needs the GGUF: see bench/NOTES.md, "next GPU session")
#   ttft   bench/ttft.py at Llama-3.1-8B shapes: dense, TriangleMix(16), TriangleMix(16) + vertical-slash,
#          composed with the vs step's one-layer results when they are in $OUT
#   sweep  bench/gpu_sweep.py: the randomized attention sweep (issue 17), every backend x pattern, >= 300
#          cases each, in SHARDS=8 processes side by side (seeds [seqs] .. +7; each aims at 1.2x its share), merged
#          (sweep-<device>-<date>-merged.json/.md -> $OUT, the shards in sweep-shards.tgz); PATTERNS=a,b limits the patterns, SWEEP_S sets
#          the seconds of sweeping (330), SWEEP_MEM the GPU memory share of all shards (0.85), SHARD_CASES
#          each shard's target per pair (default 1.2x its share of 300: a shorter SWEEP_S tops up more)
#   gridsweep  tests (WORKERS=4) and sweep (SHARDS=4) side by side, -> $OUT/grid, $OUT/sweep; [seqs] the seed
#   evals  tmjax eval on SmolLM2 at 8K, one process per rung of RUNGS (default 0.95,0.97,0.99; EVAL_DTYPE,
#          EVAL_IMPL: their dtype and backend, default bf16 through the platform's kernels) plus one per
#          one-byte cache in KV_EVAL (default float8_e4m3fn; bf16), side by side (correctness only); the
#          GGUF must be in place (prep first)
#   dynamic [parts]  the dynamic methods (FlexPrefill, the density guard), parts comma-separated, in this order
#          (default all; each part stops at the time left of DYNAMIC_S, default 540 s):
#          tests     tests/test_gpu.py -k "flexprefill or density_guard" (mosaic_gpu, triton, xla)
#          accuracy  tmjax eval on SmolLM2 at 8K in bf16: ACC_CONFIGS (default dense, tm:22, tm:22+fp@0.95,
#                    tm:22+vs@0.95; fp@<gamma> / vs@<mass> per configuration); SAMPLES per task (default 15:
#                    105 over the seven tasks)
#          ttft      bench/ttft.py SmolLM2 32K/128K: dense, tm, tm+vs, tm+vs-mass, tm+fp (MASS, GAMMA: 0.95)
#          layer     bench/dynamic_layer.py: one Llama-3.1-8B-shaped layer at 32K/128K (INPUTS, default
#                    local,random; smollm2:<layer> needs the GGUF), MASS and GAMMA as for ttft
#          replay    (not in the default) SmolLM2's picks at 32K/128K (bench/smollm2_vs_indices.py), replayed
#                    in a Llama-3.1-8B-shaped prefill: bench/ttft.py --replay-picks (tm+vs-decoder, tm+vs-replay)
#          e.g. bash bench/gpu_check.sh dynamic accuracy,ttft,layer
#   long   bench/long_prompts.py (issue 20): Llama-3.1-8B shapes, prefill time + peak memory beside
#          tmjax.memory_estimate; [seqs] default 131072,262144 (dense + TriangleMix(16)); then
#          `long 524288,1048576` (TriangleMix(16); 1M with the fp8 cache) and, for dense at 512K,
#          `CONFIGS=dense DENSE_MAX=524288 REPEATS=1 ... long 524288`; each call stops starting rows at 480 s
#   fp8eval  tmjax eval on SmolLM2 at 8K: dense with its bf16 cache vs dense with a one-byte cache
#          (--kv-dtype KV, default float8_e4m3fn; int8 too), 7 tasks x [seqs] samples (default 18: 126), -> $OUT/fp8eval
#   multigpu-correct | multigpu-scale | multigpu-scaleout   bench/multigpu.py's steps (issue 12; a
#          nvidia-h200-x2/-x4/-x8 machine; NVLink multicast stays off)
#   prep   install only and stage the GGUF's first part in /tmp (a short first call of two; the second,
#          within 30 s, carries part b)
#   first  a session's first call when either card may come (kind nvidia-h200, needs_h200 false): on an
#          H200, issue 20's 512K rows (`long 524288`, tm and tm+fp, bf16 cache); on an H100, issue 21's
#          variants (default: test_mosaic_gpu_guard_only_for_nonfinite_values, then longer KV chunks for
#          the dense last rows and the non-finite-only guard on the table's entries)
#   bash bench/gpu_check.sh prep|first|tests|bench|variants|vs|ttft|sweep|gridsweep|evals|dynamic|long|fp8eval [seqs|parts]
# The device tool allows 10 minutes a call: one mode per call.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/out}"
mkdir -p "$OUT"
what="${1:-tests}"
seqs="${2:-8192,32768,131072}"
export PYTHONUNBUFFERED=1
if [[ -z "${TMJAX_INSTALLED:-}" ]]; then  # a mode that runs other modes installs once
  if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/pip.log" 2>&1 || { tail -20 "$OUT/pip.log"; exit 1; }
  export TMJAX_INSTALLED=1
fi
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,memory.used --format=csv,noheader
# SmolLM2's GGUF (94 MiB) travels in two parts, one per call (bench/carry_smollm2.sh): the first part
# waits in /tmp (kept on a warm machine) until the second arrives
[[ -f .carry/smollm2a/smol.part.aa ]] && cp .carry/smollm2a/smol.part.aa /tmp/
if [[ -f /tmp/smol.part.aa && -f .carry/smollm2b/smol.part.ab && ! -f .carry/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf ]]; then
  mkdir -p .carry/smollm2 && cat /tmp/smol.part.aa .carry/smollm2b/smol.part.ab > .carry/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  sha256sum .carry/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
fi
if [[ -f .carry/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf ]]; then
  export TMJAX_SMOLLM2_GGUF="$PWD/.carry/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" TMJAX_CACHE="$PWD/.carry/cache"
fi
case "$what" in
  prep) ls -la /tmp/smol.part.aa 2>/dev/null ;;
  first)
    if nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200; then
      CONFIGS="${CONFIGS:-tm,tm+fp}" REPEATS="${REPEATS:-0}" ROW_S="${ROW_S:-280}" LONG_S="${LONG_S:-300}" \
        bash "$0" long 524288
    else  # issue 21 on the H100: the last rows' KV chunk and the non-finite-only guard on the table's entries
      # (edges on since 2026-12-08), both head shapes, after the value-guard tests
      TESTS_K="${TESTS_K:-guard_only_for_nonfinite}" VARIANTS="${VARIANTS:-kv_chunk=8192;kv_chunk=16384;guard=nonfinite}" bash "$0" variants 32768,131072
    fi ;;
  tests)
    # TESTS_K="expr" runs a part of the grid (pytest -k), for a grid longer than one call
    # WORKERS=n runs the grid in n processes (pytest-xdist; compiling dominates, the GPU is shared, each
    # process gets a fifth of its memory); each worker writes attention-gpu-errors-<worker>.json
    workers=()
    [[ -n "${WORKERS:-}" ]] && { workers=(-n "$WORKERS"); export XLA_PYTHON_CLIENT_MEM_FRACTION=${GRID_MEM:-0.2}; }
    TMJAX_ERRORS_JSON="$OUT/attention-gpu-errors.json" timeout "${TESTS_TIMEOUT:-580}" \
      python3 -m pytest tests/test_gpu.py -q -x -p no:cacheprovider "${workers[@]}" ${TESTS_K:+-k "$TESTS_K"} 2>&1 \
      | tee "$OUT/test_gpu.log" | tail -40 ;;
  bench)
    peers=()
    [[ -d .carry/peers ]] && peers=(--peers .carry/peers)
    python3 bench/attention.py --seqs "$seqs" --out "$OUT" "${peers[@]}" ${SWEEP:+--sweep --write-tuning "$OUT/mosaic_gpu-d128.json"} \
      ${VARIANTS:+--variants "$VARIANTS"} \
      2>&1 | tee "$OUT/bench.log" | grep -v "^ROW" | tail -40
    python3 bench/attention.py --seqs "$seqs" --heads 9,3,64 --out "$OUT" ${SWEEP:+--sweep --write-tuning "$OUT/mosaic_gpu-d64.json"} \
      ${VARIANTS:+--variants "$VARIANTS"} \
      2>&1 | grep -v "^ROW" | tail -20 ;;
  variants)
    # kernel variants (issue 21; mosaic_gpu Tuning fields): the GPU tests TESTS_K (default: the several-items
    # sink and guard cases, the causal and unlisted-blocks ones on mosaic_gpu; -> grid.tgz), then the table's
    # tunings with VARIANTS (default: the value guard only for non-finite V; 128-key blocks with and without
    # 64-key sink steps; sink steps on the table's own entry where its blocks are 128) beside the rest at Llama-3.1-8B
    # heads (FA3's rows when its wheel is in .whl), then at SmolLM2's heads
    # (SKIP_TESTS=1: the bench alone, after a tests call)
    if [[ -z "${SKIP_TESTS:-}" ]]; then
      ( OUT="$OUT/grid" WORKERS="${WORKERS:-4}" TESTS_TIMEOUT="${TESTS_TIMEOUT:-200}" \
        TESTS_K="${TESTS_K:-several or sink or edge or guard or (causal and mosaic_gpu) or (unlisted and mosaic_gpu) or values_a_row}" \
        bash "$0" tests > "$OUT/grid.log" 2>&1 )
      tail -4 "$OUT/grid.log"
      ( cd "$OUT" && tar czf grid.tgz grid && rm -rf grid )
    fi
    variants="${VARIANTS:-guard=nonfinite;block_kv=128,stages=2;block_kv=128,stages=2,sink_keys=64;sink_keys=64}"
    python3 bench/attention.py --seqs "$seqs" --variants "$variants" --out "$OUT" 2>&1 | tee "$OUT/variants-d128.log" \
      | grep -v "^ROW" | tail -30
    python3 bench/attention.py --seqs "$seqs" --heads 9,3,64 --variants "$variants" --out "$OUT" 2>&1 \
      | tee "$OUT/variants-d64.log" | grep -v "^ROW" | tail -16 ;;
  vs)
    python3 bench/smollm2_vs_indices.py --lengths 32768,65536,131072 --out "$OUT" 2>&1 | tail -3
    python3 bench/vertical_slash.py --seqs 32768,65536,131072 --implementation mosaic_gpu \
      --real-indices "$OUT/smollm2-vs-indices.npz" --out "$OUT" 2>&1 | grep -v "^ROW" | tail -20
    python3 bench/ttft.py --model smollm2 --lengths 32768,65536,131072 --switch-layer 22 \
      --configs dense,tm,vs,tm+vs --implementation mosaic_gpu --out "$OUT/smollm2" 2>&1 | tail -20 ;;
  ttft)
    attn=$(ls "$OUT"/vertical-slash-*.json "$OUT"/attention-*.json 2>/dev/null | paste -sd, -)
    python3 bench/ttft.py --lengths 32768,65536,98304,131072 --configs dense,tm,tm+vs --implementation mosaic_gpu \
      ${attn:+--attention-json "$attn"} --out "$OUT" 2>&1 | tail -20 ;;
  sweep)
    # SHARDS processes side by side (seeds seed .. seed+SHARDS-1; compiling is the cost, and the GPU
    # machine's cores compile in parallel), each to its share of the 300 cases, SWEEP_S seconds of
    # sweeping (hard stop 40 s later); then one merged record
    shards="${SHARDS:-8}" seed="${2:-$(date +%Y%m%d)}" budget="${SWEEP_S:-330}"
    pids=()
    for i in $(seq 0 $((shards - 1))); do
      XLA_PYTHON_CLIENT_MEM_FRACTION=$(python3 -c "print(round(${SWEEP_MEM:-0.85} / $shards, 3))") \
        timeout $((budget + 40)) python3 bench/gpu_sweep.py --out "$OUT/sweep-$i" --budget-s "$budget" \
        --seed $((seed + i)) --cases "${SHARD_CASES:-$(( (360 + shards - 1) / shards ))}" --first-cases 3 ${PATTERNS:+--patterns "$PATTERNS"} \
        > "$OUT/sweep-$i.log" 2>&1 &
      pids+=($!)
    done
    wait "${pids[@]}"
    grep -h "FAIL" -A1 "$OUT"/sweep-*.log | head -20
    python3 bench/gpu_sweep.py --out "$OUT" --cases 300 --merge "$OUT"/sweep-*/sweep-*.json 2>&1 | tail -40
    # the device tool returns a limited number of files: the shards' records and logs go in one archive
    shard_files=()
    for i in $(seq 0 $((shards - 1))); do shard_files+=("sweep-$i" "sweep-$i.log"); done
    ( cd "$OUT" && tar czf sweep-shards.tgz "${shard_files[@]}" && rm -rf "${shard_files[@]}" ) ;;
  gridsweep)
    # the whole grid (WORKERS=4 processes, 0.1 of the memory each, 400 s) beside the sweep (4 shards,
    # 330 s, 0.5 of the memory): the two correctness runs in one call (~7.5 minutes)
    ( OUT="$OUT/grid" WORKERS=4 GRID_MEM=0.1 TESTS_TIMEOUT=400 bash "$0" tests > "$OUT/grid.log" 2>&1 ) &
    grid=$!
    OUT="$OUT/sweep" SHARDS=4 SWEEP_S=330 SWEEP_MEM=0.5 bash "$0" sweep "$2" > "$OUT/sweep.log" 2>&1
    wait $grid
    tail -12 "$OUT/grid.log"; tail -40 "$OUT/sweep.log" ;;
  evals)
    # tmjax eval on SmolLM2 at 8K (bf16, 105 samples; deterministic GPU ops, the CLI's default) in parallel
    # processes, one per ladder rung in RUNGS (default 0.95,0.97,0.99: dense, tm:22, tm:22+fp@g, tm:22+vs@g)
    # plus the fp8 cache (dense vs --kv-dtype float8_e4m3fn); each grows to at most 0.12 of the GPU memory.
    # Correctness only: nothing is timed. The dense answers of every rung must agree (bench/eval_agreement.py
    # checks it: deterministic ops make separate processes give the same answers). Needs the GGUF. -> acc.tgz
    python3 -c "from tmjax.default_model import smollm2_checkpoint as c; print(c())"  # convert once, up front
    mkdir -p "$OUT/acc"
    ev() { local name=$1; shift
      XLA_PYTHON_CLIENT_PREALLOCATE=false XLA_PYTHON_CLIENT_MEM_FRACTION=${EVAL_MEM:-0.12} timeout "${EVAL_S:-500}" \
        python3 -m tmjax eval --max-tokens 8192 "$@" --out "$OUT/acc/$name" > "$OUT/acc/$name.log" 2>&1
      echo "$name exit $? $(date +%T)"; }
    pids=()
    rungs="${RUNGS-0.95,0.97,0.99}" dtype="${EVAL_DTYPE:-bfloat16}"
    for g in ${rungs//,/ }; do
      ev "rung-$g-$dtype" --dtype "$dtype" ${EVAL_IMPL:+--implementation "$EVAL_IMPL"} --samples-per-task 15 \
        --configs "dense,tm:22,tm:22+fp@$g,tm:22+vs@$g" & pids+=($!)
    done
    kvs="${KV_EVAL-float8_e4m3fn}"
    for kv in ${kvs//,/ }; do
      ev "kv-$kv" --dtype bfloat16 --samples-per-task 15 --configs dense --kv-dtype "$kv" & pids+=($!)
    done
    wait "${pids[@]}"
    for f in "$OUT"/acc/*.log; do echo "--- $f"; grep "^| " "$f"; grep -h "identical to TriangleMix" "${f%.log}/accuracy.md" 2>/dev/null; done
    reports=("$OUT"/acc/*/accuracy.json)
    (( ${#reports[@]} > 1 )) && python3 bench/eval_agreement.py "${reports[@]}" --out "$OUT/acc/agreement.json" \
      | grep -E "^\| (dense|switch=22) "
    ( cd "$OUT" && find acc -name "*.png" -delete && tar czf acc.tgz acc && rm -rf acc ) ;;
  dynamic)
    parts="${2:-tests,accuracy,ttft,layer}"
    stop=$(( $(date +%s) + ${DYNAMIC_S:-540} ))
    left() { echo $(( stop - $(date +%s) )); }
    for part in tests accuracy ttft layer replay; do
      [[ ",$parts," == *",$part,"* ]] || continue
      (( $(left) > 20 )) || { echo "dynamic: no time left for $part"; continue; }
      echo "== dynamic $part ($(left) s left)"
      case "$part" in
        tests)
          TMJAX_ERRORS_JSON="$OUT/dynamic-gpu-errors.json" timeout "$(left)" \
            python3 -m pytest tests/test_gpu.py -q -p no:cacheprovider -k "flexprefill or density_guard" 2>&1 \
            | tee "$OUT/dynamic-test_gpu.log" | tail -15 ;;
        accuracy)
          # bf16 through the GPU kernels; ACC_CONFIGS a ladder in one run (one dense reference; ~100 s a config)
          timeout "$(left)" python3 -m tmjax eval --dtype bfloat16 --max-tokens 8192 --samples-per-task "${SAMPLES:-15}" \
            --configs "${ACC_CONFIGS:-dense,tm:22,tm:22+fp@0.95,tm:22+vs@0.95}" \
            --out "$OUT/accuracy-dynamic" 2>&1 | tail -15 ;;
        ttft)
          timeout "$(left)" python3 bench/ttft.py --model smollm2 --lengths 32768,131072 --switch-layer 22 \
            --configs dense,tm,tm+vs,tm+vs-mass,tm+fp --mass "${MASS:-0.95}" --gamma "${GAMMA:-0.95}" \
            --out "$OUT/smollm2-dynamic" 2>&1 | tail -12 ;;
        layer)
          timeout "$(left)" python3 bench/dynamic_layer.py --seqs 32768,131072 --inputs "${INPUTS:-local,random}" \
            --mass "${MASS:-0.95}" --gamma "${GAMMA:-0.95}" --min-time-s 0.3 --out "$OUT" 2>&1 | grep -v "^ROW" | tail -25 ;;
        replay)
          timeout "$(left)" python3 bench/smollm2_vs_indices.py --lengths 32768,131072 --out "$OUT" 2>&1 | tail -2
          timeout "$(left)" python3 bench/ttft.py --lengths 32768,131072 --configs tm+vs-decoder,tm+vs-replay \
            --replay-picks "$OUT/smollm2-vs-indices.npz" --out "$OUT/llama-replay" 2>&1 | tail -8 ;;
      esac
    done ;;
  long)
    python3 bench/long_prompts.py --lengths "${2:-131072,262144}" --configs "${CONFIGS:-dense,tm}" ${ONE_BYTE:+--one-byte "$ONE_BYTE"} \
      --dense-max "${DENSE_MAX:-262144}" --repeats "${REPEATS:-3}" --row-timeout-s "${ROW_S:-420}" --budget-s "${LONG_S:-480}" \
      --out "$OUT" 2>&1 | tee "$OUT/long.log" | grep -v "^ROW" | tail -30 ;;
  fp8eval)
    timeout 530 python3 -m tmjax eval --configs dense --kv-dtype "${KV:-float8_e4m3fn}" --dtype bfloat16 --max-tokens 8192 \
      --samples-per-task "${2:-18}" --out "$OUT/fp8eval" 2>&1 | tee "$OUT/fp8eval.log" | tail -20 ;;
  multigpu-*)
    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \
      python3 bench/multigpu.py --step "${what#multigpu-}" --out "$OUT" 2>&1 | grep -v "^ROW" | tail -30 ;;
esac
