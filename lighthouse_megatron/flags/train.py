"""`lighthouse-megatron train` arguments: Megatron-LM's flag names, a YAML file, validation.

Precedence: a flag on the command line > the `--config` YAML file > the defaults below.
YAML keys are the flags' destinations (`num_layers`, `lighthouse_topk`, ...; dashes are
accepted too). Everything is checked here, before a process group, a model or a dataset
is built; errors are ValueErrors naming the flag, the value and what would be valid.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from ..data import byte_vocab_size, null_tokenizer, open_indexed_dataset
from ..layout import check_layout
from ..yaml_settings import read_mapping
from .lighthouse import add_lighthouse_args, validate_lighthouse_args

# The trainer's defaults; a model close to the paper's (Llama-like: RMSNorm, SwiGLU, RoPE,
# no biases, untied embeddings) at a size that trains on a laptop.
DEFAULTS: dict[str, Any] = dict(
    # model
    num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=None, ffn_hidden_size=None,
    kv_channels=None, seq_length=256, max_position_embeddings=None, vocab_size=None,
    make_vocab_size_divisible_by=128, position_embedding_type="rope", rotary_base=10000,
    normalization="RMSNorm", norm_epsilon=1e-5, swiglu=True, add_bias_linear=False,
    untie_embeddings_and_output_weights=True, qk_layernorm=False, init_method_std=0.02,
    hidden_dropout=0.0, attention_dropout=0.0,
    # optimisation
    micro_batch_size=1, global_batch_size=None, train_iters=100, lr=3e-4, min_lr=0.0, lr_warmup_iters=0,
    lr_warmup_init=0.0, lr_decay_iters=None, lr_decay_style="cosine", lr_wsd_decay_style="exponential",
    lr_wsd_decay_iters=None, override_opt_param_scheduler=False, weight_decay=0.01, adam_beta1=0.9,
    adam_beta2=0.999, adam_eps=1e-8, clip_grad=1.0, seed=1234, bf16=None, device="auto",
    # data
    data_path=None, valid_data_path=None, mock_data=False, split="969,30,1", tokenizer_type="NullTokenizer",
    data_cache_path=None,
    # evaluation, checkpoints, logging
    eval_interval=None, eval_iters=2, save=None, save_interval=None, load=None, exit_interval=None,
    force=False, no_verify=False, save_retain=None, log_interval=1, tensorboard_dir=None, metrics_file=None,
    progress=None,
    # parallelism
    tensor_model_parallel_size=1, context_parallel_size=1,
)

# With --valid-data-path: the training data's split (all of it), the held-out data's split.
ALL_TRAIN, ALL_VALID = "1,0,0", "0,1,0"

# Megatron-LM's --lr-decay-style and --lr-wsd-decay-style choices (megatron-core's
# OptimizerParamScheduler computes them).
LR_DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root", "WSD")
LR_WSD_DECAY_STYLES = ("exponential", "linear", "cosine", "minus_sqrt")
POSITION_EMBEDDINGS = ("rope", "learned_absolute")
NORMALIZATIONS = ("RMSNorm", "LayerNorm")
DEVICES = ("auto", "cpu", "cuda")


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The trainer's flags (every default None: the merge fills them, see module doc)."""
    p = parser or argparse.ArgumentParser(prog="lighthouse-megatron train")
    p.add_argument("--config", metavar="FILE", help="YAML file with any of the settings below "
                   "(keys: the flag names with '_', e.g. num_layers); flags override it")
    bool_flag = dict(action=argparse.BooleanOptionalAction, default=None)

    m = p.add_argument_group("model (Megatron-LM names)")
    for flag, typ in [("--num-layers", int), ("--hidden-size", int), ("--num-attention-heads", int),
                      ("--num-query-groups", int), ("--ffn-hidden-size", int), ("--kv-channels", int),
                      ("--seq-length", int), ("--max-position-embeddings", int), ("--vocab-size", int),
                      ("--make-vocab-size-divisible-by", int), ("--rotary-base", int),
                      ("--norm-epsilon", float), ("--init-method-std", float), ("--hidden-dropout", float),
                      ("--attention-dropout", float)]:
        m.add_argument(flag, type=typ, default=None)
    m.add_argument("--position-embedding-type", choices=POSITION_EMBEDDINGS, default=None)
    m.add_argument("--normalization", choices=NORMALIZATIONS, default=None)
    m.add_argument("--swiglu", **bool_flag)
    m.add_argument("--untie-embeddings-and-output-weights", **bool_flag)
    m.add_argument("--add-bias-linear", **bool_flag)
    m.add_argument("--disable-bias-linear", dest="add_bias_linear", action="store_false", default=None,
                   help="Megatron-LM's spelling of --no-add-bias-linear")
    m.add_argument("--qk-layernorm", **bool_flag)

    t = p.add_argument_group("training")
    for flag, typ in [("--micro-batch-size", int), ("--global-batch-size", int), ("--train-iters", int),
                      ("--lr", float), ("--min-lr", float), ("--lr-warmup-iters", int),
                      ("--lr-warmup-init", float), ("--lr-decay-iters", int), ("--lr-wsd-decay-iters", int),
                      ("--weight-decay", float),
                      ("--adam-beta1", float), ("--adam-beta2", float), ("--adam-eps", float),
                      ("--clip-grad", float), ("--seed", int)]:
        t.add_argument(flag, type=typ, default=None)
    t.add_argument("--lr-decay-style", choices=LR_DECAY_STYLES, default=None,
                   help="WSD: constant after warm-up, then --lr-wsd-decay-style over the last "
                        "--lr-wsd-decay-iters iterations before --lr-decay-iters")
    t.add_argument("--lr-wsd-decay-style", choices=LR_WSD_DECAY_STYLES, default=None,
                   help="the WSD anneal's shape (default exponential, as Megatron-LM)")
    t.add_argument("--override-opt_param-scheduler", "--override-opt-param-scheduler",
                   dest="override_opt_param_scheduler", action="store_true", default=None,
                   help="with --load: take the learning-rate and weight-decay schedule from these "
                        "settings, not from the checkpoint (without it a different schedule is refused)")
    t.add_argument("--bf16", **bool_flag, help="bf16 weights with fp32 master weights (default: on with "
                   "CUDA, off on CPU)")
    t.add_argument("--device", choices=DEVICES, default=None)
    t.add_argument("--tensor-model-parallel-size", type=int, default=None)
    t.add_argument("--context-parallel-size", type=int, default=None)

    d = p.add_argument_group("data")
    d.add_argument("--data-path", nargs="+", default=None, metavar="PREFIX",
                   help="Megatron indexed dataset prefix(es) (PREFIX.bin/.idx), optionally weighted: "
                        "'0.7 A 0.3 B'")
    d.add_argument("--mock-data", action="store_true", default=None,
                   help="megatron-core's MockGPTDataset instead of --data-path")
    d.add_argument("--valid-data-path", nargs="+", default=None, metavar="PREFIX",
                   help="held-out data instead of --split's validation share: --data-path then trains "
                        "on all its documents, and the held-out sequences are the same for every --seed")
    d.add_argument("--split", default=None, help="train,valid,test weights (default 969,30,1; not used "
                   "with --valid-data-path)")
    d.add_argument("--tokenizer-type", choices=("NullTokenizer",), default=None,
                   help="token ids are used as they are; --vocab-size ids plus an end-of-document id")
    d.add_argument("--data-cache-path", default=None, metavar="DIR")

    c = p.add_argument_group("evaluation, checkpoints, logging")
    for flag in ("--eval-interval", "--eval-iters", "--save-interval", "--exit-interval", "--log-interval"):
        c.add_argument(flag, type=int, default=None)
    c.add_argument("--save", default=None, metavar="DIR")
    c.add_argument("--load", default=None, metavar="DIR")
    c.add_argument("--force", action="store_true", default=None,
                   help="replace checkpoints of the same iteration that already exist in --save")
    c.add_argument("--save-retain", type=int, default=None, metavar="N",
                   help="keep the last N checkpoints in --save (and the one --load read); remove older ones")
    c.add_argument("--no-verify", action="store_true", default=None,
                   help="skip checking the --load checkpoint's files against its manifest")
    c.add_argument("--tensorboard-dir", default=None, metavar="DIR", help="default: SAVE/tensorboard")
    c.add_argument("--metrics-file", default=None, metavar="FILE", help="JSONL; default: SAVE/metrics.jsonl")
    c.add_argument("--progress", **bool_flag, help="progress bar (default: when stderr is a terminal)")

    add_lighthouse_args(p)
    return p


