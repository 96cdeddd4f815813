"""`lighthouse-megatron bench e2e` on CPU at tiny sizes: the whole code path, its JSON, and
the pieces it relies on checked against megatron-core's own computations."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("megatron.core")

from lighthouse_megatron import LighthouseConfig  # noqa: E402
from lighthouse_megatron.backends import dense_causal_attention  # noqa: E402
from lighthouse_megatron.bench import e2e  # noqa: E402
from lighthouse_megatron.cli import main  # noqa: E402
from lighthouse_megatron.recipe import RecipeSchedule  # noqa: E402
from lighthouse_megatron.settings.bench import E2E_MODES, add_e2e_parser  # noqa: E402

from .megatron_testing import init_parallel  # noqa: E402

TINY = ["--device", "cpu", "--layers", "3", "--hidden", "32", "--heads", "2", "--ffn", "64",
        "--vocab", "64", "--levels", "2", "--pooling-factor", "2", "--topk", "8", "--tile-topk", "2",
        "--dense-layers", "0", "--recompute", "none", "--dtype", "fp32", "--loss-chunk", "24",
        "--warmup", "0", "--steps", "1"]


@pytest.fixture(autouse=True)
def cpu_rope(monkeypatch, request):
    if request.node.get_closest_marker("gpu"):
        return  # the benchmark sets up its own NCCL group
    # The PyTorch twins, not the Triton interpreter: the kernels have their own tests.
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    init_parallel()


def _args(*extra):
    import argparse

    parser = argparse.ArgumentParser()
    add_e2e_parser(parser.add_subparsers())
    return parser.parse_args(["e2e", *TINY, *extra])


def test_full_recompute_is_refused_on_the_cpu_before_anything_is_built(tmp_path, capsys):
    """megatron-core's recompute saves the CUDA random state, which a CPU build of torch lacks."""
    args = [a for a in TINY if a not in ("--recompute", "none")]
    assert main(["bench", "e2e", *args, "--seq-lens", "64", "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: --recompute full needs --device cuda (megatron-core's recompute saves the CUDA random "
        "state); pass --recompute none with --device cpu")
    assert not (tmp_path / "out").exists()


def test_cpu_run_writes_every_mode(tmp_path):
    assert main(["bench", "e2e", *TINY, "--seq-lens", "64", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "e2e.json").read_text())
    rows = {r["mode"]: r for r in data["rows"]}
    assert list(rows) == list(E2E_MODES)
    s = LighthouseConfig(levels=2, pooling_factor=2, topk=8, tile_topk=2).gathered_length(64)
    assert rows["lighthouse"]["S"] == rows["ceiling"]["S"] == s == 48 and rows["dense"]["S"] == 64
    for r in rows.values():  # the arithmetic on the times: test_summary_matches_step_times_known_in_advance
        assert r["finite"] and r["step_ms"] > 0
        # Random tokens over 64 symbols at initialization: the loss is near ln(64) = 4.16.
        assert abs(r["losses"][0] - 4.159) < 0.1
    # Same initial weights in every mode: the parameter count is the attention-free model's.
    assert len({r["parameters"] for r in rows.values()}) == 1
    assert data["meta"]["model"]["layers"] == 3 and data["meta"]["command"].startswith("lighthouse-megatron")
    # Written once; a second run refuses to overwrite.
    assert main(["bench", "e2e", *TINY, "--seq-lens", "64", "--out", str(tmp_path)]) == 2


def test_summary_matches_step_times_known_in_advance(tmp_path, monkeypatch):
    """The reported times, tokens/s and ratios against values computed here from step times the
    test chose (a clock per mode), not from the JSON the run wrote."""
    clock = {"dense": [30.0, 10.0, 50.0], "lighthouse": [12.0, 9.0, 100.0],
             "ceiling": [8.0, 7.0, 9.0], "none": [6.0, 6.0, 3.0]}  # medians 30, 12, 8, 6 (means differ)
    current = {}
    real_measure, real_time_ms = e2e.measure, e2e.time_ms

    def measure(args, mode, *rest):
        current["mode"] = mode
        return real_measure(args, mode, *rest)

    def time_ms(fn, warmup, reps, device):
        real_time_ms(fn, warmup, reps, device)  # the real steps run; their times are replaced
        return list(clock[current["mode"]][:reps])

    monkeypatch.setattr(e2e, "measure", measure)
    monkeypatch.setattr(e2e, "time_ms", time_ms)
    assert main(["bench", "e2e", *TINY, "--steps", "3", "--batch", "2", "--seq-lens", "64",
                 "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "e2e.json").read_text())
    rows = {r["mode"]: r for r in data["rows"]}
    for mode, ms in {"dense": 30, "lighthouse": 12, "ceiling": 8, "none": 6}.items():
        assert rows[mode]["step_ms"] == ms and rows[mode]["step_ms_all"] == clock[mode]
        assert rows[mode]["tokens_per_s"] == pytest.approx(2 * 64 / (ms / 1e3))
    assert data["summary"] == [pytest.approx({
        "N": 64, "speedup_vs_dense": 2.5, "ceiling_speedup_vs_dense": 3.75, "lighthouse_of_ceiling": 8 / 12,
        "attention_share_dense": 0.8, "attention_share_lighthouse": 0.5, "attention_share_ceiling": 0.25,
    })]


def test_recipe_steps_time_the_variants_stage_1_runs(tmp_path, monkeypatch):
    """--recipe-steps: a `grow` row per larger k of the growth ladder, a `mixed` row with the first
    half of the Lighthouse layers dense and a `mean-merge` row with the levels averaged, each built
    with those settings, and their costs over the dense step from step times the test chose (a clock
    per model)."""
    clock = {"dense": 40.0, "lighthouse": 10.0, "ceiling": 8.0, "none": 6.0}
    built = []
    real_measure, real_time_ms = e2e.measure, e2e.time_ms

    def measure(args, mode, seq_len, lighthouse, *rest):
        built.append((mode, lighthouse.topk, sorted(lighthouse.resolve_dense_layers(args.layers)),
                      lighthouse.level_merge))
        return real_measure(args, mode, seq_len, lighthouse, *rest)

    def time_ms(fn, warmup, reps, device):
        real_time_ms(fn, warmup, reps, device)
        mode, topk, dense, merge = built[-1]
        if merge == "mean":
            return [11.0] * reps
        if mode == "lighthouse" and topk != 8:
            return [10.0 + topk / 4] * reps  # k 16: 14 ms, k 32: 18 ms
        if mode == "lighthouse" and len(dense) > 1:
            return [25.0] * reps
        return [clock[mode]] * reps

    monkeypatch.setattr(e2e, "measure", measure)
    monkeypatch.setattr(e2e, "time_ms", time_ms)
    assert main(["bench", "e2e", *TINY, "--layers", "6", "--seq-lens", "64", "--recipe-steps",
                 "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "e2e.json").read_text())
    # The ladder at 64 tokens from --topk 8 (RecipeSchedule.topk_ladder): 8, 16, 32.
    ladder = RecipeSchedule(until_iter=1, grow_topk_iters=1).topk_ladder(e2e.lighthouse_for(_args(), 64), 64)
    assert ladder == [8, 16, 32]
    grow = [(r["topk"], r["step_ms"]) for r in data["rows"] if r["mode"] == "grow"]
    assert grow == [(16, 14.0), (32, 18.0)]
    # Layers 1-5 run Lighthouse (layer 0 dense); the mixed model also runs layers 1 and 2 dense.
    assert ("lighthouse", 8, [0, 1, 2], "sum") in built
    # The averaged levels: the plain Lighthouse model with --lighthouse-level-merge mean, and only it.
    assert [b for b in built if b[3] == "mean"] == [("lighthouse", 8, [0], "mean")]
    (mixed,) = [r for r in data["rows"] if r["mode"] == "mixed"]
    assert mixed["lighthouse_layers_dense"] == [2, 5] and mixed["step_ms"] == 25.0
    summary = data["summary"][0]
    assert summary["speedup_vs_dense"] == pytest.approx(4.0)  # the plain modes are untouched
    assert summary["grow_cost_vs_dense"] == pytest.approx({"16": 14 / 40, "32": 18 / 40})
    assert summary["mixed_cost_vs_dense"] == pytest.approx(25 / 40)
    assert summary["mixed_additive_prediction"] == pytest.approx((10 + 2 / 5 * 30) / 40)
    assert summary["mean_merge_cost_vs_dense"] == pytest.approx(11 / 40)
    (merge,) = [r for r in data["rows"] if r["mode"] == "mean-merge"]
    (plain,) = [r for r in data["rows"] if r["mode"] == "lighthouse"]
    assert merge["step_ms"] == 11.0 and merge["S"] == plain["S"]


def test_bad_settings_are_one_error_line(tmp_path, capsys):
    assert main(["bench", "e2e", *TINY, "--modes", "dense,fast", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --modes") and "ceiling" in err and "\n" not in err
    assert main(["bench", "e2e", *TINY, "--seq-lens", "100", "--out", str(tmp_path)]) == 2
    assert "--seq-lens 100" in capsys.readouterr().err
    bad_layers = ["--seq-lens", "64", "--dense-layers", "0,7", "--out", str(tmp_path)]
    assert main(["bench", "e2e", *TINY, *bad_layers]) == 2
    assert capsys.readouterr().err.startswith("error: --dense-layers")
    assert not list(tmp_path.iterdir())


def test_fit_topk_takes_the_largest_valid_budget():
    args = _args("--topk", "1536", "--levels", "3", "--pooling-factor", "4", "--tile-topk", "128",
                 "--fit-topk")
    # 1536 needs N divisible by 16 * 12 = 192: fine at 98,304, not at 128K (1024 is).
    assert e2e.lighthouse_for(args, 98_304).topk == 1536
    assert e2e.lighthouse_for(args, 131_072).topk == 1024
    args.fit_topk = False
    with pytest.raises(ValueError):
        e2e.lighthouse_for(args, 131_072)


def _model(mode, args, seq=64):
    config = e2e.transformer_config(args, torch.device("cpu"))
    cfg = e2e.lighthouse_for(args, seq)
    spec = e2e.block_spec(config, mode, cfg, use_te=False, gathered=cfg.gathered_length(seq))
    return e2e.build_model(args, config, spec, seq, torch.device("cpu"))


def test_chunked_loss_matches_megatron_loss():
    """Loss and gradients of the chunked cross-entropy equal GPTModel's own loss."""
    args = _args()
    model = _model("dense", args)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 64, (2, 64), generator=g)
    labels = torch.randint(0, 64, (2, 64), generator=g)
    positions = torch.arange(64).expand(2, -1)
    ours = e2e.chunked_loss(model, tokens, positions, labels, chunk=24)
    ours.backward()
    ours_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    theirs = model(tokens, positions, None, labels=labels).mean()
    theirs.backward()
    torch.testing.assert_close(ours, theirs.float(), rtol=1e-5, atol=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(ours_grads[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)


def test_stand_in_attentions():
    """The ceiling's layers sample S tokens (all of them: dense attention), 'none' copies V."""
    args = _args()
    ceiling = _model("ceiling", args)
    kinds = [type(layer.self_attention.core_attention).__name__ for layer in ceiling.decoder.layers]
    assert kinds == ["DenseCoreAttention", "SampledCoreAttention", "SampledCoreAttention"]
    sampled = ceiling.decoder.layers[1].self_attention.core_attention
    q, k, v = (torch.randn(64, 2, 2, 16) for _ in range(3))
    sampled.gathered = 64
    dense = dense_causal_attention(*(x.transpose(0, 1) for x in (q, k, v))).transpose(0, 1).reshape(64, 2, -1)
    torch.testing.assert_close(sampled(q, k, v, None), dense)
    sampled.gathered, sampled._index = 16, None
    out = sampled(q, k, v, None).reshape(64, 2, 2, 16)
    assert int((out.abs().sum(dim=(1, 2, 3)) > 0).sum()) == 16  # only the sampled rows get output

    none = _model("none", _args("--kv-heads", "1"))
    copy = none.decoder.layers[0].self_attention.core_attention
    assert all(type(layer.self_attention.core_attention) is type(copy) for layer in none.decoder.layers)
    v1 = torch.randn(64, 2, 1, 16)
    torch.testing.assert_close(copy(q, v1, v1, None), v1.expand(64, 2, 2, 16).reshape(64, 2, -1))


@pytest.mark.gpu
def test_gpu_small_model_every_mode_with_recompute(tmp_path):
    """On a GPU: the TE spec where TE imports, full recompute, fused Adam, peak memory."""
    args = ["bench", "e2e", "--layers", "4", "--hidden", "256", "--heads", "2", "--ffn", "512",
            "--vocab", "1024", "--seq-lens", "16K", "--topk", "512", "--dense-layers", "0",
            "--loss-chunk", "4096", "--warmup", "1", "--steps", "2", "--out", str(tmp_path)]
    assert main(args) == 0
    data = json.loads((tmp_path / "e2e.json").read_text())
    assert data["meta"]["recompute"] == "full" and data["meta"]["nvidia_smi"]
    rows = {r["mode"]: r for r in data["rows"]}
    assert set(rows) == set(E2E_MODES)
    for r in rows.values():
        assert r["finite"] and r["peak_mem_gib"] > 0 and r["timed_steps"] == 2
        assert abs(r["losses"][0] - 6.93) < 0.2  # ln(1024) at initialization


def test_fp8_is_refused_without_transformer_engine(tmp_path, capsys):
    """--fp8 runs TE's linear layers: on the CPU (or with --spec local) one error line, nothing written."""
    assert main(["bench", "e2e", *TINY, "--seq-lens", "64", "--fp8", "hybrid", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --fp8 hybrid: FP8 runs Transformer Engine's linear layers")
    assert "\n" not in err
    assert main(["bench", "e2e", *TINY, "--seq-lens", "64", "--fp8-attention", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("error: --fp8-attention needs --fp8")
    assert not list(tmp_path.iterdir())
    with pytest.raises(SystemExit):
        _args("--fp8", "e5m2")


_LLAMA = dict(normalization="RMSNorm", gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
              layernorm_epsilon=1e-5, attention_dropout=0.0, hidden_dropout=0.0,
              bias_activation_fusion=False, masked_softmax_fusion=False, apply_rope_fusion=False)
_FULL_RECOMPUTE = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)


@pytest.mark.parametrize("argv, device, fields", [
    ([], "cpu", dict(num_layers=3, hidden_size=32, num_attention_heads=2, num_query_groups=2,
                     ffn_hidden_size=64, kv_channels=16, bf16=False, params_dtype=torch.float32,
                     use_cpu_initialization=True)),
    (["--kv-heads", "1", "--recompute", "full", "--dtype", "bf16"], "cpu",
     dict(num_layers=3, hidden_size=32, num_attention_heads=2, num_query_groups=1, ffn_hidden_size=64,
          kv_channels=16, bf16=True, params_dtype=torch.bfloat16, use_cpu_initialization=True,
          **_FULL_RECOMPUTE)),
    (["--fp8", "e4m3", "--fp8-recipe", "tensorwise", "--fp8-attention", "--hidden", "64", "--ffn", "128",
      "--dtype", "bf16"], "cpu",
     dict(num_layers=3, hidden_size=64, num_attention_heads=2, num_query_groups=2, ffn_hidden_size=128,
          kv_channels=32, bf16=True, params_dtype=torch.bfloat16, use_cpu_initialization=True, fp8="e4m3",
          fp8_recipe="tensorwise", fp8_dot_product_attention=True)),
    (None, "cuda", dict(num_layers=30, hidden_size=1024, num_attention_heads=8, num_query_groups=8,
                        ffn_hidden_size=1536, kv_channels=128, bf16=True, params_dtype=torch.bfloat16,
                        use_cpu_initialization=False, **_FULL_RECOMPUTE)),
], ids=["tiny-fp32", "gqa-bf16-recompute", "fp8", "paper-defaults"])
def test_config_is_megatron_cores_for_the_bench_flags(argv, device, fields):
    """The bench's config, built through the package's one builder (checkpoint.model), equals
    megatron-core's TransformerConfig built directly from the fields the flags name: a Llama
    block (RMSNorm, SwiGLU, no biases, no dropout) with fusions off, every other field its
    default. `None`: the parser's own defaults, the paper's model."""
    import argparse
    import dataclasses
    import functools

    from megatron.core.transformer.transformer_config import TransformerConfig

    if argv is None:
        parser = argparse.ArgumentParser()
        add_e2e_parser(parser.add_subparsers())
        args = parser.parse_args(["e2e"])
    else:
        args = _args(*argv)

    def values(config):
        # megatron-core makes its init methods as fresh partials, equal only by content.
        return {f.name: (v.func, v.args, v.keywords) if isinstance(v, functools.partial) else v
                for f in dataclasses.fields(config) for v in [getattr(config, f.name)]}

    built = e2e.transformer_config(args, torch.device(device))
    expected = TransformerConfig(**_LLAMA, **fields)
    assert type(built) is TransformerConfig
    assert values(built) == values(expected)


def test_fp8_settings_reach_megatron_cores_config():
    """With TE (checked on the GPU), the flags become megatron-core's fp8 settings; dimensions
    TE's FP8 GEMMs cannot take are refused before anything is built."""
    args = _args("--fp8", "hybrid", "--fp8-recipe", "tensorwise", "--hidden", "64", "--ffn", "128")
    config = e2e.transformer_config(args, torch.device("cpu"))
    assert (config.fp8, config.fp8_recipe) == ("hybrid", "tensorwise")
    assert not config.fp8_dot_product_attention
    assert e2e.transformer_config(_args(), torch.device("cpu")).fp8 is None
    fp8 = ["--fp8", "hybrid", "--hidden", "64", "--seq-lens", "64"]
    e2e.check_fp8(_args(*fp8, "--ffn", "128"), use_te=True)
    with pytest.raises(e2e.UsageError, match="--ffn 72 must be a multiple of 16"):
        e2e.check_fp8(_args(*fp8, "--ffn", "72"), use_te=True)


@pytest.mark.gpu
def test_gpu_fp8_small_model(tmp_path):
    """FP8 (hybrid) TE linear layers, dense and Lighthouse: finite losses, the settings in the JSON."""
    from lighthouse_megatron.backends import te_available

    if not torch.cuda.is_available() or not te_available():
        pytest.skip("needs a CUDA GPU with Transformer Engine")
    args = ["bench", "e2e", "--layers", "4", "--hidden", "256", "--heads", "2", "--ffn", "512",
            "--vocab", "1024", "--seq-lens", "16K", "--topk", "512", "--dense-layers", "0",
            "--modes", "dense,lighthouse", "--fp8", "hybrid", "--loss-chunk", "4096", "--warmup", "1",
            "--steps", "2", "--out", str(tmp_path)]
    assert main(args) == 0
    data = json.loads((tmp_path / "e2e.json").read_text())
    assert data["meta"]["fp8"] == {"format": "hybrid", "recipe": "delayed", "attention": "bf16"}
    assert all(r["finite"] and abs(r["losses"][0] - 6.93) < 0.3 for r in data["rows"])
