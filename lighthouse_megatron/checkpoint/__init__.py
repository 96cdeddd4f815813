"""Checkpoint tools for the dense recovery stage (`lighthouse-megatron convert` / `inspect`).

- `convert(input, output, *, weights_only=False, dry_run=False, force=False, verify=True)`:
  a stage-1 Megatron-LM checkpoint (torch_dist or torch format) into one that loads under
  the dense spec; the input checked against its manifest first, the output verified after
  writing and given a manifest; returns a report dict.
- `export_hf(input, output, *, dry_run=False, force=False, verify=True)`: the same for a
  Hugging Face Llama checkpoint (with its tokenizer).
- `inspect_checkpoint(path, verify=True) -> dict`: format, iteration, arguments, layers,
  attention per layer, parallel layout, and the manifest check (`manifest.py`).

All raise `CheckpointError` (a ValueError) naming the problem.
"""

from .convert import convert, export_hf, inspect_checkpoint
from .reader import CheckpointError

__all__ = ["CheckpointError", "convert", "export_hf", "inspect_checkpoint"]
