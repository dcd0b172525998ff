"""Quantize a float model in place: measure, plan, execute, record.

`quantize` is the one path every quantization takes, from the API and the command line
alike: the recipe is checked against the model (an impossible budget is refused before
anything slow), calibration windows are drawn, a budget's measurement pass runs (or its
file is reused), the allocator makes the plan, and the plan is executed. The record of what
was done is `model.lowbit_info`, which `lowbit.save` writes into the artifact.
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit.activations import Offload
from lowbit.allocate.kl_probe import probe_layers, probe_roles
from lowbit.allocate.plan import Plan, Targets, allocate, find_targets
from lowbit.allocate.sensitivity import layer_probe_candidate, measure, measurements_for
from lowbit.data import calibration_data
from lowbit.devices import resolve_device
from lowbit.dtypes import DTYPES
from lowbit.errors import DataError, LowbitError, NonFiniteWeightError
from lowbit.execute import execute
from lowbit.models.adapters import get_adapter
from lowbit.models.lazy import lazy_weights, load_rest
from lowbit.models.loading import source_identity
from lowbit.recipe import GPTQSettings, Recipe
from lowbit.records import QuantizationInfo
from lowbit.runtime import QuantizedEmbedding, QuantizedLinear
from lowbit.transforms.awq import check_scalable


def quantize(
    model: nn.Module,
    recipe: Recipe | None = None,
    *,
    tokenizer: Any = None,
    measurements: str | os.PathLike | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = False,
    progress: bool = True,
    on_block_done=None,
    device: str | torch.device | None = None,
    spill_dir: str | os.PathLike | None = None,
    offload_activations: str | None = None,
    **options: Any,
) -> nn.Module:
    """Quantize `model` in place by `recipe` (or by the flat `options` of Recipe.build, e.g.
    `bits=4, group_size=128`, `budget_bpw=3.25`, `size_bytes=70_000_000`); returns the model.

    GPTQ calibrates on the recipe's calibration source, read with `tokenizer` (or on ready
    token windows). A budget first measures every layer with every candidate format; with
    `measurements` (a JSON path) that pass is saved there and reused by later budgets on the
    same model, calibration and candidates. With `checkpoint_dir`, the measurement pass and
    the GPTQ pass keep their state there after every block, and `resume=True` continues an
    interrupted run from it, to exactly the same result. `on_block_done(i)` is called after
    the GPTQ pass commits block i. With `device` (auto, cpu, cuda, cuda:N, mps) the blocks are
    solved there one at a time; the model stays where it is and comes back packed.

    Unquantized tensors (norms, biases, embeddings kept in float) are rounded to the recipe's
    storage dtype first, so that calibration sees them exactly as the artifact will hold them.

    With `spill_dir`, finished blocks are kept on disk there and the model comes back in pieces
    that only `lowbit.save` puts together (execute.py): for models larger than memory. With
    `offload_activations` ("cpu" or "disk") the calibration activations between blocks wait in
    CPU memory or in memory-mapped files (under `checkpoint_dir`, else the temporary directory)
    instead of on the compute device; the result is the same (activations.py)."""
    if recipe is None:
        recipe = Recipe.build(**options)
    elif not isinstance(recipe, Recipe):
        raise LowbitError(f"quantize's second argument is a Recipe, not {recipe!r}; pass options by name: bits=4")
    elif options:
        raise LowbitError(f"give a recipe or options ({', '.join(options)}), not both")
    t0 = time.perf_counter()
    compute = None if device is None else resolve_device(device)
    first = next(model.parameters())  # read now: a spilling run leaves the model's tensors on disk
    home = torch.device("cpu") if first.is_meta else first.device  # a lazy model's tensors arrive on the CPU
    compute_record = {"device": str(compute or home), "dtype": str(first.dtype).removeprefix("torch.")}
    del first  # not to keep a table alive
    adapter = get_adapter(model.config.model_type)
    if isinstance(recipe.solver, GPTQSettings) and recipe.solver.awq:
        check_scalable(model)
    check_finite(model, DTYPES[recipe.storage_dtype], progress)
    targets = find_targets(model, adapter, recipe)
    windows = None
    if recipe.needs_calibration:
        cal = recipe.calibration
        windows = calibration_data(tokenizer, cal.source, cal.nsamples, cal.seqlen)
        _check_context(model, windows)
    work = Path(checkpoint_dir) if checkpoint_dir is not None else None
    offload = None
    if offload_activations is not None:
        offload = Offload(offload_activations, None if work is None else work / "activations").check()
    with torch.no_grad():
        round_parameters(model, DTYPES[recipe.storage_dtype])
        if recipe.budget is not None and recipe.budget.refine_seconds > 0:
            load_rest(model)  # the refinement runs the whole model on every plan it scores
        plan = _plan(
            model, adapter, recipe, targets, windows, tokenizer, measurements, work, resume, progress, compute, offload
        )
        done = execute(
            model,
            adapter,
            plan,
            recipe.solver,
            targets.tables,
            windows,
            None if work is None else work / "execute",
            resume,
            progress,
            on_block_done,
            compute,
            spill_dir,
            offload,
            DTYPES[recipe.storage_dtype],
        )
    settings = recipe.settings()
    if plan.budget is not None:
        settings["budget"] = plan.budget
    stats: dict[str, Any] = {
        "quantize_seconds": time.perf_counter() - t0,
        "peak_rss_mb": peak_rss_mb(),
        "compute": {**compute_record, "lazy": lazy_weights(model) is not None},
    }
    if done.stats is not None:
        stats["pipeline"] = done.stats.to_dict()
    model.lowbit_info = QuantizationInfo(
        method=recipe.method,
        settings=settings,
        storage_dtype=recipe.storage_dtype,
        layers=done.layers,
        unquantized=_unquantized(model),
        source=source_identity(model),
        stats=stats,
        plan=plan.to_dict(),
    )
    return model


def _plan(
    model, adapter, recipe: Recipe, targets: Targets, windows, tokenizer, path, work, resume, progress, device, offload
) -> Plan:
    """The uniform plan, or a budget's: measurements (from `path` or a fresh pass), then the allocator."""
    budget = recipe.budget
    if budget is None:
        return allocate(model, recipe, targets)
    refine = budget.refine_seconds > 0
    kl = budget.weighting == "kl"
    if path is None and work is not None and not refine:  # a resumed run need not measure again
        path = work / "measurements.json"
    meas, reused = measurements_for(
        model,
        adapter,
        list(targets.linears),
        list(targets.candidates),
        windows,
        recipe.solver,
        path,
        keep_weights=refine,
        checkpoint_dir=None if work is None else work / "measure",
        resume=resume,
        progress=progress,
        device=device,
        offload=offload,
        keep_probe=kl,
    )
    probe_seconds = None
    if kl and not (meas.kl_scale and meas.kl_layer):
        t0 = time.perf_counter()
        relative = {n: meas.weighted_errors(n, "relative") for n in meas.layers}
        cands = list(targets.candidates)
        if not meas.kl_scale:
            meas.kl_scale = probe_roles(model, relative, cands, windows, progress)
        solved = meas.probe_bank or _layer_probe_weights(
            model, adapter, relative, cands, windows, recipe, progress, device, offload, work
        )
        meas.kl_layer = probe_layers(model, relative, cands, windows, meas.kl_scale, solved, progress)
        probe_seconds = time.perf_counter() - t0
        if path is not None:
            meas.save(path)
    meas.probe_bank = None
    held_out = _held_out_windows(tokenizer, recipe, windows, budget.refine_windows) if refine else None
    plan = allocate(model, recipe, targets, meas, windows, held_out, progress)
    account = {**plan.budget, "measurement_seconds": meas.seconds, "measurements_reused": reused}
    account["kl_probe_seconds"] = probe_seconds  # None: not needed, or saved with the measurements
    return replace(plan, budget=account)


