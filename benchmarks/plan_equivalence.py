"""Which finished budget runs a new allocator setting would reproduce layer for layer.

GPTQ is deterministic given the plan (same model, calibration windows and solver settings), so a
plan identical to one already quantized and evaluated has that run's KLD without running again.
For each run (an artifact directory beside its `lowbit quantize --json` output, as
budget_frontier.py leaves them in WORK), the plan is recomputed from the same measurement file
with the given allocator options and compared with the artifact's manifest layer by layer; the
results file lists the runs, whether the plans agree, where they do not, the runs' KLD, and the
summed proxy of the new plan and of the plain allocator's (`--trust 1 --no-fade`).

    .venv/bin/python benchmarks/plan_equivalence.py --measurements /tmp/frontier2/measurements.json \\
        --fade --runs /tmp/frontier2/b4.16928-kl-upgrade-t1.5 /tmp/frontier2/b4.25-kl-upgrade-t1.0 \\
        --out benchmarks/results/fade_plans.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import shlex
import sys
from pathlib import Path

from lowbit.allocate.planner import plan_for_budget
from lowbit.allocate.sensitivity import Measurements
from lowbit.formats import format_from_dict


def run_formats(run: Path) -> dict[str, str]:
    """A finished run's plan: each quantized layer's format name, from the artifact's manifest."""
    manifest = json.loads((run / "lowbit_manifest.json").read_text())
    return {n: format_from_dict(v["format"]).name for n, v in manifest["layers"].items()}


def compare(meas: Measurements, run: Path, fade: bool, trust: float) -> dict:
    result = json.loads((run.parent / f"{run.name}.json").read_text())
    budget = result["budget"]
    quantized = run_formats(run)
    bpw, allocator, weighting = budget["bpw"], budget["allocator"], budget["weighting"]
    plan = plan_for_budget(meas, bpw, allocator, weighting=weighting, trust=trust, fade=fade)
    plain = plan_for_budget(meas, bpw, allocator, weighting=weighting, trust=1.0, fade=False)
    names = [format_from_dict(c).name for c in meas.candidates]
    planned = {n: names[j] for n, j in plan.choice.items()}
    differ = sorted(n for n in planned if quantized.get(n) != planned[n])
    return {
        "run": run.name,
        "bpw": budget["bpw"],
        "run_trust": budget.get("trust", 1.0),
        "run_fade": budget.get("fade", False),
        "identical": not differ,
        "layers_differing": len(differ),
        "first_differences": [{"layer": n, "run": quantized.get(n), "new": planned[n]} for n in differ[:5]],
        "new_plan_formats": {f: list(planned.values()).count(f) for f in sorted(set(planned.values()))},
        "new_plan_predicted_error": plan.predicted_error,  # the summed proxy, the run's weighting
        "plain_plan_predicted_error": plain.predicted_error,  # --trust 1 --no-fade
        "run_kld": result["evaluation"]["kld"],
        "run_bits_per_weight": result["bits_per_weight"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--measurements", type=Path, required=True)
    ap.add_argument("--runs", type=Path, nargs="+", required=True, help="artifact directories (NAME and NAME.json)")
    ap.add_argument("--fade", action="store_true", help="the new setting: upgrade allocator with --fade")
    ap.add_argument("--trust", type=float, default=1.0, help="the new setting's --trust")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    meas = Measurements.load(args.measurements)
    rows = [compare(meas, run, args.fade, args.trust) for run in args.runs]
    record = {
        "date": datetime.date.today().isoformat(),
        "command": shlex.join(sys.argv),
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}",
        "setting": {"allocator": "upgrade", "fade": args.fade, "trust": args.trust},
        "rows": rows,
    }
    args.out.write_text(json.dumps(record, indent=1))
    print("| run | bpw | identical | KLD of the run |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['run']} | {r['bpw']} | {r['identical']} ({r['layers_differing']} differ) | {r['run_kld']:.4f} |")


if __name__ == "__main__":
    main()
