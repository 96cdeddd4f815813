"""The training loop: megatron-core's GPTModel, datasets, optimizer and scheduler on one machine.

Loss: the mean cross-entropy over every target token of the global batch, whatever the
data-parallel (DP), context-parallel (CP) and micro-batch split: each rank backpropagates
its token-loss sum divided by the global token count, and gradients are summed over the
DP x CP group (megatron-core's `calculate_per_token_loss` mode). DP = 2 and DP = 1 with
the same global batch therefore train the same model, up to summation order.

Two engines (`CudaEngine`, `CpuEngine`), one checkpoint format:
- CUDA: megatron-core's DistributedDataParallel and `get_megatron_optimizer` (bf16 weights,
  fp32 master weights, like Megatron-LM's `--bf16`), Transformer Engine layers when TE imports.
- CPU: megatron-core's FP32Optimizer around torch AdamW with megatron-core's parameter
  groups (what `get_megatron_optimizer` builds without TE/apex; see `lighthouse_megatron/megatron/cpu.py`
  for why it is not called directly), gradients summed with one all-reduce per iteration.
"""

from __future__ import annotations

import abc
import contextlib
import functools
import inspect
import logging
import math
import os
import random
import re
import signal
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from ..data import null_tokenizer
from ..megatron import LighthouseCoreAttention, get_gpt_decoder_block_spec, lighthouse_config_from_args
from ..megatron.cpu import cpu_rotary_embedding, make_cpu_optimizer
from ..megatron.model import attention_spans, gpt_model
from ..megatron.model import transformer_config as model_config
from ..megatron.schedule import forced_dense, set_iteration
from ..settings.checks import ALL_VALID, check_cpu_memory, padded_vocab_size
from ..settings.files import writable_dir_problem, writable_file_problem
from ..settings.lighthouse import lighthouse_warnings, recipe_schedule_from_args
from ..settings.train import changed_settings, settings_args
from . import checkpointing
from .logger import MetricsLogger, output_paths


@dataclass
class TrainResult:
    """What a run did. `train` and `evals` hold the records also written as JSONL."""

    start_iteration: int
    iteration: int
    train: list[dict] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    switches: list[dict] = field(default_factory=list)
    checkpoints: list[str] = field(default_factory=list)


# megatron.core.rerun_state_machine.EXIT_CODE_FAILED_ON_RESULT_VALIDATION: Megatron-LM's exit
# code for a run stopped by its NaN/Inf check.
EXIT_CODE_DIVERGED = 17


class TrainingDiverged(RuntimeError):
    """The loss or the gradient norm became NaN or infinite (--check-for-nan-in-loss-and-grad);
    the run stopped before that update and saved nothing after it. `exit_code` is 17."""

    exit_code = EXIT_CODE_DIVERGED


class TrainingStopped(Exception):
    """SIGTERM or SIGINT stopped the run at the end of an iteration (--exit-signal-handler),
    after saving a checkpoint when there is --save. `exit_code` is 128 + the signal number,
    what a shell and Slurm report for a process ended by that signal."""

    def __init__(self, message: str, signum: int, iteration: int, checkpoint: str | None):
        super().__init__(message)
        self.signum, self.iteration, self.checkpoint = signum, iteration, checkpoint
        self.exit_code = 128 + signum


# ----------------------------------------------------------------------------- setup


def init_distributed(args) -> bool:
    """Process group (torchrun's env://, else a one-process group) and megatron-core's
    parallel state. Returns True when this call created the process group."""
    created = False
    if not dist.is_initialized():
        backend = "nccl" if args.device == "cuda" else "gloo"
        if args.device == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        if "RANK" in os.environ and "MASTER_ADDR" in os.environ:
            dist.init_process_group(backend)
        else:
            # One process: an in-process store, no port that another job could take first.
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        created = True
    if dist.get_world_size() != args.world_size:
        raise ValueError(f"the process group has {dist.get_world_size()} ranks, the settings expect "
                         f"{args.world_size} (WORLD_SIZE)")
    sizes = (args.tensor_model_parallel_size, args.context_parallel_size)
    if parallel_state.model_parallel_is_initialized():
        current = (parallel_state.get_tensor_model_parallel_world_size(),
                   parallel_state.get_context_parallel_world_size())
        if current != sizes:
            parallel_state.destroy_model_parallel()
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=sizes[0],
                                                 context_parallel_size=sizes[1])
    return created


