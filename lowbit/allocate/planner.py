"""From a bit budget and measurements to a plan: which candidate format each layer gets."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from lowbit.allocate.baq import baq_plan
from lowbit.allocate.knapsack import min_cost, solve_mckp
from lowbit.allocate.sensitivity import Measurements, plan_formats
from lowbit.errors import BudgetError
from lowbit.formats import Format, format_from_dict
from lowbit.recipe import ALLOCATORS, UPGRADE_FADE, UPGRADE_TRUST


@dataclass
class Allocation:
    """The allocator's choice for the layers it planned, with the budget arithmetic behind it."""

    formats: dict[str, Format]  # layer -> chosen format
    budget_bpw: float
    achieved_bpw: float
    predicted_error: float  # summed (weighted) measured error of the chosen candidates
    allocator: str
    choice: dict[str, int]  # layer -> index into the measured candidates
    budget_bits: int  # bits the planned layers may use (pinned layers' bits already taken off)
    reserved_bits: int = 0  # pinned layers' bits
    total_numel: int = 0  # weights the budget is spread over, pinned layers included
    costs: dict[str, list[int]] = field(default_factory=dict)  # layer -> bits of each candidate, as budgeted
    trust: float = UPGRADE_TRUST  # the upgrade allocator's (upgrade_choice)
    fade: bool = UPGRADE_FADE  # the upgrade allocator's (upgrade_choice)

    def with_choice(self, measurements: Measurements, choice: dict[str, int], weighting: str) -> Allocation:
        """The same budget with another choice (e.g. a refined one), its figures recomputed."""
        spent = sum(self.costs[n][j] for n, j in choice.items()) + self.reserved_bits
        return replace(
            self,
            formats=plan_formats(measurements, choice),
            achieved_bpw=spent / self.total_numel,
            predicted_error=sum(measurements.weighted_errors(n, weighting)[j] for n, j in choice.items()),
            choice=dict(choice),
        )


def _refuse(budget_bpw: float, floor_bits: int, total: int, pinned: bool) -> None:
    smallest = math.ceil(floor_bits / total * 1000) / 1000
    why = "the cheapest plan the candidates allow" + (" with the pinned layers" if pinned else "")
    raise BudgetError(
        f"a budget of {budget_bpw} bits per weight is below {why} ({smallest} bpw); "
        f"use --bits {smallest} or more, or add cheaper candidates"
    )


def check_feasible(
    shapes: list[tuple[int, int]],
    candidates: list[list[Format]],
    budget_bpw: float,
    reserved_bits: int = 0,
    reserved_numel: int = 0,
) -> None:
    """Refuse an impossible budget before any slow measurement starts (`candidates`: per layer,
    those its rows can hold)."""
    total = sum(o * i for o, i in shapes) + reserved_numel
    floor = sum(min(f.storage_bits(o, i) for f in fs) for (o, i), fs in zip(shapes, candidates, strict=True))
    floor += reserved_bits
    if floor > math.floor(budget_bpw * total):
        _refuse(budget_bpw, floor, total, reserved_numel > 0)


