"""The recovery checkpoint tool: `convert` (dense Megatron, Hugging Face Llama) and `inspect`,
on checkpoints written the way Megatron-LM writes them (tests/checkpoint_testing.py)."""

from __future__ import annotations

import hashlib
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from lighthouse_megatron.checkpoint.model import CORE_ATTENTION_EXTRA, model_state, to_local_names
from lighthouse_megatron.checkpoint.reader import args_dict, locate, read_common
from lighthouse_megatron.cli import main as cli
from lighthouse_megatron.convert import CheckpointError, convert, export_hf, inspect_checkpoint
from tests import checkpoint_testing as ct
from tests.megatron_testing import free_port, init_parallel


def tree_hash(root: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        h.update(str(path.relative_to(root)).encode())
        if path.is_file():
            h.update(path.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    """A stage-1 model after one step, its checkpoints, and its weights' dense logits."""
    init_parallel()
    root = tmp_path_factory.mktemp("stage1")
    model = ct.lighthouse_model()
    opt = ct.train_step(model)
    dense = ct.lighthouse_model(dense=True)
    dense.load_state_dict(model.state_dict())
    ct.save_torch_dist(model, opt, ct.megatron_args(), root / "dist")
    ct.save_legacy({0: ct.legacy_rank_state(model, opt)}, ct.megatron_args(ckpt_format="torch"),
                   root / "legacy")
    return {"root": root, "model": model, "dense_logits": ct.logits(dense),
            "lighthouse_logits": ct.logits(model)}


@pytest.fixture(scope="module")
def tp2(tmp_path_factory):
    """A torch-format checkpoint from the two ranks of a real TP = 2 model, and the dense
    logits that model computes (TP = 2, vocab-parallel output gathered)."""
    import torch.multiprocessing as mp

    root = tmp_path_factory.mktemp("tp2")
    out = str(root / "rank")
    mp.spawn(ct.tp2_worker, args=(2, free_port(), out), nprocs=2, join=True)
    ranks = [torch.load(f"{out}.{r}", weights_only=False) for r in range(2)]
    ct.save_legacy({r: ranks[r]["rank_state"] for r in range(2)},
                   ct.megatron_args(tp=2, ckpt_format="torch"), root / "ckpt")
    return {"path": root / "ckpt", "dense_logits": ranks[0]["logits"]}


def exact(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def dense_model_logits(state: dict):
    """Logits of a dense-spec model (this package's dense block spec) with `state`."""
    from lighthouse_megatron.megatron import get_gpt_decoder_block_spec
    from lighthouse_megatron.megatron.cpu import cpu_as_current_device

    config = ct.transformer_config()
    from megatron.core.models.gpt import GPTModel

    model = GPTModel(config=config, transformer_layer_spec=get_gpt_decoder_block_spec(
        config, attention_impl="dense", use_te=False), vocab_size=ct.VOCAB, max_sequence_length=ct.SEQ,
        position_embedding_type="rope", share_embeddings_and_output_weights=False).eval()
    model.load_state_dict(state, strict=True)
    tok, pos = ct.tokens()
    with torch.no_grad(), cpu_as_current_device():
        return model(tok, pos, None)


def test_torch_dist_converts_to_dense_keeping_training_state(stage1, tmp_path):
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    src = stage1["root"] / "dist"
    before = tree_hash(src)
    report = convert(src, tmp_path / "out")
    assert tree_hash(src) == before
    assert report["verified"]["loaded_with"].startswith("megatron-core dist_checkpointing.load")

    out = tmp_path / "out"
    assert (out / "latest_checkpointed_iteration.txt").read_text() == str(ct.ITERATION)
    common = read_common(locate(out))
    args = args_dict(common["args"])
    assert args["attention_impl"] == "dense" and not any(k.startswith("lighthouse_") for k in args)
    assert common["iteration"] == ct.ITERATION and "opt_param_scheduler" in common
    # Tensors (model and optimizer) are the input's, byte for byte (where the common state is
    # a file of its own, megatron-core <= 0.18; from 0.19 it shares the distcp files).
    if locate(src).layout == "common.pt":
        for f in (src / f"iter_{ct.ITERATION:07d}").glob("*.distcp"):
            assert f.read_bytes() == (out / f"iter_{ct.ITERATION:07d}" / f.name).read_bytes()

    # Independently: megatron-core loads it into a dense-spec model, nothing missing, and
    # the model computes what the stage-1 weights compute densely.
    from megatron.core.models.gpt import GPTModel

    from lighthouse_megatron.megatron import get_gpt_decoder_block_spec

    config = ct.transformer_config()
    model = GPTModel(config=config, transformer_layer_spec=get_gpt_decoder_block_spec(
        config, attention_impl="dense", use_te=False), vocab_size=ct.VOCAB, max_sequence_length=ct.SEQ,
        position_embedding_type="rope", share_embeddings_and_output_weights=False).eval()
    request = model.sharded_state_dict()
    loaded, stored_only, model_only = dist_checkpointing.load(
        request, str(out / f"iter_{ct.ITERATION:07d}"), strict=StrictHandling.RETURN_ALL)
    assert model_only == set()
    assert all(k.startswith(("optimizer.", "rng_state")) for k in stored_only)
    model.load_state_dict({k: loaded[k] for k in request}, strict=True)
    torch.testing.assert_close(ct.logits(model), stage1["dense_logits"], rtol=0, atol=0)
    assert not torch.allclose(stage1["lighthouse_logits"], stage1["dense_logits"])  # the switch is real


def test_weights_only_is_a_release_checkpoint_without_training_state(stage1, tmp_path):
    report = convert(stage1["root"] / "dist", tmp_path / "out", weights_only=True)
    out = tmp_path / "out"
    assert (out / "latest_checkpointed_iteration.txt").read_text() == "release"
    info = inspect_checkpoint(out)
    assert info["release"] and info["iteration"] == 0
    assert not any(c.startswith(("optimizer", "rng_state", "opt_param_scheduler")) for c in info["contents"])
    assert report["verified"]["forward"].endswith("finite")
    state = model_state(locate(out), {})
    exact(dense_model_logits(to_local_names(state)), stage1["dense_logits"])


def test_common_state_layout_round_trip(stage1, tmp_path):
    """megatron-core >= 0.19 keeps the common state inside the distcp files."""
    src = ct.to_common_state_layout(stage1["root"] / "dist", tmp_path / "in")
    assert inspect_checkpoint(src)["layout"].startswith("torch_dist with a common_state item")
    before = tree_hash(src)
    convert(src, tmp_path / "out")
    assert tree_hash(src) == before
    written = locate(tmp_path / "out")
    assert written.layout == "common_state" and not (written.directory / "common.pt").exists()
    common = read_common(written)
    assert args_dict(common["args"])["attention_impl"] == "dense" and common["iteration"] == ct.ITERATION
    assert inspect_checkpoint(tmp_path / "out")["contents"].count("optimizer") == 1
    state = model_state(written, {})
    exact(dense_model_logits(to_local_names(state)), stage1["dense_logits"])


def test_legacy_tp2_shards_merge_to_the_tp2_models_logits(tp2, tmp_path):
    before = tree_hash(tp2["path"])
    report = convert(tp2["path"], tmp_path / "out")
    assert tree_hash(tp2["path"]) == before
    assert report["verified"]["forward"].endswith("finite")
    written = locate(tmp_path / "out")
    assert sorted(written.shards) == [(0, 0), (1, 0)]
    rank1 = torch.load(written.shards[(1, 0)], weights_only=True)
    assert rank1["args"].attention_impl == "dense" and "optimizer" in rank1
    assert rank1["iteration"] == ct.ITERATION
    merged = model_state(written, args_dict(rank1["args"]))
    state = {k: v for k, v in to_local_names(merged).items() if not k.endswith("_extra_state")}
    torch.testing.assert_close(dense_model_logits(state), tp2["dense_logits"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("source", ["dist", "tp2"])
def test_hf_export_matches_megatron_core_dense_logits(source, stage1, tp2, tmp_path):
    pytest.importorskip("transformers")
    from transformers import LlamaForCausalLM

    src, expected = (stage1["root"] / "dist", stage1["dense_logits"]) if source == "dist" \
        else (tp2["path"], tp2["dense_logits"])
    before = tree_hash(src)
    report = export_hf(src, tmp_path / "hf")
    assert tree_hash(src) == before
    # No tokenizer: these checkpoints do not name one (report["tokenizer"] says so).
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["config.json", "lighthouse-manifest.json",
                                                                   "model.safetensors"]
    assert report["tokenizer"].startswith("tokenizer not exported")
    assert report["verified"]["logits_max_abs_diff"] < 1e-4
    hf = LlamaForCausalLM.from_pretrained(str(tmp_path / "hf"), torch_dtype=torch.float32).eval()
    assert hf.config.num_key_value_heads == 2 and hf.config.num_attention_heads == 4
    tok, _ = ct.tokens()
    with torch.no_grad():
        logits = hf(tok).logits
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)


def test_hf_export_with_tied_embeddings(tmp_path):
    pytest.importorskip("transformers")
    from safetensors import safe_open
    from transformers import LlamaForCausalLM

    init_parallel()
    model = ct.lighthouse_model(tied=True)
    dense = ct.lighthouse_model(dense=True, tied=True)
    dense.load_state_dict(model.state_dict())
    args = ct.megatron_args(ckpt_format="torch", untie_embeddings_and_output_weights=False)
    ct.save_legacy({0: {"model": model.state_dict_for_save_checkpoint()}}, args, tmp_path / "ckpt")
    export_hf(tmp_path / "ckpt", tmp_path / "hf")
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys()
    hf = LlamaForCausalLM.from_pretrained(str(tmp_path / "hf"), torch_dtype=torch.float32).eval()
    assert hf.config.tie_word_embeddings
    with torch.no_grad():
        logits = hf(ct.tokens()[0]).logits
    torch.testing.assert_close(logits, ct.logits(dense), rtol=1e-4, atol=1e-4)


def test_legacy_te_checkpoint_gets_core_attention_extra_state(stage1, tmp_path):
    """Transformer Engine layers: the dense TEDotProductAttention has an `_extra_state`
    entry in plain state dicts, the Lighthouse layers none; the converter adds it to
    every layer, copying the stage-1 dense layer's (layer 0)."""
    from lighthouse_megatron.checkpoint.model import to_te_names

    state = torch.load(stage1["root"] / "legacy" / f"iter_{ct.ITERATION:07d}" / "mp_rank_00" /
                       "model_optim_rng.pt", weights_only=True)
    model = to_te_names(state["model"])
    marker = torch.tensor([1, 2, 3], dtype=torch.uint8)  # stands for layer 0's TE state
    model[f"decoder.layers.0.{CORE_ATTENTION_EXTRA}"] = marker
    args = ct.megatron_args(ckpt_format="torch", transformer_impl="transformer_engine")
    ct.save_legacy({0: {**state, "model": model}}, args, tmp_path / "te")
    report = convert(tmp_path / "te", tmp_path / "out", dry_run=True)
    assert any("added" in c and "[1, 2]" in c for c in report["changes"]), report["changes"]
    assert not (tmp_path / "out").exists()
    convert(tmp_path / "te", tmp_path / "out")
    out = torch.load(locate(tmp_path / "out").shards[(0, 0)], weights_only=True)["model"]
    for i in range(3):
        assert torch.equal(out[f"decoder.layers.{i}.{CORE_ATTENTION_EXTRA}"], marker)


def test_inspect_reports_format_layers_and_parallel_layout(stage1, tp2):
    info = inspect_checkpoint(stage1["root"] / "dist")
    assert info["format"] == "torch_dist" and info["iteration"] == ct.ITERATION
    assert info["attention"] == ["dense", "lighthouse", "lighthouse"]
    assert info["lighthouse"]["lighthouse_topk"] == ct.LH.topk
    assert info["args"]["num_layers"] == 3 and "optimizer" in info["contents"]
    n_params = sum(p.numel() for p in stage1["model"].parameters())
    assert info["tensors"]["parameters"] == n_params
    legacy = inspect_checkpoint(tp2["path"] / f"iter_{ct.ITERATION:07d}")
    assert legacy["format"] == "torch" and legacy["parallel"]["tp"] == 2 and legacy["parallel"]["dp"] == 1
    assert legacy["tensors"]["parameters"] == n_params


def test_cli_inspect_and_convert(stage1, tmp_path, capsys):
    assert cli(["inspect", str(stage1["root"] / "legacy")]) == 0
    out = capsys.readouterr().out
    assert "layer 0 dense; layer 1-2 lighthouse" in out and "torch" in out
    assert cli(["convert", "--input", str(stage1["root"] / "legacy"), "--output", str(tmp_path / "o"),
                "--dry-run"]) == 0
    assert "args.attention_impl: 'lighthouse' -> 'dense'" in capsys.readouterr().out
    assert not (tmp_path / "o").exists()


def _cli_error(argv, capsys) -> str:
    code = cli(argv)
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), captured.err
    return lines[0]


def test_bad_inputs_fail_with_one_error_line(stage1, tmp_path, capsys):
    legacy, dist = stage1["root"] / "legacy", stage1["root"] / "dist"
    hashes = {p: tree_hash(p) for p in (legacy, dist)}
    conv = lambda src, dst, *more: ["convert", "--input", str(src), "--output", str(dst), *more]  # noqa: E731

    assert "no such file" in _cli_error(conv(tmp_path / "nope", tmp_path / "o"), capsys)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("hello")
    assert "not a Megatron checkpoint" in _cli_error(conv(foreign, tmp_path / "o"), capsys)
    assert "got a file" in _cli_error(["inspect", str(foreign / "notes.txt")], capsys)

    # Truncated files: the torch file, the common state, a distcp shard.
    bad = tmp_path / "bad_legacy"
    shutil.copytree(legacy, bad)
    file = bad / f"iter_{ct.ITERATION:07d}" / "mp_rank_00" / "model_optim_rng.pt"
    file.write_bytes(file.read_bytes()[:1000])
    assert "truncated" in _cli_error(conv(bad, tmp_path / "o"), capsys)
    bad = tmp_path / "bad_dist"
    shutil.copytree(dist, bad)
    common = bad / f"iter_{ct.ITERATION:07d}" / "common.pt"
    if common.exists():  # megatron-core <= 0.18's layout
        common.write_bytes(common.read_bytes()[:200])
        assert "truncated" in _cli_error(["inspect", str(bad)], capsys)
    shutil.rmtree(bad)
    shutil.copytree(dist, bad)
    for shard in (bad / f"iter_{ct.ITERATION:07d}").glob("*.distcp"):
        shard.write_bytes(shard.read_bytes()[:100])
    assert "truncated" in _cli_error(conv(bad, tmp_path / "o"), capsys)
    # Mismatches: the stored TP size against the mp_rank files, the directory against the iteration.
    bad = tmp_path / "bad_tp"
    state = torch.load(legacy / f"iter_{ct.ITERATION:07d}" / "mp_rank_00" / "model_optim_rng.pt",
                       weights_only=True)
    ct.save_legacy({0: state}, ct.megatron_args(tp=2, ckpt_format="torch"), bad)
    assert "tensor_model_parallel_size=2" in _cli_error(conv(bad, tmp_path / "o"), capsys)
    (bad / f"iter_{ct.ITERATION:07d}").rename(bad / "iter_0000003")
    (bad / "latest_checkpointed_iteration.txt").write_text("3")
    assert "says iteration 3" in _cli_error(["inspect", str(bad)], capsys)
    bad = tmp_path / "bad_dist"
    # The tracker names an iteration that is not there.
    (bad / "latest_checkpointed_iteration.txt").write_text("9")
    assert "iter_0000009 is missing" in _cli_error(["inspect", str(bad)], capsys)

    # A common state that would run code when unpickled is refused, and the code never runs.
    evil = tmp_path / "evil"
    shutil.copytree(dist, evil)
    ran = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {ran}",))

    with open(evil / f"iter_{ct.ITERATION:07d}" / "common.pt", "wb") as f:
        pickle.dump({"args": Payload()}, f)
    assert "would run code" in _cli_error(["inspect", str(evil)], capsys)
    # The same inside the distcp files (megatron-core >= 0.19's layout).
    evil_item = ct.to_common_state_layout(dist, tmp_path / "evil_item", common={"args": Payload()})
    assert "would run code" in _cli_error(["inspect", str(evil_item)], capsys)
    meta = evil / f"iter_{ct.ITERATION:07d}" / ".metadata"
    meta.write_bytes(pickle.dumps(Payload()))
    assert "would run code" in _cli_error(conv(evil, tmp_path / "o"), capsys)
    assert not ran.exists()

    # Existing output, read-only destination, output inside the input.
    (tmp_path / "exists").mkdir()
    assert "--force" in _cli_error(conv(legacy, tmp_path / "exists"), capsys)
    readonly = tmp_path / "ro"
    readonly.mkdir()
    readonly.chmod(0o555)
    try:
        # root ignores permission bits; /sys refuses new entries to everyone.
        target = readonly / "o" if os.getuid() != 0 else Path("/sys/lighthouse_ckpt_test")
        assert "cannot write" in _cli_error(conv(legacy, target), capsys)
    finally:
        readonly.chmod(0o755)
    assert "overlaps" in _cli_error(conv(legacy, legacy / "sub"), capsys)

    for p, h in hashes.items():
        assert tree_hash(p) == h
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_force_replaces_an_earlier_output(stage1, tmp_path, capsys):
    out = tmp_path / "out"
    convert(stage1["root"] / "legacy", out)
    convert(stage1["root"] / "dist", out, force=True)
    assert locate(out).format == "torch_dist"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]

    # What a dry run says agrees with the real run: refused without --force, replaced with it.
    conv = ["convert", "--input", str(stage1["root"] / "legacy"), "--output", str(out)]
    refusal = f"error: --output {out} exists; pass --force to replace it"
    assert _cli_error(conv, capsys) == _cli_error([*conv, "--dry-run"], capsys) == refusal
    hf = tmp_path / "hf"  # as `--to hf` writes it
    hf.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "lighthouse-manifest.json"):
        (hf / name).write_text("{}")
    (tmp_path / "empty").mkdir()
    for target in (out, out / f"iter_{ct.ITERATION:07d}", hf, tmp_path / "empty"):
        conv[-1] = str(target)
        assert cli([*conv, "--dry-run", "--force"]) == 0
        assert capsys.readouterr().out.splitlines()[-1] == \
            f"dry run: nothing written; {target} would be replaced (--force)"


def test_force_refuses_what_is_not_an_earlier_output(stage1, tmp_path, capsys, monkeypatch):
    """--force replaces a checkpoint, a Hugging Face export or an empty folder; anything else is
    refused before any work (dry run or not), and again at the final rename."""
    legacy = stage1["root"] / "legacy"
    refuse = "refusing to replace it even with --force; choose another --output"
    user = tmp_path / "user"  # a folder of the user's files
    (user / "sub").mkdir(parents=True)
    (user / "notes.txt").write_text("mine")
    file = tmp_path / "file.txt"
    file.write_text("mine")
    stray = tmp_path / "stray"  # a checkpoint with a file of the user's inside
    shutil.copytree(legacy, stray)
    (stray / f"iter_{ct.ITERATION:07d}" / "mp_rank_00" / "notes.txt").write_text("mine")
    hf = tmp_path / "hf"
    hf.mkdir()
    for name in ("config.json", "model.safetensors", "train.py"):
        (hf / name).write_text("{}")
    link = tmp_path / "link"
    link.symlink_to(user)
    cases = {
        user: f"holds files that are not a checkpoint or a Hugging Face export (notes.txt, sub); {refuse}",
        file: f"is a file, not a checkpoint or a Hugging Face export; {refuse}",
        stray: "holds files that are not a checkpoint or a Hugging Face export "
               f"(iter_{ct.ITERATION:07d}/mp_rank_00/notes.txt); {refuse}",
        hf: f"holds files that are not a checkpoint or a Hugging Face export (train.py); {refuse}",
        link: f"is a symbolic link; {refuse}",
    }
    hashes = {p: tree_hash(p) if p.is_dir() else p.read_bytes() for p in (user, file, stray, hf)}
    for target, message in cases.items():
        conv = ["convert", "--input", str(legacy), "--output", str(target)]
        for more in ([], ["--force"], ["--force", "--dry-run"], ["--force", "--to", "hf"]):
            assert _cli_error([*conv, *more], capsys) == f"error: --output {target} {message}"
    # A checkpoint that holds the current directory.
    monkeypatch.chdir(stray / f"iter_{ct.ITERATION:07d}")
    assert _cli_error(["convert", "--input", str(legacy), "--output", str(stray), "--force"], capsys) == \
        f"error: --output {stray} holds the current directory; {refuse}"
    monkeypatch.chdir(tmp_path)
    # An empty folder that fills up while converting: checked again before the rename.
    late = tmp_path / "late"
    late.mkdir()

    def fill(msg):
        if msg.startswith("output verified"):
            (late / "notes.txt").write_text("mine")

    with pytest.raises(CheckpointError) as e:
        convert(legacy, late, force=True, log=fill)
    assert str(e.value) == f"--output {late} holds files that are not a checkpoint or a Hugging Face " \
        f"export (notes.txt); {refuse}"
    assert [p.name for p in late.iterdir()] == ["notes.txt"]
    assert {p: tree_hash(p) if p.is_dir() else p.read_bytes() for p in hashes} == hashes
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def test_a_corrupt_torch_file_reads_as_corrupt_not_as_unsafe(stage1, tmp_path, capsys):
    import io
    import random

    from lighthouse_megatron.checkpoint.reader import torch_load

    bad = tmp_path / "bad"
    shutil.copytree(stage1["root"] / "dist", bad)
    common = bad / f"iter_{ct.ITERATION:07d}" / "common.pt"
    common.write_bytes(random.Random(0).randbytes(100))
    line = _cli_error(["inspect", str(bad), "--no-verify"], capsys)
    assert line.startswith(f"error: {common}: cannot read it: truncated, corrupt or not a torch file (")
    assert line.endswith("; copy the checkpoint again, or check it against its manifest "
                         "(without --no-verify)")
    assert "run code" not in line and "issue" not in line
    # torch ends damaged bytes in UnpicklingError, IndexError or KeyError (seeds 2, 14 and 20).
    for seed in range(21):
        with pytest.raises(CheckpointError, match="cannot read it: truncated, corrupt or not a torch file"):
            torch_load(io.BytesIO(random.Random(seed).randbytes(100)), "file")


def test_converting_a_dense_checkpoint_says_so(stage1, tmp_path, capsys):
    import argparse

    rank0 = stage1["root"] / "legacy" / f"iter_{ct.ITERATION:07d}" / "mp_rank_00" / "model_optim_rng.pt"
    state = torch.load(rank0, weights_only=True)
    dense = ct.save_legacy({0: state}, ct.megatron_args(ckpt_format="torch", attention_impl="dense"),
                           tmp_path / "dense")
    assert cli(["convert", "--input", str(dense), "--output", str(tmp_path / "out")]) == 0
    note = (f"  note: {dense / f'iter_{ct.ITERATION:07d}'} was trained with dense attention "
            "(attention_impl='dense'); its weights need no change, so the conversion only re-marks its "
            "stored arguments")
    assert note in capsys.readouterr().out.splitlines() and locate(tmp_path / "out").format == "torch"
    plain = {k: v for k, v in vars(ct.megatron_args(ckpt_format="torch", attention_impl="dense")).items()
             if not k.startswith("lighthouse_")}
    ct.save_legacy({0: state}, argparse.Namespace(**plain), tmp_path / "plain")
    report = convert(tmp_path / "plain", tmp_path / "o2", dry_run=True)
    assert report["note"].endswith("only copies it: its stored arguments are dense already")
    assert "note" not in convert(stage1["root"] / "legacy", tmp_path / "o3", dry_run=True)


def test_hf_export_refuses_what_llama_cannot_express(tmp_path):
    from lighthouse_megatron.convert.hf import check_llama

    good = args_dict(ct.megatron_args())
    check_llama(good)
    for change, named in ((dict(normalization="LayerNorm"), "LayerNorm"), (dict(swiglu=False), "GELU"),
                          (dict(position_embedding_type="learned_absolute"), "learned absolute"),
                          (dict(add_bias_linear=True), "biases"), (dict(qk_layernorm=True), "QK layer-norm")):
        with pytest.raises(CheckpointError, match=named):
            check_llama({**good, **change})


def test_checkpoint_error_is_a_value_error(tmp_path):
    assert issubclass(CheckpointError, ValueError)
    with pytest.raises(ValueError, match="no such file or directory"):
        convert(tmp_path / "missing", tmp_path / "out")
    assert not (tmp_path / "out").exists()
