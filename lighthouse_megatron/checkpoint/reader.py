"""Reading Megatron-LM checkpoints without running code from them.

Layouts (what `Checkpoint.layout` names):

- torch_dist, megatron-core <= 0.18: `iter_NNNNNNN/{.metadata, __*.distcp, common.pt,
  metadata.json}`; the common state (args, iteration, scheduler...) is `common.pt`.
- torch_dist, megatron-core >= 0.19: no `common.pt`; the common state is the byte item
  `common_state/shard_0_1` of the distcp files (a torch-saved one-element list).
- torch (legacy): `iter_NNNNNNN/mp_rank_TT[_PPP]/model_optim_rng.pt`, one file per TP/PP rank.

The root may hold `latest_checkpointed_iteration.txt` (an iteration or `release`) naming
the directory to read; an iteration directory can also be given directly.

Safety: torch files load with `weights_only=True` (megatron-core's allow-list of plain
classes, e.g. argparse.Namespace), and the distcp `.metadata` pickle, which torch itself
unpickles unrestricted, goes through an unpickler that only builds torch's checkpoint
metadata classes.
"""

from __future__ import annotations

import io
import json
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..settings.fields import Values

TRACKER = "latest_checkpointed_iteration.txt"
COMMON_PT = "common.pt"
COMMON_STATE_KEY = "common_state/shard_0_1"  # ShardedObject("common_state", ..., (1,), (0,)).unique_key
_ITER_DIR = re.compile(r"^iter_(\d{7,})$")
_RANK_DIR = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?(?:_(\d{3}))?$")
LEGACY_FILE = "model_optim_rng.pt"


class CheckpointError(ValueError):
    """A checkpoint that is missing, truncated, foreign or inconsistent (the message says which)."""


@dataclass
class Checkpoint:
    """Where a checkpoint's pieces are, found by `locate`."""

    path: Path                 # what the user named
    root: Path | None          # the directory with the tracker file, if any
    directory: Path            # iter_NNNNNNN/ or release/
    format: str                # "torch_dist" or "torch"
    layout: str                # "common.pt", "common_state" or "mp_rank"
    iteration: int | None      # from the directory name (None for release)
    release: bool
    shards: dict[tuple[int, int], Path] = field(default_factory=dict)  # (tp, pp) -> file, torch format

    @property
    def tracker_text(self) -> str:
        return "release" if self.release else str(self.iteration)


def _iteration_directory(path: Path) -> tuple[Path | None, Path]:
    """(the save directory or None, the one iteration's directory) that `path` names: through the
    tracker of a save directory, or the directory itself."""
    root = None
    tracker = path / TRACKER
    if tracker.is_file():
        root = path
        text = tracker.read_text().strip()
        if text == "release":
            directory = path / "release"
        elif text.isdigit():
            directory = path / f"iter_{int(text):07d}"
        else:
            raise CheckpointError(f"{tracker}: expected an iteration number or 'release', got {text!r}")
        if not directory.is_dir():
            raise CheckpointError(
                f"{tracker} names {text} but {directory} is missing (partly copied or deleted checkpoint)"
            )
    elif _ITER_DIR.match(path.name) or path.name == "release":
        directory = path
    else:
        iters = sorted(p.name for p in path.iterdir() if _ITER_DIR.match(p.name))
        if iters:
            raise CheckpointError(
                f"{path}: no {TRACKER}; pass one iteration directory, e.g. {path / iters[-1]} "
                f"(found {', '.join(iters)})"
            )
        directory = path
    return root, directory