def add_train_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a GPT model with Lighthouse attention on this machine "
                       "(megatron-core; torchrun for several processes)")
    build_parser(p)
    p.set_defaults(run="lighthouse_megatron.training:run_cli")


def lighthouse_dests() -> list[str]:
    return [a.dest for a in add_lighthouse_args(argparse.ArgumentParser())._actions if a.dest != "help"]


def _read_yaml(path: str, valid: list[str]) -> dict[str, Any]:
    data = read_mapping(path, "--config")
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(data) - set(valid))
    if unknown:
        raise ValueError(f"--config {path}: unknown settings {unknown}; valid: {sorted(valid)}")
    return data


def parse_args(argv: list[str] | None = None, *, world_size: int | None = None) -> argparse.Namespace:
    """Parse, merge (flags > YAML > defaults), validate. Raises ValueError on bad settings
    (argparse itself exits with code 2 on malformed flags)."""
    return resolve_args(build_parser().parse_args(argv), world_size=world_size)


def resolve_args(cli: argparse.Namespace, *, world_size: int | None = None) -> argparse.Namespace:
    """Merge parsed flags (None: not given) with the `--config` file and the defaults, validate."""
    lighthouse = lighthouse_dests()
    valid = [*DEFAULTS, *lighthouse]
    settings = _read_yaml(cli.config, valid) if cli.config else {}
    args = argparse.Namespace(config=cli.config)
    for key in valid:
        value = getattr(cli, key, None)
        if value is None:
            value = settings.get(key, DEFAULTS.get(key))
        setattr(args, key, value)
    for key in ("data_path", "valid_data_path"):
        if isinstance(getattr(args, key), str):
            setattr(args, key, getattr(args, key).split())
    validate_args(args, world_size=world_size)
    return args


