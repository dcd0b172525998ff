"""Helpers shared by the peer drivers; imports nothing beyond torch and safetensors, so it
works in every benchmark environment."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def parse_args(tool: str) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=f"quantize with {tool}, write dequantized weights")
    ap.add_argument("--model", required=True, help="Hugging Face model directory (float)")
    ap.add_argument("--windows", required=True, help="calibration windows (safetensors, key 'windows')")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--sym", action="store_true")
    ap.add_argument("--damp", type=float, default=0.01)
    ap.add_argument("--act-order", action="store_true")
    ap.add_argument("--nsamples", type=int, help="use only the first N windows")
    ap.add_argument("--iters", type=int, default=20, help="auto-round tuning steps")
    ap.add_argument("--out", required=True)
    return ap.parse_args()


def read_windows(args: argparse.Namespace) -> torch.Tensor:
    w = load_file(args.windows)["windows"]
    return w[: args.nsamples] if args.nsamples else w


def write_result(out: str, weights: dict[str, torch.Tensor], meta: dict) -> None:
    """`weights`: full linear name -> dequantized weight [out, in], float32."""
    path = Path(out)
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().float().contiguous() for k, v in weights.items()}, str(path / "dequantized.safetensors"))
    (path / "meta.json").write_text(json.dumps(meta, indent=2))
