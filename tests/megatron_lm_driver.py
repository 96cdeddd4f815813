"""Runs a (patched) Megatron-LM `pretrain_gpt.py` as `__main__` on the CPU, up to the model.

    python tests/megatron_lm_driver.py PRETRAIN_GPT_PY ARG...

Megatron-LM's `pretrain()` needs CUDA and NCCL, so it is replaced by a stand-in that does
what the real one does first, with Megatron-LM's own functions: parse and validate the
arguments (with the script's `extra_args_provider`, core 0.16) and build the model through
the script's model provider on one gloo rank. It prints one line,
`RESULT {"attention_impl": ..., "padded_vocab_size": ..., "core_attention": [class name per
layer]}` (core 0.19: of the layer specs its model builder would get).
Used by tests/test_patches.py with the snapshot's folder on PYTHONPATH.
"""

from __future__ import annotations

import json
import os
import runpy
import sys


def _build(model_provider, args) -> list[str]:
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.training.global_vars import set_global_variables

    set_global_variables(args)  # what initialize_megatron does first: args, tokenizer, vocab size
    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
    parallel_state.initialize_model_parallel()
    model = model_provider(pre_process=True, post_process=True)
    return [type(layer.self_attention.core_attention).__name__ for layer in model.decoder.layers]


def _report(args, layers) -> None:
    print("RESULT " + json.dumps({"attention_impl": args.attention_impl,
                                  "lighthouse_topk": args.lighthouse_topk, "spec": args.spec,
                                  "padded_vocab_size": args.padded_vocab_size, "core_attention": layers}))


def pretrain_016(train_valid_test_dataset_provider, model_provider, model_type, forward_step_func,
                 process_non_loss_data_func=None, extra_args_provider=None, args_defaults=None, **kwargs):
    from megatron.training.arguments import parse_args, validate_args

    args = parse_args(extra_args_provider)
    validate_args(args, args_defaults or {})
    _report(args, _build(model_provider, args))


def pretrain_019(cfg_container, train_valid_test_dataset_provider, model_type, forward_step_func,
                 **kwargs):
    from megatron.core.tokenizers.utils.build_tokenizer import build_tokenizer
    from megatron.training.global_vars import get_args

    build_tokenizer(get_args())  # what initialize_megatron does: sets the padded vocabulary
    # Megatron-LM 0.19's GPTModelBuilder calls a callable spec with the model config.
    model_cfg = cfg_container.model
    block = model_cfg.transformer_layer_spec(model_cfg, vp_stage=None)
    _report(get_args(), [s.submodules.self_attention.submodules.core_attention.module.__name__
                         for s in block.layer_specs])


def main() -> None:
    script, argv = sys.argv[1], sys.argv[2:]
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    import megatron.training as training

    sig = training.pretrain.__code__.co_varnames
    training.pretrain = pretrain_016 if "extra_args_provider" in sig else pretrain_019
    sys.argv = [script, *argv]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
