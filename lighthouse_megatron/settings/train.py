"""`lighthouse-megatron train` arguments: Megatron-LM's flag names, a YAML file, validation.

Precedence: a flag on the command line > the `--config` YAML file > the defaults below.
YAML keys are the flags' destinations (`num_layers`, `lighthouse_topk`, ...; dashes are
accepted too). Everything is checked here, before a process group, a model or a dataset
is built; errors are ValueErrors naming the flag, the value and what would be valid.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import re
from dataclasses import dataclass
from typing import Any

from ..data import byte_vocab_size, null_tokenizer, open_indexed_dataset
from .layout import check_layout
from .lighthouse import add_lighthouse_args, lighthouse_config_from_args, validate_lighthouse_args
from .yaml_file import read_mapping

# The trainer's defaults; a model close to the paper's (Llama-like: RMSNorm, SwiGLU, RoPE,
# no biases, untied embeddings) at a size that trains on a laptop. None: derived from other
# settings (the help says from which) or off.
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
    # divergence and stopping (Megatron-LM's names)
    check_for_nan_in_loss_and_grad=True, max_skipped_iters=0, exit_signal_handler=True,
    # data
    data_path=None, valid_data_path=None, mock_data=False, split="969,30,1", tokenizer_type="NullTokenizer",
    data_cache_path=None,
    # evaluation, checkpoints, logging
    eval_interval=None, eval_iters=2, save=None, save_interval=None, load=None, exit_interval=None,
    force=False, no_verify=False, save_retain=None, log_interval=1, tensorboard_dir=None, metrics_file=None,
    progress=None, wandb_project=None, wandb_exp_name=None, wandb_save_dir=None,
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

# What a default of None means, in the help.
_DERIVED = {
    "num_query_groups": "= --num-attention-heads (no GQA)",
    "ffn_hidden_size": "Megatron-LM's: 4 x --hidden-size, or with SwiGLU 2/3 of that rounded down to a "
                       "multiple of 64",
    "kv_channels": "--hidden-size / --num-attention-heads",
    "max_position_embeddings": "= --seq-length",
    "vocab_size": "bytes plus the end-of-document id, as prepare-data writes them (256 on megatron-core "
                  "0.16, 257 from 0.19 on)",
    "global_batch_size": "--micro-batch-size x data-parallel size",
    "lr_decay_iters": "= --train-iters",
    "lr_wsd_decay_iters": "none; needed by --lr-decay-style WSD",
    "bf16": "on with CUDA, off on the CPU",
    "eval_interval": "only at the end",
    "save_interval": "only at the end (and at --exit-interval)",
    "exit_interval": "none",
    "tensorboard_dir": "SAVE/tensorboard with --save, else none",
    "metrics_file": "SAVE/metrics.jsonl with --save, else none",
    "progress": "when stderr is a terminal",
    "wandb_exp_name": "W&B's generated name",
    "wandb_save_dir": "SAVE/wandb with --save, else W&B's ./wandb",
}


def _default_text(dest: str) -> str:
    if dest in _DERIVED:
        return _DERIVED[dest]
    value = DEFAULTS.get(dest)
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The trainer's flags (every default None: the merge fills them, see module doc); each
    flag's help ends with its default."""
    p = parser or argparse.ArgumentParser(prog="lighthouse-megatron train")
    p.add_argument("--config", metavar="FILE", help="YAML file with any of the settings below "
                   "(keys: the flag names with '_', e.g. num_layers); flags override it")
    bool_flag = dict(action=argparse.BooleanOptionalAction, default=None)

    def flags(group, table, typ):
        for flag, text in table:
            group.add_argument(flag, type=typ, default=None, help=text)

    m = p.add_argument_group("model (Megatron-LM names)")
    flags(m, [("--num-layers", "transformer layers"), ("--hidden-size", "model width"),
              ("--num-attention-heads", "query heads"),
              ("--num-query-groups", "key/value heads (GQA); divides --num-attention-heads"),
              ("--ffn-hidden-size", "MLP width"), ("--kv-channels", "head dimension"),
              ("--seq-length", "tokens per sample"),
              ("--max-position-embeddings", "longest sequence the position embeddings cover"),
              ("--vocab-size", "token ids of the data; the model pads its rows (NullTokenizer)"),
              ("--make-vocab-size-divisible-by", "pad the vocabulary to a multiple of this x TP"),
              ("--rotary-base", "RoPE base")], int)
    flags(m, [("--norm-epsilon", "epsilon of the norms"),
              ("--init-method-std", "standard deviation of the weights' initialisation"),
              ("--hidden-dropout", "dropout after attention and MLP, in [0, 1)"),
              ("--attention-dropout", "dropout of the attention probabilities, in [0, 1) (Lighthouse "
                                      "layers need 0)")], float)
    m.add_argument("--position-embedding-type", choices=POSITION_EMBEDDINGS, default=None,
                   help="position embeddings")
    m.add_argument("--normalization", choices=NORMALIZATIONS, default=None, help="norm layers")
    m.add_argument("--swiglu", **bool_flag, help="SwiGLU MLP (else GeLU)")
    m.add_argument("--untie-embeddings-and-output-weights", **bool_flag,
                   help="separate input embedding and output layer weights")
    m.add_argument("--add-bias-linear", **bool_flag, help="biases in the linear layers")
    m.add_argument("--disable-bias-linear", dest="add_bias_linear", action="store_false", default=None,
                   help="Megatron-LM's spelling of --no-add-bias-linear")
    m.add_argument("--qk-layernorm", **bool_flag, help="norm on queries and keys")

    t = p.add_argument_group("training")
    for flag, typ, text in [
            ("--micro-batch-size", int, "samples per forward pass on each data-parallel rank"),
            ("--global-batch-size", int, "samples per iteration, over all ranks (gradient accumulation "
                                         "makes up the rest)"),
            ("--train-iters", int, "iterations of the whole schedule"),
            ("--lr", float, "peak learning rate"),
            ("--min-lr", float, "learning rate at the end of the decay"),
            ("--lr-warmup-iters", int, "linear warm-up iterations"),
            ("--lr-warmup-init", float, "learning rate at the start of the warm-up"),
            ("--lr-decay-iters", int, "iteration at which the decay reaches --min-lr"),
            ("--lr-wsd-decay-iters", int, "iterations of the WSD anneal, before --lr-decay-iters"),
            ("--weight-decay", float, "AdamW weight decay"), ("--adam-beta1", float, "Adam beta1, in [0, 1)"),
            ("--adam-beta2", float, "Adam beta2, in [0, 1)"), ("--adam-eps", float, "Adam epsilon"),
            ("--clip-grad", float, "clip the global gradient norm to this (0: no clipping)"),
            ("--seed", int, "random seed (weights, data order, dropout)")]:
        t.add_argument(flag, type=typ, default=None, help=text)
    t.add_argument("--lr-decay-style", choices=LR_DECAY_STYLES, default=None,
                   help="WSD: constant after warm-up, then --lr-wsd-decay-style over the last "
                        "--lr-wsd-decay-iters iterations before --lr-decay-iters")
    t.add_argument("--lr-wsd-decay-style", choices=LR_WSD_DECAY_STYLES, default=None,
                   help="the WSD anneal's shape, as Megatron-LM")
    t.add_argument("--override-opt_param-scheduler", "--override-opt-param-scheduler",
                   dest="override_opt_param_scheduler", action="store_true", default=None,
                   help="with --load: take the learning-rate and weight-decay schedule from these "
                        "settings, not from the checkpoint (without it a different schedule is refused)")
    t.add_argument("--bf16", **bool_flag, help="bf16 weights with fp32 master weights")
    t.add_argument("--device", choices=DEVICES, default=None, help="auto: CUDA when there is a GPU")
    t.add_argument("--tensor-model-parallel-size", type=int, default=None, help="TP")
    t.add_argument("--context-parallel-size", type=int, default=None, help="CP")
    t.add_argument("--check-for-nan-in-loss-and-grad", **bool_flag,
                   help="stop (exit code 17) at an iteration whose loss or gradient norm is NaN or "
                        "infinite, before that update and without saving it; checkpoints are checked "
                        "finite before they are written")
    t.add_argument("--max-skipped-iters", type=int, default=None, metavar="N",
                   help="with the check on: skip up to N such iterations (no update, the schedule "
                        "waits) before stopping")
    t.add_argument("--exit-signal-handler", **bool_flag,
                   help="on SIGTERM or SIGINT: finish the iteration, save a checkpoint (with --save), "
                        "exit with 128 + the signal number; a second signal exits at once")

    d = p.add_argument_group("data")
    d.add_argument("--data-path", nargs="+", default=None, metavar="PREFIX",
                   help="Megatron indexed dataset prefix(es) (PREFIX.bin/.idx), optionally weighted: "
                        "'0.7 A 0.3 B'")
    d.add_argument("--mock-data", action="store_true", default=None,
                   help="megatron-core's MockGPTDataset instead of --data-path")
    d.add_argument("--valid-data-path", nargs="+", default=None, metavar="PREFIX",
                   help="held-out data instead of --split's validation share: --data-path then trains "
                        "on all its documents, and the held-out sequences are the same for every --seed")
    d.add_argument("--split", default=None, help="train,valid,test weights (not used with "
                   "--valid-data-path)")
    d.add_argument("--tokenizer-type", choices=("NullTokenizer",), default=None,
                   help="token ids are used as they are; --vocab-size ids plus an end-of-document id")
    d.add_argument("--data-cache-path", default=None, metavar="DIR",
                   help="where megatron-core caches its sample indices (default: beside the data)")

    c = p.add_argument_group("evaluation, checkpoints, logging")
    flags(c, [("--eval-interval", "evaluate every N iterations"),
              ("--eval-iters", "held-out global batches per evaluation (0: no evaluation)"),
              ("--save-interval", "save every N iterations"),
              ("--exit-interval", "stop, and save, after iteration N"),
              ("--log-interval", "log every N iterations")], int)
    c.add_argument("--save", default=None, metavar="DIR", help="checkpoint directory (none: nothing saved)")
    c.add_argument("--load", default=None, metavar="DIR",
                   help="resume from this checkpoint directory; it must exist (an empty one, or --load "
                        "= --save, starts from scratch: a requeued job before its first save)")
    c.add_argument("--force", action="store_true", default=None,
                   help="replace checkpoints of the same iteration that already exist in --save")
    c.add_argument("--save-retain", type=int, default=None, metavar="N",
                   help="keep the last N checkpoints in --save (and the one --load read); remove older "
                        "ones (default: keep all)")
    c.add_argument("--no-verify", action="store_true", default=None,
                   help="skip checking the --load checkpoint's files against its manifest")
    c.add_argument("--tensorboard-dir", default=None, metavar="DIR", help="TensorBoard event files")
    c.add_argument("--metrics-file", default=None, metavar="FILE", help="JSONL, one record per log")
    c.add_argument("--progress", **bool_flag, help="progress bar")
    c.add_argument("--wandb-project", default=None, metavar="NAME",
                   help="log to Weights & Biases in this project too (pip install "
                        "'lighthouse-megatron[wandb]'; WANDB_MODE=offline writes locally)")
    c.add_argument("--wandb-exp-name", default=None, metavar="NAME", help="the W&B run's name")
    c.add_argument("--wandb-save-dir", default=None, metavar="DIR", help="W&B's local files")

    add_lighthouse_args(p)
    for action in p._actions:
        if action.dest == "help" or action.help is None:
            continue
        if "default" not in action.help.lower():
            action.help += f" (default: {_default_text(action.dest)})"
    return p


