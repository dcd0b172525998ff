"""How close each GGUF type comes to smollm2-135m's own Q4_1 grid: the median relative output
error GPTQ leaves per type on the 30 down_proj layers (the only ones k-quants fit), read from the
measurement file of a `--target gguf` budget run over every type (gguf_vs_llamacpp.py writes one
into its WORK). A type whose 4-bit error is far below the 5-bit types' reproduces the source grid
rather than measuring quality (protocol.md), so benchmarks leave it out of smollm2 budgets.

    .venv/bin/python benchmarks/gguf_source_grid.py /tmp/gguf-bench3/measurements.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
from pathlib import Path

from lowbit.formats import format_from_dict
from lowbit.formats.ggml import ggml_type

RESULTS = Path(__file__).parent / "results" / "gguf_source_grid.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("measurements", type=Path)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    d = json.loads(args.measurements.read_text())
    types = [ggml_type(format_from_dict(c)).name for c in d["candidates"]]
    layers = {n: r for n, r in d["layers"].items() if n.endswith("mlp.down_proj")}
    per_type = {t: [r["errors"][j] / r["base"] for r in layers.values()] for j, t in enumerate(types)}
    first = next(iter(layers.values()))
    rows = [
        {
            "type": t,
            "bits_per_weight": first["costs"][j] / first["numel"],
            "median_relative_error": statistics.median(v),
        }
        for j, (t, v) in enumerate(per_type.items())
    ]
    below = sum(a < b for a, b in zip(per_type["Q4_K"], per_type["Q5_K"], strict=True)) if "Q4_K" in per_type else None
    out = {
        "date": datetime.date.today().isoformat(),
        "command": " ".join(["benchmarks/gguf_source_grid.py", *sys.argv[1:]]),
        "machine": platform.platform(),
        "model": "smollm2-135m",
        "layers": len(layers),
        "rows": rows,
        "q4_k_below_q5_k_layers": below,
    }
    args.out.write_text(json.dumps(out, indent=1))
    for row in rows:
        bpw, error = row["bits_per_weight"], row["median_relative_error"]
        print(f"{row['type']:7s} {bpw:.3f} bpw  median relative error {error:.2e}")
    print(f"Q4_K below Q5_K on {below} of {len(layers)} layers")


if __name__ == "__main__":
    main()
