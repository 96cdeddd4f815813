"""Megatron-LM's own `pretrain()` on the CPU (tests/megatron_lm_loop.py: gloo ranks, a shim that
maps CUDA placement to the CPU), at core_v0.16.1 and core_v0.19.0, on a tiny GPT with mock data.
Each test compares the numbers of one run with those of an independent one: the in-run switch
with the dense relaunch, context parallelism with one rank, the `--lighthouse-eval-attention both`
evaluation with `dense`, a reload with the run that never stopped, each route into Megatron-LM
(entry point, patch, `--spec`) with the others, a dense run with stock Megatron-LM's.

Checkpoints are compared bit for bit, logged losses to Megatron-LM's printed precision.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from .megatron_lm_loop import (
    LIGHTHOUSE,
    MODEL,
    TAGS,
    TRAINING,
    Run,
    assert_losses,
    assert_same_checkpoint,
    checkpoint,
    launch,
)
from .test_patches import apply_patch, snapshot

pytest.importorskip("megatron.core")

V016, V019 = TAGS
SWITCH, TOTAL = 3, 6
SCHEDULE = [*MODEL, *TRAINING, "--train-iters", str(TOTAL), "--eval-interval", str(SWITCH),
            "--save-interval", str(SWITCH)]
# Stage 1 of the two-stage workflow in one run: Lighthouse to iteration 3 (saved), then the in-run
# switch to dense attention until 6 (saved); validation at 3 (both evaluations) and 6.
STAGE1 = [*SCHEDULE, *LIGHTHOUSE, "--lighthouse-until-iter", str(SWITCH)]
LIGHTHOUSE_YAML = "levels: 2\npooling_factor: 2\ntopk: 8\ntile_topk: 2\ndense_layers: [-1]\n"


@dataclass
class Launched:
    run: Run
    ckpt: Path


class Launches:
    """The runs of this module, each launched once and shared by the tests that read it."""

    def __init__(self, factory):
        self.factory, self.done = factory, {}

    def __call__(self, tag: str, name: str, *args: str, save: bool = False, **kwargs) -> Launched:
        if (tag, name) not in self.done:
            path = self.factory.mktemp(f"{tag}-{name}")
            ckpt = path / "ckpt"
            run = launch(tag, *args, *(["--save", str(ckpt)] if save else []), tmp_path=path / "logs",
                         **kwargs)
            self.done[tag, name] = Launched(run, ckpt)
        return self.done[tag, name]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return Launches(tmp_path_factory)


def stage1(runs, tag) -> Launched:
    return runs(tag, "stage1", *STAGE1, save=True)


# ------------------------------------------------------------- the two-stage workflow


@pytest.mark.parametrize("tag", TAGS)
def test_in_run_switch_equals_dense_relaunch(runs, tag):
    """From the iteration-3 checkpoint, Megatron-LM's dense model (--attention-impl dense) trains
    exactly what the Lighthouse run computed after its --lighthouse-until-iter switch."""
    s1 = stage1(runs, tag)
    dense = runs(tag, "relaunch", *STAGE1, "--attention-impl", "dense", "--load", str(s1.ckpt),
                 "--ckpt-step", str(SWITCH), save=True)
    assert "LighthouseCoreAttention x3" in s1.run.first and "LighthouseCoreAttention" not in dense.run.first
    assert f"at iteration {SWITCH}" in dense.run.first and "loaded checkpoint" in dense.run.first
    assert_losses(dense.run.losses(), s1.run.losses(), range(SWITCH + 1, TOTAL + 1))
    assert dense.run.validations() == {TOTAL: s1.run.validations()[TOTAL]} != {}
    assert dense.run.final_validation() == s1.run.final_validation() != {}
    assert_same_checkpoint(dense.ckpt, s1.ckpt, TOTAL)


@pytest.mark.parametrize("tag", [pytest.param(V016, marks=pytest.mark.slow), V019])
def test_relaunch_with_no_step_left_evaluates_dense(runs, tag):
    """A relaunch from the last checkpoint with --train-iters equal to its iteration only
    evaluates: past --lighthouse-until-iter that is the dense model (core 0.19 sets
    curr_iteration to 0 before train(), which then takes no step)."""
    s1 = stage1(runs, tag)
    zero = runs(tag, "no-step-left", *STAGE1, "--load", str(s1.ckpt))
    assert "LighthouseCoreAttention x3" in zero.run.first and f"at iteration {TOTAL}" in zero.run.first
    assert zero.run.losses() == {}
    # The same batches as stage 1's own validation after training, the same dense model: one number.
    assert set(zero.run.final_validation()) == {"lm loss"}
    assert zero.run.final_validation() == s1.run.final_validation()


@pytest.mark.parametrize("tag", [pytest.param(V016, marks=pytest.mark.slow), V019])
def test_patched_script_equals_the_entry_point(runs, tag, tmp_path):
    """A user's pretrain_gpt.py with patches/'s patch runs what the entry point runs, the
    --lighthouse-eval-attention evaluation included."""
    s1 = stage1(runs, tag)
    work = tmp_path / "script"
    work.mkdir()
    apply_patch(tag, work)
    patched = runs(tag, "patched", *STAGE1, target=str(work / "pretrain_gpt.py"), pythonpath=(work,),
                   save=True)
    assert set(patched.run.validations()[SWITCH]) == {"lm loss", "lm loss dense"}
    assert patched.run.validations() == s1.run.validations()
    assert_losses(patched.run.losses(), s1.run.losses(), range(1, TOTAL + 1), abs=0)
    assert_same_checkpoint(patched.ckpt, s1.ckpt, TOTAL)


# ---------------------------------------------------------------- the --spec route (0.19)


def _spec_route(runs, name, *extra, yaml=LIGHTHOUSE_YAML, check=True):
    path = runs.factory.mktemp("lighthouse-config") / "lighthouse.yaml"
    path.write_text(yaml)
    # No Lighthouse flag: stock Megatron-LM's parser takes none.
    return runs(V019, name, *SCHEDULE, *extra, "--spec", "lighthouse_megatron.megatron_lm.core_v0_19",
                "lighthouse_spec_from_env", target=str(snapshot(V019) / "pretrain_gpt.py"),
                env={"LIGHTHOUSE_CONFIG": str(path)}, save=check, check=check)


def test_spec_route_switches_at_until_iter(runs):
    """Stock pretrain_gpt.py with --spec and until_iter in $LIGHTHOUSE_CONFIG trains exactly what
    the entry point's --lighthouse-until-iter run trains."""
    s1 = stage1(runs, V019)
    spec = _spec_route(runs, "spec", yaml=LIGHTHOUSE_YAML + f"until_iter: {SWITCH}\n")
    assert_losses(spec.run.losses(), s1.run.losses(), range(1, TOTAL + 1), abs=0)
    assert_same_checkpoint(spec.ckpt, s1.ckpt, TOTAL)
    # Megatron-LM's own validation: the model as it trains (no dense evaluation on this route).
    assert spec.run.validations() == {it: {"lm loss": v["lm loss"]} for it, v in s1.run.validations().items()}
    assert "LighthouseCoreAttention x3" in spec.run.first  # the log says what the layers are


