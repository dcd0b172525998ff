"""Refining a plan by whole-model KL divergence: an evolutionary search under the budget.

The knapsack plan is optimal for the summed layer errors, but those only approximate
what matters, the model's output distribution. EvoPress-style refinement measures
that directly: every layer's Pareto-optimal candidates are solved once (the bank),
a plan is scored by swapping those weights into the float model and computing the KL
divergence to the float model on a few held-out windows, and a (1 + λ) search
mutates the best plan (one layer a step up its front, others a step down until the
plan fits again), keeping an offspring only when it is measurably better. Offspring
are first scored on one window; only the best few are scored on all of them
(multi-fidelity selection), which is what makes the search affordable.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from scipy.stats import spearmanr
from torch import nn
from tqdm.auto import tqdm
from transformers.pytorch_utils import Conv1D

from lowbit.allocate.planner import Allocation, starting_plans
from lowbit.allocate.sensitivity import Measurements
from lowbit.errors import BudgetError
from lowbit.eval.metrics import evaluate_windows
from lowbit.eval.reference import build_reference


class PlanEvaluator:
    """KL divergence of the float model with some layers' weights swapped for quantized ones."""

    def __init__(self, model: nn.Module, bank: dict[str, dict[int, torch.Tensor]], windows: torch.Tensor) -> None:
        self.model, self.bank, self.windows = model, bank, windows
        self.modules = {name: model.get_submodule(name) for name in bank}
        self.original = {name: m.weight.data.clone() for name, m in self.modules.items()}
        self.loaded: dict[str, int | None] = dict.fromkeys(bank)
        self.reference = build_reference(model, windows, batch_size=1, progress=False)
        self.evaluations = 0
        self._scores: dict[tuple, float] = {}  # the same plan is never scored twice

    def load(self, choice: dict[str, int]) -> None:
        """Swap in the plan's weights (only the layers whose choice changed since the last call)."""
        for name, j in choice.items():
            if self.loaded[name] == j:
                continue
            mod = self.modules[name]
            w = self.bank[name][j].to(mod.weight.dtype)
            mod.weight.data = (w.t() if isinstance(mod, Conv1D) else w).contiguous()
            self.loaded[name] = j

    @torch.no_grad()
    def kl(self, choice: dict[str, int], windows: int | None = None) -> float:
        """Mean per-token KL(float || plan) on the first `windows` held-out windows (all by default)."""
        n = windows or len(self.windows)
        key = (n, tuple(sorted(choice.items())))
        if key in self._scores:
            return self._scores[key]
        self.load(choice)
        ref = self.reference
        if n < len(self.windows):
            ref = type(ref)(ref.hidden[:n], ref.head_weight, ref.head_bias, ref.softcap)
        self.evaluations += 1
        kl = evaluate_windows(self.model, self.windows[:n], ref, batch_size=1, progress=False)["kld"]
        self._scores[key] = kl
        return kl

    def restore(self) -> None:
        """Put the float weights back (the pipeline quantizes the float model afterwards)."""
        for name, mod in self.modules.items():
            mod.weight.data = self.original[name]
            self.loaded[name] = None


@dataclass
class Refinement:
    choice: dict[str, int]
    start_kl: float
    final_kl: float
    generations: int
    evaluations: int
    seconds: float
    scored: list[tuple[float, float]] = field(default_factory=list)  # (proxy, KL on all windows) per plan
    history: list[dict[str, int]] = field(default_factory=list)  # the plans in `scored`, in order
    starts: dict[str, float] = field(default_factory=dict)  # candidate starting plans -> held-out KL
    start: str = ""  # the one the search started from

    def rank_correlation(self) -> float | None:
        """Spearman correlation between the proxy (summed weighted errors) and measured KL."""
        if len(self.scored) < 3:
            return None
        rho = spearmanr([p for p, _ in self.scored], [k for _, k in self.scored]).statistic
        return float(rho)

    def to_dict(self) -> dict:
        return {
            "start_kl": self.start_kl,
            "final_kl": self.final_kl,
            "generations": self.generations,
            "evaluations": self.evaluations,
            "seconds": self.seconds,
            "plans_scored": len(self.scored),
            "proxy_rank_correlation": self.rank_correlation(),
            "starts": self.starts,
            "start": self.start,
        }


def _best_within(front: list[int], costs: Sequence[int], limit: int) -> int:
    fits = [j for j in front if costs[j] <= limit]
    if not fits:
        raise BudgetError("the starting plan uses a candidate cheaper than every candidate in the bank")
    return fits[-1]


