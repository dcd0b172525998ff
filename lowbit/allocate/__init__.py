"""Turning a size budget into a per-layer plan: exact knapsack, BAQ's closed form."""

from lowbit.allocate.baq import baq_bits, baq_plan
from lowbit.allocate.knapsack import solve_mckp

__all__ = ["baq_bits", "baq_plan", "solve_mckp"]
