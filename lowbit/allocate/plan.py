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
import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lowbit.allocate.evolve import refine
from lowbit.allocate.kl_probe import probe_tables
from lowbit.allocate.knapsack import solve_mckp
from lowbit.allocate.planner import check_feasible, held_solve, plan_for_budget, upgrade_choice
from lowbit.allocate.sensitivity import Measurements
from lowbit.allocate.size import SizeBudget, size_budget
from lowbit.dtypes import DTYPES
from lowbit.errors import FormatError, LowbitError
from lowbit.formats import Format, format_from_dict
from lowbit.keep import KeepRule, apply_rules
from lowbit.models.adapters import ArchAdapter, decoder_blocks, linear_weight, quantizable_linears
from lowbit.recipe import Budget, Recipe
from lowbit.tables import Table, find_tables
from lowbit.targets import Target, fits, target_named


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
    candidates: list[Format] = field(default_factory=list)  # a budget's candidates that fit some free layer
    dropped: dict[str, str] = field(default_factory=dict)  # candidate name -> why no free layer can hold it
    # layer or table -> indices of the candidates its rows cannot be written in (k-quants on rows not of 256)
    unfit: dict[str, set[int]] = field(default_factory=dict)
    tied: list[tuple[str, ...]] = field(default_factory=list)  # linears that must share one format (vLLM's fusion)


def find_targets(model: nn.Module, adapter: ArchAdapter, recipe: Recipe) -> Targets:
    """The quantizable layers and the pins; an infeasible budget is refused here, naming the
    smallest feasible one, before anything slow runs."""
    shapes = {n: tuple(linear_weight(m).shape) for n, m in quantizable_linears(model, adapter)}
    pinned = apply_rules(list(shapes), list(recipe.keep), [n for n, _ in model.named_modules()])
    targets = Targets(shapes, pinned)
    budget = recipe.budget
    target = target_named(recipe.target) if recipe.target is not None else None
    if budget is not None:
        targets.candidates = _held_candidates(targets, list(budget.candidates), shapes, pinned, target)
    if target is not None:  # every layer that will be quantized must split into its format's blocks
        if target.fused_inputs:
            targets.tied = _fused_groups(model, adapter, pinned, target.name)
            if budget is not None and budget.refine_seconds > 0:
                raise LowbitError(
                    f"--refine cannot keep fused layers (q/k/v, gate/up) in one format yet, which --target "
                    f"{target.name} needs; drop --refine"
                )
        for name, (_, in_features) in shapes.items():
            pin = pinned.get(name, "free")
            for fmt in (
                [recipe.format] if pin == "free" and budget is None else [pin] if pin not in ("free", None) else []
            ):
                target.check_shape(name, in_features, fmt)
    if budget is None:
        return targets
    cands = targets.candidates
    if budget.bpw is not None:
        free = [n for n in shapes if n not in pinned]
        held = [[f for j, f in enumerate(cands) if j not in targets.unfit.get(n, ())] for n in free]
        fixed = [(f.storage_bits(*shapes[n]), shapes[n][0] * shapes[n][1]) for n, f in pinned.items() if f]
        check_feasible([shapes[n] for n in free], held, budget.bpw, sum(r[0] for r in fixed), sum(r[1] for r in fixed))
    else:
        targets.tables = [t for t in find_tables(model) if not _kept_in_float(t, recipe.keep)]
        if target is not None and not target.quantizes_tables:
            targets.tables = []
        for t in targets.tables:
            targets.unfit[t.name] = {j for j, f in enumerate(cands) if not fits(f, t.shape[1], target)}
        # a table no candidate can be written in stays in float
        targets.tables = [t for t in targets.tables if len(targets.unfit[t.name]) < len(cands)]
        storage = DTYPES[recipe.storage_dtype]
        targets.size = size_budget(
            model, shapes, pinned, cands, budget.size_bytes, storage, targets.tables, targets.unfit
        )
    return targets


