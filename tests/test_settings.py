"""The settings tree (issue 29): each setting is one dataclass field that carries its flag, help,
default, type and roles, and the parsers, the YAML typing, the checks, Megatron-LM's command line
and the sets that checkpoints and Slurm chains compare are read off the fields."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lighthouse_megatron.cli import build_parser as cli_parser
from lighthouse_megatron.megatron import add_lighthouse_args
from lighthouse_megatron.settings.fields import CONTINUED, SAME_MODEL, SCHEDULE, SHAPE, with_role
from lighthouse_megatron.settings.slurm import job_specs
from lighthouse_megatron.settings.train import (
    all_specs,
    build_parser,
    megatron_lm_args,
    parse_args,
    typed_value,
)
from lighthouse_megatron.settings.tree import train_specs

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lighthouse_megatron"

# Every flag of these commands before issue 29 (and the few added since): none may change its spelling.
FLAGS_BEFORE = {
    ("train",): """
        --adam-beta1 --adam-beta2 --adam-eps --add-bias-linear --attention-dropout --attention-impl
        --bf16 --check-for-nan-in-loss-and-grad --clip-grad --config --context-parallel-size
        --data-cache-path --data-path --device --disable-bias-linear --eval-interval --eval-iters
        --exit-interval --exit-signal-handler --ffn-hidden-size --force --global-batch-size
        --hidden-dropout --hidden-size --init-method-std --kv-channels --lighthouse-backend
        --lighthouse-config --lighthouse-dense-every --lighthouse-dense-layers
        --lighthouse-eval-attention --lighthouse-grow-topk-iters --lighthouse-level-merge --lighthouse-levels
        --lighthouse-pooling-factor --lighthouse-progressive-iters --lighthouse-scorer
        --lighthouse-tile-topk --lighthouse-topk --lighthouse-until-iter --load --log-interval --lr
        --lr-decay-iters --lr-decay-style --lr-warmup-init --lr-warmup-iters --lr-wsd-decay-iters
        --lr-wsd-decay-style --make-vocab-size-divisible-by --max-position-embeddings
        --max-skipped-iters --metrics-file --micro-batch-size --min-lr --mock-data --no-add-bias-linear
        --no-bf16 --no-check-for-nan-in-loss-and-grad --no-exit-signal-handler --no-progress
        --no-qk-layernorm --no-swiglu --no-untie-embeddings-and-output-weights --no-verify
        --norm-epsilon --normalization --num-attention-heads --num-layers --num-query-groups
        --override-opt-param-scheduler --override-opt_param-scheduler --position-embedding-type
        --progress --qk-layernorm --rotary-base --save --save-interval --save-retain --seed --seq-length
        --split --swiglu --tensor-model-parallel-size --tensorboard-dir --tokenizer-type --train-iters
        --untie-embeddings-and-output-weights --valid-data-path --vocab-size --wandb-exp-name
        --wandb-project --wandb-save-dir --weight-decay
""".split(),
    ("slurm", "render"): """
        --account --allow-placeholders --checkpoint-root --config --container-image
        --context-parallel-size --convert-partition --data-parallel-size --data-path --engine --force
        --gpus-per-node --log-dir --megatron-lm --nodes --nproc-per-node --output --partition
        --pipeline-model-parallel-size --seq-length --set --tensor-model-parallel-size --time
        --tokenizer --venv -o
""".split(),
    ("slurm", "submit"): """
        --account --allow-placeholders --checkpoint-root --config --container-image
        --context-parallel-size --convert-partition --data-parallel-size --data-path --dry-run --engine
        --force --gpus-per-node --log-dir --megatron-lm --nodes --nproc-per-node --output-dir
        --partition --pipeline-model-parallel-size --seq-length --set --tensor-model-parallel-size
        --time --tokenizer --venv