def locate(path: str | Path) -> Checkpoint:
    """Find the checkpoint at `path` (a save directory or one iteration's directory)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if not path.is_dir():
        raise CheckpointError(
            f"{path}: expected a checkpoint directory (a Megatron-LM --save directory or its "
            "iter_NNNNNNN/), got a file"
        )
    root, directory = _iteration_directory(path)
    match = _ITER_DIR.match(directory.name)
    iteration = int(match.group(1)) if match else None
    release = directory.name == "release"

    names = {p.name for p in directory.iterdir()}
    if "metadata.json" in names or ".metadata" in names:
        return _locate_dist(path, root, directory, iteration, release, names)
    shards = {}
    for name in names:
        m = _RANK_DIR.match(name)
        if m and m.group(3) is None:  # expert-parallel shards (_EEE) are not supported
            file = directory / name / LEGACY_FILE
            if not file.is_file():
                raise CheckpointError(f"{directory / name}: {LEGACY_FILE} is missing (truncated checkpoint)")
            shards[(int(m.group(1)), int(m.group(2) or 0))] = file
        elif m:
            raise CheckpointError(f"{directory / name}: expert-parallel shards are not supported")
    if not shards:
        raise CheckpointError(
            f"{directory}: not a Megatron checkpoint (expected metadata.json + .metadata + *.distcp "
            f"for torch_dist, or mp_rank_TT/{LEGACY_FILE} for the torch format)"
        )
    tps = sorted({tp for tp, _ in shards})
    pps = sorted({pp for _, pp in shards})
    missing = [(tp, pp) for tp in range(len(tps)) for pp in range(len(pps)) if (tp, pp) not in shards]
    if tps != list(range(len(tps))) or pps != list(range(len(pps))) or missing:
        raise CheckpointError(
            f"{directory}: incomplete set of mp_rank shards {sorted(shards)} (missing {missing or 'ranks'})"
        )
    return Checkpoint(path, root, directory, "torch", "mp_rank", iteration, release, shards)


def _locate_dist(path, root, directory, iteration, release, names) -> Checkpoint:
    for needed in ("metadata.json", ".metadata"):
        if needed not in names:
            raise CheckpointError(f"{directory}: {needed} is missing (truncated torch_dist checkpoint)")
    try:
        config = json.loads((directory / "metadata.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{directory / 'metadata.json'}: unreadable ({e})") from e
    backend = config.get("sharded_backend") if isinstance(config, dict) else None
    if backend != "torch_dist":
        raise CheckpointError(
            f"{directory}: sharded_backend {backend!r} in metadata.json; only 'torch_dist' is supported"
        )
    layout = "common.pt" if COMMON_PT in names else "common_state"
    check_dist_files(directory)
    return Checkpoint(path, root, directory, "torch_dist", layout, iteration, release)


def checkpoint_strays(path: Path, also: tuple[str, ...] = ()) -> list[str]:
    """What directory `path` holds that no layout above writes, as paths relative to it: a save
    directory holds the tracker and iteration directories, an iteration directory the torch_dist
    files (`*.distcp`, `.metadata`, `metadata.json`, `common.pt`) or mp_rank folders of `*.pt`
    files, and the files named in `also`. Everything it holds when it is neither."""
    entries = sorted(path.iterdir())
    if not any(p.name == TRACKER and p.is_file() for p in entries):
        return _iteration_strays(path, also)
    strays = []
    for p in entries:
        if p.is_dir() and (_ITER_DIR.match(p.name) or p.name == "release"):
            strays += [f"{p.name}/{name}" for name in _iteration_strays(p, also)]
        elif p.name != TRACKER:
            strays.append(p.name)
    return strays


def _iteration_strays(directory: Path, also: tuple[str, ...]) -> list[str]:
    strays = []
    for p in sorted(directory.iterdir()):
        if p.is_dir() and _RANK_DIR.match(p.name):
            strays += [f"{p.name}/{f.name}" for f in sorted(p.iterdir())
                       if not (f.is_file() and f.suffix == ".pt")]
        elif not (p.is_file() and (p.name in (".metadata", "metadata.json", COMMON_PT, *also)
                                   or p.name.endswith(".distcp"))):
            strays.append(p.name)
    return strays


# --- safe loading -------------------------------------------------------------------------

def torch_load(source, what: str | Path) -> Any:
    """torch.load with weights_only=True and megatron-core's allow-list of plain classes."""
    import megatron.core  # noqa: F401  (registers megatron-core's safe globals)

    try:
        return torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch wraps its unpickler's message, the last paragraph, in advice of its own ("Please
        # file an issue ...", "Check the documentation ...").
        text = str(e).split("Check the documentation")[0].split("WeightsUnpickler error:")[-1]
        reason = ([p.strip() for p in text.split("\n\n") if p.strip()] or [""])[-1].splitlines()[0]
        if not _NEEDS_CODE.search(reason):
            names = _imported_names(source)
            if not names:
                raise _unreadable(what, reason) from e
            # torch stops at the first opcode it lacks (protocol 4's FRAME), before the import
            reason = f"the pickle imports {', '.join(names[:5])}"
        raise CheckpointError(
            f"{what}: refused to load: it needs more than plain types and tensors, and loading it "
            f"would run code from the checkpoint ({reason[:200]})"
        ) from e
    except Exception as e:  # damaged bytes end in RuntimeError, EOFError, IndexError, UnicodeDecodeError...
        raise _unreadable(what, (str(e).splitlines() or [type(e).__name__])[0]) from e


