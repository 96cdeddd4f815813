"""`convert`: a stage-1 (Lighthouse) checkpoint into one that loads under the dense spec;
`inspect_checkpoint`: what a checkpoint holds.

Lighthouse has no parameters, so the tensors need no change. What does:

- the stored arguments: `attention_impl="dense"`, `spec=None` when it named this
  package's spec, the `lighthouse_*` arguments dropped (Megatron-LM's
  `--use-checkpoint-args` force-restores `spec`);
- torch format only: Transformer Engine's dense core attention
  (`TEDotProductAttention`) has an `_extra_state` entry in plain state dicts, which the
  Lighthouse layers lack, so each layer gets one (torch_dist leaves core-attention extra
  state out: megatron-core's TEDotProductAttention.sharded_state_dict emits only the
  learnable softmax offset);
- `--weights-only`: optimizer, scheduler and RNG state dropped, written as Megatron-LM's
  `release` checkpoint (iteration 0, loads without optimizer state).
"""

from __future__ import annotations

import io
import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..checkpoint.manifest import verification_line, verify_manifest, write_manifest
from ..checkpoint.model import (
    CORE_ATTENTION_EXTRA,
    LAYER_KEY,
    NOT_MODEL,
    dist_model_shapes,
    model_state,
    uses_te,
)
from ..checkpoint.output import check_finite, check_finite_stored, replace_problem, staged_output
from ..checkpoint.reader import (
    COMMON_PT,
    COMMON_STATE_KEY,
    TRACKER,
    Checkpoint,
    CheckpointError,
    args_dict,
    dcp_read_all,
    locate,
    read_common,
    read_dcp_metadata,
    read_shard,
    torch_load,
)
from ..settings.fields import SUMMARY, Values, given, with_role
from ..settings.train import all_specs
from .hf import write_hf
from .verify import verify_dense

_TRAINING_STATE = ("optimizer", "opt_param_scheduler", "rng_state", "rerun_state_machine",
                   "num_floating_point_operations_so_far")


def _is_lighthouse_spec(spec) -> bool:
    return spec is not None and any("lighthouse" in str(s) for s in (spec if isinstance(spec, list | tuple)
                                                                      else [spec]))


def _trained_dense(args: Values) -> bool:
    """No layer was built with Lighthouse attention (neither --attention-impl nor --spec)."""
    return args.attention_impl != "lighthouse" and not _is_lighthouse_spec(args.spec)


def dense_args(args) -> tuple[Any, list[str]]:
    """A copy of the stored arguments for the dense model, and what changed."""
    import argparse

    values = args_dict(args)
    changes = []
    if values.attention_impl != "dense":
        changes.append(f"args.attention_impl: {values.attention_impl!r} -> 'dense'")
        values.attention_impl = "dense"
    if _is_lighthouse_spec(values.spec):
        changes.append(f"args.spec: {values.spec!r} -> None")
        values.spec = None
    for key in sorted(k for k in values if k.startswith("lighthouse_")):
        changes.append(f"args.{key}: {values.pop(key)!r} dropped")
    if isinstance(args, dict):
        return dict(values), changes
    copy = argparse.Namespace() if isinstance(args, argparse.Namespace) else type(args)()
    for key, value in values.items():
        setattr(copy, key, value)
    return copy, changes


def attention_per_layer(args: Values, iteration: int | None) -> list[str]:
    """'lighthouse' or 'dense' for each layer, as the stored arguments built them."""
    args = Values.of(args)
    n = given(args.num_layers, 0)
    impl = args.attention_impl
    if _trained_dense(args):
        return ["dense"] * n
    until = args.lighthouse_until_iter
    if until is not None and iteration is not None and iteration >= until:
        return ["dense"] * n
    if impl != "lighthouse":  # the --spec route keeps its settings in $LIGHTHOUSE_CONFIG
        return ["lighthouse (settings not stored)"] * n
    from ..config import LighthouseConfig

    try:
        dense = LighthouseConfig(dense_layers=tuple(args.lighthouse_dense_layers or ())) \
            .resolve_dense_layers(n)
    except ValueError as e:
        raise CheckpointError(f"stored lighthouse_dense_layers: {e}") from e
    return ["dense" if i in dense else "lighthouse" for i in range(n)]


