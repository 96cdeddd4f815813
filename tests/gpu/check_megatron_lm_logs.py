"""Checks the two logs of tests/gpu/run_megatron_lm.sh (Megatron-LM's own log lines).

    python tests/gpu/check_megatron_lm_logs.py STAGE1_LOG STAGE2_LOG --switch-iter 20 --train-iters 40

Asserts: stage 1 built Lighthouse layers (the plugin's announcement) and trained
iterations 1..switch, then saved; stage 2 built Megatron-LM's dense layers, loaded the
checkpoint at iteration `switch` and trained switch+1..train_iters; every loss finite;
the loss fell (last 5 iterations of stage 2 below the first 5 of stage 1) and the switch
did not restart training (stage 2's first losses near stage 1's last ones, far below
the start). With --expect-dense-eval: stage 1's validation lines carry both Megatron-LM's
"lm loss" and the plugin's "lm loss dense" (--lighthouse-eval-attention both), stage 2's
only "lm loss". With --same-as LOG: that run (stage 2 of the same checkpoint another way,
e.g. the in-run switch) logged the same first losses as stage 2, within --tolerance.
Prints one verdict line; exit code 1 on a failure.

Losses are compared per iteration. Megatron-LM logs a launch's first iteration without
resetting its running sum, so the next logged loss is the average of the launch's first two
iterations (a resumed stage 2 logs the mean of iterations 21 and 22 as iteration 22): `losses`
undoes that average, which needs `--log-interval 1`.
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


# ` validation loss at iteration 10 | lm loss value: 5.1E+00 | lm loss PPL: ... |` during training;
# after it, the same with "on validation set" (and "on test set") before the first bar.
VALIDATION = re.compile(r"validation loss at iteration (\d+)(\s+on [^|]*?)?\s*\|(.*)")
VALUE = re.compile(r"\s*(lm loss(?: dense)?) value:\s*(-?(?:[0-9.]+E[-+]\d+|NAN|INF))", re.IGNORECASE)


def logged_losses(text: str) -> list[tuple[int, float]]:
    """(iteration, loss) as Megatron-LM printed them, in order."""
    return [(int(m.group(1)), float(m.group(3))) for m in ITERATION.finditer(text)]


def losses(text: str) -> dict[int, float]:
    """{iteration: that iteration's loss}. Megatron-LM's training log does not reset its running sum
    after a launch's first iteration, so the next line prints the mean of the launch's first two
    iterations: undone here. A line covering more iterations (--log-interval > 1) has no
    per-iteration value: ValueError."""
    out: dict[int, float] = {}
    previous = first = None
    for iteration, loss in logged_losses(text):
        if previous is None or iteration <= previous:  # a launch starts (logs may be concatenated)
            first = iteration
        elif iteration != previous + 1:
            raise ValueError(f"iterations {previous + 1}..{iteration} are logged as one average; per-"
                             "iteration losses need Megatron-LM's --log-interval 1")
        elif previous == first:
            loss = 2 * loss - out[first]
        out[iteration] = loss
        previous = iteration
    return out


def _fields(values: str) -> dict[str, float]:
    return {v.group(1): float(v.group(2)) for v in map(VALUE.match, values.split("|")) if v}


def validations(text: str) -> dict[int, dict[str, float]]:
    """{iteration: {"lm loss": ..., "lm loss dense": ...}} from the validations during training."""
    return {int(m.group(1)): _fields(m.group(3)) for m in VALIDATION.finditer(text) if m.group(2) is None}


def final_validation(text: str) -> dict[str, float]:
    """The validation after training (`... at iteration N on validation set | ...`), {} if none."""
    found = [m for m in VALIDATION.finditer(text) if (m.group(2) or "").strip() == "on validation set"]
    return _fields(found[-1].group(3)) if found else {}


def check_dense_eval(stage1: str, stage2: str) -> list[str]:
    problems = []
    v1, v2 = validations(stage1), validations(stage2)
    if not v1:
        problems.append("stage 1 logged no validation line")
    for it, fields in sorted(v1.items()):
        if set(fields) != {"lm loss", "lm loss dense"} or not all(map(math.isfinite, fields.values())):
            problems.append(f"stage 1 validation at iteration {it} logged {fields}, expected finite "
                            "'lm loss' and 'lm loss dense'")
    for it, fields in sorted(v2.items()):
        if set(fields) != {"lm loss"}:
            problems.append(f"stage 2 (dense) validation at iteration {it} logged {sorted(fields)}, "
                            "expected only 'lm loss'")
    return problems


def check_same(stage2: str, other: str, first: int, count: int, tolerance: float) -> list[str]:
    a, b = losses(stage2), losses(other)
    its = list(range(first, first + count))
    if not all(i in a and i in b for i in its):
        return [f"iterations {its} missing from one of the two stage-2 logs"]
    for i in its:
        if not abs(a[i] - b[i]) <= tolerance:
            return [f"dense losses of iteration {i} differ by {abs(a[i] - b[i]):.4f} > {tolerance}: per "
                    f"iteration {[round(a[j], 6) for j in its]} vs {[round(b[j], 6) for j in its]}"]
    return []


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
    p.add_argument("--expect-dense-eval", action="store_true")
    p.add_argument("--same-as", metavar="LOG")
    p.add_argument("--same-iters", type=int, default=3)
    p.add_argument("--tolerance", type=float, default=0.02)
    a = p.parse_args()
    with open(a.stage1) as f1, open(a.stage2) as f2:
        s1, s2 = f1.read(), f2.read()
    try:
        problems = check(s1, s2, a.switch_iter, a.train_iters)
        if a.expect_dense_eval:
            problems += check_dense_eval(s1, s2)
        if a.same_as:
            with open(a.same_as) as f:
                problems += check_same(s2, f.read(), a.switch_iter + 1, a.same_iters, a.tolerance)
        l1, l2 = losses(s1), losses(s2)
    except ValueError as e:
        problems = [str(e)]
    if problems:
        print("FAILED: " + "; ".join(problems))
        return 1
    extra = ""
    if a.expect_dense_eval:
        it, fields = max(validations(s1).items())
        extra += (f"; stage 1 validation at {it}: lm loss {fields['lm loss']:.3f}, "
                  f"lm loss dense {fields['lm loss dense']:.3f}")
    if a.same_as:
        extra += (f"; the dense losses of iterations {a.switch_iter + 1}..{a.switch_iter + a.same_iters} "
                  f"match {a.same_as} within {a.tolerance}")
    print(f"OK: stage 1 (Lighthouse) loss {l1[1]:.3f} -> {l1[a.switch_iter]:.3f}, stage 2 (dense, "
          f"loaded iteration {a.switch_iter}) {l2[a.switch_iter + 1]:.3f} -> {l2[a.train_iters]:.3f}"
          + extra)
    return 0


if __name__ == "__main__":
    sys.exit(main())