SPEC_REFUSALS = {
    "eval-attention": (LIGHTHOUSE_YAML + "eval_attention: dense\n", [],
                       "eval_attention 'dense' cannot be honoured here"),
    "reset-attention-mask": (LIGHTHOUSE_YAML, ["--reset-attention-mask"],
                             "--reset-attention-mask is not supported"),
}


@pytest.mark.parametrize("case", list(SPEC_REFUSALS))
def test_spec_route_refuses_what_it_cannot_honour(runs, case):
    """What the route cannot do stops the run when Megatron-LM builds the model: exit code 2 and
    one `error:` line per rank, no traceback."""
    yaml, extra, message = SPEC_REFUSALS[case]
    refused = _spec_route(runs, f"spec-{case}", *extra, yaml=yaml, check=False).run
    errors = [line for line in refused.first.splitlines() if line.startswith("error:")]
    assert refused.returncode == 2, refused.tail()
    assert len(errors) == 1 and message in errors[0], refused.tail()
    assert errors[0].startswith("error: --spec lighthouse_megatron.megatron_lm.core_v0_19")
    assert "Traceback" not in refused.first


# --------------------------------------------------------------- context parallelism


EVAL = [*MODEL, *TRAINING, *LIGHTHOUSE, "--train-iters", "4", "--eval-interval", "2"]
# Core 0.19 takes one --cp-comm-type per layer: every type in one model (0.16 indexes the list
# off by one, so p2p alone there).
HIERARCHY = ["--hierarchical-context-parallel-sizes", "2", "1"]  # a2a+p2p's: a2a over 2, p2p over 1
COMM_TYPES = ["--cp-comm-type", "p2p", "all_gather", "a2a", "a2a+p2p", *HIERARCHY]


