"""Rank correlation of each error weighting's proxy with measured KLD, over the distinct plans
benchmarks/budget.py scored at each budget (uniform, knapsack under each weighting, BAQ).

The plans are rebuilt from the measurement file budget.py saved (planning is deterministic);
the refined plan is left out (its choice is not stored).

    .venv/bin/python benchmarks/budget_rankcorr.py [--measurements /tmp/lowbit-budget-measurements.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from scipy.stats import spearmanr

from lowbit.allocate import Measurements, plan_for_budget
from lowbit.recipe import default_candidates

RESULTS = Path(__file__).parent / "results" / "budget.json"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--measurements", type=Path, default=Path("/tmp/lowbit-budget-measurements.json"))
    args = ap.parse_args()
    meas = Measurements.load(args.measurements)
    results = json.loads(RESULTS.read_text())
    names = list(meas.layers)
    cand_names = [c.name for c in default_candidates()]
    for row in results["budgets"]:
        plans = {}
        for label in row["plans"]:
            if label.startswith("uniform"):
                plans[label] = dict.fromkeys(names, cand_names.index(label.split()[1]))
            elif label.startswith(("knapsack/", "baq/")):
                allocator, weighting = label.split("/")
                plans[label] = plan_for_budget(meas, row["budget"], allocator, weighting=weighting).choice
        kld = [row["plans"][label]["kld"] for label in plans]
        rho = {}
        for w in meas.weightings():
            proxy = [sum(meas.weighted_errors(n, w)[j] for n, j in c.items()) for c in plans.values()]
            rho[w] = round(float(spearmanr(proxy, kld).statistic), 2)
        row["rank_correlation_across_plans"] = rho
        print(f"{row['budget']} bpw, {len(plans)} plans: Spearman(proxy, KLD) {rho}")
    RESULTS.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
