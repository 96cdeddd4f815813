"""Start-up time of `lighthouse-megatron --help`, `--version` and every subcommand's `--help`.

    python -m benchmarks.cli_startup.run [--repeat 3] [--out benchmarks/cli_startup/results/cli_startup.json]

Prints one row per command: the best wall time of `--repeat` runs in a fresh interpreter and
whether torch / megatron-core were imported (python -X importtime), and with --out writes the
rows with the machine (CPUs, load average, Python) and the command as JSON. The target: under
1 s, torch not imported. A benchmark, not a test: timings depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

COMMANDS = [["--version"], ["--help"], ["demo", "--help"], ["prepare-data", "--help"], ["bench", "--help"],
            ["bench", "layer", "--help"], ["bench", "e2e", "--help"],
            ["slurm", "--help"], ["slurm", "render", "--help"], ["slurm", "submit", "--help"],
            ["train", "--help"], ["convert", "--help"], ["inspect", "--help"]]
HEAVY = ("torch", "megatron.core")


def imported(argv: list[str]) -> list[str]:
    """The heavy top-level modules that `lighthouse-megatron ARGV` imports."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "lighthouse_megatron.cli", *argv],
                          capture_output=True, text=True, check=True)
    names = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if "|" in line}
    return [name for name in HEAVY if name in names]


def seconds(argv: list[str], repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "lighthouse_megatron.cli", *argv], capture_output=True,
                       check=True)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--out", type=Path, default=None, help="write the rows and the machine as JSON")
    args = p.parse_args()
    machine = {"python": platform.python_version(), "cpus": os.cpu_count(),
               "load_average_before": os.getloadavg(), "platform": platform.platform()}
    print(f"{'command':<40} {'best s':>7}  heavy imports")
    rows = []
    for argv in COMMANDS:
        row = {"argv": argv, "best_s": seconds(argv, args.repeat), "heavy_imports": imported(argv)}
        row["meets_target"] = row["best_s"] < 1.0 and not row["heavy_imports"]
        rows.append(row)
        print(f"{'lighthouse-megatron ' + ' '.join(argv):<40} {row['best_s']:7.2f}  "
              f"{', '.join(row['heavy_imports']) or '-'}")
    failing = [" ".join(r["argv"]) for r in rows if not r["meets_target"]]
    print("target (< 1 s, no torch): " + (f"MISSED by {failing}" if failing else "met by every command"))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        command = " ".join(["python", "-m", "benchmarks.cli_startup.run", *sys.argv[1:]])
        args.out.write_text(json.dumps({"command": command, "repeat": args.repeat, "machine": machine,
                                        "target": "best of --repeat runs under 1 s, torch not imported",
                                        "rows": rows}, indent=2) + "\n")
    return 1 if failing else 0


if __name__ == "__main__":
    sys.exit(main())