def settings_args(settings: dict[str, Any], *, world_size: int | None = None) -> argparse.Namespace:
    """Validated arguments from a mapping of settings (the YAML keys; None: the default), as
    `--config` would give them; other keys are ignored."""
    cli = build_parser().parse_args([])
    for key in vars(cli):
        if key in settings:
            setattr(cli, key, settings[key])
    cli.config = None
    return resolve_args(cli, world_size=world_size)


def _check_type(args, name, typ, minimum=None):
    value = getattr(args, name)
    flag = "--" + name.replace("_", "-")
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
        setattr(args, name, value)
    if not isinstance(value, typ) or isinstance(value, bool) and typ is not bool:
        raise ValueError(f"{flag} must be {'an integer' if typ is int else 'a number'}, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{flag} must be >= {minimum}, got {value}")


def validate_args(args: argparse.Namespace, world_size: int | None = None) -> None:
    """Check every setting and fill the derived ones (Megatron-LM's names) in place."""
    if args.vocab_size is None:  # bytes and end-of-document, as prepare-data writes them
        args.vocab_size = byte_vocab_size()
    ints = dict(num_layers=1, hidden_size=1, num_attention_heads=1, seq_length=1, vocab_size=1,
                make_vocab_size_divisible_by=1, rotary_base=1, micro_batch_size=1, train_iters=1,
                lr_warmup_iters=0, eval_iters=0, log_interval=1, seed=0, tensor_model_parallel_size=1,
                context_parallel_size=1)
    for name, low in ints.items():
        _check_type(args, name, int, low)
    for name in ("num_query_groups", "ffn_hidden_size", "kv_channels", "max_position_embeddings",
                 "global_batch_size", "lr_decay_iters", "lr_wsd_decay_iters", "eval_interval",
                 "save_interval", "exit_interval"):
        if getattr(args, name) is not None:
            _check_type(args, name, int, 1)
    for name in ("lr", "min_lr", "lr_warmup_init", "weight_decay", "clip_grad", "adam_eps", "init_method_std",
                 "norm_epsilon", "hidden_dropout", "attention_dropout"):
        _check_type(args, name, float, 0.0)
    for name in ("adam_beta1", "adam_beta2"):
        _check_type(args, name, float, 0.0)
        if getattr(args, name) >= 1.0:
            raise ValueError(f"--{name.replace('_', '-')} must be in [0, 1), got {getattr(args, name)}")
    for name, choices in (("lr_decay_style", LR_DECAY_STYLES), ("lr_wsd_decay_style", LR_WSD_DECAY_STYLES),
                          ("normalization", NORMALIZATIONS),
                          ("position_embedding_type", POSITION_EMBEDDINGS), ("device", DEVICES)):
        if getattr(args, name) not in choices:
            raise ValueError(f"--{name.replace('_', '-')} must be one of {list(choices)}, "
                             f"got {getattr(args, name)!r}")
    if args.min_lr > args.lr:
        raise ValueError(f"--min-lr {args.min_lr} is above --lr {args.lr}")

    # Model shape.
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
    if args.max_position_embeddings is None:
        args.max_position_embeddings = args.seq_length
    if args.seq_length > args.max_position_embeddings:
        raise ValueError(f"--seq-length {args.seq_length} exceeds --max-position-embeddings "
                         f"{args.max_position_embeddings}")

    # Parallel layout.
    args.padded_vocab_size = padded_vocab_size(args)
    world = int(os.environ.get("WORLD_SIZE", "1")) if world_size is None else world_size
    tp, cp = args.tensor_model_parallel_size, args.context_parallel_size
    dp = check_layout(world, tp, cp, 1)  # the one layout check (slurm render and the launcher use it too)
    args.world_size, args.data_parallel_size, args.pipeline_model_parallel_size = world, dp, 1
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

    # Schedule.
    if args.lr_decay_iters is None:
        args.lr_decay_iters = args.train_iters
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

    # Data.
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
        used = ("train", "valid", "test") if args.eval_iters and not args.valid_data_path else ("train",)
        _check_splits(args, args.data_path, args.split, used, "--data-path")
    if args.valid_data_path:
        _check_splits(args, args.valid_data_path, ALL_VALID, ("valid",), "--valid-data-path")

    # Device and precision.
    import torch

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available; use --device cpu")
    if args.bf16 is None:
        args.bf16 = args.device == "cuda"
    if args.bf16 and args.device != "cuda":
        raise ValueError("--bf16 needs --device cuda (CPU training runs in fp32); drop --bf16")
    args.fp16 = False

    # Checkpoints.
    if args.save_interval is not None and not args.save:
        raise ValueError("--save-interval needs --save DIR")
    if args.save_retain is not None:
        _check_type(args, "save_retain", int)
        if args.save_retain < 1:
            raise ValueError(f"--save-retain must be >= 1 (the number of checkpoints to keep), got "
                             f"{args.save_retain}; leave it out to keep every checkpoint")
        if not args.save:
            raise ValueError("--save-retain needs --save DIR")
    if args.load and os.path.exists(args.load) and not os.path.isdir(args.load):
        raise ValueError(f"--load {args.load} is not a directory")

    # Lighthouse (its own flags, --lighthouse-config, and the model and parallel sizes).
    validate_lighthouse_args(args)


