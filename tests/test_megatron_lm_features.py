"""Megatron-LM features a production launch combines (issue 21): each is refused at argument
time with one `error:` line against the real core_v0.16.1 and core_v0.19.0 trees, or works
(the iteration of evaluation-only runs, `--lighthouse-eval-attention`, the dense spec with
`--transformer-impl local`, the TE CP attention cache at any depth)."""

from __future__ import annotations

import argparse
import os
import subprocess

import pytest
import torch

pytest.importorskip("megatron.core")

from lighthouse_megatron.megatron import forced_dense, schedule  # noqa: E402
from lighthouse_megatron.megatron_lm import launch  # noqa: E402
from lighthouse_megatron.settings.lighthouse import (  # noqa: E402
    add_lighthouse_args,
    validate_lighthouse_args,
)

from .megatron_lm_loop import python_for  # noqa: E402
from .test_patches import LIGHTHOUSE, TINY, snapshot  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TAGS = ("core_v0.16.1", "core_v0.19.0")

# flags -> the start of the one error line (the flag as given, then what to do).
REFUSED = {
    "cuda-graph-impl": (["--cuda-graph-impl", "local"], "error: --cuda-graph-impl local is not supported"),
    "enable-cuda-graph": (["--enable-cuda-graph"], "error: --"),  # 0.19 turns it into --cuda-graph-impl
    "yaml-cfg": (["--yaml-cfg", "model.yaml"], "error: --yaml-cfg is not supported"),
    "spec": (["--spec", "my_specs", "layer_spec"], "error: --spec my_specs layer_spec is not supported"),
    "hybrid-cp": (["--hybrid-context-parallel"], "error: --hybrid-context-parallel is not supported"),
    "relative": (["--position-embedding-type", "relative"],
                 "error: --position-embedding-type relative is not supported"),
    "attention-backend-local": (["--attention-backend", "local"],
                                "error: --attention-backend local is not supported"),
    "eval-both-with-pp": (["--pipeline-model-parallel-size", "3", "--lighthouse-eval-attention", "both"],
                          "error: --lighthouse-eval-attention both with --pipeline-model-parallel-size 3"),
}


def _entry(tag: str, *argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(snapshot(tag)), ROOT]),
           "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "OMP_NUM_THREADS": "1"}
    return subprocess.run([python_for(tag), "-m", "lighthouse_megatron.megatron_lm.pretrain_gpt", *argv],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)


# Two cases per tree in the default run (each start imports Megatron-LM: ~10-25 s), the rest `slow`.
FAST = ("cuda-graph-impl", "yaml-cfg")


@pytest.mark.parametrize("case", [c if c in FAST else pytest.param(c, marks=pytest.mark.slow)
                                  for c in REFUSED])
@pytest.mark.parametrize("tag", TAGS)
def test_refused_at_argument_time_with_one_line(tag, case):
    """Before pretrain(), so before any process group: exit 2, one error line, no traceback."""
    flags, start = REFUSED[case]
    proc = _entry(tag, *TINY, *LIGHTHOUSE, *flags)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(errors) == 1 and errors[0].startswith(start), proc.stderr[-3000:]
    assert "initialized torch distributed" not in proc.stdout.lower()


def test_cuda_graph_refusal_names_the_fix():
    args = _args("--cuda-graph-impl", "transformer_engine")
    with pytest.raises(ValueError, match="--cuda-graph-impl transformer_engine is not supported.*"
                                         "--cuda-graph-impl none"):
        validate_lighthouse_args(args)
    validate_lighthouse_args(_args("--cuda-graph-impl", "none"))


