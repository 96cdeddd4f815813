"""The Megatron-LM entry point: its messages without Megatron-LM or one of its
dependencies, its clean errors against the real core_v0.16.1 tree, and its wiring into both
Megatron-LM generations. `pretrain()` needs CUDA, so the wiring is checked against small
stand-ins of `megatron.training` and `pretrain_gpt.py` that record what they are given
(their signatures are those of the real trees, see docs/megatron.md)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import types

import pytest

pytest.importorskip("megatron.core")

from megatron.core.transformer.spec_utils import import_module  # noqa: E402
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules  # noqa: E402

from lighthouse_megatron.megatron import schedule  # noqa: E402
from lighthouse_megatron.megatron_lm import pretrain_gpt  # noqa: E402

from .megatron_testing import tiny_config  # noqa: E402

ARGV = ["--num-layers", "3", "--seq-length", "64", "--num-attention-heads", "4",
        "--attention-impl", "lighthouse", "--lighthouse-levels", "2", "--lighthouse-pooling-factor", "2",
        "--lighthouse-topk", "8", "--lighthouse-tile-topk", "2", "--lighthouse-dense-layers", "-1",
        "--lighthouse-until-iter", "5"]


@pytest.fixture(autouse=True)
def _keep_the_sessions_process_group(monkeypatch):
    """main() shuts the process group down once pretrain() returns; the tests that run main() in
    this process share the test session's group, which later tests still use."""
    monkeypatch.setattr(pretrain_gpt, "shut_down_process_group", lambda: None)


def _megatron_lm_parser(extra_args_provider):
    p = argparse.ArgumentParser()
    for flag in ("--num-layers", "--seq-length", "--num-attention-heads"):
        p.add_argument(flag, type=int)
    p.add_argument("--spec", nargs="*", default=None)
    p.add_argument("--transformer-impl", default="local")
    p.add_argument("--context-parallel-size", type=int, default=1)
    p.add_argument("--train-iters", type=int, default=None)
    if extra_args_provider is not None:
        p = extra_args_provider(p)
    return p


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_missing_megatron_lm_message(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "megatron.training", None)  # import fails
    with pytest.raises(SystemExit) as e:
        pretrain_gpt.main(["--attention-impl", "lighthouse"])
    assert e.value.code == 2
    message = capsys.readouterr().err
    assert message.startswith("error: ") and message.count("\n") == 1
    assert "`megatron.training` is not importable" in message
    assert "PYTHONPATH" in message and "not on PyPI" in message


def _snapshot_016() -> str:
    from .test_patches import snapshot

    return str(snapshot("core_v0.16.1"))


def _entry(module: str, *argv: str, pythonpath: str, prelude: str = "") -> subprocess.CompletedProcess:
    code = f"{prelude}import runpy, sys; sys.argv[1:] = {list(argv)!r}; " \
           f"runpy.run_module({module!r}, run_name='__main__')"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([pythonpath, ROOT]),
           "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=300)


def test_missing_dependency_of_megatron_lm_is_named():
    """Megatron-LM on the path but one of its dependencies missing: name the dependency."""
    proc = _entry("lighthouse_megatron.megatron_lm.pretrain_gpt", "--help", pythonpath=_snapshot_016(),
                  prelude="import sys; sys.modules['six'] = None; ")  # as if six were not installed
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "`megatron.training` was found (" in errors[0], proc.stderr[-2000:]
    assert "Megatron-LM-core_v0.16.1" in errors[0]  # where it was found
    assert "needs `six`, which is not installed" in errors[0] and "pip install six" in errors[0]


def test_bad_topk_is_one_error_line_with_the_real_megatron_lm():
    """`python -m lighthouse_megatron.megatron_lm.pretrain_gpt` with core_v0.16.1: Megatron-LM's
    real parser takes the flags, the bad value stops it before pretrain()."""
    from .test_patches import TINY

    proc = _entry("lighthouse_megatron.megatron_lm.pretrain_gpt", *TINY, "--attention-impl", "lighthouse",
                  "--lighthouse-topk", "100", pythonpath=_snapshot_016())
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    # At 64 tokens no budget fits T = 128 (issue 28: "nearest valid: 128" was itself invalid).
    assert errors == ["error: --lighthouse-topk 100: lighthouse topk must be a positive multiple of "
                      "tile_topk=128, got 100; no topk is valid with sequence length 64, levels=3, "
                      "pooling_factor=4 and tile_topk=128 (a tile keeps tile_topk=128 of the 4 coarsest "
                      "entries); change another setting: tile_topk=4 (then topk=4), levels=1 (dense "
                      "attention) or a sequence length that is a multiple of 2048 (then topk=128)"]


