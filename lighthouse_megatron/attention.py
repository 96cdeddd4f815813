"""lighthouse_attention: the public entry point, composing the stages."""

from __future__ import annotations

from torch import Tensor

from .config import LighthouseConfig
from .reference import lighthouse_attention_reference


def lighthouse_attention(
    q: Tensor, k: Tensor, v: Tensor, config: LighthouseConfig, softmax_scale: float | None = None
) -> Tensor:
    """Lighthouse attention. q [b, s, Hq, d], k and v [b, s, Hkv, d] -> [b, s, Hq, d].

    Causal; GQA when Hq > Hkv; `softmax_scale` defaults to 1/sqrt(d). Differentiable in q, k, v.
    """
    return lighthouse_attention_reference(q, k, v, config, softmax_scale)
