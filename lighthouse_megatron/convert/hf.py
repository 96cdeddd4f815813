"""`convert --to hf`: the dense model as a Hugging Face Llama checkpoint.

Llama expresses RMSNorm, SwiGLU, RoPE (rotate-half, as megatron-core without
--rotary-interleaved), GQA and bias-free linears, with tied or untied embeddings;
anything else is refused by name. megatron-core's fused QKV weight holds, per query
group, that group's query heads, then its key head, then its value head; `linear_fc1`
holds the gate rows, then the up rows.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from ..checkpoint.manifest import write_manifest
from ..checkpoint.model import model_state
from ..checkpoint.output import check_finite, is_tokenizer_file, staged_output
from ..checkpoint.reader import CheckpointError
from ..settings.fields import Values, given

HF_EXTRA = "pip install 'lighthouse-megatron[hf]' (safetensors, transformers)"


def check_llama(args: Values) -> None:
    """Refuse, by name, what LlamaForCausalLM cannot express (absent arguments: Megatron-LM's
    defaults)."""
    args = Values.of(args)
    problems = []
    normalization = given(args.normalization, "LayerNorm")
    if normalization != "RMSNorm":
        problems.append(f"normalization={normalization!r} (Llama uses RMSNorm)")
    if not args.swiglu:
        act = "squared ReLU" if args.squared_relu else "GELU"
        problems.append(f"a {act} MLP (Llama uses SwiGLU: --swiglu)")
    position = given(args.position_embedding_type, "learned_absolute")
    if position != "rope":
        problems.append(f"position_embedding_type={position!r} (learned absolute positions have no Llama "
                        "equivalent; Llama uses RoPE)")
    if given(args.add_bias_linear, True):
        problems.append("linear biases (add_bias_linear=True; Llama has none: --disable-bias-linear)")
    if args.add_qkv_bias:
        problems.append("QKV biases (add_qkv_bias=True)")
    for what, value in (("QK layer-norm (qk_layernorm", args.qk_layernorm),
                        ("zero-centred norms (apply_layernorm_1p", args.apply_layernorm_1p),
                        ("interleaved RoPE (rotary_interleaved", args.rotary_interleaved),
                        ("RoPE scaling (use_rope_scaling", args.use_rope_scaling),
                        ("multi-latent attention (multi_latent_attention", args.multi_latent_attention),
                        ("MoE layers (num_experts", args.num_experts)):
        if value:
            problems.append(f"{what}={value!r})")
    if given(args.rotary_percent, 1.0) != 1.0:
        problems.append(f"partial RoPE (rotary_percent={args.rotary_percent})")
    if problems:
        raise CheckpointError("--to hf writes Llama checkpoints; this model has " + "; ".join(problems))


def llama_config(args: Values, vocab: int, dtype: torch.dtype) -> dict:
    """config.json of the Llama model (transformers' LlamaConfig names)."""
    args = Values.of(args)
    heads = args.num_attention_heads
    groups = args.num_query_groups if args.group_query_attention else heads
    return dict(
        architectures=["LlamaForCausalLM"],
        model_type="llama",
        vocab_size=vocab,
        hidden_size=args.hidden_size,
        intermediate_size=given(args.ffn_hidden_size, 4 * args.hidden_size),
        num_hidden_layers=args.num_layers,
        num_attention_heads=heads,
        num_key_value_heads=groups or heads,
        head_dim=given(args.kv_channels, args.hidden_size // heads),
        hidden_act="silu",
        max_position_embeddings=given(args.max_position_embeddings, given(args.seq_length, 2048)),
        rms_norm_eps=given(args.norm_epsilon, 1e-5),
        rope_theta=float(given(args.rotary_base, 10000)),
        tie_word_embeddings=not args.untie_embeddings_and_output_weights,
        attention_bias=False,
        mlp_bias=False,
        torch_dtype=str(dtype).removeprefix("torch."),
    )


def llama_state(state: dict, args: Values) -> dict[str, torch.Tensor]:
    """Megatron TP = 1 state dict (TE norm names) -> Llama's parameter names."""
    args = Values.of(args)
    heads = args.num_attention_heads
    groups = (args.num_query_groups if args.group_query_attention else None) or heads
    hidden = args.hidden_size
    head_dim = given(args.kv_channels, hidden // heads)
    per_group = heads // groups
    out = {"model.embed_tokens.weight": state["embedding.word_embeddings.weight"],
           "model.norm.weight": state["decoder.final_layernorm.weight"]}
    if args.untie_embeddings_and_output_weights:
        out["lm_head.weight"] = state["output_layer.weight"]
    for i in range(args.num_layers):
        src, dst = f"decoder.layers.{i}.", f"model.layers.{i}."
        qkv = state[src + "self_attention.linear_qkv.weight"]
        qkv = qkv.reshape(groups, (per_group + 2) * head_dim, hidden)
        q, k, v = qkv.split([per_group * head_dim, head_dim, head_dim], dim=1)
        fc1 = state[src + "mlp.linear_fc1.weight"]
        gate, up = fc1.chunk(2, dim=0)
        out.update({
            dst + "input_layernorm.weight": state[src + "self_attention.linear_qkv.layer_norm_weight"],
            dst + "self_attn.q_proj.weight": q.reshape(heads * head_dim, hidden),
            dst + "self_attn.k_proj.weight": k.reshape(groups * head_dim, hidden),
            dst + "self_attn.v_proj.weight": v.reshape(groups * head_dim, hidden),
            dst + "self_attn.o_proj.weight": state[src + "self_attention.linear_proj.weight"],
            dst + "post_attention_layernorm.weight": state[src + "mlp.linear_fc1.layer_norm_weight"],
            dst + "mlp.gate_proj.weight": gate,
            dst + "mlp.up_proj.weight": up,
            dst + "mlp.down_proj.weight": state[src + "mlp.linear_fc2.weight"],
        })
    return {k: v.contiguous().clone() for k, v in out.items()}


def write_hf(ckpt, args: Values, output: Path, *, dry_run: bool, force: bool, log) -> dict:
    """Write `ckpt` (its stored `args`) to `output` as a Llama checkpoint (unless `dry_run`);
    returns what it did: "changes" and, once written, "tokenizer" and "verified"."""
    args = Values.of(args)
    report: dict = {}
    check_llama(args)
    try:
        from safetensors.torch import save_file
    except ImportError as e:
        raise CheckpointError(f"--to hf needs safetensors: {HF_EXTRA}") from e
    state = model_state(ckpt, args)
    check_finite(state)
    needed = ("embedding.word_embeddings.weight", "decoder.final_layernorm.weight")
    missing = [k for k in needed if k not in state]
    if missing:
        raise CheckpointError(f"{ckpt.directory}: the model state lacks {missing} (truncated checkpoint?)")
    weights = llama_state(state, args)
    dtype = weights["model.embed_tokens.weight"].dtype
    config = llama_config(args, weights["model.embed_tokens.weight"].shape[0], dtype)
    c = Values(config)
    tp = 1 + max((t for t, _ in ckpt.shards), default=0)
    report["changes"] = [f"Llama checkpoint: {c.num_hidden_layers} layers, hidden {c.hidden_size}, "
                         f"{c.num_attention_heads} heads / {c.num_key_value_heads} KV heads, "
                         f"{'tied' if c.tie_word_embeddings else 'untied'} embeddings, {dtype}"
                         + (f", {tp} TP shards merged" if tp > 1 else "")]
    for change in report["changes"]:
        log(change)
    if dry_run:
        return report

    with staged_output(output, force) as tmp:
        tmp.mkdir()
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        # safetensors creates the file 0600; the other outputs follow the umask.
        os.chmod(tmp / "model.safetensors", 0o666 & ~_umask())
        report["tokenizer"] = export_tokenizer(args, tmp)
        log(report["tokenizer"])
        write_manifest(tmp)
        report["verified"] = verify_hf(tmp, state, args)
        log(f"output verified: {report['verified']}" if isinstance(report["verified"], dict)
            else report["verified"])
    return report


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


EOD_TOKEN = "<|endoftext|>"


def byte_tokenizer(eod: int):
    """A transformers tokenizer with the trainer's byte-level ids: byte b is id b (UTF-8
    bytes of the text, as `prepare-data` writes them), the end-of-document token is `eod`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: b for b, c in _byte_characters().items()}  # one token per byte, id = the byte
    vocab[EOD_TOKEN] = eod
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([EOD_TOKEN])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOD_TOKEN, bos_token=None,
                                   unk_token=None, pad_token=None, clean_up_tokenization_spaces=False)


def _byte_characters() -> dict[int, str]:
    """Byte -> the character the ByteLevel pre-tokenizer writes for it (GPT-2's table): the
    printable bytes stand for themselves, the others take the alphabet's characters from
    U+0100 on in byte order."""
    from tokenizers import pre_tokenizers

    codes = sorted(ord(c) for c in pre_tokenizers.ByteLevel.alphabet())
    direct = [c for c in codes if c < 256]
    rest = [b for b in range(256) if b not in set(direct)]
    shifted = (chr(c) for c in codes if c >= 256)
    return {**{b: chr(b) for b in direct}, **dict(zip(rest, shifted, strict=True))}


def export_tokenizer(args: Values, directory: Path) -> str:
    """Write the checkpoint's tokenizer beside the model; returns what was done (one line).
    NullTokenizer with a byte vocabulary: a byte-level tokenizer with the same ids. A Hugging
    Face tokenizer the checkpoint names by a local directory: its files. Otherwise nothing,
    and the line says why."""
    args = Values.of(args)
    kind = args.tokenizer_type
    if kind == "NullTokenizer":
        from ..data import BYTE_EOD, null_tokenizer

        vocab = args.vocab_size
        null = null_tokenizer(vocab) if isinstance(vocab, int) else None
        if null is None or null.vocab_size != BYTE_EOD + 1 or null.eod != BYTE_EOD:
            return (f"tokenizer not exported: NullTokenizer with --vocab-size {vocab} does not number bytes "
                    "(byte-level data has 256 byte ids and the end-of-document id 256)")
        try:
            byte_tokenizer(null.eod).save_pretrained(str(directory))
        except ImportError:
            return f"tokenizer not exported: transformers is not installed ({HF_EXTRA})"
        return (f"tokenizer: byte-level (ids 0-255 = bytes, {EOD_TOKEN} = {null.eod}), as the trainer "
                "numbers them")
    if kind == "HuggingFaceTokenizer":
        source = args.tokenizer_model
        if source and Path(source).is_dir():
            names = [p.name for p in sorted(Path(source).iterdir())
                     if p.is_file() and is_tokenizer_file(p.name)]
            if names:
                for name in names:
                    shutil.copy(Path(source) / name, directory / name)
                return f"tokenizer: copied {', '.join(names)} from {source}"
        return (f"tokenizer not exported: the checkpoint names {source!r}, which is not a local tokenizer "
                "directory here; copy its files next to config.json")
    return f"tokenizer not exported: the checkpoint's tokenizer_type {kind!r} has no Hugging Face export here"


def verify_hf(directory: Path, state: dict, args: Values) -> dict | str:
    """Logits of transformers' LlamaForCausalLM from `directory` against megatron-core's
    dense GPTModel with the same weights (fp32, CPU, a short sequence)."""
    args = Values.of(args)
    try:
        from transformers import LlamaForCausalLM
    except ImportError:
        return f"not verified: transformers is not installed ({HF_EXTRA})"
    from ..checkpoint.model import to_local_names
    from ..megatron.cpu import cpu_as_current_device  # imports megatron-core: only when a model is built
    from .verify import build_dense_model, single_process_megatron

    seq = min(32, given(args.seq_length, 32), given(args.max_position_embeddings, 32))
    vocab = state["embedding.word_embeddings.weight"].shape[0]
    tokens = (torch.arange(seq) * 7 % vocab).unsqueeze(0)
    hf = LlamaForCausalLM.from_pretrained(str(directory), torch_dtype=torch.float32).eval()
    with torch.no_grad():
        hf_logits = hf(tokens).logits
    with single_process_megatron(), cpu_as_current_device():
        model = build_dense_model(args, vocab)
        weights = {k: v.float() for k, v in to_local_names(state).items()
                   if isinstance(v, torch.Tensor) and not k.endswith("_extra_state")}
        result = model.load_state_dict(weights, strict=False)
        if result.unexpected_keys or any(not k.endswith("_extra_state") for k in result.missing_keys):
            raise CheckpointError(f"megatron-core reference model: missing {result.missing_keys}, "
                                  f"unexpected {result.unexpected_keys}")
        with torch.no_grad():
            mc_logits = model(tokens, torch.arange(seq).unsqueeze(0), None)
    diff = (hf_logits - mc_logits).abs().max().item()
    scale = mc_logits.abs().max().item()
    if not diff <= 1e-4 * max(1.0, scale):
        raise CheckpointError(f"LlamaForCausalLM logits differ from megatron-core's by {diff:.3g} "
                              f"(largest logit {scale:.3g}): the export is wrong for this model")
    return {"logits_max_abs_diff": diff, "against": "megatron-core dense GPTModel, fp32"}