""".split(),
}


def _flags(argv: tuple[str, ...]) -> set[str]:
    parser = cli_parser(list(argv))
    for word in argv:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[word]
    return {flag for action in parser._actions for flag in action.option_strings}


@pytest.mark.parametrize("argv", list(FLAGS_BEFORE), ids=" ".join)
def test_no_flag_changes_its_spelling(argv):
    assert set(FLAGS_BEFORE[argv]) - _flags(argv) == set()


def test_megatron_lm_parser_gets_the_lighthouse_flags_derived_from_the_dataclasses():
    flags = {f for a in add_lighthouse_args(argparse.ArgumentParser())._actions for f in a.option_strings}
    lighthouse = {f for f in FLAGS_BEFORE[("train",)] if f.startswith(("--lighthouse", "--attention-impl"))}
    assert flags - {"-h", "--help"} == lighthouse


# ------------------------------------------------------------------------------- types


def _parsed_by_the_flag(name: str, text: str):
    """What `train FLAG text` gives the setting."""
    return vars(build_parser().parse_args([all_specs()[name].flag, text]))[name]


@pytest.mark.parametrize("name", [n for n, s in all_specs().items() if s.kind in (int, float)])
def test_numbers_are_typed_by_their_field_from_yaml_and_flags_alike(name):
    spec = all_specs()[name]
    # YAML 1.1 reads 1e3 as a string; it is the number it means, for an int as for a float.
    assert typed_value(name, "1e3", "here") == spec.kind(1000)
    assert _parsed_by_the_flag(name, "7") == spec.kind(7)
    if spec.kind is int:
        with pytest.raises(ValueError, match=f"here: {name} must be an integer, got '2.5'"):
            typed_value(name, "2.5", "here")


@pytest.mark.parametrize("name", [n for n, s in all_specs().items() if s.kind is bool])
def test_bools_are_typed_by_their_field(name):
    assert typed_value(name, "false", "here") is False and typed_value(name, "on", "here") is True
    with pytest.raises(ValueError, match=f"{name} must be true or false"):
        typed_value(name, "maybe", "here")


def test_yaml_values_build_what_their_field_means(tmp_path):
    """`swiglu: "false"` builds no SwiGLU MLP (its ffn_hidden_size derives as for GeLU, 4 x hidden) and
    `lr: 3e-4` (a string to YAML 1.1) is the number."""
    config = tmp_path / "run.yaml"
    config.write_text('mock_data: true\nswiglu: "false"\nlr: 3e-4\nhidden_size: 64\n')
    args = parse_args(["--config", str(config), "--device", "cpu"], world_size=1)
    assert (args.swiglu, args.lr, args.ffn_hidden_size) == (False, 3e-4, 256)
    assert "--swiglu" not in megatron_lm_args(args)


@pytest.mark.parametrize("text, hint", [
    ("lighthouse_level: 3", "'lighthouse_level' (did you mean 'lighthouse_levels'?)"),  # a near spelling
    ("LR: 0.1", "'LR' (did you mean 'lr'?)"),  # another case
    ("levels: 3", "'levels' (did you mean 'lighthouse_levels'?)"),  # without the prefix
    ("lighthouse:\n  levels: 3", "'lighthouse' (did you mean one of 'lighthouse_backend', "
                                 "'lighthouse_config', 'lighthouse_dense_every', ...? "
                                 "settings are flat keys, not sections)"),
    ("bogus: 1", "'bogus'; valid: adam_beta1, "),  # nothing it could mean
])
def test_an_unknown_yaml_setting_names_what_it_likely_means(tmp_path, text, hint):
    config = tmp_path / "run.yaml"
    config.write_text(f"mock_data: true\n{text}\n")
    with pytest.raises(ValueError) as error:
        parse_args(["--config", str(config), "--device", "cpu"], world_size=1)
    message = str(error.value)
    assert f"--config {config}: unknown setting {hint}" in message
    assert message.endswith(", ".join(sorted(all_specs())))  # then every valid name


def test_every_setting_has_help_and_a_default_to_show():
    for spec in [*all_specs().values(), *job_specs().values()]:
        assert len(spec.help) > 1 and spec.default_text(), spec.name


# ------------------------------------------------------------------------------- roles


def test_the_sets_that_checkpoints_and_chains_compare_are_the_hand_written_ones_they_replace():
    assert set(with_role(all_specs(), SHAPE)) == set("""
        num_layers hidden_size num_attention_heads num_query_groups ffn_hidden_size kv_channels
        padded_vocab_size swiglu add_bias_linear normalization position_embedding_type
        untie_embeddings_and_output_weights qk_layernorm
""".split())
    assert set(with_role(all_specs(), SCHEDULE)) == set("""
        lr min_lr lr_warmup_iters lr_decay_iters lr_decay_style lr_wsd_decay_style lr_wsd_decay_iters
        train_iters global_batch_size weight_decay
""".split())
    assert set(with_role(all_specs(), SAME_MODEL)) == set("""
        position_embedding_type normalization swiglu untie_embeddings_and_output_weights add_bias_linear
        attention_dropout hidden_dropout rotary_base init_method_std norm_epsilon split eval_iters
        lr_decay_style weight_decay adam_beta1 adam_beta2 clip_grad min_lr micro_batch_size
