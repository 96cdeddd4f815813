"""Checkpoints in Megatron-LM's torch_dist layout, mirroring its `training/checkpointing.py`.

    SAVE/latest_checkpointed_iteration.txt      the last complete iteration, as text
    SAVE/iter_0000100/                          megatron-core dist_checkpointing (torch_dist)
        .metadata, __*_*.distcp, common.pt, metadata.json

Top-level keys, as Megatron-LM's `generate_state_dict` writes them: `args` (an
argparse.Namespace of plain values, Megatron-LM's names, with `consumed_train_samples`
for the data position), `checkpoint_version` (3.0), `iteration`, `model` (the model's
`sharded_state_dict`), `optimizer` (megatron-core's optimizer `sharded_state_dict`),
`opt_param_scheduler`, `rng_state` (a ShardedObject per TP/PP rank, replicated over DP,
holding Python, NumPy, torch, CUDA and Megatron RNG-tracker states). Megatron-LM's
`--load` reads it, and ours reads Megatron-LM's.

Saves are atomic: every rank writes into `SAVE/.iter_NNNNNNN.tmp`, rank 0 adds the manifest
(`lighthouse-manifest.json`: each file's size and hash) once every file is complete, renames
the folder to `iter_NNNNNNN` and rewrites the tracker file through a temporary name. The
save runs in the training processes (`in_process_save`): megatron-core would otherwise
start a results-queue server process that outlives a killed trainer. Loads go
through `torch.load(weights_only=True)` only (megatron-core registers the few safe
classes, argparse.Namespace and NumPy arrays): nothing in a checkpoint runs code.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import queue
import random
import re
import shutil
import signal
import sys

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject

from ..checkpoint.manifest import verification_line, verify_manifest, write_manifest
from ..checkpoint.reader import TRACKER, locate
from ..megatron.cpu import cpu_as_current_device
from ..settings.fields import MACHINE, SCHEDULE, SHAPE, Values, given, with_role
from ..settings.train import all_specs

CHECKPOINT_VERSION = 3.0
# Settings of the machine, not of the model: whoever loads the checkpoint chooses them.
NOT_STORED = with_role(all_specs(), MACHINE)
# What Megatron-LM's _build_sharded_state_dict_metadata stores for a non-distributed optimizer.
CONTENT_METADATA = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}


# What a save killed half-way leaves in SAVE (ours only): the save folder, a folder being
# removed by --save-retain, the tracker's temporary name.
_LEFTOVER = re.compile(r"^(\.iter_\d{7,}\.(tmp|del)|" + re.escape(TRACKER) + r"\.tmp)$")


def iteration_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def read_tracker(root: str | None) -> int | None:
    """The iteration `root`'s tracker names, None without one."""
    if not root:
        return None
    path = os.path.join(root, TRACKER)
    if not os.path.isfile(path):
        return None
    text = open(path).read().strip()
    if text == "release":
        return 0
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{path}: expected an iteration number or 'release', got {text[:40]!r}") from None


def _metadata() -> dict:
    dp_cp = parallel_state.get_data_parallel_group(with_context_parallel=True)
    return {**CONTENT_METADATA, "dp_cp_group": dp_cp}


def _rng_state(device: str) -> ShardedObject:
    state = {
        "random_rng_state": random.getstate(),
        "np_rng_state": np.random.get_state(),
        "torch_rng_state": torch.get_rng_state(),
        # Megatron-LM's keys; without CUDA there is no CUDA generator and no tracker state
        # (Megatron-LM then needs --no-load-rng to load a CPU checkpoint).
        "cuda_rng_state": torch.cuda.get_rng_state() if device == "cuda" else None,
        "rng_tracker_states": tensor_parallel.get_cuda_rng_tracker().get_states() if device == "cuda" else {},
    }
    tp = parallel_state.get_tensor_model_parallel_group()
    pp = parallel_state.get_pipeline_model_parallel_group()
    return ShardedObject("rng_state", [state], (pp.size(), tp.size()), (pp.rank(), tp.rank()),
                         replica_id=parallel_state.get_data_parallel_rank(with_context_parallel=True))


def _set_rng_state(state: dict, device: str) -> None:
    random.setstate(state["random_rng_state"])
    np.random.set_state(state["np_rng_state"])
    torch.set_rng_state(state["torch_rng_state"])
    if device == "cuda" and state.get("cuda_rng_state") is not None:
        torch.cuda.set_rng_state(state["cuda_rng_state"])
        if state.get("rng_tracker_states"):
            tensor_parallel.get_cuda_rng_tracker().set_states(state["rng_tracker_states"])


