"""`lighthouse-megatron bench e2e`: whole training steps of a megatron-core GPTModel.

One step = forward, backward and an Adam step on synthetic tokens, for a model built with
this package's block spec (Transformer Engine or local submodules), in four modes that
differ only in the core attention of the Lighthouse layers, all in one process on one card
with the same weights, recompute settings and loss:

  dense       every layer dense (TEDotProductAttention, or SDPA without TE)
  lighthouse  Lighthouse stage 1: the configured layers run Lighthouse attention
  ceiling     those layers attend over S randomly chosen tokens (S = Lighthouse's gathered
              length) with a plain index gather and index_add scatter: selection for free,
              the fastest a Lighthouse step could be
  none        every core attention returns a copy of V: the step without attention

so that tokens/s, step time and peak memory compare directly, and `1 - none / mode` is the
attention share of a mode's step. The default model is the paper's (Llama-3 style, 30
layers, hidden 1024, 8 heads, SwiGLU FFN 1536, RMSNorm, RoPE, untied output layer), at
98,304 tokens with L=3, p=4, k=1536 and layers 0, 1, 28, 29 dense.

The loss is computed in chunks of --loss-chunk tokens, each recomputed in the backward
pass, so that [N, vocab] fp32 logits never exist at once (98K x 128,256 would be 50 GB).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import math
import time

import torch
import torch.nn.functional as F

from ..config import LighthouseConfig
from ..megatron.cpu import cpu_rotary_embedding
from ..megatron.model import gpt_model
from ..megatron.model import transformer_config as model_config
from ..recipe import RecipeSchedule
from ..settings.bench import E2E_DTYPES, E2E_MODES, format_length
from ._common import (
    UsageError,
    check_writable,
    median,
    run_meta,
    sync,
    time_ms,
    torch_dtype,
    usage_errors_as_exit_2,
    write_json,
)

DTYPES = {name: torch_dtype(name) for name in E2E_DTYPES}


# ------------------------------------------------------------ attention stand-ins


def _stand_in_modules():
    """Core attentions for the ceiling and no-attention modes (megatron-core imported lazily)."""
    from ..backends import dense_causal_attention
    from ..megatron.core_attention import CausalCoreAttention

    class SampledCoreAttention(CausalCoreAttention):
        """Attention over `gathered` random tokens, fixed per layer: selection costs nothing."""

        name = "SampledCoreAttention"

        def __init__(self, *args, gathered: int, backend: str = "auto", **kwargs):
            super().__init__(*args, **kwargs)
            self.gathered, self.backend = gathered, backend
            self._index = None

        def _attend(self, q, k, v):
            n = q.shape[1]
            if self._index is None or self._index.device != q.device:
                # Fixed indices: full recompute replays the forward and must see the same set.
                g = torch.Generator().manual_seed(self.layer_number)
                self._index = torch.randperm(n, generator=g)[: self.gathered].sort().values.to(q.device)
            idx = self._index
            o = dense_causal_attention(q.index_select(1, idx), k.index_select(1, idx),
                                       v.index_select(1, idx), self.softmax_scale, self.backend)
            return q.new_zeros(q.shape).index_add_(1, idx, o)

    class ValueCopyCoreAttention(CausalCoreAttention):
        """No attention: each token's output is its own value vector."""

        name = "ValueCopyCoreAttention"

        def _attend(self, q, k, v):
            if q.shape[2] != v.shape[2]:
                return v.repeat_interleave(q.shape[2] // v.shape[2], dim=2)
            return v.clone()

    return SampledCoreAttention, ValueCopyCoreAttention


# ---------------------------------------------------------------------- the model


def _init_parallel(device: torch.device, seed: int) -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state, tensor_parallel

    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0,
                                world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=1)
    if device.type == "cuda":
        tensor_parallel.model_parallel_cuda_manual_seed(seed)


def transformer_config(args, device: torch.device):
    """The model's TransformerConfig: the package's one builder (the trainer's and the
    converter's) on the bench's flags under Megatron-LM's argument names, plus what only the
    bench sets: its dtype, recompute, FP8 and (off) fusions."""
    dtype = DTYPES[args.dtype]
    overrides = dict(bf16=dtype == torch.bfloat16, bias_activation_fusion=False, masked_softmax_fusion=False,
                     apply_rope_fusion=False)
    if args.recompute == "full":
        overrides.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    if getattr(args, "fp8", None):
        overrides.update(fp8=args.fp8, fp8_recipe=args.fp8_recipe,
                         fp8_dot_product_attention=bool(getattr(args, "fp8_attention", False)))
    return model_config(megatron_args(args), dtype=dtype, cpu_init=device.type == "cpu", **overrides)


