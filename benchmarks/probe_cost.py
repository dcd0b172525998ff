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

`--probe-tokens N` probes on N positions instead of lowbit's default (WEIGHTING_PROBE_TOKENS;
the results of 2026-12-02 before it existed, probe_cost.json, probed 2048); `--compare-tokens M`
then probes again on M positions from the same measurements and solutions, after the timed
part (the timings are written first), and records how far the two sets of factors agree
(Spearman; the spread of their ratio). `--keep DIR` keeps the measurement file (with the
timed run's factors) for budget runs to reuse.
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
from scipy.stats import spearmanr

import lowbit
from lowbit.allocate import kl_probe
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


def agreement(a: dict[str, float], b: dict[str, float]) -> dict:
    """How alike two probes' per-layer figures are: rank correlation and the spread of b / a."""
    keys = [k for k in a if a[k] > 0 and b.get(k, 0) > 0]
    ratios = sorted(b[k] / a[k] for k in keys)
    pick = lambda q: ratios[min(len(ratios) - 1, int(q * len(ratios)))]  # noqa: E731
    return {
        "n": len(keys),
        "spearman": float(spearmanr([a[k] for k in keys], [b[k] for k in keys]).statistic),
        "ratio_quantiles": {q: pick(q) for q in (0.0, 0.05, 0.25, 0.5, 0.75, 0.95)} | {1.0: ratios[-1]},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--bits", type=float, default=4.25, help="the budget planned at the end (any; planning is instant)")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument(
        "--probe-tokens", type=int, default=kl_probe.WEIGHTING_PROBE_TOKENS, help="positions the probes score"
    )
    ap.add_argument("--compare-tokens", type=int, help="probe again on this many positions and compare")
    ap.add_argument("--keep", type=Path, help="folder to keep the measurement file in (default: a temporary one)")
    args = ap.parse_args()
    kl_probe.WEIGHTING_PROBE_TOKENS = args.probe_tokens
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
    stash: dict = {}

    def keeping(fn):
        def wrapper(*a, **k):
            out = fn(*a, **k)
            stash[fn.__name__] = (a, k, out)
            return out

        return wrapper

    q.probe_roles = keeping(q.probe_roles)
    q.probe_layers = timed(seconds, "layer_probe", keeping(q.probe_layers))
    q._layer_probe_weights = timed(seconds, "layer_probe_second_solve", q._layer_probe_weights)
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        q.round_parameters(model, DTYPES[recipe.storage_dtype])
        t0 = time.perf_counter()
        if args.keep:
            args.keep.mkdir(parents=True, exist_ok=True)
        path = (args.keep or Path(tmp)) / "measurements.json"
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
        "probe_tokens": args.probe_tokens,
    }
    args.out.write_text(json.dumps(record, indent=1))
    print(json.dumps(record["seconds"], indent=1))
    print(f"measurement pass + probes = {record['with_probes_over_measurement_pass']:.2f} x the measurement pass")
    if args.compare_tokens:
        record["comparison"] = compare(stash, args.compare_tokens)
        args.out.write_text(json.dumps(record, indent=1))
        print(json.dumps({k: v for k, v in record["comparison"].items() if "agreement" in k}, indent=1))


def compare(stash: dict, tokens: int) -> dict:
    """Both probes again on `tokens` positions, from the timed run's inputs (not timed)."""
    (model, relative, cands, windows, timed_scale, solved, *_), _, timed_layer = stash["probe_layers"]
    kl_probe.WEIGHTING_PROBE_TOKENS = tokens
    with torch.no_grad():
        new_scale = kl_probe.probe_roles(model, relative, cands, windows, progress=True)
        new_layer = kl_probe.probe_layers(model, relative, cands, windows, new_scale, solved, progress=True)

    def per_layer(sc, fa):  # KL per unit of relative error each layer's probe candidate is priced at
        out = {}
        for n, e in relative.items():
            j = kl_probe.layer_probe_candidate(e, cands)
            if j is not None:
                out[n] = sc[kl_probe.layer_role(n)][j] * fa[n]
        return out

    roles = {f"{r}@{c.name}": v for r, row in timed_scale.items() for c, v in zip(cands, row, strict=True)}
    new_roles = {f"{r}@{c.name}": v for r, row in new_scale.items() for c, v in zip(cands, row, strict=True)}
    return {
        "tokens": tokens,
        "role_scale": new_scale,
        "layer_factor": new_layer,
        "timed_role_scale": timed_scale,
        "timed_layer_factor": timed_layer,
        "role_scale_agreement": agreement(roles, new_roles),
        "layer_factor_agreement": agreement(timed_layer, new_layer),
        "layer_price_agreement": agreement(per_layer(timed_scale, timed_layer), per_layer(new_scale, new_layer)),
    }


if __name__ == "__main__":
    main()
