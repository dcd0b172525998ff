"""The smallest `--size` budget smollm2-135m admits, with the embedding/head packed and kept in float.

No quantization runs: `find_targets` prices every candidate at its exact packed bytes (as a
size budget does before any slow work), and the smallest weights file is the fixed part (norms,
pinned layers, header allowance) plus every layer at its cheapest candidate.

    .venv/bin/python benchmarks/smallest_size.py
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from foundation import MODEL  # noqa: E402

import lowbit  # noqa: E402
from lowbit.allocate.plan import find_targets  # noqa: E402
from lowbit.models.adapters import get_adapter  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "smallest_size.json"


def smallest_bytes(model, keep: str | None) -> int:
    recipe = lowbit.Recipe.build(size_bytes=10**12, keep=keep)
    size = find_targets(model, get_adapter(model.config.model_type), recipe).size
    costs = [*size.costs.values(), *size.table_costs.values()]
    return size.fixed_bytes + sum(min(c) for c in costs) // 8


def main() -> None:
    model = lowbit.load_model(MODEL).model
    fp16 = 2 * sum(p.numel() for p in model.parameters())
    rows = {
        "fp16_bytes": fp16,
        "tables_packed": smallest_bytes(model, None),
        "tables_in_float (--keep lm_head)": smallest_bytes(model, "lm_head"),
    }
    print(json.dumps(rows, indent=1))
    RESULTS.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "model": MODEL, **rows}, indent=1))


if __name__ == "__main__":
    main()
