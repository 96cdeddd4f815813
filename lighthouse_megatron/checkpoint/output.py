"""Writing a converted checkpoint safely: weights checked finite, files written under a
temporary name beside the output and renamed at the end, nothing replaced without force."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

import torch

from ..files import make_output_dir
from .reader import CheckpointError


def check_finite(state: dict) -> None:
    """Refuse weights with NaN or infinite values, naming the first such tensor."""
    for key, value in state.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not torch.isfinite(value).all():
            bad = (~torch.isfinite(value)).sum().item()
            raise CheckpointError(f"{key}: {bad} of {value.numel()} values are NaN or infinite; refusing to "
                                  "convert a diverged or damaged checkpoint")


@contextlib.contextmanager
def staged_output(output: Path, force: bool):
    """Yield an empty temporary path beside `output` to write into (its missing parents
    created); on success rename it to `output` (replacing it only with `force`), on any
    failure remove it."""
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
    if output.exists():
        if not force:
            raise CheckpointError(f"--output {output} appeared meanwhile; pass --force to replace it")
        old = output.parent / f".{output.name}.old-{os.getpid()}"
        output.rename(old)
        tmp.rename(output)
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    else:
        tmp.rename(output)
