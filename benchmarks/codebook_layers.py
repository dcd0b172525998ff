"""Per-row fitted codebooks (cb2-cb4) against the grids of about their size, layer by layer:
GPTQ's relative output error tr(dW H dWᵀ)/tr(W H Wᵀ) on real smollm2-135m layers, each solved
alone against the Hessian of its float inputs (the solver's default refinements: act-order,
clip search, scale or level refit). A screen before end-to-end runs, which judge by KL.

    LOWBIT_DATA_DIR=../shared/data .venv/bin/python benchmarks/codebook_layers.py \\
        --out benchmarks/results/codebook_layers.json
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from layer_screen import parser, screen_formats, write  # noqa: E402

PAIRS = (("cb2", "int2-g64"), ("cb3", "nf3-g128"), ("cb4", "nf4-g128"))


def main() -> None:
    args = parser(__doc__, "codebook_layers.json").parse_args()
    rows = screen_formats(args, [s for pair in PAIRS for s in pair])
    ratios = {f"{a}/{b}": [r[a]["error"] / r[b]["error"] for r in rows] for a, b in PAIRS}
    summary = {k: {"min": min(v), "max": max(v)} for k, v in ratios.items()}
    write(args, rows, error_ratios=summary)
    for k, v in summary.items():
        print(f"{k}: {v['min']:.3f} .. {v['max']:.3f}")


if __name__ == "__main__":
    main()
