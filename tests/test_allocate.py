"""Budget allocation: exact knapsack against brute force, BAQ's closed form and its rounding."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest

from lowbit.allocate import baq_bits, baq_plan, solve_mckp
from lowbit.errors import BudgetError


def _brute_force(costs, errors, budget):
    best = None
    for combo in itertools.product(*[range(len(c)) for c in costs]):
        cost = sum(costs[i][j] for i, j in enumerate(combo))
        err = sum(errors[i][j] for i, j in enumerate(combo))
        if cost <= budget and (best is None or err < best[0] - 1e-12):
            best = (err, combo)
    return best


@pytest.mark.parametrize("seed", range(12))
def test_knapsack_matches_brute_force(seed):
    rng = random.Random(seed)
    items = rng.randint(2, 6)
    costs = [sorted(rng.sample(range(10, 400), rng.randint(2, 4))) for _ in range(items)]
    # error falls with cost, with a random per-item sensitivity
    errors = [[rng.uniform(0.5, 20) * 2.0 ** (-c / 60) for c in cs] for cs in costs]
    lo, hi = sum(min(c) for c in costs), sum(max(c) for c in costs)
    budget = rng.randint(lo, hi)
    choice = solve_mckp(costs, errors, budget)
    best_err, _ = _brute_force(costs, errors, budget)
    assert sum(costs[i][j] for i, j in enumerate(choice)) <= budget
    assert sum(errors[i][j] for i, j in enumerate(choice)) == pytest.approx(best_err, rel=1e-9, abs=1e-12)


def test_knapsack_with_realistic_bit_counts_never_exceeds_the_budget():
    rng = np.random.default_rng(0)
    bpw = [2.3, 3.2, 4.2, 5.2, 6.2, 8.2]
    numel = rng.integers(100_000, 1_000_000, size=200)
    costs = [[int(b * n) for b in bpw] for n in numel]
    sens = rng.lognormal(0, 2, size=200)
    errors = [[s * 2.0 ** (-2 * b) for b in bpw] for s in sens]
    budget = int(3.25 * numel.sum())
    choice = solve_mckp(costs, errors, budget)
    spent = sum(costs[i][j] for i, j in enumerate(choice))
    assert spent <= budget and spent > 0.99 * budget  # uses the budget, never overshoots


def test_knapsack_infeasible_budget_names_the_smallest_feasible_one():
    with pytest.raises(BudgetError, match=r"below the cheapest plan \(30 bits\)"):
        solve_mckp([[10, 20], [20, 40]], [[1.0, 0.5], [1.0, 0.5]], 29)


def test_baq_bits_meets_the_mean_and_equalises_marginal_loss():
    sens = np.array([1.0, 10.0, 100.0, 0.01, 5.0])
    numel = np.array([100, 200, 100, 300, 50])
    bits = baq_bits(sens, numel, 4.0, 2.0, 8.0)
    assert np.average(bits, weights=numel) == pytest.approx(4.0)
    free = (bits > 2.0 + 1e-9) & (bits < 8.0 - 1e-9)
    marginal = sens[free] / numel[free] * 2.0 ** (-2 * bits[free])
    assert marginal.max() / marginal.min() == pytest.approx(1.0, rel=1e-9)
    assert bits[2] > bits[1] > bits[0]  # more sensitive per weight, more bits


def test_baq_bits_clamps_by_water_filling():
    bits = baq_bits([1e-12, 1.0, 1e12], [1, 1, 1], 4.0, 2.0, 8.0)
    assert bits[0] == 2.0 and bits[2] == 8.0 and bits.mean() == pytest.approx(4.0)


def test_baq_plan_rounds_within_budget():
    rng = np.random.default_rng(1)
    bpw = [2.2, 3.2, 4.2, 8.2]
    numel = rng.integers(1000, 5000, size=40)
    costs = [[int(b * n) for b in bpw] for n in numel]
    sens = rng.lognormal(0, 1.5, size=40) * numel
    budget = int(3.5 * numel.sum())
    choice = baq_plan(sens, numel, [bpw] * 40, costs, budget)
    spent = sum(costs[i][j] for i, j in enumerate(choice))
    assert spent <= budget and spent > 0.97 * budget
    errors = [[s * 2.0 ** (-2 * b) for b in bpw] for s in sens]
    exact = solve_mckp(costs, errors, budget)
    total = lambda ch: sum(errors[i][j] for i, j in enumerate(ch))  # noqa: E731
    assert total(exact) <= total(choice) <= 1.5 * total(exact)  # close to the exact optimum


def test_knapsack_prints_nothing_on_the_terminal(capfd):
    # HiGHS's MIP solver printf()s a debug line on some instances like these, even with
    # output off; the solve must keep it off the user's terminal and leave stdout working.
    rng = np.random.default_rng(0)
    for _ in range(5):
        costs = [sorted(int(x) for x in rng.integers(1000, 9000, 12)) for _ in range(200)]
        errors = [sorted(rng.random(12) * rng.random() * 10, reverse=True) for _ in range(200)]
        solve_mckp(costs, errors, sum(c[6] for c in costs))
    print("still here")
    out, _ = capfd.readouterr()
    assert out == "still here\n"


def test_upgrade_never_trades_a_table_below_the_uniform_base_but_may_keep_it_in_float():
    from lowbit.allocate.planner import upgrade_choice

    # two linears (candidates 2/4/6 bits) and a table (float, then the same three formats)
    costs = [[2, 4, 6], [2, 4, 6], [16, 2, 4, 6]]
    errors = [[1.0, 0.1, 0.02], [1.0, 0.1, 0.02], [0.0, 0.05, 0.01, 0.005]]
    extra = [0, 0, 1]
    # the free knapsack packs the table cheaply to buy a better linear (0.17 < 0.21 on the proxy)
    assert solve_mckp(costs, errors, 12)[2] == 1
    # upgrade: the uniform base is the 4-bit format; the table may not go below it (without fade:
    # at the base's own size fade keeps the step down to 2 bits open, tested below)
    assert upgrade_choice(costs, errors, 12, extra=extra, fade=False) == [1, 1, 2]
    # float is never worse than the base, so it stays open when the bytes allow it
    assert upgrade_choice(costs, errors, 28, extra=extra) == [2, 2, 0]


def test_upgrade_trust_lets_layers_step_down_a_little_to_pay_for_another_step_up():
    from lowbit.allocate.planner import upgrade_choice

    # candidates: 0 coarse 3-bit (cost 9), 1 3-bit (cost 10), 2 4-bit (cost 13), 3 2-bit (cost 7)
    costs = [[9, 10, 13, 7]] * 4
    errors = [[1.2, 1.0, 0.3, 4.0], [1.3, 1.0, 0.3, 4.0], [1.1, 1.0, 0.3, 4.0], [1.25, 1.0, 0.2, 4.0]]
    budget = 40  # exactly the 3-bit grid everywhere
    # trust 1: no layer may get worse than under the base, so at its own size the plan is the base
    assert upgrade_choice(costs, errors, budget, trust=1.0) == [1, 1, 1, 1]
    # trust 1.25: layer 1 may not coarsen (1.3 > 1.25), so it is the one lifted to 4 bits (-0.7), paid
    # by the other three coarsening (+0.2, +0.1, +0.25); the 2-bit grid (4x the error) stays out of reach
    assert upgrade_choice(costs, errors, budget, trust=1.25) == [0, 2, 0, 0]
    # a free knapsack would use the 2-bit grid; the trust region never does, however large the gain
    assert 3 not in upgrade_choice(costs, errors, budget, trust=3.9)


def _proxy(errors: list[list[float]], choice: list[int]) -> float:
    return sum(e[j] for e, j in zip(errors, choice, strict=True))


def _faded_plans(costs, errors, widths, budgets):
    """(budget, plan with fade, plain plan) at each budget, the faded plan checked to stay within
    the budget and to be never worse on the proxy than the plain one (which is open to it at
    its measured error)."""
    from lowbit.allocate.planner import upgrade_choice

    for budget in budgets:
        faded = upgrade_choice(costs, errors, budget, fade=True, widths=widths)
        plain = upgrade_choice(costs, errors, budget, fade=False)
        assert sum(c[j] for c, j in zip(costs, faded, strict=True)) <= budget
        assert _proxy(errors, faded) <= _proxy(errors, plain) + 1e-12
        yield budget, faded, plain


def test_upgrade_fade_keeps_the_cheaper_base_open_at_a_uniform_formats_own_size():
    from lowbit.allocate.planner import upgrade_choice

    # candidates: 0 coarse 3-bit (cost 9), 1 3-bit (cost 10), 2 4-bit (cost 12)
    costs = [[9, 10, 12]] * 4
    errors = [[1.2, 1.0, 0.3], [1.3, 1.0, 0.3], [1.1, 1.0, 0.3], [1.25, 1.0, 0.2]]

    # just below the 3-bit grid's size (40) the base is the coarse grid (36) and its spare bits
    # lift layer 3 to 4 bits; at the size itself, without fade, the plan is the 3-bit grid: a cliff
    below = upgrade_choice(costs, errors, 39, fade=False)
    assert below == [0, 0, 0, 2] and _proxy(errors, below) == pytest.approx(3.8)
    assert upgrade_choice(costs, errors, 40, fade=False) == [1, 1, 1, 1]
    # with fade the step down stays open at the size, at its measured price: no worse than below
    widths = [3, 3, 4]
    at = upgrade_choice(costs, errors, 40, fade=True, widths=widths)
    assert at == [0, 1, 0, 2] and _proxy(errors, at) == pytest.approx(3.5)
    for budget, faded, plain in _faded_plans(costs, errors, widths, range(40, 50)):
        if budget >= 44:  # one gap (40 - 36) above the size nothing is left of the fade
            assert faded == plain
    # halfway (t = 1/2) a step down counts twice: layers 0 and 2 coarsening (+0.2 and +0.1, counted
    # +0.6) still pay for layer 1's 4 bits (-0.7)
    assert upgrade_choice(costs, errors, 42, fade=True, widths=widths) == [0, 2, 0, 2]
    assert upgrade_choice(costs, errors, 42, fade=False) == [1, 1, 1, 2]


def test_upgrade_fade_across_a_bit_ends_where_the_next_uniform_format_fits():
    from lowbit.allocate.planner import fade_window, upgrade_choice

    # candidates: 0 2-bit (cost 8), 1 3-bit (cost 10), 2 finer 3-bit (cost 11), 3 4-bit (cost 13)
    costs = [[8, 10, 11, 13]] * 4
    errors = [[1.2, 1.0, 0.9, 0.3], [1.2, 1.0, 0.9, 0.3], [3.0, 1.0, 0.9, 0.3], [3.0, 1.0, 0.9, 0.2]]
    widths = [2, 3, 3, 4]

    # just below the 3-bit grid's size (40) the plan is the 2-bit base plus upgrades (3.6); at the
    # size, the first 3-bit format to fit, the plain allocator jumps to the bare 3-bit grid (4.0)
    below = upgrade_choice(costs, errors, 39, fade=False)
    assert below == [0, 0, 1, 3] and _proxy(errors, below) == pytest.approx(3.6)
    assert upgrade_choice(costs, errors, 40, fade=False) == [1, 1, 1, 1]
    # fade keeps the 2-bit step open there at its measured price: no worse than just below
    at = upgrade_choice(costs, errors, 40, fade=True, widths=widths)
    assert at == [0, 0, 2, 3] and _proxy(errors, at) == pytest.approx(3.5)
    for budget, faded, _plain in _faded_plans(costs, errors, widths, range(40, 52)):
        if budget >= 44:  # gone once the next uniform format fits
            assert 0 not in faded
    # a bit less fades over the bits until the next uniform format fits (44 - 40), not the whole
    # base-to-base gap (40 - 32) that a coarser grid of the same width would get
    totals = {j: (4 * costs[0][j], sum(e[j] for e in errors)) for j in range(4)}
    assert fade_window(totals, [0, 1], 1, widths) == (0, 4)
    assert fade_window(totals, [0, 1], 1, [3, 3, 3, 4]) == (0, 8)
    assert fade_window(totals, [0], 0, widths) == (None, 0.0)
    # without widths nothing fades
    assert upgrade_choice(costs, errors, 40, fade=True) == [1, 1, 1, 1]


@pytest.mark.parametrize("allocator", ["knapsack", "upgrade", "baq"])
def test_a_candidate_some_layers_cannot_hold_is_a_choice_for_the_others_only(allocator):
    """Candidate 2 (a k-quant, say) is unmeasured (None) on two of three layers: no allocator
    gives it to them, upgrade never takes it as the uniform base, and the layer that can hold it
    gets it when it is its best buy."""
    from lowbit.allocate.planner import plan_for_budget
    from lowbit.allocate.sensitivity import Measurements
    from lowbit.formats import IntFormat

    cands = [IntFormat(3, 32), IntFormat(4, 32), IntFormat(4, 256)]
    meas = Measurements("m", "c", [c.to_dict() for c in cands], {})
    for i, held in enumerate([False, False, True]):
        costs = [300, 400, 400 if held else None]
        errors = [9.0, 1.0, 0.5 if held else None]
        meas.layers[f"model.layers.{i}.mlp.down_proj"] = {
            "costs": costs,
            "errors": errors,
            "base": 10.0,
            "numel": 100,
            "block": i,
        }
    plan = plan_for_budget(meas, 4.0, allocator)
    if allocator == "baq":  # BAQ rounds to bit levels, not errors: either 4-bit choice for layer 2
        assert [plan.choice[f"model.layers.{i}.mlp.down_proj"] for i in range(2)] == [1, 1]
    else:
        assert [plan.choice[f"model.layers.{i}.mlp.down_proj"] for i in range(3)] == [1, 1, 2]
        assert plan.predicted_error == pytest.approx((1.0 + 1.0 + 0.5) / 10)
    unheld = meas.restricted({"model.layers.0.mlp.down_proj": {0}})  # a target that cannot write int3 there
    assert unheld.layers["model.layers.0.mlp.down_proj"]["errors"] == [None, 1.0, None]
    assert meas.layers["model.layers.0.mlp.down_proj"]["errors"] == [9.0, 1.0, None]  # the original stays
    tight = plan_for_budget(meas, 3.34, allocator)  # room for one 4-bit layer: the unheld one at 3
    assert all(j != 2 for n, j in tight.choice.items() if not n.startswith("model.layers.2"))
    assert tight.achieved_bpw <= 3.34
