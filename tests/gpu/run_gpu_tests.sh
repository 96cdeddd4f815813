#!/usr/bin/env bash
# Every GPU test (`pytest -m gpu`) in parallel streams (one pytest process each, own temporary
# folder, log and JUnit report), about 7 minutes with Transformer Engine on 2x H100/H200.
# Streams select whole files (a file split across streams uses complementary -k expressions), and
# the run ends with a coverage check: every test that `pytest -m gpu --collect-only` lists must
# appear in some stream's report, so a renamed or new test cannot drop out silently. On one GPU
# every stream shares it, and the tests that need two GPUs skip with their reason.
#
#   bash tests/gpu/run_gpu_tests.sh OUT_DIR [LIMIT_S]
#
# Needs what tests/gpu/run_megatron_lm.sh needs (the Megatron-LM archives and wheels) and, for
# the trainer-checkpoint test, MEGATRON_LM=/path/to/an/unpacked/Megatron-LM (set here to the
# core_v0.19.0 snapshot when unset). Each stream stops after LIMIT_S seconds (default 540);
# LIGHTHOUSE_GPU_STREAMS caps the streams running at once (default 5 per GPU); LIGHTHOUSE_GPU_ONLY
# ("unit bench ...", the names below) runs some streams only: runs of different subsets into one
# OUT_DIR add up, since the coverage check reads every report there. Prints every
# test's outcome; exit 1 if any failed, a stream ran out of time or a test ran in no stream.
# OUT_DIR gets one log and one JUnit XML per stream; the tests' temporary folders (checkpoints,
# Megatron-LM runs) go to a scratch folder, $LIGHTHOUSE_GPU_SCRATCH or a new one under $TMPDIR,
# whose path the script prints.
set -u -o pipefail
if [ $# -lt 1 ]; then
    echo "error: usage: bash tests/gpu/run_gpu_tests.sh OUT_DIR [LIMIT_S]" >&2
    exit 2
fi
OUT=$(realpath -m "$1")
LIMIT=${2:-540}
mkdir -p "$OUT" || exit 2
SCRATCH=${LIGHTHOUSE_GPU_SCRATCH:-$(mktemp -d)}
mkdir -p "$SCRATCH" || exit 2
echo "scratch: $SCRATCH"
cd "$(dirname "$0")/../.." || exit 2
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PYT=(python -m pytest -m gpu -q -rA -p no:cacheprovider)
NGPU=$(python -c "import torch; print(torch.cuda.device_count())") || exit 2
if [ "$NGPU" -lt 1 ]; then
    echo "error: no CUDA GPU visible (torch.cuda.device_count() = 0)" >&2
    exit 2
fi
MAX_STREAMS=${LIGHTHOUSE_GPU_STREAMS:-$((5 * NGPU))}
echo "GPUs: $NGPU; at most $MAX_STREAMS streams at once"

if [ -z "${MEGATRON_LM:-}" ]; then
    for dir in "${MEGATRON_LM_ARCHIVES:-}" .whl/megatron-lm ../shared/megatron-lm; do
        archive=$dir/megatron-lm-core_v0.19.0.tgz
        if [ -n "$dir" ] && [ -f "$archive" ]; then
            mkdir -p "$SCRATCH/mlm" && tar xzf "$archive" -C "$SCRATCH/mlm"
            export MEGATRON_LM=$SCRATCH/mlm/Megatron-LM-core_v0.19.0
            make -s -C "$MEGATRON_LM/megatron/core/datasets" > /dev/null 2>&1
            break
        fi
    done
fi

devices() {  # devices "0,1" -> the same list on this machine's GPUs (modulo NGPU, deduplicated)
    local out="" g
    for g in ${1//,/ }; do
        g=$((g % NGPU))
        case ",$out," in *",$g,"*) ;; *) out=${out:+$out,}$g ;; esac
    done
    echo "$out"
}

