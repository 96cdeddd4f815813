"""Writing a converted checkpoint safely: weights checked finite, files written under a
temporary name beside the output and renamed at the end, nothing replaced without force, and
with force only an earlier output (a Megatron checkpoint, a Hugging Face export) or an empty
directory."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from pathlib import Path

import torch

from ..settings.files import make_output_dir
from .manifest import MANIFEST
from .reader import CheckpointError, checkpoint_strays

HF_EXPORT_FILES = ("config.json", "model.safetensors")  # what `--to hf` always writes


def check_finite(state: dict, prefix: str = "") -> int:
    """Refuse tensors with NaN or infinite values, naming the first one (nested dicts and lists,
    as in a torch-format optimizer state, are walked); returns how many tensors were checked."""
    checked = 0
    for key, value in state.items() if isinstance(state, dict) else enumerate(state):
        name = f"{prefix}{key}"
        if isinstance(value, (dict, list, tuple)):
            checked += check_finite(value, f"{name}.")
        elif isinstance(value, torch.Tensor) and value.is_floating_point():
            checked += 1
            if not torch.isfinite(value).all():
                bad = (~torch.isfinite(value)).sum().item()
                hint = ("; convert an earlier checkpoint, or keep only the weights with --weights-only"
                        if "optimizer." in name else "")
                raise CheckpointError(f"{name}: {bad} of {value.numel()} values are NaN or infinite; "
                                      f"refusing to convert a diverged or damaged checkpoint{hint}")
    return checked


def check_finite_stored(directory: Path, keep, batch_bytes: int = 1 << 30) -> int:
    """`check_finite` for the stored tensors of torch_dist `directory` whose key passes `keep`,
    read about `batch_bytes` at a time (optimizer state is several times the weights);
    returns how many tensors were checked."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from .reader import dcp_items, dcp_read_all

    batches, size = [[]], 0
    for key, meta in sorted(dcp_items(directory).items()):
        if keep(key) and isinstance(meta, TensorStorageMetadata) and meta.properties.dtype.is_floating_point:
            nbytes = meta.size.numel() * meta.properties.dtype.itemsize
            if batches[-1] and size + nbytes > batch_bytes:
                batches.append([])
                size = 0
            batches[-1].append(key)
            size += nbytes
    checked = 0
    for batch in batches:
        if batch:
            names = set(batch)
            checked += check_finite(dcp_read_all(directory, lambda k, names=names: k in names))
    return checked


_TOKENIZER_FILE = re.compile(r"(tokenizer|special_tokens|vocab|merges).*|added_tokens\.json|spiece\.model")


def is_tokenizer_file(name: str) -> bool:
    """A Hugging Face tokenizer's file, by its name."""
    return _TOKENIZER_FILE.fullmatch(name) is not None


def replace_problem(output: Path) -> str | None:
    """Why `--force` must not replace the existing `output` (one line), or None for what it may
    replace: a Megatron checkpoint (a save directory or one iteration's), a Hugging Face export
    as `--to hf` writes it, or an empty directory. Never a file, a link, a folder holding other
    files or the current directory."""
    refuse = "refusing to replace it even with --force; choose another --output"
    if output.is_symlink():
        return f"--output {output} is a symbolic link; {refuse}"
    if not output.is_dir():
        return f"--output {output} is a file, not a checkpoint or a Hugging Face export; {refuse}"
    if Path.cwd().resolve().is_relative_to(output.resolve()):
        return f"--output {output} holds the current directory; {refuse}"
    if all((output / name).is_file() for name in HF_EXPORT_FILES):
        strays = [p.name for p in sorted(output.iterdir()) if not (p.is_file() and (
            p.name in (*HF_EXPORT_FILES, MANIFEST) or is_tokenizer_file(p.name)))]
    else:
        strays = checkpoint_strays(output, also=(MANIFEST,))
    if not strays:
        return None
    shown = ", ".join(strays[:5]) + (f", ... ({len(strays)} in all)" if len(strays) > 5 else "")
    return (f"--output {output} holds files that are not a checkpoint or a Hugging Face export ({shown}); "
            f"{refuse}")


@contextlib.contextmanager
def staged_output(output: Path, force: bool):
    """Yield an empty temporary path beside `output` to write into (its missing parents
    created); on success rename it to `output` (replacing it only with `force`, and only
    what `replace_problem` allows, checked again now), on any failure remove it."""
    problem = make_output_dir(output.parent)  # missing parents created, as prepare-data does
    if problem:
        raise CheckpointError(f"--output {output}: {problem}")
    tmp = output.parent / f".{output.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        yield tmp
        _replace(tmp, output, force)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"--output {output}: cannot write ({e.strerror or e}: {e.filename})") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace(tmp: Path, output: Path, force: bool) -> None:
    if output.exists() or output.is_symlink():
        if not force:
            raise CheckpointError(f"--output {output} appeared meanwhile; pass --force to replace it")
        problem = replace_problem(output)  # checked before the work too; it may have changed since
        if problem:
            raise CheckpointError(problem)
        old = output.parent / f".{output.name}.old-{os.getpid()}"
        output.rename(old)
        tmp.rename(output)
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    else:
        tmp.rename(output)