def plan_for_budget(
    measurements: Measurements,
    budget_bpw: float,
    allocator: str = "knapsack",
    layers: list[str] | None = None,
    reserved_bits: int = 0,
    reserved_numel: int = 0,
    weighting: str = "relative",
    costs: dict[str, list[int]] | None = None,
    budget_bits: int | None = None,
    tied: list[tuple[str, ...]] | None = None,
    trust: float = UPGRADE_TRUST,
    fade: bool = UPGRADE_FADE,
) -> Allocation:
    """The plan for `layers` (default: all measured) with the least summed measured error whose
    bpw, every scale and zero counted and pinned layers (`reserved_*`) included, stays within
    `budget_bpw`. Errors are compared across layers after `weighting`
    (Measurements.weighted_errors). Byte budgets pass each candidate's exact packed size as
    `costs` (bits) and the bits left for these layers as `budget_bits`. Each group in `tied`
    (layers an engine fuses, such as q/k/v for vLLM) gets one format, chosen as one item whose
    cost and error are its members' sums. `trust` and `fade` are the upgrade allocator's (upgrade_choice)."""
    if allocator not in ALLOCATORS:
        raise BudgetError(f"unknown allocator {allocator!r}; use one of {', '.join(ALLOCATORS)}")
    names = list(measurements.layers) if layers is None else layers
    missing = [n for n in names if n not in measurements.layers]
    if missing:
        raise BudgetError(f"the measurements do not cover {missing[0]}; measure again")
    recs = [measurements.layers[n] for n in names]
    costs = [r["costs"] if costs is None else costs[n] for n, r in zip(names, recs, strict=True)]
    errors = [measurements.weighted_errors(n, weighting) for n in names]
    numel = [r["numel"] for r in recs]
    total = sum(numel) + reserved_numel
    budget = math.floor(budget_bpw * total) - reserved_bits if budget_bits is None else budget_bits
    floor = min_cost(
        [[c for c, e in zip(cs, es, strict=True) if e < math.inf] for cs, es in zip(costs, errors, strict=True)]
    )
    if floor > budget:
        _refuse(budget_bpw, floor + reserved_bits, total, reserved_numel > 0)
    items = _items(names, tied)
    item_costs = [_summed(costs, item) for item in items]
    item_errors = [_summed(errors, item) for item in items]
    item_numel = [sum(numel[k] for k in item) for item in items]
    if allocator == "knapsack":
        picks = held_solve(solve_mckp, item_costs, item_errors, budget)
    elif allocator == "upgrade":
        widths = [format_from_dict(c).bits for c in measurements.candidates]
        picks = upgrade_choice(item_costs, item_errors, budget, trust=trust, fade=fade, widths=widths)
    else:

        def baq(costs_, errors_, budget_):
            levels = [[c / n for c in cs] for cs, n in zip(costs_, item_numel, strict=True)]
            # BAQ's sensitivity c in L(b) = c 2^(-2b): geometric mean of the fits at every measured level
            sens = [
                math.exp(
                    sum(math.log(max(e, 1e-300)) + 2 * b * math.log(2) for e, b in zip(es, lv, strict=True)) / len(es)
                )
                for es, lv in zip(errors_, levels, strict=True)
            ]
            return baq_plan(sens, item_numel, levels, costs_, budget_)

        picks = held_solve(baq, item_costs, item_errors, budget)
    choice = [0] * len(names)
    for item, j in zip(items, picks, strict=True):
        for k in item:
            choice[k] = j
    spent = sum(c[j] for c, j in zip(costs, choice, strict=True)) + reserved_bits
    return Allocation(
        formats=plan_formats(measurements, dict(zip(names, choice, strict=True))),
        budget_bpw=budget_bpw,
        achieved_bpw=spent / total,
        predicted_error=sum(e[j] for e, j in zip(errors, choice, strict=True)),
        allocator=allocator,
        choice=dict(zip(names, choice, strict=True)),
        budget_bits=budget,
        reserved_bits=reserved_bits,
        total_numel=total,
        costs=dict(zip(names, costs, strict=True)),
        trust=trust,
        fade=fade,
    )


def _items(names: list[str], tied: list[tuple[str, ...]] | None) -> list[list[int]]:
    """Indices into `names` planned as one: each tied group whose members are all planned here,
    every other layer alone."""
    index = {n: i for i, n in enumerate(names)}
    items, taken = [], set()
    for group in tied or ():
        if all(n in index for n in group):
            items.append([index[n] for n in group])
            taken.update(group)
    items += [[i] for n, i in index.items() if n not in taken]
    return sorted(items)


def _summed(rows: list[list], item: list[int]) -> list:
    """Candidate by candidate, the sum over an item's layers (None where a layer cannot hold it)."""
    return [None if None in col else sum(col) for col in zip(*(rows[k] for k in item), strict=True)]


