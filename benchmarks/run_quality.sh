#!/usr/bin/env bash
# The quality study behind benchmarks/REPORT.md's quality rows, on ONE GPU (python -m benchmarks.quality),
# each part under a time budget (BUDGET_S seconds in all, default 1080: 600 + 480):
#
#   1. default preset (6 x 512, 16K tokens, batch 2, 1,000 iterations; stdlib + 5% passkey documents):
#      the paper's protocol (constant LR after warm-up, switch at 62.5%, stage 2 resumed with the same
#      optimizer state and data) with SEEDS (3) seeds, the sweep constant x {50, 62.5, 75, 80}% on the
#      same seeds and wsd, cosine x {62.5, 80}% with SWEEP_SEEDS (1) seed (cosine 80% is the old
#      protocol's row), the leak probe and passkey retrieval; JOBS (6) concurrent processes.
#      Estimated ~580 s at ~90 / ~60 ms per Lighthouse / dense iteration and 1.75x from concurrency.
#   2. --preset large (12 x 1024, 32K tokens, batch 1, 256 iterations; stdlib + 64 MB of site-packages
#      sources + passkey documents): the paper's protocol only, LARGE_SEEDS (2) seeds, LARGE_JOBS (4).
#      Jobs that could not finish inside a part's budget are skipped (the JSON lists them).
#
# Usage, from the repository root on the GPU machine (megatron-core installed; TE used if it imports):
#     setsid bash benchmarks/run_quality.sh OUT_DIR [BUDGET_S] > quality.log 2>&1 < /dev/null &
# Writes OUT_DIR/quality/ (each study's JSON, PNG and .log), OUT_DIR/quality_runs/ (data, configs,
# checkpoints, per-job logs: not for committing), OUT_DIR/evidence_run/ (nvidia-smi output;
# run_quality.json: each step's command, exit code, seconds), then OUT_DIR/DONE, or OUT_DIR/FAILED
# naming the failed steps, and prints a short summary last. Then
#     cp OUT_DIR/quality/paper_protocol*.json OUT_DIR/quality/paper_protocol*.png benchmarks/quality/
#     python -m benchmarks.report --force
# Knobs (environment): ITERS, SEEDS, SWEEP_SEEDS, JOBS; LARGE_ITERS, LARGE_SEEDS, LARGE_JOBS;
# SKIP_LARGE=1 (all of the budget to part 1); SKIP_SWEEP=1 (part 1 runs the paper's protocol only);
# PRESET=tiny (part 1 at the CPU test size: a smoke test of this script anywhere).
set -u -o pipefail

if [ $# -lt 1 ] || [ $# -gt 2 ]; then
    echo "error: usage: bash benchmarks/run_quality.sh OUT_DIR [BUDGET_S]" >&2
    exit 2
fi
BUDGET=${2:-1080}
case $BUDGET in
    ''|*[!0-9]*) echo "error: BUDGET_S must be a whole number of seconds, got '$BUDGET'" >&2; exit 2 ;;
esac

# shellcheck source=benchmarks/steps.sh
. "$(dirname "$0")/steps.sh"
start_run run_quality 1 "$1" quality quality_runs
trap finish_run EXIT

B1=$((BUDGET * 10 / 18))
[ "${SKIP_LARGE:-0}" = 1 ] && B1=$BUDGET
B2=$((BUDGET - B1))
SWEEP=(--schedules "constant,wsd,cosine" --switches "50,62.5,75,80" --sweep-switches "62.5,80"
       --sweep-seeds "${SWEEP_SEEDS:-1}")
[ "${SKIP_SWEEP:-0}" = 1 ] && SWEEP=()

# Each step's hard limit: its budget plus time for the probes and results already under way.
step quality paper_protocol $((B1 + 90)) "$PY" -m benchmarks.quality --preset "${PRESET:-default}" --seeds "${SEEDS:-3}" \
    "${SWEEP[@]}" ${ITERS:+--iters "$ITERS"} --jobs "${JOBS:-6}" --time-budget "$B1" \
    --work-dir "$OUT/quality_runs/default" --data-dir "$OUT/quality_runs/data_default" \
    --out "$OUT/quality" --name paper_protocol
if [ "${SKIP_LARGE:-0}" != 1 ]; then
    step quality paper_protocol_large $((B2 + 90)) "$PY" -m benchmarks.quality --preset large \
        --seeds "${LARGE_SEEDS:-2}" ${LARGE_ITERS:+--iters "$LARGE_ITERS"} --jobs "${LARGE_JOBS:-4}" \
        --time-budget "$B2" --work-dir "$OUT/quality_runs/large" --data-dir "$OUT/quality_runs/data_large" \
        --out "$OUT/quality" --name paper_protocol_large
fi

echo
echo "=== summary"
for f in "$OUT"/quality/paper_protocol*.json; do
    [ -e "$f" ] || { echo "no study JSON under $OUT/quality"; break; }
    "$PY" - "$f" <<'PY'
import json, sys

d = json.load(open(sys.argv[1]))
m = d["meta"]
print(f"{sys.argv[1]}: {m['preset_describe']} on {m['device']}, {m['wall_s']:.0f} s")
for p in d["protocols"]:
    g = p["final_train_gap"]
    print(f"  {p['schedule']:>8} switch {p['switch_frac']:.1%}: train gap {g['mean']:+.3f} (n={g['n']}) "
          f"-> {p['verdict_train']['verdict']}; held-out -> {p['verdict_heldout']['verdict']}")
if d.get("leak_probe"):
    print(f"  leak probe dense exactly 0: {d['leak_probe']['aggregate']['dense_exactly_zero']}")
if d.get("retrieval"):
    a = d["retrieval"]["aggregate"]
    print(f"  retrieval accuracy dense {a['dense']['mean']:.3f}, recovered {a['recovered']['mean']:.3f}")
skipped = [j["name"] for j in d["jobs"] if j["status"] != "ok"]
print(f"  jobs not ok: {len(skipped)}")
PY
done
[ -f "$OUT/evidence_run/run_quality.json.tmp" ] && manifest_close
echo "results under $OUT"