def _args(*extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seq-length", type=int, default=64)
    parser.add_argument("--num-layers", type=int, default=3)
    parser.add_argument("--num-attention-heads", type=int, default=4)
    parser.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    parser.add_argument("--cuda-graph-impl", default="none")
    add_lighthouse_args(parser)
    return parser.parse_args(["--attention-impl", "lighthouse", "--lighthouse-levels", "2",
                              "--lighthouse-pooling-factor", "2", "--lighthouse-topk", "8",
                              "--lighthouse-tile-topk", "2", *extra])


def test_yaml_cfg_is_caught_on_the_command_line():
    launch.refuse_yaml_cfg(["--num-layers", "2"])
    for argv in (["--yaml-cfg", "a.yaml"], ["--yaml-cfg=a.yaml"]):
        with pytest.raises(ValueError, match="--yaml-cfg is not supported"):
            launch.refuse_yaml_cfg(argv)


# ------------------------------------------------------------------ evaluation-only runs


def test_evaluation_only_runs_read_the_loaded_iteration():
    """--skip-train never sets curr_iteration, core 0.19 sets it to 0 before a train() that takes
    no step: the loaded iteration decides the attention until training moves past it.
    (Megatron-LM's real loop: test_megatron_lm_loop.py::test_relaunch_with_no_step_left_evaluates_dense.)"""
    loaded = argparse.Namespace(iteration=30)
    assert launch.megatron_lm_iteration(loaded) == 30
    assert launch.megatron_lm_iteration(argparse.Namespace(iteration=30, curr_iteration=0)) == 30
    assert launch.megatron_lm_iteration(argparse.Namespace(iteration=30, curr_iteration=34)) == 34
    assert launch.megatron_lm_iteration(argparse.Namespace(curr_iteration=3)) == 3
    assert launch.megatron_lm_iteration(argparse.Namespace()) is None
    from lighthouse_megatron.megatron import LighthouseCoreAttention
    from lighthouse_megatron.recipe import RecipeSchedule

    layer = LighthouseCoreAttention.__new__(LighthouseCoreAttention)
    torch.nn.Module.__init__(layer)
    layer.schedule, layer.rank, layer.count = RecipeSchedule(until_iter=20), 0, 1
    schedule.set_iteration_source(lambda: launch.megatron_lm_iteration(loaded))
    try:
        assert layer.is_dense_now()  # past --lighthouse-until-iter 20: dense, as the user expects
        loaded.iteration = 10
        assert not layer.is_dense_now()
        with forced_dense():
            assert layer.is_dense_now()
        assert not layer.is_dense_now()
    finally:
        schedule.set_iteration(0)


# ------------------------------------------------------------- --lighthouse-eval-attention


def test_eval_attention_default_and_choices():
    assert _args().lighthouse_eval_attention is None
    args = _args()
    validate_lighthouse_args(args)
    assert args.lighthouse_eval_attention == "both"
    args = _args("--pipeline-model-parallel-size", "2")
    validate_lighthouse_args(args)
    assert args.lighthouse_eval_attention == "dense"  # "both" needs one stage
    with pytest.raises(SystemExit):
        _args("--lighthouse-eval-attention", "sparse")


class _Model(torch.nn.Module):
    """Stands for Megatron's model: its output says whether the layers ran dense."""

    def forward(self, batch):
        return batch * (2.0 if schedule.dense_forced() else 1.0)


def _forward_step(data_iterator, model):
    """Megatron-LM's forward_step contract: (output, loss_func) with a report dict."""
    batch = next(data_iterator)
    output = model(batch)

    def loss_func(output_tensor):
        loss = output_tensor.sum()
        return loss, torch.tensor(1), {"lm loss": torch.stack([loss, torch.tensor(1.0)])}

    return output, loss_func


@pytest.mark.parametrize("mode", ["model", "dense", "both"])
def test_eval_attention_forward_step(mode):
    args = argparse.Namespace(attention_impl="lighthouse", lighthouse_until_iter=100, curr_iteration=5,
                              lighthouse_eval_attention=mode)
    step = launch.eval_attention_forward_step(_forward_step, lambda: args)
    model = _Model().eval()
    data = iter([torch.tensor([1.0, 2.0]), torch.tensor([10.0, 20.0])])
    output, loss_func = step(data, model)
    loss, _, report = loss_func(output)
    expected = {"model": {"lm loss": 3.0}, "dense": {"lm loss dense": 6.0},
                "both": {"lm loss": 3.0, "lm loss dense": 6.0}}[mode]  # both: the same batch
    assert {k: v[0].item() for k, v in report.items()} == expected
    assert loss.item() == (6.0 if mode == "dense" else 3.0)
    assert next(data).tolist() == [10.0, 20.0]  # one batch consumed, whatever the mode
    assert not schedule.dense_forced()


def test_eval_attention_leaves_training_and_dense_stages_alone():
    args = argparse.Namespace(attention_impl="lighthouse", lighthouse_until_iter=10, curr_iteration=5,
                              lighthouse_eval_attention="both")
    step = launch.eval_attention_forward_step(_forward_step, lambda: args)
    train_model = _Model().train()
    output, loss_func = step(iter([torch.tensor([1.0])]), train_model)
    assert set(loss_func(output)[2]) == {"lm loss"}
    args.curr_iteration = 10  # the layers already run dense: one evaluation
    output, loss_func = step(iter([torch.tensor([1.0])]), _Model().eval())
    assert set(loss_func(output)[2]) == {"lm loss"}
    args.curr_iteration, args.attention_impl = 5, "dense"
    output, loss_func = step(iter([torch.tensor([1.0])]), _Model().eval())
    assert set(loss_func(output)[2]) == {"lm loss"}


# ------------------------------------------------------------------- TE CP module cache


def test_te_cp_modules_are_keyed_by_group_not_by_layer():
    """Every layer builds its own ContextParallel over the same groups: 200 layers share one
    cache key (the cache once held 64 entries keyed per layer and rebuilt past 64 layers)."""
    from lighthouse_megatron.parallel.attention import te_cp_module_key
    from lighthouse_megatron.parallel.context import ContextParallel

    group, other = object(), object()
    layers = [ContextParallel(group, "p2p") for _ in range(200)]
    keys = {te_cp_module_key(8, 2, 64, 0.125, torch.bfloat16, 0, "bshd", cp) for cp in layers}
    assert len(keys) == 1
    assert te_cp_module_key(8, 2, 64, 0.125, torch.bfloat16, 0, "bshd", ContextParallel(other)) not in keys
    assert te_cp_module_key(8, 2, 64, 0.125, torch.bfloat16, 0, "bshd",
                            ContextParallel(group, "a2a")) not in keys
    hier = [ContextParallel(group, "a2a+p2p", te_group=[group, other]) for _ in range(2)]
    assert len({te_cp_module_key(8, 2, 64, 0.125, torch.bfloat16, 0, "bshd", cp) for cp in hier}) == 1


# ------------------------------------- dense runs with --transformer-impl local (no OOM)


def _launch_args(**kw):
    base = dict(attention_impl="dense", transformer_impl="local", context_parallel_size=1, spec=None,
                attention_dropout=0.0)
    return argparse.Namespace(**{**base, **kw})


def test_dense_local_runs_use_the_package_dense_spec():
    assert launch.uses_package_spec(_launch_args())
    assert launch.uses_package_spec(_launch_args(context_parallel_size=2))
    # Megatron-LM's own spec: with TE, with a --spec of the user's, or settings the package's dense
    # attention does not serve exactly (Megatron-LM's real loop:
    # test_megatron_lm_loop.py::test_dense_local_run_the_package_cannot_serve_is_megatron_lms_own).
    assert not launch.uses_package_spec(_launch_args(transformer_impl="transformer_engine"))
    assert not launch.uses_package_spec(_launch_args(spec=["my", "spec"]))
    for setting in ({"attention_dropout": 0.1}, {"multi_latent_attention": True},
                    {"softmax_type": "learnable"}, {"softmax_type": "off-by-one"}, {"window_size": (16, 0)},
                    {"sft": True}, {"experimental_attention_variant": "dsa"}, {"reset_attention_mask": True}):
        assert not launch.uses_package_spec(_launch_args(**setting)), setting


@pytest.mark.parametrize("setting, start", [
    ({"attention_dropout": 0.1}, "--attention-dropout 0.1 with --transformer-impl local and "
                                 "--context-parallel-size 2: Megatron-LM's local attention has no context "
                                 "parallelism"),
    ({"softmax_type": "learnable"}, "--softmax-type learnable with --transformer-impl local"),
])
def test_dense_local_runs_under_cp_that_neither_spec_serves_are_refused(setting, start):
    args = _launch_args(context_parallel_size=2, **setting)
    with pytest.raises(ValueError, match="^" + start) as e:
        validate_lighthouse_args(args)
    assert "--transformer-impl transformer_engine" in str(e.value)
    validate_lighthouse_args(_launch_args(context_parallel_size=2))
    validate_lighthouse_args(_launch_args(**setting))  # CP = 1: Megatron-LM's own spec


@pytest.fixture
def one_rank():
    from .megatron_testing import init_parallel

    init_parallel()


def test_package_dense_spec_has_megatron_lms_keys_and_output(one_rank, monkeypatch):
    """The package's dense spec (what a dense relaunch with --transformer-impl local builds) has
    the state-dict keys of Megatron-LM's local spec, and its core attention computes what
    megatron-core's DotProductAttention computes, without the [b*heads, s, s] scores."""
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from lighthouse_megatron.megatron import DenseCoreAttention

    from .megatron_testing import build_gpt, tiny_config

    config = tiny_config()
    args = argparse.Namespace(**{**vars(_launch_args()), "lighthouse_until_iter": None,
                                 "normalization": "LayerNorm", "qk_l2_norm": False})
    from lighthouse_megatron.settings.lighthouse import resolve_lighthouse_args

    resolve_lighthouse_args(args)
    ours = build_gpt(config, launch.spec_provider_from_args(args)(config))
    theirs = build_gpt(config, get_gpt_layer_local_spec())
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert [type(layer.self_attention.core_attention) for layer in ours.decoder.layers] == \
        [DenseCoreAttention] * config.num_layers

    # megatron-core's DotProductAttention on the CPU: its score buffer and dropout RNG fork
    # are CUDA-only; neither changes the math (dropout is 0).
    monkeypatch.setattr(parallel_state.get_global_memory_buffer(), "get_tensor",
                        lambda shape, dtype, name: torch.empty(shape, dtype=dtype))
    import contextlib

    monkeypatch.setattr(tensor_parallel.get_cuda_rng_tracker(), "fork",
                        lambda *a, **k: contextlib.nullcontext())
    kw = dict(config=config, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")
    reference, dense = DotProductAttention(**kw), DenseCoreAttention(**kw)
    g = torch.Generator().manual_seed(0)
    s, b, d = 16, 2, config.kv_channels
    q = torch.randn(s, b, config.num_attention_heads, d, generator=g)
    k, v = (torch.randn(s, b, config.num_query_groups, d, generator=g) for _ in range(2))
    # An explicit causal mask (True = masked): megatron-core builds its default one on CUDA.
    mask = torch.ones(s, s, dtype=torch.bool).triu(1)[None, None]
    expected = reference(q, k, v, mask, attn_mask_type=AttnMaskType.causal)
    torch.testing.assert_close(dense(q, k, v, mask), expected, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------- MoE models


def _moe_config(**kw):
    from .megatron_testing import tiny_config

    return tiny_config(num_layers=4, num_moe_experts=4, moe_router_topk=2, moe_layer_freq=[1, 0, 1, 1],
                       moe_token_dispatcher_type="allgather", moe_ffn_hidden_size=64,
                       moe_aux_loss_coeff=0.0, **kw)


def _moe_models(device="cpu", use_te=False, parallel_output=False):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec as mcore_block_spec

    from lighthouse_megatron import LighthouseConfig
    from lighthouse_megatron.megatron import get_gpt_decoder_block_spec as our_block_spec

    from .megatron_testing import LH, build_gpt

    config = _moe_config()
    lh = LighthouseConfig(**{**LH.to_dict(), "dense_layers": (-1,)})
    kw = dict(device=device, parallel_output=parallel_output)
    ours = build_gpt(config, our_block_spec(config, lighthouse=lh, use_te=use_te), **kw)
    theirs = build_gpt(config, mcore_block_spec(config, use_transformer_engine=use_te,
                                                normalization=config.normalization), **kw)
    dense = build_gpt(config, our_block_spec(config, attention_impl="dense", use_te=use_te), **kw)
    return ours, theirs, dense


def test_moe_models_build_and_load_under_megatrons_moe_spec(one_rank):
    """Lighthouse only replaces the core attention: a MoE model (expert and dense MLPs as
    moe_layer_freq says) builds with Lighthouse layers, and its weights load into the model of
    megatron-core's own MoE block spec (what Megatron-LM builds with --num-experts, e.g. for the
    dense recovery), key for key. (megatron-core's router needs CUDA to run: see the GPU test.)"""
    from megatron.core.transformer.moe.moe_layer import MoELayer

    from lighthouse_megatron.megatron import DenseCoreAttention, LighthouseCoreAttention

    ours, theirs, dense = _moe_models()
    layers = ours.decoder.layers
    assert [type(layer.self_attention.core_attention) for layer in layers] == \
        [LighthouseCoreAttention] * 3 + [DenseCoreAttention]
    assert [isinstance(layer.mlp, MoELayer) for layer in layers] == [True, False, True, True]
    assert [type(a.mlp) for a in layers] == [type(b.mlp) for b in theirs.decoder.layers]
    assert list(ours.state_dict()) == list(theirs.state_dict()) == list(dense.state_dict())
    theirs.load_state_dict(ours.state_dict(), strict=True)
    dense.load_state_dict(ours.state_dict(), strict=True)


@pytest.mark.gpu
@pytest.mark.parametrize("use_te", [False, True], ids=["local", "te"])
def test_moe_models_train_and_recover_dense_on_gpu(use_te):
    """A few steps of a MoE Lighthouse model (loss falls, experts get gradients); the same
    weights in the dense model compute what the Lighthouse model computes with dense attention."""
    if not torch.cuda.is_available():
        pytest.skip("megatron-core's MoE router needs CUDA")
    if use_te:
        from lighthouse_megatron.backends import te_available

        if not te_available():
            pytest.skip("transformer_engine.pytorch does not import here")
    from megatron.core import tensor_parallel

    from .megatron_testing import batch, init_parallel

    init_parallel()
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    # Vocab-parallel logits, as the trainer builds them: with parallel_output=False the logits
    # are a view out of the TP gather, which the cross-entropy then modifies in place (an
    # autograd error on the H200).
    ours, _, dense = _moe_models("cuda", use_te, parallel_output=True)
    tokens, positions = batch(device="cuda")
    optimizer = torch.optim.Adam(ours.parameters(), lr=1e-2)
    losses = []
    for _ in range(4):
        loss = ours(tokens, positions, None, labels=tokens).float().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(map(torch.isfinite, torch.tensor(losses))) and losses[-1] < losses[0], losses
    assert all(p.grad is not None for n, p in ours.named_parameters() if "experts" in n)
    dense.load_state_dict(ours.state_dict(), strict=True)
    ours.eval(), dense.eval()
    with torch.no_grad(), forced_dense():
        expected = ours(tokens, positions, None)
    with torch.no_grad():
        torch.testing.assert_close(dense(tokens, positions, None), expected, rtol=2e-3, atol=2e-3)


def test_moe_pipeline_stages_get_their_layers(one_rank):
    from lighthouse_megatron.megatron import get_gpt_decoder_block_spec as our_block_spec

    from .megatron_testing import LH

    config = _moe_config(pipeline_model_parallel_size=2, pipeline_dtype=torch.float32)
    stages = [our_block_spec(config, lighthouse=LH, use_te=False, pp_rank=r).layer_specs for r in (0, 1)]
    assert [len(s) for s in stages] == [2, 2]

    def built(spec):  # a ModuleSpec's class; megatron-core 0.19 wraps some in functools.partial
        module = getattr(spec, "module", spec)
        return getattr(module, "func", module).__name__

    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_layer_specs

    theirs = [built(s.submodules.mlp)
              for s in get_gpt_decoder_layer_specs(config, False, config.normalization)]
    mlps = [built(spec.submodules.mlp) for s in stages for spec in s]
    assert mlps == theirs and [m == "MoELayer" for m in mlps] == [True, False, True, True]
