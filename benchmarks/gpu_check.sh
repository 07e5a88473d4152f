#!/usr/bin/env bash
# Every GPU measurement in one go, in a few minutes, from the project's root or anywhere:
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]        (OUT_DIR, else $OUT, else /tmp/gpu-check)
#
# 1. benchmarks/run_memory.py on CUDA: six runs in one session, RSS and GPU memory per run;
# 2. suites/ on a model with Qwen2-0.5B's shapes with --model-args device=auto: wall time and
#    peak memory (the runs' CUDA max allocated, and nvidia-smi's device peak);
# 3. benchmarks/qlora_vs_lora.py: QLoRA against LoRA, step time and peak memory (CUDA max allocated),
#    at Qwen2-0.5B's shapes (LAYERS, EXAMPLES) and then at Llama-3.2-3B's (all 28 layers, 16 examples),
#    each model built from its config with random weights by benchmarks/shape_model.py. The 3B
#    build and runs have at most LLAMA_TIMEOUT seconds (300); past it they are stopped and an error
#    line is recorded beside any figures already printed.
#
# Without CUDA the same stages run shortened on the CPU, every figure labelled mode=cpu-shortened:
# a 2-layer build of the shape model, run_memory's lora r8 run only, without its
# single-run reference, two suite tests on the embedded tiny-qwen2 (one step of the shape model
# takes ~20 s on a 2-core CPU), 8 examples for QLoRA against LoRA at both shapes, each 2 layers deep.
# Knobs: PY, LAYERS, EXAMPLES, MEMORY_RUNS, SUITES, SUITE_MODEL, SUITE_K, SUITE_TIMEOUT (s, then the
# suites stop with SIGINT and their report is marked interrupted), LLAMA_LAYERS, LLAMA_EXAMPLES,
# LLAMA_TIMEOUT (s, for the Llama-3.2-3B shapes' build and runs together), WHEELS (a folder of
# wheels to install first, e.g. bitsandbytes on a machine that reaches no registry).
# Writes OUT_DIR/figures.jsonl (one JSON line per stage), a log per stage and the suites' report.json;
# prints the figures at the end.
set -u
OUT=${1:-${OUT:-/tmp/gpu-check}}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
if [ -z "${PY:-}" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
if [ -n "${WHEELS:-}" ] && [ -d "$WHEELS" ]; then
  $PY -m pip install -q --no-index --no-deps --no-cache-dir --target "$OUT/site" "$WHEELS"/*.whl \
    && export PYTHONPATH="$PYTHONPATH:$OUT/site"
fi
FIGURES="$OUT/figures.jsonl"
: > "$FIGURES"
started_all=$(date +%s)

if [ "$($PY -c 'import torch; print(int(torch.cuda.is_available()))' 2>/dev/null)" = 1 ]; then
  MODE=gpu; LAYERS=${LAYERS:-24}; EXAMPLES=${EXAMPLES:-40}; SUITES=${SUITES:-suites/}
  SUITE_TIMEOUT=${SUITE_TIMEOUT:-300}; MEMORY_FLAGS=""; SUITE_K=${SUITE_K:-}
  LLAMA_LAYERS=${LLAMA_LAYERS:-28}; LLAMA_EXAMPLES=${LLAMA_EXAMPLES:-16}; LLAMA_TIMEOUT=${LLAMA_TIMEOUT:-300}
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
else
  MODE=cpu-shortened; LAYERS=${LAYERS:-2}; EXAMPLES=${EXAMPLES:-8}; SUITES=${SUITES:-suites/test_locus_of_learning.py}
  SUITE_TIMEOUT=${SUITE_TIMEOUT:-240}; MEMORY_FLAGS="--skip-alone"; MEMORY_RUNS=${MEMORY_RUNS:-lora r8}
  SUITE_MODEL=${SUITE_MODEL:-tiny-qwen2}
  SUITE_K=${SUITE_K-lora_changes_only_its_adapters or full_finetuning_moves_every_tensor}
  LLAMA_LAYERS=${LLAMA_LAYERS:-2}; LLAMA_EXAMPLES=${LLAMA_EXAMPLES:-$EXAMPLES}; LLAMA_TIMEOUT=${LLAMA_TIMEOUT:-600}
  echo "no CUDA device: running the shortened CPU version (mode=$MODE, $LAYERS layers, $EXAMPLES examples)"
fi
MODEL_DIR=${MODEL_DIR:-/tmp/qwen2-0.5b-shape-$LAYERS}
SUITE_MODEL=${SUITE_MODEL:-$MODEL_DIR}
# pytest finds the plugin through its entry point where the project is installed, else by name
PLUGIN=$($PY -c "from importlib.metadata import entry_points as e; print('' if any(p.name == 'stance_harness' for p in e(group='pytest11')) else '-p stance_harness.plugin')")

record() {  # record STAGE JSON: one line of figures.jsonl, with the stage, the mode and the date
  $PY -c "import json, sys; d = json.loads(sys.argv[3]); print(json.dumps({'stage': sys.argv[1], 'mode': sys.argv[2], 'date': sys.argv[4], **d}))" \
    "$1" "$MODE" "$2" "$(date -u +%Y-%m-%dT%H:%M:%SZ)" >> "$FIGURES"
}

echo "== shape model ($LAYERS layers) -> $MODEL_DIR"
$PY benchmarks/shape_model.py "$MODEL_DIR" --layers "$LAYERS" > "$OUT/shape_model.log" 2>&1 || { cat "$OUT/shape_model.log"; exit 1; }

echo "== 1/3 run_memory"
t0=$(date +%s.%N)
if $PY benchmarks/run_memory.py --model-dir "$MODEL_DIR" --layers "$LAYERS" $MEMORY_FLAGS ${MEMORY_RUNS:+--runs "$MEMORY_RUNS"} > "$OUT/run_memory.log" 2>&1; then
  grep -v '^{' "$OUT/run_memory.log" | grep -vi warn | tail -12
  record run_memory "$(tail -1 "$OUT/run_memory.log" | $PY -c "import json, sys; d = json.load(sys.stdin); d['wall_s'] = $(date +%s.%N) - $t0; print(json.dumps(d))")"
else
  tail -5 "$OUT/run_memory.log"; record run_memory '{"error": "failed, see run_memory.log"}'
fi

echo "== 2/3 suites ($SUITES${SUITE_K:+ -k $SUITE_K} on $SUITE_MODEL, device=auto, at most ${SUITE_TIMEOUT}s)"
SMI_PID=""
if [ "$MODE" = gpu ]; then
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 250 > "$OUT/nvidia-smi.csv" 2>/dev/null &
  SMI_PID=$!
fi
t0=$(date +%s.%N)
timeout -s INT -k 30 "$SUITE_TIMEOUT" $PY -m pytest $SUITES ${SUITE_K:+-k "$SUITE_K"} $PLUGIN -p no:cacheprovider -q \
  --model "$SUITE_MODEL" --model-args device=auto --reports-dir "$OUT/reports" --run-cache "$OUT/run-cache" \
  > "$OUT/suites.log" 2>&1
status=$?
wall=$($PY -c "print($(date +%s.%N) - $t0)")
[ -n "$SMI_PID" ] && kill "$SMI_PID" 2>/dev/null
tail -3 "$OUT/suites.log"
REPORT=$(ls -t "$OUT"/reports/*/report.json 2>/dev/null | head -1)
if [ -n "$REPORT" ]; then
  cp "$REPORT" "$OUT/report.json"
  record suites "$($PY benchmarks/suite_figures.py "$OUT/report.json" "$wall" "$OUT/nvidia-smi.csv" | \
    $PY -c "import json, sys; d = json.load(sys.stdin); d.update(selection='$SUITES', k='$SUITE_K', model='$SUITE_MODEL', pytest_exit=$status, timeout_s=$SUITE_TIMEOUT); print(json.dumps(d))")"
