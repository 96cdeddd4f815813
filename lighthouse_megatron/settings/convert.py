"""The flags of `lighthouse-megatron convert` and `lighthouse-megatron inspect`."""

from __future__ import annotations

import argparse


def add_convert_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert", help="make a stage-1 (Lighthouse) checkpoint load under the dense spec, or export it "
                        "to Hugging Face Llama",
        description="Rewrite a Megatron-LM checkpoint (torch_dist or torch format) for dense attention, "
                    "then load it under the dense spec and run a forward pass to verify it.")
    p.add_argument("--input", required=True, metavar="CKPT", help="a --save directory or its iter_NNNNNNN/")
    p.add_argument("--output", required=True, metavar="CKPT", help="directory to create")
    p.add_argument("--to", choices=("megatron", "hf"), default="megatron",
                   help="megatron: a dense Megatron-LM checkpoint (default); hf: a Llama checkpoint "
                        "(config.json + model.safetensors)")
    p.add_argument("--weights-only", action="store_true",
                   help="drop optimizer, scheduler and RNG state (written as a 'release' checkpoint)")
    p.add_argument("--dry-run", action="store_true", help="report what would change, write nothing")
    p.add_argument("--force", action="store_true", help="replace an existing --output")
    p.add_argument("--no-verify", action="store_true",
                   help="skip checking the input's files against its manifest (lighthouse-manifest.json)")
    p.set_defaults(run="lighthouse_megatron.convert.cli:run_convert")


def add_inspect_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="summarise a Megatron-LM checkpoint")
    p.add_argument("checkpoint", metavar="CKPT", help="a --save directory or its iter_NNNNNNN/")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--no-verify", action="store_true",
                   help="skip checking the files against the checkpoint's manifest "
                        "(lighthouse-manifest.json)")
    p.set_defaults(run="lighthouse_megatron.convert.cli:run_inspect")
