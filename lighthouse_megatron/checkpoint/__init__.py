"""The Megatron-LM checkpoint format that the trainer and the converter share: reading
(`reader`: torch_dist and torch layouts, no code run from a file), the manifest of every
file's hash (`manifest`), the model state as one TP = 1 state dict (`model`) and staged
writes (`output`).

`convert`, `export_hf` and `inspect_checkpoint` live in `lighthouse_megatron.convert`; they
are still reachable here, where the README has long named them, without this package
importing the converter (the trainer imports this package, never the converter).
"""

from .reader import CheckpointError

__all__ = ["CheckpointError", "convert", "export_hf", "inspect_checkpoint"]


def __getattr__(name: str):
    if name in ("convert", "export_hf", "inspect_checkpoint"):
        from .. import convert

        return getattr(convert, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
