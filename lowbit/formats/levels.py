"""Non-uniform grids: each b-bit code names one of 2^b fixed levels, times a scale per group.

Stored exactly like a symmetric integer grid (packed codes, one scale per group, no zero
point), so the runtime, the size accounting and every solver treat it as one; only the map
from code to value differs. The grids:

- iq4nl: llama.cpp's IQ4_NL (16 levels in [-127, 113]; in GGUF with groups of 32 and an fp16
  scale, the same 4.5 bits per weight as Q4_0), levels denser near zero, where most weights lie;
- nf4, nf3: QLoRA's NormalFloat, the quantiles of a normal distribution with one exact zero
  (2^(b-1) levels above zero, 2^(b-1) - 1 below), scaled to [-1, 1] (`normal_float_levels`);
- fp4: the E2M1 minifloat's values (0, 0.5, 1, 1.5, 2, 3, 4, 6 and their negatives; its two
  zeros take two codes, as in the hardware format).

Only iq4nl with groups of 32 is an export format (GGUF's IQ4_NL); the others run in lowbit's
own runtime.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch

from lowbit.errors import FormatError
from lowbit.formats.integer import IntFormat, _compute_dtype

GRIDS: dict[str, tuple[float, ...]] = {
    # llama.cpp's kvalues_iq4nl (ggml-common.h)
    "iq4nl": (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113),
    # normal_float_levels(4) and (3), to 10 digits (QLoRA's published NF4 table agrees to 1e-7)
    "nf4": (
        -1.0, -0.6961928056, -0.5250729594, -0.3949174259, -0.2844413089, -0.1847734028, -0.0910499760, 0.0,
        0.0795803150, 0.1609301444, 0.2461122513, 0.3379151367, 0.4407097319, 0.5626168880, 0.7229566442, 1.0,
    ),
    "nf3": (-1.0, -0.5350227085, -0.2469314318, 0.0, 0.1833374803, 0.3819939543, 0.6229857417, 1.0),
    "fp4": (-6.0, -4.0, -3.0, -2.0, -1.5, -1.0, -0.5, -0.0, 0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0),
}  # fmt: skip


def normal_float_levels(bits: int) -> list[float]:
    """NormalFloat levels as QLoRA defines them: the normal quantiles at 2^(b-1) + 1 evenly spaced
    probabilities from 1/2 up to `offset` (zero and the positive levels) and at 2^(b-1) from 1/2 up
    to it (the negative ones), scaled to [-1, 1]; `offset` lies halfway between 1 - 1/(2 * 2^b) and
    1 - 1/(2 * (2^b - 1)), so the extreme levels sit inside the tails."""
    from scipy.stats import norm

    n = 1 << bits
    offset = 1 - 0.5 * (1 / (2 * n) + 1 / (2 * (n - 1)))
    positive = norm.ppf(torch.linspace(offset, 0.5, n // 2 + 1, dtype=torch.float64)[:-1].numpy())
    negative = -norm.ppf(torch.linspace(offset, 0.5, n // 2, dtype=torch.float64)[:-1].numpy())
    levels = sorted([*positive.tolist(), 0.0, *negative.tolist()])
    return [v / max(abs(v) for v in levels) for v in levels]


@dataclass(frozen=True)
class LevelFormat(IntFormat):
    """b-bit codes into a table of levels (`grid`), one scale per group: w = scale * levels[code]."""

    grid: str = "iq4nl"
    symmetric: bool = True

    kind: ClassVar[str] = "levels"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.grid not in GRIDS:
            raise FormatError(f"unknown level grid {self.grid!r}; known: {', '.join(GRIDS)}")
        if len(GRIDS[self.grid]) != 1 << self.bits:
            raise FormatError(f"grid {self.grid} has {len(GRIDS[self.grid])} levels, not 2^{self.bits}")
        if not self.symmetric:
            raise FormatError(f"grid {self.grid} has no zero point; it is symmetric by construction")

    @property
    def name(self) -> str:
        g = "ch" if self.group_size is None else str(self.group_size)
        return f"{self.grid}-g{g}"

    def levels(self, device: torch.device | str | None = None) -> torch.Tensor:
        return torch.tensor(GRIDS[self.grid], dtype=torch.float32, device=device)

    def code_values(self, codes: torch.Tensor, zeros: torch.Tensor | float | None) -> torch.Tensor:
        return self.levels(codes.device)[codes.long()]

    def _fit_with(
        self,
        w: torch.Tensor,
        mask: torch.Tensor | None,
        clip: float,
        round_scale: Callable[[torch.Tensor], torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per group, the better (by squared error) of two scales, each rounded by `round_scale`
        (IntFormat.fit passes the stored dtype's): the largest-magnitude weight on the grid's
        largest-magnitude level, or on the extreme level of its own sign."""
        w = _compute_dtype(w)
        if mask is None:
            mask = torch.ones_like(w, dtype=torch.bool)
        levels = self.levels(w.device)
        lo, hi = levels[0].item(), levels[-1].item()
        wm = torch.where(mask, w, torch.zeros_like(w))
        peak = wm.gather(-1, wm.abs().argmax(dim=-1, keepdim=True)) * clip
        zero = torch.zeros_like(peak)
        best_scale, best_err = None, None
        for extreme in (lo, torch.where(peak >= 0, torch.full_like(peak, hi), torch.full_like(peak, lo))):
            scale = round_scale(peak / extreme)
            err = (((self.dequantize(self.quantize(w, scale, zero), scale, zero) - w) * mask) ** 2).sum(-1, True)
            if best_scale is None:
                best_scale, best_err = scale, err
            else:
                better = err < best_err
                best_scale, best_err = torch.where(better, scale, best_scale), torch.where(better, err, best_err)
        return best_scale, zero

    def quantize(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        """The nearest level's code (as float) for each weight."""
        levels = self.levels(w.device)
        mids = (levels[1:] + levels[:-1]) / 2
        return torch.bucketize((_compute_dtype(w) / scale).contiguous(), mids.to(w.dtype)).to(w.dtype)

    def dequantize(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        return self.levels(q.device).to(q.dtype)[q.long()] * scale
