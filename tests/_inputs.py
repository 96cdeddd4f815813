"""Random inputs for tests."""

from __future__ import annotations

import torch


def random_qkv(b, n, hq, hkv, d, *, dtype=torch.float32, device="cpu", seed=0, separated=True, grad=False):
    """Random q [b,n,hq,d], k, v [b,n,hkv,d].

    With `separated`, every (token, head) vector of q and of k gets a distinct norm from a
    shuffled geometric ladder (ratio 1.001), so the top-k selection has no near-ties: fp32
    norms computed in another summation order (a kernel, a loop) then select the same
    entries, and comparisons test the arithmetic rather than tie-breaking luck.
    """
    g = torch.Generator(device="cpu").manual_seed(seed)

    def draw(h, ladder):
        x = torch.randn(b, n, h, d, generator=g, dtype=torch.float64)
        if ladder:
            x = x / x.norm(dim=-1, keepdim=True)
            rank = torch.randperm(b * n * h, generator=g).reshape(b, n, h, 1)
            x = x * 1.001 ** (rank - b * n * h / 2).double()
        return x.to(dtype=dtype, device=device).requires_grad_(grad)

    return draw(hq, separated), draw(hkv, separated), draw(hkv, False)