def checkpoint_args(args: argparse.Namespace) -> argparse.Namespace:
    """The arguments a checkpoint stores: plain values only (torch.load(weights_only=True)
    must read them), under Megatron-LM's names."""
    plain = (str, int, float, bool, type(None))
    out = argparse.Namespace()
    for key, value in sorted(vars(args).items()):
        if key in NOT_STORED:
            continue
        if isinstance(value, (list, tuple)) and all(isinstance(v, plain) for v in value):
            setattr(out, key, list(value))
        elif isinstance(value, plain):
            setattr(out, key, value)
    # Fields Megatron-LM's load reads or its --use-checkpoint-args copies.
    out.ckpt_format, out.use_dist_ckpt, out.use_distributed_optimizer = "torch_dist", True, False
    out.no_save_optim, out.no_save_rng = False, False
    out.group_query_attention = args.num_query_groups != args.num_attention_heads
    out.add_position_embedding = True  # Megatron-LM's default (it compares it on load), unused with RoPE
    out.add_qkv_bias = args.add_bias_linear
    out.layernorm_epsilon = args.norm_epsilon
    out.skipped_train_samples = 0
    out.spec = None
    return out


def _state_dict(args, model, optimizer, scheduler, iteration, rng, is_loading: bool = False) -> dict:
    """Megatron-LM's generate_state_dict for one model chunk and the torch_dist format."""
    state = {"args": checkpoint_args(args), "checkpoint_version": CHECKPOINT_VERSION, "iteration": iteration}
    state["model"] = model.sharded_state_dict(metadata=_metadata())
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(state["model"], is_loading=is_loading,
                                                          metadata=_metadata())
        state["opt_param_scheduler"] = scheduler.state_dict()
    if rng is not None:
        state["rng_state"] = rng
    return state


def _checkpointing_on(device: str):
    """dist_checkpointing's save/load on `device` ("cpu": no CUDA calls)."""
    return contextlib.nullcontext() if device == "cuda" else cpu_as_current_device()


def _barrier():
    if dist.is_initialized():
        dist.barrier()


_saver: int | None = None  # the pid of the process saving, while it saves


def _die_with_parent() -> None:
    """In a process forked during a save (megatron-core <= 0.18 forks one writer per file):
    the kernel kills it when the trainer dies (Linux), so a killed save leaves no orphans."""
    global _saver
    if _saver is not None and sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
        if os.getppid() != _saver:  # the parent died before prctl took effect
            os._exit(1)
        _saver = os.getpid()  # for a process this one forks


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_die_with_parent)


@contextlib.contextmanager
def in_process_save():
    """megatron-core 0.16-0.19's torch_dist writer collects its results through a queue it
    creates once per process with `multiprocessing.get_context("spawn").Manager()`: a server
    process that survives a SIGKILLed trainer (it never watches its parent) and, being
    spawned, re-imports the caller's `__main__` (a script without an
    `if __name__ == "__main__":` guard crashes there). A synchronous save puts and gets in the
    calling process, so a plain queue does the same job with no process."""
    global _saver
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    saved = getattr(filesystem_async, "_results_queue", None)
    filesystem_async._results_queue = queue.Queue()
    _saver = os.getpid()
    try:
        yield
    finally:
        _saver = None
        filesystem_async._results_queue = saved