def _check_data_path(data_path: list[str], flag: str = "--data-path") -> None:
    prefixes = data_path
    if len(data_path) > 1:
        if len(data_path) % 2:
            raise ValueError(f"{flag} takes one PREFIX or weight/PREFIX pairs, got {data_path}")
        try:
            [float(w) for w in data_path[0::2]]
        except ValueError:
            raise ValueError(f"{flag} pairs must be 'weight PREFIX', got {data_path}") from None
        prefixes = data_path[1::2]
    for prefix in prefixes:
        missing = [prefix + ext for ext in (".bin", ".idx") if not os.path.isfile(prefix + ext)]
        if missing:
            raise ValueError(f"{flag} {prefix}: missing {', '.join(missing)} (a Megatron indexed "
                             "dataset is PREFIX.bin + PREFIX.idx, e.g. from "
                             "`lighthouse-megatron prepare-data`)")


def _check_splits(args: argparse.Namespace, data_path: list[str], split: str, used: tuple[str, ...],
                  flag: str) -> None:
    """Every split that samples are drawn from must hold documents: megatron-core's GPTDataset
    loops forever counting epochs over an empty split."""
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
            if name in used and bounds is not None and round(bounds[1] * n) - round(bounds[0] * n) == 0:
                raise ValueError(f"{flag} {prefix} has {n} documents: --split {split} gives its "
                                 f"{name} split none; use a larger dataset or another --split (e.g. 90,10,0)")


