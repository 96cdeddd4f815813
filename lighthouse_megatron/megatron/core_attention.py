"""Core attention modules for megatron-core's `SelfAttention`.

Both follow megatron-core's core-attention contract (`CoreAttention` in 0.16,
`CoreAttentionInterface` from 0.19): built with keyword arguments by `SelfAttention`,
called with query `[sq, b, np/tp, hn]` and key/value `[sk, b, ng/tp, hn]` after RoPE
(GQA heads not expanded), returning `[sq, b, np/tp * hn]`. Heads are independent, so
tensor parallelism needs nothing here: each rank attends over its own heads.

Neither module has parameters or persistent buffers: a model's state dict, and its
`sharded_state_dict`, are those of the dense model, so one checkpoint serves both.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from torch import Tensor

from ..attention import lighthouse_attention
from ..config import LighthouseConfig
from ..parallel import ContextParallel, SplitGroups, causal_attention
from ..recipe import RecipeSchedule
from ..settings.fields import Values
from ..settings.rules import check_config
from .schedule import dense_forced, get_iteration


def _context_parallel(config, pg_collection, cp_comm_type: str | None) -> ContextParallel | None:
    """The CP group Megatron gives this layer (None without context parallelism)."""
    group = getattr(pg_collection, "cp", None) if pg_collection is not None else None
    if group is None:
        if (Values.of(config).context_parallel_size or 1) == 1:
            return None
        from megatron.core import parallel_state

        group = parallel_state.get_context_parallel_group()
    if group.size() == 1:
        return None
    comm_type = cp_comm_type or "p2p"
    te_group = None
    if comm_type == "a2a+p2p":
        # As megatron-core's TEDotProductAttention: TE takes the [a2a, p2p] group pair.
        from megatron.core import parallel_state

        te_group = parallel_state.get_hierarchical_context_parallel_groups()
    return ContextParallel(group, comm_type, te_group)


def _split_groups(config, pg_collection, query_groups: int | None) -> SplitGroups | None:
    """The TP ranks sharing GQA groups, when the model has fewer query groups than TP ranks.
    megatron-core then hands the core attention a config copy whose num_query_groups is the TP
    size, so the model's own count comes from the layer spec (`query_groups`)."""
    tp = Values.of(config).tensor_model_parallel_size or 1
    if query_groups is None or query_groups >= tp:
        return None
    group = getattr(pg_collection, "tp", None) if pg_collection is not None else None
    if group is None:
        from megatron.core import parallel_state

        group = parallel_state.get_tensor_model_parallel_group()
    return SplitGroups(group, query_groups, group.rank() // (tp // query_groups))


class CausalCoreAttention(MegatronModule):
    """Shared checks and layout changes; subclasses attend on `[b, s, h, d]` in `_attend`
    (the extension point `bench e2e` uses for its stand-in attentions)."""

    name = "core attention"
    lighthouse_layer = False  # which rules of rules.py apply

    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str = "self",
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
        **kwargs,
    ):
        super().__init__(config=config)
        self.layer_number = layer_number  # global, 1-based (TransformerLayer adds the PP offset)
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type
        self.cp_comm_type = cp_comm_type
        self.pg_collection = pg_collection
        # None means 1/sqrt(hn), applied by the kernels from the head dim they see.
        self.softmax_scale = softmax_scale
        where = f"{self.name} of layer {layer_number}"
        if attention_type != "self":
            raise ValueError(
                f"{where}: only self-attention is supported, got attention_type={attention_type!r}"
            )
        if attn_mask_type != AttnMaskType.causal:
            raise ValueError(
                f"{where}: only causal masks are supported, got attn_mask_type={attn_mask_type}; "
                "use the GPT layer spec's AttnMaskType.causal"
            )
        if kwargs.get("k_channels") not in (None, kwargs.get("v_channels")):
            raise ValueError(f"{where}: multi-latent attention (k_channels != v_channels) is not supported")
        overrides = {} if attention_dropout is None else dict(attention_dropout=attention_dropout)
        check_config(config, where, lighthouse=self.lighthouse_layer, **overrides)
        # Megatron gives a custom core attention no CP guard: each module attends across the
        # CP group itself (attending only within the local shard would be silently wrong).
        self.context_parallel = _context_parallel(config, pg_collection, cp_comm_type)

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Tensor | None,
        /,
        *,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: Tensor | None = None,
        packed_seq_params=None,
    ) -> Tensor:
        where = f"{self.name} of layer {self.layer_number}"
        if packed_seq_params is not None:
            raise ValueError(
                f"{where}: packed sequences (PackedSeqParams, qkv_format="
                f"{getattr(packed_seq_params, 'qkv_format', None)!r}) are not supported yet; "
                "train without --sft / --dataloader-inter-document-masking"
            )
        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
        if mask_type != AttnMaskType.causal:
            raise ValueError(f"{where}: only causal masks are supported, got attn_mask_type={mask_type}")
        if attention_bias is not None:
            raise ValueError(f"{where}: attention_bias is not supported")
        if attention_mask is not None and not _is_causal_mask(attention_mask, query.shape[0],
                                                              self.context_parallel):
            raise ValueError(
                f"{where}: the attention mask is not the causal mask (per-document masks from "
                "--reset-attention-mask are not supported); drop --create-attention-mask-in-dataloader "
                "and --reset-attention-mask"
            )
        # [s, b, h, d] -> [b, s, h, d], the layout of the kernels.
        q, k, v = (t.transpose(0, 1) for t in (query, key, value))
        if q.shape[2] % k.shape[2]:
            raise ValueError(f"{where}: {q.shape[2]} query heads are not a multiple of {k.shape[2]} "
                             "key/value heads")
        out = self._attend(q, k, v)
        s, b = query.shape[0], query.shape[1]
        return out.transpose(0, 1).reshape(s, b, -1)