def megatron_args(args, seq_len: int | None = None) -> dict:
    """The bench's model under Megatron-LM's argument names (the model builder reads these):
    Llama-3-style, RoPE, untied output layer."""
    return dict(
        num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads,
        group_query_attention=True, num_query_groups=args.kv_heads or args.heads,
        ffn_hidden_size=args.ffn, kv_channels=args.hidden // args.heads,
        swiglu=True, normalization="RMSNorm", norm_epsilon=1e-5, add_bias_linear=False,
        max_position_embeddings=seq_len, untie_embeddings_and_output_weights=True,
        position_embedding_type="rope", rotary_base=int(args.rope_base),
    )


def _module(spec):
    """The class a submodule spec builds (TE specs hold some classes bare, not in a ModuleSpec)."""
    return getattr(spec, "module", spec)


def block_spec(config, mode: str, lighthouse: LighthouseConfig, use_te: bool, gathered: int):
    """The package's block spec for this mode; `gathered` tokens per sampled layer (ceiling)."""
    from megatron.core.transformer.spec_utils import ModuleSpec

    from ..megatron import LighthouseCoreAttention, get_gpt_decoder_block_spec

    impl = "dense" if mode in ("dense", "none") else "lighthouse"
    spec = get_gpt_decoder_block_spec(config, attention_impl=impl, lighthouse=lighthouse, use_te=use_te)
    sampled, value_copy = _stand_in_modules()
    for layer in spec.layer_specs:
        attention = layer.submodules.self_attention.submodules
        if mode == "none":
            attention.core_attention = ModuleSpec(module=value_copy)
        elif mode == "ceiling" and _module(attention.core_attention) is LighthouseCoreAttention:
            attention.core_attention = ModuleSpec(
                module=sampled, params={"gathered": gathered, "backend": lighthouse.backend})
    return spec


def build_model(args, config, spec, seq_len: int, device: torch.device):
    from megatron.core import tensor_parallel

    # The same initial weights in every mode: the modes differ in parameter-free modules only.
    torch.manual_seed(args.seed)
    if device.type == "cuda":
        tensor_parallel.model_parallel_cuda_manual_seed(args.seed)
    model = gpt_model(megatron_args(args, seq_len), config, spec, args.vocab)
    if device.type == "cpu":
        cpu_rotary_embedding(model)
    return model.to(device)


def chunked_loss(model, tokens, positions, labels, chunk: int):
    """Mean next-token cross-entropy; logits live one chunk at a time (recomputed in backward)."""
    from torch.utils.checkpoint import checkpoint

    # GPTModel returns its final-normed hidden states [s, b, h] when post_process is off; the
    # output layer is applied below, chunk by chunk.
    model.post_process = False
    try:
        hidden = model(tokens, positions, None)
    finally:
        model.post_process = True
    s = hidden.shape[0]
    chunk = chunk or s

    def piece(h, lab):
        logits, _ = model.output_layer(h)
        return F.cross_entropy(logits.float().flatten(0, 1), lab.flatten(), reduction="sum")

    total = hidden.new_zeros((), dtype=torch.float32)
    for i in range(0, s, chunk):
        lab = labels[:, i : i + chunk].t()
        total = total + checkpoint(piece, hidden[i : i + chunk], lab, use_reentrant=False)
    return total / labels.numel()


