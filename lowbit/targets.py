"""Export targets: what a file format other engines load can hold.

A target is given up front (`--target gguf`, `--target compressed-tensors`), so the candidates,
the allocator and the solver only ever see formats the target can write, and what GPTQ solves
is exactly what is exported: no re-rounding. The same check refuses to export an artifact that
holds something else, naming the first layer that does not fit and the nearest format that would.

- gguf: llama.cpp's table of block types (lowbit.formats.ggml); a row splits into blocks of 32
  or 256 weights. Any tensor may have its own type, the embedding and head included.
- compressed-tensors: integer grids of 2-8 bits with a scale (and zero point) per group, scales
  in the model's dtype; a group must divide the row (compressed-tensors refuses partial groups).
  vLLM fuses q/k/v and gate/up into one matrix each, so the linears that share an input must
  share one format; the embedding and head stay in float.
"""

from __future__ import annotations

from dataclasses import dataclass

from lowbit.errors import FormatError
from lowbit.formats import Format, IntFormat, RotatedFormat
from lowbit.formats.ggml import GGML_TYPES, ggml_type


@dataclass(frozen=True)
class Target:
    name: str
    fused_inputs: bool = False  # the linears that share an input (q/k/v, gate/up) share one format
    quantizes_tables: bool = True  # the embedding and head may be quantized
    scales_in_model_dtype: bool = False  # scales are stored in the dtype of the float tensors

    # ---- what each target answers ------------------------------------------------------
    def holds(self, fmt: Format) -> bool:
        raise NotImplementedError

    def row_multiple(self, fmt: Format) -> int:
        """A tensor's rows must split into blocks of this many weights to be written in `fmt`."""
        raise NotImplementedError

    def budget_formats(self, symmetric: bool, scale_dtype: str) -> tuple[Format, ...]:
        """A budget's default candidates (a model is planned over those that fit every layer it
        quantizes: lowbit.allocate.plan.find_targets)."""
        raise NotImplementedError

    def default_grid(self) -> tuple[int | None, bool]:
        """(group size, symmetric) when the user names neither."""
        raise NotImplementedError

    def with_bits(self, bits: int, scale_dtype: str) -> Format:
        """The format `--bits N` names under this target."""
        raise NotImplementedError

    def alternatives(self, fmt: Format) -> tuple[Format, ...]:
        """Formats to suggest instead of `fmt`, best first."""
        raise NotImplementedError

    def label(self, fmt: Format, short: bool = False) -> str:
        """The format as the target's users know it."""
        return fmt.name

    # ---- shared checks -----------------------------------------------------------------------
    def nearest(self, fmt: Format) -> Format:
        """The suggested format closest in bits (ties: the larger)."""
        bits = getattr(fmt, "bits", 4)
        return min(self.alternatives(fmt), key=lambda f: (abs(f.bits - bits), -f.bits))

    def check(self, fmt: Format, where: str) -> None:
        """Refuse a format the target cannot hold, naming where it was asked for and what would do."""
        if isinstance(fmt, RotatedFormat):
            raise FormatError(
                f"{where}: {fmt.name} turns the layer's inputs at run time (an online rotation), which "
                f"{self.name}'s engines cannot do; quantize without -rot formats, e.g. with "
                f"{self.label(self.nearest(fmt.base))}"
            )
        if not self.holds(fmt):
            raise FormatError(
                f"{where}: {fmt.name} cannot be written to {self.name}; the nearest format it holds is "
                f"{self.label(self.nearest(fmt))}"
            )

    def check_shape(self, name: str, in_features: int, fmt: Format) -> None:
        """Refuse a tensor whose rows do not split into `fmt`'s blocks, naming what would fit."""
        row = self.row_multiple(fmt)
        if in_features % row:
            alts = self.alternatives(fmt)
            fits = [self.label(f, short=True) for f in alts if in_features % self.row_multiple(f) == 0]
            instead = f"use {', '.join(fits)} for it, or " if fits else ""
            raise FormatError(
                f"{name} has rows of {in_features} weights, not a multiple of {row} (the block of "
                f"{self.label(fmt)}); {instead}keep it in float with --keep {name}"
            )


