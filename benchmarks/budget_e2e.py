"""Bit and size budgets end to end: `lowbit quantize` (measure, plan, sequential GPTQ pipeline,
evaluate) against the uniform GPTQ pipeline, on smollm2-135m with the quick protocol.

`benchmarks/budget.py` compares allocations by swapping per-layer solutions into the float
model; this script runs what a user runs. The first budget run makes the measurement file
and the later ones reuse it, so their planning takes seconds. Every run is the CLI in its own
process under /usr/bin/time -v; its `--json` output lands in WORK/NAME.json and a run whose
JSON is already there is not repeated, so an interrupted benchmark continues where it stopped.

    LOWBIT_DATA_DIR=../shared/data .venv/bin/python benchmarks/budget_e2e.py --work /tmp/e2e
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

RUNS: dict[str, list[str]] = {
    "b2.5": ["--bits", "2.5"],
    "b3.0": ["--bits", "3.0"],
    "b3.5": ["--bits", "3.5"],
    "b4.25": ["--bits", "4.25"],
    "size70": ["--size", "70MB"],
    "u-int2g64": ["--bits", "2", "--group-size", "64"],
    "u-int2g32": ["--bits", "2", "--group-size", "32"],
    "u-int3g128": ["--bits", "3", "--group-size", "128"],
    "u-int3g64": ["--bits", "3", "--group-size", "64"],
    "u-int4g128": ["--bits", "4", "--group-size", "128"],
}


def run(work: Path, name: str, args: list[str], lowbit: str) -> dict | None:
    result = work / f"{name}.json"
    if not (result.is_file() and result.stat().st_size):
        extra = [] if name.startswith("u-") else ["--measurements", str(work / "measurements.json")]
        cmd = ["/usr/bin/time", "-v", lowbit, "quantize", "smollm2-135m", *args, *extra]
        cmd += ["--out", str(work / name), "--overwrite", "--eval", "--quick", "--json"]
        print(f"=== {name}: {' '.join(args)}", flush=True)
        with result.open("w") as out, (work / f"{name}.err").open("w") as err:
            rc = subprocess.run(cmd, stdout=out, stderr=err, check=False).returncode
        if rc:
            result.unlink()
            print(f"{name} failed (exit {rc}); see {work / name}.err", file=sys.stderr)
            return None
    return json.loads(result.read_text())


def row(name: str, r: dict) -> dict:
    ev, b = r["evaluation"], r.get("budget") or {}
    return {
        "run": name,
        "budget": b.get("size_bytes") or b.get("bpw"),
        "allocator": b.get("allocator"),
        "bpw": r["bits_per_weight"],
        "artifact_bytes": r["artifact_bytes"],
        "ppl": ev["perplexity"],
        "kld": ev["kld"],
        "top1": ev["top1_agreement"],
        "quantize_s": r["quantize_seconds"],
        "measure_s": None if b.get("measurements_reused", True) else b.get("measurement_seconds"),
        "planning_s": b.get("planning_seconds"),
        "peak_rss_mb": r["peak_rss_mb"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True, help="artifacts, logs and the measurement file")
    ap.add_argument("--only", nargs="*", choices=list(RUNS), help="these runs only (default: all)")
    ap.add_argument("--lowbit", default=str(Path(sys.executable).with_name("lowbit")), help="the lowbit command")
    ap.add_argument("--results", type=Path, default=Path(__file__).parent / "results" / "budget_e2e.json")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.only or RUNS:
        r = run(args.work, name, RUNS[name], args.lowbit)
        if r is not None:
            rows.append(row(name, r))
    args.results.write_text(json.dumps({"model": "smollm2-135m", "protocol": "quick", "runs": rows}, indent=1))
    head = "run | budget | bpw | MB | ppl | KLD | top-1 | measure s | plan s | quantize s | peak RSS MB"
    print(f"\n| {head} |\n|{'---|' * 11}")

    def num(v: float | None, fmt: str) -> str:
        return "" if v is None else format(v, fmt)

    for x in rows:
        cells = [x["run"], x["budget"] or "", f"{x['bpw']:.4f}", f"{x['artifact_bytes'] / 1e6:.2f}", f"{x['ppl']:.2f}"]
        cells += [f"{x['kld']:.4f}", f"{x['top1']:.4f}", num(x["measure_s"], ".0f"), num(x["planning_s"], ".1f")]
        cells += [f"{x['quantize_s']:.0f}", f"{x['peak_rss_mb']:.0f}"]
        print("| " + " | ".join(str(c) for c in cells) + " |")


if __name__ == "__main__":
    main()
