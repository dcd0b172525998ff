"""Two-level scales (8-bit and 6-bit scale codes on a float16 step per row; integer and NormalFloat
grids) against float16 group scales, layer by layer: GPTQ's relative output error
tr(dW H dWᵀ)/tr(W H Wᵀ) on real smollm2-135m layers, each solved alone against the Hessian of its
float inputs with the solver's default refinements (act-order, clip search, scale refit). A
screen before end-to-end runs, which judge by KL.

    LOWBIT_DATA_DIR=../shared/data .venv/bin/python benchmarks/twolevel_layers.py \\
        --out benchmarks/results/twolevel_layers.json
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from layer_screen import parser, screen_formats, write  # noqa: E402

SPECS = (
    "int2-g64", "int2-g32", "int2-g32-s8", "int2-g16-s8",
    "int3-g128", "int3-g64", "int3-g64-s8", "int3-g32", "int3-g32-s8", "int3-g32-s6", "int3-g32-sym-s8",
    "int3-g16-s8",
    "int4-g128", "int4-g64", "int4-g64-s8", "int4-g32-s8",
    "nf3-g64", "nf3-g64-s8", "nf3-g32", "nf3-g32-s8", "nf4-g64", "nf4-g64-s8",
)  # fmt: skip
PAIRS = (
    ("int2-g32-s8", "int2-g32"),
    ("int3-g64-s8", "int3-g64"),
    ("int3-g32-s8", "int3-g32"),
    ("int3-g32-s6", "int3-g32"),
    ("int4-g64-s8", "int4-g64"),
    ("nf3-g64-s8", "nf3-g64"),
    ("nf3-g32-s8", "nf3-g32"),
    ("nf4-g64-s8", "nf4-g64"),
)


def main() -> None:
    args = parser(__doc__, "twolevel_layers.json").parse_args()
    rows = screen_formats(args, list(SPECS))
    ratios = {f"{a}/{b}": [r[a]["error"] / r[b]["error"] for r in rows] for a, b in PAIRS}
    summary = {k: {"min": min(v), "max": max(v), "geomean": statistics.geometric_mean(v)} for k, v in ratios.items()}
    vs_g128 = {s: statistics.geometric_mean([r[s]["error"] / r["int3-g128"]["error"] for r in rows]) for s in SPECS}
    write(args, rows, error_ratios=summary, error_vs_int3_g128_geomean=vs_g128)
    for k, v in summary.items():
        print(f"{k}: {v['min']:.4f} .. {v['max']:.4f} (geomean {v['geomean']:.4f})")
    for s, v in vs_g128.items():
        print(f"{s}: {v:.3f} x int3-g128")


if __name__ == "__main__":
    main()