@dataclass(frozen=True)
class GGUFTarget(Target):
    """llama.cpp's block types, one table (lowbit.formats.ggml)."""

    formats: tuple[Format, ...] = ()  # fewest bits first

    def holds(self, fmt: Format) -> bool:
        return fmt in self.formats

    def row_multiple(self, fmt: Format) -> int:
        t = ggml_type(fmt)
        return t.block if t is not None else fmt.row_multiple

    def budget_formats(self, symmetric: bool = False, scale_dtype: str = "float16") -> tuple[Format, ...]:
        """Every type but the float-minimum grids (Q4_1, Q5_1), which reproduce smollm2-135m's own
        grid and so would make its measurements say nothing (protocol.md). k-quants need rows of 256."""
        return tuple(f for f in self.formats if f.kind != "intmin")

    def default_grid(self) -> tuple[int | None, bool]:
        grid = min(self.formats, key=self.row_multiple)  # the first of the smallest blocks: Q4_0's
        return grid.group_size, grid.symmetric

    def with_bits(self, bits: int, scale_dtype: str = "float16") -> Format:
        """The type of `bits` bits (of several, the one with the smallest blocks)."""
        for f in self.formats:
            if f.bits == bits:
                return f
        held = ", ".join(str(b) for b in sorted({f.bits for f in self.formats}))
        raise FormatError(
            f"--target {self.name} holds {held} bits; {bits} bits is not one of them "
            f"(--format names a type: {', '.join(self.label(f, short=True) for f in self.formats)})"
        )

    def alternatives(self, fmt: Format) -> tuple[Format, ...]:
        return self.formats

    def label(self, fmt: Format, short: bool = False) -> str:
        t = ggml_type(fmt)
        if t is None:
            return fmt.name
        return t.name.lower() if short else f"{t.name} ({fmt.name})"


CT_SCALE_DTYPES = ("float16", "bfloat16")
CT_GROUPS = (128, 64, 32, None)  # what vLLM's fast (Marlin) kernels run, None = per channel


@dataclass(frozen=True)
class CompressedTensorsTarget(Target):
    """compressed-tensors' pack-quantized integer grids, as llm-compressor writes them."""

    def holds(self, fmt: Format) -> bool:
        return type(fmt) is IntFormat and fmt.scale_dtype in CT_SCALE_DTYPES

    def row_multiple(self, fmt: Format) -> int:
        return fmt.group_size or 1

    def budget_formats(self, symmetric: bool = False, scale_dtype: str = "float16") -> tuple[Format, ...]:
        return tuple(IntFormat(b, g, symmetric, scale_dtype) for b in (2, 3, 4, 5, 6, 8) for g in (32, 64, 128))

    def default_grid(self) -> tuple[int | None, bool]:
        """Symmetric groups of 128, as llm-compressor's W4A16: vLLM's kernels run symmetric grids at
        every width but zero points only at 4 and 8 bits, and transformers (5.24) loads a mixed
        plan only when it is symmetric (README)."""
        return 128, True

    def with_bits(self, bits: int, scale_dtype: str = "float16") -> Format:
        group, symmetric = self.default_grid()
        return IntFormat(bits, group, symmetric, scale_dtype)

    def alternatives(self, fmt: Format) -> tuple[Format, ...]:
        bits = min(max(getattr(fmt, "bits", 4), 2), 8)
        symmetric = bool(getattr(fmt, "symmetric", False))
        dtype = fmt.scale_dtype if getattr(fmt, "scale_dtype", None) in CT_SCALE_DTYPES else "float16"
        own = getattr(fmt, "group_size", 128)
        groups = [own] + [g for g in CT_GROUPS if g != own] if own is None or own > 0 else CT_GROUPS
        return tuple(IntFormat(bits, g, symmetric, dtype) for g in groups)


TARGETS: dict[str, Target] = {
    "gguf": GGUFTarget("gguf", formats=tuple(t.fmt for t in GGML_TYPES)),
    "compressed-tensors": CompressedTensorsTarget(
        "compressed-tensors", fused_inputs=True, quantizes_tables=False, scales_in_model_dtype=True
    ),
}


def fits(fmt: Format, in_features: int, target: Target | None = None) -> bool:
    """Whether rows of `in_features` weights split into `fmt`'s blocks (the target's, if given)."""
    return in_features % (target.row_multiple(fmt) if target is not None else fmt.row_multiple) == 0


def target_named(name: str) -> Target:
    if name not in TARGETS:
        raise FormatError(f"unknown target {name!r}; lowbit writes: {', '.join(TARGETS)}")
    return TARGETS[name]


__all__ = ["TARGETS", "CompressedTensorsTarget", "GGUFTarget", "Target", "fits", "target_named"]
