"""How well each error weighting's summed proxy predicts measured KLD, across the plans that
budget_frontier.py made (uniform formats and budget plans alike).

For every artifact in WORK with a finished run JSON, the per-layer formats are read from its
manifest, matched to the candidates in WORK/measurements.json, and summed under each weighting
(`relative`, `stream`, `raw`, and `kl` when the file holds the KL probe); the Spearman rank
correlation of each sum with the runs' KLD is written into the frontier results file under
`proxy_rank_correlation`, with the probe's `kl_scale`.

    .venv/bin/python benchmarks/proxy_rankcorr.py --work /tmp/frontier --results benchmarks/results/budget_frontier.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from scipy.stats import spearmanr

from lowbit.allocate.sensitivity import Measurements
from lowbit.artifact import read_manifest


def summed(meas: Measurements, layers: dict, weighting: str) -> float:
    """A plan's summed weighted error, every measured linear at its format in the artifact."""
    index = {json.dumps(c, sort_keys=True): j for j, c in enumerate(meas.candidates)}
    total = 0.0
    for name in meas.layers:
        j = index[json.dumps(layers[name]["format"], sort_keys=True)]
        total += meas.weighted_errors(name, weighting)[j]
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--results", type=Path, required=True, help="budget_frontier.py's results file, amended")
    args = ap.parse_args()
    meas = Measurements.load(args.work / "measurements.json")
    record = json.loads(args.results.read_text())
    weightings = meas.weightings()
    plans = []
    for run in record["runs"]:
        layers = read_manifest(args.work / run["run"])["layers"]
        plans.append({"run": run["run"], "kld": run["kld"], **{w: summed(meas, layers, w) for w in weightings}})
    klds = [p["kld"] for p in plans]
    corr = {w: float(spearmanr([p[w] for p in plans], klds).statistic) for w in weightings}
    record["proxy_rank_correlation"] = {"plans": plans, "spearman": corr, "command": "benchmarks/proxy_rankcorr.py"}
    record["kl_scale"] = meas.kl_scale  # the probe's KL per unit of relative error, by role and candidate
    args.results.write_text(json.dumps(record, indent=1))
    print("| run | KLD | " + " | ".join(weightings) + " |")
    print("|---|---|" + "---|" * len(weightings))
    for p in plans:
        print(f"| {p['run']} | {p['kld']:.4f} | " + " | ".join(f"{p[w]:.4g}" for w in weightings) + " |")
    print("Spearman with KLD: " + ", ".join(f"{w} {c:.2f}" for w, c in corr.items()))


if __name__ == "__main__":
    main()
