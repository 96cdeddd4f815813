"""The dense-recovery converter and the Hugging Face export (`lighthouse-megatron convert` /
`inspect`), on the checkpoint format of `lighthouse_megatron.checkpoint`.

- `convert(input, output, *, weights_only=False, dry_run=False, force=False, verify=True)`:
  a stage-1 Megatron-LM checkpoint (torch_dist or torch format) into one that loads under
  the dense spec; the input checked against its manifest first, the output verified after
  writing and given a manifest; returns a report dict.
- `export_hf(input, output, *, dry_run=False, force=False, verify=True)`: the same for a
  Hugging Face Llama checkpoint (with its tokenizer).
- `inspect_checkpoint(path, verify=True) -> dict`: format, iteration, arguments, layers,
  attention per layer, parallel layout, and the manifest check.

All raise `CheckpointError` (a ValueError) naming the problem. The trainer imports none of
this package: what both read and write is `lighthouse_megatron.checkpoint`.
"""

from ..checkpoint.reader import CheckpointError
from .dense import convert, export_hf, inspect_checkpoint

__all__ = ["CheckpointError", "convert", "export_hf", "inspect_checkpoint"]