def test_missing_megatron_lm_message_from_python_m():
    # megatron-core 0.19 wheels ship megatron.training but never Megatron-LM's pretrain_gpt.py.
    try:
        import megatron.training  # noqa: F401
        import pretrain_gpt  # noqa: F401

        pytest.skip("Megatron-LM is importable here")
    except ImportError:
        pass
    proc = subprocess.run([sys.executable, "-m", "lighthouse_megatron.megatron_lm.pretrain_gpt", "--help"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2
    assert "is not importable" in proc.stderr and "not on PyPI" in proc.stderr
    assert "PYTHONPATH=/path/to/Megatron-LM" in proc.stderr


def _install(monkeypatch, training, arguments, mlm, argument_utils=None):
    monkeypatch.setitem(sys.modules, "megatron.training", training)
    monkeypatch.setitem(sys.modules, "megatron.training.arguments", arguments)
    if argument_utils is not None:
        monkeypatch.setitem(sys.modules, "megatron.training.argument_utils", argument_utils)
    monkeypatch.setitem(sys.modules, "pretrain_gpt", mlm)
    training.arguments = arguments


def _mlm_script(seen):
    mlm = types.ModuleType("pretrain_gpt")
    mlm.train_valid_test_datasets_provider = lambda *a, **k: None
    mlm.forward_step = lambda data_iterator, model: None
    mlm.has_nvidia_modelopt = False
    return mlm


def test_core_016_generation(monkeypatch):
    """pretrain(..., extra_args_provider=...) and partial(model_provider, gpt_builder)."""
    seen = {}
    state = {}
    training = types.ModuleType("megatron.training")
    arguments = types.ModuleType("megatron.training.arguments")
    arguments.parse_args = lambda extra_args_provider=None, ignore_unknown_args=False: \
        _megatron_lm_parser(extra_args_provider).parse_args()
    arguments.core_transformer_config_from_args = lambda args: tiny_config(num_layers=args.num_layers)
    training.get_args = lambda: state["args"]

    def pretrain(train_valid_test_dataset_provider, model_provider, model_type, forward_step_func,
                 process_non_loss_data_func=None, extra_args_provider=None, args_defaults=None, store=None):
        state["args"] = _megatron_lm_parser(extra_args_provider).parse_args()
        state["args"].curr_iteration = 6
        seen["model"] = model_provider(True, True, vp_stage=None)
        seen["forward_step"] = forward_step_func

    training.pretrain = pretrain
    mlm = _mlm_script(seen)

    def gpt_builder(args, pre_process, post_process, vp_stage=None, config=None, pg_collection=None):
        assert config is not None
        # Megatron-LM 0.16's gpt_builder: a --spec object is used as is.
        return {"spec": import_module(args.spec) if args.spec is not None else "stock", "args": args}

    mlm.gpt_builder = gpt_builder
    mlm.model_provider = lambda builder, pre_process=True, post_process=True, vp_stage=None, config=None, \
        pg_collection=None: builder(state["args"], pre_process, post_process, vp_stage, config=config,
                                    pg_collection=pg_collection)
    _install(monkeypatch, training, arguments, mlm)
    monkeypatch.setattr(sys, "argv", ["pretrain_gpt", *ARGV])
    shut_down = []
    monkeypatch.setattr(pretrain_gpt, "shut_down_process_group", lambda: shut_down.append("model" in seen))
    try:
        pretrain_gpt.main()
        spec = seen["model"]["spec"]
        assert isinstance(spec, TransformerBlockSubmodules)
        names = [s.submodules.self_attention.submodules.core_attention.module.__name__
                 for s in spec.layer_specs]
        assert names == ["LighthouseCoreAttention", "LighthouseCoreAttention", "DenseCoreAttention"]
        params = spec.layer_specs[0].submodules.self_attention.submodules.core_attention.params
        assert params["schedule"].until_iter == 5 and params["lighthouse"].levels == 2
        assert seen["model"]["args"].spec is None  # never left in the args a checkpoint saves
        # Megatron-LM's forward step, wrapped for --lighthouse-eval-attention (validation only).
        assert seen["forward_step"].__wrapped__ is mlm.forward_step
        assert schedule.get_iteration() == 6  # the layers read Megatron-LM's curr_iteration
        assert shut_down == [True]  # after pretrain() returned
    finally:
        schedule.set_iteration(0)


LH, DENSE = "LighthouseCoreAttention", "DenseCoreAttention"


@pytest.mark.parametrize("extra,want", [
    ([], [LH, LH, DENSE]),
    # Megatron-LM's local DotProductAttention has no CP: dense models under CP get ours.
    (["--attention-impl", "dense", "--context-parallel-size", "2"], [DENSE] * 3),
    # --transformer-impl local (this parser's default): ours too, without [b*h, s, s] scores.
    (["--attention-impl", "dense"], [DENSE] * 3),
    (["--attention-impl", "dense", "--context-parallel-size", "2",
      "--transformer-impl", "transformer_engine"], None),
])
def test_core_019_generation(monkeypatch, extra, want):
    """parse_and_validate_args, a config container, and a callable transformer_layer_spec."""
    seen = {}
    training = types.ModuleType("megatron.training")
    arguments = types.ModuleType("megatron.training.arguments")
    argument_utils = types.ModuleType("megatron.training.argument_utils")
    arguments.parse_and_validate_args = lambda extra_args_provider=None, ignore_unknown_args=False, \
        args_defaults={}: _megatron_lm_parser(extra_args_provider).parse_args()
    arguments.parse_args = lambda extra_args_provider=None, ignore_unknown_args=False: \
        _megatron_lm_parser(extra_args_provider).parse_args()
    training.get_args = lambda: types.SimpleNamespace(curr_iteration=0)
    argument_utils.gpt_config_from_args = lambda args: types.SimpleNamespace(
        transformer=tiny_config(num_layers=args.num_layers), transformer_layer_spec=None)
    argument_utils.pretrain_cfg_container_from_args = lambda args, model_cfg: {"model": model_cfg}
    training.get_args = lambda: types.SimpleNamespace(curr_iteration=0)

    def pretrain(cfg_container, train_valid_test_dataset_provider, model_type, forward_step_func,
                 model_provider=None, store=None, get_embedding_ranks=None):
        model_cfg = cfg_container["model"]
        # Megatron-LM 0.19's GPTModelBuilder: a callable spec is called per stage.
        spec = model_cfg.transformer_layer_spec
        seen["spec"] = None if spec is None else spec(model_cfg, vp_stage=None)

    training.pretrain = pretrain
    _install(monkeypatch, training, arguments, _mlm_script(seen), argument_utils)
    monkeypatch.setattr(sys, "argv", ["pretrain_gpt", *ARGV, *extra])
    try:
        pretrain_gpt.main()
    finally:
        schedule.set_iteration(0)
    if want is None:
        assert seen["spec"] is None
        return
    names = [s.submodules.self_attention.submodules.core_attention.module.__name__
             for s in seen["spec"].layer_specs]
    assert names == want


def test_bad_arguments_fail_before_pretrain(monkeypatch, capsys):
    training = types.ModuleType("megatron.training")
    arguments = types.ModuleType("megatron.training.arguments")
    argument_utils = types.ModuleType("megatron.training.argument_utils")
    arguments.parse_and_validate_args = lambda extra_args_provider=None, ignore_unknown_args=False, \
        args_defaults={}: _megatron_lm_parser(extra_args_provider).parse_args()
    arguments.parse_args = lambda extra_args_provider=None, ignore_unknown_args=False: \
        _megatron_lm_parser(extra_args_provider).parse_args()
    training.get_args = lambda: types.SimpleNamespace(curr_iteration=0)
    argument_utils.gpt_config_from_args = argument_utils.pretrain_cfg_container_from_args = None

    def pretrain(cfg_container, train_valid_test_dataset_provider, model_type, forward_step_func):
        raise AssertionError("pretrain must not start")

    training.pretrain = pretrain
    _install(monkeypatch, training, arguments, _mlm_script({}), argument_utils)
    monkeypatch.setattr(sys, "argv", ["pretrain_gpt", *ARGV, "--seq-length", "60"])
    with pytest.raises(SystemExit) as e:
        pretrain_gpt.main()
    assert e.value.code == 2
    assert capsys.readouterr().err.startswith("error: --seq-length 60 with --lighthouse-levels 2 ")


@pytest.mark.parametrize("generation", ["0.16", "0.19"])
@pytest.mark.parametrize("train_iters,warned", [(5, True), (6, False), (None, False)])
def test_until_iter_beyond_train_iters_warns_at_start_up(monkeypatch, capsys, generation, train_iters,
                                                         warned):
    """--lighthouse-until-iter 5 with --train-iters 5: the switch never happens; the first rank
    says so before pretrain(), in the trainer's words (--train-samples runs: no warning)."""
    from lighthouse_megatron.settings.lighthouse import until_iter_warning

    training = types.ModuleType("megatron.training")
    arguments = types.ModuleType("megatron.training.arguments")
    argument_utils = types.ModuleType("megatron.training.argument_utils")
    parse = lambda extra_args_provider=None, ignore_unknown_args=False, args_defaults={}: \
        _megatron_lm_parser(extra_args_provider).parse_args()  # noqa: E731
    arguments.parse_args = parse
    started = []

    def pretrain(*a, extra_args_provider=None, **k):  # 0.16's signature: the entry picks by it
        started.append(capsys.readouterr().err)

    def pretrain_019(*a, **k):
        started.append(capsys.readouterr().err)

    if generation == "0.19":
        pretrain = pretrain_019
        arguments.parse_and_validate_args = parse
        argument_utils.gpt_config_from_args = lambda args: types.SimpleNamespace(
            transformer=tiny_config(num_layers=args.num_layers), transformer_layer_spec=None)
        argument_utils.pretrain_cfg_container_from_args = lambda args, model_cfg: {}
    training.pretrain = pretrain
    training.get_args = lambda: types.SimpleNamespace(curr_iteration=0)
    mlm = _mlm_script({})
    mlm.gpt_builder = mlm.model_provider = lambda *a, **k: None
    _install(monkeypatch, training, arguments, mlm, argument_utils if generation == "0.19" else None)
    extra = [] if train_iters is None else ["--train-iters", str(train_iters)]
    monkeypatch.setattr(sys, "argv", ["pretrain_gpt", *ARGV, *extra])
    try:
        pretrain_gpt.main()
    finally:
        schedule.set_iteration(0)
    expected = until_iter_warning(argparse.Namespace(attention_impl="lighthouse", lighthouse_until_iter=5,
                                                     train_iters=5))
    assert started == ([f"lighthouse-megatron: {expected}\n"] if warned else [""])
    assert "--lighthouse-until-iter 5 is not below --train-iters 5" in expected


def test_real_megatron_training_019_builds_lighthouse_layers(monkeypatch):
    """megatron-core >= 0.19 wheels ship megatron.training: parse with Megatron-LM's real
    parser and our flags, then build with its GPTModelBuilder and our callable spec."""
    pytest.importorskip("megatron.training.models.gpt")  # Python >= 3.12, megatron-core >= 0.19
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.training.argument_utils import gpt_config_from_args
    from megatron.training.arguments import parse_and_validate_args
    from megatron.training.models.gpt import GPTModelBuilder

    from lighthouse_megatron.megatron_lm import validate_lighthouse_args
    from lighthouse_megatron.megatron_lm.launch import extra_args_provider, spec_provider_from_args

    from .megatron_testing import batch, init_parallel

    for name, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(sys, "argv", [
        "pretrain_gpt", "--num-layers", "3", "--hidden-size", "64", "--num-attention-heads", "4",
        "--group-query-attention", "--num-query-groups", "2", "--seq-length", "64",
        "--max-position-embeddings", "64", "--micro-batch-size", "1", "--global-batch-size", "1",
        "--attention-dropout", "0", "--hidden-dropout", "0", "--position-embedding-type", "learned_absolute",
        "--transformer-impl", "local", "--vocab-size", "64", "--tokenizer-type", "NullTokenizer",
        "--use-cpu-initialization", "--no-gradient-accumulation-fusion", "--no-persist-layer-norm",
        "--train-iters", "1", "--lr", "1e-4", *ARGV[6:]])
    args = parse_and_validate_args(extra_args_provider=extra_args_provider(),
                                   args_defaults={"tokenizer_type": "GPT2BPETokenizer"})
    assert validate_lighthouse_args(args).dense_layers == (-1,)
    init_parallel()
    model_cfg = gpt_config_from_args(args)
    model_cfg.transformer_layer_spec = spec_provider_from_args(args)
    model = GPTModelBuilder(model_cfg).build_model(ProcessGroupCollection.use_mpu_process_groups())
    names = [type(layer.self_attention.core_attention).__name__ for layer in model.decoder.layers]
    assert names == ["LighthouseCoreAttention", "LighthouseCoreAttention", "DenseCoreAttention"]
    tokens, positions = batch()
    assert model(tokens, positions, None).shape[:2] == (2, 64)


def test_patches_call_existing_adapter_functions():
    """Whether each patch applies and runs is tests/test_patches.py's job (it needs the
    snapshots); this checks, everywhere, that what a patch calls exists."""
    import importlib
    import re
    from pathlib import Path

    for patch in sorted((Path(ROOT) / "patches").glob("megatron-lm-*.patch")):
        text = patch.read_text()
        tag = re.search(r"^Megatron-LM tag: (core_v[\d.]+) ", text, re.M).group(1)
        assert patch.name == f"megatron-lm-{tag}.patch"
        assert re.findall(r"^diff --git a/(\S+)", text, re.M) == ["pretrain_gpt.py"]
        module = re.search(r"^\+\s+from (\S+) import (\w+) as lighthouse$", text, re.M)
        adapter = getattr(importlib.import_module(module.group(1)), module.group(2))
        names = re.findall(r"lighthouse\.(\w+)\(", text)
        assert names and all(callable(getattr(adapter, name)) for name in names), (patch.name, names)


@pytest.mark.parametrize("code,shut", [(None, True), (0, True), (3, False)])
def test_shut_down_after_megatron_lms_early_exit(monkeypatch, code, shut):
    """Megatron-LM's --exit-interval path ends pretrain() in sys.exit(0) on every rank (seen on the
    GPU: NCCL's "destroy_process_group() was not called" after each stage 1): the group is shut down
    and the exit goes on; after a failing exit code it is left alone (a rank may not be there)."""
    from lighthouse_megatron.megatron_lm import core_v0_16

    def pretrain(extra_args_provider=None):
        pass

    training = types.SimpleNamespace(pretrain=pretrain)
    mlm = types.SimpleNamespace(train_valid_test_datasets_provider=types.SimpleNamespace())
    monkeypatch.setattr(pretrain_gpt, "require_megatron_lm", lambda: (training, mlm))

    def run(*args):
        if code is not None:
            raise SystemExit(code)

    monkeypatch.setattr(core_v0_16, "run", run)
    calls = []
    monkeypatch.setattr(pretrain_gpt, "shut_down_process_group", lambda: calls.append(1))
    if code is None:
        pretrain_gpt.main([])
    else:
        with pytest.raises(SystemExit) as e:
            pretrain_gpt.main([])
        assert e.value.code == code
    assert calls == ([1] if shut else [])


def test_shut_down_destroys_the_process_group_pretrain_leaves():
    """In a fresh process (the test session keeps its own group): nothing to do without a group;
    a group left initialized is destroyed."""
    code = ("import torch.distributed as dist; "
            "from lighthouse_megatron.megatron_lm.launch import shut_down_process_group as shut; "
            "shut(); dist.init_process_group('gloo', store=dist.HashStore(), rank=0, world_size=1); "
            "assert dist.is_initialized(); shut(); print('initialized after:', dist.is_initialized())")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": ROOT})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("initialized after: False")