def padded_vocab_size(args: argparse.Namespace) -> int:
    """Megatron-LM's vocabulary padding of its NullTokenizer's vocabulary (the model's rows)."""
    multiple = args.make_vocab_size_divisible_by * args.tensor_model_parallel_size
    return -(-null_tokenizer(args.vocab_size).vocab_size // multiple) * multiple


def megatron_lm_args(args: argparse.Namespace) -> list[str]:
    """Megatron-LM `pretrain_gpt.py` flags (with the plugin's entry point) that build the same
    model, data order, loss and schedule as these trainer settings, so Megatron-LM can
    continue a trainer checkpoint (add `--load DIR`, and `--no-load-rng` for a CPU one)."""
    flag = lambda name: "--" + name.replace("_", "-")  # noqa: E731
    out: list[str] = []
    for name in ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "kv_channels",
                 "seq_length", "max_position_embeddings", "position_embedding_type", "normalization",
                 "norm_epsilon", "init_method_std", "hidden_dropout", "attention_dropout", "micro_batch_size",
                 "global_batch_size", "train_iters", "lr", "min_lr", "lr_warmup_iters", "lr_warmup_init",
                 "lr_decay_iters", "lr_decay_style", "lr_wsd_decay_style", "weight_decay", "adam_beta1",
                 "adam_beta2", "adam_eps",
                 "clip_grad", "seed", "tensor_model_parallel_size", "context_parallel_size", "tokenizer_type",
                 "vocab_size", "make_vocab_size_divisible_by", "split", "eval_iters"):
        out += [flag(name), str(getattr(args, name))]
    if args.position_embedding_type == "rope":
        out += ["--rotary-base", str(args.rotary_base)]
    if args.lr_wsd_decay_iters is not None:
        out += ["--lr-wsd-decay-iters", str(args.lr_wsd_decay_iters)]
    if args.override_opt_param_scheduler:  # the spelling every Megatron-LM release accepts
        out.append("--override-opt_param-scheduler")
    if args.num_query_groups != args.num_attention_heads:
        out += ["--group-query-attention", "--num-query-groups", str(args.num_query_groups)]
    for name, on in (("swiglu", args.swiglu), ("untie_embeddings_and_output_weights",
                                                args.untie_embeddings_and_output_weights),
                     ("disable_bias_linear", not args.add_bias_linear), ("qk_layernorm", args.qk_layernorm),
                     ("bf16", args.bf16), ("mock_data", args.mock_data)):
        if on:
            out.append(flag(name))
    if args.data_path:
        out += ["--data-path", *args.data_path]
    # The trainer's loss is the per-token mean over the global batch; its held-out batches
    # are the first eval_iters of the validation split.
    out += ["--eval-interval", str(args.eval_interval or args.train_iters), "--calculate-per-token-loss",
            "--ckpt-format", "torch_dist", "--attention-impl", args.attention_impl]
    if args.attention_impl == "lighthouse":
        for name in ("levels", "pooling_factor", "topk", "tile_topk", "scorer", "backend"):
            out += [flag("lighthouse_" + name), str(getattr(args, "lighthouse_" + name))]
        if args.lighthouse_dense_layers:
            out += ["--lighthouse-dense-layers", *map(str, args.lighthouse_dense_layers)]
        if args.lighthouse_until_iter is not None:
            out += ["--lighthouse-until-iter", str(args.lighthouse_until_iter)]
    return out
