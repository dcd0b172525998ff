"""Budget plans against the uniform frontier: `lowbit quantize --bits B` at budgets between and
at the uniform formats' own sizes, against the uniform GPTQ pipeline, smollm2-135m, quick
protocol (issue: budgets must beat the uniform frontier at every size).

Every run is the CLI in its own process (budget_e2e.run: `lowbit quantize ... --eval --quick
--json`, the budget runs sharing one measurement file in WORK). A run is named by a spec:

    u:BITS:GROUP            the uniform integer format, GPTQ
    u:FORMAT                the uniform format by name (`--format nf4-g128`), GPTQ
    b:BPW[:WEIGHTING[:ALLOCATOR[:TRUST[:fade]]]]   a bit budget (default weighting relative,
                            allocator upgrade, the allocator's default --trust; fade: --fade)
    b:...+awq, b:...+ft, b:...+ftDAMP   the budget with `--awq`, `--float-target`, or float
                            targets with `--float-target-damp DAMP` (suffixes combine: +awq+ft0.1)

A finished run's JSON in WORK is reused. The results file is extended (a row per run name, the
latest replacing an earlier one, each with its date; every command kept) and rewritten after every
run; `--fresh` starts a new one. It gets one row per run, each budget row
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
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from budget_e2e import row, run  # noqa: E402

from lowbit.formats import format_from_dict  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "budget_frontier.json"


def suffix_args(suffix: str) -> list[str]:
    """A run spec's `+awq`, `+ft` or `+ftDAMP`: activation-aware scaling or float targets."""
    if suffix == "awq":
        return ["--awq"]
    if suffix == "ft":
        return ["--float-target"]
    if suffix.startswith("ft"):
        try:
            float(suffix[2:])
        except ValueError:
            pass
        else:
            return ["--float-target", "--float-target-damp", suffix[2:]]
    raise SystemExit(f"bad run spec suffix +{suffix}: +awq (--awq), +ft (--float-target) or +ftDAMP")


def spec_args(spec: str) -> tuple[str, list[str]]:
    """A run's file name and its CLI arguments."""
    spec, *suffixes = spec.split("+")
    if suffixes and not spec.startswith("b:"):
        raise SystemExit(f"bad run spec {spec!r}: only budget runs (b:...) take +awq or +ft here")
    name, args = _base_spec_args(spec)
    for suffix in suffixes:
        name, args = f"{name}-{suffix}", [*args, *suffix_args(suffix)]
    return name, args


def _base_spec_args(spec: str) -> tuple[str, list[str]]:
    kind, *rest = spec.split(":")
    if kind == "u" and len(rest) == 2:
        return f"u-int{rest[0]}g{rest[1]}", ["--bits", rest[0], "--group-size", rest[1]]
    if kind == "u" and len(rest) == 1:
        return f"u-{rest[0]}", ["--format", rest[0]]
    if kind == "b" and 1 <= len(rest) <= 5:
        weighting = rest[1] if len(rest) > 1 else "relative"
        allocator = rest[2] if len(rest) > 2 else "upgrade"
        name = f"b{rest[0]}-{weighting}-{allocator}"
        args = ["--bits", rest[0], "--weighting", weighting, "--allocator", allocator]
        if len(rest) > 3 and rest[3]:
            name += f"-t{rest[3]}"
            args += ["--trust", rest[3]]
        if len(rest) > 4:
            if rest[4] != "fade":
                raise SystemExit(f"bad run spec {spec!r}: the fifth field can only be fade")
            name += "-fade"
            args += ["--fade"]
        return name, args
    raise SystemExit(f"bad run spec {spec!r}: see the module docstring (u:BITS:GROUP, u:FORMAT, b:BPW...)")


def lower_hull(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The uniform frontier: the lower convex hull of (bpw, KLD). A uniform format above the line
    between two others (int4 g256 between int3 g64 and int4 g128 on smollm2) is not on it: mixing
    those two layer by layer would be expected to do at least as well at its size."""
    hull: list[tuple[float, float]] = []
    lowest: dict[float, float] = {}
    for x, y in points:  # of two formats of the same size only the better can be on it
        lowest[x] = min(y, lowest.get(x, y))
    for p in sorted(lowest.items()):
        while len(hull) >= 2:
            (x0, y0), (x1, y1) = hull[-2], hull[-1]
            if (x1 - x0) * (p[1] - y0) - (y1 - y0) * (p[0] - x0) <= 0:  # hull[-1] on or above the chord
                hull.pop()
            else:
                break
        hull.append(p)
    return hull


def frontier(uniform: list[dict], bpw: float) -> tuple[float | None, dict | None]:
    """The uniform frontier's KLD interpolated at `bpw`, and the best uniform run at or below it."""
    pts = lower_hull([(u["bpw"], u["kld"]) for u in uniform])
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
    ax.plot([r["bpw"] for r in uni], [r["kld"] for r in uni], "o", color="gray", label="uniform (GPTQ)")
    hull = lower_hull([(r["bpw"], r["kld"]) for r in uni])
    line = [  # the frontier as the numbers use it: straight in KLD, so curved on the log axis
        (x0 + (x1 - x0) * t / 20, y0 + (y1 - y0) * t / 20)
        for (x0, y0), (x1, y1) in zip(hull, hull[1:], strict=False)
        for t in range(21)
    ]
    if line:
        ax.plot(*zip(*line, strict=True), "-", color="gray", lw=1, label="uniform frontier (lower convex hull)")
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


def _frontier_columns(rows: list[dict]) -> None:
    uniform = [x for x in rows if x["kind"] == "uniform"]
    for x in rows:
        if x["kind"] == "budget":
            if "trust" in x:  # rows written before --trust existed have none (their allocator's was 1)
                x["label"] = f"{x['label'].split(',')[0]}, trust {x['trust']:g}" + (", fade" if x.get("fade") else "")
            line, best = frontier(uniform, x["bpw"])
            x["frontier_kld"] = line
            x["best_uniform_below"] = None if best is None else {"run": best["run"], "kld": best["kld"]}


def write(path: Path, rows: list[dict], commands: list[str]) -> None:
    """The results file and its plot, rewritten after every run so a cut-off sweep keeps what it did."""
    _frontier_columns(rows)
    record = {
        "commands": commands,
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}",
        "model": "smollm2-135m",
        "protocol": "quick",
        "runs": sorted(rows, key=lambda x: (x["kind"] != "uniform", x["bpw"])),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1))
    plot(rows, path.with_suffix(".png"))


