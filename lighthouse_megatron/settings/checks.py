"""The trainer's checks of its settings: types and ranges from the fields (`fields.check_value`),
then the rules between settings, group by group, filling the derived settings (Megatron-LM's
names) in place. Errors are ValueErrors naming the flag, the value and what would be valid;
nothing here needs a GPU or a process group (the data checks open the datasets' indices).
"""

from __future__ import annotations

import argparse
import math
import os

from ..config import backend_problem
from ..data import byte_vocab_size, null_tokenizer, open_indexed_dataset
from .fields import as_number, check_value
from .layout import check_layout
from .lighthouse import lighthouse_config_from_args, validate_lighthouse_args
from .tree import train_specs

# With --valid-data-path: the training data's split (all of it), the held-out data's split.
ALL_TRAIN, ALL_VALID = "1,0,0", "0,1,0"


def validate_args(args: argparse.Namespace, world_size: int | None = None) -> None:
    """Check every setting and fill the derived ones (Megatron-LM's names) in place."""
    if args.vocab_size is None:  # bytes and end-of-document, as prepare-data writes them
        args.vocab_size = byte_vocab_size()
    for spec in train_specs().values():
        check_value(args, spec)
    if args.min_lr > args.lr:
        raise ValueError(f"--min-lr {args.min_lr} is above --lr {args.lr}")
    check_model_shape(args)
    check_parallel_layout(args, world_size)
    check_schedule(args)
    check_data(args)
    check_device(args)
    check_checkpoints(args)
    # Lighthouse (its own flags, --lighthouse-config, and the model and parallel sizes).
    lighthouse = validate_lighthouse_args(args)
    problem = lighthouse and backend_problem(lighthouse.backend, args.device)
    if problem:
        raise ValueError(f"--lighthouse-backend {lighthouse.backend} with --device {args.device}: {problem}")


def check_model_shape(args: argparse.Namespace) -> None:
    """Heads, groups, widths and lengths; fills their derived defaults."""
    heads = args.num_attention_heads
    if args.num_query_groups is None:
        args.num_query_groups = heads
    if heads % args.num_query_groups:
        raise ValueError(f"--num-attention-heads {heads} is not a multiple of --num-query-groups "
                         f"{args.num_query_groups}")
    if args.kv_channels is None:
        if args.hidden_size % heads:
            raise ValueError(f"--hidden-size {args.hidden_size} is not divisible by --num-attention-heads "
                             f"{heads}; set --kv-channels or use a multiple of {heads}")
        args.kv_channels = args.hidden_size // heads
    if args.ffn_hidden_size is None:
        # Megatron-LM's default; with SwiGLU it keeps the MLP's parameter count.
        args.ffn_hidden_size = 4 * args.hidden_size
        if args.swiglu:
            args.ffn_hidden_size = int((4 * args.hidden_size * 2 / 3) / 64) * 64 or 64
    if args.position_embedding_type == "rope" and args.kv_channels % 2:
        raise ValueError(f"--kv-channels {args.kv_channels} (the head dimension) must be even with "
                         "--position-embedding-type rope, which rotates pairs of channels; change "
                         "--hidden-size / --num-attention-heads or --kv-channels")
    if args.max_position_embeddings is None:
        args.max_position_embeddings = args.seq_length
    if args.seq_length > args.max_position_embeddings:
        raise ValueError(f"--seq-length {args.seq_length} exceeds --max-position-embeddings "
                         f"{args.max_position_embeddings}")


