"""Turn a float model into a quantized one in place, and record what was done."""

from __future__ import annotations

import fnmatch
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.allocate.evolve import PlanEvaluator, Refinement, evolve
from lowbit.allocate.knapsack import solve_mckp
from lowbit.allocate.planner import check_feasible, plan_for_budget, starting_plans, upgrade_choice
from lowbit.allocate.rules import KeepRule, apply_rules, parse_rules
from lowbit.allocate.sensitivity import Measurements, default_candidates, measure, windows_digest
from lowbit.allocate.size import SizeBudget, size_budget
from lowbit.data import calibration_windows, load_text, tokenize
from lowbit.errors import DataError, LowbitError, NonFiniteWeightError
from lowbit.formats import Format, IntFormat, QuantizedTensor, format_from_dict
from lowbit.formats.integer import SCALE_DTYPES
from lowbit.models.adapters import get_adapter, linear_weight, quantizable_linears
from lowbit.pipeline import Checkpoint, GPTQSettings, checkpoint_key, gptq_pipeline, model_digest
from lowbit.runtime import QuantizedLinear
from lowbit.solvers import rtn_quantize
from lowbit.tables import Table, find_tables, quantize_table, table_errors

METHODS = ("gptq", "rtn")

logger = logging.getLogger(__name__)

STORAGE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass
class QuantizationInfo:
    """What `quantize` did: stored in the artifact manifest and shown by `lowbit inspect`."""

    method: str
    settings: dict[str, Any]
    storage_dtype: str
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)
    unquantized: list[str] = field(default_factory=list)
    source: str | None = None
    stats: dict[str, Any] = field(default_factory=dict)  # wall time, peak memory

    @property
    def quantized_weights(self) -> int:
        return sum(int(v["numel"]) for v in self.layers.values())

    @property
    def quantized_bits(self) -> int:
        return sum(int(v["storage_bits"]) for v in self.layers.values())

    @property
    def bits_per_weight(self) -> float:
        return self.quantized_bits / max(self.quantized_weights, 1)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["bits_per_weight"] = self.bits_per_weight
        d["quantized_weights"] = self.quantized_weights
        return d


def check_finite(model: nn.Module) -> None:
    """Refuse NaN/Inf weights up front, naming the tensor, before any output exists."""
    for name, p in model.named_parameters():
        if p.is_floating_point() and not torch.isfinite(p).all():
            raise NonFiniteWeightError(
                f"weight {name} contains NaN or Inf; the model file is damaged, re-download or re-convert it"
            )


def _layer_record(fmt: Format, qt: QuantizedTensor) -> dict[str, Any]:
    out, n = qt.shape
    return {
        "format": fmt.to_dict(),
        "shape": [out, n],
        "numel": out * n,
        "storage_bits": fmt.storage_bits(out, n),
        "bpw": fmt.bits_per_weight(out, n),
    }


def calibration_data(
    tokenizer, calib: str | torch.Tensor = "c4", nsamples: int = 128, seqlen: int = 512, seed: int = 0
) -> torch.Tensor:
    """Calibration windows [nsamples, seqlen] from a named data set or file, as protocol.md samples them."""
    if isinstance(calib, torch.Tensor):
        return calib.long()
    if tokenizer is None:
        raise LowbitError("GPTQ needs calibration text: pass tokenizer= (with calib=...) or calib=<token windows>")
    tokens = tokenize(tokenizer, load_text(calib))
    if tokens.numel() < nsamples * seqlen:
        raise DataError(
            f"calibration text {calib!r} has {tokens.numel()} tokens, fewer than the {nsamples} x {seqlen} = "
            f"{nsamples * seqlen} requested; give more text or lower --nsamples/--seqlen"
        )
    return calibration_windows(tokens, nsamples, seqlen, seed)