def _layer_probe_weights(
    model, adapter, relative: dict[str, list[float]], cands, windows, recipe: Recipe, progress, device, offload, work
) -> Mapping[str, torch.Tensor]:
    """Each linear's GPTQ solution at the candidate the layer probe replaces it with, for
    measurements read from a file (which holds errors only; a fresh pass keeps them itself): a
    measurement pass over just those candidates, keeping them as a fresh pass does (each layer's
    probe candidate among them is the one among all: the rule picks the same)."""
    used = sorted({j for e in relative.values() if (j := layer_probe_candidate(e, cands)) is not None})
    if not used:
        return {}
    solved = measure(
        model,
        adapter,
        list(relative),
        [cands[j] for j in used],
        windows,
        recipe.solver,
        progress,
        checkpoint_dir=None if work is None else work / "probe-solve",
        device=device,
        offload=offload,
        keep_probe=True,
    )
    return solved.probe_bank or {}


def _held_out_windows(tokenizer, recipe: Recipe, windows: torch.Tensor, n: int) -> torch.Tensor:
    """Windows the refinement scores plans on: drawn with another seed from the calibration
    text, or (for ready token windows, where nothing else exists) the last `n` of them."""
    source = recipe.calibration.source
    if isinstance(source, torch.Tensor):
        return windows[-n:]
    return calibration_data(tokenizer, source, n, windows.shape[1], seed=1)