def set_seed(args) -> None:
    """Megatron-LM's _set_random_seed (one pipeline stage, no per-DP-rank init)."""
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    if args.device == "cuda":
        tensor_parallel.model_parallel_cuda_manual_seed(args.seed)


def transformer_config(args):
    """The model's TransformerConfig: the package's one builder on the arguments a checkpoint
    of this run stores, with the trainer's layout, dropout, dtype and (off) fusions."""
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    return model_config(
        vars(checkpointing.checkpoint_args(args)), dtype=dtype, cpu_init=args.device == "cpu",
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        context_parallel_size=args.context_parallel_size, hidden_dropout=args.hidden_dropout,
        attention_dropout=args.attention_dropout, bf16=args.bf16, pipeline_dtype=dtype,
        calculate_per_token_loss=True, bias_activation_fusion=False, masked_softmax_fusion=False,
        persist_layer_norm=False, bias_dropout_fusion=False, apply_rope_fusion=False,
        gradient_accumulation_fusion=False, cp_comm_type="p2p" if args.context_parallel_size > 1 else None,
    )


def build_model(args, config):
    """GPTModel with this package's block spec (unwrapped: the module checkpoints hold)."""
    lighthouse = lighthouse_config_from_args(args) if args.attention_impl == "lighthouse" else None
    spec = get_gpt_decoder_block_spec(
        config, attention_impl=args.attention_impl, lighthouse=lighthouse,
        use_te=None if args.device == "cuda" else False, schedule=recipe_schedule_from_args(args),
    )
    model = gpt_model(args, config, spec, padded_vocab_size(args))
    if args.device == "cpu":
        cpu_rotary_embedding(model)
    else:
        model.cuda(torch.cuda.current_device())
    return model


def optimizer_config(args):
    from megatron.core.optimizer import OptimizerConfig

    return OptimizerConfig(
        optimizer="adam", lr=args.lr, min_lr=args.min_lr, weight_decay=args.weight_decay,
        adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2, adam_eps=args.adam_eps,
        clip_grad=args.clip_grad, bf16=args.bf16, params_dtype=torch.bfloat16 if args.bf16 else torch.float32,
        use_distributed_optimizer=False,
    )


def scheduler_for(args, optimizer):
    """Megatron-LM's get_optimizer_param_scheduler for iteration-based training (steps are samples)."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    gbs = args.global_batch_size
    return OptimizerParamScheduler(
        optimizer, init_lr=args.lr_warmup_init, max_lr=args.lr, min_lr=args.min_lr,
        lr_warmup_steps=args.lr_warmup_iters * gbs, lr_decay_steps=args.lr_decay_iters * gbs,
        lr_decay_style=args.lr_decay_style, start_wd=args.weight_decay, end_wd=args.weight_decay,
        wd_incr_steps=args.train_iters * gbs, wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=False,
        override_opt_param_scheduler=args.override_opt_param_scheduler,
        wsd_decay_steps=None if args.lr_wsd_decay_iters is None else args.lr_wsd_decay_iters * gbs,
        lr_wsd_decay_style=args.lr_wsd_decay_style,
    )


class Engine(abc.ABC):
    """Model, optimizer and scheduler; `CudaEngine` and `CpuEngine` reduce the gradients."""

    model: torch.nn.Module  # unwrapped: what checkpoints hold
    runner: torch.nn.Module  # what runs forward and backward

    def __init__(self, args, optimizer):
        self.args = args
        self.optimizer = optimizer
        self.scheduler = scheduler_for(args, optimizer)

    def zero_grad(self):
        self.optimizer.zero_grad()

    @abc.abstractmethod
    def reduce_grads(self):
        """Sum the gradients over the data- and context-parallel ranks."""

    def step(self, loss: float) -> tuple[bool, float | None]:
        """Clip, update, advance the schedule; returns (updated, grad norm). With
        --check-for-nan-in-loss-and-grad a loss or gradient norm that is NaN or infinite
        leaves the weights, the optimizer state and the schedule as they were."""
        self.reduce_grads()
        if self.args.check_for_nan_in_loss_and_grad:
            # megatron-core's step() clips and updates in one call, and an update with NaN
            # gradients writes NaN into the weights and Adam's moments: the norm is taken
            # first (prepare_grads and the norm are recomputed by step(), the same values).
            self.optimizer.prepare_grads()
            grad_norm = float(self.optimizer.get_grad_norm())
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                return False, grad_norm
        ok, norm, _ = self.optimizer.step()
        if ok:
            self.scheduler.step(increment=self.args.global_batch_size)
        if norm is None and self.args.check_for_nan_in_loss_and_grad:
            norm = grad_norm  # --clip-grad 0: megatron-core computes none
        return ok, norm

    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]


class CudaEngine(Engine):
    """megatron-core's DistributedDataParallel and `get_megatron_optimizer` (bf16 under Float16Module)."""

    def __init__(self, args, config):
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.optimizer import get_megatron_optimizer
        from megatron.core.transformer.module import Float16Module

        self.model = build_model(args, config)
        wrapped = Float16Module(config, self.model) if args.bf16 else self.model
        ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                                   use_distributed_optimizer=False)
        self.runner = DistributedDataParallel(config=config, ddp_config=ddp_config, module=wrapped)
        super().__init__(args, get_megatron_optimizer(optimizer_config(args), [self.runner]))

    def zero_grad(self):
        self.runner.zero_grad_buffer()
        super().zero_grad()

    def reduce_grads(self):
        from megatron.core.distributed import finalize_model_grads

        finalize_model_grads([self.runner])  # DDP sums (per-token-loss mode: no scaling)