def quantize(
    model: nn.Module,
    bits: int = 4,
    group_size: int | None = 128,
    symmetric: bool = False,
    method: str = "gptq",
    clip_search: bool = False,
    scale_dtype: str = "float16",
    storage_dtype: str = "float16",
    progress: bool = True,
    *,
    tokenizer: Any = None,
    calib: str | torch.Tensor = "c4",
    nsamples: int = 128,
    seqlen: int = 512,
    gptq: GPTQSettings | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = False,
    on_block_done: Callable[[int], None] | None = None,
    budget_bpw: float | None = None,
    candidates: list[Format] | None = None,
    measurements: str | os.PathLike | None = None,
    allocator: str = "upgrade",
    keep: str | list[KeepRule] | None = None,
    weighting: str = "relative",
    refine_seconds: float = 0.0,
    refine_windows: int = 4,
    size_bytes: int | None = None,
) -> nn.Module:
    """Quantize every decoder-block linear of `model` in place; returns the model.

    method "gptq" (default) calibrates on `calib` (a data set name or file read
    with `tokenizer`, or ready token windows) block by block; with `checkpoint_dir`
    it persists every finished block there, and `resume=True` continues from it.
    method "rtn" rounds each weight to the nearest grid point, no data needed.

    With `budget_bpw`, each layer gets its own format from `candidates` (default:
    integer grids at 2-8 bits with groups of 32/64/128): every layer is solved with
    every candidate once (the measurement pass, saved to and reused from
    `measurements` when given), the `allocator` picks the plan with the least summed
    error within the budget (default "upgrade": the best uniform format that fits plus
    its spare bits, no layer worse; planner.plan_for_budget), and GPTQ quantizes with that plan; `bits`/`group_size`
    are then ignored. Layer errors are compared after `weighting` (see
    Measurements.weighted_errors). `refine_seconds` > 0 then improves the plan for
    that long by an evolutionary search scored by whole-model KL divergence on
    `refine_windows` held-out windows (allocate.evolve). `size_bytes` instead budgets
    the whole weights file (norms and header included) by the candidates' exact packed
    bytes (allocate.size); the token embedding and output head then become candidates
    too (lowbit.tables), unless a `keep` rule without a format names them.

    `keep` pins layers: "PATTERN" keeps matches in floating point, "PATTERN=FORMAT"
    (e.g. "*.0.self_attn.*=8bit") fixes their format; budgets count pinned formats.

    Otherwise embeddings, the output head and norms stay unquantized but are stored (and,
    so that a reloaded artifact computes exactly the same logits, rounded first)
    in `storage_dtype`. The record of what was done is `model.lowbit_info`.
    """
    if method not in METHODS:
        raise LowbitError(f"unknown method {method!r}; available: {', '.join(METHODS)}")
    if storage_dtype not in STORAGE_DTYPES:
        raise LowbitError(f"storage dtype {storage_dtype!r} is not supported; use one of {sorted(STORAGE_DTYPES)}")
    if scale_dtype not in SCALE_DTYPES:
        raise LowbitError(f"scale dtype {scale_dtype!r} is not supported; use one of {sorted(SCALE_DTYPES)}")
    fmt = IntFormat(bits=bits, group_size=group_size, symmetric=symmetric, scale_dtype=scale_dtype)
    adapter = get_adapter(model.config.model_type)
    check_finite(model)
    windows = None
    if budget_bpw is not None and size_bytes is not None:
        raise LowbitError("give a bit budget (--bits/--bpw) or a size (--size), not both")
    budgeted = budget_bpw is not None or size_bytes is not None
    if budgeted and method != "gptq":
        raise LowbitError("a budget needs --method gptq (the measurement pass solves every candidate with it)")
    cands = candidates or default_candidates(symmetric)
    rules = keep if isinstance(keep, list) else parse_rules(keep, group_size, symmetric)
    shapes = {n: tuple(linear_weight(m).shape) for n, m in quantizable_linears(model, adapter)}
    pinned = apply_rules(list(shapes), rules, [n for n, _ in model.named_modules()])
    if budget_bpw is not None:
        free = [s for n, s in shapes.items() if n not in pinned]
        reserved = [(f.storage_bits(*shapes[n]), shapes[n][0] * shapes[n][1]) for n, f in pinned.items() if f]
        check_feasible(free, cands, budget_bpw, sum(r[0] for r in reserved), sum(r[1] for r in reserved))
    size = None
    if size_bytes is not None:
        tables = [t for t in find_tables(model) if not _kept_in_float(t, rules)]
        size = size_budget(model, shapes, pinned, cands, size_bytes, STORAGE_DTYPES[storage_dtype], tables)
    if method == "gptq":
        windows = calibration_data(tokenizer, calib, nsamples, seqlen)
        context = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
        if context is not None and windows.shape[1] > context:
            raise DataError(
                f"calibration windows of {windows.shape[1]} tokens exceed the model's context of {context}; "
                f"use --seqlen {context} or less"
            )
    settings: dict[str, Any] = {"format": None if budgeted else fmt.to_dict()}
    if method == "rtn":
        settings["clip_search"] = clip_search
    if rules:
        settings["keep"] = [{"pattern": r.pattern, "format": r.fmt.to_dict() if r.fmt else None} for r in rules]
    info = QuantizationInfo(method=method, settings=settings, storage_dtype=storage_dtype)
    t0 = time.perf_counter()
    with torch.no_grad():
        round_parameters(model, STORAGE_DTYPES[storage_dtype])
        targets = quantizable_linears(model, adapter)
        plan = {name: pinned.get(name, fmt) for name, _ in targets}
        if method == "rtn":
            _quantize_rtn(model, targets, plan, clip_search, info, progress)
        else:
            gptq = gptq or GPTQSettings()
            if budgeted:
                args = (model, adapter, targets, cands, windows, gptq, budget_bpw, measurements, allocator)
                refine = None
                if refine_seconds > 0:
                    held_out = _held_out_windows(tokenizer, calib, windows, refine_windows)
                    refine = (refine_seconds, held_out)
                plan = _plan_from_budget(*args, pinned, settings, progress, weighting, refine, size)
                for table in size.tables if size is not None else []:
                    table_fmt = settings["budget"]["tables"][table.name]
                    if table_fmt is not None:
                        info.layers[table.name] = quantize_table(model, table, format_from_dict(table_fmt))
            plan = {name: f for name, f in plan.items() if f is not None}
            ckpt = None
            if checkpoint_dir is not None:
                ckpt = Checkpoint(checkpoint_dir, checkpoint_key(model, windows, plan, gptq))
            result = gptq_pipeline(
                model,
                adapter,
                plan,
                windows,
                gptq,
                checkpoint=ckpt,
                resume=resume,
                progress=progress,
                on_block_done=on_block_done,
                layer_record=_layer_record,
            )
            info.layers.update(result.layers)
            settings.update({"gptq": asdict(gptq), "calibration": _calib_name(calib)})
            settings.update({"nsamples": int(windows.shape[0]), "seqlen": int(windows.shape[1])})
            info.stats["pipeline"] = result.stats.to_dict()
        info.unquantized = _unquantized(model)
    info.stats["quantize_seconds"] = time.perf_counter() - t0
    model.lowbit_info = info
    return model