def add_train_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a GPT model with Lighthouse attention on this machine "
                       "(megatron-core; torchrun for several processes)")
    build_parser(p)
    p.set_defaults(run="lighthouse_megatron.training:run_cli")


def lighthouse_dests() -> list[str]:
    return [a.dest for a in add_lighthouse_args(argparse.ArgumentParser())._actions if a.dest != "help"]


# ----------------------------------------------------------------------- setting types


@dataclass(frozen=True)
class SettingType:
    """How a setting's value is typed when it does not come through argparse (a YAML file,
    a Slurm recipe, the Python API): `kind` is bool, int, float, str or list (of `item`)."""

    kind: type
    item: type | None = None


_TRUE, _FALSE = ("true", "yes", "on"), ("false", "no", "off")


@functools.cache
def setting_types() -> dict[str, SettingType]:
    """setting -> its type, read off the parser's actions: the one table that types every
    setting from every source."""
    table: dict[str, SettingType] = {}
    for action in build_parser()._actions:
        if action.dest in ("help", "config"):
            continue
        if isinstance(action, (argparse.BooleanOptionalAction, argparse._StoreTrueAction,
                               argparse._StoreFalseAction)):
            table[action.dest] = SettingType(bool)
        elif action.nargs in ("+", "*"):
            table[action.dest] = SettingType(list, action.type or str)
        else:
            table[action.dest] = SettingType(action.type or str)
    return table


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def typed_value(name: str, value: Any, where: str) -> Any:
    """`value` as setting `name`'s type, when it clearly means one (YAML 1.1 reads `3e-4` as a
    string, `no` as false); ValueError naming `where`, the setting and the valid values
    otherwise. None stays None (the default)."""
    setting = setting_types().get(name)
    if value is None or setting is None:
        return value
    kind = setting.kind
    if kind is list:
        items = value.split() if isinstance(value, str) else value if isinstance(value, (list, tuple)) \
            else [value]
        return [_typed_item(name, v, setting.item, where) for v in items]
    return _typed_item(name, value, kind, where)