def check_parallel_layout(args: argparse.Namespace, world_size: int | None = None) -> None:
    """TP x CP x DP against the processes (WORLD_SIZE, or `world_size`), and what it implies
    for the heads, the sequence and the batch."""
    args.padded_vocab_size = padded_vocab_size(args)
    world = int(os.environ.get("WORLD_SIZE", "1")) if world_size is None else world_size
    tp, cp = args.tensor_model_parallel_size, args.context_parallel_size
    dp = check_layout(world, tp, cp, 1)  # the one layout check (slurm render and the launcher use it too)
    args.world_size, args.data_parallel_size, args.pipeline_model_parallel_size = world, dp, 1
    heads = args.num_attention_heads
    if heads % tp:
        raise ValueError(f"--num-attention-heads {heads} is not divisible by "
                         f"--tensor-model-parallel-size {tp}")
    if args.num_query_groups % tp and tp % args.num_query_groups:
        raise ValueError(f"--num-query-groups {args.num_query_groups} and --tensor-model-parallel-size {tp}: "
                         "one must divide the other")
    if cp > 1 and args.seq_length % (2 * cp):
        raise ValueError(f"--seq-length {args.seq_length} must be divisible by 2 x --context-parallel-size "
                         f"= {2 * cp} (each rank holds two chunks)")
    if args.global_batch_size is None:
        args.global_batch_size = args.micro_batch_size * dp
    if args.global_batch_size % (args.micro_batch_size * dp):
        raise ValueError(f"--global-batch-size {args.global_batch_size} is not divisible by "
                         f"--micro-batch-size {args.micro_batch_size} x data-parallel size {dp}")


def check_schedule(args: argparse.Namespace) -> None:
    """The learning-rate schedule megatron-core's scheduler will accept."""
    if args.lr_decay_iters is None:
        args.lr_decay_iters = args.train_iters
    if args.lr_warmup_init > args.lr:  # megatron-core's scheduler asserts it
        raise ValueError(f"--lr-warmup-init {args.lr_warmup_init} is above --lr {args.lr}")
    if args.lr_warmup_iters >= args.lr_decay_iters:  # megatron-core's scheduler asserts it
        raise ValueError(f"--lr-warmup-iters {args.lr_warmup_iters} must be below --lr-decay-iters "
                         f"{args.lr_decay_iters}")
    if args.lr_decay_style == "WSD":
        room = args.lr_decay_iters - args.lr_warmup_iters
        if args.lr_wsd_decay_iters is None or args.lr_wsd_decay_iters > room:
            raise ValueError(f"--lr-decay-style WSD needs --lr-wsd-decay-iters in 1..{room} (the anneal "
                             f"ends at --lr-decay-iters {args.lr_decay_iters}, after --lr-warmup-iters "
                             f"{args.lr_warmup_iters}), got {args.lr_wsd_decay_iters}")
    args.override_opt_param_scheduler = bool(args.override_opt_param_scheduler)


def check_data(args: argparse.Namespace) -> None:
    """Exactly one data source, datasets that exist and give every used split documents."""
    if bool(args.mock_data) == bool(args.data_path):
        raise ValueError("give exactly one of --data-path PREFIX and --mock-data")
    if args.data_path:
        _check_data_path(args.data_path)
    if args.valid_data_path:
        if not args.data_path:
            raise ValueError("--valid-data-path needs --data-path (the training data)")
        _check_data_path(args.valid_data_path, "--valid-data-path")
        if args.eval_iters == 0:
            raise ValueError("--valid-data-path needs --eval-iters >= 1 (it is only read to evaluate)")
        args.split = ALL_TRAIN
    weights = args.split.split(",") if isinstance(args.split, str) else []
    try:
        parsed = [float(w) for w in weights]
    except ValueError:
        parsed = []
    if len(parsed) != 3 or min(parsed) < 0 or sum(parsed) <= 0:
        raise ValueError(f"--split must be three non-negative weights 'train,valid,test', got {args.split!r}")
    if parsed[1] == 0 and args.eval_iters > 0 and not args.valid_data_path:
        raise ValueError(f"--split {args.split} leaves no validation data; give it a valid weight or "
                         "set --eval-iters 0")
    if args.data_path:
        _check_splits(args, args.data_path, args.split, "--data-path")
    if args.valid_data_path:
        _check_splits(args, args.valid_data_path, ALL_VALID, "--valid-data-path")


def check_device(args: argparse.Namespace) -> None:
    """The device that exists and the precision it runs."""
    import torch

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available; use --device cpu")
    if args.bf16 is None:
        args.bf16 = args.device == "cuda"
    if args.bf16 and args.device != "cuda":
        raise ValueError("--bf16 needs --device cuda (CPU training runs in fp32); drop it or pass --no-bf16")
    args.fp16 = False