def _check_context(model: nn.Module, windows: torch.Tensor) -> None:
    context = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    if context is not None and windows.shape[1] > context:
        raise DataError(
            f"calibration windows of {windows.shape[1]} tokens exceed the model's context of {context}; "
            f"use --calib-seqlen {context} or less"
        )


def check_finite(model: nn.Module, storage: torch.dtype | None = None, progress: bool = False) -> None:
    """Refuse NaN/Inf weights (and, given the `storage` dtype, weights beyond its range) up
    front, naming the tensor, before any output exists. A lazy model's tensors are read for it
    block by block (one read of the checkpoint, in the memory of one block)."""
    for name, p in model.named_parameters():
        if not p.is_meta:
            _check_finite(name, p.data)
    lazy = lazy_weights(model)
    if lazy is not None:

        def check(name: str, t: torch.Tensor) -> None:
            _check_finite(name, t)
            if storage is not None:
                _rounded(name, t, storage, in_place=True)  # a throwaway read: rounding it costs nothing

        lazy.scan(model, check, progress)


def round_parameters(model: nn.Module, dtype: torch.dtype) -> None:
    """Round every float parameter through the storage dtype first, so that calibration
    sees the unquantized tensors exactly as the artifact will hold them (a lazy model's
    blocks: as they are read). In place, a slice at a time: no float copy of a large table."""
    for name, p in model.named_parameters():
        if not p.is_meta:
            rounded = _rounded(name, p.data, dtype, in_place=True)
            if rounded is not p.data:  # a non-contiguous parameter was rounded into a copy
                p.data = rounded
    lazy = lazy_weights(model)
    if lazy is not None:
        lazy.prepare = lambda name, t: _rounded(name, _check_finite(name, t), dtype, in_place=True)


_SLICE = 1 << 22  # elements per slice of the checks and roundings: bounded temporaries


def _slices(t: torch.Tensor) -> list[torch.Tensor]:
    flat = t.view(-1) if t.is_contiguous() else t.reshape(-1)
    return list(flat.split(_SLICE))


def _check_finite(name: str, t: torch.Tensor) -> torch.Tensor:
    if t.is_floating_point() and not all(torch.isfinite(part).all() for part in _slices(t)):
        raise NonFiniteWeightError(
            f"weight {name} contains NaN or Inf; the model file is damaged, re-download or re-convert it"
        )
    return t


def _rounded(name: str, t: torch.Tensor, dtype: torch.dtype, in_place: bool = False) -> torch.Tensor:
    """`t` rounded through `dtype` (into `t` itself with `in_place`), refused where it overflows."""
    if not t.is_floating_point():
        return t
    out = t if in_place and t.is_contiguous() else torch.empty_like(t, memory_format=torch.contiguous_format)
    for src, dst in zip(_slices(t), _slices(out), strict=True):
        rounded = src.to(dtype)
        if not torch.isfinite(rounded).all():
            raise NonFiniteWeightError(
                f"weight {name} has values beyond the range of {str(dtype).removeprefix('torch.')}; "
                "store unquantized tensors in a wider type: --storage-dtype float32 (or bfloat16)"
            )
        dst.copy_(rounded)
    return out


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _unquantized(model: nn.Module) -> list[str]:
    out = []
    for name, _ in model.named_parameters(remove_duplicate=False):
        owner = model.get_submodule(name.rpartition(".")[0])
        if not isinstance(owner, (QuantizedLinear, QuantizedEmbedding)):
            out.append(name)
    return out