""".split())
    assert set(with_role(all_specs(), CONTINUED)) == set("""
        num_layers hidden_size ffn_hidden_size num_attention_heads num_query_groups seq_length
        train_iters lr min_lr lr_warmup_iters lr_decay_style global_batch_size weight_decay adam_beta1
        adam_beta2
""".split())


def test_megatron_lm_gets_every_lighthouse_setting_the_trainer_runs():
    """The recipe variants and the evaluation mode reach Megatron-LM's command line (they were
    dropped before the settings were derived from the fields)."""
    args = parse_args("--mock-data --device cpu --seq-length 256 --attention-impl lighthouse "
                      "--lighthouse-levels 2 --lighthouse-topk 32 --lighthouse-tile-topk 8 "
                      "--lighthouse-until-iter 60 --lighthouse-dense-every 4".split(), world_size=1)
    mlm = megatron_lm_args(args)
    for flag, value in (("--lighthouse-dense-every", "4"), ("--lighthouse-until-iter", "60"),
                        ("--lighthouse-eval-attention", "both"), ("--lighthouse-topk", "32")):
        assert mlm[mlm.index(flag) + 1] == value
    dense = megatron_lm_args(parse_args(["--mock-data"], world_size=1))
    assert not any(f.startswith("--lighthouse") for f in dense)


# ------------------------------------------------------------------------------ recipes


def test_a_recipe_is_the_first_layer_config_and_flags_override_it(tmp_path):
    tiny = yaml.safe_load((PACKAGE / "recipes" / "tiny.yaml").read_text())
    args = parse_args(["--recipe", "tiny", "--mock-data", "--device", "cpu"], world_size=1)
    assert all(getattr(args, k) == v for k, v in tiny.items()) and args.recipe == "tiny"
    config = tmp_path / "run.yaml"
    config.write_text("recipe: tiny\nhidden_size: 32\nnum_layers: 3\n")
    args = parse_args(["--config", str(config), "--num-layers", "2", "--mock-data", "--device", "cpu"],
                      world_size=1)
    assert (args.seq_length, args.hidden_size, args.num_layers) == (tiny["seq_length"], 32, 2)
    # A recipe file beside the --config file that names it; a recipe names no other recipe.
    (tmp_path / "mine.yaml").write_text("recipe: tiny\n")
    config.write_text("recipe: mine.yaml\n")
    with pytest.raises(ValueError, match="a recipe names no other recipe"):
        parse_args(["--config", str(config), "--mock-data"], world_size=1)
    with pytest.raises(ValueError, match=r"recipe 9k: neither a recipe the package ships \(tiny, 98k"):
        parse_args(["--recipe", "9k", "--mock-data"], world_size=1)


# ------------------------------------------------------------------------------ one place


def _literal_modules(name: str) -> list[str]:
    pattern = re.compile(f"[\"']{re.escape(name)}[\"']")
    return sorted(str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py") if pattern.search(p.read_text()))


# Words that are also something else in the package: the string is not the setting there.
HOMONYMS = {
    "bf16": "a dtype's name (bench --dtype bf16)",
    "device": "the bench results' device field",
    "input": "convert's report field and flag",
    "output": "convert's report field and flag",
    "job": "slurm render's argument, a job's name or file",
    "lr": "the metrics records' learning rate and torch's param-group key",
    "recipe": "the FP8 recipe of bench e2e's results",
}


@pytest.mark.parametrize("name", sorted(set(all_specs()) | set(job_specs())))
def test_each_setting_name_is_a_literal_in_one_module(name):
    """`"ffn_hidden_size"` stood in 7 modules; a setting's name is now written as a string in one
    module at most (code elsewhere reads it as an attribute of its namespace or Values)."""
    found = _literal_modules(name)
    if name in HOMONYMS:
        return
    assert len(found) <= 1, found


def test_every_function_is_short_enough_to_read():
    """McCabe complexity <= 15 (ruff's C901, set in pyproject.toml) for every function of the
    package, the benchmarks and the tests: validate_args among them, a short sequence of group
    checks."""
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "--select", "C901", "--output-format",
                           "concise", "--no-cache", "lighthouse_megatron", "benchmarks", "tests"],
                          capture_output=True, text=True, cwd=PACKAGE.parent)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_slurm_modules_are_short():
    sizes = {p.name: len(p.read_text().splitlines()) for p in (PACKAGE / "slurm").glob("*.py")}
    assert max(sizes.values()) <= 400, sizes


def test_a_job_setting_and_a_training_setting_never_share_a_name():
    """A job file's key is one or the other (the trainer's are typed and passed on as flags)."""
    assert set(job_specs()) & set(all_specs()) == set()
    assert set(train_specs()) < set(all_specs())