def _held_out_windows(tokenizer, calib: str | torch.Tensor, windows: torch.Tensor, n: int) -> torch.Tensor:
    """Windows the refinement scores plans on: drawn with another seed from the calibration
    text, or (for ready token windows, where nothing else exists) the last `n` of them."""
    if isinstance(calib, torch.Tensor):
        return windows[-n:]
    return calibration_data(tokenizer, calib, n, windows.shape[1], seed=1)


def _plan_from_budget(
    model,
    adapter,
    targets,
    cands,
    windows,
    gptq,
    budget_bpw,
    measurements,
    allocator,
    pinned,
    settings,
    progress,
    weighting: str = "relative",
    refine: tuple[float, torch.Tensor] | None = None,
    size: SizeBudget | None = None,
) -> dict[str, Format | None]:
    """Measure (or reuse measurements), allocate the layers not pinned, optionally refine the plan
    by measured KL; records the plan in `settings`. Every layer is measured, pinned or not, so
    the file serves other rules too."""
    names = [n for n, _ in targets]
    key = (model_digest(model), windows_digest(windows), [f.to_dict() for f in cands])
    path = Path(measurements) if measurements is not None else None
    if path is not None and path.exists() and refine is None:
        meas = Measurements.load(path)
        meas.check_matches(*key, path=str(path))
        reused = True
    else:
        if path is not None and path.exists():
            Measurements.load(path).check_matches(*key, path=str(path))
            logger.warning("refinement needs every candidate's weights: measuring again (the file has errors only)")
        meas = measure(model, adapter, names, cands, windows, gptq, progress, keep_weights=refine is not None)
        if path is not None:
            meas.save(path)
        reused = False
    t0 = time.perf_counter()
    table_choice: dict[str, int] = {}
    shapes = {n: linear_weight(m).shape for n, m in targets}
    fixed = {n: f for n, f in pinned.items() if f is not None}
    free = [n for n in names if n not in pinned]
    if size is None:
        plan = plan_for_budget(
            meas,
            budget_bpw,
            allocator,
            layers=free,
            reserved_bits=sum(f.storage_bits(*shapes[n]) for n, f in fixed.items()),
            reserved_numel=sum(shapes[n].numel() for n in fixed),
            weighting=weighting,
        )
    else:  # pinned layers are in size.fixed_bytes already; the free linears share what is left
        linear_bits = size.linear_bits
        if size.tables:
            table_choice = _choose_tables(model, meas, free, size, cands, windows, allocator)
            linear_bits -= sum(size.table_costs[n][j] for n, j in table_choice.items())
        budget_bpw = linear_bits / sum(shapes[n].numel() for n in free)
        plan = plan_for_budget(
            meas, budget_bpw, allocator, free, weighting=weighting, costs=size.costs, budget_bits=linear_bits
        )
    planning_seconds = time.perf_counter() - t0
    refinement = None
    if refine is not None:
        refinement = _refine(model, meas, plan, refine, weighting, progress)
        plan = plan.with_choice(meas, refinement.choice, weighting)
    settings["budget"] = {
        "bpw": budget_bpw,
        **(size.record(plan.choice, table_choice) if size is not None else {}),
        "tables": {n: None if j == 0 else cands[j - 1].to_dict() for n, j in table_choice.items()},
        "achieved_bpw": plan.achieved_bpw,
        "allocator": allocator,
        "predicted_error": plan.predicted_error,
        "formats": _format_counts({**fixed, **plan.formats}),
        "candidates": [f.to_dict() for f in cands],
        "measurement_seconds": meas.seconds,
        "measurements_reused": reused,
        "planning_seconds": planning_seconds,
        "weighting": weighting,
        "refinement": refinement.to_dict() if refinement is not None else None,
    }
    return {**pinned, **plan.formats}


