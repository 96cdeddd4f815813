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
#     bash benchmarks/run_evidence.sh OUT_DIR
# Everything goes under OUT_DIR: e2e/ and failure_modes/ (each step's JSON and .log),
# evidence_run/ (nvidia-smi-run_evidence.txt; run_evidence.json: each step's command, exit code, seconds). Then
#     cp -r OUT_DIR/* benchmarks/ && python -m benchmarks.report --force
# Each benchmark rewrites its JSON after every row, so a step cut off by its limit keeps what it
# measured. Limits in seconds can be changed through the environment (LIMIT_E2E_BIG, ...).
# Transformer Engine is used where it imports (each step is a fresh process that imports it
# before torch touches cuDNN); the JSON says which spec ran.
set -u -o pipefail

# shellcheck source=benchmarks/steps.sh
. "$(dirname "$0")/steps.sh"
start_run run_evidence $# "$@" e2e failure_modes

E2E_COMMON=(--seq-lens 98304 --warmup 1 --steps 2 --recompute full --loss-chunk 8192)

step e2e e2e_98k_vocab128256 "${LIMIT_E2E_BIG:-140}" "${LH[@]}" e2e "${E2E_COMMON[@]}" --vocab 128256 \
    --time-budget "${BUDGET_E2E_BIG:-110}" --out "$OUT/e2e" --name e2e_98k_vocab128256
step e2e e2e_98k_vocab256 "${LIMIT_E2E_SMALL:-120}" "${LH[@]}" e2e "${E2E_COMMON[@]}" --vocab 256 \
    --time-budget "${BUDGET_E2E_SMALL:-90}" --out "$OUT/e2e" --name e2e_98k_vocab256
step failure_modes failure_modes_gpu "${LIMIT_FAILURE:-90}" "$PY" -m benchmarks.failure_modes --parts short,memory,topk \
    --topk-len 32K --out "$OUT/failure_modes" --name failure_modes_gpu
step e2e e2e_sweep_vocab256 "${LIMIT_SWEEP:-160}" "${LH[@]}" e2e --seq-lens 8K,16K,32K,64K,128K,256K,512K --fit-topk \
    --vocab 256 --modes dense,lighthouse,ceiling --dense-max-len 128K --warmup 1 --steps 1 \
    --time-budget "${BUDGET_SWEEP:-130}" --out "$OUT/e2e" --name e2e_sweep_vocab256

manifest_close
echo "results under $OUT"
