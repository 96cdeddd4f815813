"""Start-up time of `lighthouse-megatron --help`, `--version` and every subcommand's `--help`.

    python benchmarks/cli_startup.py [--repeat 3]

Prints one row per command: the best wall time of `--repeat` runs in a fresh interpreter and
whether torch / megatron-core were imported (python -X importtime). The target (issue 20):
under 1 s, torch not imported. A benchmark, not a test: timings depend on the machine.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

COMMANDS = [["--version"], ["--help"], ["demo", "--help"], ["prepare-data", "--help"], ["bench", "--help"],
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
    args = p.parse_args()
    print(f"{'command':<40} {'best s':>7}  heavy imports")
    for argv in COMMANDS:
        heavy = imported(argv)
        print(f"{'lighthouse-megatron ' + ' '.join(argv):<40} {seconds(argv, args.repeat):7.2f}  "
              f"{', '.join(heavy) or '-'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