def _mutate(
    choice: dict[str, int],
    fronts: dict[str, list[int]],
    costs: dict[str, Sequence[int]],
    budget: int,
    rng: random.Random,
    steps: int,
) -> dict[str, int] | None:
    """`steps` layers one step up their front, then random layers down until the plan fits."""
    child = dict(choice)
    names = list(fronts)
    pos = {n: fronts[n].index(child[n]) for n in names}
    raised = set()
    for _ in range(steps):
        up = [n for n in names if pos[n] + 1 < len(fronts[n])]
        if not up:
            break
        n = rng.choice(up)
        pos[n] += 1
        raised.add(n)
    spent = sum(costs[n][fronts[n][pos[n]]] for n in names)
    while spent > budget:
        down = [n for n in names if pos[n] > 0 and n not in raised]
        if not down:
            return None
        n = rng.choice(down)
        spent -= costs[n][fronts[n][pos[n]]] - costs[n][fronts[n][pos[n] - 1]]
        pos[n] -= 1
    child = {n: fronts[n][pos[n]] for n in names}
    return None if child == choice else child


def _onto_fronts(
    choice: dict[str, int], bank: dict[str, dict], fronts: dict[str, list[int]], costs: dict[str, Sequence[int]]
) -> dict[str, int]:
    """A dominated candidate (BAQ's rounding or a uniform plan can pick one) moves to the best
    front candidate that costs no more."""
    return {n: j if j in bank[n] else _best_within(fronts[n], costs[n], costs[n][j]) for n, j in choice.items()}


def evolve(
    evaluator: PlanEvaluator,
    start: dict[str, int] | dict[str, dict[str, int]],
    costs: dict[str, Sequence[int]],
    proxy: dict[str, Sequence[float]],
    budget: int,
    time_limit: float = 300.0,
    generations: int | None = None,
    offspring: int = 8,
    survivors: int = 2,
    seed: int = 0,
    progress: bool = True,
) -> Refinement:
    """Improve a plan (layer -> candidate index) within `budget` bits for the layers given.

    `start` is one plan or several by label (e.g. the knapsack plan and the uniform plans
    that fit): each is scored on all held-out windows and the search starts from the best,
    so the result is never worse on them than any start. Each layer moves along its own bank
    (cheapest to dearest), which should be its Pareto front."""
    t0 = time.perf_counter()
    starts = start if isinstance(next(iter(start.values())), dict) else {"start": start}
    first = next(iter(starts.values()))
    fronts = {n: sorted(evaluator.bank[n], key=lambda j: costs[n][j]) for n in first}
    starts = {label: _onto_fronts(c, evaluator.bank, fronts, costs) for label, c in starts.items()}
    for label, c in starts.items():
        if sum(costs[n][j] for n, j in c.items()) > budget:
            raise BudgetError(f"the starting plan {label!r} is over the budget")
    rng = random.Random(seed)

    def proxy_of(choice: dict[str, int]) -> float:
        return sum(proxy[n][j] for n, j in choice.items())

    start_kls = {label: evaluator.kl(c) for label, c in starts.items()}
    label = min(start_kls, key=start_kls.get)
    best, best_kl = dict(starts[label]), start_kls[label]
    result = Refinement(best, best_kl, best_kl, 0, 1, 0.0)
    result.scored = [(proxy_of(c), start_kls[k]) for k, c in starts.items()]
    result.history = [dict(c) for c in starts.values()]
    result.starts, result.start = start_kls, label
    bar = tqdm(desc="refining plan", unit="gen", disable=not progress, total=generations)
    gen = 0
    while (generations is None or gen < generations) and time.perf_counter() - t0 < time_limit:
        gen += 1
        children = []
        for _ in range(offspring * 4):  # mutations that cannot fit are retried
            child = _mutate(best, fronts, costs, budget, rng, steps=rng.choice((1, 1, 2, 3)))
            if child is not None and child not in children:
                children.append(child)
            if len(children) == offspring:
                break
        if not children:
            break
        quick = sorted(children, key=lambda c: evaluator.kl(c, windows=1))[:survivors]
        for child in quick:
            kl = evaluator.kl(child)
            result.scored.append((proxy_of(child), kl))
            result.history.append(child)
            if kl < best_kl:
                best, best_kl = child, kl
        bar.update(1)
        bar.set_postfix(kl=f"{best_kl:.4f}")
    bar.close()
    evaluator.restore()
    result.choice, result.final_kl, result.generations = best, best_kl, gen
    result.evaluations, result.seconds = evaluator.evaluations, time.perf_counter() - t0
    return result


def refine(
    model: nn.Module,
    measurements: Measurements,
    allocation: Allocation,
    held_out: torch.Tensor,
    weighting: str,
    seconds: float,
    progress: bool = True,
) -> Refinement:
    """Evolve `allocation` (planner.Allocation) within its own budget for `seconds`, from the
    best-scoring of several starting plans (planner.starting_plans), on the `held_out` windows.
    The model holds its float weights again afterwards, and the bank is released."""
    free = list(allocation.choice)
    evaluator = PlanEvaluator(model, {n: measurements.bank[n] for n in free}, held_out)
    try:
        return evolve(
            evaluator,
            starting_plans(measurements, allocation, weighting),
            costs=allocation.costs,
            proxy={n: measurements.weighted_errors(n, weighting) for n in free},
            budget=allocation.budget_bits,
            time_limit=seconds,
            progress=progress,
        )
    finally:
        evaluator.restore()
        measurements.bank = None