def held_solve(solver, costs: list[list], errors: list[list[float]], budget: int) -> list[int]:
    """`solver(costs, errors, budget)` over the candidates each item can hold (finite error),
    its picks mapped back to indices into the full lists: the solvers take ragged lists, so a
    format that fits only some layers (k-quants on rows of 256) is a choice for those alone."""
    held = [[j for j, e in enumerate(es) if e < math.inf] for es in errors]
    picks = solver(
        [[cs[j] for j in ok] for cs, ok in zip(costs, held, strict=True)],
        [[es[j] for j in ok] for es, ok in zip(errors, held, strict=True)],
        budget,
    )
    return [ok[k] for ok, k in zip(held, picks, strict=True)]


def upgrade_choice(
    costs: list[list[int]],
    errors: list[list[float]],
    budget: int,
    extra: list[int] | None = None,
    trust: float = UPGRADE_TRUST,
    fade: bool = UPGRADE_FADE,
    widths: list[int] | None = None,
) -> list[int]:
    """The uniform candidate that fits with the least summed error, then the knapsack over the
    bits it leaves, each layer limited to candidates whose measured error is at most `trust`
    times the uniform one's there. The limit keeps every layer near the uniform plan, where the
    additive proxy holds: a cheap layer's large extra error hurts more downstream than measured,
    which made free mixed plans lose to uniform int4 near 4.25 bpw. With `trust` = 1 no layer
    gets worse than under the uniform plan, and at a uniform format's own size the plan is that
    format; above 1 a layer may step down a little (coarser groups) to pay for another's step up.

    `fade` removes the cliff where a uniform format starts to fit: just below its size the plan
    is the cheaper base's plus upgrades (smollm2 at 3.1608 bpw: KLD 0.582), at its size the
    format itself (0.622). With `fade`, a layer may still fall to its error under that cheaper
    base, at a price that rises from the measured error at the format's size to infinity one
    base-to-base gap above it (`knapsack_errors`), so the plan's proxy changes continuously with
    the budget. A cheaper base of the same bit width (`widths[j]`: shared candidate j's) is kept
    open one base-to-base gap; one of another width only until the next uniform candidate fits
    (`fade_window`).

    `extra[i]` leading candidates of item i (a table's float option) are not formats shared by
    every item: they take no part in choosing the uniform base, but stay open if no worse.
    A candidate some item cannot hold (error inf) cannot be the base; it stays open to the
    items that can hold it."""
    items = list(zip(costs, errors, extra or [0] * len(costs), strict=True))
    shared = {len(c) - x for c, _, x in items}
    if len(shared) > 1:
        raise BudgetError("the upgrade allocator needs the same candidates for every layer")

    def uniform(j: int) -> tuple[int, float]:
        """Total cost and summed error with shared candidate j everywhere (inf: not everywhere held)."""
        error = sum(e[j + x] for _, e, x in items)
        return (sum(c[j + x] for c, _, x in items) if error < math.inf else math.inf), error

    totals = {j: uniform(j) for j in range(max(shared, default=0))}
    fitting = [j for j, (cost, _) in totals.items() if cost <= budget]
    if not fitting:  # no single format fits everywhere: fall back to the free knapsack
        return held_solve(solve_mckp, costs, errors, budget)
    priced = knapsack_errors(items, totals, fitting, budget, trust, fade, widths)
    allowed = [[j for j, e in enumerate(es) if e < math.inf] for es in priced]
    picks = solve_mckp(
        [[c[j] for j in ok] for c, ok in zip(costs, allowed, strict=True)],
        [[e[j] for j in ok] for e, ok in zip(priced, allowed, strict=True)],
        budget,
    )
    return [ok[k] for ok, k in zip(allowed, picks, strict=True)]


