"""The measurement pass: every layer solved with every candidate format, errors recorded.

One forward pass per block on float inputs accumulates each layer group's Hessian; each
candidate is then solved with GPTQ against that same Hessian (layers that share an input
and a format are stacked into one solve). The errors, with each candidate's exact cost in
bits, are what the allocator plans with; they are saved so a new budget for the same
model, calibration set and candidates needs no new pass.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.data import tokens_digest
from lowbit.errors import LowbitError
from lowbit.formats import Format, IntFormat, format_from_dict
from lowbit.models.adapters import ArchAdapter, decoder_blocks, linear_weight
from lowbit.pipeline import (
    GPTQSettings,
    PipelineStats,
    _HessianAccumulator,
    _run_block,
    capture_block_calls,
    model_digest,
)
from lowbit.solvers.gptq import gptq_quantize, hessian_weighted_error

MEASUREMENT_VERSION = 2
WEIGHTINGS = ("relative", "stream", "raw")


class MeasurementMismatchError(LowbitError):
    pass


def default_candidates(symmetric: bool = False) -> list[Format]:
    """Integer grids at 2, 3, 4, 5, 6 and 8 bits, each with groups of 32, 64 and 128."""
    return [IntFormat(b, g, symmetric=symmetric) for b in (2, 3, 4, 5, 6, 8) for g in (32, 64, 128)]


def windows_digest(windows: torch.Tensor) -> str:
    return tokens_digest(windows.reshape(-1))


@dataclass
class Measurements:
    """Per layer and candidate: cost in bits and the Hessian-weighted output error."""

    model: str  # model_digest
    calibration: str  # windows_digest
    candidates: list[dict[str, Any]]
    settings: dict[str, Any]
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> shape, numel, block, costs, errors
    stream: dict[str, float] = field(default_factory=dict)  # block -> median squared norm of its input
    seconds: float = 0.0
    bank: dict[str, dict[int, torch.Tensor]] | None = field(default=None, repr=False)  # not saved

    def to_json(self) -> dict[str, Any]:
        return {"version": MEASUREMENT_VERSION, **{k: v for k, v in self.__dict__.items() if k != "bank"}}

    def weighted_errors(self, name: str, weighting: str = "relative") -> list[float]:
        """A layer's candidate errors on a scale comparable across layers and depths.

        raw: tr(dW H dWᵀ), the layer's own output error; relative (default): divided by
        tr(W H Wᵀ), the error as a fraction of the layer's output energy; stream: divided
        by the median squared norm of the residual stream entering the layer's block.
        On smollm2-135m at 2.5-3.5 bpw, knapsack plans under `relative` had 25-35 % lower
        KL than under `stream` or `raw` (BENCHMARKS.md)."""
        rec = self.layers[name]
        if weighting == "raw":
            return list(rec["errors"])
        if weighting == "relative":
            return [e / max(rec["base"], 1e-300) for e in rec["errors"]]
        if weighting == "stream":
            return [e / max(self.stream[str(rec["block"])], 1e-300) for e in rec["errors"]]
        raise LowbitError(f"unknown error weighting {weighting!r}; use one of {', '.join(WEIGHTINGS)}")

    def save(self, path: str | os.PathLike) -> None:
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(self.to_json()))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Measurements:
        try:
            d = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise LowbitError(f"measurement file {path} is unreadable ({exc}); delete it to measure again") from exc
        if d.pop("version", None) != MEASUREMENT_VERSION:
            raise MeasurementMismatchError(f"measurement file {path} is from another lowbit version; measure again")
        return cls(**d)

    def check_matches(self, model: str, calibration: str, candidates: list[dict[str, Any]], path: str = "") -> None:
        """Refuse measurements taken on something else, naming what differs."""
        where = f" in {path}" if path else ""
        if self.model != model:
            raise MeasurementMismatchError(f"the measurements{where} are of another model; measure this one again")
        if self.calibration != calibration:
            raise MeasurementMismatchError(
                f"the measurements{where} used another calibration set (data, --nsamples or --seqlen); "
                "use the same calibration or measure again"
            )
        if self.candidates != candidates:
            raise MeasurementMismatchError(f"the measurements{where} cover other candidate formats; measure again")


@torch.no_grad()
def measure(
    model: nn.Module,
    adapter: ArchAdapter,
    layers: list[str],
    candidates: list[Format],
    windows: torch.Tensor,
    settings: GPTQSettings | None = None,
    progress: bool = True,
    keep_weights: bool | str = False,
) -> Measurements:
    """Solve every layer in `layers` (full names) with every candidate; the model is not changed.

    With `keep_weights`, the dequantized weights (float16) of each layer's Pareto-optimal
    candidates (no other candidate both cheaper and more accurate) stay in `bank`, for
    the refinement that evaluates whole plans (allocate.evolve); "all" keeps every
    candidate's (benchmarks compare uniform plans with it)."""
    settings = settings or GPTQSettings()
    t_start = time.perf_counter()
    result = Measurements(
        model=model_digest(model),
        calibration=windows_digest(windows),
        candidates=[f.to_dict() for f in candidates],
        settings=settings.solver_options(),
    )
    wanted = set(layers)
    blocks = decoder_blocks(model, adapter)
    calls = capture_block_calls(model, adapter, windows, settings.batch_size)
    inputs = calls.first_inputs
    stats = PipelineStats()
    for i in tqdm(range(len(blocks)), desc="measuring", disable=not progress, unit="block"):
        block, prefix = blocks[i], f"{adapter.blocks}.{i}."
        groups = [[n for n in g if prefix + n in wanted] for g in adapter.linear_groups]
        groups = [g for g in groups if g]
        accs, handles = [], []
        for group in groups:
            acc = _HessianAccumulator(prefix + group[0], i, stop=False, stats=stats)
            handles.append(block.get_submodule(group[0]).register_forward_pre_hook(acc))
            accs.append(acc)
        try:
            outputs = _run_block(block, inputs, calls, i)  # float block: the next inputs, and every Hessian
            result.stream[str(i)] = torch.cat([x.pow(2).sum(-1).reshape(-1) for x in inputs]).median().item()
        finally:
            for handle in handles:
                handle.remove()
        for group, acc in zip(groups, accs, strict=True):
            h = acc.hessian()
            weights = [linear_weight(block.get_submodule(n)).detach().float() for n in group]
            stacked = torch.cat(weights)
            recs = {}
            solved: dict[str, list[torch.Tensor]] = {name: [] for name in group}
            for name, w in zip(group, weights, strict=True):
                recs[name] = {"block": i, "shape": list(w.shape), "numel": w.numel(), "costs": [], "errors": []}
                recs[name]["base"] = hessian_weighted_error(w.double(), h.double())  # tr(W H Wᵀ)
            for fmt in candidates:
                res = gptq_quantize(
                    stacked,
                    h,
                    fmt,
                    **settings.solver_options(),
                    name=", ".join(prefix + n for n in group),
                )
                parts = res.qt.split_rows([w.shape[0] for w in weights])
                for name, w, qt in zip(group, weights, parts, strict=True):
                    deq = qt.dequantize()
                    recs[name]["costs"].append(fmt.storage_bits(*w.shape))
                    recs[name]["errors"].append(hessian_weighted_error((w - deq).double(), h.double()))
                    if keep_weights:
                        solved[name].append(deq.to(torch.float16))
            for name, rec in recs.items():
                result.layers[prefix + name] = rec
                if keep_weights:
                    every = range(len(candidates))
                    front = every if keep_weights == "all" else pareto_front(rec["costs"], rec["errors"])
                    result.bank = result.bank or {}
                    result.bank[prefix + name] = {j: solved[name][j] for j in front}
        inputs = outputs
    result.seconds = time.perf_counter() - t_start
    return result


def pareto_front(costs: list[int], errors: list[float]) -> list[int]:
    """Candidate indices, cheapest first, each strictly more accurate than every cheaper one."""
    front: list[int] = []
    for j in sorted(range(len(costs)), key=lambda j: (costs[j], errors[j])):
        if not front or errors[j] < errors[front[-1]]:
            if front and costs[j] == costs[front[-1]]:
                continue
            front.append(j)
    return front


def plan_formats(measurements: Measurements, choice: dict[str, int]) -> dict[str, Format]:
    """Layer name -> chosen format, from candidate indices."""
    return {name: format_from_dict(measurements.candidates[j]) for name, j in choice.items()}