stream() {  # stream NAME GPUS PYTEST-ARGS...
    local name=$1 gpus
    gpus=$(devices "$2")
    shift 2
    case " ${LIGHTHOUSE_GPU_ONLY:-$name} " in *" $name "*) ;; *) return ;; esac
    while [ "$(jobs -rp | wc -l)" -ge "$MAX_STREAMS" ]; do wait -n; done
    (
        export CUDA_VISIBLE_DEVICES=$gpus PYTEST_ADDOPTS="--basetemp=$SCRATCH/tmp-$name"
        timeout --kill-after=10 "$LIMIT" "${PYT[@]}" --junitxml="$OUT/$name.xml" "$@" > "$OUT/$name.log" 2>&1
        echo "[$name] exit $? on GPUs $gpus"
    ) &
}

MLM=tests/test_megatron_lm_gpu.py
CKPT=tests/test_checkpoint_gpu.py
stream unit 0 tests/test_ops.py tests/test_compile.py tests/test_reference.py tests/test_backends.py \
    tests/test_megatron_gpu.py tests/test_bench_layer.py tests/test_training_gpu.py
stream bench 1 tests/test_bench_e2e.py tests/test_bench_failure_modes.py tests/test_bench_probes.py \
    tests/test_demo.py
stream cp 0,1 tests/test_parallel_gpu.py
stream mlm-cp19 0,1 $MLM -k "context_parallel and core_v0.19.0"
stream mlm-cp16 1,0 $MLM -k "context_parallel and not core_v0.19.0"
# A Megatron-LM test takes 2-3 minutes alone on an H100, more on a shared GPU: at most two per
# stream, so that each stream ends within LIMIT on one GPU (on one H100 shared with other jobs, the
# stream of 0.16's two tests ran out of 660 s; five tests took 755 s in one pytest run).
stream mlm19 1 $MLM -k "not context_parallel and core_v0.19.0"
stream mlm16-local 0 $MLM -k "two_stages and not context_parallel and not core_v0.19.0 and local"
stream mlm16-te 1 $MLM -k "two_stages and not context_parallel and not core_v0.19.0 and not local"
stream recipes 1 $MLM -k "recipe_variants and (dense or progressive)"
stream recipes-k 0 $MLM -k "recipe_variants and (grow or mean)"
stream production 1 $MLM -k "production_recipe"
stream features 0 tests/test_megatron_lm_features.py
stream ckpt16-local 0 $CKPT -k "core_v0.16.1 and local"
stream ckpt16-te 1 $CKPT -k "core_v0.16.1 and not local"
stream ckpt19-local 0 $CKPT -k "not core_v0.16.1 and local"
stream ckpt19-te 1 $CKPT -k "not core_v0.16.1 and not local"
wait

status=0
for log in "$OUT"/*.log; do
    grep -E "^(PASSED|FAILED|ERROR|SKIPPED)" "$log" || { echo "no outcome in $log"; status=1; }
    grep -qE "^(FAILED|ERROR)" "$log" && status=1
done
# Coverage: every collected GPU test must have an outcome in some stream's report.
"${PYT[@]}" --collect-only tests > "$OUT/collected.txt" 2>&1 || { cat "$OUT/collected.txt"; status=1; }
python - "$OUT" <<'PY' || status=1
import pathlib, sys, xml.etree.ElementTree as ET

out = pathlib.Path(sys.argv[1])
collected = {line.strip() for line in (out / "collected.txt").read_text().splitlines() if "::" in line}
ran = set()
for report in out.glob("*.xml"):
    for case in ET.parse(report).iter("testcase"):
        ran.add(case.get("classname").replace(".", "/") + ".py::" + case.get("name"))
missing = sorted(collected - ran)
print(f"coverage: {len(collected)} GPU tests collected, {len(collected & ran)} ran in a stream")
for test in missing:
    print(f"NOT RUN: {test}")
sys.exit(1 if missing or not collected else 0)
PY
exit $status
