"""Launch arguments: parsing, YAML precedence, validation messages that name the setting."""

from __future__ import annotations

import argparse

import pytest

pytest.importorskip("megatron.core")

from lighthouse_megatron import LighthouseConfig  # noqa: E402
from lighthouse_megatron.megatron import (  # noqa: E402
    add_lighthouse_args,
    lighthouse_config_from_args,
    validate_lighthouse_args,
)

# A Megatron-LM-like model: 16K tokens, 8 layers, 8 heads in 4 groups, TP 2.
MODEL = ["--seq-length", "16384", "--num-layers", "8", "--num-attention-heads", "8",
         "--num-query-groups", "4", "--tensor-model-parallel-size", "2"]
LH = ["--attention-impl", "lighthouse", "--lighthouse-topk", "512", "--lighthouse-tile-topk", "16"]


def parse(*argv: str) -> argparse.Namespace:
    """Megatron-LM's own arguments that validation reads, plus ours."""
    p = argparse.ArgumentParser()
    p.add_argument("--seq-length", type=int)
    p.add_argument("--num-layers", type=int)
    p.add_argument("--num-attention-heads", type=int)
    p.add_argument("--num-query-groups", type=int, default=1)
    p.add_argument("--group-query-attention", action="store_true", default=True)
    p.add_argument("--tensor-model-parallel-size", type=int, default=1)
    p.add_argument("--context-parallel-size", type=int, default=1)
    p.add_argument("--attention-dropout", type=float, default=0.0)
    p.add_argument("--qk-layernorm", action="store_true")
    p.add_argument("--sft", action="store_true")
    p.add_argument("--num-experts", type=int)
    p.add_argument("--multi-latent-attention", action="store_true")
    p.add_argument("--mtp-num-layers", type=int)
    add_lighthouse_args(p)
    return p.parse_args(list(argv))


def test_defaults_are_dense():
    args = parse(*MODEL)
    assert validate_lighthouse_args(args) is None
    assert args.attention_impl == "dense"


def test_every_config_field_has_its_flag():
    # One spelling per setting: LighthouseConfig's field `tile_topk` is --lighthouse-tile-topk.
    flags = {opt for a in add_lighthouse_args(argparse.ArgumentParser())._actions for opt in a.option_strings}
    missing = [name for name in LighthouseConfig.field_names()
               if f"--lighthouse-{name.replace('_', '-')}" not in flags]
    assert missing == []


def test_good_lighthouse_arguments():
    args = parse(*MODEL, *LH, "--lighthouse-dense-layers", "0", "1", "-2", "-1",
                 "--lighthouse-levels", "3", "--lighthouse-pooling-factor", "4",
                 "--lighthouse-backend", "math", "--lighthouse-until-iter", "100",
                 "--lighthouse-level-merge", "mean")
    cfg = validate_lighthouse_args(args)
    assert cfg == LighthouseConfig(levels=3, pooling_factor=4, topk=512, tile_topk=16,
                                   dense_layers=(0, 1, -2, -1), backend="math", level_merge="mean")
    assert args.lighthouse_until_iter == 100
    # Resolved values are plain types, written back (checkpoints store what ran).
    assert args.lighthouse_dense_layers == [0, 1, -2, -1] and args.lighthouse_scorer == "norm"


def test_yaml_file_and_precedence(tmp_path):
    f = tmp_path / "lh.yaml"
    f.write_text("attention_impl: lighthouse\ntopk: 512\ntile_topk: 16\ndense_layers: [0, -1]\n"
                 "until_iter: 7\nlevels: 2\n")
    args = parse(*MODEL, "--lighthouse-config", str(f), "--lighthouse-levels", "3")
    cfg = validate_lighthouse_args(args)
    assert cfg.levels == 3  # the explicit flag wins over the file
    assert cfg.topk == 512 and cfg.dense_layers == (0, -1) and args.lighthouse_until_iter == 7
    # An empty --lighthouse-dense-layers overrides the file's list.
    args = parse(*MODEL, "--lighthouse-config", str(f), "--lighthouse-dense-layers")
    assert validate_lighthouse_args(args).dense_layers == ()

    bad = tmp_path / "bad.yaml"
    bad.write_text("topk: 512\ntopK: 3\n")
    with pytest.raises(ValueError, match=r"--lighthouse-config .*setting 'topK' \(did you mean 'topk'\?"):
        validate_lighthouse_args(parse(*MODEL, "--lighthouse-config", str(bad)))
    with pytest.raises(ValueError, match="--lighthouse-config .*cannot read"):
        validate_lighthouse_args(parse(*MODEL, "--lighthouse-config", str(tmp_path / "missing.yaml")))


