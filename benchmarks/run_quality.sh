#!/usr/bin/env bash
# The quality study and the retrieval probe behind benchmarks/REPORT.md, on one GPU (the default
# preset: about 5 minutes on an H100), each under a time limit:
#
#   1. bench quality: dense from scratch against Lighthouse + dense recovery (16K tokens)
#   2. bench retrieval: needle-in-a-haystack on the two models it trained
#
# Usage, from the repository root on the GPU machine:
#     bash benchmarks/run_quality.sh OUT_DIR
# Writes OUT_DIR/quality/ and OUT_DIR/retrieval/ (JSON + PNG; the runs' checkpoints stay in
# OUT_DIR/quality-run/). Then
#     cp -r OUT_DIR/quality OUT_DIR/retrieval benchmarks/ && lighthouse-megatron bench report --force
set -u -o pipefail

if [ $# -ne 1 ]; then
    echo "error: usage: bash benchmarks/run_quality.sh OUT_DIR" >&2
    exit 2
fi
OUT=$1
cd "$(dirname "$0")/.." || exit 2
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
LH=("$PY" -m lighthouse_megatron.cli bench)

timeout --kill-after=15 "${LIMIT_QUALITY:-480}" "${LH[@]}" quality --work-dir "$OUT/quality-run" \
    --out "$OUT/quality" --time-budget "${BUDGET_QUALITY:-420}" || exit $?
timeout --kill-after=15 "${LIMIT_RETRIEVAL:-120}" "${LH[@]}" retrieval --quality "$OUT/quality/quality.json" \
    --out "$OUT/retrieval"