def measure(args, mode: str, seq_len: int, lighthouse: LighthouseConfig, use_te: bool,
            device: torch.device, deadline: float | None) -> dict:
    config = transformer_config(args, device)
    spec = block_spec(config, mode, lighthouse, use_te, lighthouse.gathered_length(seq_len))
    model = build_model(args, config, spec, seq_len, device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-5, **({"fused": True} if device.type == "cuda"
                                                                 else {}))
    g = torch.Generator().manual_seed(args.seed)
    tokens = torch.randint(0, args.vocab, (args.batch, seq_len + 1), generator=g).to(device)
    tokens, labels = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    positions = torch.arange(seq_len, device=device).unsqueeze(0).expand(args.batch, -1)
    losses = []

    def step(_):
        optimizer.zero_grad(set_to_none=True)
        loss = chunked_loss(model, tokens, positions, labels, args.loss_chunk)
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    time_ms(step, args.warmup, 0, device)
    steps = args.steps
    if deadline is not None and args.warmup:
        # Fit the timed steps into what is left of the budget (at least one).
        per_step = (time.perf_counter() - t0) / args.warmup
        steps = max(1, min(steps, int((deadline - time.perf_counter()) / max(per_step, 1e-9))))
    times = time_ms(step, 0, steps, device)
    sync(device)
    row = {
        "N": seq_len, "mode": mode, "step_ms": median(times), "step_ms_all": times, "timed_steps": steps,
        "tokens_per_s": args.batch * seq_len / (median(times) / 1e3),
        "losses": [x.item() for x in losses], "parameters": sum(p.numel() for p in model.parameters()),
    }
    if device.type == "cuda":
        row["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    row["finite"] = all(math.isfinite(x) for x in row["losses"])
    return row


# ---------------------------------------------------------------------- the run


def lighthouse_for(args, seq_len: int) -> LighthouseConfig:
    """The configuration at this length; with --fit-topk the largest valid k <= --topk."""
    topk = args.topk
    while True:
        cfg = LighthouseConfig(levels=args.levels, pooling_factor=args.pooling_factor, topk=topk,
                               tile_topk=args.tile_topk, dense_layers=args.dense_layers, backend=args.backend)
        try:
            cfg.validate(seq_len)
            return cfg
        except ValueError:
            topk -= args.tile_topk
            if not args.fit_topk or topk < args.tile_topk:
                raise


def recipe_variants(cfg: LighthouseConfig, seq_len: int,
                    layers: int) -> list[tuple[str, LighthouseConfig, dict]]:
    """The stage-1 steps of the recipe variants (lighthouse_megatron.recipe) that are neither a dense
    nor a plain Lighthouse step, with their Lighthouse settings at this length and the fields their
    row records: one `grow` per larger k of the ladder that `--lighthouse-grow-topk-iters` climbs,
    `mixed`, the first half of the Lighthouse layers dense (the middle of a
    `--lighthouse-progressive-iters` window), and `mean-merge`, the levels averaged
    (`--lighthouse-level-merge mean`)."""
    ladder = RecipeSchedule(until_iter=1, grow_topk_iters=1).topk_ladder(cfg, seq_len)
    variants = [("grow", dataclasses.replace(cfg, topk=k), {}) for k in ladder[1:]]
    dense = cfg.resolve_dense_layers(layers)
    lighthouse = [i for i in range(layers) if i not in dense]
    turned = lighthouse[: len(lighthouse) // 2]
    mixed = dataclasses.replace(cfg, dense_layers=tuple(sorted(dense | set(turned))))
    return variants + [("mixed", mixed, {"lighthouse_layers_dense": [len(turned), len(lighthouse)]}),
                       ("mean-merge", dataclasses.replace(cfg, level_merge="mean"), {})]


def recipe_summary(by: dict, rows: list[dict]) -> dict:
    """Each `grow`, `mixed` and `mean-merge` row's step time over the dense step's; for `mixed` also the
    prediction from attention time additive over layers (the Lighthouse and dense step times
    interpolated)."""
    dense, lh = by.get("dense"), by.get("lighthouse")
    s = {}
    if not dense:
        return s
    grow = {str(r["topk"]): r["step_ms"] / dense["step_ms"] for r in rows if r["mode"] == "grow"}
    if grow:
        s["grow_cost_vs_dense"] = grow
    mixed = next((r for r in rows if r["mode"] == "mixed"), None)
    if mixed:
        s["mixed_cost_vs_dense"] = mixed["step_ms"] / dense["step_ms"]
        turned, count = mixed["lighthouse_layers_dense"]
        s["mixed_lighthouse_layers_dense"] = [turned, count]
        if lh:
            between = lh["step_ms"] + turned / count * (dense["step_ms"] - lh["step_ms"])
            s["mixed_additive_prediction"] = between / dense["step_ms"]
    merge = next((r for r in rows if r["mode"] == "mean-merge"), None)
    if merge:
        s["mean_merge_cost_vs_dense"] = merge["step_ms"] / dense["step_ms"]
    return s


def summarize(rows: list[dict]) -> list[dict]:
    """Per length: speed-up over dense, share of the ceiling, attention share of each step."""
    out = []
    for n in sorted({r["N"] for r in rows}):
        by = {r["mode"]: r for r in rows if r["N"] == n and "step_ms" in r and r["mode"] in E2E_MODES}
        s = {"N": n}
        dense, lh, ceil, none = (by.get(m) for m in E2E_MODES)
        if lh and dense:
            s["speedup_vs_dense"] = dense["step_ms"] / lh["step_ms"]
        if ceil and dense:
            s["ceiling_speedup_vs_dense"] = dense["step_ms"] / ceil["step_ms"]
        if lh and ceil:
            s["lighthouse_of_ceiling"] = ceil["step_ms"] / lh["step_ms"]
        if none:
            for m, r in by.items():
                if m != "none":
                    s[f"attention_share_{m}"] = 1 - none["step_ms"] / r["step_ms"]
        s.update(recipe_summary(by, [r for r in rows if r["N"] == n and "step_ms" in r]))
        out.append(s)
    return out


def _fmt(value) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"k={k}: {v:.3f}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return " of ".join(map(str, value))
    return f"{value:.3f}"


def print_table(rows: list[dict], summary: list[dict], device: str) -> None:
    print(f"\nend-to-end training step on {device} (median; share = attention share of the step)")
    print(f"{'N':>6} {'mode':>10} {'k':>5} {'S':>7} | {'step ms':>9} {'tok/s':>9} {'peak GiB':>8} "
          f"{'share':>6} | {'loss':>7}")
    for r in rows:
        if "step_ms" not in r:
            print(f"{format_length(r['N']):>6} {r['mode']:>10}  {r.get('error', 'skipped')}")
            continue
        sm = next(s for s in summary if s["N"] == r["N"])
        share = sm.get(f"attention_share_{r['mode']}")
        print(f"{format_length(r['N']):>6} {r['mode']:>10} {r.get('topk', 0):>5} {r.get('S') or '-':>7} | "
              f"{r['step_ms']:9.1f} {r['tokens_per_s']:9.0f} {r.get('peak_mem_gib', float('nan')):8.1f} "
              f"{'' if share is None else f'{100 * share:5.1f}%':>6} | {r['losses'][-1]:7.3f}")
    for s in summary:
        parts = [f"{key} {_fmt(val)}" for key, val in s.items() if key != "N"]
        print(f"{format_length(s['N'])}: " + ", ".join(parts))


def check_fp8(args, use_te: bool) -> None:
    """FP8 runs TE's linear layers in FP8: it needs the TE spec, and TE's FP8 GEMMs need
    dimensions that are multiples of 16."""
    if args.fp8 is None:
        if args.fp8_attention:
            raise UsageError("--fp8-attention needs --fp8 (hybrid or e4m3)")
        return
    if not use_te:
        from ..backends import te_import_error

        why = "--spec local" if args.spec == "local" else (te_import_error() or
                                                            "no CUDA GPU (--device cpu or none found)")
        raise UsageError(f"--fp8 {args.fp8}: FP8 runs Transformer Engine's linear layers, which are not "
                         f"usable here ({why}); run on a GPU with TE and --spec auto or te, or drop --fp8")
    for flag, value in (("--hidden", args.hidden), ("--ffn", args.ffn), ("--batch x seq-len",
                        args.batch * min(args.seq_lens))):
        if value % 16:
            raise UsageError(f"--fp8 {args.fp8}: {flag} {value} must be a multiple of 16 (TE's FP8 GEMMs)")


def measure_row(args, name: str, mode: str, n: int, lighthouse: LighthouseConfig, fields: dict,
                use_te: bool, device: torch.device, deadline: float | None) -> dict:
    """One row: step `name` (a mode, or a recipe variant's step built as `mode` with `lighthouse`) at
    length n, or the reason it was skipped; printed as it ends."""
    s_len = {"dense": n, "none": None}.get(mode, lighthouse.gathered_length(n))  # attended length
    row = {"N": n, "mode": name, "topk": lighthouse.topk, "S": s_len, **fields}
    if mode == "dense" and args.dense_max_len and n > args.dense_max_len:
        row["error"] = f"skipped: dense runs only up to --dense-max-len {args.dense_max_len}"
    elif deadline is not None and time.perf_counter() > deadline:
        row["error"] = f"skipped: time budget of {args.time_budget:.0f} s spent"
    else:
        try:
            row.update(measure(args, mode, n, lighthouse, use_te, device, deadline), mode=name)
        except torch.cuda.OutOfMemoryError as e:
            row["error"] = f"out of memory: {str(e).splitlines()[0]}"
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if "step_ms" in row:
        print(f"N={format_length(n)} {name}: {row['step_ms']:.1f} ms/step, {row['tokens_per_s']:.0f} tok/s, "
              f"peak {row.get('peak_mem_gib', float('nan')):.1f} GiB, loss {row['losses'][-1]:.3f}",
              flush=True)
    else:
        print(f"N={format_length(n)} {name}: {row['error']}", flush=True)
    return row


def run(args: argparse.Namespace) -> int:
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in E2E_MODES]
    if bad or not modes:
        raise UsageError(f"--modes {args.modes!r}: valid modes are {', '.join(E2E_MODES)}")
    if args.steps < 1 or args.warmup < 0:
        raise UsageError(f"--steps must be >= 1 and --warmup >= 0, got {args.steps} and {args.warmup}")
    if args.heads < 1 or args.hidden % args.heads:
        raise UsageError(f"--hidden {args.hidden} must be a multiple of --heads {args.heads}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA GPU here (use --device cpu for a tiny code-path run)")
    if device.type == "cpu" and args.recompute == "full":
        raise UsageError("--recompute full needs --device cuda (megatron-core's recompute saves the CUDA "
                         "random state); pass --recompute none with --device cpu")
    out_path = args.out / f"{args.name}.json"
    check_writable(out_path, args.force)
    # Transformer Engine must load before torch first uses cuDNN (TE links its own cuDNN).
    from ..backends import te_available, te_import_error

    te_ok = device.type == "cuda" and te_available()  # imported now, whatever the spec
    use_te = te_ok and args.spec != "local"
    if args.spec == "te" and not use_te:
        why = te_import_error() or "no GPU"
        raise UsageError(f"--spec te: Transformer Engine is not usable here ({why})")
    check_fp8(args, use_te)
    configs = {}
    for n in args.seq_lens:
        try:
            configs[n] = lighthouse_for(args, n)
        except ValueError as e:
            raise UsageError(f"--seq-lens {n} with --topk {args.topk}: {e}") from None
    try:
        configs[args.seq_lens[0]].resolve_dense_layers(args.layers)
    except ValueError as e:
        raise UsageError(f"--dense-layers: {e}") from None
    if device.type == "cuda":
        torch.cuda.set_device(device.index or 0)
    _init_parallel(device, args.seed)

    meta = run_meta(device)
    meta.update(
        model={"layers": args.layers, "hidden": args.hidden, "heads": args.heads,
               "kv_heads": args.kv_heads or args.heads, "ffn": args.ffn, "vocab": args.vocab,
               "rope_base": args.rope_base, "normalization": "RMSNorm", "mlp": "SwiGLU",
               "tied_output": False, "batch": args.batch, "dtype": args.dtype},
        lighthouse=dataclasses.asdict(configs[args.seq_lens[0]]) | {"topk_per_length": {
            str(n): c.topk for n, c in configs.items()}},
        spec="te" if use_te else "local",
        stage5_kernel=args.backend if args.backend != "auto" else ("te" if te_ok else "sdpa"),
        recompute=args.recompute, loss_chunk=args.loss_chunk,
        fp8=None if args.fp8 is None else {"format": args.fp8, "recipe": args.fp8_recipe,
                                           "attention": "fp8" if args.fp8_attention else "bf16"},
        optimizer="torch.optim.Adam (fused on CUDA), bf16 parameters" if args.dtype == "bf16"
        else "torch.optim.Adam", warmup=args.warmup, steps=args.steps, time_budget_s=args.time_budget,
    )
    meta["lighthouse"]["dense_layers"] = list(args.dense_layers)
    print(f"device {meta['device']} ({meta['nvidia_smi']}), spec {meta['spec']}, recompute "
          f"{args.recompute}, megatron-core {meta['megatron_core']}, TE {meta['transformer_engine']}",
          flush=True)

    start = time.perf_counter()
    rows = []

    def save():
        meta["parameters"] = next((r["parameters"] for r in rows if "parameters" in r), None)
        meta["wall_s"] = time.perf_counter() - start
        write_json(out_path, {"meta": meta, "rows": rows, "summary": summarize(rows)})

    deadline = start + args.time_budget if args.time_budget > 0 else None
    for n in args.seq_lens:
        cfg = configs[n]
        steps = [(mode, mode, cfg, {}) for mode in modes]
        if args.recipe_steps:
            steps += [(kind, "lighthouse", variant, fields)
                      for kind, variant, fields in recipe_variants(cfg, n, args.layers)]
        for name, mode, lighthouse, fields in steps:
            rows.append(measure_row(args, name, mode, n, lighthouse, fields, use_te, device, deadline))
            save()  # after every row: a run cut short by a time limit keeps what it measured
    save()
    print_table(rows, summarize(rows), meta["device"])
    print(f"\nwrote {out_path}")
    measured = [r for r in rows if "step_ms" in r]
    return 0 if measured and all(r["finite"] for r in measured) else 1



run_cli = usage_errors_as_exit_2(run)
