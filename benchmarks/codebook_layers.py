"""Per-row fitted codebooks (cb2-cb4) against the grids of about their size, layer by layer:
GPTQ's relative output error tr(dW H dWᵀ)/tr(W H Wᵀ) on real smollm2-135m layers, each solved
alone against the Hessian of its float inputs (the solver's default refinements: act-order,
clip search, scale or level refit). A screen before end-to-end runs, which judge by KL.

    LOWBIT_DATA_DIR=../shared/data .venv/bin/python benchmarks/codebook_layers.py \\
        --out benchmarks/results/codebook_layers.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from pathlib import Path

import torch

import lowbit
from lowbit.data.windows import calibration_data
from lowbit.keep import parse_format
from lowbit.solvers import gptq_quantize

LAYERS = ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj")
PAIRS = (("cb2", "int2-g64"), ("cb3", "nf3-g128"), ("cb4", "nf4-g128"))


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


def screen_layers(model: str, windows: int, blocks: str, specs: list[str]) -> list[dict]:
    """One row per listed layer of the listed blocks: each format's bpw and GPTQ output error
    (the solver's default refinements), the layer solved alone on float inputs."""
    loaded = lowbit.load_model(model)
    calib = calibration_data(loaded.tokenizer, "c4", nsamples=windows, seqlen=512)
    rows = []
    for (b, name), h in hessians(loaded.model, calib, [int(b) for b in blocks.split(",")]).items():
        w = loaded.model.model.layers[b].get_submodule(name).weight.detach()
        row = {"block": b, "layer": name, "shape": list(w.shape)}
        for spec in specs:
            fmt = parse_format(spec)
            res = gptq_quantize(w, h, fmt, act_order=True, clip_search=True, scale_refit=True)
            row[spec] = {"bpw": fmt.bits_per_weight(*w.shape), "error": res.error}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--blocks", default="3,15")
    ap.add_argument("--windows", type=int, default=32, help="C4 calibration windows of 512 tokens")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "codebook_layers.json")
    args = ap.parse_args()
    rows = screen_layers(args.model, args.windows, args.blocks, [s for pair in PAIRS for s in pair])
    ratios = {f"{a}/{b}": [r[a]["error"] / r[b]["error"] for r in rows] for a, b in PAIRS}
    summary = {k: {"min": min(v), "max": max(v)} for k, v in ratios.items()}
    args.out.write_text(
        json.dumps(
            {
                "date": datetime.date.today().isoformat(),
                "command": " ".join([Path(sys.executable).name, *sys.argv]),
                "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
                "model": args.model,
                "rows": rows,
                "error_ratios": summary,
            },
            indent=1,
        )
    )
    for k, v in summary.items():
        print(f"{k}: {v['min']:.3f} .. {v['max']:.3f}")


if __name__ == "__main__":
    main()
