"""Plots: the per-layer plan as a heatmap (blocks x layer types, colour = bits per weight)."""

from __future__ import annotations

import os
import re
from typing import Any


def plan_heatmap(layers: dict[str, dict[str, Any]], path: str | os.PathLike, title: str = "") -> None:
    """Write a PNG of each layer's bpw, one row per decoder block, one column per layer type."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt
    import numpy as np

    cells: dict[tuple[int, str], float] = {}
    for name, rec in layers.items():
        m = re.search(r"\.(\d+)\.(.+)$", name)
        if m:
            cells[(int(m.group(1)), m.group(2))] = rec["bpw"]
    if not cells:
        return
    kinds = list(dict.fromkeys(k for _, k in cells))  # execution order as first seen
    blocks = sorted({b for b, _ in cells})
    grid = np.full((len(blocks), len(kinds)), np.nan)
    for (b, k), v in cells.items():
        grid[blocks.index(b), kinds.index(k)] = v
    fig, ax = plt.subplots(figsize=(1.1 * len(kinds) + 2.5, 0.28 * len(blocks) + 1.8))
    im = ax.imshow(grid, aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(kinds)), [k.split(".")[-1] for k in kinds], rotation=45, ha="right")
    ax.set_yticks(range(len(blocks)), [str(b) for b in blocks])
    ax.set_ylabel("decoder block")
    mid = (np.nanmin(grid) + np.nanmax(grid)) / 2
    for (r, c), v in np.ndenumerate(grid):
        if not np.isnan(v):  # dark text on the light (high-bit) end of viridis
            ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=6, color="white" if v < mid else "black")
    fig.colorbar(im, ax=ax, label="bits per weight")
    ax.set_title(title or "bits per weight per layer")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