def knapsack_errors(
    items: list[tuple[list[int], list[float], int]],
    totals: dict[int, tuple[float, float]],
    fitting: list[int],
    budget: int,
    trust: float,
    fade: bool,
    widths: list[int] | None = None,
) -> list[list[float]]:
    """The errors the upgrade allocator's knapsack sees: a candidate's measured error up to
    `trust` times the item's error under the base (the fitting uniform candidate with the least
    summed error), inf above. With `fade` and a previous base (the one the plan had just below
    the base's size): up to `trust` times the item's error under the previous base too, the part
    above the free level counted 1/t times, t falling from 1 at the base's own size to 0 one
    window above it (`fade_window`)."""

    base = best_base(totals, fitting)
    free = [trust * e[base + x] for _, e, x in items]
    t, previous = 0.0, None
    if fade and widths:
        previous, window = fade_window(totals, fitting, base, widths)
        if previous is not None:
            t = max(0.0, 1.0 - (budget - totals[base][0]) / window)
    if t == 0.0:
        return [[v if v <= top else math.inf for v in e] for (_, e, _), top in zip(items, free, strict=True)]
    priced = []
    for (_, e, x), top in zip(items, free, strict=True):
        reach = trust * e[previous + x]
        priced.append([v if v <= top else top + (v - top) / t if v <= reach else math.inf for v in e])
    return priced


def best_base(totals: dict[int, tuple[float, float]], js: list[int]) -> int:
    """Of uniform candidates `js`, the one with the least summed error (of equals, the dearer)."""
    return min(js, key=lambda j: (totals[j][1], -totals[j][0]))


def fade_window(
    totals: dict[int, tuple[float, float]], fitting: list[int], base: int, widths: list[int]
) -> tuple[int | None, float]:
    """The previous base the fade keeps open above `base`'s size, and over how many bits it fades.

    Of the base's own width (`widths[j]`: shared candidate j's bits), the best cheaper uniform
    candidate, over the whole base-to-previous gap: coarser groups cost end to end about what the
    proxy says. When the base is the first of its width to fit, the best cheaper one of any width
    (the plan just below used it; without it the plan would jump from that mix to the bare new
    width, smollm2 at int3 g256's 3.093 bpw), but only until the next dearer uniform candidate
    fits: a bit less costs more downstream than the proxy says (a 3.156 bpw plan with 21 int2
    layers lost to uniform int3 g128), so it is not kept open a whole gap of half a bit."""

    cost = totals[base][0]
    cheaper = [j for j in fitting if totals[j][0] < cost]
    same = [j for j in cheaper if widths[j] == widths[base]]
    if same:
        previous = best_base(totals, same)
        return previous, cost - totals[previous][0]
    if not cheaper:
        return None, 0.0
    previous = best_base(totals, cheaper)
    gap = cost - totals[previous][0]
    dearer = [c for c, _ in totals.values() if cost < c < math.inf]
    return previous, min(gap, min(dearer) - cost) if dearer else gap


def starting_plans(
    measurements: Measurements, plan: Allocation, weighting: str, uniform: int = 2
) -> dict[str, dict[str, int]]:
    """Plans for the same layers and budget that a refinement may start from, by label: `plan`
    itself, the knapsack plans under every error weighting, BAQ's, the upgrade plan, and the `uniform` dearest
    uniform formats that fit. Near 4 bits a uniform grid can beat every proxy-optimal mix
    (BENCHMARKS.md), so a search scored by measured KL must be able to start there."""
    free = list(plan.choice)
    reserved_numel = plan.total_numel - sum(measurements.layers[n]["numel"] for n in free)
    starts = {f"{plan.allocator}/{weighting}": dict(plan.choice)}
    others = [("knapsack", w) for w in measurements.weightings()] + [("baq", weighting), ("upgrade", weighting)]
    for allocator, w in others:
        label = f"{allocator}/{w}"
        if label not in starts:
            other = plan_for_budget(
                measurements,
                plan.budget_bpw,
                allocator,
                free,
                plan.reserved_bits,
                reserved_numel,
                weighting=w,
                costs=plan.costs,
                budget_bits=plan.budget_bits,
                trust=plan.trust,
                fade=plan.fade,
            )
            starts[label] = other.choice
    n_cands = len(measurements.candidates)
    held = [j for j in range(n_cands) if all(measurements.layers[n]["errors"][j] is not None for n in free)]
    spent = {j: sum(plan.costs[n][j] for n in free) for j in held}
    fits = sorted((j for j in held if spent[j] <= plan.budget_bits), key=spent.get)
    for j in fits[-uniform:] if uniform else []:
        starts[f"uniform {format_from_dict(measurements.candidates[j]).name}"] = dict.fromkeys(free, j)
    return starts
