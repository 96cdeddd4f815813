#!/usr/bin/env bash
# The recovery checkpoint tool against Megatron-LM itself, on the GPU, at a real tag:
#   1. stage 1: Megatron-LM's pretrain() with Lighthouse (this package's entry point) saves a
#      checkpoint in FORMAT at iteration 10 (--exit-interval);
#   2. `lighthouse-megatron inspect` and `convert` (optimizer state kept) turn it into a dense
#      checkpoint; the converter loads it under the dense spec and runs a forward pass;
#   3. stage 2: Megatron-LM's OWN pretrain_gpt.py (no plugin, no --attention-impl) resumes the
#      converted checkpoint with --use-checkpoint-args and trains iterations 11-20;
# then asserts that stage 2 loaded iteration 10 of the converted checkpoint without the
# torch format's silent strict=False retry ("load_return:"), and that its losses are finite.
#
#   bash tests/gpu/convert_megatron_lm.sh TAG IMPL FORMAT
#     TAG     core_v0.16.1 | core_v0.19.0
#     IMPL    te (Transformer Engine specs, TE installed) | local (--transformer-impl local)
#     FORMAT  torch_dist | torch
#
# Needs what tests/gpu/run_megatron_lm.sh needs (same variables, same .whl/ folder): the
# Megatron-LM snapshot megatron-lm-<TAG>.tgz in $MEGATRON_LM_ARCHIVES (default: .whl/megatron-lm,
# then ../shared/megatron-lm), and on an image without a registry the wheels in .whl/:
#   mkdir -p .whl/megatron-lm && cp ../shared/megatron-lm/*.tgz .whl/megatron-lm/
#   W="pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp
#      --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64"
#   $W -d .whl/common pydantic pydantic_core annotated-types typing-inspection six regex pybind11
#   $W -d .whl/core_v0.16.1 megatron-core==0.16.1
#   $W -d .whl/core_v0.19.0 'megatron-core==0.19.*'
# Logs and checkpoints go to $RUN_DIR (default: a new temporary folder); the last line printed
# is the verdict ("OK: ..." or "FAIL: ...").
set -euo pipefail
usage="usage: convert_megatron_lm.sh TAG te|local torch_dist|torch"
tag=${1:?$usage}
impl=${2:?$usage}
format=${3:?$usage}
case $tag in core_v0.16.1|core_v0.19.0) ;; *) echo "error: TAG must be core_v0.16.1 or core_v0.19.0, got $tag" >&2; exit 2;; esac
case $impl in te) transformer_impl=transformer_engine;; local) transformer_impl=local;; *)
    echo "error: IMPL must be te or local, got $impl" >&2; exit 2;; esac
case $format in torch_dist|torch) ;; *) echo "error: FORMAT must be torch_dist or torch, got $format" >&2; exit 2;; esac
. "$(dirname "$0")/megatron_lm_setup.sh"


# A tiny Llama-shaped GPT (RoPE, RMSNorm, SwiGLU, GQA, bf16) on mock data; at 4096 tokens
# Lighthouse gathers S = 4096/16 + 2*4*128 = 1280 entries. Layer 3 stays dense.
seq=4096
args=(
    --num-layers 4 --hidden-size 256 --ffn-hidden-size 512 --num-attention-heads 4
    --group-query-attention --num-query-groups 2 --seq-length $seq --max-position-embeddings $seq
    --position-embedding-type rope --normalization RMSNorm --swiglu --untie-embeddings-and-output-weights
    --disable-bias-linear --attention-dropout 0 --hidden-dropout 0 --bf16
    --micro-batch-size 1 --global-batch-size 4 --train-iters 20 --lr 3e-3 --min-lr 3e-4
    --lr-decay-style cosine --lr-warmup-iters 2 --weight-decay 0.01 --clip-grad 1.0 --seed 1234
    --mock-data --tokenizer-type NullTokenizer --vocab-size 256 --split 100,0,0
    --eval-iters 0 --eval-interval 1000 --log-interval 1 --save-interval 10 --ckpt-format "$format"
    --transformer-impl $transformer_impl --distributed-backend nccl
    --no-gradient-accumulation-fusion  # needs apex's fused_weight_gradient_mlp_cuda
)
if [ "$impl" = local ]; then
    args+=(--no-persist-layer-norm --no-masked-softmax-fusion
           --no-rope-fusion)
fi
lighthouse=(--attention-impl lighthouse --lighthouse-levels 3 --lighthouse-pooling-factor 4
            --lighthouse-topk 128 --lighthouse-tile-topk 32 --lighthouse-dense-layers -1)

stage1=$run/stage1
dense=$run/dense
echo "== $tag, $impl, $format: logs and checkpoints in $run"
torchrun --standalone --nproc-per-node 1 -m lighthouse_megatron.megatron_lm.pretrain_gpt "${args[@]}" "${lighthouse[@]}" \
    --save "$stage1" --exit-interval 10 > "$run/stage1.log" 2>&1 \
    || { tail -40 "$run/stage1.log"; echo "FAIL: stage 1"; exit 1; }
python -m lighthouse_megatron.cli inspect "$stage1" | tee "$run/inspect.log"
python -m lighthouse_megatron.cli convert --input "$stage1" --output "$dense" --force | tee "$run/convert.log" \
    || { echo "FAIL: convert"; exit 1; }
python -m lighthouse_megatron.cli inspect "$dense" | tee -a "$run/inspect.log"
# Megatron-LM's own script, no plugin anywhere on the command line.
torchrun --standalone --nproc-per-node 1 "$mlm/pretrain_gpt.py" "${args[@]}" --use-checkpoint-args \
    --load "$dense" --save "$dense" > "$run/stage2.log" 2>&1 \
    || { tail -40 "$run/stage2.log"; echo "FAIL: stage 2 (Megatron-LM's pretrain_gpt.py on the converted checkpoint)"; exit 1; }

python - "$run/stage2.log" "$dense" <<'EOF'
import math, re, sys
log, ckpt = open(sys.argv[1]).read(), sys.argv[2]
problems = []
if not re.search(rf"loading (distributed )?checkpoint from {re.escape(ckpt)} at iteration 10", log):
    problems.append("stage 2 did not load iteration 10 of the converted checkpoint")
if "load_return:" in log:
    problems.append("Megatron-LM fell back to strict=False: " + log.split("load_return:")[1].splitlines()[0][:300])
losses = {int(i): float(v) for i, v in re.findall(r"iteration\s+(\d+)/\s*\d+.*?lm loss: ([0-9.eE+-]+|nan|inf)", log)}
if sorted(losses) != list(range(11, 21)):
    problems.append(f"stage 2 logged iterations {sorted(losses)}, expected 11-20")
if not all(math.isfinite(v) for v in losses.values()):
    problems.append(f"non-finite losses {losses}")
print(("FAIL: " + "; ".join(problems)) if problems else
      f"OK: Megatron-LM resumed the converted checkpoint dense, losses {losses.get(11):.3f} -> {losses.get(20):.3f}")
sys.exit(1 if problems else 0)
EOF
