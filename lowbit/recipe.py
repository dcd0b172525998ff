"""What the user asked for, as one frozen, validated value.

The command line and the Python API both build a `Recipe`; everything it holds is checked
here, once, before any slow work starts. A recipe says how each layer's codes are chosen
(the solver and its settings), what to aim for (one format everywhere, or a budget in bits
per weight or bytes), on what calibration data, and which layers the user pins. How the
model's layers then get their formats is the plan's business (lowbit.allocate).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any, ClassVar

import torch

from lowbit.dtypes import dtype_named
from lowbit.errors import BudgetError, LowbitError
from lowbit.formats import Format, IntFormat
from lowbit.keep import KeepRule, parse_format, parse_rules
from lowbit.targets import target_named

ALLOCATORS = ("upgrade", "knapsack", "baq")
DEFAULT_GROUP = 128  # without a target; a target's own block size with one
WEIGHTINGS = ("relative", "stream", "raw", "kl")
BUDGET_BPW_RANGE = (2.0, 8.0)
UPGRADE_TRUST = 1.0  # allocate.planner.upgrade_choice; 1.5 helps only at a uniform format's own size (BENCHMARKS)
UPGRADE_FADE = True  # allocate.planner.upgrade_choice: a step down to the previous base, fading out


DEFAULT_CANDIDATES = (
    *("int2-g16-s8", "int2-g32-s8", "int2-g64-s8", "int2-g128"),
    *("int3-g32-s8", "int3-g64-s8", "int3-g128", "int3-g256", "nf3-g32-s8", "nf3-g64-s8", "nf3-g128"),
    *("int4-g32-s8", "int4-g64-s8", "int4-g128", "nf4-g32-s8", "nf4-g64-s8"),
    *("int5-g64-s8", "int6-g64-s8", "int8-g128"),
)


def default_candidates(symmetric: bool = False, scale_dtype: str = "float16") -> tuple[Format, ...]:
    """Integer and NormalFloat grids from 2 to 8 bits whose small groups keep their scales as 8-bit
    codes on a step per row (formats.twolevel), so a group of 32 or 16 costs about half what it
    would with float16 scales; groups of 128 and 256 keep float16 scales, which cost little
    there. On SmolLM2 these 19 lowered the budgets' KLD against the 22 of lowbit 0.1 (integer
    grids in groups of 32-256 with float16 scales, nf3/nf4 in groups of 64 and 128) by 12 % at
    3.0 bpw, 15 % at 3.5 and 7 % at 4.25, and measured in 0.96 times the time
    (BENCHMARKS.md, "Two-level scales"). They run in lowbit's own runtime; an export target has
    its own list."""
    return tuple(
        replace(parse_format(name, symmetric=symmetric), scale_dtype=scale_dtype) for name in DEFAULT_CANDIDATES
    )


def _candidates(target, symmetric: bool, scale_dtype: str) -> tuple[Format, ...]:
    if target is not None:
        return target.budget_formats(symmetric, scale_dtype)
    return default_candidates(symmetric, scale_dtype)


def _positive_int(value: Any, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise LowbitError(f"{what} must be a positive whole number, got {value!r}")


def _finite(value: Any, what: str, low: float, high: float, example: str) -> None:
    try:
        ok = math.isfinite(value) and low <= value <= high
    except TypeError:
        ok = False
    if not ok:
        raise LowbitError(f"{what} must be a number from {low:g} to {high:g}, got {value!r}; e.g. {example}")


@dataclass(frozen=True)
class GPTQSettings:
    """Solver and pass options of GPTQ (all of them change the result)."""

    method: ClassVar[str] = "gptq"

    percdamp: float = 0.01  # damping as a fraction of mean diag(H)
    block_size: int = 128  # columns per lazy update block
    act_order: bool = True  # columns by decreasing diag(H), static groups (much better on smollm2-135m)
    true_sequential: bool = True  # attention inputs, then o_proj, then MLP: each sees the earlier quantized
    batch_size: int = 8  # calibration windows per block forward
    clip_search: bool = True  # group ranges by a diag(H)-weighted search (solvers.gptq.fit_clipped)
    scale_refit: bool = True  # least-squares scales for the final codes (solvers.gptq.refit_scales)
    # next block's inputs from the last stage's pass plus a linear correction, not a further pass;
    # keeps the last linear's inputs in memory (e.g. 4 bytes x intermediate size x calibration tokens)
    reuse_last_stage: bool = True
    # activation-aware scales (transforms/awq.py) searched and folded per block before its solves
    awq: bool = False
    # each linear solved toward the float model's output on its quantized inputs (solvers/float_target.py);
    # carries the float model's activations beside the quantized ones through the walk
    float_target: bool = False
    # the target's own damping (fraction of mean diag(H)); 0.1 beat the solver's 0.01 on every smollm2 run (BENCHMARKS)
    float_target_damp: float = 0.1

    def __post_init__(self) -> None:
        _finite(self.percdamp, "the damping (--damp)", 0.0, 1.0, "--damp 0.01")
        _finite(self.float_target_damp, "the float target's damping (--float-target-damp)", 0.0, 10.0, "0.1")
        _positive_int(self.batch_size, "the calibration batch size (--calib-batch-size)")
        _positive_int(self.block_size, "the GPTQ block size")

    def solver_options(self) -> dict[str, Any]:
        """Keyword arguments of solvers.gptq_quantize."""
        return {
            "block_size": self.block_size,
            "percdamp": self.percdamp,
            "act_order": self.act_order,
            "clip_search": self.clip_search,
            "scale_refit": self.scale_refit,
        }


@dataclass(frozen=True)
class RTNSettings:
    """Round to nearest: no data; optionally a per-group range search on squared error."""

    method: ClassVar[str] = "rtn"

    clip_search: bool = False


SOLVERS: dict[str, type] = {s.method: s for s in (GPTQSettings, RTNSettings)}


@dataclass(frozen=True, eq=False)
class Calibration:
    """Calibration windows: a named data set or text file sampled as protocol.md says, or ready
    token windows [nsamples, seqlen] (then nsamples and seqlen are theirs)."""

    source: str | torch.Tensor = "c4"
    nsamples: int = 128
    seqlen: int = 512

    def __post_init__(self) -> None:
        if isinstance(self.source, torch.Tensor):
            if self.source.dim() != 2 or self.source.numel() == 0:
                raise LowbitError("calibration token windows must be a non-empty [windows, tokens] tensor")
            object.__setattr__(self, "nsamples", int(self.source.shape[0]))
            object.__setattr__(self, "seqlen", int(self.source.shape[1]))
        _positive_int(self.nsamples, "the number of calibration windows (--nsamples)")
        _positive_int(self.seqlen, "the calibration window length (--calib-seqlen)")

    @property
    def name(self) -> str:
        return "token windows" if isinstance(self.source, torch.Tensor) else str(self.source)


@dataclass(frozen=True)
class Budget:
    """Mixed precision: an average in bits per weight over the quantized linears (`bpw`), or the
    bytes of the whole weights file (`size_bytes`), met by giving each layer its own format
    from `candidates`."""

    bpw: float | None = None
    size_bytes: int | None = None
    candidates: tuple[Format, ...] = field(default_factory=default_candidates)
    allocator: str = "upgrade"
    weighting: str = "kl"
    trust: float = UPGRADE_TRUST  # upgrade: how much worse than under the uniform base a layer may get
    fade: bool = UPGRADE_FADE  # upgrade: near a uniform format's size, layers may fall to the cheaper base's error
    refine_seconds: float = 0.0  # > 0: then search plans by measured KL for this long (allocate.evolve)
    refine_windows: int = 4

    def __post_init__(self) -> None:
        if self.bpw is not None and self.size_bytes is not None:
            raise LowbitError("give a bit budget (--bits/--bpw) or a size (--size), not both")
        if self.bpw is None and self.size_bytes is None:
            raise LowbitError("a budget needs bits per weight (--bits 3.25) or a size (--size 70MB)")
        if self.bpw is not None:
            _finite(self.bpw, "a bit budget (--bits/--bpw)", *BUDGET_BPW_RANGE, "--bits 3.25")
        if self.size_bytes is not None:
            _positive_int(self.size_bytes, "a size budget (--size) in bytes")
        if not self.candidates:
            raise BudgetError("a budget needs at least one candidate format")
        object.__setattr__(self, "candidates", tuple(self.candidates))
        if self.allocator not in ALLOCATORS:
            raise BudgetError(f"unknown allocator {self.allocator!r}; use one of {', '.join(ALLOCATORS)}")
        if self.weighting not in WEIGHTINGS:
            raise LowbitError(f"unknown error weighting {self.weighting!r}; use one of {', '.join(WEIGHTINGS)}")
        _finite(self.trust, "the upgrade allocator's trust (--trust)", 1.0, 100.0, "--trust 1.5")
        if not isinstance(self.fade, bool):
            raise LowbitError(f"fade (--fade) must be True or False, got {self.fade!r}")
        _finite(self.refine_seconds, "the refinement time (--refine, seconds)", 0.0, 1e9, "--refine 300")
        _positive_int(self.refine_windows, "the refinement windows (--refine-windows)")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["candidates"] = [f.to_dict() for f in self.candidates]
        return d


@dataclass(frozen=True, eq=False)
class Recipe:
    """One quantization request: one `format` for every layer, or a `budget` that the allocator
    meets with a format per layer."""

    solver: GPTQSettings | RTNSettings = field(default_factory=GPTQSettings)
    format: Format | None = None  # without a budget, None means int4 g128 asymmetric
    budget: Budget | None = None
    keep: tuple[KeepRule, ...] = ()
    calibration: Calibration = field(default_factory=Calibration)
    storage_dtype: str = "float16"  # unquantized tensors (norms, embeddings kept in float, biases)
    target: str | None = None  # an export format (lowbit.targets) that every chosen format must fit

    def __post_init__(self) -> None:
        if type(self.solver) not in SOLVERS.values():
            raise LowbitError(f"unknown solver settings {self.solver!r}; use GPTQSettings or RTNSettings")
        if self.format is not None and self.budget is not None:
            raise LowbitError("a recipe has one format for every layer or a budget, not both")
        if self.format is None and self.budget is None:
            object.__setattr__(self, "format", IntFormat(4, 128))
        if self.budget is not None and self.method != "gptq":
            raise LowbitError("a budget needs --method gptq (the measurement pass solves every candidate with it)")
        dtype_named(self.storage_dtype, "storage dtype (--storage-dtype)")
        object.__setattr__(self, "keep", tuple(self.keep))
        if self.target is not None:
            target = target_named(self.target)
            if self.format is not None:
                target.check(self.format, "the format (--bits or --format, --group-size, --sym)")
            for fmt in self.budget.candidates if self.budget is not None else ():
                target.check(fmt, "a budget candidate")
            for rule in self.keep:
                if rule.fmt is not None:
                    target.check(rule.fmt, f"--keep {rule.pattern}")
            if target.scales_in_model_dtype:  # engines read scales in the model's dtype
                formats = [self.format] if self.format is not None else list(self.budget.candidates)
                formats += [r.fmt for r in self.keep if r.fmt is not None]
                odd = next((f for f in formats if f.scale_dtype != self.storage_dtype), None)
                if odd is not None:
                    raise LowbitError(
                        f"--target {target.name} stores scales in the model's dtype, the storage dtype "
                        f"({self.storage_dtype}); {odd.name} has {odd.scale_dtype} scales: give --scale-dtype "
                        f"{self.storage_dtype}, or --storage-dtype {odd.scale_dtype}"
                    )

    @property
    def method(self) -> str:
        return self.solver.method

    @property
    def needs_calibration(self) -> bool:
        return self.method == "gptq"

    @classmethod
    def build(
        cls,
        bits: int = 4,
        group_size: int | None | str = "default",
        symmetric: bool | None = None,
        method: str = "gptq",
        *,
        target: str | None = None,
        clip_search: bool | None = None,
        scale_dtype: str = "float16",
        storage_dtype: str = "float16",
        calib: str | torch.Tensor = "c4",
        nsamples: int = 128,
        seqlen: int = 512,
        gptq: GPTQSettings | None = None,
        budget_bpw: float | None = None,
        size_bytes: int | None = None,
        candidates: str | list[Format] | tuple[Format, ...] | None = None,
        allocator: str = "upgrade",
        weighting: str = "kl",
        trust: float = UPGRADE_TRUST,
        fade: bool = UPGRADE_FADE,
        refine_seconds: float = 0.0,
        refine_windows: int = 4,
        keep: str | list[KeepRule] | tuple[KeepRule, ...] | None = None,
        format: str | Format | None = None,
    ) -> Recipe:
        """A recipe from the flat options the command line and `lowbit.quantize` take.

        `clip_search` (default: on for GPTQ, off for RTN) sets the range search of whichever
        solver runs. With `budget_bpw` or `size_bytes`, `bits` is not used; `group_size`,
        `symmetric` and `scale_dtype` still shape the default candidates and keep rules.

        With a `target` ("gguf", "compressed-tensors"), `bits` names the target's format of that width unless a
        group size or symmetry is given, and the default candidates are every format it holds.
        Without one, the group size defaults to 128 and the grid to asymmetric.

        `format` names every layer's format outright (e.g. "iq4_nl", "q5_0", "int3-g64-sym", or
        a Format), for the grids `bits` cannot name; it excludes a budget. `candidates` (Formats,
        or names such as "q4_0,q5_0,q6_k,q8_0") replaces a budget's default candidates."""
        tgt = target_named(target) if target is not None else None
        explicit = group_size != "default" or symmetric is not None
        if tgt is not None:  # what the user did not name comes from the target's own grid
            grid_group, grid_symmetric = tgt.default_grid()
            group_size = grid_group if group_size == "default" else group_size
            symmetric = grid_symmetric if symmetric is None else symmetric
        group_size = DEFAULT_GROUP if group_size == "default" else group_size
        symmetric = bool(symmetric)
        if method not in SOLVERS:
            raise LowbitError(f"unknown method {method!r}; available: {', '.join(SOLVERS)}")
        if method == "gptq":
            solver: GPTQSettings | RTNSettings = gptq or GPTQSettings()
            if clip_search is not None:
                solver = replace(solver, clip_search=clip_search)
        else:
            if gptq is not None:
                raise LowbitError("GPTQ settings were given for --method rtn; drop them or use --method gptq")
            solver = RTNSettings(clip_search=bool(clip_search))
        budget = None
        if isinstance(candidates, str):
            names = [c.strip() for c in candidates.split(",") if c.strip()]
            if not names:
                raise LowbitError("--candidates names no format; give a comma-separated list such as q4_0,q5_0,q8_0")
            candidates = list(dict.fromkeys(parse_format(c, group_size, symmetric, "--candidates") for c in names))
        if budget_bpw is not None or size_bytes is not None:
            budget = Budget(
                bpw=budget_bpw,
                size_bytes=size_bytes,
                candidates=tuple(candidates) if candidates else _candidates(tgt, symmetric, scale_dtype),
                allocator=allocator,
                weighting=weighting,
                trust=trust,
                fade=fade,
                refine_seconds=refine_seconds,
                refine_windows=refine_windows,
            )
        fmt = None
        if format is not None:
            if budget is not None:
                raise LowbitError("give a format or a budget (--bits with a decimal, --bpw, --size), not both")
            fmt = parse_format(format, group_size, symmetric, "--format") if isinstance(format, str) else format
        elif budget is None:
            fmt = (
                tgt.with_bits(bits, scale_dtype)
                if tgt is not None and not explicit
                else IntFormat(bits, group_size, symmetric, scale_dtype)
            )
        if budget is not None:  # still refuse what would be refused without the budget
            IntFormat(4, group_size, symmetric, scale_dtype)
        rules = keep if isinstance(keep, (list, tuple)) else parse_rules(keep, group_size, symmetric)
        return cls(
            solver=solver,
            format=fmt,
            budget=budget,
            keep=tuple(rules),
            calibration=Calibration(calib, nsamples, seqlen),
            storage_dtype=storage_dtype,
            target=target,
        )

    def settings(self) -> dict[str, Any]:
        """The manifest's `settings`: what was asked, in the keys `lowbit inspect` reads."""
        out: dict[str, Any] = {"format": None if self.format is None else self.format.to_dict()}
        if self.target is not None:
            out["target"] = self.target
        if isinstance(self.solver, RTNSettings):
            out["clip_search"] = self.solver.clip_search
        if self.keep:
            out["keep"] = [{"pattern": r.pattern, "format": r.fmt.to_dict() if r.fmt else None} for r in self.keep]
        if isinstance(self.solver, GPTQSettings):
            out["gptq"] = asdict(self.solver)
            out["calibration"] = self.calibration.name
            out["nsamples"] = self.calibration.nsamples
            out["seqlen"] = self.calibration.seqlen
        return out
