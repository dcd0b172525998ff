"""Exact multiple-choice knapsack: one candidate per layer, least summed error, cost within budget.

Solved as a 0/1 integer program with scipy's HiGHS (`scipy.optimize.milp`); at a few
hundred layers and a dozen candidates it takes well under a second. The budget is
checked again in exact integer arithmetic afterwards, so solver tolerances can never
push the plan over it.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
from collections.abc import Iterator, Sequence

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

from lowbit.errors import BudgetError


@contextlib.contextmanager
def _native_stdout_silenced() -> Iterator[None]:
    """HiGHS's MIP solver printf()s a debug line even with output off (a known HiGHS bug);
    point file descriptor 1 at /dev/null around the solve so it never reaches the user."""
    try:
        saved = os.dup(1)
    except OSError:  # no usable stdout descriptor: nothing to protect
        yield
        return
    try:
        libc = ctypes.CDLL(None)
    except OSError:  # no C runtime handle (Windows): the fd swap alone still hides it
        libc = None
    sys.stdout.flush()
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 1)
    try:
        yield
    finally:
        if libc is not None:
            libc.fflush(None)  # C buffers still holding the line go to /dev/null, not the terminal
        os.dup2(saved, 1)
        os.close(saved)


def min_cost(costs: Sequence[Sequence[int]]) -> int:
    return sum(min(c) for c in costs)


def solve_mckp(costs: Sequence[Sequence[int]], errors: Sequence[Sequence[float]], budget: int) -> list[int]:
    """Index of the chosen candidate for every item.

    costs[i][j]: integer cost (bits) of candidate j for item i; errors[i][j]: its error.
    Raises BudgetError naming the smallest feasible budget when none fits.
    """
    if len(costs) != len(errors) or any(len(c) != len(e) for c, e in zip(costs, errors, strict=True)):
        raise ValueError("costs and errors must have the same shape")
    floor = min_cost(costs)
    if floor > budget:
        raise BudgetError(f"budget of {budget} bits is below the cheapest plan ({floor} bits)")
    sizes = [len(c) for c in costs]
    n = sum(sizes)
    offsets = np.cumsum([0, *sizes])
    cost = np.array([float(x) for c in costs for x in c])
    err = np.array([float(x) for e in errors for x in e])
    scale = max(cost.max(), 1.0)  # keep the budget row well conditioned
    one_each = np.zeros((len(sizes), n))
    for i, (a, b) in enumerate(zip(offsets[:-1], offsets[1:], strict=True)):
        one_each[i, a:b] = 1.0
    limit = float(budget)
    for _ in range(8):
        constraints = [
            LinearConstraint(one_each, 1.0, 1.0),
            LinearConstraint((cost / scale)[None, :], -np.inf, limit / scale),
        ]
        with _native_stdout_silenced():
            res = milp(
                c=err,
                constraints=constraints,
                integrality=np.ones(n),
                bounds=Bounds(0, 1),
                options={"mip_rel_gap": 0.0},
            )
        if res.x is None:
            raise BudgetError(f"no plan fits {budget} bits ({res.message})")
        choice = [int(np.argmax(res.x[a:b])) for a, b in zip(offsets[:-1], offsets[1:], strict=True)]
        total = sum(int(costs[i][j]) for i, j in enumerate(choice))
        if total <= budget:
            return choice
        limit -= total - budget  # a tolerance overshoot: tighten by it and solve again
    raise BudgetError(f"could not fit {budget} bits exactly; raise the budget slightly")