class CpuEngine(Engine):
    """The fp32 model itself, megatron-core's FP32Optimizer (see `lighthouse_megatron.megatron.cpu`),
    gradients summed with one all-reduce."""

    def __init__(self, args, config):
        self.model = self.runner = build_model(args, config)
        super().__init__(args, make_cpu_optimizer(self.model, optimizer_config(args)))

    def reduce_grads(self):
        group = parallel_state.get_data_parallel_group(with_context_parallel=True)
        if group.size() > 1:
            grads = [p.grad for p in self.model.parameters() if p.grad is not None]
            flat = torch._utils._flatten_dense_tensors(grads)
            dist.all_reduce(flat, group=group)
            for g, reduced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads), strict=True):
                g.copy_(reduced)


def make_engine(args, config) -> Engine:
    return CudaEngine(args, config) if args.device == "cuda" else CpuEngine(args, config)


# ------------------------------------------------------------------------------ data


# The held-out set of --valid-data-path is sampled with this seed, not --seed: every seed and
# every run evaluates the same sequences, so their losses compare directly.
HELDOUT_SEED = 1234


def build_datasets(args):
    """(train, valid) GPT datasets, sized as Megatron-LM's provider sizes them."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset
    from megatron.core.datasets.utils import get_blend_from_list

    def config(data_path, split, seed):
        return GPTDatasetConfig(
            random_seed=seed, sequence_length=args.seq_length,
            blend=get_blend_from_list(data_path) if data_path else None, split=split,
            path_to_cache=args.data_cache_path, tokenizer=null_tokenizer(args.vocab_size),
            reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False,
            create_attention_mask=False, mmap_bin_files=True,
        )

    gbs = args.global_batch_size
    evals = args.eval_iters * (args.train_iters // args.eval_interval + 1 if args.eval_interval else 1)
    sizes = [args.train_iters * gbs, evals * gbs, args.eval_iters * gbs]
    cls = MockGPTDataset if args.mock_data else GPTDataset
    if args.mock_data:  # mock indices are rebuilt each run; megatron-core warns it cannot cache them
        logging.getLogger("megatron.core.datasets.gpt_dataset").setLevel(logging.ERROR)
    build = lambda cfg, n: BlendedMegatronDatasetBuilder(cls, n, lambda: True, cfg).build()  # noqa: E731
    train, valid, _ = build(config(args.data_path, args.split, args.seed), sizes)
    if args.valid_data_path:  # only the first eval_iters batches are read, at every evaluation
        _, valid, _ = build(config(args.valid_data_path, ALL_VALID, HELDOUT_SEED), [0, sizes[2], 0])
    return train, valid


def microbatches(dataset, args, consumed: int, device: str):
    """This rank's micro-batches of one global batch starting at sample `consumed`, in
    Megatron's MegatronPretrainingSampler order, sliced for context parallelism."""
    from megatron.core.utils import get_batch_on_this_cp_rank

    mbs, dp = args.micro_batch_size, args.data_parallel_size
    rank = parallel_state.get_data_parallel_rank()
    for j in range(args.global_batch_size // (mbs * dp)):
        start = consumed + j * mbs * dp + rank * mbs
        samples = [dataset[i] for i in range(start, start + mbs)]
        batch = {k: torch.stack([torch.as_tensor(s[k]) for s in samples]).to(device)
                 for k in ("tokens", "labels", "loss_mask", "position_ids")}
        if args.context_parallel_size > 1:
            cp_group = parallel_state.get_context_parallel_group()
            if "is_hybrid_cp" in inspect.signature(get_batch_on_this_cp_rank).parameters:  # core >= 0.19
                batch = get_batch_on_this_cp_rank(batch, False, cp_group=cp_group)
            else:
                batch = get_batch_on_this_cp_rank(batch, cp_group=cp_group)
        yield batch


def _token_losses(runner, batch):
    return runner(input_ids=batch["tokens"], position_ids=batch["position_ids"], attention_mask=None,
                  labels=batch["labels"]).float()


def _all_reduce(values: list[float], device: str) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
    return t.tolist()


def train_step(engine: Engine, dataset, args, consumed: int) -> tuple[float, float | None, bool]:
    """One iteration; returns (mean token loss over the global batch, grad norm, whether the
    weights were updated)."""
    batches = list(microbatches(dataset, args, consumed, args.device))
    (tokens,) = _all_reduce([float(sum(b["loss_mask"].sum().item() for b in batches))], args.device)
    engine.zero_grad()
    local = 0.0
    for batch in batches:
        loss_sum = (_token_losses(engine.runner, batch) * batch["loss_mask"]).sum()
        (loss_sum / tokens).backward()
        local += loss_sum.item()
    (total,) = _all_reduce([local], args.device)
    updated, grad_norm = engine.step(total / tokens)
    return total / tokens, grad_norm, updated


def parameters_finite(model) -> bool:
    """Whether every weight of every rank is finite (one flag reduced over all ranks)."""
    bad = any(not torch.isfinite(p).all() for p in model.parameters())
    flag = torch.tensor([float(bad)], device=next(model.parameters()).device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return flag.item() == 0


@torch.no_grad()
def switch_probe(engine: Engine, dataset, args, iteration: int) -> dict:
    """At the first dense iteration of an in-run switch: the loss of this iteration's batch
    under Lighthouse and under dense attention, same weights, before the update, in eval mode
    (no dropout: the probe draws no random numbers, so the run continues as without it); and
    `loss_one_dense`, the loss with only the r-th Lighthouse layer dense (depth order), which
    says where the spike comes from."""
    batches = list(microbatches(dataset, args, iteration * args.global_batch_size, args.device))
    engine.runner.eval()
    count = max((m.count for m in engine.model.modules() if isinstance(m, LighthouseCoreAttention)),
                default=0)
    stage1 = args.lighthouse_until_iter - 1
    # (the attention clock, the Lighthouse layers forced dense): stage 1's, dense, each layer alone
    runs = [(stage1, None), (iteration, None), *((stage1, [r]) for r in range(count))]
    totals = []
    for clock, ranks in runs:
        set_iteration(clock)
        with forced_dense(ranks) if ranks else contextlib.nullcontext():
            totals.append(sum((_token_losses(engine.runner, b) * b["loss_mask"]).sum().item()
                              for b in batches))
    set_iteration(iteration)
    engine.runner.train()
    tokens = float(sum(b["loss_mask"].sum().item() for b in batches))
    *totals, tokens = _all_reduce([*totals, tokens], args.device)
    return {"kind": "switch", "iteration": iteration + 1, "loss_lighthouse": totals[0] / tokens,
            "loss_dense": totals[1] / tokens, "loss_one_dense": [t / tokens for t in totals[2:]]}


@torch.no_grad()
def evaluate(engine: Engine, dataset, args) -> float:
    """Mean token loss over the first `eval_iters` global batches of the held-out split
    (the same batches at every evaluation, so the numbers compare across a run), with the
    attention the model runs at the current iteration."""
    engine.runner.eval()
    total = tokens = 0.0
    for i in range(args.eval_iters):
        for batch in microbatches(dataset, args, i * args.global_batch_size, args.device):
            total += (_token_losses(engine.runner, batch) * batch["loss_mask"]).sum().item()
            tokens += batch["loss_mask"].sum().item()
    engine.runner.train()
    total, tokens = _all_reduce([total, tokens], args.device)
    return total / tokens


def evaluate_dense(engine: Engine, dataset, args) -> float:
    """`evaluate` with every Lighthouse layer computing dense attention."""
    with forced_dense():
        return evaluate(engine, dataset, args)


# ------------------------------------------------------------------- trained models


def checkpoint_eval_args(root: str, device: str = "auto"):
    """The settings stored in trainer checkpoint `root`, validated again for evaluating its
    model here: one process (TP = CP = 1: torch_dist checkpoints reshard), `device`, bf16 as
    the device implies, no data and nothing written."""
    _, stored = checkpointing.read_checkpoint_args(root)
    if stored is None:
        raise ValueError(f"{root}: the checkpoint stores no arguments to rebuild its model from")
    here = dict(recipe=None, lighthouse_config=None, device=device, bf16=None, load=None, save=None,
                data_path=None, mock_data=True, tensor_model_parallel_size=1, context_parallel_size=1,
                metrics_file=None, tensorboard_dir=None, save_interval=None, exit_interval=None,
                data_cache_path=None, wandb_project=None, wandb_exp_name=None, wandb_save_dir=None)
    # Checkpoints written before NOT_STORED existed still hold the writer's machine settings.
    stored = {k: v for k, v in vars(stored).items() if k not in checkpointing.NOT_STORED}
    return settings_args({**stored, **here}, world_size=1)


@contextlib.contextmanager
def checkpoint_model(root: str, device: str = "auto"):
    """`with checkpoint_model(root) as (model, args, iteration)`: the model of trainer
    checkpoint `root`, weights loaded, in eval mode, wrapped as training runs it (bf16 under
    Float16Module), so `model(input_ids=..., position_ids=..., attention_mask=None)` gives
    the logits the trainer's evaluation sees (`labels=...`: the per-token losses). A
    one-process group lives for the block when none exists."""
    args = checkpoint_eval_args(root, device)
    with process_group(args):
        set_seed(args)
        config = transformer_config(args)
        model = build_model(args, config)
        args.load = root
        iteration = checkpointing.load_checkpoint(args, model, None, None)
        if args.bf16:
            from megatron.core.transformer.module import Float16Module

            model = Float16Module(config, model)
        model.eval()
        yield model, args, iteration


# ------------------------------------------------------------------------------ loop


def planned_saves(args, start: int) -> list[int]:
    stop = args.train_iters
    if args.exit_interval:
        stop = next(i for i in range(start + 1, stop + 1) if i % args.exit_interval == 0 or i == stop)
    saves = {i for i in range(start + 1, stop + 1) if args.save_interval and i % args.save_interval == 0}
    return sorted(saves | {stop}) if args.save else []


def _first_rank() -> bool:
    """Rank 0, before a process group exists (torchrun's RANK)."""
    return int(os.environ.get("RANK", "0")) == 0


def _check_fresh_start(load: str, save: str | None) -> None:
    """--load without a checkpoint starts from scratch only where that is a job's first start:
    an empty folder, or the --save folder before its first save. Anything else (an iteration
    folder, a parent of checkpoints, an export) is a mistake that would lose the run."""
    entries = sorted(os.listdir(load)) if os.path.isdir(load) else []
    if not entries or _same_path(load, save):
        return
    below = [e for e in entries if checkpointing.read_tracker(os.path.join(load, e)) is not None]
    if re.fullmatch(r"iter_\d+", os.path.basename(os.path.normpath(load))):
        hint = f"give the folder that holds it: --load {os.path.dirname(os.path.normpath(load)) or '.'}"
    elif below:
        hint = f"did you mean --load {os.path.join(load, below[0])}?"
    else:
        hint = "give the checkpoint directory to resume from (an empty directory, or the --save directory, " \
               "starts from scratch)"
    shown = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
    raise ValueError(f"--load {load} holds no checkpoint (no {checkpointing.TRACKER}) but is not empty "
                     f"({shown}); {hint}")


def prepare(args) -> int:
    """Checks that need the file system (checkpoints, output folders); returns the starting
    iteration. Rank 0 also checks that every output location can be written (nothing is
    left there), removes what a killed save left in --save, checks the --load checkpoint's
    files against its manifest (torchrun stops the other ranks if that fails) and warns
    about settings that make no sense together."""
    start = 0
    if _first_rank():
        check_cpu_memory(args)
        check_outputs(args)
        for warning in lighthouse_warnings(args):
            print(warning, file=sys.stderr, flush=True)
    if args.save and _first_rank():
        for path in checkpointing.remove_leftovers(args.save):
            print(f"removed {path}: left by a save that did not finish", flush=True)
    if args.load and not os.path.exists(args.load) and not _same_path(args.load, args.save):
        # A typo would otherwise start from scratch. An existing empty folder, or --load = --save
        # (which the first save creates), is a job's first start before its first checkpoint.
        raise ValueError(f"--load {args.load} does not exist; give the checkpoint directory to resume "
                         "from (an empty directory, or the --save directory, starts from scratch)")
    if args.load:
        if checkpointing.read_tracker(args.load) is None:
            _check_fresh_start(args.load, args.save)
            print(f"note: --load {args.load} holds no checkpoint yet; starting from scratch", flush=True)
        else:
            start, ckpt_args = checkpointing.read_checkpoint_args(args.load)
            checkpointing.check_checkpoint_args(args, ckpt_args, args.load)
            if _first_rank():
                line = ("not verified: --no-verify" if args.no_verify
                        else checkpointing.verify_checkpoint(args.load))
                print(f"--load {args.load}: {line}", flush=True)
    if start >= args.train_iters:
        raise ValueError(f"--load {args.load} is at iteration {start}, already >= --train-iters "
                         f"{args.train_iters}")
    if args.save and not args.force:
        existing = [checkpointing.iteration_dir(args.save, i) for i in planned_saves(args, start)
                    if os.path.exists(checkpointing.iteration_dir(args.save, i))]
        if existing:
            raise ValueError(f"--save {args.save}: {existing[0]} already exists; pass --force to replace it, "
                             "or --load the run to continue it")
    return start


def _same_path(a: str | None, b: str | None) -> bool:
    return bool(a and b) and os.path.abspath(a) == os.path.abspath(b)


def check_outputs(args) -> None:
    """ValueError naming the setting when a folder or file the run writes cannot be written
    (a read-only or special location, a file where a folder belongs), before anything runs."""
    paths = output_paths(args)
    folders = [("--save", args.save), ("--data-cache-path", args.data_cache_path),
               ("--tensorboard-dir", paths.tensorboard_dir), ("--wandb-save-dir", paths.wandb_dir)]
    for flag, path in folders:
        problem = path and writable_dir_problem(path)
        if problem:
            raise ValueError(f"{flag} {path}: {problem}{_derived(args, flag)}")
    problem = paths.metrics_file and writable_file_problem(paths.metrics_file)
    if problem:
        raise ValueError(f"--metrics-file {paths.metrics_file}: {problem}{_derived(args, '--metrics-file')}")


def _derived(args, flag: str) -> str:
    """Where a location nobody typed comes from."""
    if getattr(args, flag[2:].replace("-", "_"), None) or flag in ("--save", "--data-cache-path"):
        return ""
    return f" (the default under --save {args.save})"


def startup_summary(args, model) -> list[str]:
    """What rank 0 prints before training: the settings that differ from the defaults, the
    parameter count and which attention each layer runs."""
    changed = changed_settings(args)
    params = sum(p.numel() for p in model.parameters())
    per_rank = " per tensor-parallel rank" if args.tensor_model_parallel_size > 1 else ""
    kinds = ["lighthouse" if isinstance(layer.self_attention.core_attention, LighthouseCoreAttention)
             else "dense" for layer in model.decoder.layers]
    until = f" (dense from iteration {args.lighthouse_until_iter})" \
        if args.lighthouse_until_iter is not None and "lighthouse" in kinds else ""
    return [f"settings (not the defaults): {', '.join(changed) or 'none'}",
            f"model: {params:,} parameters{per_rank}, {args.world_size} process(es), device {args.device}",
            f"attention: {attention_spans(kinds)}{until}"]


def _attention_now(args, iteration: int) -> str:
    """What the training iteration runs: 'dense', 'lighthouse' or 'mixed (d/G dense)' (the
    progressive switch); k when it grows."""
    if args.attention_impl == "dense":
        return "dense"
    schedule = recipe_schedule_from_args(args)
    config = lighthouse_config_from_args(args)
    count = args.num_layers - len(config.resolve_dense_layers(args.num_layers))
    what = schedule.describe(iteration, count)
    if schedule.grow_topk_iters and what != "dense":
        ladder = schedule.check_against(config, args.seq_length, args.context_parallel_size)
        what += f" (k={schedule.config_at(config, iteration, ladder).topk})"
    return what


def run(args) -> TrainResult:
    """Train as `args` (from `parse_args`) says; see the package docstring."""
    prepare(args)
    with process_group(args):
        return train_loop(args)


@contextlib.contextmanager
def process_group(args):
    """The process group and megatron-core's parallel state for the block (`init_distributed`);
    what this call created it destroys afterwards."""
    created = init_distributed(args)
    try:
        yield
    finally:
        if created:
            parallel_state.destroy_model_parallel()
            dist.destroy_process_group()


class StopSignals:
    """Megatron-LM's --exit-signal-handler for SIGTERM and SIGINT: the first signal asks the
    loop to stop at the end of the current iteration (`requested`), a second one ends the
    process at once (SIGINT as KeyboardInterrupt, SIGTERM by its default action).

    Under torchrun, and under Slurm, one signal reaches a worker twice (directly and
    forwarded by torchrun) within milliseconds; a repeat within `repeat_window` seconds is
    that same signal, not a second one."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, enabled: bool, repeat_window: float = 2.0):
        self.enabled, self.repeat_window = enabled, repeat_window
        self.received: int | None = None
        self._at = 0.0
        self._saved: dict = {}

    def __enter__(self):
        if self.enabled:
            try:
                self._saved = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
            except ValueError:  # not the main thread: signals stay as they are
                self._saved = {}
        return self

    def __exit__(self, *exc):
        for sig, handler in self._saved.items():
            signal.signal(sig, handler)
        self._saved = {}

    def _handle(self, signum, frame):
        now = time.monotonic()
        if self.received is None:
            self.received, self._at = signum, now
            return
        if now - self._at < self.repeat_window:
            return
        self.__exit__()
        os.write(2, f"\nsecond {signal.Signals(signum).name}: exiting now, without a checkpoint\n".encode())
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    def requested(self, device: str) -> int | None:
        """The signal that asked to stop, agreed by every rank (one collective when there are several)."""
        if not (dist.is_initialized() and dist.get_world_size() > 1):
            return self.received
        flag = torch.tensor([self.received or 0], dtype=torch.int64, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item()) or None


def train_loop(args) -> TrainResult:
    """The training iterations, after `prepare` and inside `process_group`."""
    set_seed(args)
    config = transformer_config(args)
    engine = make_engine(args, config)
    start = 0
    args.consumed_train_samples = args.consumed_valid_samples = 0
    if args.load and checkpointing.read_tracker(args.load) is not None:
        start = checkpointing.load_checkpoint(args, engine.model, engine.optimizer, engine.scheduler)
        args.loaded_iteration = start
    first = dist.get_rank() == 0
    if first:
        print("\n".join(startup_summary(args, engine.model)), flush=True)
    train_ds, valid_ds = build_datasets(args)
    log = MetricsLogger(args, start, enabled=first)
    if start and first:
        log.note(f"resumed from iteration {start} of {args.load}")
    result = TrainResult(start_iteration=start, iteration=start)
    save = functools.partial(_save, args, engine, log, result)
    tokens_per_iter = args.global_batch_size * args.seq_length
    iteration = start
    skipped = 0
    try:
        with StopSignals(args.exit_signal_handler) as signals:
            while iteration < args.train_iters:
                set_iteration(iteration)
                attention = _attention_now(args, iteration)
                switching = args.attention_impl == "lighthouse" and iteration == args.lighthouse_until_iter
                if switching and iteration:
                    rec = switch_probe(engine, train_ds, args, iteration)
                    log.log(rec)
                    result.switches.append(rec)
                lr = engine.lr()  # the rate this iteration uses; the scheduler then moves on
                t0 = time.perf_counter()
                consumed = iteration * args.global_batch_size
                loss, grad_norm, updated = train_step(engine, train_ds, args, consumed)
                elapsed = time.perf_counter() - t0
                iteration += 1
                args.consumed_train_samples = iteration * args.global_batch_size
                result.iteration = iteration
                log.advance()
                if iteration % args.log_interval == 0 or iteration == args.train_iters or not updated:
                    rec = {"kind": "train", "iteration": iteration, "loss": loss, "lr": lr,
                           "grad_norm": None if grad_norm is None else float(grad_norm),
                           "tokens_per_s": tokens_per_iter / elapsed, "time_per_iter_s": elapsed,
                           "attention": attention, **({} if updated else {"skipped": True})}
                    log.log(rec)
                    result.train.append(rec)
                if not updated:
                    skipped += 1
                    _skipped_update(args, log, result, iteration, skipped, loss, grad_norm)
                done = iteration == args.train_iters
                exiting = _every(args.exit_interval, iteration)
                if args.eval_iters and (done or _every(args.eval_interval, iteration)):
                    _evaluate(args, engine, valid_ds, log, result, iteration)
                due = done or exiting or _every(args.save_interval, iteration)
                saved = save(iteration) if args.save and due else None
                stop = signals.requested(args.device) if args.exit_signal_handler else None
                if stop and not done:
                    if args.save and saved is None:
                        saved = save(iteration)
                    raise TrainingStopped(_stopped(args, stop, iteration, saved), stop, iteration, saved)
                if exiting:
                    break
    finally:
        log.close()
        set_iteration(0)
    return result


def _evaluate(args, engine, valid_ds, log, result: TrainResult, iteration: int) -> None:
    """The held-out loss under Lighthouse and dense attention (dense only once every layer is)."""
    set_iteration(iteration)
    stage2 = args.attention_impl == "dense" or recipe_schedule_from_args(args).all_dense(iteration)
    for kind in ["dense"] if stage2 else ["lighthouse", "dense"]:
        loss = (evaluate_dense if kind == "dense" else evaluate)(engine, valid_ds, args)
        rec = {"kind": "eval", "iteration": iteration, "attention": kind, "loss": loss}
        log.log(rec)
        result.evals.append(rec)


def _save(args, engine, log, result: TrainResult, iteration: int) -> str:
    """Save `iteration` (refused where --check-for-nan-in-loss-and-grad finds non-finite weights);
    returns the checkpoint's path."""
    if args.check_for_nan_in_loss_and_grad and not parameters_finite(engine.model):
        raise TrainingDiverged(_diverged(args, iteration, "the weights are NaN or infinite", result, False))
    path = checkpointing.save_checkpoint(args, iteration, engine.model, engine.optimizer, engine.scheduler)
    result.checkpoints.append(path)
    if dist.get_rank() == 0:
        log.note(f"saved checkpoint {path} (iteration {iteration}, with its manifest)")
    return path


def _every(interval: int | None, iteration: int) -> bool:
    """Whether an action every `interval` iterations (eval, save, exit) falls on `iteration`; never
    without an interval."""
    return bool(interval) and iteration % interval == 0


def _skipped_update(args, log, result: TrainResult, iteration: int, skipped: int, loss: float,
                    grad_norm: float | None) -> None:
    """A non-finite loss or gradient norm skipped this iteration's update: say so, or stop once more
    than --max-skipped-iters have been skipped."""
    what = " and ".join(f"the {name} is {value:.4g}" for name, value in
                        (("loss", loss), ("gradient norm", grad_norm))
                        if value is not None and not math.isfinite(value))
    if skipped > args.max_skipped_iters:
        raise TrainingDiverged(_diverged(args, iteration, what, result, True))
    log.note(f"iteration {iteration}: {what}: update skipped ({skipped} of "
             f"--max-skipped-iters {args.max_skipped_iters})")


def _diverged(args, iteration: int, detail: str, result: TrainResult, skippable: bool) -> str:
    if result.checkpoints:
        kept = f"the last checkpoint is {result.checkpoints[-1]}"
    elif getattr(args, "loaded_iteration", None) is not None:
        loaded = checkpointing.iteration_dir(args.load, args.loaded_iteration)
        kept = f"this run saved none; it started from {loaded}"
    else:
        kept = "no checkpoint was saved"
    hint = "lower --lr" + (", or let --max-skipped-iters N skip up to N such iterations" if skippable else "")
    return (f"iteration {iteration}: {detail}: training diverged (--check-for-nan-in-loss-and-grad); "
            f"stopped before saving this state ({kept}); {hint}")


def _stopped(args, signum: int, iteration: int, saved: str | None) -> str:
    name = signal.Signals(signum).name
    if saved:
        return (f"{name}: stopped after iteration {iteration} and saved {saved}; resume with "
                f"--load {args.save}")
    return f"{name}: stopped after iteration {iteration}; nothing saved (no --save)"
