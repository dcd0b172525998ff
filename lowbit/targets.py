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
from lowbit.formats.ggml import BLOCK, GGML_TYPES, ggml_type


@dataclass(frozen=True)
class Target:
    name: str
    formats: tuple[Format, ...]  # every format it can hold, fewest bits first
    row_multiple: int  # a tensor's rows must split into blocks of this many weights

    def holds(self, fmt: Format) -> bool:
        return fmt in self.formats

    def label(self, fmt: Format) -> str:
        """The format as the target's users know it (e.g. Q4_0 for gguf)."""
        if self.name == "gguf":
            t = ggml_type(fmt)
            return f"{t.name} ({fmt.name})" if t else fmt.name
        return fmt.name

    def nearest(self, fmt: Format) -> Format:
        """The held format closest in bits (ties: the larger)."""
        bits = getattr(fmt, "bits", 4)
        return min(self.formats, key=lambda f: (abs(f.bits - bits), -f.bits))

    def with_bits(self, bits: int) -> Format:
        """The held format of `bits` bits, or a refusal naming the ones there are."""
        for f in self.formats:
            if f.bits == bits:
                return f
        held = ", ".join(f"{f.bits} ({self.label(f)})" for f in self.formats)
        raise FormatError(f"--target {self.name} holds {held} bits; {bits} bits is not one of them")

    def check(self, fmt: Format, where: str) -> None:
        """Refuse a format the target cannot hold, naming where it was asked for and what would do."""
        if not self.holds(fmt):
            near = self.nearest(fmt)
            raise FormatError(
                f"{where}: {fmt.name} cannot be written to {self.name}; the nearest format it holds is "
                f"{self.label(near)}"
            )

    def check_shape(self, name: str, in_features: int) -> None:
        if in_features % self.row_multiple:
            raise FormatError(
                f"{name} has rows of {in_features} weights, not a multiple of {self.row_multiple} (the block of "
                f"every {self.name} type lowbit writes); keep it in float with --keep {name}"
            )


TARGETS: dict[str, Target] = {
    "gguf": Target("gguf", tuple(t.fmt for t in GGML_TYPES), BLOCK),
}


def target_named(name: str) -> Target:
    if name not in TARGETS:
        raise FormatError(f"unknown target {name!r}; lowbit writes: {', '.join(TARGETS)}")
    return TARGETS[name]


__all__ = ["TARGETS", "Target", "target_named"]
