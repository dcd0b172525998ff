"""Each `-rot` candidate's output error over its base format's, layer by layer, read from a
budget's measurement file (every linear of the model solved by GPTQ with both): the whole-model
version of online_rotation_layers.py's eight-layer screen. Runs nothing.

    .venv/bin/python benchmarks/rotated_pairs.py /tmp/rot-budget/measurements.json \\
        --out benchmarks/results/rotated_pairs.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
from pathlib import Path
from statistics import geometric_mean as geomean

from lowbit.formats import RotatedFormat, format_from_dict


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("measurements", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    data = json.loads(args.measurements.read_text())
    formats = [format_from_dict(c) for c in data["candidates"]]
    index = {f: j for j, f in enumerate(formats)}
    rows = []
    for j, fmt in enumerate(formats):
        if not isinstance(fmt, RotatedFormat) or fmt.base not in index:
            continue
        ratios: dict[str, list[float]] = {}
        for name, rec in data["layers"].items():
            turned, plain = rec["errors"][j], rec["errors"][index[fmt.base]]
            if turned and plain:
                ratios.setdefault(name.rsplit(".", 1)[-1], []).append(turned / plain)
        every = [r for rs in ratios.values() for r in rs]
        rows.append(
            {
                "format": fmt.name,
                "layers": len(every),
                "geomean": geomean(every),
                "min": min(every),
                "max": max(every),
                "lower_in": sum(r < 1 for r in every),
                "by_type": {t: geomean(rs) for t, rs in ratios.items()},
            }
        )
    args.out.write_text(
        json.dumps(
            {
                "date": datetime.date.today().isoformat(),
                "command": shlex.join(["python", *sys.argv]),
                "measurements": {k: data[k] for k in ("model", "calibration", "settings")},
                "rows": rows,
            },
            indent=1,
        )
    )
    types = list(rows[0]["by_type"]) if rows else []
    print("| format | all layers: geomean (min .. max) | lower in | " + " | ".join(types) + " |")
    print("|---|---|---|" + "---|" * len(types))
    for r in rows:
        cells = [f"{r['by_type'][t]:.3f}" for t in types]
        spread = f"{r['geomean']:.3f} ({r['min']:.3f} .. {r['max']:.3f})"
        print(f"| {r['format']} | {spread} | {r['lower_in']}/{r['layers']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
