"""The parallel layout check (TP x CP x PP x DP against the processes, and what it implies for
the batch, the heads, the layers and the sequence), in one place.

The trainer's argument validation, `lighthouse-megatron slurm render` and the Slurm launcher
(`python -m lighthouse_megatron.settings.layout`, before it starts torchrun) call it, so a layout is
refused with the same words wherever it is given. Imports no torch.

    python -m lighthouse_megatron.settings.layout --nodes 4 --nproc-per-node 8 [--data-parallel-size auto] \
        -- TRAINING FLAGS...

reads the parallel sizes, batch, heads, layers, sequence length and Lighthouse settings from
the training flags (the trainer's / Megatron-LM's names; the others are ignored), prints DP and
exits 0, or prints `error: ...` and exits 2.
"""

from __future__ import annotations

import argparse
import sys

from ..config import LighthouseConfig, nearest_multiples


def check_layout(world: int, tp: int, cp: int, pp: int = 1, dp: int | str | None = "auto", *,
                 job: str | None = None) -> int:
    """DP for `world` processes split TP x CP x PP x DP; ValueError with the numbers otherwise.

    `dp` "auto" or None derives it; a number is checked. `job` describes the processes in the
    message (e.g. "2 nodes x 8 GPUs = 16 GPUs"; default "{world} processes")."""
    for name, value in dict(tensor_model_parallel_size=tp, context_parallel_size=cp,
                            pipeline_model_parallel_size=pp).items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    mp = tp * cp * pp
    job = job or f"{world} processes"
    if dp in ("auto", None):
        if world % mp:
            raise ValueError(f"TP x CP x PP = {tp} x {cp} x {pp} = {mp} does not divide the job's {job}")
        return world // mp
    try:
        dp = int(dp)
    except ValueError:
        raise ValueError(f"data_parallel_size must be auto or an integer, got {dp!r}") from None
    if dp < 1 or mp * dp != world:
        hint = f"; DP = {world // mp} fits" if world % mp == 0 else ""
        raise ValueError(f"TP x CP x PP x DP = {tp} x {cp} x {pp} x {dp} = {mp * dp}, but the job has "
                         f"{job}{hint}")
    return dp


def check_sizes(*, dp: int, tp: int = 1, cp: int = 1, pp: int = 1, micro_batch_size: int = 1,
                global_batch_size: int | None = None, num_attention_heads: int | None = None,
                num_query_groups: int | None = None, num_layers: int | None = None,
                seq_length: int | None = None, lighthouse: LighthouseConfig | None = None) -> None:
    """What the layout implies for the other sizes (ValueError naming the setting)."""
    if global_batch_size is not None and global_batch_size % (micro_batch_size * dp):
        near = nearest_multiples(global_batch_size, micro_batch_size * dp)
        raise ValueError(f"global_batch_size {global_batch_size} must be a multiple of micro_batch_size x "
                         f"DP = {micro_batch_size} x {dp} = {micro_batch_size * dp}; nearest valid: {near}")
    if num_attention_heads is not None:
        groups = num_query_groups or num_attention_heads
        if num_attention_heads % groups:
            raise ValueError(f"num_attention_heads {num_attention_heads} must be a multiple of "
                             f"num_query_groups {groups}")
        if groups % tp:
            raise ValueError(f"num_query_groups {groups} (and num_attention_heads {num_attention_heads}) "
                             f"must be multiples of TP = {tp}")
    if num_layers is not None and num_layers % pp:
        raise ValueError(f"num_layers {num_layers} must be a multiple of PP = {pp}")
    if seq_length is not None and cp > 1 and seq_length % (2 * cp):
        near = nearest_multiples(seq_length, 2 * cp)
        raise ValueError(f"seq_length {seq_length} must be a multiple of 2 x CP = {2 * cp} (Megatron cuts a "
                         f"sequence into 2 x CP chunks); nearest valid: {near}")
    if lighthouse is not None:
        if seq_length is not None:
            lighthouse.validate(seq_length, cp)
        if num_layers is not None:
            lighthouse.resolve_dense_layers(num_layers)


def _flags() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    for flag in ("--tensor-model-parallel-size", "--context-parallel-size", "--pipeline-model-parallel-size"):
        p.add_argument(flag, type=int, default=1)
    for flag in ("--micro-batch-size",):
        p.add_argument(flag, type=int, default=1)
    for flag in ("--global-batch-size", "--num-attention-heads", "--num-query-groups", "--num-layers",
                 "--seq-length", "--lighthouse-levels", "--lighthouse-pooling-factor", "--lighthouse-topk",
                 "--lighthouse-tile-topk"):
        p.add_argument(flag, type=int)
    p.add_argument("--attention-impl", default="dense")
    p.add_argument("--lighthouse-dense-layers", type=int, nargs="*", default=[])
    return p


def check_flags(argv: list[str], world: int, dp: int | str | None = "auto", job: str | None = None) -> int:
    """`check_layout` and `check_sizes` for training flags (unknown flags ignored); DP."""
    a, _ = _flags().parse_known_args(argv)
    tp, cp, pp = a.tensor_model_parallel_size, a.context_parallel_size, a.pipeline_model_parallel_size
    dp = check_layout(world, tp, cp, pp, dp, job=job)
    lighthouse = None
    if a.attention_impl == "lighthouse":
        defaults = LighthouseConfig()
        lighthouse = LighthouseConfig(
            levels=a.lighthouse_levels or defaults.levels,
            pooling_factor=a.lighthouse_pooling_factor or defaults.pooling_factor,
            topk=a.lighthouse_topk or defaults.topk, tile_topk=a.lighthouse_tile_topk or defaults.tile_topk,
            dense_layers=a.lighthouse_dense_layers)
    check_sizes(dp=dp, tp=tp, cp=cp, pp=pp, micro_batch_size=a.micro_batch_size,
                global_batch_size=a.global_batch_size, num_attention_heads=a.num_attention_heads,
                num_query_groups=a.num_query_groups, num_layers=a.num_layers, seq_length=a.seq_length,
                lighthouse=lighthouse)
    return dp


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lighthouse_megatron.settings.layout", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--nproc-per-node", type=int, required=True)
    p.add_argument("--unit", default="processes", help="what a process is, in the message (GPUs)")
    p.add_argument("--data-parallel-size", default="auto")
    p.add_argument("flags", nargs=argparse.REMAINDER, help="-- then the training flags")
    args = p.parse_args(argv)
    flags = args.flags[1:] if args.flags[:1] == ["--"] else args.flags
    n, per = args.nodes, args.nproc_per_node
    job = f"{n} node{'s' if n > 1 else ''} x {per} {args.unit} = {n * per} {args.unit}"
    try:
        print(check_flags(flags, n * per, args.data_parallel_size, job))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
