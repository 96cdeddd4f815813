"""The committed result files the report reads, by kind, each with its card and command."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .._common import UsageError

# kind -> the folder under the root whose *.json are that kind's results
FOLDERS = {
    "layer": "layer",
    "cp": "cp",
    "e2e": "e2e",
    "failure_modes": "failure_modes/results",
    "quality_v1": "quality/v1",
    "retrieval": "retrieval/results",
}
QUALITY_SUMMARY = "quality/results/summary.json"  # written by `python -m benchmarks.quality.analyze`
LEAK_MANIFESTS = "quality/v1/*/run_leak.json"


@dataclass
class Result:
    path: Path  # relative to the root
    data: dict

    @property
    def meta(self) -> dict:
        return self.data.get("meta", {})

    @property
    def card(self) -> str:
        return self.meta.get("device") or "?"

    @property
    def command(self) -> str:
        return self.meta.get("command") or "?"


def _read(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UsageError(f"{path}: not a readable JSON result ({e})") from None


def load(root: Path) -> dict[str, list[Result]]:
    """Results by kind; an unreadable file is an error. Runners' manifests (run_*.json) are not
    results; the leak probes listed in one are (each step names its command, seed and study)."""
    found: dict[str, list[Result]] = {}
    for kind, folder in FOLDERS.items():
        for path in sorted((root / folder).glob("*.json")):
            if not path.name.startswith("run_"):
                found.setdefault(kind, []).append(Result(path.relative_to(root), _read(path)))
    for path in sorted(root.glob(LEAK_MANIFESTS)):
        manifest = _read(path)
        for step in manifest["steps"]:
            data = _read(path.parent / step["json"])
            meta = {
                "device": manifest["device"],
                "command": " ".join(step["command"]),
                "seed": step["seed"],
                "study": step["study"],
                "manifest": path.relative_to(root).as_posix(),
            }
            found.setdefault("leak", []).append(
                Result((path.parent / step["json"]).relative_to(root), {**data, "meta": meta})
            )
    summary = root / QUALITY_SUMMARY
    if summary.is_file():
        data = _read(summary)
        meta = {"device": ", ".join(data["cards"]), "command": "python -m benchmarks.quality.analyze"}
        found["quality"] = [Result(summary.relative_to(root), {**data, "meta": meta})]
    return found