def _refine(model, meas, plan, refine, weighting, progress) -> Refinement:
    """Run the evolutionary refinement within the same bit budget, from the best-scoring of
    several starting plans (planner.starting_plans)."""
    seconds, held_out = refine
    free = list(plan.choice)
    evaluator = PlanEvaluator(model, {n: meas.bank[n] for n in free}, held_out)
    try:
        return evolve(
            evaluator,
            starting_plans(meas, plan, weighting),
            costs=plan.costs,
            proxy={n: meas.weighted_errors(n, weighting) for n in free},
            budget=plan.budget_bits,
            time_limit=seconds,
            progress=progress,
        )
    finally:
        evaluator.restore()
        meas.bank = None


def _choose_tables(
    model, meas: Measurements, free: list[str], size: SizeBudget, cands, windows, allocator: str
) -> dict[str, int]:
    """Float (0) or a candidate (1 + its index) for the embedding and head: one knapsack over
    them and the linears together, all errors in `relative` units (lowbit.tables), so a table
    is packed exactly when that buys more than the same bytes spent on the linears. Under the
    `upgrade` allocator no table may be worse than under the best uniform format that fits
    everything: the free knapsack packed SmolLM2's tied embedding/head at 2 bits to buy
    4.6 bpw linears, and KLD went to 3.1 (BENCHMARKS.md)."""
    names = list(size.table_costs)
    costs = [size.costs[n] for n in free] + [size.table_costs[n] for n in names]
    errors = [meas.weighted_errors(n, "relative") for n in free]
    errors += [[0.0, *table_errors(model, t, cands, windows)] for t in size.tables]
    if allocator == "upgrade":
        picks = upgrade_choice(costs, errors, size.linear_bits, extra=[0] * len(free) + [1] * len(names))
    else:
        picks = solve_mckp(costs, errors, size.linear_bits)
    return dict(zip(names, picks[len(free) :], strict=True))


def _kept_in_float(table: Table, rules: list[KeepRule]) -> bool:
    """`--keep lm_head` (no format) keeps a table, or the embedding tied to that head, in float."""
    names = [table.name] + ([table.tied_head] if table.tied_head else [])
    return any(r.fmt is None and fnmatch.filter(names, r.pattern) for r in rules)


def _format_counts(plan: dict[str, Format]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for f in plan.values():
        counts[f.name] = counts.get(f.name, 0) + 1
    return dict(sorted(counts.items()))


def _calib_name(calib: str | torch.Tensor) -> str:
    return "token windows" if isinstance(calib, torch.Tensor) else str(calib)


def _quantize_rtn(
    model, targets, plan: dict[str, Format | None], clip_search: bool, info: QuantizationInfo, progress: bool
) -> None:
    for name, module in tqdm(targets, desc="quantizing (rtn)", disable=not progress):
        fmt = plan[name]
        if fmt is None:  # pinned to floating point
            continue
        w = linear_weight(module).detach().float()
        qt = rtn_quantize(w, fmt, clip_search=clip_search)
        err = ((qt.dequantize() - w).pow(2).sum() / w.pow(2).sum().clamp_min(1e-30)).item()
        qlayer = QuantizedLinear.from_quantized(qt, module.bias)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, qlayer)
        info.layers[name] = {**_layer_record(fmt, qt), "weight_rel_mse": err}


def round_parameters(model: nn.Module, dtype: torch.dtype) -> None:
    """Round every float parameter through the storage dtype first, so that calibration
    sees the unquantized tensors exactly as the artifact will hold them."""
    for name, p in model.named_parameters():
        rounded = p.data.to(dtype)
        if not torch.isfinite(rounded).all():
            raise NonFiniteWeightError(
                f"weight {name} has values beyond the range of {str(dtype).removeprefix('torch.')}; "
                "store unquantized tensors in a wider type: --storage-dtype float32 (or bfloat16)"
            )
        p.data = rounded.to(p.dtype)


def _unquantized(model: nn.Module) -> list[str]:
    out = []
    for name, _ in model.named_parameters(remove_duplicate=False):
        owner = model.get_submodule(name.rpartition(".")[0])
        if not isinstance(owner, QuantizedLinear):
            out.append(name)
    return out