# What torch's unpickler says of a file that names a class or function it does not allow; anything
# else it refuses (an unknown opcode, a string past the end) is damaged bytes.
_NEEDS_CODE = re.compile(r"GLOBAL |allowlisted|must be imported")


def _imported_names(source, limit: int = 1 << 26) -> list[str]:
    """What a file that is one whole plain pickle (up to `limit` bytes) imports to unpickle
    (the classes and functions it would call), read by pickletools, which runs nothing; [] for
    damaged bytes, a torch zip file or a pickle of plain types."""
    import pickletools

    try:
        if isinstance(source, io.BytesIO):
            data = source.getvalue()
        else:
            with open(source, "rb") as f:
                data = f.read(limit)
        ops = list(pickletools.genops(data))
    except Exception:  # not a pickle: genops parses, and fails on, any bytes
        return []
    if ops[-1][2] != len(data) - 1:  # damaged bytes that happen to reach a STOP early
        return []
    names, strings = [], []
    for op, arg, _ in ops:
        if op.name in ("GLOBAL", "INST"):
            names.append(arg.replace(" ", "."))
        elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
            names.append(".".join(strings[-2:]))
        elif op.name.startswith("EXT"):
            names.append(f"copyreg extension {arg}")
        elif isinstance(arg, str):
            strings.append(arg)
    return names


def _unreadable(what, reason: str) -> CheckpointError:
    return CheckpointError(f"{what}: cannot read it: truncated, corrupt or not a torch file "
                           f"({reason[:200]}); copy the checkpoint again, or check it against its manifest "
                           "(without --no-verify)")


_DCP_MODULES = {
    "torch.distributed.checkpoint.metadata",
    "torch.distributed.checkpoint.filesystem",
    "torch.distributed.checkpoint.planner",
    "torch.distributed.checkpoint._extension",
}


class _MetadataUnpickler(pickle.Unpickler):
    """Builds torch.distributed.checkpoint's metadata classes and nothing else."""

    def find_class(self, module, name):
        import importlib

        if module in _DCP_MODULES:
            obj = getattr(importlib.import_module(module), name, None)
            if isinstance(obj, type):
                return obj
        if module == "torch" and name == "Size":
            return torch.Size
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module == "torch.serialization" and name == "_get_layout":
            return torch.serialization._get_layout
        if module == "pathlib" and name in ("PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"):
            import pathlib

            return getattr(pathlib, name)  # torch records the checkpoint id as a path
        if module == "collections" and name == "OrderedDict":
            import collections

            return collections.OrderedDict
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in checkpoint metadata")


def read_dcp_metadata(directory: Path):
    """The `.metadata` of a torch_dist directory, unpickled with the allow-list above."""
    path = directory / ".metadata"
    try:
        with open(path, "rb") as f:
            return _MetadataUnpickler(f).load()
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path}: refused to load ({e}); loading it would run code") from e
    except (EOFError, OSError, ValueError, AttributeError, TypeError) as e:
        raise CheckpointError(f"{path}: cannot read it: truncated or not torch_dist metadata ({e})") from e


def _reader(directory: Path):
    from torch.distributed.checkpoint import FileSystemReader

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            metadata = read_dcp_metadata(directory)
            from torch.distributed.checkpoint.metadata import StorageMeta

            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(str(directory))


