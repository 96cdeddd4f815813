#!/usr/bin/env bash
# Every GPU test (`pytest -m gpu`) on one machine with two GPUs, in parallel streams of their own
# (one pytest process each, own temporary folder and log), about 7 minutes with Transformer
# Engine on 2x H100/H200; the Megatron-LM runs are small and share the GPUs.
#
#   bash tests/gpu/run_gpu_tests.sh OUT_DIR [LIMIT_S]
#
# Needs what tests/gpu/run_megatron_lm.sh needs (the Megatron-LM archives and wheels) and, for
# the trainer-checkpoint test, MEGATRON_LM=/path/to/an/unpacked/Megatron-LM (set here to the
# core_v0.19.0 snapshot when unset). Each stream stops after LIMIT_S seconds (default 540). Prints
# every test's outcome; exit 1 if any failed or a stream ran out of time. OUT_DIR gets one log per
# stream; the tests' temporary folders (checkpoints, Megatron-LM runs) go to a scratch folder,
# $LIGHTHOUSE_GPU_SCRATCH or a new one under $TMPDIR, whose path the script prints.
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

stream() {  # stream NAME GPUS TEST...
    local name=$1 gpus=$2
    shift 2
    (
        export CUDA_VISIBLE_DEVICES=$gpus PYTEST_ADDOPTS="--basetemp=$SCRATCH/tmp-$name"
        timeout --kill-after=10 "$LIMIT" "${PYT[@]}" "$@" > "$OUT/$name.log" 2>&1
        echo "[$name] exit $?"
    ) &
}

M=tests/test_megatron_lm_gpu.py::test_megatron_lm_two_stages
C=tests/test_checkpoint_gpu.py::test_megatron_lm_resumes_converted_checkpoint_dense
stream unit 0 tests/test_ops.py tests/test_reference.py tests/test_backends.py tests/test_megatron_gpu.py \
    tests/test_bench_layer.py tests/test_training_gpu.py
stream bench 1 tests/test_bench_e2e.py tests/test_bench_failure_modes.py tests/test_bench_quality.py \
    tests/test_demo.py
stream cp 0,1 tests/test_parallel_gpu.py
stream cp19 0,1 "${M}_context_parallel[core_v0.19.0-local]" "${M}_context_parallel[core_v0.19.0-te]"
stream cp16 1,0 "${M}_context_parallel[core_v0.16.1-local]" "${M}_context_parallel[core_v0.16.1-te]"
stream mlm19 1 "${M}[core_v0.19.0-local]" "${M}[core_v0.19.0-te]"
stream mlm16 0 "${M}[core_v0.16.1-local]" "${M}[core_v0.16.1-te]"
for tag in core_v0.16.1 core_v0.19.0; do
    for impl in te local; do
        stream "convert-$tag-$impl" "$([ $impl = te ] && echo 1 || echo 0)" \
            "${C}[$tag-$impl-torch_dist]" "${C}[$tag-$impl-torch]"
    done
done
stream strict 1 tests/test_checkpoint_gpu.py::test_te_torch_format_checkpoint_loads_strictly_into_the_te_dense_model
wait

status=0
for log in "$OUT"/*.log; do
    grep -E "^(PASSED|FAILED|ERROR|SKIPPED)" "$log" || { echo "no outcome in $log"; status=1; }
    grep -qE "^(FAILED|ERROR)" "$log" && status=1
done
exit $status
