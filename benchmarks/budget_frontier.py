"""Budget plans against the uniform frontier: `lowbit quantize --bits B` at budgets between and
at the uniform formats' own sizes, against the uniform GPTQ pipeline, smollm2-135m, quick
protocol (issue: budgets must beat the uniform frontier at every size).

Every run is the CLI in its own process (budget_e2e.run: `lowbit quantize ... --eval --quick
--json`, the budget runs sharing one measurement file in WORK). A run is named by a spec:

    u:BITS:GROUP            the uniform format, GPTQ
    b:BPW[:WEIGHTING[:ALLOCATOR]]   a bit budget (default weighting relative, allocator upgrade)

A finished run's JSON in WORK is reused. The results file gets one row per run, each budget row
with the uniform frontier interpolated at its bpw (the straight line between the two uniform
runs around it) and the best uniform run at or below it; the plot (KLD against bpw, uniform
points joined, one line per weighting/allocator) is written next to it.

    LOWBIT_DATA_DIR=../shared/data .venv/bin/python benchmarks/budget_frontier.py --work /tmp/frontier \\
        --runs u:3:128 u:4:128 b:3.1608 b:3.1608:kl
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from budget_e2e import row, run  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "budget_frontier.json"


def spec_args(spec: str) -> tuple[str, list[str]]:
    """A run's file name and its CLI arguments."""
    kind, *rest = spec.split(":")
    if kind == "u" and len(rest) == 2:
        return f"u-int{rest[0]}g{rest[1]}", ["--bits", rest[0], "--group-size", rest[1]]
    if kind == "b" and 1 <= len(rest) <= 3:
        weighting = rest[1] if len(rest) > 1 else "relative"
        allocator = rest[2] if len(rest) > 2 else "upgrade"
        name = f"b{rest[0]}-{weighting}-{allocator}"
        return name, ["--bits", rest[0], "--weighting", weighting, "--allocator", allocator]
    raise SystemExit(f"bad run spec {spec!r}: use u:BITS:GROUP or b:BPW[:WEIGHTING[:ALLOCATOR]]")


def frontier(uniform: list[dict], bpw: float) -> tuple[float | None, dict | None]:
    """The uniform frontier's KLD interpolated at `bpw`, and the best uniform run at or below it."""
    pts = sorted((u["bpw"], u["kld"]) for u in uniform)
    line = None
    for (b0, k0), (b1, k1) in zip(pts, pts[1:], strict=False):
        if b0 <= bpw <= b1:
            line = k0 + (k1 - k0) * (bpw - b0) / (b1 - b0) if b1 > b0 else min(k0, k1)
    below = [u for u in uniform if u["bpw"] <= bpw + 1e-9]
    return line, min(below, key=lambda u: u["kld"]) if below else None


def plot(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    uni = sorted((r for r in rows if r["kind"] == "uniform"), key=lambda r: r["bpw"])
    ax.plot([r["bpw"] for r in uni], [r["kld"] for r in uni], "o-", color="gray", label="uniform (GPTQ)")
    for r in uni:
        name = r["run"].removeprefix("u-")
        ax.annotate(name, (r["bpw"], r["kld"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    labels = sorted({r["label"] for r in rows if r["kind"] == "budget"})
    for label in labels:
        pts = sorted((r["bpw"], r["kld"]) for r in rows if r.get("label") == label)
        ax.plot(*zip(*pts, strict=True), "s-", label=f"lowbit --bits ({label})")
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight (every scale and zero counted)")
    ax.set_ylabel("KLD vs float (quick protocol)")
    ax.set_title("smollm2-135m: budget plans against the uniform frontier")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True, help="artifacts, logs and the measurement file")
    ap.add_argument("--runs", nargs="+", required=True, help="run specs (see above), run in this order")
    ap.add_argument("--lowbit", default=str(Path(sys.executable).with_name("lowbit")), help="the lowbit command")
    ap.add_argument("--results", type=Path, default=RESULTS)
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    rows = []
    for spec in args.runs:
        name, cli = spec_args(spec)
        r = run(args.work, name, cli, args.lowbit)
        if r is None:
            continue
        x = row(name, r)
        budget = r.get("budget") or {}
        x["kind"] = "uniform" if spec.startswith("u:") else "budget"
        if x["kind"] == "budget":
            x["label"] = f"{budget.get('weighting')}/{budget.get('allocator')}"
            x["formats"] = budget.get("formats")
        rows.append(x)
    uniform = [x for x in rows if x["kind"] == "uniform"]
    for x in rows:
        if x["kind"] == "budget":
            line, best = frontier(uniform, x["bpw"])
            x["frontier_kld"] = line
            x["best_uniform_below"] = None if best is None else {"run": best["run"], "kld": best["kld"]}
    record = {
        "date": datetime.date.today().isoformat(),
        "command": " ".join(sys.argv),
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}",
        "model": "smollm2-135m",
        "protocol": "quick",
        "runs": rows,
    }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(record, indent=1))
    plot(rows, args.results.with_suffix(".png"))
    print("| run | bpw | KLD | frontier KLD | vs frontier | best uniform below | top-1 | plan s |")
    print("|---|---|---|---|---|---|---|---|")
    for x in rows:
        line = x.get("frontier_kld")
        vs = "" if not line else f"{(x['kld'] / line - 1) * 100:+.0f} %"
        best = x.get("best_uniform_below")
        cells = [x["run"], f"{x['bpw']:.4f}", f"{x['kld']:.4f}", "" if line is None else f"{line:.4f}", vs]
        cells += ["" if not best else f"{best['run']} {best['kld']:.4f}", f"{x['top1']:.4f}"]
        cells += ["" if x.get("planning_s") is None else f"{x['planning_s']:.1f}"]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
