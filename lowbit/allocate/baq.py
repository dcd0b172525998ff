"""BAQ's closed-form bit allocation (papers.md): with a layer loss modelled as
L_i(b) = c_i · 2^(-2b) and a budget on the parameter-weighted mean of b, the Lagrangian
optimum gives every layer the same marginal loss per bit, i.e.

    b_i = b̄' + ½·log2(c_i / n_i) - ½·mean_n(log2(c / n))

clamped to [b_min, b_max] by water-filling (clamp, re-solve on the free layers).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from lowbit.errors import BudgetError


def baq_bits(
    sensitivity: Sequence[float], numel: Sequence[int], mean_bits: float, b_min: float, b_max: float
) -> np.ndarray:
    """Continuous bits per layer whose numel-weighted mean is `mean_bits`."""
    c = np.maximum(np.asarray(sensitivity, dtype=np.float64), 1e-300)
    n = np.asarray(numel, dtype=np.float64)
    if not b_min <= mean_bits <= b_max:
        raise BudgetError(f"mean of {mean_bits} bits is outside [{b_min}, {b_max}]")
    score = 0.5 * np.log2(c / n)
    bits = np.full(len(c), np.nan)
    free = np.ones(len(c), dtype=bool)
    for _ in range(len(c) + 1):
        fixed_bits = np.nansum(np.where(free, 0.0, bits) * n)
        target = (mean_bits * n.sum() - fixed_bits) / n[free].sum()
        shift = target - np.average(score[free], weights=n[free])
        trial = score + shift
        low, high = free & (trial < b_min), free & (trial > b_max)
        if not low.any() and not high.any():
            bits[free] = trial[free]
            return bits
        # clamp only the side that is violated most; the other may become free again
        if low.any():
            bits[low], free[low] = b_min, False
        if high.any():
            bits[high], free[high] = b_max, False
        if not free.any():
            return bits
    return bits


def baq_plan(
    sensitivity: Sequence[float],
    numel: Sequence[int],
    levels: Sequence[Sequence[float]],
    costs: Sequence[Sequence[int]],
    budget: int,
) -> list[int]:
    """Round BAQ's continuous bits to each layer's candidates (given their bpw `levels`
    and integer `costs`) without exceeding `budget`: start from the nearest level not
    above the target, then spend what is left on the upgrades that buy the most target
    closeness per bit."""
    total_numel = float(sum(numel))
    lo = min(min(lv) for lv in levels)
    hi = max(max(lv) for lv in levels)
    mean = min(max(budget / total_numel, lo), hi)
    target = baq_bits(sensitivity, numel, mean, lo, hi)
    choice = []
    for t, lv in zip(target, levels, strict=True):
        below = [j for j, b in enumerate(lv) if b <= t + 1e-9]
        choice.append(max(below, key=lambda j: lv[j]) if below else int(np.argmin(lv)))
    spent = sum(costs[i][j] for i, j in enumerate(choice))
    if spent > budget:
        raise BudgetError(f"budget of {budget} bits is below the cheapest plan ({spent} bits)")
    while True:  # greedy upgrades by sensitivity-weighted gain per extra bit
        best, best_gain = None, 0.0
        for i, j in enumerate(choice):
            for k, b in enumerate(levels[i]):
                extra = costs[i][k] - costs[i][j]
                if b <= levels[i][j] or extra <= 0 or spent + extra > budget:
                    continue
                gain = sensitivity[i] * (2.0 ** (-2 * levels[i][j]) - 2.0 ** (-2 * b)) / extra
                if gain > best_gain:
                    best, best_gain = (i, k, extra), gain
        if best is None:
            return choice
        i, k, extra = best
        choice[i] = k
        spent += extra