def _typed_item(name: str, value: Any, kind: type, where: str) -> Any:
    def refuse(what: str):
        return ValueError(f"{where}: {name} must be {what}, got {value!r}")

    if kind is bool:
        if isinstance(value, bool):
            return value
        word = value.strip().lower() if isinstance(value, str) else None
        if word in _TRUE or word in _FALSE:
            return word in _TRUE
        raise refuse("true or false (also yes/no, on/off)")
    if kind is int:
        number = _number(value) if isinstance(value, str) else value
        if isinstance(number, bool) or not isinstance(number, (int, float)) or number != number \
                or number in (float("inf"), float("-inf")) or int(number) != number:
            raise refuse("an integer")
        return int(number)
    if kind is float:
        number = _number(value) if isinstance(value, str) else value
        if isinstance(number, bool) or not isinstance(number, (int, float)):
            raise refuse("a number")
        return float(number)
    if isinstance(value, (bool, list, tuple, dict)):
        raise refuse("a string")
    return str(value)


def typed_settings(settings: dict[str, Any], where: str) -> dict[str, Any]:
    """Every value of `settings` typed by its setting (`typed_value`)."""
    return {key: typed_value(key, value, where) for key, value in settings.items()}


def _read_yaml(path: str, valid: list[str]) -> dict[str, Any]:
    data = read_mapping(path, "--config")
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(data) - set(valid))
    if unknown:
        raise ValueError(f"--config {path}: unknown settings {unknown}; valid: {sorted(valid)}")
    return typed_settings(data, f"--config {path}")


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
    from_file = []
    for key in valid:
        value = getattr(cli, key, None)
        if value is None:
            value = settings.get(key, DEFAULTS.get(key))
            if key in settings and settings[key] is not None:
                from_file.append(key)
        setattr(args, key, value)
    for key in ("data_path", "valid_data_path"):
        if isinstance(getattr(args, key), str):
            setattr(args, key, getattr(args, key).split())
    try:
        validate_args(args, world_size=world_size)
    except ValueError as e:
        # A setting the user did not type names the file it came from (one line, as always).
        named = [k for k in from_file if re.match(re.escape(_flag(k)) + r"(?![\w-])", str(e))]
        if named:
            value = settings[named[0]]
            shown = str(value).lower() if isinstance(value, bool) else value
            raise ValueError(f"{e} ({named[0]}: {shown} is in --config {cli.config})") from None
        raise
    return args