def remove_leftovers(root: str | None) -> list[str]:
    """Remove what a killed save left in `root` (only this trainer's temporary names);
    returns what was removed."""
    if not root or not os.path.isdir(root):
        return []
    removed = []
    for name in sorted(os.listdir(root)):
        if _LEFTOVER.match(name):
            path = os.path.join(root, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.unlink(path)
            removed.append(path)
    return removed


def save_checkpoint(args, iteration: int, model, optimizer, scheduler) -> str:
    """Write SAVE/iter_NNNNNNN atomically (files, then their manifest) and point the tracker
    at it; returns its path."""
    root = args.save
    final = iteration_dir(root, iteration)
    tmp = os.path.join(root, f".iter_{iteration:07d}.tmp")
    if dist.get_rank() == 0:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # left by a run that died while saving
        os.makedirs(tmp)
    _barrier()
    state = _state_dict(args, model, optimizer, scheduler, iteration, _rng_state(args.device))
    with _checkpointing_on(args.device), in_process_save():
        dist_checkpointing.save(state, tmp, content_metadata=dict(CONTENT_METADATA))
    _barrier()
    if dist.get_rank() == 0:
        write_manifest(tmp)  # every rank's files are complete (the barrier above)
        old = None
        if os.path.exists(final):  # allowed by --force (checked before training)
            old = final + ".old"
            shutil.rmtree(old, ignore_errors=True)
            os.rename(final, old)
        os.rename(tmp, final)
        tracker_tmp = os.path.join(root, TRACKER + ".tmp")
        with open(tracker_tmp, "w") as f:
            f.write(str(iteration))
        os.replace(tracker_tmp, os.path.join(root, TRACKER))
        if old:
            shutil.rmtree(old)
        if args.save_retain:
            for path in retain(root, args.save_retain, protect=_loaded_dir(args)):
                print(f"removed {path} (--save-retain {args.save_retain})", flush=True)
    _barrier()
    return final


def _loaded_dir(args) -> str | None:
    if not args.load or getattr(args, "loaded_iteration", None) is None:
        return None
    return iteration_dir(args.load, args.loaded_iteration)


def retain(root: str, keep: int, protect: str | None = None) -> list[str]:
    """Keep the last `keep` iter_NNNNNNN folders of `root` (by iteration), the tracker's and
    `protect` (the checkpoint this run loaded); remove the others, each renamed out of the
    way first so that a kill mid-removal leaves no half iter_ folder. Returns the removed."""
    iters = sorted((int(m.group(1)), name) for name in os.listdir(root)
                   if (m := re.match(r"^iter_(\d{7,})$", name)))
    tracker = read_tracker(root)
    keep_names = {name for _, name in iters[-keep:]}
    keep_names |= {name for i, name in iters if i == tracker}
    if protect and os.path.realpath(os.path.dirname(protect)) == os.path.realpath(root):
        keep_names.add(os.path.basename(protect))
    removed = []
    for _, name in iters:
        if name not in keep_names:
            doomed = os.path.join(root, f".{name}.del")
            os.rename(os.path.join(root, name), doomed)
            shutil.rmtree(doomed)
            removed.append(os.path.join(root, name))
    return removed


def read_checkpoint_args(root: str) -> tuple[int, argparse.Namespace | None]:
    """(iteration, stored args) of the checkpoint `root`'s tracker names."""
    iteration = read_tracker(root)
    if iteration is None:
        raise ValueError(f"--load {root}: no {TRACKER} there")
    locate(root)  # a tracker naming a missing iteration, a truncated checkpoint: said plainly
    path = iteration_dir(root, iteration)
    if not dist_checkpointing.check_is_distributed_checkpoint(path):
        raise ValueError(f"--load {root}: {path} is not a torch_dist checkpoint (a legacy 'torch' "
                         "checkpoint? convert it with `lighthouse-megatron convert`)")
    common = dist_checkpointing.load_common_state_dict(path)
    return iteration, common.get("args")


# Settings that fix the shapes of the weights: a checkpoint must agree on them.
SHAPE_ARGS = with_role(all_specs(), SHAPE)
# Settings that Megatron's optimizer-parameter scheduler refuses to change on resume.
# megatron-core does not store the WSD anneal in its state; the stored arguments hold it.
SCHEDULE_ARGS = with_role(all_specs(), SCHEDULE)


def verify_checkpoint(root: str) -> str:
    """Check the files of the checkpoint `root`'s tracker names against its manifest; returns
    the line to print (what was verified, or that it could not be). Raises ValueError
    naming a damaged file."""
    directory = locate(root).directory
    return verification_line(directory, verify_manifest(directory))


def check_checkpoint_args(args, ckpt_args, root: str) -> None:
    """Fail before building anything when `--load` holds a different model or schedule."""
    if ckpt_args is None:
        return
    hints = {"model": "", "schedule": " (keep the run's schedule and stop early with --exit-interval, or "
             "change it on purpose with --override-opt_param-scheduler)"}
    checks = [(SHAPE_ARGS, "model")]
    if not args.override_opt_param_scheduler:  # Megatron-LM's flag: the new schedule wins
        checks.append((SCHEDULE_ARGS, "schedule"))
    for names, what in checks:
        diff = [f"--{n.replace('_', '-')} {getattr(args, n)} (checkpoint: {getattr(ckpt_args, n)})"
                for n in names if hasattr(ckpt_args, n) and getattr(ckpt_args, n) != getattr(args, n)]
        if diff:
            raise ValueError(f"--load {root}: the checkpoint's {what} differs: {'; '.join(diff)}"
                             + hints[what])


def load_checkpoint(args, model, optimizer, scheduler) -> int:
    """Load `args.load` into model, optimizer, scheduler and RNGs; returns the iteration and
    sets args.consumed_train_samples / consumed_valid_samples from the checkpoint. With
    `optimizer` None only the model's weights are read (evaluation)."""
    root = args.load
    iteration, ckpt_args = read_checkpoint_args(root)
    path = iteration_dir(root, iteration)
    stored = Values.of(ckpt_args)
    layout = (given(stored.tensor_model_parallel_size, 1), given(stored.world_size, 1))
    # Megatron-LM restores RNG states only for an unchanged TP/PP layout; so do we.
    restore_rng = layout == (args.tensor_model_parallel_size, args.world_size) and not getattr(
        ckpt_args, "no_save_rng", False) and optimizer is not None
    rng = _rng_state(args.device) if restore_rng else None
    state = _state_dict(args, model, optimizer, scheduler, iteration, rng, is_loading=True)
    with _checkpointing_on(args.device):
        loaded = dist_checkpointing.load(state, path)
    model.load_state_dict(loaded["model"], strict=True)
    if optimizer is not None:
        optimizer.load_state_dict(loaded["optimizer"])
        scheduler.load_state_dict(loaded["opt_param_scheduler"])
    if rng is not None and "rng_state" in loaded:
        _set_rng_state(loaded["rng_state"][0], args.device)
    args.consumed_train_samples = getattr(ckpt_args, "consumed_train_samples", 0)
    args.consumed_valid_samples = getattr(ckpt_args, "consumed_valid_samples", 0)
    return loaded["iteration"]