def _held_candidates(
    targets: Targets,
    candidates: list[Format],
    shapes: dict[str, tuple[int, int]],
    pinned: dict,
    target: Target | None,
) -> list[Format]:
    """The candidates some free layer can hold, each free layer's unfit ones recorded in
    `targets.unfit` (indices into the result). A candidate no free layer holds is dropped, with
    why; a free layer that holds none of them is refused, naming it."""
    free = {n: i for n, (_, i) in shapes.items() if n not in pinned}
    kept = []
    for fmt in candidates:
        if any(fits(fmt, i, target) for i in free.values()) or not free:
            kept.append(fmt)
        else:
            label = target.label(fmt, short=True) if target is not None else fmt.name
            first = next(iter(free))
            targets.dropped[label] = f"no layer to plan has rows it splits into ({first}: {free[first]} weights)"
    for name, in_features in free.items():
        targets.unfit[name] = {j for j, f in enumerate(kept) if not fits(f, in_features, target)}
        if len(targets.unfit[name]) == len(kept):
            shown = ", ".join(target.label(f, short=True) if target else f.name for f in candidates)
            raise FormatError(
                f"{name} has rows of {in_features} weights, which none of the budget's candidates ({shown}) "
                f"splits into blocks; keep it in float with --keep {name}"
            )
    return kept


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
    if any(targets.unfit.get(n) for n in targets.linears):  # what the target cannot write is no choice
        measurements = measurements.restricted(targets.unfit)
    budget, size = recipe.budget, targets.size
    cands = targets.candidates
    names = list(targets.linears)
    fixed = {n: f for n, f in targets.pinned.items() if f is not None}
    free = [n for n in names if n not in targets.pinned]
    numel = {n: o * i for n, (o, i) in targets.linears.items()}
    t0 = time.perf_counter()
    table_choice: dict[str, int] = {}
    table_probe = None
    table_error = 0.0
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
            trust=budget.trust,
            fade=budget.fade,
        )
    else:  # pinned layers are in size.fixed_bytes already; the free linears share what is left
        linear_bits = size.linear_bits
        if size.tables:
            table_choice, table_probe, table_error = _choose_tables(
                model, measurements, free, size, cands, windows, budget, progress
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
            trust=budget.trust,
            fade=budget.fade,
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
        # the tables' terms too: a plan that saves bytes on the head reads as what it costs
        "predicted_error": allocation.predicted_error + table_error,
        "predicted_error_tables": table_error,
        "formats": Plan({**fixed, **allocation.formats}).format_counts(),
        "candidates": [f.to_dict() for f in cands],
        "candidates_dropped": dict(targets.dropped),
        "planning_seconds": planning_seconds,
        "weighting": budget.weighting,
        "trust": budget.trust,
        "fade": budget.fade,
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
    budget: Budget,
    progress: bool,
) -> tuple[dict[str, int], dict, float]:
    """Float (0) or a candidate (1 + its index) for the embedding and head: one knapsack over
    them and the linears together, so a table is packed exactly when that buys more than the
    same bytes spent on the linears. The tables' errors are their measured KL put in the
    linears' units (allocate.kl_probe); scored like one more linear, SmolLM2's tied table went
    to IQ4_NL where Q8_0 would have cut KLD from 0.116 to 0.023. Under the `upgrade`
    allocator no table may be worse than under the best uniform format that fits everything.
    Under the `kl` weighting the linears' errors are KL already and a table's is its KL.
    Returns the choice, the probe's account and the chosen tables' summed error (the linears' units)."""
    names = list(size.table_costs)
    allocator, weighting = budget.allocator, budget.weighting
    costs = [size.costs[n] for n in free] + [size.table_costs[n] for n in names]
    kl = weighting == "kl"
    errors = [meas.weighted_errors(n, weighting if kl else "relative") for n in free]
    probe = probe_tables(model, free, size.tables, cands, windows, progress)
    for t in size.tables:
        scored = probe.table_kl[t.name] if kl else probe.table_errors(t.name)
        held = zip(scored, size.table_costs[t.name][1:], strict=True)
        errors.append([0.0, *(math.inf if e is None or c is None else e for e, c in held)])
    if allocator == "upgrade":
        extra = [0] * len(free) + [1] * len(names)
        widths = [f.bits for f in cands]
        picks = upgrade_choice(
            costs, errors, size.linear_bits, extra=extra, trust=budget.trust, fade=budget.fade, widths=widths
        )
    else:
        picks = held_solve(solve_mckp, costs, errors, size.linear_bits)
    chosen = dict(zip(names, picks[len(free) :], strict=True))
    table_error = sum(errors[len(free) + k][chosen[n]] for k, n in enumerate(names))
    return chosen, probe.to_dict(), table_error