def _cp1_dense_evaluation(runs, tag) -> Run:
    """CP = 1, validation with dense attention only: the reference of the CP runs."""
    return runs(tag, "cp1", *EVAL, "--lighthouse-eval-attention", "dense").run


def _assert_cp_equals_cp1(run: Run, reference: Run) -> None:
    assert_losses(run.losses(), reference.losses(), range(1, 5), abs=2e-5)  # Lighthouse training
    dense = {it: v["lm loss dense"] for it, v in run.validations().items()}
    assert dense == pytest.approx({it: v["lm loss dense"] for it, v in reference.validations().items()},
                                  abs=2e-5, rel=0)
    assert run.final_validation()["lm loss dense"] == pytest.approx(
        reference.final_validation()["lm loss dense"], abs=2e-5, rel=0)


@pytest.mark.parametrize("masks", [[], ["--no-create-attention-mask-in-dataloader"]],
                         ids=["masks", "no-masks"])
def test_cp2_evaluation_both_equals_dense_and_cp1(runs, masks):
    """CP = 2 with every --cp-comm-type, --lighthouse-eval-attention both: the Lighthouse training
    and the dense validation equal CP = 1's (core 0.19's get_batch splits the replayed batch in
    place; with the dataloader's masks the second split failed the causal-mask check, without
    them the dense forward saw a quarter of each sequence)."""
    reference = _cp1_dense_evaluation(runs, V019)
    run = runs(V019, f"cp2-{'-'.join(masks) or 'masks'}", *EVAL, "--context-parallel-size", "2", *COMM_TYPES,
               *masks, nproc=2).run
    assert all(set(v) == {"lm loss", "lm loss dense"} for v in run.validations().values())
    _assert_cp_equals_cp1(run, reference)


def test_tp2_cp2_evaluation_both_equals_cp1(runs):
    """TP = 2 x CP = 2 (a TP rank broadcasts the batch to the others, whose buffers are sized
    for one CP split: a second split aborted the broadcast)."""
    reference = _cp1_dense_evaluation(runs, V019)
    run = runs(V019, "tp2-cp2", *EVAL, "--context-parallel-size", "2", "--tensor-model-parallel-size", "2",
               nproc=4).run
    _assert_cp_equals_cp1(run, reference)


@pytest.mark.slow
@pytest.mark.parametrize("comm", [["p2p"], ["all_gather"], ["a2a"], ["a2a+p2p", *HIERARCHY]],
                         ids=lambda c: c[0])
@pytest.mark.parametrize("tag", TAGS)
def test_cp2_each_comm_type_equals_cp1(runs, tag, comm):
    if tag == V016 and comm[0] != "p2p":
        pytest.skip("core 0.16 runs every --cp-comm-type through the same module; p2p stands for them")
    reference = _cp1_dense_evaluation(runs, tag)
    run = runs(tag, f"cp2-{comm[0]}", *EVAL, "--context-parallel-size", "2", "--cp-comm-type", *comm,
               nproc=2).run
    _assert_cp_equals_cp1(run, reference)


# ------------------------------------------------------------------ reloads


RELOADS = {
    # One query group over two TP ranks (the ranks max-reduce the group's query scores).
    "gqa1-tp2": ["--num-query-groups", "1", "--tensor-model-parallel-size", "2"],
    # Experts over two ranks (MoE under TP needs sequence parallelism, which Megatron-LM's local
    # norms lack: Transformer Engine's only).
    "moe-ep2": ["--num-experts", "4", "--moe-router-topk", "2", "--moe-ffn-hidden-size", "64",
                "--moe-token-dispatcher-type", "allgather", "--expert-model-parallel-size", "2"],
}


