"""Fitted codebooks: every row of a weight has its own 2^b levels, every weight a b-bit code that
names one of them: w[r, i] = levels[r, code[r, i]] (SqueezeLLM's dense format).

The levels are fitted to the row by weighted k-means in one dimension, from NormalFloat levels
scaled to the row, each weight counted by how much error there matters: under GPTQ, by the square
root of its input channel's diag(H) (the importance the solver passes); under round-to-nearest,
equally. The grid then follows the row's distribution (dense where its weights crowd, wide at
its outliers) instead of a fixed shape times a scale. GPTQ then rounds the error-updated weights
to those levels, and the solver's level refit
(`solvers.gptq.refit_levels`) re-solves them for the final codes by least squares against H.

No group scales: a row's levels cost 2^b float16 values once, so the overhead falls with the
row's length (3 bits on 576-wide rows: 3.22 bits per weight; on 1536-wide: 3.08). lowbit's own
runtime runs it; no export format holds it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from lowbit.dtypes import DTYPES
from lowbit.errors import FormatError
from lowbit.formats.integer import IntFormat, _compute_dtype
from lowbit.formats.levels import normal_float_levels
from lowbit.formats.packing import pack_codes, packed_words, unpack_codes

KMEANS_ITERATIONS = 30  # Lloyd steps at most; the fit stops as soon as no level moves


@dataclass(frozen=True)
class CodebookFormat(IntFormat):
    """b-bit codes into per-row fitted levels (2 to 4 bits: the levels of wider codes would cost
    more than they save on rows as short as a small model's)."""

    group_size: int | None = None
    symmetric: bool = True

    kind: ClassVar[str] = "codebook"
    fits_by_importance: ClassVar[bool] = True  # `fit` takes each column's importance (GPTQ: diag(H))

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or not 2 <= self.bits <= 4:
            raise FormatError(f"a codebook has 2 to 4 bits per code, got {self.bits!r}; e.g. cb3")
        if self.group_size is not None:
            raise FormatError(f"a codebook is fitted per row, not in groups of {self.group_size}; write cb{self.bits}")
        if not self.symmetric:
            raise FormatError("a codebook has no zero point; its levels are fitted")
        super().__post_init__()

    @property
    def name(self) -> str:
        return f"cb{self.bits}"

    @property
    def num_levels(self) -> int:
        return 1 << self.bits

    def storage_bits(self, out_features: int, in_features: int) -> int:
        """Codes plus every row's levels in the scale dtype."""
        return out_features * (in_features * self.bits + self.num_levels * self.scale_bits)

    # ---- fit / quantize / dequantize on grouped tensors [..., 1, in] ----------------------
    def fit(
        self,
        w: torch.Tensor,
        mask: torch.Tensor | None = None,
        clip: float = 1.0,
        importance: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor]:
        """Each row's levels [..., 1, 2^b], sorted and rounded to the scale dtype. `importance` (GPTQ:
        diag(H)) weighs each column by its square root: with diag(H) itself, the few input channels
        of very high energy (576x the median in a smollm2 q_proj) pulled every level toward their
        weights, and GPTQ's output error there came out 1.5-1.7x higher (down_proj's, the same).
        `clip` has no meaning here."""
        w = _compute_dtype(w)
        weight = torch.ones_like(w) if importance is None else importance.to(w.dtype).clamp_min(0).sqrt().expand_as(w)
        if mask is not None:
            weight = weight * mask
        # a row whose weights all count zero is fitted as if they counted equally
        dead = weight.sum(-1, keepdim=True) <= 0
        weight = torch.where(dead, torch.ones_like(weight) if mask is None else mask.to(w.dtype), weight)
        levels = weighted_kmeans(w, weight, self._normal_start(w, weight))
        return (self._round_levels(levels),)

    def _normal_start(self, w: torch.Tensor, weight: torch.Tensor, steps: int = 20) -> torch.Tensor:
        """NormalFloat levels times each row's peak, shrunk by the factor in 1 ... 0.5 with the least
        weighted error. From it, GPTQ's output error on two smollm2 layers was 0.4-42 % lower than
        from the weighted quantiles (the quantiles crowd the levels into the bulk)."""
        grid = torch.tensor(normal_float_levels(self.bits), dtype=w.dtype, device=w.device)
        peak = w.abs().amax(-1, keepdim=True)
        best, best_err = None, None
        for i in range(steps + 1):
            levels = grid * peak * (1.0 - 0.5 * i / steps)
            err = (weight * (nearest(w, levels) - w) ** 2).sum(-1, keepdim=True)
            if best is None:
                best, best_err = levels, err
            else:
                better = err < best_err
                best, best_err = torch.where(better, levels, best), torch.where(better, err, best_err)
        return best

    def _round_levels(self, levels: torch.Tensor) -> torch.Tensor:
        return levels.to(DTYPES[self.scale_dtype]).to(torch.float32).sort(-1).values

    def quantize(self, w: torch.Tensor, levels: torch.Tensor, *_: torch.Tensor) -> torch.Tensor:
        """The nearest level's code (as float) for each weight; `levels` sorted, one row per row of `w`."""
        w = _compute_dtype(w)
        mids = ((levels[..., 1:] + levels[..., :-1]) / 2).to(w.dtype)
        return torch.searchsorted(mids.contiguous(), w.contiguous()).to(w.dtype)

    def dequantize(self, q: torch.Tensor, levels: torch.Tensor, *_: torch.Tensor) -> torch.Tensor:
        return levels.to(q.dtype).gather(-1, q.long())

    def assemble(self, codes: torch.Tensor, params: list[tuple[torch.Tensor, ...]]) -> CodebookTensor:
        """A CodebookTensor from codes [out, in] and the one group's (levels [out, 2^b],)."""
        (levels,) = params[0]
        return CodebookTensor(self, tuple(codes.shape), codes.round().to(torch.uint8), levels.to(self._dtype))

    @property
    def _dtype(self) -> torch.dtype:
        return DTYPES[self.scale_dtype]

    def quantize_tensor(self, weight: torch.Tensor, clip_search: bool = False, **_) -> CodebookTensor:
        """Round-to-nearest onto levels fitted to each row with every weight counted equally."""
        w3, mask = self.to_groups(weight.float())
        (levels,) = self.fit(w3, mask)
        codes = self.quantize(w3, levels)
        return CodebookTensor(self, tuple(weight.shape), codes[:, 0].to(torch.uint8), levels[:, 0].to(self._dtype))

    # ---- packed storage ------------------------------------------------------------------
    def packed_buffers(self, out_features: int, in_features: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return {
            "qweight": ((out_features, packed_words(in_features, self.bits)), torch.int32),
            "levels": ((out_features, self.num_levels), self._dtype),
        }

    def dequantize_packed(self, packed: dict[str, torch.Tensor], in_features: int) -> torch.Tensor:
        codes = unpack_codes(packed["qweight"], self.bits, in_features)
        return packed["levels"].float().gather(1, codes.long())

    def unpack(self, shape: tuple[int, int], packed: dict[str, torch.Tensor]) -> CodebookTensor:
        return CodebookTensor(self, shape, unpack_codes(packed["qweight"], self.bits, shape[1]), packed["levels"])


def nearest(w: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Each value of `w` [..., n] replaced by the nearest of its row's sorted `levels` [..., k]."""
    mids = (levels[..., 1:] + levels[..., :-1]) / 2
    return levels.gather(-1, torch.searchsorted(mids.contiguous(), w.contiguous()))


def weighted_kmeans(
    w: torch.Tensor, weight: torch.Tensor, centres: torch.Tensor, iterations: int = KMEANS_ITERATIONS
) -> torch.Tensor:
    """Sorted centres per row of `w` [..., n], from `centres` [..., k], lowering sum(weight *
    (w - centre)^2) by Lloyd's steps. A centre that loses every weight stays where it was (it
    costs nothing and may win weights back)."""
    for _ in range(iterations):
        mids = (centres[..., 1:] + centres[..., :-1]) / 2
        near = torch.searchsorted(mids.contiguous(), w.contiguous())
        mass = torch.zeros_like(centres).scatter_add_(-1, near, weight)
        total = torch.zeros_like(centres).scatter_add_(-1, near, weight * w)
        moved = torch.where(mass > 0, total / mass.clamp_min(torch.finfo(w.dtype).tiny), centres).sort(-1).values
        if torch.equal(moved, centres):
            break
        centres = moved
    return centres


@dataclass
class CodebookTensor:
    """Codes and levels of one weight: codes uint8 [out, in], levels [out, 2^b] in the scale dtype."""

    fmt: CodebookFormat
    shape: tuple[int, int]
    codes: torch.Tensor
    levels: torch.Tensor

    zeros = None

    @property
    def scales(self) -> torch.Tensor:
        """The levels: what a codebook holds in place of group scales."""
        return self.levels

    def dequantize(self) -> torch.Tensor:
        return self.levels.float().gather(1, self.codes.long())

    def with_levels(self, levels: torch.Tensor) -> CodebookTensor:
        """Same codes, new levels (rounded to the stored dtype; any order: codes index them)."""
        return CodebookTensor(self.fmt, self.shape, self.codes, levels.to(self.levels.dtype))

    def split_rows(self, sizes: list[int]) -> list[CodebookTensor]:
        n = self.shape[1]
        parts = zip(sizes, self.codes.split(sizes), self.levels.split(sizes), strict=True)
        return [CodebookTensor(self.fmt, (rows, n), c, lv) for rows, c, lv in parts]

    def pack(self) -> dict[str, torch.Tensor]:
        return {"qweight": pack_codes(self.codes, self.fmt.bits), "levels": self.levels}