def check_checkpoints(args: argparse.Namespace) -> None:
    """Saving, loading, the NaN check's skips and W&B."""
    if args.save_interval is not None and not args.save:
        raise ValueError("--save-interval needs --save DIR")
    if args.save_retain is not None:  # an integer (its type is checked with the others)
        if args.save_retain < 1:
            raise ValueError(f"--save-retain must be >= 1 (the number of checkpoints to keep), got "
                             f"{args.save_retain}; leave it out to keep every checkpoint")
        if not args.save:
            raise ValueError("--save-retain needs --save DIR")
    if args.load and os.path.exists(args.load) and not os.path.isdir(args.load):
        raise ValueError(f"--load {args.load} is not a directory")
    if args.max_skipped_iters and not args.check_for_nan_in_loss_and_grad:
        raise ValueError(f"--max-skipped-iters {args.max_skipped_iters} needs "
                         "--check-for-nan-in-loss-and-grad (it counts the iterations that check skips)")
    if args.wandb_project:
        import importlib.util

        if importlib.util.find_spec("wandb") is None:
            raise ValueError("--wandb-project needs the wandb package, which is not installed: "
                             "pip install 'lighthouse-megatron[wandb]'")
    elif args.wandb_exp_name or args.wandb_save_dir:
        raise ValueError("--wandb-exp-name and --wandb-save-dir need --wandb-project")


def layer_parameters(args: argparse.Namespace) -> int:
    """One transformer layer's weight matrices (query, key and value, the output projection, the MLP;
    norms and biases left out), its shape completed by `check_model_shape`."""
    h, kv, heads = args.hidden_size, args.kv_channels, args.num_attention_heads
    return h * (heads + 2 * args.num_query_groups) * kv + heads * kv * h \
        + h * args.ffn_hidden_size * (3 if args.swiglu else 2)


