"""What the `kl` weighting's probes add to a budget's measurement pass, timed side by side in one
process on smollm2-135m (issue: the measurement pass must not get more than 1.5x slower).

A budget run under `--weighting kl` (the default) with no measurement file measures every
layer with every candidate, then probes the roles (`probe_roles`) and each linear alone
(`probe_layers`), and saves all three in the file. This runs exactly that path
(`lowbit.quantize._plan`, the quick protocol's calibration: 128 x 512 C4 windows) and stops
after planning; each step's wall time is taken around the function `_plan` calls, and the
result is the ratio of the whole to the measurement pass alone.

    LOWBIT_DATA_DIR=../shared/data .venv/bin/python benchmarks/probe_cost.py \\
        --out benchmarks/results/probe_cost.json
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

import lowbit
from lowbit.allocate.plan import find_targets
from lowbit.data import calibration_data
from lowbit.dtypes import DTYPES
from lowbit.models.adapters import get_adapter
from lowbit.recipe import Recipe

q = importlib.import_module("lowbit.quantize")  # (lowbit.quantize is also the function)


def timed(seconds: dict[str, float], key: str, fn):
    def wrapper(*a, **k):
        t0 = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            seconds[key] = seconds.get(key, 0.0) + time.perf_counter() - t0

    return wrapper


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--bits", type=float, default=4.25, help="the budget planned at the end (any; planning is instant)")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    loaded = lowbit.load_model(args.model)
    model = loaded.model
    recipe = Recipe.build(budget_bpw=args.bits, weighting="kl", nsamples=args.nsamples, seqlen=args.seqlen)
    adapter = get_adapter(model.config.model_type)
    targets = find_targets(model, adapter, recipe)
    cal = recipe.calibration
    windows = calibration_data(loaded.tokenizer, cal.source, cal.nsamples, cal.seqlen)
    seconds: dict[str, float] = {}
    q.measurements_for = timed(seconds, "measurement_pass", q.measurements_for)
    q.probe_roles = timed(seconds, "role_probe", q.probe_roles)
    q.probe_layers = timed(seconds, "layer_probe", q.probe_layers)
    q._layer_probe_weights = timed(seconds, "layer_probe_second_solve", q._layer_probe_weights)
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        q.round_parameters(model, DTYPES[recipe.storage_dtype])
        t0 = time.perf_counter()
        path = Path(tmp) / "m.json"
        plan = q._plan(model, adapter, recipe, targets, windows, loaded.tokenizer, path, None, False, True, None, None)
        total = time.perf_counter() - t0
    measured = seconds["measurement_pass"]
    record = {
        "date": datetime.date.today().isoformat(),
        "command": shlex.join(sys.argv),
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, {torch.get_num_threads()} threads",
        "model": args.model,
        "candidates": [c.name for c in targets.candidates],
        "calibration": [cal.nsamples, cal.seqlen],
        "seconds": {**seconds, "plan_total": total},
        "with_probes_over_measurement_pass": total / measured,
        "achieved_bpw": plan.budget["achieved_bpw"],
    }
    args.out.write_text(json.dumps(record, indent=1))
    print(json.dumps(record["seconds"], indent=1))
    print(f"measurement pass + probes = {record['with_probes_over_measurement_pass']:.2f} x the measurement pass")


if __name__ == "__main__":
    main()
