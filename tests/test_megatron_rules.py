"""One table of unsupported settings, three readers: every rule refuses the same value with
the same reason in the launch arguments (by flag), the spec builders and the modules (by
TransformerConfig field)."""

from __future__ import annotations

import argparse

import pytest

pytest.importorskip("megatron.core")

from megatron.core.transformer.enums import AttnMaskType  # noqa: E402

from lighthouse_megatron.megatron import (  # noqa: E402
    DenseCoreAttention,
    LighthouseCoreAttention,
    get_gpt_layer_spec,
)
from lighthouse_megatron.settings.rules import CORE_ATTENTION, LAUNCH, RULES, check_args  # noqa: E402

from .megatron_testing import LH, tiny_config  # noqa: E402

REFUSED = {"attention_dropout": 0.1, "softmax_type": "off-by-one", "qk_clip": True,
           "log_max_attention_logit": True, "window_size": (16, 0), "multi_latent_attention": True,
           "experimental_attention_variant": "dsa"}
MODEL_RULES = [r for r in RULES if r.scope != LAUNCH]


def test_every_model_rule_has_an_example():
    assert {r.setting for r in MODEL_RULES} == set(REFUSED)


@pytest.mark.parametrize("rule", MODEL_RULES, ids=lambda r: r.setting)
def test_rule_refuses_everywhere_in_the_same_words(rule):
    value = REFUSED[rule.setting]
    with pytest.raises(ValueError) as from_args:
        check_args(argparse.Namespace(**{rule.dest: value}))
    assert from_args.value.args[0].startswith(f"{rule.flag} ")
    messages = [from_args.value.args[0]]

    config = tiny_config()
    setattr(config, rule.setting, value)  # past TransformerConfig's own checks
    modules = [LighthouseCoreAttention] + ([DenseCoreAttention] if rule.scope == CORE_ATTENTION else [])
    for module in modules:
        with pytest.raises(ValueError) as from_module:
            module(config=config, layer_number=1, attn_mask_type=AttnMaskType.causal, lighthouse=LH) \
                if module is LighthouseCoreAttention else \
                module(config=config, layer_number=1, attn_mask_type=AttnMaskType.causal)
        messages.append(from_module.value.args[0])
    with pytest.raises(ValueError) as from_spec:
        get_gpt_layer_spec(config, lighthouse=LH, use_te=False)
    messages.append(from_spec.value.args[0])
    for message in messages:
        assert rule.reason in message and rule.fix in message, message
    for message in messages[1:]:
        assert f"{rule.setting}={value!r} ({rule.flag}) is not supported" in message


def test_megatron_defaults_pass_every_rule():
    config = tiny_config(attention_dropout=0.0)
    for rule in MODEL_RULES:
        assert not rule.refused(getattr(config, rule.setting)), rule.setting
