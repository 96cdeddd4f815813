#!/usr/bin/env bash
# Megatron-LM's own pretrain() with Lighthouse attention, on the GPU, at a real tag:
# stage 1 Lighthouse until --exit-interval (checkpoint saved), stage 2 dense from that
# checkpoint with the same schedule; then tests/gpu/check_megatron_lm_logs.py asserts that
# both stages ran, stage 2 loaded stage 1's checkpoint, the loss is finite and falling, and
# stage 1's validation logged Megatron-LM's "lm loss" and the dense "lm loss dense"
# (--lighthouse-eval-attention both, the default), stage 2's only "lm loss".
#
#   bash tests/gpu/run_megatron_lm.sh TAG IMPL [CP]
#     TAG   core_v0.16.1 | core_v0.19.0
#     IMPL  te (Transformer Engine specs, TE installed) | local (--transformer-impl local)
#     CP    context-parallel size = number of GPUs used (default 1)
#
# Needs, beside the repository (run from its root):
#   - the Megatron-LM snapshot archives megatron-lm-<TAG>.tgz in $MEGATRON_LM_ARCHIVES
#     (default: .whl/megatron-lm, then ../shared/megatron-lm);
#   - wheels the GPU image lacks (Python 3.12, no registry there), downloaded HERE on a
#     machine with a registry, into the git-ignored .whl/ (carry it):
#       mkdir -p .whl/megatron-lm && cp ../shared/megatron-lm/*.tgz .whl/megatron-lm/
#       W="pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp
#          --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64"
#       $W -d .whl/common pydantic pydantic_core annotated-types typing-inspection six regex pybind11
#       $W -d .whl/core_v0.16.1 megatron-core==0.16.1
#       $W -d .whl/core_v0.19.0 'megatron-core==0.19.*'
#     They are installed with `pip install --no-deps --no-index` (skipped when present).
# Logs and checkpoints go to $RUN_DIR (default: a new temporary folder); the last line
# printed is the checker's verdict.
set -euo pipefail
tag=${1:?usage: run_megatron_lm.sh TAG te|local [CP]}
impl=${2:?usage: run_megatron_lm.sh TAG te|local [CP]}
cp_size=${3:-1}
case $tag in core_v0.16.1|core_v0.19.0) ;; *) echo "error: TAG must be core_v0.16.1 or core_v0.19.0, got $tag" >&2; exit 2;; esac
case $impl in te) transformer_impl=transformer_engine;; local) transformer_impl=local;; *)
    echo "error: IMPL must be te or local, got $impl" >&2; exit 2;; esac
. "$(dirname "$0")/megatron_lm_setup.sh"

# A tiny GPT (6 layers, hidden 256, 4 heads in 2 groups, RoPE, RMSNorm, SwiGLU, bf16) on mock
# data; 16K tokens per sample so that Lighthouse really gathers (S = 16384/16 + 2*4*512 =
# 5120 < 16384). Layer 5 stays dense.
seq=16384
args=(
    --num-layers 6 --hidden-size 256 --ffn-hidden-size 512 --num-attention-heads 4
    --group-query-attention --num-query-groups 2 --seq-length $seq --max-position-embeddings $seq
    --position-embedding-type rope --normalization RMSNorm --swiglu --untie-embeddings-and-output-weights
    --disable-bias-linear --attention-dropout 0 --hidden-dropout 0 --bf16
    --micro-batch-size 1 --global-batch-size 4 --train-iters 40 --lr 3e-3 --min-lr 3e-4
    --lr-decay-style cosine --lr-warmup-iters 4 --weight-decay 0.01 --clip-grad 1.0 --seed 1234
    --mock-data --tokenizer-type NullTokenizer --vocab-size 256 --split 98,2,0
    --eval-iters 2 --eval-interval 10 --log-interval 1 --save-interval 20 --ckpt-format torch_dist
    --transformer-impl $transformer_impl --context-parallel-size "$cp_size"
    --distributed-backend nccl
    --no-gradient-accumulation-fusion  # needs apex's fused_weight_gradient_mlp_cuda
)
if [ "$impl" = local ]; then
    # Megatron-LM's fused kernels need TE or apex; without them its own code stops.
    args+=(--no-persist-layer-norm --no-masked-softmax-fusion
           --no-rope-fusion)
fi
lighthouse=(--attention-impl lighthouse --lighthouse-levels 3 --lighthouse-pooling-factor 4
            --lighthouse-topk 512 --lighthouse-tile-topk 32 --lighthouse-dense-layers -1)
launch=(torchrun --standalone --nproc-per-node "$cp_size" -m lighthouse_megatron.megatron_lm.pretrain_gpt)

ckpt=$run/ckpt
echo "== $tag, $impl, CP=$cp_size: logs and checkpoints in $run"
# STAGE1_EXTRA: more stage-1 flags (the recipe variants: --lighthouse-dense-every M, ...).
read -r -a extra <<< "${STAGE1_EXTRA:-}"
"${launch[@]}" "${args[@]}" "${lighthouse[@]}" "${extra[@]}" --save "$ckpt" --exit-interval 20 \
    > "$run/stage1.log" 2>&1 || { tail -40 "$run/stage1.log"; echo "stage 1 failed"; exit 1; }
"${launch[@]}" "${args[@]}" --attention-impl dense --load "$ckpt" --save "$ckpt" \
    > "$run/stage2.log" 2>&1 || { tail -40 "$run/stage2.log"; echo "stage 2 failed"; exit 1; }
python "$root/tests/gpu/check_megatron_lm_logs.py" "$run/stage1.log" "$run/stage2.log" \
    --switch-iter 20 --train-iters 40 --expect-dense-eval
