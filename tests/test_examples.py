"""examples/: every YAML config passes the trainer's own argument parser and validation (no
training), and the Megatron-LM command lines in examples/README.md say what the YAMLs say."""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest
import yaml

from lighthouse_megatron import LighthouseConfig
from lighthouse_megatron.megatron import add_lighthouse_args, validate_lighthouse_args

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
RECIPES = Path(__file__).resolve().parents[1] / "lighthouse_megatron" / "recipes"
CONFIGS = sorted(EXAMPLES.glob("*.yaml"))
# processes each example is launched with (tiny: one; 98K: 8 GPUs; 1M: 4 nodes x 8 GPUs)
WORLD = {"tiny.yaml": 1, "98k.yaml": 8, "1m-cp8.yaml": 32}


def _settings(path: Path) -> dict:
    """An example's settings: those of the recipe it names, then its own (as the trainer merges them)."""
    own = yaml.safe_load(path.read_text())
    recipe = yaml.safe_load((RECIPES / f"{own['recipe']}.yaml").read_text()) if "recipe" in own else {}
    return {**recipe, **own}


def test_every_example_is_listed():
    assert sorted(p.name for p in CONFIGS) == sorted(WORLD)
    text = (EXAMPLES / "README.md").read_text()
    assert all(f"({p.name})" in text for p in CONFIGS)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_sizes_are_valid(path):
    s = _settings(path)
    cp = s.get("context_parallel_size", 1)
    lh = LighthouseConfig(levels=s["lighthouse_levels"], pooling_factor=s["lighthouse_pooling_factor"],
                          topk=s["lighthouse_topk"], tile_topk=s["lighthouse_tile_topk"],
                          dense_layers=s["lighthouse_dense_layers"])
    lh.validate(s["seq_length"], cp_size=cp)
    assert s["seq_length"] % (2 * cp if cp > 1 else 1) == 0
    dense = lh.resolve_dense_layers(s["num_layers"])
    assert len(dense) < s["num_layers"]  # some layers really run Lighthouse
    assert lh.gathered_length(s["seq_length"]) < s["seq_length"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A small real dataset: the parser opens it to check every split gets documents."""
    from lighthouse_megatron.data import prepare_data

    root = tmp_path_factory.mktemp("examples-data")
    (root / "docs.jsonl").write_text("".join(f'{{"text": "document {i}"}}\n' for i in range(2000)))
    return prepare_data([root / "docs.jsonl"], root / "data").prefix


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_passes_the_trainer_parser(path, data):
    from lighthouse_megatron.training import parse_args

    # The GPU recipes ask for bf16, which the parser refuses without CUDA: validate them as
    # fp32 CPU runs, everything else unchanged.
    argv = ["--config", str(path), "--data-path", str(data), "--device", "cpu", "--no-bf16"]
    s = _settings(path)
    args = parse_args(argv, world_size=WORLD[path.name])
    for key, value in s.items():
        if key != "bf16":
            assert getattr(args, key) == value, key
    assert args.global_batch_size % (args.micro_batch_size * args.data_parallel_size) == 0


def _megatron_commands() -> list[list[str]]:
    text = (EXAMPLES / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    commands = []
    for block in blocks:
        if "lighthouse_megatron.megatron_lm.pretrain_gpt" in block:
            lines = [line.split("#")[0] for line in block.replace("\\\n", " ").splitlines()]
            commands.append(shlex.split(" ".join(lines)))
    return commands


def _megatron_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    for flag in ("--num-layers", "--hidden-size", "--num-attention-heads", "--num-query-groups",
                 "--ffn-hidden-size",
                 "--seq-length", "--vocab-size", "--context-parallel-size", "--micro-batch-size",
                 "--global-batch-size", "--train-iters", "--lr-warmup-iters", "--eval-interval",
                 "--eval-iters", "--save-interval"):
        p.add_argument(flag, type=int)
    for flag in ("--lr", "--min-lr", "--weight-decay", "--adam-beta1", "--adam-beta2", "--clip-grad",
                 "--attention-dropout"):
        p.add_argument(flag, type=float)
    for flag in ("--position-embedding-type", "--normalization", "--lr-decay-style", "--save", "--load"):
        p.add_argument(flag)
    for flag in ("--swiglu", "--bf16", "--untie-embeddings-and-output-weights"):
        p.add_argument(flag, action="store_true")
    return add_lighthouse_args(p)


def test_megatron_lm_command_lines_match_the_configs():
    commands = _megatron_commands()
    by_length = {_settings(p)["seq_length"]: p for p in CONFIGS}
    assert len(commands) == len(CONFIGS)
    for argv in commands:
        args, _ = _megatron_parser().parse_known_args(argv)
        path = by_length.pop(args.seq_length)
        s = _settings(path)
        for key, value in s.items():
            if key == "context_parallel_size" or hasattr(args, key) and getattr(args, key) is not None:
                assert getattr(args, key) == value, (path.name, key)
        assert args.attention_dropout == 0.0
        args.tensor_model_parallel_size = 1
        validate_lighthouse_args(args)


def _shape(s: dict, switch: int) -> dict:
    """The schedule's shape: what must agree between the recipes whatever their size."""
    return {"warmup": s["lr_warmup_iters"] / s["train_iters"], "switch": switch / s["train_iters"],
            "decay": s["lr_decay_style"], "betas": (s["adam_beta1"], s["adam_beta2"]),
            "weight_decay": s["weight_decay"], "clip_grad": s["clip_grad"], "min_lr": s.get("min_lr")}


def test_every_recipe_has_the_papers_schedule_shape():
    """examples/98k.yaml is the paper's protocol; the other recipes (the 1M file, the demo's
    model in tiny.yaml and both demo presets) keep its shape: warm-up 12.5%, constant learning
    rate, dense from 62.5%, betas (0.9, 0.95), weight decay 0.1, clip 1."""
    from lighthouse_megatron.demo.workflow import PRESETS

    paper = _settings(EXAMPLES / "98k.yaml")
    schedule = (paper["train_iters"], paper["lr_warmup_iters"], paper["lighthouse_until_iter"])
    assert schedule == (16000, 2000, 10000)
    assert (paper["lr"], paper["global_batch_size"], paper["lr_decay_style"]) == (2e-3, 32, "constant")
    expected = _shape(paper, paper["lighthouse_until_iter"])
    assert expected == {"warmup": 0.125, "switch": 0.625, "decay": "constant", "betas": (0.9, 0.95),
                        "weight_decay": 0.1, "clip_grad": 1.0, "min_lr": None}
    for path in CONFIGS:
        s = _settings(path)
        assert _shape(s, s["lighthouse_until_iter"]) == expected, path.name
    for name, preset in PRESETS.items():
        assert _shape(preset.config(), preset.stage1_iters) == expected, name
        assert preset.config()["lighthouse_until_iter"] == preset.stage1_iters, name