def dcp_load(directory: Path, state_dict: dict) -> dict:
    """Fill `state_dict` (tensors of the stored shapes, BytesIO for byte items) in place."""
    from torch.distributed.checkpoint import DefaultLoadPlanner, load

    class RawBytesPlanner(DefaultLoadPlanner):
        """Byte items come back as the stored bytes, never unpickled here: torch's default
        planner unpickles them with weights_only=False, which can run code from the file."""

        def load_bytes(self, read_item, value) -> None:
            self.state_dict[read_item.dest_index.fqn].write(value.read())

    try:
        load(state_dict, storage_reader=_reader(directory), planner=RawBytesPlanner(flatten_state_dict=False),
             no_dist=True)
    except CheckpointError:
        raise
    except Exception as e:  # torch wraps per-item failures in CheckpointException
        raise CheckpointError(f"{directory}: cannot read the distcp files: truncated or damaged ({e})") from e
    return state_dict


def check_dist_files(directory: Path) -> None:
    """Every byte range `.metadata` points at exists: catches truncated or missing distcp files
    before anything is written."""
    needed: dict[str, int] = {}
    for info in read_dcp_metadata(directory).storage_data.values():
        end = info.offset + info.length
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), end)
    for name, end in sorted(needed.items()):
        file = directory / name
        if not file.is_file():
            raise CheckpointError(f"{file}: missing (truncated torch_dist checkpoint)")
        size = file.stat().st_size
        if size < end:
            raise CheckpointError(f"{file}: truncated ({size} bytes, the metadata needs {end})")


def dcp_items(directory: Path) -> dict[str, Any]:
    """Key -> TensorStorageMetadata or BytesStorageMetadata of a torch_dist directory."""
    return dict(read_dcp_metadata(directory).state_dict_metadata)


def dcp_read_all(directory: Path, keep=lambda key: True) -> dict[str, Any]:
    """Every stored item whose key passes `keep`: tensors whole (global shape), bytes as bytes."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    state = {}
    for key, meta in dcp_items(directory).items():
        if not keep(key):
            continue
        if isinstance(meta, TensorStorageMetadata):
            state[key] = torch.empty(meta.size, dtype=meta.properties.dtype)
        else:
            state[key] = io.BytesIO()
    dcp_load(directory, state)
    return {k: v.getvalue() if isinstance(v, io.BytesIO) else v for k, v in state.items()}


def read_common(ckpt: Checkpoint) -> dict:
    """The common state: args, iteration, checkpoint_version, scheduler, ... (torch format:
    rank 0's file, whole)."""
    if ckpt.format == "torch":
        return read_shard(ckpt, 0, 0)
    if ckpt.layout == "common.pt":
        common = torch_load(ckpt.directory / COMMON_PT, ckpt.directory / COMMON_PT)
    else:
        items = dcp_items(ckpt.directory)
        if COMMON_STATE_KEY not in items:
            raise CheckpointError(
                f"{ckpt.directory}: neither {COMMON_PT} nor a 'common_state' item: not a Megatron "
                "torch_dist checkpoint, or a truncated one"
            )
        data = dcp_read_all(ckpt.directory, lambda k: k == COMMON_STATE_KEY)[COMMON_STATE_KEY]
        loaded = torch_load(io.BytesIO(data), f"{ckpt.directory} (common_state)")
        common = loaded[0] if isinstance(loaded, list) and loaded else loaded
    if not isinstance(common, dict):
        raise CheckpointError(f"{ckpt.directory}: the common state is a {type(common).__name__}, not a dict")
    return common


def read_shard(ckpt: Checkpoint, tp: int, pp: int) -> dict:
    file = ckpt.shards[(tp, pp)]
    state = torch_load(file, file)
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"{file}: not a Megatron-LM checkpoint file (no 'model' entry)")
    return state


def args_dict(args) -> Values:
    """Stored arguments as Values, a dict read by attribute too (Megatron-LM stores an
    argparse.Namespace, others a dict)."""
    if args is None:
        return Values()
    if isinstance(args, dict):
        return Values(args)
    if hasattr(args, "__dict__"):
        return Values(vars(args))
    raise CheckpointError(f"stored args are a {type(args).__name__}, expected a Namespace or a dict")
