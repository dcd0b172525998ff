"""Turning a size budget into a per-layer plan: measurement, exact knapsack, BAQ's closed form."""

from lowbit.allocate.baq import baq_bits, baq_plan
from lowbit.allocate.knapsack import solve_mckp
from lowbit.allocate.planner import ALLOCATORS, Plan, plan_for_budget
from lowbit.allocate.sensitivity import Measurements, default_candidates, measure

__all__ = [
    "ALLOCATORS",
    "Measurements",
    "Plan",
    "baq_bits",
    "baq_plan",
    "default_candidates",
    "measure",
    "plan_for_budget",
    "solve_mckp",
]
