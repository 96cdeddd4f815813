# Shared by run_megatron_lm.sh and convert_megatron_lm.sh (sourced with $tag set): checks the
# working directory, installs the carried wheels the GPU image lacks, unpacks the tag's
# Megatron-LM snapshot into $run/src and puts it first on PYTHONPATH. Sets root, run, mlm.
root=$(pwd)
[ -f "$root/lighthouse_megatron/__init__.py" ] || { echo "error: run from the repository root" >&2; exit 2; }

archive=""
for dir in "${MEGATRON_LM_ARCHIVES:-}" .whl/megatron-lm ../shared/megatron-lm; do
    if [ -n "$dir" ] && [ -f "$dir/megatron-lm-$tag.tgz" ]; then archive=$dir/megatron-lm-$tag.tgz; break; fi
done
[ -n "$archive" ] || { echo "error: megatron-lm-$tag.tgz not found (set MEGATRON_LM_ARCHIVES)" >&2; exit 2; }

run=${RUN_DIR:-$(mktemp -d)}
mkdir -p "$run"

# Wheels: megatron-core of the tag's version and Megatron-LM's own dependencies. Another
# megatron-core version goes into the run's own folder (first on PYTHONPATH below), never
# over the environment's, so that runs of both tags can share a machine at once.
want=${tag#core_v}; want=${want%.*}  # 0.16 / 0.19
have=$(python -c "import importlib.metadata as m; print(m.version('megatron-core'))" 2>/dev/null || true)
site=""
if [[ "$have" != "$want".* ]] && [ -d ".whl/$tag" ]; then
    site=$run/site
    python -m pip install -q --no-deps --no-index --target "$site" .whl/"$tag"/*.whl
fi
python -c "import pydantic, six, regex, pybind11" 2>/dev/null || \
    python -m pip install -q --no-deps --no-index .whl/common/*.whl
src=$run/src
if [ ! -f "$src/Megatron-LM-$tag/pretrain_gpt.py" ]; then
    mkdir -p "$src" && tar xzf "$archive" -C "$src"
fi
mlm=$src/Megatron-LM-$tag
# MockGPTDataset's index helpers (C++): a source tree builds them itself.
make -s -C "$mlm/megatron/core/datasets" >/dev/null 2>&1 || \
    echo "note: building the dataset helpers failed; Megatron-LM will try at start-up"
export PYTHONPATH=$mlm:$root${site:+:$site}${PYTHONPATH:+:$PYTHONPATH}
export CUDA_DEVICE_MAX_CONNECTIONS=1
