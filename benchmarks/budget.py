"""Mixed precision at a bit budget vs the best uniform format, on smollm2-135m (quick protocol).

One measurement pass (128 x 512 C4 windows, every layer solved with every default candidate
on float inputs, all solutions kept in memory). Every plan is then scored the same way:
its layers' solutions are swapped into the float model and KLD, perplexity and top-1
agreement are measured on the quick protocol's WikiText-2 windows. This isolates the
allocation (which format where) from the sequential pipeline; BENCHMARKS.md gives the
`lowbit quantize --measurements` commands for the end-to-end figures.

Plans per budget: the best uniform candidate that fits (largest bpw within the budget),
the knapsack plan under each error weighting (stream, relative, raw), BAQ's closed form, the
upgrade plan (the best uniform format, its spare bits spent without making any layer worse),
and the refined plan: the evolutionary search on 4 held-out C4 windows, started from whichever of
the knapsack plans, BAQ's, the upgrade plan and the two dearest uniform formats scores best there
(planner.starting_plans, as `lowbit quantize --refine` does).
The rank correlation of each weighting's proxy with measured KL is taken over the plans
the refinement scored (all at the same budget).

    LOWBIT_DATA_DIR=../shared/data .venv/bin/python benchmarks/budget.py [--refine 180]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).parent))
from foundation import MODEL  # noqa: E402

import lowbit  # noqa: E402
from lowbit.allocate import plan_for_budget  # noqa: E402
from lowbit.allocate.evolve import PlanEvaluator, evolve  # noqa: E402
from lowbit.allocate.planner import starting_plans  # noqa: E402
from lowbit.allocate.sensitivity import measure, pareto_front  # noqa: E402
from lowbit.data import calibration_data  # noqa: E402
from lowbit.eval import evaluate_windows, protocol_windows  # noqa: E402
from lowbit.eval.reference import cached_reference  # noqa: E402
from lowbit.models.adapters import get_adapter, quantizable_linears  # noqa: E402
from lowbit.quantize import round_parameters  # noqa: E402
from lowbit.recipe import GPTQSettings, default_candidates  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "budget.json"
BUDGETS = [2.5, 3.0, 3.5, 4.25]
WEIGHTINGS = ["stream", "relative", "raw"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budgets", type=float, nargs="*", default=BUDGETS)
    ap.add_argument("--refine", type=float, default=180.0, help="refinement seconds per budget")
    ap.add_argument("--start-weighting", default="relative", help="the knapsack plan the refinement starts from")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--measurements", type=Path, default=Path("/tmp/lowbit-budget-measurements.json"))
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()

    loaded = lowbit.load_model(MODEL)
    model, tok = loaded.model, loaded.tokenizer
    with torch.no_grad():  # as `lowbit quantize` does, so the CLI accepts this run's measurement file
        round_parameters(model, torch.float16)
    adapter = get_adapter(model.config.model_type)
    names = [n for n, _ in quantizable_linears(model, adapter)]
    cands = list(default_candidates())
    windows = calibration_data(tok, "c4", args.nsamples, 512)
    held_out = calibration_data(tok, "c4", 4, 512, seed=1)
    eval_windows = protocol_windows(tok, "wikitext2", "quick", 512)
    ref = cached_reference(loaded.source.fingerprint(), eval_windows, lambda: model, 4)

    t0 = time.perf_counter()
    meas = measure(model, adapter, names, cands, windows, GPTQSettings(), keep_weights="all")
    measure_seconds = time.perf_counter() - t0
    bank = meas.bank
    meas.bank = None
    meas.save(args.measurements)  # the CLI can plan from it (same model, calibration, candidates)
    print(f"measurement pass: {measure_seconds:.0f} s", flush=True)
    numel = sum(meas.layers[n]["numel"] for n in names)
    costs = {n: meas.layers[n]["costs"] for n in names}

    scorer = PlanEvaluator(model, bank, eval_windows[:1])  # only its weight swapping is used here

    def score(choice: dict[str, int]) -> dict:
        scorer.load(choice)
        ev = evaluate_windows(model, eval_windows, ref, 4, progress=False)
        bits = sum(costs[n][j] for n, j in choice.items())
        return {"bpw": bits / numel, **{k: ev[k] for k in ("perplexity", "kld", "top1_agreement")}}

    results = {
        "date": time.strftime("%Y-%m-%d"),
        "model": MODEL,
        "nsamples": args.nsamples,
        "candidates": [f.name for f in cands],
        "measurement_seconds": measure_seconds,
        "budgets": [],
    }
    for budget in args.budgets:
        row: dict = {"budget": budget, "plans": {}}
        fits = [
            j
            for j, f in enumerate(cands)
            if sum(f.storage_bits(*meas.layers[n]["shape"]) for n in names) <= budget * numel
        ]
        uni = max(fits, key=lambda j: sum(costs[n][j] for n in names))
        row["plans"][f"uniform {cands[uni].name}"] = score({n: uni for n in names})
        plans = {}
        for w in WEIGHTINGS:
            t = time.perf_counter()
            plans[f"knapsack/{w}"] = plan_for_budget(meas, budget, "knapsack", weighting=w)
            row.setdefault("planning_seconds", time.perf_counter() - t)
        for allocator in ("baq", "upgrade"):
            plans[f"{allocator}/{args.start_weighting}"] = plan_for_budget(
                meas, budget, allocator, weighting=args.start_weighting
            )
        for label, plan in plans.items():
            row["plans"][label] = score(plan.choice)
            print(budget, label, row["plans"][label], flush=True)

        scorer.restore()  # the float weights back before the refinement takes its own copy
        base = plans[f"knapsack/{args.start_weighting}"]
        starts = starting_plans(meas, base, args.start_weighting)
        front_bank = {n: {j: bank[n][j] for j in pareto_front(costs[n], meas.layers[n]["errors"])} for n in names}
        evaluator = PlanEvaluator(model, front_bank, held_out)
        proxy = {n: meas.weighted_errors(n, args.start_weighting) for n in names}
        res = evolve(evaluator, starts, costs, proxy, base.budget_bits, time_limit=args.refine, progress=False)
        row["refinement"] = res.to_dict()
        scorer.restore()
        row["plans"][f"refined (from {res.start}, best of {len(starts)} starts on held-out KL)"] = score(res.choice)
        row["rank_correlation"] = {
            w: float(
                spearmanr(
                    [sum(meas.weighted_errors(n, w)[j] for n, j in c.items()) for c in res.history],
                    [k for _, k in res.scored],
                ).statistic
            )
            for w in WEIGHTINGS
        }
        print(json.dumps(row), flush=True)
        results["budgets"].append(row)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))

    print("\n| budget | plan | bpw | KLD | ppl | top-1 |\n|---|---|---|---|---|---|")
    for row in results["budgets"]:
        for label, r in row["plans"].items():
            print(
                f"| {row['budget']} | {label} | {r['bpw']:.4f} | {r['kld']:.4f} | {r['perplexity']:.2f} | "
                f"{r['top1_agreement']:.4f} |"
            )


if __name__ == "__main__":
    main()
