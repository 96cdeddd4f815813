#!/usr/bin/env bash
# On the lent GPU machine (no registry): install the wheels carried in .whl/q once (megatron-core and
# what the trainer imports that the image lacks), then `python -m benchmarks.quality.run "$@"`.
# Fill .whl/q beforehand, here: bash benchmarks/quality/lease.sh --download
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
exec python3 -m benchmarks.quality.run "$@"
