"""Grids with a float minimum: w = scale * q + min, both float16 per group (llama.cpp's Q4_1, Q5_1).

Unlike lowbit's integer zero point, the minimum need not sit on the grid, so a group's range is
used exactly (no widening to include zero). The price is 16 bits per group instead of b bits.
Caveat: smollm2-135m's weights lie exactly on the 4-bit, group-32 member of this family, so on
that model these formats reproduce the source and say nothing about quality (protocol.md); they
are not default budget candidates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from lowbit.dtypes import DTYPES
from lowbit.formats.integer import IntFormat, _compute_dtype
from lowbit.formats.packing import pack_codes, packed_words, unpack_codes


@dataclass(frozen=True)
class MinFormat(IntFormat):
    """b-bit codes with a float16 scale and a float16 minimum per group."""

    kind: ClassVar[str] = "intmin"
    refits_scales: ClassVar[bool] = False  # the weight is affine, not linear, in the scale

    @property
    def name(self) -> str:
        g = "ch" if self.group_size is None else str(self.group_size)
        return f"int{self.bits}-g{g}-min"

    def storage_bits(self, out_features: int, in_features: int) -> int:
        groups = out_features * self.num_groups(in_features)
        return out_features * in_features * self.bits + groups * 2 * self.scale_bits

    def fit(
        self, w: torch.Tensor, mask: torch.Tensor | None = None, clip: float = 1.0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, min) per group: the group's own range (shrunk about its middle by `clip`) over
        2^b - 1 steps."""
        w = _compute_dtype(w)
        if mask is None:
            mask = torch.ones_like(w, dtype=torch.bool)
        inf = torch.tensor(float("inf"), dtype=w.dtype, device=w.device)
        lo = torch.where(mask, w, inf).amin(dim=-1, keepdim=True)
        hi = torch.where(mask, w, -inf).amax(dim=-1, keepdim=True)
        mid, half = (hi + lo) / 2, (hi - lo) / 2 * clip
        lo, hi = mid - half, mid + half
        dt = DTYPES[self.scale_dtype]
        scale = ((hi - lo) / self.maxq).to(dt).to(w.dtype)
        return scale, lo.to(dt).to(w.dtype)

    def quantize(self, w: torch.Tensor, scale: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        w = _compute_dtype(w)
        safe = torch.where(scale == 0, torch.ones_like(scale), scale)
        q = torch.where(scale == 0, 0.0, torch.round((w - low) / safe))
        return q.clamp(0, self.maxq)

    def dequantize(self, q: torch.Tensor, scale: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        return scale * q + low

    def assemble(self, codes: torch.Tensor, params: list[tuple[torch.Tensor, torch.Tensor]]) -> MinTensor:
        dt = DTYPES[self.scale_dtype]
        scales = torch.cat([p[0] for p in params], dim=1).to(dt)
        lows = torch.cat([p[1] for p in params], dim=1).to(dt)
        return MinTensor(self, tuple(codes.shape), codes.round().to(torch.uint8), scales, lows)

    def quantize_tensor(
        self, weight: torch.Tensor, clip_search: bool = False, grid: int = 40, max_shrink: float = 0.8, **_
    ) -> MinTensor:
        """Round-to-nearest; `clip_search` picks, per group, the range shrink with least MSE."""
        out, n = weight.shape
        w3, mask = self.to_groups(weight.float())
        scale, low = self.fit(w3, mask)
        if clip_search:
            best = self._group_error(w3, mask, scale, low)
            for i in range(1, grid + 1):
                s, lo = self.fit(w3, mask, clip=1.0 - max_shrink * i / grid)
                err = self._group_error(w3, mask, s, lo)
                better = err < best
                best = torch.where(better, err, best)
                scale, low = torch.where(better, s, scale), torch.where(better, lo, low)
        q = self.quantize(w3, scale, low).reshape(out, -1)[:, :n]
        params = [(scale[:, g], low[:, g]) for g in range(scale.shape[1])]
        return self.assemble(q, params)

    def packed_buffers(self, out_features: int, in_features: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        ng, dt = self.num_groups(in_features), DTYPES[self.scale_dtype]
        return {
            "qweight": ((out_features, packed_words(in_features, self.bits)), torch.int32),
            "scales": ((out_features, ng), dt),
            "mins": ((out_features, ng), dt),
        }

    def dequantize_packed(self, packed: dict[str, torch.Tensor], in_features: int) -> torch.Tensor:
        return self.unpack((packed["qweight"].shape[0], in_features), packed).dequantize()

    def unpack(self, shape: tuple[int, int], packed: dict[str, torch.Tensor]) -> MinTensor:
        codes = unpack_codes(packed["qweight"], self.bits, shape[1])
        return MinTensor(self, shape, codes, packed["scales"], packed["mins"])


@dataclass
class MinTensor:
    """Codes [out, in] (uint8) with each group's float16 scale and minimum [out, G]."""

    fmt: MinFormat
    shape: tuple[int, int]
    codes: torch.Tensor
    scales: torch.Tensor
    mins: torch.Tensor

    zeros = None

    def dequantize(self) -> torch.Tensor:
        out, n = self.shape
        gs, ng = self.fmt.group_len(n), self.scales.shape[1]
        c = torch.nn.functional.pad(self.codes.float(), (0, ng * gs - n)).view(out, ng, gs)
        w = self.scales.float().unsqueeze(-1) * c + self.mins.float().unsqueeze(-1)
        return w.view(out, ng * gs)[:, :n]

    def split_rows(self, sizes: list[int]) -> list[MinTensor]:
        n = self.shape[1]
        parts = zip(sizes, self.codes.split(sizes), self.scales.split(sizes), self.mins.split(sizes), strict=True)
        return [MinTensor(self.fmt, (rows, n), c, s, m) for rows, c, s, m in parts]

    def pack(self) -> dict[str, torch.Tensor]:
        return {"qweight": pack_codes(self.codes, self.fmt.bits), "scales": self.scales, "mins": self.mins}
