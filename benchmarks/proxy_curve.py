"""The planned proxy as a function of the budget: where the plan would jump (issue: no cliffs).

An end-to-end budget run takes ten minutes on smollm2-135m; planning from a measurement file
takes a second. This plans every budget from FROM to TO in STEP, plus each uniform candidate's
own size and a hair (0.0005 bpw) either side of it, with the upgrade allocator with and without
`--fade`, and records the plan's summed proxy (the measurement file's `--weighting`) and
its formats. Upward jumps of the proxy as the budget grows are listed: the places to check end
to end (budget_frontier.py). The plot draws both curves with the uniform formats' sizes marked.

    .venv/bin/python benchmarks/proxy_curve.py --measurements /tmp/frontier3/measurements.json \\
        --weighting kl --out benchmarks/results/proxy_curve.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import shlex
import sys
from collections import Counter
from pathlib import Path

from lowbit.allocate.planner import plan_for_budget
from lowbit.allocate.sensitivity import Measurements
from lowbit.formats import format_from_dict


def uniform_sizes(meas: Measurements) -> dict[str, float]:
    """Each candidate's bpw with it on every measured layer (None where some layer cannot hold it)."""
    total = sum(r["numel"] for r in meas.layers.values())
    sizes = {}
    for j, cand in enumerate(meas.candidates):
        costs = [r["costs"][j] for r in meas.layers.values()]
        if None not in costs:
            sizes[format_from_dict(cand).name] = sum(costs) / total
    return sizes


def budgets(lo: float, hi: float, step: float, sizes: list[float]) -> list[float]:
    n = round((hi - lo) / step)
    grid = {round(lo + k * step, 6) for k in range(n + 1)}
    for s in sizes:
        if lo <= s <= hi:
            grid |= {s - 0.0005, s, s + 0.0005}
    return sorted(grid)


def jumps(points: list[tuple[float, float]], rel: float) -> list[dict]:
    """Where the proxy rises by more than `rel` (relative) from one budget to the next larger."""
    return [
        {"from_bpw": b0, "to_bpw": b1, "from": e0, "to": e1, "rise": e1 / e0 - 1}
        for (b0, e0), (b1, e1) in zip(points, points[1:], strict=False)
        if e1 > e0 * (1 + rel)
    ]


def plot(record: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for setting, style in (("no_fade", "-"), ("fade", "-")):
        pts = [(r["bpw"], r[setting]["proxy"]) for r in record["rows"]]
        ax.plot(*zip(*pts, strict=True), style, lw=1, label=f"upgrade, {setting.replace('_', ' ')}")
    for name, size in record["uniform_sizes"].items():
        if record["rows"][0]["bpw"] <= size <= record["rows"][-1]["bpw"]:
            ax.axvline(size, color="gray", lw=0.5, alpha=0.5)
            ax.annotate(name, (size, 1.0), xycoords=("data", "axes fraction"), rotation=90, fontsize=6, va="top")
    ax.set_yscale("log")
    ax.set_xlabel("budget, bits per weight")
    ax.set_ylabel(f"planned summed proxy ({record['weighting']})")
    ax.set_title("smollm2-135m: the plan's proxy against the budget")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--measurements", type=Path, required=True)
    ap.add_argument("--weighting", default="kl")
    ap.add_argument("--from", dest="lo", type=float, default=2.5)
    ap.add_argument("--to", dest="hi", type=float, default=5.0)
    ap.add_argument("--step", type=float, default=0.01)
    ap.add_argument("--jump", type=float, default=0.01, help="list proxy rises above this fraction")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    meas = Measurements.load(args.measurements)
    names = [format_from_dict(c).name for c in meas.candidates]
    sizes = uniform_sizes(meas)
    rows = []
    for bpw in budgets(args.lo, args.hi, args.step, list(sizes.values())):
        row = {"bpw": bpw}
        for setting, fade in (("fade", True), ("no_fade", False)):
            plan = plan_for_budget(meas, bpw, "upgrade", weighting=args.weighting, trust=1.0, fade=fade)
            formats = Counter(names[j] for j in plan.choice.values())
            row[setting] = {"proxy": plan.predicted_error, "formats": dict(sorted(formats.items()))}
        rows.append(row)
    record = {
        "date": datetime.date.today().isoformat(),
        "command": shlex.join(sys.argv),
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}",
        "measurements": str(args.measurements),
        "weighting": args.weighting,
        "uniform_sizes": sizes,
        "jumps": {s: jumps([(r["bpw"], r[s]["proxy"]) for r in rows], args.jump) for s in ("fade", "no_fade")},
        "rows": rows,
    }
    args.out.write_text(json.dumps(record, indent=1))
    plot(record, args.out.with_suffix(".png"))
    for setting, found in record["jumps"].items():
        print(f"{setting}: {len(found)} rises above {args.jump:.0%}")
        for j in found:
            print(f"  {j['from_bpw']:.4f} -> {j['to_bpw']:.4f}: {j['from']:.4f} -> {j['to']:.4f} (+{j['rise']:.1%})")


if __name__ == "__main__":
    main()