def _te_extra_state_changes(model: dict, args: dict) -> tuple[dict, list[str]]:
    """Add TE's core-attention `_extra_state` to layers without it (TE models) or drop it
    (local-spec models, whose DotProductAttention has none)."""
    keys = [k for k in model if LAYER_KEY.match(k)]
    layers = sorted({int(LAYER_KEY.match(k).group(1)) for k in keys})
    present = {i for i in layers if f"decoder.layers.{i}.{CORE_ATTENTION_EXTRA}" in model}
    te = uses_te(args, model) or any(
        k.endswith("linear_qkv._extra_state") and isinstance(model[k], torch.Tensor) for k in keys)
    if te:
        lacking = [i for i in layers if i not in present]
        if not lacking:
            return model, []
        # A dense layer's entry where one exists; else TE's "no FP8 state" (an empty uint8 tensor).
        template = model[f"decoder.layers.{min(present)}.{CORE_ATTENTION_EXTRA}"] if present \
            else torch.empty(0, dtype=torch.uint8)
        model = dict(model)
        for i in lacking:
            model[f"decoder.layers.{i}.{CORE_ATTENTION_EXTRA}"] = template
        return model, [f"model: added {CORE_ATTENTION_EXTRA} (TE dense core attention) to layers {lacking}"]
    if present:
        model = {k: v for k, v in model.items() if not k.endswith(CORE_ATTENTION_EXTRA)}
        return model, [f"model: dropped {CORE_ATTENTION_EXTRA} from layers {sorted(present)} (local spec)"]
    return model, []


# --- inspect --------------------------------------------------------------------------------

# What `inspect` shows of the stored arguments: the settings whose role says so, and the
# arguments of Megatron-LM's own that tell how the model was built and stored.
_ARG_NAMES = (*with_role(all_specs(), SUMMARY), "transformer_impl", "params_dtype", "fp16", "ckpt_format",
              "spec")


def _plain(value):
    if isinstance(value, bool | int | float | str) or value is None:
        return value
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return str(value)


def check_input(ckpt: Checkpoint, verify: bool) -> str:
    """Check `ckpt`'s files against its manifest (unless `verify` is False); returns what was
    verified, as one line. Raises CheckpointError naming a damaged file."""
    if not verify:
        return f"not verified: {ckpt.directory} (--no-verify)"
    return verification_line(ckpt.directory, verify_manifest(ckpt.directory))


