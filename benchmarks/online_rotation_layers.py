"""Online rotations (a random orthogonal transform applied to a linear's input at run time, as
QuaRot does before down_proj; and QuIP#-style two-sided incoherence, its output turned too),
layer by layer: GPTQ's relative output error tr(dW H dWᵀ)/tr(W H Wᵀ) on real smollm2-135m
layers with and without the rotation, each solved alone against the Hessian of its float
inputs with the solver's default refinements (act-order, clip search, scale refit). A screen
before building them into lowbit's runtime, which judges by KL.

The output error is the same in either basis: with W' = U W Q and H' = Qᵀ H Q,
tr(dW' H' dW'ᵀ) = tr(dW H dWᵀ), so the figures compare directly. Q and U are
`lowbit.transforms.rotation.orthogonal` (randomized Hadamard, times a random orthogonal
factor for widths that are not powers of two: 576 = 9 x 64, 1536 = 3 x 512).

    LOWBIT_DATA_DIR=../shared/data .venv/bin/python benchmarks/online_rotation_layers.py \\
        --out benchmarks/results/online_rotation_layers.json
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import torch

from lowbit.keep import parse_format
from lowbit.solvers import gptq_quantize
from lowbit.transforms.rotation import orthogonal

sys.path.insert(0, str(Path(__file__).parent))
from layer_screen import layers, parser, write  # noqa: E402

SPECS = ("int2-g16-s8", "int3-g128", "nf3-g128", "nf3-g64-s8", "int4-g128", "nf4-g64-s8")
SIDES = ("plain", "input", "both")


def solve(w: torch.Tensor, h: torch.Tensor, spec: str, side: str, seed: int) -> float:
    """GPTQ's relative output error of `w` in `spec`, after rotating its input (and output)."""
    w, h = w.double(), h.double()
    if side != "plain":
        q = orthogonal(w.shape[1], seed)
        w, h = w @ q, q.T @ h @ q
    if side == "both":
        w = orthogonal(w.shape[0], seed + 1) @ w
    res = gptq_quantize(w.float(), h.float(), parse_format(spec), act_order=True, clip_search=True, scale_refit=True)
    return res.error


def main() -> None:
    ap = parser(__doc__, "online_rotation_layers.json")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rows = []
    for b, name, w, h in layers(args):
        row = {"block": b, "layer": name, "shape": list(w.shape)}
        for spec in SPECS:
            row[spec] = {side: solve(w, h, spec, side, args.seed) for side in SIDES}
        rows.append(row)
        print(json.dumps(row), flush=True)
    summary = {}
    for spec in SPECS:
        for side in SIDES[1:]:
            ratios = {r["layer"]: [] for r in rows}
            for r in rows:
                ratios[r["layer"]].append(r[spec][side] / r[spec]["plain"])
            every = [x for v in ratios.values() for x in v]
            summary[f"{spec} {side}"] = {
                "geomean": statistics.geometric_mean(every),
                "min": min(every),
                "max": max(every),
                "by_layer_geomean": {k: statistics.geometric_mean(v) for k, v in ratios.items()},
            }
    write(args, rows, error_vs_plain=summary)
    for k, v in summary.items():
        by_layer = ", ".join(f"{n.split('.')[-1]} {x:.3f}" for n, x in v["by_layer_geomean"].items())
        print(f"{k}: x{v['geomean']:.3f} ({v['min']:.3f} .. {v['max']:.3f}); {by_layer}")


if __name__ == "__main__":
    main()
