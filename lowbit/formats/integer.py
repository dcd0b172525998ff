"""Integer grids: b-bit codes with one scale (and zero point) per group of inputs.

Groups run along the input dimension of a weight [out, in]. When the group
size does not divide `in`, the last group of each row is partial, as in the
reference GPTQ code, and is counted exactly in the size accounting.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch

from lowbit.dtypes import DTYPES
from lowbit.errors import FormatError
from lowbit.formats.packing import pack_codes, packed_words, unpack_codes


@dataclass(frozen=True)
class IntFormat:
    """b-bit integer grid; `group_size=None` means one group per output row."""

    bits: int
    group_size: int | None = 128
    symmetric: bool = False
    scale_dtype: str = "float16"

    kind: ClassVar[str] = "int"

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise FormatError(f"bits must be an integer from 2 to 8, got {self.bits!r}; pick e.g. --bits 4")
        gs = self.group_size
        if gs is not None and (not isinstance(gs, int) or isinstance(gs, bool) or gs <= 0):
            raise FormatError(
                f"group size must be a positive integer or per-channel, got {gs!r}; "
                "use e.g. --group-size 128 or --group-size channel"
            )
        if self.scale_dtype not in DTYPES:
            raise FormatError(f"scale dtype {self.scale_dtype!r} is not supported; use one of {sorted(DTYPES)}")

    # ---- geometry and size -------------------------------------------------
    @property
    def maxq(self) -> int:
        return (1 << self.bits) - 1

    @property
    def scale_bits(self) -> int:
        return torch.finfo(DTYPES[self.scale_dtype]).bits

    def group_len(self, in_features: int) -> int:
        return in_features if self.group_size is None else min(self.group_size, in_features)

    def num_groups(self, in_features: int) -> int:
        return math.ceil(in_features / self.group_len(in_features))

    def storage_bits(self, out_features: int, in_features: int) -> int:
        """Every bit needed to rebuild the weight: codes, scales, zero points."""
        per_group = self.scale_bits + (0 if self.symmetric else self.bits)
        groups = out_features * self.num_groups(in_features)
        return out_features * in_features * self.bits + groups * per_group

    def bits_per_weight(self, out_features: int, in_features: int) -> float:
        return self.storage_bits(out_features, in_features) / (out_features * in_features)

    @property
    def name(self) -> str:
        g = "ch" if self.group_size is None else str(self.group_size)
        s = "sym" if self.symmetric else "asym"
        return f"int{self.bits}-g{g}-{s}"

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, **asdict(self)}

    # ---- what solvers and the runtime ask of every format ---------------------
    refits_scales: ClassVar[bool] = True  # the dequantized weight is linear in each group's scale
    groups_per_fit: ClassVar[int] = 1  # groups whose parameters are fitted together
    fits_by_importance: ClassVar[bool] = False  # `fit` takes each column's importance (GPTQ: diag(H))

    @property
    def row_multiple(self) -> int:
        """What a row's length must be a multiple of (1: any length)."""
        return 1

    def fit_len(self, in_features: int) -> int:
        """Columns whose group parameters are fitted together (GPTQ fits them on reaching the first)."""
        return self.group_len(in_features) * self.groups_per_fit

    def packed_buffers(self, out_features: int, in_features: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """The tensors a packed layer holds: name -> (shape, dtype); every one has a row per output."""
        ng = self.num_groups(in_features)
        buffers = {
            "qweight": ((out_features, packed_words(in_features, self.bits)), torch.int32),
            "scales": ((out_features, ng), DTYPES[self.scale_dtype]),
        }
        if not self.symmetric:
            buffers["qzeros"] = ((out_features, packed_words(ng, self.bits)), torch.int32)
        return buffers

    def dequantize_packed(self, packed: dict[str, torch.Tensor], in_features: int) -> torch.Tensor:
        """float32 rows from packed rows (any subset of a layer's rows)."""
        codes = unpack_codes(packed["qweight"], self.bits, in_features, dtype=torch.float32)
        qz = packed.get("qzeros")
        zeros = None if qz is None else unpack_codes(qz, self.bits, self.num_groups(in_features))
        return dequantize_codes(self, codes, packed["scales"], zeros, in_features)

    def unpack(self, shape: tuple[int, int], packed: dict[str, torch.Tensor]) -> QuantizedTensor:
        return QuantizedTensor.unpack(self, shape, packed)

    # ---- grouping ----------------------------------------------------------
    def to_groups(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[out, in] -> ([out, G, gs] zero-padded, mask of real entries)."""
        out, n = w.shape
        gs = self.group_len(n)
        ng = self.num_groups(n)
        pad = ng * gs - n
        mask = torch.ones(out, n, dtype=torch.bool, device=w.device)
        if pad:
            w = torch.nn.functional.pad(w, (0, pad))
            mask = torch.nn.functional.pad(mask, (0, pad))
        return w.reshape(out, ng, gs), mask.reshape(out, ng, gs)

    # ---- fit / quantize / dequantize on grouped tensors ---------------------
    def _round_scale(self, scale: torch.Tensor) -> torch.Tensor:
        """Round to the stored dtype so codes are chosen against the scale that is kept."""
        dt = DTYPES[self.scale_dtype]
        tiny = 2.0**-24 if dt == torch.float16 else torch.finfo(dt).tiny
        mag = scale.abs().clamp_min(tiny)
        return (torch.sign(scale) + (scale == 0)).mul(mag).to(dt).to(torch.float32)

    def fit(
        self, w: torch.Tensor, mask: torch.Tensor | None = None, clip: float = 1.0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and zero point for each group of `w` [..., gs] (shapes [..., 1])."""
        return self._fit_with(w, mask, clip, self._round_scale)

    def fit_clips(
        self, w: torch.Tensor, mask: torch.Tensor | None, clips: Iterable[float]
    ) -> Iterator[tuple[torch.Tensor, ...]]:
        """`fit` at each clip in turn, for a range search; a format whose fits share work across
        clips (two-level scales' row step) overrides it."""
        for clip in clips:
            yield self.fit(w, mask, clip=clip)

    def _fit_with(
        self,
        w: torch.Tensor,
        mask: torch.Tensor | None,
        clip: float,
        round_scale: Callable[[torch.Tensor], torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`fit` with the scale rounded to what is stored by `round_scale` (zero points follow it)."""
        w = _compute_dtype(w)
        if mask is None:
            mask = torch.ones_like(w, dtype=torch.bool)
        if self.symmetric:
            # signed absmax maps to the most negative code: uses all 2^b levels
            half = 1 << (self.bits - 1)
            wm = torch.where(mask, w, torch.zeros_like(w))
            idx = wm.abs().argmax(dim=-1, keepdim=True)
            peak = wm.gather(-1, idx) * clip
            scale = round_scale(peak / -half)
            zero = torch.full_like(scale, float(half))
            return scale, zero
        inf = torch.tensor(float("inf"), device=w.device)
        # the range always contains 0, so the integer zero point lies on the grid even
        # for a group whose weights all share one sign (common in small or partial groups)
        xmin = torch.where(mask, w, inf).amin(dim=-1, keepdim=True).clamp(max=0) * clip
        xmax = torch.where(mask, w, -inf).amax(dim=-1, keepdim=True).clamp(min=0) * clip
        scale = round_scale((xmax - xmin) / self.maxq)
        zero = torch.clamp(torch.round(-xmin / scale), 0, self.maxq)
        return scale, zero

    def code_values(self, codes: torch.Tensor, zeros: torch.Tensor | None) -> torch.Tensor:
        """What each code means before scaling: code minus zero point (a grid of levels overrides this)."""
        return codes - (float(1 << (self.bits - 1)) if zeros is None else zeros)

    def quantize(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        """Codes (as float, integral values in [0, maxq]) for `w` under (scale, zero)."""
        return torch.clamp(torch.round(_compute_dtype(w) / scale) + zero, 0, self.maxq)

    def dequantize(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        return (q - zero) * scale

    def assemble(self, codes: torch.Tensor, params: list[tuple[torch.Tensor, torch.Tensor]]) -> QuantizedTensor:
        """A QuantizedTensor from codes [out, in] and each group's (scale, zero), [out, 1] each."""
        scales = torch.cat([p[0] for p in params], dim=1)
        zeros = torch.cat([p[1] for p in params], dim=1)
        return QuantizedTensor(
            fmt=self,
            shape=tuple(codes.shape),
            codes=codes.round().to(torch.uint8),
            scales=scales.to(DTYPES[self.scale_dtype]),
            zeros=None if self.symmetric else zeros.round().to(torch.uint8),
        )

    # ---- whole tensors ------------------------------------------------------
    def quantize_tensor(
        self,
        weight: torch.Tensor,
        clip_search: bool = False,
        grid: int = 40,
        max_shrink: float = 0.8,
        chunk_rows: int = 1024,
    ) -> QuantizedTensor:
        """Round-to-nearest; `clip_search` picks, per group, the range shrink with least MSE."""
        out, n = weight.shape
        codes_rows, scale_rows, zero_rows = [], [], []
        for r0 in range(0, out, chunk_rows):
            w3, mask = self.to_groups(weight[r0 : r0 + chunk_rows].float())
            scale, zero = self.fit(w3, mask)
            if clip_search:
                best = self._group_error(w3, mask, scale, zero)
                for i in range(1, grid + 1):
                    s, z = self.fit(w3, mask, clip=1.0 - max_shrink * i / grid)
                    err = self._group_error(w3, mask, s, z)
                    better = err < best
                    best = torch.where(better, err, best)
                    scale = torch.where(better, s, scale)
                    zero = torch.where(better, z, zero)
            q = self.quantize(w3, scale, zero)
            codes_rows.append(q.reshape(q.shape[0], -1)[:, :n].to(torch.uint8))
            scale_rows.append(scale.squeeze(-1))
            zero_rows.append(zero.squeeze(-1).to(torch.uint8))
        return QuantizedTensor(
            fmt=self,
            shape=(out, n),
            codes=torch.cat(codes_rows),
            scales=torch.cat(scale_rows).to(DTYPES[self.scale_dtype]),
            zeros=None if self.symmetric else torch.cat(zero_rows),
        )

    def _group_error(self, w3, mask, scale, zero) -> torch.Tensor:
        err = (self.dequantize(self.quantize(w3, scale, zero), scale, zero) - w3) ** 2
        return (err * mask).sum(dim=-1, keepdim=True)


def _compute_dtype(w: torch.Tensor) -> torch.Tensor:
    return w if w.dtype == torch.float64 else w.float()


@dataclass
class QuantizedTensor:
    """Codes and group parameters of one weight, unpacked (uint8 codes)."""

    fmt: IntFormat
    shape: tuple[int, int]
    codes: torch.Tensor  # uint8 [out, in]
    scales: torch.Tensor  # scale dtype [out, G]
    zeros: torch.Tensor | None  # uint8 [out, G]; None when symmetric

    def dequantize(self) -> torch.Tensor:
        return dequantize_codes(self.fmt, self.codes, self.scales, self.zeros, self.shape[1])

    def unit_weight(self) -> torch.Tensor:
        """The weight with every scale set to 1: the dequantized weight is this times each group's scale."""
        ones = torch.ones(self.scales.shape, dtype=torch.float32, device=self.scales.device)
        return dequantize_codes(self.fmt, self.codes, ones, self.zeros, self.shape[1])

    def with_scales(self, scales: torch.Tensor) -> QuantizedTensor:
        """Same codes, new scales (rounded to the stored scale dtype)."""
        rounded = self.fmt._round_scale(scales.float()).to(self.scales.dtype)
        return QuantizedTensor(self.fmt, self.shape, self.codes, rounded, self.zeros)

    def split_rows(self, sizes: list[int]) -> list[QuantizedTensor]:
        """Row blocks as separate tensors: layers that share an input are solved stacked, stored apart."""
        n = self.shape[1]
        zeros = self.zeros.split(sizes) if self.zeros is not None else [None] * len(sizes)
        return [
            QuantizedTensor(self.fmt, (rows, n), c, s, z)
            for rows, c, s, z in zip(sizes, self.codes.split(sizes), self.scales.split(sizes), zeros, strict=True)
        ]

    def pack(self) -> dict[str, torch.Tensor]:
        """Tensors as stored in memory and on disk."""
        packed = {"qweight": pack_codes(self.codes, self.fmt.bits), "scales": self.scales}
        if self.zeros is not None:
            packed["qzeros"] = pack_codes(self.zeros, self.fmt.bits)
        return packed

    @classmethod
    def unpack(cls, fmt: IntFormat, shape: tuple[int, int], tensors: dict[str, torch.Tensor]) -> QuantizedTensor:
        out, n = shape
        zeros = None
        if not fmt.symmetric:
            zeros = unpack_codes(tensors["qzeros"], fmt.bits, fmt.num_groups(n))
        return cls(fmt, shape, unpack_codes(tensors["qweight"], fmt.bits, n), tensors["scales"], zeros)


def dequantize_codes(
    fmt: IntFormat,
    codes: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    in_features: int,
) -> torch.Tensor:
    """float32 weight [out, in] from codes [out, in] and per-group parameters [out, G]."""
    out = codes.shape[0]
    gs = fmt.group_len(in_features)
    ng = scales.shape[1]
    c = codes if codes.dtype == torch.float32 else codes.float()
    if ng * gs != in_features:
        c = torch.nn.functional.pad(c, (0, ng * gs - in_features))
    c = c.view(out, ng, gs)
    z = None if zeros is None else zeros.float().unsqueeze(-1)
    w = fmt.code_values(c, z) * scales.float().unsqueeze(-1)
    return w.view(out, ng * gs)[:, :in_features]
