"""From a budget to a plan: measurement, exact knapsack, BAQ's closed form, refinement by KL."""

from lowbit.allocate.baq import baq_bits, baq_plan
from lowbit.allocate.knapsack import solve_mckp
from lowbit.allocate.plan import Plan, Targets, allocate, find_targets
from lowbit.allocate.planner import Allocation, plan_for_budget
from lowbit.allocate.sensitivity import Measurements, measure

__all__ = [
    "Allocation",
    "Measurements",
    "Plan",
    "Targets",
    "allocate",
    "baq_bits",
    "baq_plan",
    "find_targets",
    "measure",
    "plan_for_budget",
    "solve_mckp",
]