def settings_args(settings: dict[str, Any], *, world_size: int | None = None) -> argparse.Namespace:
    """Validated arguments from a mapping of settings (the YAML keys; None: the default), as
    `--config` would give them, typed the same way; other keys are ignored."""
    cli = build_parser().parse_args([])
    for key in vars(cli):
        if key in settings:
            setattr(cli, key, typed_value(key, settings[key], "settings"))
    cli.config = None
    return resolve_args(cli, world_size=world_size)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _check_type(args, name, typ, minimum=None):
    value = getattr(args, name)
    flag = _flag(name)
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
        setattr(args, name, value)
    if not isinstance(value, typ) or isinstance(value, bool) and typ is not bool:
        raise ValueError(f"{flag} must be {'an integer' if typ is int else 'a number'}, got {value!r}")
    if typ is float and not math.isfinite(value):
        raise ValueError(f"{flag} must be a finite number, got {value}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{flag} must be >= {minimum}, got {value}")


def validate_args(args: argparse.Namespace, world_size: int | None = None) -> None:
    """Check every setting and fill the derived ones (Megatron-LM's names) in place."""
    if args.vocab_size is None:  # bytes and end-of-document, as prepare-data writes them
        args.vocab_size = byte_vocab_size()
    ints = dict(num_layers=1, hidden_size=1, num_attention_heads=1, seq_length=1, vocab_size=1,
                make_vocab_size_divisible_by=1, rotary_base=1, micro_batch_size=1, train_iters=1,
                lr_warmup_iters=0, eval_iters=0, log_interval=1, seed=0, tensor_model_parallel_size=1,
                context_parallel_size=1, max_skipped_iters=0)
    for name, low in ints.items():
        _check_type(args, name, int, low)
    for name in ("num_query_groups", "ffn_hidden_size", "kv_channels", "max_position_embeddings",
                 "global_batch_size", "lr_decay_iters", "lr_wsd_decay_iters", "eval_interval",
                 "save_interval", "exit_interval"):
        if getattr(args, name) is not None:
            _check_type(args, name, int, 1)
    for name in ("lr", "min_lr", "lr_warmup_init", "weight_decay", "clip_grad", "adam_eps", "init_method_std",
                 "norm_epsilon"):
        _check_type(args, name, float, 0.0)
    for name in ("adam_beta1", "adam_beta2", "hidden_dropout", "attention_dropout"):
        _check_type(args, name, float, 0.0)
        if getattr(args, name) >= 1.0:  # torch's dropout would name neither the flag nor the rule
            raise ValueError(f"{_flag(name)} must be in [0, 1), got {getattr(args, name)}")
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
        raise ValueError("--bf16 needs --device cuda (CPU training runs in fp32); drop it or pass --no-bf16")
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
    for name in ("max_skipped_iters",):
        if getattr(args, name) and not args.check_for_nan_in_loss_and_grad:
            raise ValueError(f"{_flag(name)} {getattr(args, name)} needs --check-for-nan-in-loss-and-grad "
                             "(it counts the iterations that check skips)")
    if args.wandb_project:
        import importlib.util

        if importlib.util.find_spec("wandb") is None:
            raise ValueError("--wandb-project needs the wandb package, which is not installed: "
                             "pip install 'lighthouse-megatron[wandb]'")
    elif args.wandb_exp_name or args.wandb_save_dir:
        raise ValueError("--wandb-exp-name and --wandb-save-dir need --wandb-project")

    # Lighthouse (its own flags, --lighthouse-config, and the model and parallel sizes).
    validate_lighthouse_args(args)


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
    h, kv, groups = args.hidden_size, args.kv_channels, args.num_query_groups
    per_layer = h * (args.num_attention_heads + 2 * groups) * kv + args.num_attention_heads * kv * h \
        + h * args.ffn_hidden_size * (3 if args.swiglu else 2)
    embeddings = args.padded_vocab_size * h * (2 if args.untie_embeddings_and_output_weights else 1)
    weights = 16 * (layers * per_layer + embeddings) // tp
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
        weights = [_number(str(w)) for w in data_path[0::2]]
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
