"""Byte budgets (`--size 70MB`): what the exported weights file will weigh, exactly.

A size budget covers the whole weights file (model.safetensors): the quantized linears,
every tensor left in float (norms, biases) and the file's header. The token embedding and
the output head (lowbit.tables) are candidates too: kept in float or packed like a linear.
What stays in float is fixed, so the budget left for the rest is known before planning, and
the planner compares candidates by their exact packed bytes (int32 words per row, fp16
scales, packed zeros) rather than by their nominal bits.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lowbit.errors import BudgetError, LowbitError
from lowbit.formats import Format
from lowbit.runtime import QuantizedLinear  # the runtime layer is what gets written
from lowbit.tables import Table

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
# safetensors header: 8 bytes of length, then JSON of ~60-110 bytes per tensor; generous on purpose
_HEADER_BYTES_PER_TENSOR = 160
_HEADER_BYTES_BASE = 256


def parse_size(text: str) -> int:
    """'70MB' (10^6), '64MiB' (2^20), '1.5GB', '123456' (bytes) -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMG]i?B|B)?\s*", text, flags=re.IGNORECASE)
    if m is None:
        raise LowbitError(f"--size must be a byte count with an optional unit (KB, MB, GB, MiB, GiB), got {text!r}")
    value = float(m.group(1)) * _UNITS[(m.group(2) or "").upper()]
    if value <= 0:
        raise LowbitError(f"--size must be positive, got {text!r}")
    return int(value)


def format_size(n: int) -> str:
    """Bytes as MB with enough digits that rounding up never crosses a budget."""
    return f"{math.ceil(n / 1e4) / 100:.2f}MB"


def layer_bytes(fmt: Format, out_features: int, in_features: int) -> int:
    """Bytes the packed tensors of one quantized linear take (bias not included: it is fixed)."""
    layer = QuantizedLinear(in_features, out_features, fmt, bias=False, device="meta")
    return sum(b.numel() * b.element_size() for b in layer.buffers())


def fixed_bytes(model: nn.Module, quantized: set[str], storage_dtype: torch.dtype) -> tuple[int, int]:
    """(bytes, tensor count) of everything the weights file holds besides the quantized linears'
    codes: float parameters in the storage dtype, buffers as they are, tied tensors once."""
    params = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    seen: set[int] = set()
    total = tensors = 0
    for name, t in model.state_dict(keep_vars=True).items():
        if name.endswith(".weight") and name[: -len(".weight")] in quantized:
            continue
        # meta tensors (a lazy model's blocks) all have data_ptr 0: tell them apart by identity
        key = t.data_ptr() if t.numel() and not t.is_meta else id(t)
        if key in seen:
            continue
        seen.add(key)
        size = storage_dtype.itemsize if name in params and t.is_floating_point() else t.element_size()
        total += t.numel() * size
        tensors += 1
    return total, tensors


def header_allowance(tensors: int) -> int:
    return _HEADER_BYTES_BASE + _HEADER_BYTES_PER_TENSOR * tensors


@dataclass
class SizeBudget:
    """A byte budget turned into bits for the planned linears, with their exact packed costs."""

    size_bytes: int
    fixed_bytes: int  # float tensors, pinned layers, header allowance
    linear_bits: int  # what the free linears (and the tables) may spend
    costs: dict[str, list[int]]  # free layer -> 8 x packed bytes of each candidate
    # table -> 8 x bytes of [float, each candidate]; empty when the tables stay in float
    table_costs: dict[str, list[int]] = field(default_factory=dict)
    tables: list[Table] = field(default_factory=list)

    def record(self, choice: dict[str, int], tables: dict[str, int] | None = None) -> dict[str, Any]:
        """The manifest's account of the budget for a chosen plan (`tables`: index into
        table_costs, 0 = float)."""
        bits = sum(self.costs[n][j] for n, j in choice.items())
        bits += sum(self.table_costs[n][j] for n, j in (tables or {}).items())
        return {
            "size_bytes": self.size_bytes,
            "fixed_bytes": self.fixed_bytes,
            "planned_bytes": self.fixed_bytes + bits // 8,
        }


def size_budget(
    model: nn.Module,
    shapes: dict[str, tuple[int, int]],
    pinned: dict[str, Format | None],
    candidates: list[Format],
    size_bytes: int,
    storage_dtype: torch.dtype,
    tables: list[Table] = (),
    unfit: dict[str, set[int]] | None = None,
) -> SizeBudget:
    """What is left of `size_bytes` for the linears not pinned and the `tables`; refuses a size
    below the cheapest plan before any slow work, naming the smallest size that works. A
    candidate a layer or table cannot hold (`unfit`: name -> candidate indices) costs None there."""
    unfit = unfit or {}

    def cost(name: str, j: int, fmt: Format, shape: tuple[int, int]) -> int | None:
        return None if j in unfit.get(name, ()) else 8 * layer_bytes(fmt, *shape)

    quantized = {n for n in shapes if pinned.get(n, True) is not None}
    table_names = {t.name for t in tables} | {t.tied_head for t in tables if t.tied_head}
    fixed, tensors = fixed_bytes(model, quantized | table_names, storage_dtype)
    fixed += sum(layer_bytes(f, *shapes[n]) for n, f in pinned.items() if f is not None)
    fixed += header_allowance(tensors + 3 * (len(quantized) + len(table_names)))  # qweight, scales, qzeros
    costs = {n: [cost(n, j, c, s) for j, c in enumerate(candidates)] for n, s in shapes.items() if n not in pinned}
    table_costs = {
        t.name: [8 * t.shape[0] * t.shape[1] * storage_dtype.itemsize]
        + [cost(t.name, j, c, t.shape) for j, c in enumerate(candidates)]
        for t in tables
    }
    floor = sum(min(x for x in c if x is not None) for c in [*costs.values(), *table_costs.values()]) // 8
    if size_bytes - fixed < floor:
        smallest = fixed + floor
        raise BudgetError(
            f"a size of {size_bytes / 1e6:.2f} MB is below the smallest weights file the candidates allow "
            f"({smallest / 1e6:.2f} MB, of which {fixed / 1e6:.2f} MB stays in float or is pinned); "
            f"use --size {format_size(smallest)} or more, or add cheaper candidates"
        )
    return SizeBudget(size_bytes, fixed, 8 * (size_bytes - fixed), costs, table_costs, list(tables))