@pytest.mark.parametrize(
    "extra, error, match",
    [
        (["--lighthouse-topk", "500"], ValueError,
         r"--lighthouse-topk.*multiple of tile_topk=16.*nearest valid: 256 or 512$"),
        (["--lighthouse-tile-topk", "15"], ValueError, r"--lighthouse-tile-topk.*even"),
        (["--lighthouse-pooling-factor", "3"], ValueError, r"--lighthouse-pooling-factor.*power of two"),
        (["--lighthouse-levels", "0"], ValueError, r"--lighthouse-levels.*>= 1"),
        (["--seq-length", "1000"], ValueError, r"--seq-length 1000 .*divisible"),
        (["--lighthouse-dense-layers", "8"], ValueError,
         r"--lighthouse-dense-layers with --num-layers 8.*-8 \.\. 7"),
        (["--context-parallel-size", "3"], ValueError,
         r"--seq-length 16384 with .*--lighthouse-topk 512 --lighthouse-tile-topk 16 "
         r"--context-parallel-size 3: .*multiple of 2\*cp_size\*tile_topk.*; no topk is valid with sequence "
         r"length 16384, .* and context-parallel size 3"),
        (["--seq-length", "1000"], ValueError, r"--seq-length 1000 with --lighthouse-levels 3 "),
        (["--tensor-model-parallel-size", "3"], ValueError,
         r"--num-attention-heads 8 .*--tensor-model-parallel-size 3.*6 or 9"),
        (["--num-query-groups", "3"], ValueError,
         r"--num-attention-heads 8 is not a multiple of --num-query-groups 3"),
        (["--num-attention-heads", "12", "--num-query-groups", "6", "--tensor-model-parallel-size", "4"],
         ValueError, r"--num-query-groups 6 and --tensor-model-parallel-size 4: one must divide the other"),
        (["--attention-dropout", "0.1"], ValueError, r"--attention-dropout 0.1 .*set --attention-dropout 0"),
        (["--sft"], ValueError, r"--sft is not supported with --attention-impl lighthouse: packed"),
        (["--multi-latent-attention"], ValueError, r"--multi-latent-attention"),
        (["--lighthouse-until-iter", "-1"], ValueError, r"--lighthouse-until-iter"),
        (["--mtp-num-layers", "1"], ValueError, r"--mtp-num-layers 1 is not supported"),
        (["--lighthouse-dense-layers", "0", "x"], SystemExit, None),
    ],
)
def test_bad_combinations_name_the_setting(extra, error, match):
    with pytest.raises(error, match=match):
        validate_lighthouse_args(parse(*MODEL, *LH, *extra))


def test_context_parallelism_is_accepted():
    # 2 ranks = 4 chunks of 4096 tokens; k=512 is a multiple of 2*CP*T = 64.
    assert validate_lighthouse_args(parse(*MODEL, *LH, "--context-parallel-size", "2")).topk == 512


def test_each_bad_lighthouse_flag_is_named_alone():
    # tile_topk is checked before topk, whose rule depends on it: the blame goes to the flag
    # whose value breaks a rule given the flags before it.
    with pytest.raises(ValueError, match=r"^--lighthouse-tile-topk 15: "):
        validate_lighthouse_args(parse(*MODEL, *LH, "--lighthouse-tile-topk", "15"))
    with pytest.raises(ValueError, match=r"^--lighthouse-topk 520: "):
        validate_lighthouse_args(parse(*MODEL, *LH, "--lighthouse-topk", "520"))
    with pytest.raises(ValueError, match=r"^--lighthouse-dense-layers 0 1\.5: "):
        args = parse(*MODEL, *LH)
        args.lighthouse_dense_layers = [0, 1.5]
        validate_lighthouse_args(args)


def test_norm_scorer_with_qk_layernorm_warns():
    with pytest.warns(UserWarning, match="--qk-layernorm"):
        validate_lighthouse_args(parse(*MODEL, *LH, "--qk-layernorm"))


def test_bad_choices_are_rejected_by_argparse(capsys):
    for argv in (["--attention-impl", "sparse"], ["--lighthouse-scorer", "random"],
                 ["--lighthouse-backend", "cuda"]):
        with pytest.raises(SystemExit):
            parse(*MODEL, *argv)
        assert argv[0] in capsys.readouterr().err


def test_config_from_args_is_idempotent():
    args = parse(*MODEL, *LH)
    assert lighthouse_config_from_args(args) == lighthouse_config_from_args(args)
