"""The flags of `lighthouse-megatron bench layer` and `bench e2e`, and the sequence-length
syntax they share ('32K', '1M')."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..config import BACKENDS

K = 1024


def parse_length(text: str) -> int:
    """'32K' -> 32768, '1M' -> 1048576, '100' -> 100, '0' -> 0; ArgumentTypeError otherwise."""
    digits, unit = text.strip().upper(), 1
    if digits[-1:] in ("K", "M"):
        digits, unit = digits[:-1], K if digits[-1] == "K" else K * K
    if not digits.isdigit():
        raise argparse.ArgumentTypeError(f"expected a number of tokens such as 4096, 32K or 1M, "
                                         f"got {text.strip()!r}")
    return int(digits) * unit


def parse_lengths(text: str) -> list[int]:
    """Comma-separated positive `parse_length`s, at least one."""
    lengths = [parse_length(x) for x in text.split(",") if x.strip()]
    if not lengths or min(lengths) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive numbers such as 4096, 32K "
                                         f"or 1M, got {text!r}")
    return lengths


def format_length(n: int) -> str:
    if n % (K * K) == 0:
        return f"{n // (K * K)}M"
    return f"{n // K}K" if n % K == 0 else str(n)


def signed_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


# Data types by name, per benchmark (the torch dtypes: `torch_dtype` in bench/_common.py).
LAYER_DTYPES = ("bf16", "fp16")
E2E_DTYPES = ("bf16", "fp32")
E2E_MODES = ("dense", "lighthouse", "ceiling", "none")
# Where results go by default: a folder in the working directory (the repository's evidence
# folders, benchmarks/, are written only when a study's --out names them).
OUT = "lighthouse-bench"
FP8_FORMATS = ("hybrid", "e4m3")  # megatron-core's TransformerConfig.fp8
FP8_RECIPES = ("delayed", "tensorwise", "mxfp8", "blockwise")


def add_bench_parser(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="benchmarks of one layer (also under context parallelism) and "
                           "of whole training steps (GPU)")
    kinds = bench.add_subparsers(dest="bench_command", required=True)
    add_layer_parser(kinds)
    add_e2e_parser(kinds)


def add_layer_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("layer", help="time one Lighthouse attention layer against dense cuDNN SDPA (GPU)")
    p.add_argument("--seq-lens", type=parse_lengths,
                   default=[32 * K, 64 * K, 128 * K, 256 * K, 512 * K, 1024 * K],
                   help="comma-separated sequence lengths (default 32K..1M; 'K' suffix allowed)")
    p.add_argument("--topks", type=parse_lengths, default=[2048, 4096], help="comma-separated top-k budgets")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=None, help="GQA groups (default: --heads)")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", choices=LAYER_DTYPES, default="bf16")
    p.add_argument("--levels", type=int, default=3)
    p.add_argument("--pooling-factor", type=int, default=4)
    p.add_argument("--tile-topk", type=int, default=128)
    p.add_argument("--backend", choices=BACKENDS, default="auto", help="stage-5 kernel (default auto)")
    p.add_argument("--dense-max-len", type=parse_length, default=512 * K,
                   help="run dense SDPA only up to this length (0: never)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--dense-reps", type=int, default=3)
    p.add_argument("--no-check", action="store_true", help="skip the correctness check against the reference")
    p.add_argument("--cp", type=int, default=1,
                   help="context-parallel size: start this many processes on as many GPUs (NCCL) and "
                        "compare with CP = 1 in the same session (writes cp{N}.json)")
    p.add_argument("--cp-comm-type", default="p2p", help="TE's cp_comm_type with --cp (p2p, a2a, all_gather)")
    p.add_argument("--cp1-max-len", type=parse_length, default=K * K,
                   help="longest sequence also timed on one GPU for the --cp comparison")
    p.add_argument("--out", type=Path, default=Path(OUT),
                   help=f"folder for layer.json and layer.png (default: ./{OUT})")
    p.set_defaults(run="lighthouse_megatron.bench.layer:run")


def add_e2e_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("e2e", help="end-to-end training steps: dense, Lighthouse, ceiling, no attention")
    p.add_argument("--seq-lens", type=parse_lengths, default=[96 * K],
                   help="comma-separated sequence lengths; several make a sweep (default 98,304; 'K' suffix)")
    p.add_argument("--modes", default=",".join(E2E_MODES),
                   help=f"comma-separated subset of {','.join(E2E_MODES)}")
    model = p.add_argument_group("model (default: the paper's 530M Llama-3-style model)")
    model.add_argument("--layers", type=int, default=30)
    model.add_argument("--hidden", type=int, default=1024)
    model.add_argument("--heads", type=int, default=8)
    model.add_argument("--kv-heads", type=int, default=None, help="GQA groups (default: --heads)")
    model.add_argument("--ffn", type=int, default=1536, help="SwiGLU hidden size")
    model.add_argument("--vocab", type=int, default=128_256, help="128256 (Llama 3, untied output) or 256")
    model.add_argument("--rope-base", type=float, default=10_000.0)
    model.add_argument("--batch", type=int, default=1)
    model.add_argument("--dtype", choices=E2E_DTYPES, default="bf16")
    model.add_argument("--fp8", choices=FP8_FORMATS, default=None,
                       help="TE linear layers in FP8 (megatron-core's fp8 config: TE's fp8_autocast around "
                            "the block); attention stays bf16 unless --fp8-attention. Needs TE")
    model.add_argument("--fp8-recipe", choices=FP8_RECIPES, default="delayed",
                       help="megatron-core's fp8_recipe (default delayed)")
    model.add_argument("--fp8-attention", action="store_true",
                       help="TE's FP8 dot-product attention too (fp8_dot_product_attention)")
    lh = p.add_argument_group("Lighthouse")
    lh.add_argument("--levels", type=int, default=3)
    lh.add_argument("--pooling-factor", type=int, default=4)
    lh.add_argument("--topk", type=int, default=1536)
    lh.add_argument("--tile-topk", type=int, default=128)
    lh.add_argument("--dense-layers", type=signed_list, default=(0, 1, -2, -1),
                    help="0-based layers kept dense, negative from the end (default 0,1,-2,-1)")
    lh.add_argument("--fit-topk", action="store_true",
                    help="at lengths where --topk is invalid, use the largest valid k below it (sweeps)")
    lh.add_argument("--backend", choices=BACKENDS, default="auto", help="stage-5 kernel (default auto)")
    run = p.add_argument_group("run")
    run.add_argument("--spec", choices=("auto", "te", "local"), default="auto",
                     help="Transformer Engine or local submodules (auto: TE where it imports on a GPU)")
    run.add_argument("--recompute", choices=("full", "none"), default="full",
                     help="activation recompute, the same for every mode (full: every layer; CUDA only)")
    run.add_argument("--loss-chunk", type=int, default=8192, help="tokens per cross-entropy chunk (0: one)")
    run.add_argument("--warmup", type=int, default=1)
    run.add_argument("--steps", type=int, default=3, help="timed steps per mode (median reported)")
    run.add_argument("--dense-max-len", type=parse_length, default=0,
                     help="run the dense mode only up to this length (0: always)")
    run.add_argument("--recipe-steps", action="store_true",
                     help="also time the stage-1 steps of the recipe variants: Lighthouse at every larger "
                          "k that --lighthouse-grow-topk-iters climbs to (mode grow), and the first half of "
                          "the Lighthouse layers dense, the middle of a --lighthouse-progressive-iters "
                          "window (mode mixed), and the levels averaged (mode mean-merge, "
                          "--lighthouse-level-merge mean); an interleaved dense step is the dense mode's")
    run.add_argument("--time-budget", type=float, default=0,
                     help="seconds; modes that would start after it are skipped and recorded (0: none)")
    run.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                     help="cpu runs the code path at tiny sizes (tests); timings then mean little")
    run.add_argument("--seed", type=int, default=1234)
    run.add_argument("--out", type=Path, default=Path(OUT), help=f"folder for NAME.json (default: ./{OUT})")
    run.add_argument("--name", default="e2e", help="output file stem (default e2e)")
    run.add_argument("--force", action="store_true", help="overwrite an existing NAME.json")
    p.set_defaults(run="lighthouse_megatron.bench.e2e:run_cli")
