#!/usr/bin/env bash
# The GPU measurements behind benchmarks/REPORT.md, in priority order, each under a time limit,
# for one call of at most 10 minutes on one GPU (limits add up to 510 s, plus start-up):
#
#   1. e2e at 98,304 tokens, the paper's 530M model (vocab 128,256): dense, Lighthouse, ceiling, none
#   2. the same with vocab 256 (268M): the gap between the two is the cost outside attention
#   3. failure modes: short sequences (8K-64K), peak memory at 1M and 2M tokens, k up to N/16 (one layer)
#   4. e2e sweep over sequence lengths (vocab 256, 30 layers, dense up to 128K)
#
# Usage, from the repository root on the GPU machine:
#     bash benchmarks/evidence_run/run.sh OUT_DIR
# OUT_DIR mirrors benchmarks/: e2e/ and failure_modes/results/ (each step's JSON and .log), and
# evidence_run/results/ (nvidia-smi-run_evidence.txt; run_evidence.json: each step's command, exit
# code, seconds). Then
#     cp -r OUT_DIR/* benchmarks/ && python -m benchmarks.report --force
# Each benchmark rewrites its JSON after every row, so a step cut off by its limit keeps what it
# measured. Limits in seconds can be changed through the environment (LIMIT_E2E_BIG, ...).
# Transformer Engine is used where it imports (each step is a fresh process that imports it
# before torch touches cuDNN); the JSON says which spec ran. The quality study has its own
# background driver (benchmarks/quality/lease.sh).
set -u -o pipefail

NAME=run_evidence
if [ $# -ne 1 ]; then
    echo "error: usage: bash benchmarks/evidence_run/run.sh OUT_DIR" >&2
    exit 2
fi
OUT=$(realpath -m "$1")
MANIFEST_FINAL="$OUT/evidence_run/results/$NAME.json"
MANIFEST="$MANIFEST_FINAL.tmp"
DIRS=(e2e failure_modes/results evidence_run/results)
for dir in "${DIRS[@]}"; do
    if [ -e "$MANIFEST_FINAL" ] || [ -e "$MANIFEST" ] || [ -n "$(ls -A "$OUT/$dir" 2>/dev/null)" ]; then
        echo "error: $OUT already holds a $NAME run ($OUT/$dir); choose a new folder" >&2
        exit 2
    fi
done
for dir in "${DIRS[@]}"; do
    mkdir -p "$OUT/$dir" || exit 2
done
cd "$(dirname "${BASH_SOURCE[0]}")/../.." || exit 2
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
LH=("$PY" -m lighthouse_megatron.cli bench)
nvidia-smi > "$OUT/evidence_run/results/nvidia-smi-$NAME.txt" 2>&1
echo "[" > "$MANIFEST"
FIRST=1

# step DIR NAME LIMIT COMMAND...: run COMMAND under a limit of LIMIT seconds, its log in
# OUT/DIR/NAME.log, and record its exit code and seconds in the manifest.
step() {
    local log="$OUT/$1/$2.log" name=$2 limit=$3
    shift 3
    echo "=== $name (limit ${limit}s): $*" | tee "$log"
    local t0=$SECONDS rc
    timeout --kill-after=15 "$limit" "$@" >> "$log" 2>&1
    rc=$?
    tail -n 25 "$log"
    echo "=== $name: exit $rc after $((SECONDS - t0)) s"
    [ "$FIRST" -eq 1 ] || echo "," >> "$MANIFEST"
    FIRST=0
    "$PY" -c 'import json, sys; print(json.dumps({"step": sys.argv[1], "rc": int(sys.argv[2]),
        "seconds": int(sys.argv[3]), "limit_s": int(sys.argv[4]), "command": sys.argv[5:]}))' \
        "$name" "$rc" "$((SECONDS - t0))" "$limit" "$@" >> "$MANIFEST"
}

E2E_COMMON=(--seq-lens 98304 --warmup 1 --steps 2 --recompute full --loss-chunk 8192)

step e2e e2e_98k_vocab128256 "${LIMIT_E2E_BIG:-140}" "${LH[@]}" e2e "${E2E_COMMON[@]}" --vocab 128256 \
    --time-budget "${BUDGET_E2E_BIG:-110}" --out "$OUT/e2e" --name e2e_98k_vocab128256
step e2e e2e_98k_vocab256 "${LIMIT_E2E_SMALL:-120}" "${LH[@]}" e2e "${E2E_COMMON[@]}" --vocab 256 \
    --time-budget "${BUDGET_E2E_SMALL:-90}" --out "$OUT/e2e" --name e2e_98k_vocab256
step failure_modes/results failure_modes_gpu "${LIMIT_FAILURE:-90}" "$PY" -m benchmarks.failure_modes.run \
    --parts short,memory,topk --topk-len 32K --out "$OUT/failure_modes/results" --name failure_modes_gpu
step e2e e2e_sweep_vocab256 "${LIMIT_SWEEP:-160}" "${LH[@]}" e2e --seq-lens 8K,16K,32K,64K,128K,256K,512K --fit-topk \
    --vocab 256 --modes dense,lighthouse,ceiling --dense-max-len 128K --warmup 1 --steps 1 \
    --time-budget "${BUDGET_SWEEP:-130}" --out "$OUT/e2e" --name e2e_sweep_vocab256

echo "]" >> "$MANIFEST"
mv "$MANIFEST" "$MANIFEST_FINAL"
echo "results under $OUT"
