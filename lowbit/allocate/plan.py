"""The plan: which format every quantizable tensor of a model gets, and how it was chosen.

`find_targets` reads from a model and a recipe what can be quantized and what the user pinned,
and refuses an impossible budget before any slow work. `allocate` turns the targets, the recipe
and (for a budget) the measurements into a `Plan`: layer name -> format, or None for a tensor
kept in floating point, for the decoder linears and the embedding/head tables alike. A uniform
recipe gives the trivial plan. The plan is stored in the manifest and printed; execution
(lowbit.execute) reads nothing else.
"""

from __future__ import annotations

import fnmatch
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lowbit.allocate.evolve import refine
from lowbit.allocate.kl_probe import probe_tables
from lowbit.allocate.knapsack import solve_mckp
from lowbit.allocate.planner import check_feasible, plan_for_budget, upgrade_choice
from lowbit.allocate.sensitivity import Measurements
from lowbit.allocate.size import SizeBudget, size_budget
from lowbit.dtypes import DTYPES
from lowbit.errors import FormatError, LowbitError
from lowbit.formats import Format, format_from_dict
from lowbit.keep import KeepRule, apply_rules
from lowbit.models.adapters import ArchAdapter, decoder_blocks, linear_weight, quantizable_linears
from lowbit.recipe import Recipe
from lowbit.tables import Table, find_tables
from lowbit.targets import target_named


