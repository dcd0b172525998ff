"""Export targets: what a file format other engines load can hold.

A target is given up front (`--target gguf`), so the candidates, the allocator and the solver
only ever see formats the target can write, and what GPTQ solves is exactly what is exported:
no re-rounding. The same check refuses to export an artifact that holds something else, naming
the first layer that does not fit and the nearest format that would.
"""

from __future__ import annotations

from dataclasses import dataclass

from lowbit.errors import FormatError
from lowbit.formats import Format
from lowbit.formats.ggml import GGML_TYPES, ggml_type


@dataclass(frozen=True)
class Target:
    name: str
    formats: tuple[Format, ...]  # every format it can hold, fewest bits first

    def row_multiple(self, fmt: Format) -> int:
        """A tensor's rows must split into blocks of this many weights to be written in `fmt`."""
        t = ggml_type(fmt) if self.name == "gguf" else None
        return t.block if t is not None else fmt.row_multiple

    @property
    def budget_formats(self) -> tuple[Format, ...]:
        """The default candidates of a budget: every format but the float-minimum grids (Q4_1,
        Q5_1), which reproduce smollm2-135m's own grid and so would make its measurements say
        nothing (protocol.md). A model is planned over those that fit every layer it quantizes
        (lowbit.allocate.plan.find_targets): k-quants need rows of 256."""
        return tuple(f for f in self.formats if f.kind != "intmin")

    def holds(self, fmt: Format) -> bool:
        return fmt in self.formats

    def label(self, fmt: Format, short: bool = False) -> str:
        """The format as the target's users know it (e.g. Q4_0 for gguf)."""
        t = ggml_type(fmt) if self.name == "gguf" else None
        if t is None:
            return fmt.name
        return t.name.lower() if short else f"{t.name} ({fmt.name})"

    def nearest(self, fmt: Format) -> Format:
        """The held format closest in bits (ties: the larger)."""
        bits = getattr(fmt, "bits", 4)
        return min(self.formats, key=lambda f: (abs(f.bits - bits), -f.bits))

    def with_bits(self, bits: int) -> Format:
        """The held format of `bits` bits (of several, the first: the one with the smallest
        blocks), or a refusal naming the widths there are."""
        for f in self.formats:
            if f.bits == bits:
                return f
        held = ", ".join(str(b) for b in sorted({f.bits for f in self.formats}))
        raise FormatError(
            f"--target {self.name} holds {held} bits; {bits} bits is not one of them "
            f"(--format names a type: {', '.join(self.label(f, short=True) for f in self.formats)})"
        )

    def check(self, fmt: Format, where: str) -> None:
        """Refuse a format the target cannot hold, naming where it was asked for and what would do."""
        if not self.holds(fmt):
            near = self.nearest(fmt)
            raise FormatError(
                f"{where}: {fmt.name} cannot be written to {self.name}; the nearest format it holds is "
                f"{self.label(near)}"
            )

    def check_shape(self, name: str, in_features: int, fmt: Format) -> None:
        """Refuse a tensor whose rows do not split into `fmt`'s blocks, naming what would fit."""
        row = self.row_multiple(fmt)
        if in_features % row:
            fits = [self.label(f, short=True) for f in self.formats if in_features % self.row_multiple(f) == 0]
            instead = f"use {', '.join(fits)} for it, or " if fits else ""
            raise FormatError(
                f"{name} has rows of {in_features} weights, not a multiple of {row} (the block of "
                f"{self.label(fmt)}); {instead}keep it in float with --keep {name}"
            )


TARGETS: dict[str, Target] = {
    "gguf": Target("gguf", tuple(t.fmt for t in GGML_TYPES)),
}


def target_named(name: str) -> Target:
    if name not in TARGETS:
        raise FormatError(f"unknown target {name!r}; lowbit writes: {', '.join(TARGETS)}")
    return TARGETS[name]


__all__ = ["TARGETS", "Target", "target_named"]
