"""What megatron-core 0.16-0.19 needs to run on a machine without CUDA: the trainer's
CPU engine and the checkpoint tools both use these.

Each piece is scoped to one object or one call, never a process-wide patch:

- `CpuFP32Optimizer`: megatron-core's `FP32Optimizer` (so `state_dict`,
  `sharded_state_dict` and `load_state_dict`, hence the checkpoint format, are megatron-core's
  own code), minus the two places that allocate on 'cuda' by name: the constant loss scale
  in `__init__` and the fp32 grad-norm/clip helpers (`get_grad_norm_fp32`,
  `clip_grad_by_total_norm_fp32` use `device='cuda'` and apex-style multi-tensor kernels).
- `cpu_rotary_embedding(model)`: GPTModel's RotaryEmbedding moves its frequencies to
  `torch.cuda.current_device()` and slices them per CP rank through a pinned CUDA copy;
  this instance-level subclass swap computes the same tensors on the CPU.
- `cpu_as_current_device()`: for one block (a dist_checkpointing save or load, a forward
  pass of a model on the CPU), `torch.cuda.current_device` / `synchronize` answer for the
  CPU (the save coordinator broadcasts its status in a tensor on the "current device";
  RotaryEmbedding moves its frequencies there), also on machines with a GPU.
"""

from __future__ import annotations

import contextlib

import torch
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.optimizer.optimizer import FP32Optimizer, MegatronOptimizer


class CpuFP32Optimizer(FP32Optimizer):
    """megatron-core's FP32Optimizer with its CUDA-only grad norm and clipping done on the CPU."""

    def __init__(self, optimizer, config, init_state_fn):
        MegatronOptimizer.__init__(self, optimizer, config, init_state_fn)
        self._scale = torch.ones(1)
        self.is_stub_optimizer = False

    @torch.no_grad()
    def get_grad_norm(self):
        # Megatron's filter: no shared or TP-duplicated grads counted twice; fp32 sum of
        # squares reduced over the model-parallel group, like get_grad_norm_fp32.
        # megatron-core <= 0.18: get_main_grads_for_grad_norm; >= 0.19: get_grads_for_grad_norm.
        grads = getattr(self, "get_main_grads_for_grad_norm", None) or self.get_grads_for_grad_norm
        grads = grads()
        total = torch.zeros(1, dtype=torch.float32)
        for g in grads:
            total += g.detach().float().pow(2).sum()
        torch.distributed.all_reduce(total, group=self.get_grad_stats_parallel_group())
        return total.item() ** 0.5

    @torch.no_grad()
    def clip_grad_norm(self, clip_grad: float) -> float:
        grad_norm = self.get_grad_norm()
        coeff = clip_grad / (grad_norm + 1.0e-6)  # clip_grad_by_total_norm_fp32's formula
        if coeff < 1.0:
            grads = [p.grad for p in self.get_parameters() if p.grad is not None]
            torch._foreach_mul_(grads, coeff)
        return grad_norm


def make_cpu_optimizer(model, opt_config) -> CpuFP32Optimizer:
    """What `get_megatron_optimizer` builds for an fp32 model without TE or apex: megatron-core's
    parameter groups (no weight decay on biases and norms), torch AdamW, FP32Optimizer."""
    from megatron.core.optimizer import _get_param_groups

    groups = _get_param_groups([model], opt_config, None)
    adam = torch.optim.AdamW(groups, lr=opt_config.lr, weight_decay=opt_config.weight_decay,
                             betas=(opt_config.adam_beta1, opt_config.adam_beta2), eps=opt_config.adam_eps)

    def init_state_fn(opt, config=None):  # megatron-core's, for loading into a fresh optimizer
        for group in opt.param_groups:
            for p in group["params"]:
                if len(opt.state[p]) == 0:
                    opt.state[p]["exp_avg"] = torch.zeros_like(p.data)
                    opt.state[p]["exp_avg_sq"] = torch.zeros_like(p.data)

    return CpuFP32Optimizer(adam, opt_config, init_state_fn)


class _CpuRotaryEmbedding(RotaryEmbedding):
    def get_emb(self, max_seq_len: int, offset: int = 0) -> torch.Tensor:
        freqs = self.get_freqs_non_repeated(max_seq_len, offset)
        if self.rotary_interleaved:
            emb = torch.stack((freqs.view(-1, 1), freqs.view(-1, 1)), dim=-1).view(freqs.shape[0], -1)
        else:
            emb = torch.cat((freqs, freqs), dim=-1)
        return emb[:, None, None, :]

    def forward(self, max_seq_len: int, offset: int = 0, packed_seq: bool = False, cp_group=None):
        emb = self.get_emb(max_seq_len, offset)
        cp_group = self.cp_group if cp_group is None else cp_group
        if cp_group is not None and cp_group.size() > 1 and not packed_seq:
            # get_batch_on_this_cp_rank's layout: chunks r and 2*CP-1-r of 2*CP.
            size, rank = cp_group.size(), cp_group.rank()
            emb = emb.view(2 * size, -1, *emb.shape[1:])[[rank, 2 * size - 1 - rank]].flatten(0, 1)
        return emb


def cpu_rotary_embedding(model) -> None:
    """Make `model`'s RotaryEmbedding (if any) compute on the CPU (same values)."""
    for module in model.modules():
        if type(module) is RotaryEmbedding:
            module.__class__ = _CpuRotaryEmbedding


@contextlib.contextmanager
def cpu_as_current_device():
    """Inside the block, `torch.cuda.current_device()` is "cpu" and `torch.cuda.synchronize` a no-op."""
    saved = torch.cuda.current_device, torch.cuda.synchronize
    torch.cuda.current_device, torch.cuda.synchronize = (lambda: "cpu"), (lambda *a, **k: None)
    try:
        yield
    finally:
        torch.cuda.current_device, torch.cuda.synchronize = saved
