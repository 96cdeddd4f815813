"""The trainer's settings tree: one dataclass per group, one field per setting (see `fields`).

Defaults: a model close to the paper's (Llama-like: RMSNorm, SwiGLU, RoPE, no biases,
untied embeddings) at a size that trains on a laptop. None: derived from other settings by
the checks (the help says from which) or off. The Lighthouse launch settings are derived
from LighthouseConfig and RecipeSchedule (`lighthouse`), the Slurm job's from `SlurmJob`
(`slurm`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import ClassVar

from .fields import (
    CONTINUED,
    OFF,
    SAME_MODEL,
    SCHEDULE,
    SHAPE,
    SUMMARY,
    SWITCH,
    VALUE,
    Spec,
    merged,
    setting,
    specs,
)

# Megatron-LM's --lr-decay-style and --lr-wsd-decay-style choices (megatron-core's
# OptimizerParamScheduler computes them).
LR_DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root", "WSD")
LR_WSD_DECAY_STYLES = ("exponential", "linear", "cosine", "minus_sqrt")
POSITION_EMBEDDINGS = ("rope", "learned_absolute")
NORMALIZATIONS = ("RMSNorm", "LayerNorm")
DEVICES = ("auto", "cpu", "cuda")

_MODEL = frozenset({SHAPE, CONTINUED, SUMMARY})


@dataclass
class Model:
    TITLE: ClassVar[str] = "model (Megatron-LM names)"

    num_layers: int = setting(2, "transformer layers", minimum=1, roles=_MODEL, megatron=VALUE)
    hidden_size: int = setting(64, "model width", minimum=1, roles=_MODEL, megatron=VALUE)
    num_attention_heads: int = setting(4, "query heads", minimum=1, roles=_MODEL, megatron=VALUE)
    # Megatron-LM reads it only with --group-query-attention: `megatron_lm_args` writes both.
    num_query_groups: int | None = setting(
        None, "key/value heads (GQA); divides --num-attention-heads", minimum=1, roles=_MODEL,
        derived="= --num-attention-heads (no GQA)")
    ffn_hidden_size: int | None = setting(
        None, "MLP width", minimum=1, roles=_MODEL, megatron=VALUE,
        derived="Megatron-LM's: 4 x --hidden-size, or with SwiGLU 2/3 of that rounded down to a multiple "
                "of 64")
    kv_channels: int | None = setting(None, "head dimension", derived="--hidden-size / --num-attention-heads",
                                      minimum=1, roles={SHAPE, SUMMARY}, megatron=VALUE)
    seq_length: int = setting(256, "tokens per sample", minimum=1, roles={CONTINUED, SUMMARY}, megatron=VALUE,
                              render=True)
    max_position_embeddings: int | None = setting(
        None, "longest sequence the position embeddings cover", derived="= --seq-length", minimum=1,
        roles={SUMMARY}, megatron=VALUE)
    # The checkpoint holds the padded rows: that is what two runs must agree on.
    vocab_size: int | None = setting(
        None, "token ids of the data; the model pads its rows (NullTokenizer)", minimum=1, megatron=VALUE,
        roles={SHAPE, SUMMARY}, stored_as="padded_vocab_size",
        derived="bytes plus the end-of-document id, as prepare-data writes them (256 on megatron-core 0.16, "
                "257 from 0.19 on)")
    make_vocab_size_divisible_by: int = setting(128, "pad the vocabulary to a multiple of this x TP",
                                                minimum=1, megatron=VALUE)
    position_embedding_type: str = setting("rope", "position embeddings", choices=POSITION_EMBEDDINGS,
                                           roles={SHAPE, SAME_MODEL, SUMMARY}, megatron=VALUE)
    # Megatron-LM takes it only with RoPE: `megatron_lm_args` writes it then.
    rotary_base: int = setting(10000, "RoPE base", minimum=1, roles={SAME_MODEL})
    normalization: str = setting("RMSNorm", "norm layers", choices=NORMALIZATIONS,
                                 roles={SHAPE, SAME_MODEL, SUMMARY}, megatron=VALUE)
    norm_epsilon: float = setting(1e-5, "epsilon of the norms", minimum=0.0, roles={SAME_MODEL},
                                  megatron=VALUE)
    swiglu: bool = setting(True, "SwiGLU MLP (else GeLU)", roles={SHAPE, SAME_MODEL, SUMMARY},
                           megatron=SWITCH)
    untie_embeddings_and_output_weights: bool = setting(
        True, "separate input embedding and output layer weights", roles={SHAPE, SAME_MODEL, SUMMARY},
        megatron=SWITCH)
    add_bias_linear: bool = setting(False, "biases in the linear layers", negation="--disable-bias-linear",
                                    roles={SHAPE, SAME_MODEL, SUMMARY}, megatron=OFF)
    qk_layernorm: bool = setting(False, "norm on queries and keys", roles={SHAPE}, megatron=SWITCH)
    init_method_std: float = setting(0.02, "standard deviation of the weights' initialisation", above=0.0,
                                     roles={SAME_MODEL}, megatron=VALUE)
    hidden_dropout: float = setting(0.0, "dropout after attention and MLP, in [0, 1)", minimum=0.0, below=1.0,
                                    roles={SAME_MODEL}, megatron=VALUE)
    attention_dropout: float = setting(
        0.0, "dropout of the attention probabilities, in [0, 1) (Lighthouse layers need 0)", minimum=0.0,
        below=1.0, roles={SAME_MODEL}, megatron=VALUE)


_SCHEDULE = frozenset({SCHEDULE, CONTINUED})


@dataclass
class Schedule:
    TITLE: ClassVar[str] = "training schedule and optimizer"

    micro_batch_size: int = setting(1, "samples per forward pass on each data-parallel rank", minimum=1,
                                    roles={SAME_MODEL, SUMMARY}, megatron=VALUE)
    global_batch_size: int | None = setting(
        None, "samples per iteration, over all ranks (gradient accumulation makes up the rest)", minimum=1,
        derived="--micro-batch-size x data-parallel size", roles=_SCHEDULE | {SUMMARY}, megatron=VALUE)
    train_iters: int = setting(100, "iterations of the whole schedule", minimum=1,
                               roles=_SCHEDULE | {SUMMARY}, megatron=VALUE)
    lr: float = setting(3e-4, "peak learning rate", minimum=0.0, roles=_SCHEDULE | {SUMMARY}, megatron=VALUE)
    min_lr: float = setting(0.0, "learning rate at the end of the decay", minimum=0.0,
                            roles=_SCHEDULE | {SAME_MODEL}, megatron=VALUE)
    lr_warmup_iters: int = setting(0, "linear warm-up iterations", minimum=0, roles=_SCHEDULE, megatron=VALUE)
    lr_warmup_init: float = setting(0.0, "learning rate at the start of the warm-up", minimum=0.0,
                                    megatron=VALUE)
    lr_decay_iters: int | None = setting(None, "iteration at which the decay reaches --min-lr", minimum=1,
                                         derived="= --train-iters", roles={SCHEDULE}, megatron=VALUE)
    lr_decay_style: str = setting(
        "cosine", "WSD: constant after warm-up, then --lr-wsd-decay-style over the last --lr-wsd-decay-iters "
        "iterations before --lr-decay-iters", choices=LR_DECAY_STYLES, roles=_SCHEDULE | {SAME_MODEL},
        megatron=VALUE)
    lr_wsd_decay_style: str = setting("exponential", "the WSD anneal's shape, as Megatron-LM",
                                      choices=LR_WSD_DECAY_STYLES, roles={SCHEDULE}, megatron=VALUE)
    lr_wsd_decay_iters: int | None = setting(
        None, "iterations of the WSD anneal, before --lr-decay-iters", minimum=1,
        derived="none; needed by --lr-decay-style WSD", roles={SCHEDULE}, megatron=VALUE)
    override_opt_param_scheduler: bool = setting(
        False, "with --load: take the learning-rate and weight-decay schedule from these settings, not from "
        "the checkpoint (without it a different schedule is refused)",
        flag="--override-opt_param-scheduler", aliases=("--override-opt-param-scheduler",), negatable=False,
        megatron=SWITCH)  # the spelling every Megatron-LM release accepts
    weight_decay: float = setting(0.01, "AdamW weight decay", minimum=0.0, roles=_SCHEDULE | {SAME_MODEL},
                                  megatron=VALUE)
    adam_beta1: float = setting(0.9, "Adam beta1, in [0, 1)", minimum=0.0, below=1.0,
                                roles={SAME_MODEL, CONTINUED}, megatron=VALUE)
    adam_beta2: float = setting(0.999, "Adam beta2, in [0, 1)", minimum=0.0, below=1.0,
                                roles={SAME_MODEL, CONTINUED}, megatron=VALUE)
    adam_eps: float = setting(1e-8, "Adam epsilon", above=0.0, megatron=VALUE)
    clip_grad: float = setting(1.0, "clip the global gradient norm to this (0: no clipping)", minimum=0.0,
                               roles={SAME_MODEL}, megatron=VALUE)
    seed: int = setting(1234, "random seed (weights, data order, dropout)", minimum=0, megatron=VALUE)


@dataclass
class Layout:
    TITLE: ClassVar[str] = "parallel layout"

    tensor_model_parallel_size: int = setting(1, "TP", minimum=1, megatron=VALUE, render=True)
    context_parallel_size: int = setting(1, "CP", minimum=1, megatron=VALUE, render=True)


@dataclass
class Launch:
    TITLE: ClassVar[str] = "device, precision, stopping"

    device: str = setting("auto", "auto: CUDA when there is a GPU", choices=DEVICES)
    bf16: bool | None = setting(None, "bf16 weights with fp32 master weights", roles={SUMMARY},
                                derived="on with CUDA, off on the CPU", megatron=SWITCH)
    check_for_nan_in_loss_and_grad: bool = setting(
        True, "stop (exit code 17) at an iteration whose loss or gradient norm is NaN or infinite, before "
        "that update and without saving it; checkpoints are checked finite before they are written")
    max_skipped_iters: int = setting(
        0, "with the check on: skip up to N such iterations (no update, the schedule waits) before stopping",
        metavar="N", minimum=0)
    exit_signal_handler: bool = setting(
        True, "on SIGTERM or SIGINT: finish the iteration, save a checkpoint (with --save), exit with 128 + "
        "the signal number; a second signal exits at once")


@dataclass
class Data:
    TITLE: ClassVar[str] = "data"

    data_path: list[str] | None = setting(
        None, "Megatron indexed dataset prefix(es) (PREFIX.bin/.idx), optionally weighted: '0.7 A 0.3 B'",
        metavar="PREFIX", megatron=VALUE, render=True,
        render_help="Megatron indexed dataset prefix (PREFIX.bin/.idx); required unless mock_data")
    mock_data: bool = setting(False, "megatron-core's MockGPTDataset instead of --data-path", negatable=False,
                              megatron=SWITCH)
    valid_data_path: list[str] | None = setting(
        None, "held-out data instead of --split's validation share: --data-path then trains on all its "
        "documents, and the held-out sequences are the same for every --seed", metavar="PREFIX")
    split: str = setting("969,30,1", "train,valid,test weights (not used with --valid-data-path)",
                         roles={SAME_MODEL}, megatron=VALUE)
    tokenizer_type: str = setting(
        "NullTokenizer", "token ids are used as they are; --vocab-size ids plus an end-of-document id",
        choices=("NullTokenizer",), megatron=VALUE)
    data_cache_path: str | None = setting(None, "where megatron-core caches its sample indices",
                                          metavar="DIR", derived="beside the data")


@dataclass
class Checkpoints:
    TITLE: ClassVar[str] = "evaluation, checkpoints, logging"

    # Megatron-LM has no "only at the end": `megatron_lm_args` writes --train-iters then.
    eval_interval: int | None = setting(None, "evaluate every N iterations", derived="only at the end",
                                        minimum=1)
    eval_iters: int = setting(2, "held-out global batches per evaluation (0: no evaluation)", minimum=0,
                              roles={SAME_MODEL}, megatron=VALUE)
    save: str | None = setting(None, "checkpoint directory (none: nothing saved)", metavar="DIR")
    save_interval: int | None = setting(None, "save every N iterations", minimum=1,
                                        derived="only at the end (and at --exit-interval)")
    load: str | None = setting(
        None, "resume from this checkpoint directory; it must exist (an empty one, or --load = --save, "
        "starts from scratch: a requeued job before its first save)", metavar="DIR")
    exit_interval: int | None = setting(None, "stop, and save, after iteration N", minimum=1)
    force: bool = setting(False, "replace checkpoints of the same iteration that already exist in --save",
                          negatable=False)
    # Checked with its own message (what the number means), not by `minimum`.
    save_retain: int | None = setting(
        None, "keep the last N checkpoints in --save (and the one --load read); remove older ones",
        metavar="N", derived="keep all")
    no_verify: bool = setting(False, "skip checking the --load checkpoint's files against its manifest",
                              negatable=False)
    log_interval: int = setting(1, "log every N iterations", minimum=1)
    tensorboard_dir: str | None = setting(None, "TensorBoard event files", metavar="DIR",
                                          derived="SAVE/tensorboard with --save, else none")
    metrics_file: str | None = setting(None, "JSONL, one record per log", metavar="FILE",
                                       derived="SAVE/metrics.jsonl with --save, else none")
    progress: bool | None = setting(None, "progress bar", derived="when stderr is a terminal")
    wandb_project: str | None = setting(
        None, "log to Weights & Biases in this project too (pip install 'lighthouse-megatron[wandb]'; "
        "WANDB_MODE=offline writes locally)", metavar="NAME")
    wandb_exp_name: str | None = setting(None, "the W&B run's name", metavar="NAME",
                                         derived="W&B's generated name")
    wandb_save_dir: str | None = setting(None, "W&B's local files", metavar="DIR",
                                         derived="SAVE/wandb with --save, else W&B's ./wandb")


# The tree, in the order of `train --help`.
GROUPS = (Model, Schedule, Data, Checkpoints, Layout, Launch)


@functools.cache
def train_specs() -> dict[str, Spec]:
    """Every setting of the trainer's own groups (not the Lighthouse launch settings)."""
    return merged(*(specs(group) for group in GROUPS))


def defaults() -> dict[str, object]:
    """The trainer's defaults by setting (None: derived or off)."""
    return {name: s.default for name, s in train_specs().items()}
