"""Issue 15's one table: each transform (none, activation-aware scaling, the residual rotation
R1, R1 with the per-head R2, online rotations, float targets) against uniform 3- and 4-bit and the budgets 3.0,
3.5 and 4.25 bpw, on smollm2-135m, quick protocol. It runs nothing: every cell is a row of a
results file that another script wrote (named in the cell's source), so the table can be
rebuilt whenever one of them is rerun.

    .venv/bin/python benchmarks/transforms_table.py --out benchmarks/results/transforms_table.json
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
COLUMNS = ("int3 g128", "int4 g128", "--bits 3.0", "--bits 3.5", "--bits 4.25")

# (transform, candidates, {column: (results file, run name, model)}); model is the rows' `model`
# field where a file holds plain and rotated runs of one name, else None.
CELLS = (
    (
        "none",
        "lowbit 0.1's 22",
        {
            "int3 g128": ("budget_frontier_probe1024.json", "u-int3g128", None),
            "int4 g128": ("budget_frontier_probe1024.json", "u-int4g128", None),
            "--bits 3.0": ("budget_frontier_probe1024.json", "b3.0-kl-upgrade-probe1024", None),
            "--bits 3.5": ("budget_frontier_probe1024.json", "b3.5-kl-upgrade-probe1024", None),
            "--bits 4.25": ("budget_frontier_probe1024.json", "b4.25-kl-upgrade-probe1024", None),
        },
    ),
    (
        "none",
        "today's 19 (two-level scales)",
        {
            "--bits 3.0": ("twolevel_budget.json", "b3.0-kl-upgrade-s8", None),
            "--bits 3.5": ("twolevel_budget.json", "b3.5-kl-upgrade-s8", None),
            "--bits 4.25": ("twolevel_budget.json", "b4.25-kl-upgrade-s8", None),
        },
    ),
    (
        "float targets (`--float-target --float-target-damp 0.1`)",
        "lowbit 0.1's 22",
        {
            "int3 g128": ("float_target.json", "u-int3g128-ft0.1", None),
            "--bits 3.0": ("float_target.json", "b3.0-ft0.1", None),
            "--bits 3.5": ("float_target.json", "b3.5-ft0.1", None),
            "--bits 4.25": ("float_target.json", "b4.25-ft0.1", None),
        },
    ),
    (
        "float targets (`--float-target --float-target-damp 0.1`)",
        "today's 19 (two-level scales)",
        {"--bits 3.0": ("twolevel_budget.json", "b3.0-kl-upgrade-ft0.1-s8", None)},
    ),
    (
        "activation-aware scaling (`--awq`)",
        "lowbit 0.1's 22",
        {
            "int3 g128": ("awq.json", "u-int3g128-awq", "plain"),
            "int4 g128": ("awq.json", "u-int4g128-awq", "plain"),
            "--bits 3.0": ("awq.json", "b3.0-awq", "plain"),
            "--bits 3.5": ("awq.json", "b3.5-awq", "plain"),
            "--bits 4.25": ("awq.json", "b4.25-awq", "plain"),
        },
    ),
    (
        "R1 (`--rotate`, residual stream)",
        "lowbit 0.1's 22",
        {
            "int3 g128": ("rotation.json", "u-int3g128", "rotated"),
            "int4 g128": ("rotation.json", "u-int4g128", "rotated"),
            "--bits 3.0": ("rotation.json", "b3.0", "rotated"),
            "--bits 3.5": ("rotation.json", "b3.5", "rotated"),
            "--bits 4.25": ("rotation.json", "b4.25", "rotated"),
        },
    ),
    (
        "online rotation (`-rot` formats)",
        "today's 19 + 7 `-rot`",
        {
            "int3 g128": ("online_rotation.json", "u-int3-g128-rot", None),
            "--bits 3.0": ("online_rotation.json", "b3.0-kl-upgrade-rot", None),
            "--bits 3.5": ("online_rotation.json", "b3.5-kl-upgrade-rot", None),
        },
    ),
    ("R1 + R2 (`lowbit rotate --heads`)", "", {"int3 g128": ("rotation_heads.json", "u-int3g128", "rotated")}),
    ("R1 + `--awq`", "", {"int3 g128": ("awq.json", "u-int3g128-awq", "rotated")}),
)


def find(source: str, run: str, model: str | None) -> dict:
    data = json.loads((RESULTS / source).read_text())
    rows = [r for r in data.get("rows") or data.get("runs") or [] if r["run"] == run]
    rows = [r for r in rows if model is None or r.get("model") == model]
    if len(rows) != 1:
        raise SystemExit(f"{source}: expected one row {run!r} (model {model}), found {len(rows)}")
    return rows[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=RESULTS / "transforms_table.json")
    args = ap.parse_args()
    table = []
    for transform, candidates, cells in CELLS:
        row = {"transform": transform, "candidates": candidates, "cells": {}}
        for column, (source, run, model) in cells.items():
            r = find(source, run, model)
            row["cells"][column] = {
                "source": f"{source} {run}" + (f" ({model})" if model else ""),
                "kld": r["kld"],
                "ppl": r["ppl"],
                "bpw": r["bpw"],
                "artifact_bytes": r.get("artifact_bytes"),
            }
        table.append(row)
    args.out.write_text(
        json.dumps(
            {
                "date": datetime.date.today().isoformat(),
                "command": "python benchmarks/transforms_table.py --out " + str(args.out),
                "note": "assembled from the named results files; nothing rerun",
                "columns": COLUMNS,
                "rows": table,
            },
            indent=1,
        )
    )
    print("| transform | budget candidates | " + " | ".join(COLUMNS) + " |")
    print("|---|---|" + "---|" * len(COLUMNS))
    for row in table:
        cells = [row["cells"].get(c) for c in COLUMNS]
        text = ["" if c is None else f"{c['kld']:.4f} ({c['ppl']:.2f})" for c in cells]
        print(f"| {row['transform']} | {row['candidates']} | " + " | ".join(text) + " |")


if __name__ == "__main__":
    main()