@pytest.mark.parametrize("model", list(RELOADS))
@pytest.mark.parametrize("tag", [pytest.param(V016, marks=pytest.mark.slow), V019])
def test_reload_continues_exactly(runs, tag, model):
    """Stopped at iteration 2 and reloaded, a Lighthouse run trains on bit for bit as if it never
    stopped."""
    if tag == V016 and model.startswith("moe"):
        pytest.skip("core 0.16.1's MoE router needs Transformer Engine (te_general_gemm is undefined "
                    "without it)")
    args = [*MODEL, *TRAINING, *LIGHTHOUSE, "--train-iters", "4", "--eval-interval", "4",
            "--save-interval", "2", *RELOADS[model]]
    whole = runs(tag, f"{model}-whole", *args, nproc=2, save=True)
    resumed = runs(tag, f"{model}-resumed", *args, "--load", str(whole.ckpt), "--ckpt-step", "2", nproc=2,
                   save=True)
    assert "at iteration 2" in resumed.run.first
    assert_losses(resumed.run.losses(), whole.run.losses(), [3, 4])
    assert_same_checkpoint(resumed.ckpt, whole.ckpt, 4)


# ------------------------------------------------- dense runs with --transformer-impl local


@pytest.mark.parametrize("tag", [pytest.param(V016, marks=pytest.mark.slow), V019])
def test_dense_local_run_the_package_cannot_serve_is_megatron_lms_own(runs, tag):
    """A dense model with settings this package's dense attention lacks (a learnable softmax
    offset, a sliding window) is Megatron-LM's own model: the entry point trains exactly what
    stock pretrain_gpt.py trains (it once swapped in its own attention and failed at build)."""
    args = [*MODEL, *TRAINING, "--train-iters", "3", "--eval-interval", "3", "--save-interval", "3",
            "--softmax-type", "learnable", "--window-size", "(16,0)"]
    stock = runs(tag, "stock-dense", *args, target=str(snapshot(tag) / "pretrain_gpt.py"), save=True)
    ours = runs(tag, "entry-dense", *args, save=True)
    assert_losses(ours.run.losses(), stock.run.losses(), [1, 2, 3], abs=0)
    assert_same_checkpoint(ours.ckpt, stock.ckpt, 3)
    assert any("softmax_offset" in key for key in checkpoint(ours.ckpt, 3))  # the learnable offset trained


# ------------------------------------------------------------- the recipe's variants

# Iteration indices 1 and 3 dense for every layer; the Lighthouse layers turn dense one by one from
# 2; k doubles from 2 on; every layer dense from 5.
RECIPE = ["--lighthouse-until-iter", "5", "--lighthouse-dense-every", "2",
          "--lighthouse-progressive-iters", "3", "--lighthouse-grow-topk-iters", "3"]


@pytest.mark.slow
@pytest.mark.parametrize("tag", TAGS)
def test_recipe_variants_resume_inside_their_windows(runs, tag):
    """The three variants together in Megatron-LM's loop: resumed from the iteration-3 checkpoint
    (inside both windows) the run trains exactly what the run that never stopped trains, since the
    schedule is a function of Megatron-LM's iteration; and the variants change the run (against
    the hard switch at 5)."""
    args = [*SCHEDULE, *LIGHTHOUSE, *RECIPE]
    whole = runs(tag, "recipe", *args, save=True)
    resumed = runs(tag, "recipe-resumed", *args, "--load", str(whole.ckpt), "--ckpt-step", str(SWITCH),
                   save=True)
    assert f"at iteration {SWITCH}" in resumed.run.first
    assert_losses(resumed.run.losses(), whole.run.losses(), range(SWITCH + 1, TOTAL + 1))
    assert_same_checkpoint(resumed.ckpt, whole.ckpt, TOTAL)
    hard = runs(tag, "recipe-hard", *SCHEDULE, *LIGHTHOUSE, "--lighthouse-until-iter", "5")
    assert whole.run.losses()[1] == hard.run.losses()[1]  # iteration index 0: Lighthouse in both
    assert whole.run.losses()[2] != hard.run.losses()[2]  # index 1: dense in the recipe