def _is_causal_mask(mask: Tensor, sq: int, cp: ContextParallel | None, rows_checked: int = 64) -> bool:
    """Megatron masks are bool, True = masked; causal masks key positions after the query's.
    Under CP the rows are this rank's queries (chunks r and 2*CP-1-r) and the columns the
    whole sequence (`get_batch_on_this_cp_rank` splits only the query dimension). Checked on
    `rows_checked` evenly spread rows: a full check would cost a mask-sized pass per layer,
    and the masks refused here (per-document ones) differ from causal on most rows."""
    if mask.shape[-2] != sq:
        return False
    sk = mask.shape[-1]
    local = torch.linspace(0, sq - 1, min(sq, rows_checked), device=mask.device).long()
    rows = local
    if cp is not None:
        c = sq // 2
        first, second = cp.chunk_ids()
        rows = torch.where(local < c, first * c + local, second * c + local - c)
    causal = torch.arange(sk, device=mask.device)[None, :] > rows[:, None]
    return bool((mask[..., local, :].to(torch.bool) == causal).all())


class DenseCoreAttention(CausalCoreAttention):
    """Ordinary causal attention (PyTorch SDPA) for machines without Transformer Engine.

    The dense layers of a Lighthouse model, and dense models, on CPU and in tests; on
    GPUs with Transformer Engine the specs use megatron-core's `TEDotProductAttention`.
    """

    name = "DenseCoreAttention"

    def _attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return causal_attention(q, k, v, self.softmax_scale, context_parallel=self.context_parallel)


class LighthouseCoreAttention(CausalCoreAttention):
    """Lighthouse attention as a megatron-core core attention.

    Extra spec params (`ModuleSpec(params=...)`): `lighthouse`, a `LighthouseConfig`;
    `schedule`, a `RecipeSchedule`: at which training iterations (see `schedule.set_iteration`)
    this layer computes dense causal attention or a larger k (the recovery stage and its
    variants; None: always Lighthouse); `query_groups`: the model's num_query_groups
    (megatron-core hands this module a copy with the TP size when there are fewer), so that
    ranks sharing a GQA group select together.
    """

    name = "LighthouseCoreAttention"
    lighthouse_layer = True

    def __init__(
        self,
        *args,
        lighthouse: LighthouseConfig | None = None,
        schedule: RecipeSchedule | None = None,
        query_groups: int | None = None,
        **kwargs,
    ):
        # megatron-core's builder keywords go to the shared checks unchanged.
        super().__init__(*args, **kwargs)
        self.split_groups = _split_groups(self.config, self.pg_collection, query_groups)
        self.lighthouse = LighthouseConfig() if lighthouse is None else lighthouse
        self.schedule = RecipeSchedule() if schedule is None else schedule
        # This layer's place among the model's Lighthouse layers (the progressive switch's order).
        num_layers = Values.of(self.config).num_layers or self.layer_number
        sparse = sorted(set(range(num_layers)) - self.lighthouse.resolve_dense_layers(num_layers))
        index = self.layer_number - 1
        # A layer built outside a model's block (tests, benchmarks) is the only one of its kind.
        self.rank, self.count = (sparse.index(index), len(sparse)) if index in sparse else (0, 1)
        self._ladders: dict[int, list[int]] = {}

    def is_dense_now(self) -> bool:
        if dense_forced(self.rank):
            return True
        return self.schedule.layer_dense(get_iteration(), self.rank, self.count, training=self.training)

    def config_now(self, seq_len: int) -> LighthouseConfig:
        """The settings of this iteration (k grows inside `grow_topk_iters`); `seq_len` is global."""
        if not self.schedule.grow_topk_iters:
            return self.lighthouse
        if seq_len not in self._ladders:
            cp = 1 if self.context_parallel is None else self.context_parallel.size
            self._ladders[seq_len] = self.schedule.check_against(self.lighthouse, seq_len, cp)
        return self.schedule.config_at(self.lighthouse, get_iteration(), self._ladders[seq_len])

    def _attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        if self.is_dense_now():
            # Recovery: the same dense causal attention the dense layers compute (the
            # "auto" kernel is TE's fused attention where TE imports on a GPU).
            return causal_attention(q, k, v, self.softmax_scale, self.lighthouse.backend,
                                    self.context_parallel)
        cp = 1 if self.context_parallel is None else self.context_parallel.size
        return lighthouse_attention(q, k, v, self.config_now(q.shape[1] * cp), self.softmax_scale,
                                    context_parallel=self.context_parallel, split_groups=self.split_groups)

    def extra_repr(self) -> str:
        return f"layer_number={self.layer_number}, {self.lighthouse}, {self.schedule}"