@dataclass(frozen=True)
class Plan:
    """Layer name -> format (None: kept in floating point), and the budget's account when a
    budget chose it (None for a uniform recipe)."""

    formats: dict[str, Format | None]
    budget: dict[str, Any] | None = None

    @property
    def quantized(self) -> dict[str, Format]:
        return {n: f for n, f in self.formats.items() if f is not None}

    def format_counts(self) -> dict[str, int]:
        """How many tensors got each format, by format name."""
        counts: dict[str, int] = {}
        for f in self.quantized.values():
            counts[f.name] = counts.get(f.name, 0) + 1
        return dict(sorted(counts.items()))

    def to_dict(self) -> dict[str, Any]:
        return {
            "formats": {n: None if f is None else f.to_dict() for n, f in self.formats.items()},
            "budget": self.budget,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Plan:
        formats = {n: None if f is None else format_from_dict(f) for n, f in d["formats"].items()}
        return cls(formats, d.get("budget"))


@dataclass
class Targets:
    """What a recipe may quantize in a model."""

    linears: dict[str, tuple[int, int]]  # decoder-block linears, in execution order -> [out, in]
    pinned: dict[str, Format | None]  # by keep rules: a format, or None for floating point
    tables: list[Table] = field(default_factory=list)  # embedding/head as size-budget candidates
    size: SizeBudget | None = None  # a size budget's fixed bytes and exact candidate costs
    candidates: list[Format] = field(default_factory=list)  # a budget's candidates that fit every free layer
    dropped: dict[str, str] = field(default_factory=dict)  # candidate name -> the first free layer it cannot hold
    tied: list[tuple[str, ...]] = field(default_factory=list)  # linears that must share one format (vLLM's fusion)


def find_targets(model: nn.Module, adapter: ArchAdapter, recipe: Recipe) -> Targets:
    """The quantizable layers and the pins; an infeasible budget is refused here, naming the
    smallest feasible one, before anything slow runs."""
    shapes = {n: tuple(linear_weight(m).shape) for n, m in quantizable_linears(model, adapter)}
    pinned = apply_rules(list(shapes), list(recipe.keep), [n for n, _ in model.named_modules()])
    targets = Targets(shapes, pinned)
    budget = recipe.budget
    if budget is not None:
        targets.candidates = list(budget.candidates)
    if recipe.target is not None:  # every layer that will be quantized must split into its format's blocks
        target = target_named(recipe.target)
        if budget is not None:  # a candidate some free layer cannot hold is dropped (k-quants: rows of 256)
            free_rows = {n: i for n, (_, i) in shapes.items() if n not in pinned}
            for fmt in budget.candidates:
                bad = next((n for n, i in free_rows.items() if i % target.row_multiple(fmt)), None)
                if bad is not None:
                    targets.dropped[target.label(fmt, short=True)] = bad
            targets.candidates = [f for f in budget.candidates if target.label(f, short=True) not in targets.dropped]
            if not targets.candidates:
                first = next(iter(targets.dropped.values()))
                raise FormatError(f"no budget candidate fits every layer ({first} among them); keep it in float")
        if target.fused_inputs:
            targets.tied = _fused_groups(model, adapter, pinned, target.name)
            if budget is not None and budget.refine_seconds > 0:
                raise LowbitError(
                    f"--refine cannot keep fused layers (q/k/v, gate/up) in one format yet, which --target "
                    f"{target.name} needs; drop --refine"
                )
        free = [recipe.format] if budget is None else targets.candidates
        for name, (_, in_features) in shapes.items():
            pin = pinned.get(name, "free")
            for fmt in free if pin == "free" else [pin] if pin is not None else []:
                target.check_shape(name, in_features, fmt)
    if budget is None:
        return targets
    cands = targets.candidates
    if budget.bpw is not None:
        free = [s for n, s in shapes.items() if n not in pinned]
        fixed = [(f.storage_bits(*shapes[n]), shapes[n][0] * shapes[n][1]) for n, f in pinned.items() if f]
        check_feasible(free, cands, budget.bpw, sum(r[0] for r in fixed), sum(r[1] for r in fixed))
    else:
        targets.tables = [t for t in find_tables(model) if not _kept_in_float(t, recipe.keep)]
        if recipe.target is not None:  # a table whose rows do not split into blocks stays in float
            target = target_named(recipe.target)
            row = max(target.row_multiple(f) for f in cands)
            targets.tables = [t for t in targets.tables if t.shape[1] % row == 0 and target.quantizes_tables]
        storage = DTYPES[recipe.storage_dtype]
        targets.size = size_budget(model, shapes, pinned, cands, budget.size_bytes, storage, targets.tables)
    return targets


def _fused_groups(model: nn.Module, adapter: ArchAdapter, pinned: dict, target: str) -> list[tuple[str, ...]]:
    """Every block's linears that read one input (q/k/v, gate/up): engines such as vLLM fuse
    them into one matrix with one scheme. Refuses keep rules that pin such a group apart."""
    groups = []
    for i in range(len(decoder_blocks(model, adapter))):
        for group in adapter.linear_groups:
            if len(group) < 2:
                continue
            names = tuple(f"{adapter.blocks}.{i}.{n}" for n in group)
            pins = {pinned.get(n, "free") for n in names}
            if len(pins) > 1:
                shown = ", ".join(f"{n.rsplit('.', 1)[-1]}: {_pin_label(pinned.get(n, 'free'))}" for n in names)
                raise FormatError(
                    f"--target {target} needs {', '.join(n.rsplit('.', 1)[-1] for n in names)} of block {i} in one "
                    f"format (vLLM fuses them), but the keep rules give {shown}; pin all of them or none"
                )
            groups.append(names)
    return groups


def _pin_label(pin) -> str:
    return "planned" if pin == "free" else "float" if pin is None else pin.name


def _kept_in_float(table: Table, rules: tuple[KeepRule, ...]) -> bool:
    """`--keep lm_head` (no format) keeps a table, or the embedding tied to that head, in float."""
    names = [table.name] + ([table.tied_head] if table.tied_head else [])
    return any(r.fmt is None and fnmatch.filter(names, r.pattern) for r in rules)


def allocate(
    model: nn.Module,
    recipe: Recipe,
    targets: Targets,
    measurements: Measurements | None = None,
    windows: torch.Tensor | None = None,
    held_out: torch.Tensor | None = None,
    progress: bool = True,
) -> Plan:
    """The plan for `recipe` on `model`. A budget needs the `measurements` of every target linear
    and, for a size budget with tables, the calibration `windows` (tables are scored by token use);
    refinement (recipe.budget.refine_seconds > 0) needs the measurements' bank and `held_out`
    windows to score plans on."""
    if recipe.budget is None:
        return Plan({n: targets.pinned.get(n, recipe.format) for n in targets.linears})
    if measurements is None:
        raise LowbitError("a budget plan needs the measurement pass's results")
    budget, size = recipe.budget, targets.size
    cands = targets.candidates
    names = list(targets.linears)
    fixed = {n: f for n, f in targets.pinned.items() if f is not None}
    free = [n for n in names if n not in targets.pinned]
    numel = {n: o * i for n, (o, i) in targets.linears.items()}
    t0 = time.perf_counter()
    table_choice: dict[str, int] = {}
    table_probe = None
    if size is None:
        bpw = budget.bpw
        allocation = plan_for_budget(
            measurements,
            bpw,
            budget.allocator,
            layers=free,
            reserved_bits=sum(f.storage_bits(*targets.linears[n]) for n, f in fixed.items()),
            reserved_numel=sum(numel[n] for n in fixed),
            weighting=budget.weighting,
            tied=targets.tied,
        )
    else:  # pinned layers are in size.fixed_bytes already; the free linears share what is left
        linear_bits = size.linear_bits
        if size.tables:
            table_choice, table_probe = _choose_tables(
                model, measurements, free, size, cands, windows, budget.allocator, budget.weighting, progress
            )
            linear_bits -= sum(size.table_costs[n][j] for n, j in table_choice.items())
        bpw = linear_bits / sum(numel[n] for n in free)
        allocation = plan_for_budget(
            measurements,
            bpw,
            budget.allocator,
            free,
            weighting=budget.weighting,
            costs=size.costs,
            budget_bits=linear_bits,
            tied=targets.tied,
        )
    planning_seconds = time.perf_counter() - t0
    refinement = None
    if budget.refine_seconds > 0:
        refinement = refine(
            model, measurements, allocation, held_out, budget.weighting, budget.refine_seconds, progress
        )
        allocation = allocation.with_choice(measurements, refinement.choice, budget.weighting)
    merged = {**targets.pinned, **allocation.formats}
    formats: dict[str, Format | None] = {n: merged[n] for n in names}
    formats.update({n: None if j == 0 else cands[j - 1] for n, j in table_choice.items()})
    plan = Plan(formats)
    record = {
        "bpw": bpw,
        **(size.record(allocation.choice, table_choice) if size is not None else {}),
        "tables": {n: None if f is None else f.to_dict() for n, f in formats.items() if n in table_choice},
        "table_probe": table_probe,
        "achieved_bpw": allocation.achieved_bpw,
        "allocator": budget.allocator,
        "predicted_error": allocation.predicted_error,
        "formats": Plan({**fixed, **allocation.formats}).format_counts(),
        "candidates": [f.to_dict() for f in cands],
        "candidates_dropped": dict(targets.dropped),
        "planning_seconds": planning_seconds,
        "weighting": budget.weighting,
        "refinement": refinement.to_dict() if refinement is not None else None,
    }
    return Plan(plan.formats, record)


def _choose_tables(
    model,
    meas: Measurements,
    free: list[str],
    size: SizeBudget,
    cands,
    windows,
    allocator: str,
    weighting: str,
    progress: bool,
) -> tuple[dict[str, int], dict]:
    """Float (0) or a candidate (1 + its index) for the embedding and head: one knapsack over
    them and the linears together, so a table is packed exactly when that buys more than the
    same bytes spent on the linears. The tables' errors are their measured KL put in the
    linears' units (allocate.kl_probe); scored like one more linear, SmolLM2's tied table went
    to IQ4_NL where Q8_0 would have cut KLD from 0.116 to 0.023. Under the `upgrade`
    allocator no table may be worse than under the best uniform format that fits everything.
    Under the `kl` weighting the linears' errors are KL already and a table's is its KL.
    Returns the choice and the probe's account."""
    names = list(size.table_costs)
    costs = [size.costs[n] for n in free] + [size.table_costs[n] for n in names]
    kl = weighting == "kl"
    errors = [meas.weighted_errors(n, weighting if kl else "relative") for n in free]
    probe = probe_tables(model, free, size.tables, cands, windows, progress)
    errors += [[0.0, *(probe.table_kl[t.name] if kl else probe.table_errors(t.name))] for t in size.tables]
    if allocator == "upgrade":
        picks = upgrade_choice(costs, errors, size.linear_bits, extra=[0] * len(free) + [1] * len(names))
    else:
        picks = solve_mckp(costs, errors, size.linear_bits)
    return dict(zip(names, picks[len(free) :], strict=True)), probe.to_dict()
