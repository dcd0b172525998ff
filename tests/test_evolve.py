"""Plan refinement by measured KL: stays within budget, never returns a worse plan, restores the model."""

from __future__ import annotations

import copy
import random

import pytest
import torch
from conftest import make_tiny_model

import lowbit
from lowbit.allocate.evolve import PlanEvaluator, _mutate, evolve
from lowbit.allocate.sensitivity import measure, pareto_front
from lowbit.errors import LowbitError
from lowbit.formats import IntFormat
from lowbit.models.adapters import get_adapter, quantizable_linears
from lowbit.recipe import GPTQSettings

WINDOWS = torch.randint(2, 256, (8, 64), generator=torch.Generator().manual_seed(0))
CANDIDATES = [IntFormat(b, 32) for b in (2, 3, 4, 8)]
SETTINGS = GPTQSettings(batch_size=4)


def test_pareto_front_drops_dominated_candidates():
    costs = [10, 20, 20, 30, 40, 50]
    errors = [5.0, 3.0, 2.0, 2.5, 1.0, 1.0]
    # 20/3.0 loses to 20/2.0; 30/2.5 is dearer and worse than 20/2.0; 50/1.0 is no better than 40/1.0
    assert pareto_front(costs, errors) == [0, 2, 4]
    # a candidate the layer cannot hold (None: a k-quant on rows not of 256) is never on its front
    assert pareto_front([10, None, 30], [5.0, None, 1.0]) == [0, 2]


def test_a_dominated_start_moves_to_the_best_front_candidate_no_dearer():
    from lowbit.allocate.evolve import _best_within
    from lowbit.errors import BudgetError

    costs = [10, 20, 20, 30, 40, 50]
    assert _best_within([0, 2, 4], costs, costs[3]) == 2
    assert _best_within([0, 2, 4], costs, costs[5]) == 4
    with pytest.raises(BudgetError):
        _best_within([2, 4], costs, 10)


def test_mutations_stay_on_the_fronts_and_within_budget():
    rng = random.Random(0)
    fronts = {f"l{i}": [0, 2, 3] for i in range(6)}
    costs = {n: [10, 99, 20, 35] for n in fronts}
    start = {n: 2 for n in fronts}  # 6 x 20 = 120
    budget = 125
    seen = set()
    for _ in range(200):
        child = _mutate(start, fronts, costs, budget, rng, steps=rng.choice((1, 2, 3)))
        if child is None:
            continue
        assert all(j in fronts[n] for n, j in child.items())
        assert sum(costs[n][j] for n, j in child.items()) <= budget
        seen.add(tuple(sorted(child.items())))
    assert len(seen) > 5  # it explores


def _bank_and_measurements(model):
    adapter = get_adapter(model.config.model_type)
    names = [n for n, _ in quantizable_linears(model, adapter)]
    meas = measure(model, adapter, names, CANDIDATES, WINDOWS, SETTINGS, progress=False, keep_weights=True)
    return meas


