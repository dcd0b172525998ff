"""Sparse outliers (SpQR-style: the weights whose rounding costs most kept in float16, each with
a 16-bit column index) on top of a grid, against spending the same bits on the grid itself:
GPTQ's relative output error tr(dW H dWᵀ)/tr(W H Wᵀ) on real smollm2-135m layers, each solved
alone against the Hessian of its float inputs. A screen before building outliers into lowbit's
formats: an outlier costs 32 bits (plus 32 per row for the row offsets), so it pays only if it
lowers the error more than smaller groups or a mix of wider grids of the same bits would.

The solver here is lowbit's GPTQ (act-order, clip search; no scale refit, on either side) with
two passes: the first finds each weight's rounding cost ((w - q)² / [U]ᵢᵢ², U the upper Cholesky
factor of H⁻¹, as GPTQ propagates it), the top fraction become outliers, and the second pass
fits the group scales without them and keeps them exact. It lives in this script only.

    LOWBIT_DATA_DIR=../shared/data .venv/bin/python benchmarks/outlier_layers.py \\
        --out benchmarks/results/outlier_layers.json
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path

import torch

from lowbit.formats import Format
from lowbit.keep import parse_format
from lowbit.solvers import gptq_quantize
from lowbit.solvers.gptq import _blocks, fit_clipped, inverse_hessian_factor, relative_output_error

sys.path.insert(0, str(Path(__file__).parent))
from layer_screen import layers, parser, write  # noqa: E402

PLAIN = ("int2-g32-s8", "int2-g16-s8", "nf3-g128", "nf3-g64-s8", "nf3-g32-s8", "nf4-g64-s8", "int5-g64-s8")
OUTLIERS = (
    ("int2-g32-s8", 0.005),
    ("int2-g16-s8", 0.005),
    ("nf3-g128", 0.005),
    ("nf3-g64-s8", 0.004),
    ("nf3-g64-s8", 0.01),
    ("nf4-g64-s8", 0.005),
)
BITS_PER_OUTLIER = 32  # float16 value + 16-bit column index
BITS_PER_ROW = 32  # the row's offset into the outlier list


@torch.no_grad()
def gptq_with_outliers(weight: torch.Tensor, hessian: torch.Tensor, fmt: Format, frac: float) -> tuple[float, float]:
    """(relative output error, fraction kept) of GPTQ whose costliest `frac` of weights stay exact."""
    w0, h = weight.double(), hessian.double().clone()
    out, n = w0.shape
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    gl = fmt.group_len(n)
    perm = torch.argsort(torch.diag(h), descending=True, stable=True)
    upper, _ = inverse_hessian_factor(h[perm][:, perm], 0.01)
    d3, _ = fmt.to_groups(torch.diag(h).unsqueeze(0))
    keep = torch.zeros_like(w0, dtype=torch.bool)
    for final in (False, True):
        w3, mask = fmt.to_groups(w0)
        kept3, _ = fmt.to_groups(keep.double())
        fitted = fit_clipped(fmt, w3, mask & (kept3 == 0), d3)  # static groups, outliers left out
        params = [tuple(t[:, g] for t in fitted) for g in range(fmt.num_groups(n))]
        w, kept = w0[:, perm].clone(), keep[:, perm]
        deq, cost = torch.zeros_like(w), torch.zeros_like(w)
        for i1, i2 in _blocks(n, gl, 128, grouped=False):
            w1, err1, u1 = w[:, i1:i2].clone(), torch.zeros(out, i2 - i1, dtype=w.dtype), upper[i1:i2, i1:i2]
            for i in range(i2 - i1):
                p = params[int(perm[i1 + i]) // gl]
                col = w1[:, i : i + 1]
                dq = fmt.dequantize(fmt.quantize(col, *p), *p)
                cost[:, i1 + i : i1 + i + 1] = ((col - dq) / u1[i, i]) ** 2
                dq = torch.where(kept[:, i1 + i : i1 + i + 1], col, dq)
                deq[:, i1 + i : i1 + i + 1] = dq
                err1[:, i : i + 1] = (col - dq) / u1[i, i]
                w1[:, i:] -= err1[:, i : i + 1] @ u1[i : i + 1, i:]
            w[:, i2:] -= err1 @ upper[i1:i2, i2:]
        inv = torch.argsort(perm)
        deq, cost = deq[:, inv], cost[:, inv]
        if not final:
            k = max(1, int(frac * out * n))
            keep = cost >= torch.topk(cost.flatten(), k).values[-1]
    return relative_output_error(weight, deq.float(), hessian), keep.double().mean().item()


def on_the_line(bpw: float, plain: dict[str, dict]) -> float | None:
    """The error a mix of the two plain formats around `bpw` reaches there (log-linear between
    them, as mixing layers trades error for bits); None outside their range."""
    pts = sorted((v["bpw"], v["error"]) for v in plain.values())
    for (b0, e0), (b1, e1) in zip(pts, pts[1:], strict=False):
        if b0 <= bpw <= b1:
            t = (bpw - b0) / (b1 - b0)
            return math.exp((1 - t) * math.log(e0) + t * math.log(e1))
    return None


def main() -> None:
    args = parser(__doc__, "outlier_layers.json").parse_args()
    rows = []
    for b, name, w, h in layers(args):
        plain = {}
        for spec in PLAIN:
            fmt = parse_format(spec)
            res = gptq_quantize(w, h, fmt, act_order=True, clip_search=True)
            plain[spec] = {"bpw": fmt.bits_per_weight(*w.shape), "error": res.error}
        sparse = {}
        for spec, frac in OUTLIERS:
            fmt = parse_format(spec)
            error, kept = gptq_with_outliers(w, h, fmt, frac)
            bpw = fmt.bits_per_weight(*w.shape) + kept * BITS_PER_OUTLIER + BITS_PER_ROW / w.shape[1]
            line = on_the_line(bpw, plain)
            sparse[f"{spec}+{frac:g}"] = {
                "bpw": bpw,
                "kept": kept,
                "error": error,
                "error_without": plain[spec]["error"] if spec in plain else None,
                "plain_line_error": line,
            }
        row = {"block": b, "layer": name, "shape": list(w.shape), "plain": plain, "outliers": sparse}
        rows.append(row)
        print(json.dumps(row), flush=True)
    summary = {}
    for key in rows[0]["outliers"]:
        xs = [r["outliers"][key] for r in rows]
        lined = [x["error"] / x["plain_line_error"] for x in xs if x["plain_line_error"]]
        summary[key] = {
            "bpw_mean": statistics.fmean(x["bpw"] for x in xs),
            "error_vs_without_geomean": statistics.geometric_mean(x["error"] / x["error_without"] for x in xs),
            "error_vs_plain_line_geomean": statistics.geometric_mean(lined) if lined else None,
            "error_vs_plain_line_min_max": [min(lined), max(lined)] if lined else None,
        }
    write(args, rows, bits_per_outlier=BITS_PER_OUTLIER, bits_per_row=BITS_PER_ROW, summary=summary)
    for key, v in summary.items():
        line = v["error_vs_plain_line_geomean"]
        print(
            f"{key}: {v['bpw_mean']:.3f} bpw, error x{v['error_vs_without_geomean']:.3f} of the grid alone, "
            + ("" if line is None else f"x{line:.3f} of the plain formats' line at that bpw")
        )


if __name__ == "__main__":
    main()
