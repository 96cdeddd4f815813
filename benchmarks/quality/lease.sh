#!/usr/bin/env bash
# On the lent GPU machine (no registry): install the wheels carried in .whl/q once (megatron-core and
# what the trainer imports that the image lacks), then `python -m benchmarks.quality.run "$@"`.
# Fill .whl/q beforehand, here: bash benchmarks/quality/lease.sh --download
# `lease.sh wait SECONDS WORK...` polls the schedulers and packs what finished into $OUT (below).
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ "${1:-}" = --download ]; then
    mkdir -p .whl/q
    for pkg in megatron-core==0.19.2 xxhash tqdm tensorboard tensorboard-data-server absl-py markdown \
               werkzeug protobuf grpcio psutil pyyaml; do
        python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
            --platform any -d .whl/q "$pkg"
    done
    exit 0
fi
if ! python3 -c "import megatron.core, xxhash, tensorboard, tqdm" 2>/dev/null && [ ! -d /tmp/site ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/q/*.whl
fi
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
if [ "${1:-}" = wait ]; then
    # wait SECONDS WORK...: poll until every WORK's scheduler has stopped or SECONDS have passed; pack
    # each WORK's results (runs/, plan, logs; no checkpoints) into $OUT/<WORK's name>.tgz every minute
    # and at the end, so a call cut short still returns every run that finished.
    pack() {
        for w in "$@"; do
            files=$(cd "$w" && ls -d runs plan.json plans.jsonl request.json status.json serve.log jobs 2>/dev/null || true)
            if [ -n "${OUT:-}" ] && [ -n "$files" ]; then
                # tar's status 1: a running job's log grew while it was read; the archive is still whole
                (cd "$w" && { tar czf "$OUT/$(basename "$w").tgz.part" --warning=no-file-changed \
                        --exclude=ckpt --exclude=data_cache $files || [ $? = 1 ]; } \
                    && mv "$OUT/$(basename "$w").tgz.part" "$OUT/$(basename "$w").tgz")
            fi
        done
    }
    shift; until=$(( $(date +%s) + $1 )); shift; n=0
    while [ "$(date +%s)" -lt "$until" ]; do
        alive=0
        for w in "$@"; do
            # not `status | grep -q`: grep's early exit breaks status's pipe, and pipefail then hides the match
            case "$(python3 -m benchmarks.quality.run status --work "$w" 2>&1 || true)" in
                "scheduler: running"*) alive=1 ;;
            esac
        done
        [ "$alive" = 0 ] && break
        n=$((n + 1)); [ $((n % 4)) = 0 ] && pack "$@"
        sleep 15
    done
    for w in "$@"; do python3 -m benchmarks.quality.run status --work "$w"; done
    pack "$@"
    exit 0
fi
exec python3 -m benchmarks.quality.run "$@"