def test_refinement_improves_a_bad_plan_within_budget_and_restores_the_model():
    model = make_tiny_model("llama")
    meas = _bank_and_measurements(model)
    before = {n: p.clone() for n, p in model.state_dict().items()}
    names = list(meas.layers)
    fronts = {n: sorted(meas.bank[n], key=lambda j: meas.layers[n]["costs"][j]) for n in names}
    # a deliberately poor start: the cheapest candidate for the first half, the dearest for the rest
    start = {n: (fronts[n][0] if i < len(names) // 2 else fronts[n][-1]) for i, n in enumerate(names)}
    costs = {n: meas.layers[n]["costs"] for n in names}
    budget = sum(costs[n][j] for n, j in start.items())
    evaluator = PlanEvaluator(model, meas.bank, WINDOWS[-2:])
    res = evolve(
        evaluator,
        start,
        costs,
        {n: meas.weighted_errors(n) for n in names},
        budget,
        generations=6,
        offspring=6,
        progress=False,
    )
    assert sum(costs[n][j] for n, j in res.choice.items()) <= budget
    assert res.final_kl < res.start_kl
    assert len(res.scored) > 3 and len(res.history) == len(res.scored)
    # the model holds its float weights again, and the reported KL is what the plan scores
    after = model.state_dict()
    assert all(torch.equal(before[n], after[n]) for n in before)
    check = PlanEvaluator(model, meas.bank, WINDOWS[-2:])
    assert check.kl(res.choice) == pytest.approx(res.final_kl, rel=1e-5)
    check.restore()


def test_quantize_with_refinement_records_it_and_keeps_the_budget(tmp_path):
    model = make_tiny_model("qwen2")
    kw = {"calib": WINDOWS, "gptq": SETTINGS, "candidates": CANDIDATES, "progress": False}
    q = lowbit.quantize(copy.deepcopy(model), budget_bpw=3.7, refine_seconds=5, refine_windows=2, **kw)
    budget = q.lowbit_info.settings["budget"]
    ref = budget["refinement"]
    assert ref["final_kl"] <= ref["start_kl"] and ref["generations"] >= 1
    # it started from the best of the allocator's plan, the other weightings and uniform formats
    assert ref["start"] in ref["starts"] and ref["start_kl"] == min(ref["starts"].values())
    assert "knapsack/relative" in ref["starts"] and "knapsack/raw" in ref["starts"]
    assert any(label.startswith("uniform int3") for label in ref["starts"])
    assert q.lowbit_info.bits_per_weight <= 3.7
    assert budget["achieved_bpw"] == pytest.approx(q.lowbit_info.bits_per_weight)


def test_weightings_differ_and_unknown_ones_are_refused():
    meas = _bank_and_measurements(make_tiny_model("llama"))
    name = next(iter(meas.layers))
    raw, rel, stream = (meas.weighted_errors(name, w) for w in ("raw", "relative", "stream"))
    block = str(meas.layers[name]["block"])
    assert stream == pytest.approx([e / meas.stream[block] for e in raw])
    assert rel == pytest.approx([e / meas.layers[name]["base"] for e in raw])
    with pytest.raises(LowbitError, match="unknown error weighting"):
        meas.weighted_errors(name, "depth")


def test_refinement_starts_from_the_best_of_several_plans():
    model = make_tiny_model("llama")
    meas = _bank_and_measurements(model)
    names = list(meas.layers)
    costs = {n: meas.layers[n]["costs"] for n in names}
    cheap = {n: 0 for n in names}  # int2 everywhere
    good = {n: 2 for n in names}  # int4 everywhere
    budget = sum(costs[n][2] for n in names)
    evaluator = PlanEvaluator(model, meas.bank, WINDOWS[-2:])
    proxy = {n: meas.weighted_errors(n) for n in names}
    res = evolve(evaluator, {"int2": cheap, "int4": good}, costs, proxy, budget, generations=1, progress=False)
    assert res.start == "int4" and res.starts["int4"] < res.starts["int2"]
    assert res.start_kl == res.starts["int4"] and res.final_kl <= res.start_kl
    assert len(res.scored) >= 2  # the starts are among the scored plans
    with pytest.raises(LowbitError, match="'over' is over the budget"):
        evolve(evaluator, {"over": {n: 3 for n in names}}, costs, proxy, budget, generations=1, progress=False)


def test_rank_correlation_of_proxy_and_kl():
    from lowbit.allocate.evolve import Refinement

    res = Refinement({}, 1.0, 1.0, 0, 0, 0.0)
    res.scored = [(0.1, 2.0), (0.2, 3.0)]
    assert res.rank_correlation() is None  # too few plans to say
    res.scored = [(0.1, 2.0), (0.2, 3.0), (0.3, 5.0), (0.4, 5.5)]
    assert res.rank_correlation() == pytest.approx(1.0)  # same order, whatever the scale
    res.scored = [(0.1, 5.0), (0.2, 3.0), (0.3, 2.0), (0.4, 1.0)]
    assert res.rank_correlation() == pytest.approx(-1.0)
    res.scored = [(0.1, 1.0), (0.2, 3.0), (0.3, 2.0), (0.4, 4.0)]
    assert res.rank_correlation() == pytest.approx(0.8)  # one swapped pair: 1 - 6*2/(4*15)
