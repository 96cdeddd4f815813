"""Checks the two logs of tests/gpu/run_megatron_lm.sh (Megatron-LM's own log lines).

    python tests/gpu/check_megatron_lm_logs.py STAGE1_LOG STAGE2_LOG --switch-iter 20 --train-iters 40

Asserts: stage 1 built Lighthouse layers (the plugin's announcement) and trained
iterations 1..switch, then saved; stage 2 built Megatron-LM's dense layers, loaded the
checkpoint at iteration `switch` and trained switch+1..train_iters; every loss finite;
the loss fell (last 5 iterations of stage 2 below the first 5 of stage 1) and the switch
did not restart training (stage 2's first losses near stage 1's last ones, far below
the start). Prints one verdict line; exit code 1 on a failure.
"""

from __future__ import annotations

import argparse
import math
import re
import statistics
import sys

# Megatron-LM logs `lm loss: 5.123456E+00 |` ({:.6E}: NAN and INF in capitals).
ITERATION = re.compile(r"iteration\s+(\d+)/\s*(\d+)\s*\|.*?lm loss:\s*(-?(?:[0-9.]+E[-+]\d+|NAN|INF))\s",
                       re.IGNORECASE)


def losses(text: str) -> dict[int, float]:
    return {int(m.group(1)): float(m.group(3)) for m in ITERATION.finditer(text)}


def check(stage1: str, stage2: str, switch: int, total: int) -> list[str]:
    problems = []
    l1, l2 = losses(stage1), losses(stage2)
    if sorted(l1) != list(range(1, switch + 1)):
        problems.append(f"stage 1 logged iterations {sorted(l1)[:3]}..{sorted(l1)[-3:]}, "
                        f"expected 1..{switch}")
    if sorted(l2) != list(range(switch + 1, total + 1)):
        problems.append(f"stage 2 logged iterations {sorted(l2)[:3]}..{sorted(l2)[-3:]}, "
                        f"expected {switch + 1}..{total}")
    if "lighthouse-megatron:" not in stage1 or "LighthouseCoreAttention" not in stage1:
        problems.append("stage 1 did not announce Lighthouse layers")
    if "LighthouseCoreAttention" in stage2:
        problems.append("stage 2 (--attention-impl dense) built Lighthouse layers")
    if not re.search(rf"saved checkpoint from iteration\s+{switch}\b", stage1):
        problems.append(f"stage 1 did not save a checkpoint at iteration {switch}")
    if not re.search(rf"successfully loaded checkpoint from .* at iteration {switch}\b", stage2):
        problems.append(f"stage 2 did not load the checkpoint of iteration {switch}")
    values = list(l1.values()) + list(l2.values())
    if not values or not all(math.isfinite(v) for v in values):
        problems.append(f"non-finite or missing losses: {values}")
    if problems:
        return problems
    first = statistics.mean(l1[i] for i in range(1, 6))
    last1 = statistics.mean(l1[i] for i in range(switch - 4, switch + 1))
    start2 = statistics.mean(l2[i] for i in range(switch + 1, switch + 6))
    end = statistics.mean(l2[i] for i in range(total - 4, total + 1))
    if not end < first:
        problems.append(f"loss did not fall: first 5 {first:.3f}, last 5 {end:.3f}")
    # A restart from scratch would bring stage 2 back to the initial loss. Stage 2 need not start
    # near stage 1's end: switching Lighthouse layers to dense attention raises the loss (the
    # jump the recovery stage is for), at this size by up to about half of what stage 1 learned.
    if not start2 < first - 0.1 * (first - last1):
        problems.append(f"stage 2 starts at {start2:.3f}, not below the initial loss {first:.3f} "
                        f"(stage 1 ended at {last1:.3f}): the checkpoint did not carry over")
    return problems


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("stage1")
    p.add_argument("stage2")
    p.add_argument("--switch-iter", type=int, required=True)
    p.add_argument("--train-iters", type=int, required=True)
    a = p.parse_args()
    with open(a.stage1) as f1, open(a.stage2) as f2:
        s1, s2 = f1.read(), f2.read()
    problems = check(s1, s2, a.switch_iter, a.train_iters)
    l1, l2 = losses(s1), losses(s2)
    if problems:
        print("FAILED: " + "; ".join(problems))
        return 1
    print(f"OK: stage 1 (Lighthouse) loss {l1[1]:.3f} -> {l1[a.switch_iter]:.3f}, stage 2 (dense, "
          f"loaded iteration {a.switch_iter}) {l2[a.switch_iter + 1]:.3f} -> {l2[a.train_iters]:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
