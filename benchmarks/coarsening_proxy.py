"""What a step to coarser groups (or fewer bits) costs on the proxy, per layer and summed, next to
what it costs end to end (issue: budgets against the uniform frontier; `--trust`).

From a measurement file (`lowbit quantize --measurements FILE`): for each pair of candidates, the
median and range over layers of the ratio of their measured errors, and the ratio of their sums
under the `kl` weighting. For pairs whose uniform runs are in a `budget_frontier.py` results file,
the ratio of their end-to-end KLD too.

    .venv/bin/python benchmarks/coarsening_proxy.py --measurements /tmp/frontier2/measurements.json \\
        --frontier benchmarks/results/budget_frontier_trust.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import statistics
import sys
from pathlib import Path

from lowbit.allocate.sensitivity import Measurements
from lowbit.formats import format_from_dict

PAIRS = [  # (coarser or cheaper, finer or dearer)
    ("int3-g256-asym", "int3-g128-asym"),
    ("int4-g256-asym", "int4-g128-asym"),
    ("int3-g128-asym", "int3-g64-asym"),
    ("int4-g128-asym", "int4-g64-asym"),
    ("int2-g32-asym", "int3-g128-asym"),
    ("int3-g32-asym", "int4-g128-asym"),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--measurements", type=Path, required=True)
    ap.add_argument("--frontier", type=Path, help="a budget_frontier.py results file with uniform runs")
    ap.add_argument("--results", type=Path, default=Path(__file__).parent / "results" / "coarsening_proxy.json")
    args = ap.parse_args()
    meas = Measurements.load(args.measurements)
    names = [format_from_dict(c).name for c in meas.candidates]
    uniform = {}
    if args.frontier:
        for r in json.loads(args.frontier.read_text())["runs"]:
            if r["kind"] == "uniform":  # u-int3g256 -> int3-g256-asym
                bits, group = r["run"].removeprefix("u-int").split("g")
                uniform[f"int{bits}-g{group}-asym"] = r["kld"]
    rows = []
    for cheap, dear in PAIRS:
        i, j = names.index(cheap), names.index(dear)
        per_layer = [meas.layers[n]["errors"][i] / meas.layers[n]["errors"][j] for n in meas.layers]
        summed = [sum(meas.weighted_errors(n, "kl")[k] for n in meas.layers) for k in (i, j)]
        row = {
            "cheaper": cheap,
            "dearer": dear,
            "layer_error_ratio_median": statistics.median(per_layer),
            "layer_error_ratio_min": min(per_layer),
            "layer_error_ratio_max": max(per_layer),
            "kl_proxy_sum_ratio": summed[0] / summed[1],
            "uniform_kld_ratio": uniform[cheap] / uniform[dear] if cheap in uniform and dear in uniform else None,
        }
        rows.append(row)
    record = {
        "date": datetime.date.today().isoformat(),
        "command": shlex.join(sys.argv),
        "model": "smollm2-135m (the measurement file's)",
        "rows": rows,
    }
    args.results.write_text(json.dumps(record, indent=1))
    print("| cheaper / dearer | per-layer error ratio: median (min-max) | summed `kl` proxy | uniform KLD |")
    print("|---|---|---|---|")
    for r in rows:
        end = "" if r["uniform_kld_ratio"] is None else f"{r['uniform_kld_ratio']:.3f}"
        spread = f"({r['layer_error_ratio_min']:.2f}-{r['layer_error_ratio_max']:.2f})"
        cells = [f"{r['cheaper']} / {r['dearer']}", f"{r['layer_error_ratio_median']:.3f} {spread}"]
        print("| " + " | ".join([*cells, f"{r['kl_proxy_sum_ratio']:.3f}", end]) + " |")


if __name__ == "__main__":
    main()