def inspect_checkpoint(path: str | Path, verify: bool = True) -> dict[str, Any]:
    """Summarise a Megatron-LM checkpoint (torch_dist, either on-disk layout, or torch).

    Returns plain types: path, format, layout, iteration, release, checkpoint_version,
    args (the model and parallel arguments), lighthouse (the stored Lighthouse settings),
    attention (per layer: "lighthouse" or "dense"), parallel (tp, pp, cp, dp, world_size),
    contents (which top-level entries are present), tensors (count and parameter count),
    verified (one line: the files checked against the manifest, or why they were not).
    Raises CheckpointError for anything that is not a readable checkpoint or whose files
    differ from its manifest.
    """
    ckpt = locate(path)
    verified = check_input(ckpt, verify)
    common = read_common(ckpt)
    args = args_dict(common.get("args"))
    iteration = _check_consistency(ckpt, common, args)
    if ckpt.format == "torch_dist":  # shapes from the metadata: no tensor is read
        shapes = dist_model_shapes(ckpt)
    else:
        shapes = {k: tuple(v.shape) for k, v in model_state(ckpt, args).items()
                  if isinstance(v, torch.Tensor) and not k.endswith("_extra_state")}
    tp, pp = given(args.tensor_model_parallel_size, 1), given(args.pipeline_model_parallel_size, 1)
    cp = given(args.context_parallel_size, 1)
    world = args.world_size
    if ckpt.format == "torch":
        tp, pp = 1 + max(t for t, _ in ckpt.shards), 1 + max(p for _, p in ckpt.shards)
    if ckpt.format == "torch_dist":
        contents = sorted({k.split(".")[0].split("/")[0] for k in _dist_keys(ckpt)} | set(common))
    else:
        contents = sorted(common)
    return {
        "path": str(ckpt.path),
        "directory": str(ckpt.directory),
        "format": ckpt.format,
        "layout": {"common.pt": "torch_dist with common.pt (megatron-core <= 0.18)",
                   "common_state": "torch_dist with a common_state item (megatron-core >= 0.19)",
                   "mp_rank": f"torch, {len(ckpt.shards)} mp_rank files"}[ckpt.layout],
        "iteration": iteration,
        "release": ckpt.release,
        "checkpoint_version": common.get("checkpoint_version"),
        "args": {k: _plain(args[k]) for k in _ARG_NAMES if k in args},
        "lighthouse": {k: _plain(v) for k, v in sorted(args.items()) if k.startswith("lighthouse_")},
        "attention": attention_per_layer(args, iteration),
        "parallel": {"tp": tp, "pp": pp, "cp": cp,
                     "dp": world // (tp * pp * cp) if world else None, "world_size": world},
        "contents": contents,
        "tensors": {"count": len(shapes), "parameters": sum(math.prod(s) for s in shapes.values())},
        "verified": verified,
    }


def _check_consistency(ckpt: Checkpoint, common: dict, args: Values) -> int | None:
    """The directory, the common state and the shards must tell the same story."""
    iteration = common.get("iteration", ckpt.iteration)
    if ckpt.iteration is not None and iteration is not None and iteration != ckpt.iteration:
        raise CheckpointError(f"{ckpt.directory}: the directory says iteration {ckpt.iteration}, the "
                              f"checkpoint says {iteration} (mismatched or partly replaced checkpoint)")
    if ckpt.format == "torch":
        tp, pp = 1 + max(t for t, _ in ckpt.shards), 1 + max(p for _, p in ckpt.shards)
        for said, stored, found in (("tensor_model_parallel_size=", args.tensor_model_parallel_size, tp),
                                    ("pipeline_model_parallel_size=", args.pipeline_model_parallel_size, pp)):
            if stored is not None and stored != found:
                raise CheckpointError(f"{ckpt.directory}: the stored arguments say {said}{stored}, but "
                                      f"there are {found} rank(s) of mp_rank files (mismatched checkpoint)")
    return iteration


def _dist_keys(ckpt):
    from ..checkpoint.reader import dcp_items

    return list(dcp_items(ckpt.directory))


# --- convert --------------------------------------------------------------------------------

def _open(input: str | Path, output: str | Path, *, to: str, dry_run: bool, force: bool, verify: bool,
          log: Callable[[str], None]) -> tuple[Checkpoint, Path, dict, dict, dict]:
    """What `convert` and `export_hf` check first: (checkpoint, output, common state, stored
    args, the report so far)."""
    ckpt = locate(input)
    output = Path(output)
    if output.resolve() == ckpt.path.resolve() or ckpt.path.resolve() in output.resolve().parents \
            or output.resolve() in ckpt.directory.resolve().parents:
        raise CheckpointError(f"--output {output} overlaps --input {input}; choose another directory")
    replaces = output.exists() or output.is_symlink()
    if replaces:  # a dry run refuses what the real run would
        problem = replace_problem(output)
        if problem:
            raise CheckpointError(problem)
        if not force:
            raise CheckpointError(f"--output {output} exists; pass --force to replace it")
    input_verified = check_input(ckpt, verify)
    log(input_verified)
    common = read_common(ckpt)
    args = args_dict(common.get("args"))
    if not args:
        raise CheckpointError(f"{ckpt.directory}: no stored arguments ('args'); cannot tell which model "
                              "it holds")
    _check_consistency(ckpt, common, args)
    report = {"input": str(ckpt.path), "output": str(output), "to": to, "format": ckpt.format,
              "layout": ckpt.layout, "iteration": ckpt.iteration, "dry_run": dry_run, "replaces": replaces,
              "input_verified": input_verified}
    return ckpt, output, common, args, report


def convert(input: str | Path, output: str | Path, *, weights_only: bool = False,
            dry_run: bool = False, force: bool = False, verify: bool = True,
            log: Callable[[str], None] | None = None) -> dict:
    """Convert a stage-1 checkpoint for the dense recovery stage (`export_hf`: to Hugging Face).

    The output is a Megatron-LM checkpoint (same format and layout as the input) that loads
    under the dense spec; optimizer state and iteration kept unless `weights_only`.
    It is written under a temporary name next to it and renamed at the end, then
    verified (dense load with strict key checks and a forward pass). An existing
    output is refused unless `force`, and even then unless it is an earlier output (a Megatron
    checkpoint, a Hugging Face export) or an empty directory (`replace_problem`); a dry run
    refuses the same. The input is only read: first checked against its
    manifest (unless `verify` is False; a checkpoint without one is reported unverified), its
    weights and the optimizer state the output keeps must be finite (`report["finite"]` says
    what was checked). The output gets a manifest of its own. Missing parents of the
    output are created.
    Returns a report: {"input", "output", "format", "changes", "input_verified", "finite", "verified",
    "replaces" (the output exists), "note" (only for a checkpoint trained dense), ...}.
    """
    log = log or (lambda msg: None)
    ckpt, output, common, args, report = _open(input, output, to="megatron", dry_run=dry_run, force=force,
                                               verify=verify, log=log)
    new_args, changes = dense_args(common.get("args"))
    if _trained_dense(args):
        rest = ("re-marks its stored arguments" if changes
                else "copies it: its stored arguments are dense already")
        report["note"] = (f"note: {ckpt.directory} was trained with dense attention (attention_impl="
                          f"{args.attention_impl!r}); its weights need no change, so the conversion only "
                          f"{rest}")
        log(report["note"])
    if weights_only:
        dropped = [k for k in _TRAINING_STATE if k in common]
        changes.append(f"weights only: dropped {dropped or 'no training state'}; written as the "
                       f"'release' checkpoint (iteration 0)")
    else:
        changes.append(f"kept: iteration {ckpt.tracker_text}, "
                       f"{[k for k in _TRAINING_STATE if k in common] or 'no training state'}")
    check_finite(model_state(ckpt, args))
    shards = {rank: read_shard(ckpt, *rank) for rank in ckpt.shards} if ckpt.format == "torch" else {}
    report["finite"] = _check_training_state_finite(ckpt, shards, weights_only)
    log(report["finite"])
    if ckpt.format == "torch":
        extra_changes = _legacy_extra_state(shards, args)
        changes[1:1] = extra_changes
    report["changes"] = changes
    for change in changes:
        log(change)
    if dry_run:
        return report

    with staged_output(output, force) as tmp:
        out_dir_name = "release" if weights_only else ckpt.directory.name
        out_dir = tmp / out_dir_name
        out_dir.mkdir(parents=True)
        if ckpt.format == "torch":
            _write_legacy(ckpt, shards, new_args, out_dir, weights_only)
        else:
            _write_dist(ckpt, common, new_args, out_dir, weights_only)
        (tmp / TRACKER).write_text("release" if weights_only else ckpt.tracker_text)
        write_manifest(out_dir)
        written = locate(tmp)
        written_args = args_dict(read_common(written).get("args"))
        report["verified"] = verify_dense(written, written_args)
        log(f"output verified: loads under the dense spec ({report['verified']['loaded_with']}), "
            f"{report['verified']['forward']}")
    return report


def _check_training_state_finite(ckpt: Checkpoint, shards: dict, weights_only: bool) -> str:
    """The optimizer state the output keeps must be finite too: NaN moments would turn the
    weights NaN at the first update after the resume. Returns what was checked, as one line."""
    if weights_only:
        return "checked finite: the weights (the optimizer state is dropped: --weights-only)"
    if ckpt.format == "torch_dist":
        count = check_finite_stored(ckpt.directory, lambda k: k.startswith("optimizer."))
        return f"checked finite: the weights and the optimizer state ({count} tensors)"
    count = sum(check_finite(state.get("optimizer", {}), f"{ckpt.shards[rank].parent.name}: optimizer.")
                for rank, state in shards.items())
    others = sorted({p.name for f in ckpt.shards.values() for p in f.parent.iterdir() if p.name != f.name})
    unchecked = f"; not checked: {', '.join(others)} (copied as they are)" if others else ""
    return (f"checked finite: the weights and the optimizer state in the mp_rank files ({count} tensors)"
            f"{unchecked}")


def export_hf(input: str | Path, output: str | Path, *, dry_run: bool = False, force: bool = False,
              verify: bool = True, log: Callable[[str], None] | None = None) -> dict:
    """Export a checkpoint of a Llama-shaped dense model as a Hugging Face Llama checkpoint
    (config.json + model.safetensors + the tokenizer), with `convert`'s guarantees: input
    checked, output written under a temporary name and verified (logits against
    transformers' LlamaForCausalLM when transformers is installed), no overwrite without `force`."""
    log = log or (lambda msg: None)
    ckpt, output, _, args, report = _open(input, output, to="hf", dry_run=dry_run, force=force,
                                          verify=verify, log=log)
    return {**report, **write_hf(ckpt, args, output, dry_run=dry_run, force=force, log=log)}


def _legacy_extra_state(shards: dict, args: dict) -> list[str]:
    changes = []
    for rank, state in shards.items():
        state["model"], rank_changes = _te_extra_state_changes(state["model"], args)
        if rank == (0, 0):
            changes = rank_changes
    if len(shards) > 1 and changes:
        changes = [f"{c} (each of the {len(shards)} mp_rank files)" for c in changes]
    return changes


def _write_legacy(ckpt: Checkpoint, shards: dict, new_args, out_dir: Path, weights_only: bool) -> None:
    for (tp, pp), state in shards.items():
        state = _output_state(state, new_args, weights_only)
        source = ckpt.shards[(tp, pp)]
        target = out_dir / source.parent.name / source.name
        target.parent.mkdir(parents=True, exist_ok=True)
        torch.save(state, target)
        if not weights_only:  # e.g. distrib_optim.pt of the distributed optimizer
            for other in source.parent.iterdir():
                if other.name != source.name:
                    _copy(other, target.parent / other.name)


def _copy(src: Path, dst: Path) -> None:
    if src.is_dir():
        shutil.copytree(src, dst)
    else:
        shutil.copy2(src, dst)


def _output_state(common: dict, new_args, weights_only: bool) -> dict:
    common = dict(common)
    common["args"] = new_args
    if weights_only:
        for key in _TRAINING_STATE:
            common.pop(key, None)
        common["iteration"] = 0
    return common


def _write_dist(ckpt: Checkpoint, common: dict, new_args, out_dir: Path, weights_only: bool) -> None:
    common = _output_state(common, new_args, weights_only)
    if ckpt.layout == "common.pt" and not weights_only:
        # The tensors stay byte for byte; only the common state changes.
        for item in ckpt.directory.iterdir():
            if item.name != COMMON_PT:
                _copy(item, out_dir / item.name)
        torch.save(common, out_dir / COMMON_PT)
        return
    keep = (lambda k: not k.startswith(NOT_MODEL)) if weights_only else (lambda k: k != COMMON_STATE_KEY)
    items = dcp_read_all(ckpt.directory, keep)
    if ckpt.layout == "common_state":
        buffer = io.BytesIO()
        torch.save([common], buffer)  # megatron-core >= 0.19 stores the common state this way
        items[COMMON_STATE_KEY] = buffer.getvalue()
    else:
        torch.save(common, out_dir / COMMON_PT)
    _dcp_write(items, out_dir, read_dcp_metadata(ckpt.directory))
    for name in ("metadata.json",):
        shutil.copy2(ckpt.directory / name, out_dir / name)


def _dcp_write(items: dict, out_dir: Path, source_metadata) -> None:
    """Write plain tensors and byte items as a torch_dist directory, keeping megatron-core's
    extra metadata (`mcore_data`) of the source."""
    import pickle

    from torch.distributed.checkpoint import DefaultSavePlanner, FileSystemWriter, save

    class RawBytesPlanner(DefaultSavePlanner):
        """Byte items are written as the bytes they were read as (already torch-saved objects;
        the default planner would torch.save the BytesIO holding them)."""

        def transform_object(self, write_item, object):
            return object if isinstance(object, io.BytesIO) else super().transform_object(write_item, object)

    state = {k: io.BytesIO(v) if isinstance(v, bytes) else v for k, v in items.items()}
    save(state, storage_writer=FileSystemWriter(str(out_dir), single_file_per_rank=True),
         planner=RawBytesPlanner(flatten_state_dict=False), no_dist=True)
    mcore = getattr(source_metadata, "mcore_data", None)
    if mcore:
        metadata = read_dcp_metadata(out_dir)
        metadata.mcore_data = mcore
        with open(out_dir / ".metadata", "wb") as f:
            pickle.dump(metadata, f)


__all__ = ["CheckpointError", "convert", "dense_args", "export_hf", "inspect_checkpoint", "torch_load"]
