#!/usr/bin/env bash
# The quality study and the retrieval probe behind benchmarks/REPORT.md's quality rows, on one
# GPU, each under a time limit (limits add up to 540 s, plus start-up):
#
#   1. bench quality (default preset): a 6-layer byte-level model, hidden 512, at 16,384 tokens,
#      trained on this Python's standard library; dense from scratch for 1,600 iterations
#      against Lighthouse for 1,280 (L=3, p=4, k=256, layers 0 and 5 dense), convert, and dense
#      recovery for 320. Stages that would start after --time-budget are skipped. (The paper
#      recovers for 6k of 16k steps: add --switch 1000 for that share.)
#   2. bench retrieval: needle in a haystack on both final models at 2K, 4K, 8K and 16K tokens,
#      5 depths, 4 samples each, dense attention.
#
# Usage, from the repository root on the GPU machine:
#     bash benchmarks/run_quality.sh OUT_DIR
# OUT_DIR/quality/ and OUT_DIR/retrieval/ get each step's JSON, PNG and .log; OUT_DIR/quality_run/
# the data, checkpoints and metrics of the training runs (the probe reads the checkpoints from
# there; not for committing); OUT_DIR/evidence_run/run_quality.json the commands, exit codes and
# seconds. Then
#     cp -r OUT_DIR/quality OUT_DIR/retrieval benchmarks/ && lighthouse-megatron bench report --force
# Limits in seconds can be changed through the environment (LIMIT_QUALITY, BUDGET_QUALITY,
# LIMIT_RETRIEVAL).
set -u -o pipefail

# shellcheck source=benchmarks/steps.sh
. "$(dirname "$0")/steps.sh"
start_run run_quality $# "$@" quality retrieval

step quality quality "${LIMIT_QUALITY:-420}" "${LH[@]}" quality --device cuda --time-budget "${BUDGET_QUALITY:-330}" \
    --work-dir "$OUT/quality_run" --out "$OUT/quality" --name quality
step retrieval retrieval "${LIMIT_RETRIEVAL:-120}" "${LH[@]}" retrieval --device cuda \
    --quality "$OUT/quality/quality.json" --out "$OUT/retrieval" --name retrieval

manifest_close
echo "results under $OUT"
