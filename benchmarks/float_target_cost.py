"""What `--float-target` costs: the same `lowbit quantize` with and without it, side by side in one
run, each in its own process as a user runs it (smollm2-135m, int3 g128 GPTQ by default, the
protocol's 128 x 512 calibration windows, no evaluation: its KLD is in results/float_target.json).

Recorded per run: wall time, the CLI's own quantize time and its split (block forwards,
Hessians, solves, checkpoints), and peak resident memory. With `--repeat N` the pair runs N
times, alternating, so a drift of the machine shows. Run it alone: a timing taken beside other
work is not a result.

    .venv/bin/python benchmarks/float_target_cost.py --work /tmp/ftcost [--damp 0.1] [--repeat 1]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from foundation import timed  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "float_target_cost.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True, help="artifacts and logs")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--bits", default="3")
    ap.add_argument("--group-size", default="128")
    ap.add_argument("--damp", default="0.1", help="--float-target-damp of the float-target run")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--lowbit", default=str(Path(sys.executable).with_name("lowbit")))
    ap.add_argument("--results", type=Path, default=RESULTS)
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    base = [args.lowbit, "quantize", args.model, "--bits", args.bits, "--group-size", args.group_size]
    variants = {"plain": [], "float-target": ["--float-target", "--float-target-damp", args.damp]}
    results: dict = {
        "script": "benchmarks/float_target_cost.py",
        "argv": shlex.join(sys.argv),
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {platform.processor() or '?'}, {os.cpu_count()} CPUs",
        "commands": [],
        "rows": [],
    }
    for rep in range(args.repeat):
        for name, extra in variants.items():
            out = args.work / name
            cmd = [*base, *extra, "--out", str(out), "--overwrite", "--json"]
            results["commands"].append(shlex.join(cmd))
            print(f"=== {shlex.join(cmd)}", flush=True)
            stdout, wall, _ = timed(cmd)
            r = json.loads(stdout) | {"wall_s": wall}
            results["rows"].append(
                {
                    "run": name,
                    "repeat": rep,
                    "bpw": r["bits_per_weight"],
                    "wall_s": r["wall_s"],
                    "quantize_s": r["quantize_seconds"],
                    "peak_rss_mb": r["peak_rss_mb"],
                    "pipeline": r["pipeline"],
                }
            )
            args.results.write_text(json.dumps(results, indent=1) + "\n")
    by = {name: [x for x in results["rows"] if x["run"] == name] for name in variants}
    ratio = sum(x["quantize_s"] for x in by["float-target"]) / sum(x["quantize_s"] for x in by["plain"])
    results["quantize_time_ratio"] = ratio
    args.results.write_text(json.dumps(results, indent=1) + "\n")
    print("\n| run | quantize s | forwards s | Hessians s | solves s | peak RSS MB |\n|---|---|---|---|---|---|")
    for x in results["rows"]:
        p = x["pipeline"]
        cells = [f"{x['quantize_s']:.0f}", f"{p['forward']:.0f}", f"{p['hessian']:.0f}", f"{p['solve']:.0f}"]
        print(f"| {x['run']} | " + " | ".join(cells) + f" | {x['peak_rss_mb']:.0f} |")
    print(f"float-target / plain quantize time: {ratio:.2f}x")


if __name__ == "__main__":
    main()