def earlier(path: Path) -> tuple[list[dict], list[str]]:
    """Rows and commands already in a results file: a sweep extends it run by run. Rows written
    before rows carried a date get the file's."""
    if not path.is_file():
        return [], []
    old = json.loads(path.read_text())
    commands = old.get("commands") or [f"{old.get('date')}: {old.get('command', path.name)}"]
    if "runs" not in old:  # level_grids.py's file: one uniform GPTQ run per format, same protocol
        keep = ("bpw", "kld", "ppl", "top1")
        old["runs"] = [{"run": f"u-{r['format']}", "kind": "uniform", **{k: r[k] for k in keep}} for r in old["rows"]]
    for x in old["runs"]:
        x.setdefault("date", old.get("date"))
    return old["runs"], commands


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True, help="artifacts, logs and the measurement file")
    ap.add_argument("--runs", nargs="+", required=True, help="run specs (see above), run in this order")
    ap.add_argument("--lowbit", default=str(Path(sys.executable).with_name("lowbit")), help="the lowbit command")
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--fresh", action="store_true", help="start a new results file instead of extending it")
    ap.add_argument(
        "--uniform-from",
        type=Path,
        action="append",
        default=[],
        help="start from the uniform rows of another results file (budget_frontier, budget_e2e or level_grids); "
        "may be repeated",
    )
    ap.add_argument("--candidates", help="budget runs: `lowbit quantize --candidates` (default: lowbit's own)")
    ap.add_argument("--tag", default="", help="budget runs: appended to run names and plot labels (a candidate set)")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    rows, commands = ([], []) if args.fresh else earlier(args.results)
    for x in rows:  # the allocator settings as the run itself recorded them (rows of older scripts lack fade)
        out = args.work / f"{x['run']}.json"
        if x.get("kind") == "budget" and out.is_file() and out.stat().st_size:
            budget = json.loads(out.read_text()).get("budget") or {}
            x["trust"], x["fade"] = budget.get("trust", 1.0), budget.get("fade", False)
    for source in args.uniform_from:
        more, their = earlier(source)
        taken = {x["run"] for x in rows}
        for x in more:  # budget_e2e.py's files name their uniform runs u-... and have no kind
            if x.get("kind", "uniform" if x["run"].startswith("u-") else None) == "uniform" and x["run"] not in taken:
                rows.append({**x, "kind": "uniform"})
        commands += [f"(uniform rows of {source.name}) {c}" for c in their]
    today = datetime.date.today().isoformat()
    commands.append(f"{today}: {shlex.join(sys.argv)}")
    for spec in args.runs:
        name, cli = spec_args(spec)
        if spec.startswith("b:"):
            name += f"-{args.tag}" if args.tag else ""
            cli += ["--candidates", args.candidates] if args.candidates else []
        r = run(args.work, name, cli, args.lowbit)
        if r is None:
            continue
        x = row(name, r)
        budget = r.get("budget") or {}
        x["kind"] = "uniform" if spec.startswith("u:") else "budget"
        x["date"] = today
        if x["kind"] == "budget":
            x["label"] = f"{budget.get('weighting')}/{budget.get('allocator')}" + (f" {args.tag}" if args.tag else "")
            x["formats"] = budget.get("formats")
            x["trust"] = budget.get("trust", 1.0)  # runs before --trust existed: 1
            x["fade"] = budget.get("fade", False)
            x["candidates"] = [format_from_dict(c).name for c in budget.get("candidates") or []]
        if not args.fresh:  # rows another sweep wrote meanwhile stay
            on_disk, their = earlier(args.results)
            rows += [y for y in on_disk if y["run"] not in {z["run"] for z in rows}]
            commands[:] = list(dict.fromkeys(their + commands))
        rows = [y for y in rows if y["run"] != name] + [x]
        write(args.results, rows, commands)
    print("| run | date | bpw | KLD | frontier KLD | vs frontier | best uniform below | top-1 | plan s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for x in json.loads(args.results.read_text())["runs"] if args.results.is_file() else []:
        line = x.get("frontier_kld")
        vs = "" if not line else f"{(x['kld'] / line - 1) * 100:+.0f} %"
        best = x.get("best_uniform_below")
        cells = [x["run"], x["date"], f"{x['bpw']:.4f}", f"{x['kld']:.4f}", "" if line is None else f"{line:.4f}", vs]
        cells += ["" if not best else f"{best['run']} {best['kld']:.4f}", f"{x['top1']:.4f}"]
        cells += ["" if x.get("planning_s") is None else f"{x['planning_s']:.1f}"]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
