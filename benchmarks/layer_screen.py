"""What the layer screens share (codebook_layers, twolevel_layers, outlier_layers,
online_rotation_layers): real smollm2-135m layers with the Hessians of their float inputs, each
to be solved alone, and one results file per screen. A screen judges a format or transform by
GPTQ's output error layer by layer before anything is built or run end to end (which judges by KL).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

import lowbit
from lowbit.data.windows import calibration_data
from lowbit.keep import parse_format
from lowbit.solvers import gptq_quantize

LAYERS = ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj")


def parser(doc: str, results_name: str) -> argparse.ArgumentParser:
    """The screens' common options; `--out` defaults to benchmarks/results/RESULTS_NAME."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--blocks", default="3,15")
    ap.add_argument("--windows", type=int, default=32, help="C4 calibration windows of 512 tokens")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / results_name)
    return ap


def hessians(model, windows: torch.Tensor, blocks: list[int], batch: int = 8) -> dict[tuple[int, str], torch.Tensor]:
    """H = 2XᵀX/n of each listed layer's float inputs over `windows`."""
    sums: dict[tuple[int, str], torch.Tensor] = {}
    hooks = []
    for b in blocks:
        for name in LAYERS:

            def hook(_m, inputs, _out, key=(b, name)):
                x = inputs[0].reshape(-1, inputs[0].shape[-1]).double()
                sums[key] = sums.get(key, 0) + 2 * x.T @ x

            hooks.append(model.model.layers[b].get_submodule(name).register_forward_hook(hook))
    with torch.no_grad():
        for i in range(0, len(windows), batch):
            model(windows[i : i + batch])
    for h in hooks:
        h.remove()
    return {k: (v / windows.numel()).float() for k, v in sums.items()}


def layers(args: argparse.Namespace) -> Iterator[tuple[int, str, torch.Tensor, torch.Tensor]]:
    """(block, layer name, float weight, Hessian) of every screened layer."""
    loaded = lowbit.load_model(args.model)
    calib = calibration_data(loaded.tokenizer, "c4", nsamples=args.windows, seqlen=512)
    for (b, name), h in hessians(loaded.model, calib, [int(b) for b in args.blocks.split(",")]).items():
        yield b, name, loaded.model.model.layers[b].get_submodule(name).weight.detach(), h


def screen_formats(args: argparse.Namespace, specs: list[str]) -> list[dict]:
    """One row per screened layer: each format's bpw and GPTQ output error (the solver's default
    refinements: act-order, clip search, scale or level refit)."""
    rows = []
    for b, name, w, h in layers(args):
        row = {"block": b, "layer": name, "shape": list(w.shape)}
        for spec in specs:
            fmt = parse_format(spec)
            res = gptq_quantize(w, h, fmt, act_order=True, clip_search=True, scale_refit=True)
            row[spec] = {"bpw": fmt.bits_per_weight(*w.shape), "error": res.error}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def write(args: argparse.Namespace, rows: list[dict], **summary) -> None:
    """The results file: date, exact command, machine, model, the rows and the screen's summary."""
    args.out.write_text(
        json.dumps(
            {
                "date": datetime.date.today().isoformat(),
                "command": " ".join([Path(sys.executable).name, *sys.argv]),
                "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
                "model": args.model,
                "rows": rows,
                **summary,
            },
            indent=1,
        )
    )
