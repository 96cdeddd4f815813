"""Alias of `python -m lighthouse_megatron.megatron_lm.pretrain_gpt` (the launch code moved
to `lighthouse_megatron.megatron_lm`); kept for existing launch scripts."""

from ..megatron_lm.pretrain_gpt import main

if __name__ == "__main__":
    main()