else
  record suites "{\"error\": \"no report (pytest exit $status), see suites.log\", \"wall_s\": $wall}"
fi
rm -rf "$OUT/run-cache"

qlora_vs_lora() {  # qlora_vs_lora SHAPE LAYERS EXAMPLES LOG LIMIT_S [--model-dir DIR]: one line per method
  local shape=$1 layers=$2 examples=$3 log=$4 limit=$5; shift 5
  echo "-- $shape, $layers layers, $examples examples${limit:+, at most ${limit}s}"
  timeout -k 30 "${limit:-0}" $PY benchmarks/qlora_vs_lora.py --shape "$shape" --layers "$layers" \
    --examples "$examples" "$@" > "$log" 2>&1
  local status=$?
  # each method's line is printed as it finishes: keep those a timeout or a failure left
  grep '^{' "$log" | while read -r line; do record qlora_vs_lora "$line"; done
  if [ "$status" = 124 ] || [ "$status" = 137 ]; then
    record qlora_vs_lora "{\"shape\": \"$shape\", \"layers\": $layers, \"error\": \"stopped at the ${limit}s limit, see $(basename "$log")\"}"
  elif [ "$status" != 0 ]; then
    tail -5 "$log"
    record qlora_vs_lora "{\"shape\": \"$shape\", \"layers\": $layers, \"error\": \"failed (exit $status), see $(basename "$log")\"}"
  fi
}
echo "== 3/3 qlora vs lora"
qlora_vs_lora qwen2-0.5b "$LAYERS" "$EXAMPLES" "$OUT/qlora_vs_lora.log" "" --model-dir "$MODEL_DIR"
qlora_vs_lora llama-3.2-3b "$LLAMA_LAYERS" "$LLAMA_EXAMPLES" "$OUT/qlora_vs_lora_llama.log" "$LLAMA_TIMEOUT"

echo "== figures ($MODE, $(( $(date +%s) - started_all ))s in all) -> $FIGURES"
cat "$FIGURES"