def cpu_memory_estimate(args: argparse.Namespace, lighthouse=None) -> tuple[int, str]:
    """(bytes, what dominates): a lower bound of what the processes of a CPU run need together.
    On the CPU every attention runs SDPA's math kernel, which keeps an fp32 [micro-batch, heads,
    query length, key length] probability matrix per layer for the backward pass (Lighthouse
    layers: over the gathered length S); the dense evaluation of a Lighthouse run makes one
    such matrix at a time over the whole sequence. Plus fp32 weights, gradients and Adam's
    two moments. Measured peaks are about twice this (transient copies, the causal mask,
    activations)."""
    tp, cp = args.tensor_model_parallel_size, args.context_parallel_size
    heads, seq, layers, mbs = args.num_attention_heads // tp, args.seq_length, args.num_layers, \
        args.micro_batch_size
    sparse = lighthouse is not None and lighthouse.levels > 1
    dense_layers = layers
    if sparse:
        switches = args.lighthouse_until_iter is not None and args.lighthouse_until_iter < args.train_iters
        dense_layers = layers if switches else len(lighthouse.resolve_dense_layers(layers))
    gathered = lighthouse.gathered_length(seq) if sparse else seq
    # Under CP a rank attends with its seq/CP queries over the whole sequence.
    matrix = 4 * mbs * heads * (seq // cp) * seq
    parts = {f"{dense_layers} dense layers x {heads} heads x {seq // cp} x {seq}": dense_layers * matrix,
             f"{layers - dense_layers} Lighthouse layers x {heads} heads x {gathered // cp} x {gathered}":
             4 * mbs * heads * (layers - dense_layers) * (gathered // cp) * gathered}
    training = sum(parts.values())
    evaluation = matrix if sparse and args.eval_iters else 0
    tables = 2 if args.untie_embeddings_and_output_weights else 1
    embeddings = args.padded_vocab_size * args.hidden_size * tables
    weights = 16 * (layers * layer_parameters(args) + embeddings) // tp
    if weights >= max(training, evaluation):
        what = "fp32 weights, gradients and Adam moments"
    elif evaluation > training:
        what = (f"the dense evaluation's attention probabilities, {heads} heads x {seq // cp} x {seq} fp32 "
                "per sample (--eval-iters 0 skips it)")
    else:
        what = ("the attention probabilities SDPA keeps for the backward pass: "
                + " + ".join(k for k, v in parts.items() if v) + " fp32 per sample")
    return args.world_size * (max(training, evaluation) + weights), what


def check_cpu_memory(args: argparse.Namespace) -> None:
    """Refuse a CPU run (validated `args`) that cannot fit this machine's memory, with the
    estimate: a check of the machine, not of the settings (the trainer's start-up runs it)."""
    import psutil

    if args.device != "cpu":
        return
    lighthouse = lighthouse_config_from_args(args) if args.attention_impl == "lighthouse" else None
    need, what = cpu_memory_estimate(args, lighthouse)
    total = psutil.virtual_memory().total
    if need > total:
        raise ValueError(f"--seq-length {args.seq_length} on the CPU needs at least {_bytes(need)} ({what}), "
                         f"more than this machine's {_bytes(total)}; use a shorter --seq-length, a smaller "
                         "model or batch, or a GPU (--device cuda)")


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _check_data_path(data_path: list[str], flag: str = "--data-path") -> None:
    prefixes = data_path
    if len(data_path) > 1:
        if len(data_path) % 2:
            raise ValueError(f"{flag} takes one PREFIX or weight/PREFIX pairs, got {data_path}")
        weights = [as_number(str(w)) for w in data_path[0::2]]
        if None in weights:
            raise ValueError(f"{flag} pairs must be 'weight PREFIX', got {data_path}")
        # megatron-core's BlendedDataset asserts this, naming neither the flag nor the value.
        if not all(math.isfinite(w) and w > 0 for w in weights):
            raise ValueError(f"{flag} weights must be positive numbers, got "
                             f"{' '.join(map(str, data_path[0::2]))}")
        prefixes = data_path[1::2]
    for prefix in prefixes:
        missing = [prefix + ext for ext in (".bin", ".idx") if not os.path.isfile(prefix + ext)]
        if missing:
            raise ValueError(f"{flag} {prefix}: missing {', '.join(missing)} (a Megatron indexed "
                             "dataset is PREFIX.bin + PREFIX.idx, e.g. from "
                             "`lighthouse-megatron prepare-data`)")


def _check_splits(args: argparse.Namespace, data_path: list[str], split: str, flag: str) -> None:
    """Every split with a weight must hold documents: megatron-core builds each one (with
    --eval-iters 0 too) and its GPTDataset loops forever counting epochs over an empty one."""
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix,
        parse_and_normalize_split,
    )
    matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
    prefixes = data_path if len(data_path) == 1 else data_path[1::2]
    vocab = null_tokenizer(args.vocab_size).vocab_size
    for prefix in prefixes:
        ds = open_indexed_dataset(prefix, flag)
        n = ds.sequence_lengths.shape[0]
        # Documents end with the end-of-document id, the largest id of byte-level data.
        top = max(int(ds[i].max()) for i in {0, n - 1}) if n else 0
        if top >= vocab:
            raise ValueError(
                f"{flag} {prefix} holds token id {top}, outside --vocab-size {args.vocab_size} "
                f"(megatron-core's NullTokenizer({args.vocab_size}) has {vocab} ids); byte-level data from "
                f"`lighthouse-megatron prepare-data` needs --vocab-size {byte_vocab_size()} with this "
                "megatron-core")
        for name, bounds in zip(("train", "valid", "test"), matrix, strict=True):
            if bounds is not None and round(bounds[1] * n) - round(bounds[0] * n) == 0:
                raise ValueError(f"{flag} {prefix} has {n} documents: --split {split} gives its "
                                 f"{name} split none; use a larger dataset or another --split (e.g. 90,10,0)")


def padded_vocab_size(args: argparse.Namespace) -> int:
    """Megatron-LM's vocabulary padding of its NullTokenizer's vocabulary (the model's rows)."""
    multiple = args.make_vocab_size_divisible_by * args.tensor_model_parallel_size
    return -(-null_tokenizer(args.vocab_size).vocab_size // multiple) * multiple


