"""Megatron-LM GPT pretraining with Lighthouse attention.

    PYTHONPATH=/path/to/Megatron-LM torchrun ... -m lighthouse_megatron.megatron_lm.pretrain_gpt \\
        <Megatron-LM pretrain_gpt.py arguments> --attention-impl lighthouse --lighthouse-topk 4096 ...

Runs Megatron-LM's own `pretrain()` with its `pretrain_gpt.py` datasets, forward step
and loss; only the arguments (the Lighthouse flags) and the layer spec differ. Both
Megatron-LM generations work (core_v0_16.py, core_v0_19.py). The Lighthouse arguments
are validated right after parsing, before any process group or GPU memory exists; bad
ones end the program with one `error:` line and exit code 2, as argparse does.
"""

from __future__ import annotations

import inspect
import sys

from .launch import clean_exit, refuse_yaml_cfg, require_megatron_lm, shut_down_process_group


def main(argv: list[str] | None = None) -> None:
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    try:
        training, mlm = require_megatron_lm()
    except ImportError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None

    with clean_exit():
        # Before Megatron-LM's in-process-restart wrapper, which parses (and loads) it already.
        refuse_yaml_cfg(sys.argv[1:])
    mlm.train_valid_test_datasets_provider.is_distributed = True
    pretrain, store = training.pretrain, None
    if hasattr(training, "inprocess_restart"):
        pretrain, store = training.inprocess_restart.maybe_wrap_for_inprocess_restart(pretrain)
    if "extra_args_provider" in inspect.signature(training.pretrain).parameters:
        from . import core_v0_16 as generation
    else:
        from . import core_v0_19 as generation
    try:
        generation.run(training, mlm, pretrain, store)
    except SystemExit as e:
        # --exit-interval and --exit-duration-in-mins end Megatron-LM's pretrain() in sys.exit(0), on
        # every rank together; after a failure another rank may never reach the shutdown's barrier.
        if e.code in (0, None):
            shut_down_process_group()
        raise
    shut_down_process_group()


if __name__ == "__main__":
    main()
