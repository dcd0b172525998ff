"""Integer grids whose group scales are themselves small integers: cheap small groups.

A group's float16 scale costs 16 bits, so on its own a group of 32 adds 0.5 bits per weight.
Here each group's scale is a k-bit code (k = 4-8) times one float16 step per row, as llama.cpp's
k-quants do per super-block and SpQR does with its second-level quantization; a group of 32 then
costs 8/32 = 0.25 bits for its scale. The step is set from the row's widest group before any
weight is rounded, so GPTQ rounds every weight to exactly the scale that is stored.

On eight smollm2-135m layers (GPTQ with the default refinements), 8-bit scale codes gave the
same output error as float16 scales to within 0.3 %, at 3.20 instead of 3.30 bpw for int3 g64
(benchmarks/twolevel_layers.py). These formats run in lowbit's own runtime; no export target
holds them.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import ClassVar

import torch

from lowbit.dtypes import DTYPES
from lowbit.errors import FormatError
from lowbit.formats.integer import IntFormat, QuantizedTensor, _compute_dtype
from lowbit.formats.levels import LevelFormat
from lowbit.formats.packing import pack_codes, packed_words, unpack_codes


class TwoLevelScales:
    """What makes a grid two-level (mixed in before the grid's own format class): each group's
    scale a `scale_code_bits`-bit code times its row's `scale_dtype` step.

    Symmetric grids have signed scales (the signed absmax sits on the most negative code), so their
    scale codes are signed: one bit of the k goes to the sign."""

    def __post_init__(self) -> None:
        super().__post_init__()
        k = self.scale_code_bits
        if isinstance(k, bool) or not isinstance(k, int) or not 4 <= k <= 8:
            raise FormatError(f"scale codes take 4 to 8 bits, got {k!r}; write e.g. int3-g32-s8")
        if self.group_size is None:
            raise FormatError("a per-channel grid has one scale per row already; two-level scales need groups")

    @property
    def name(self) -> str:
        return f"{super().name}-s{self.scale_code_bits}"

    @property
    def max_scale_code(self) -> int:
        k = self.scale_code_bits
        return (1 << (k - 1)) - 1 if self.symmetric else (1 << k) - 1

    def storage_bits(self, out_features: int, in_features: int) -> int:
        """Codes, each group's scale code (and zero point), and each row's step."""
        per_group = self.scale_code_bits + (0 if self.symmetric else self.bits)
        groups = out_features * self.num_groups(in_features)
        return out_features * in_features * self.bits + groups * per_group + out_features * self.scale_bits

    def fit_len(self, in_features: int) -> int:
        """Whole rows: a row's step depends on all of its groups."""
        return in_features

    # ---- the second level --------------------------------------------------------------------
    def row_step(self, scales: torch.Tensor) -> torch.Tensor:
        """Each row's step (dim 0 indexes rows; every other dim is that row's groups), in the step
        dtype and rounded up, so the row's widest scale gets the largest code."""
        widest = scales.abs().reshape(scales.shape[0], -1).amax(dim=1).float()
        dt = DTYPES[self.scale_dtype]
        step = (widest / self.max_scale_code).to(dt)
        short = step.float() * self.max_scale_code < widest
        step = torch.where(short, torch.nextafter(step, torch.tensor(float("inf"), dtype=dt)), step)
        tiny = 2.0**-24 if dt == torch.float16 else torch.finfo(dt).tiny
        step = step.float().clamp_min(tiny)
        return step.view(-1, *([1] * (scales.dim() - 1)))

    def on_step(self, scales: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        """`scales` rounded to whole multiples of `step`, never zero, within the code range."""
        top = self.max_scale_code
        codes = torch.round(scales / step)
        low = -top if self.symmetric else 1
        codes = torch.where(codes == 0, torch.sign(scales) + (scales == 0), codes).clamp(low, top)
        return codes * step

    # ---- fit / quantize / dequantize on grouped tensors [rows, G, gs] ------------------------
    def fit(
        self, w: torch.Tensor, mask: torch.Tensor | None = None, clip: float = 1.0
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(scale, zero, step) per group; `w` holds whole rows. The step comes from the unclipped
        ranges, so the clip search's choices per group all lie on one grid per row."""
        return next(self.fit_clips(w, mask, [clip]))

    def fit_clips(
        self, w: torch.Tensor, mask: torch.Tensor | None, clips: Iterable[float]
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """`fit` at each clip, the row step found once: it depends on the unclipped ranges only."""
        w = _compute_dtype(w)
        raw, _ = self._fit_with(w, mask, 1.0, lambda s: s)
        step = self.row_step(raw)
        for clip in clips:
            scale, zero = self._fit_with(w, mask, clip, lambda s: self.on_step(s, step))
            yield scale, zero, step.expand_as(scale)

    def quantize(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, *_: torch.Tensor) -> torch.Tensor:
        return super().quantize(w, scale, zero)

    def dequantize(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, *_: torch.Tensor) -> torch.Tensor:
        return super().dequantize(q, scale, zero)

    def assemble(self, codes: torch.Tensor, params: list[tuple[torch.Tensor, ...]]) -> TwoLevelTensor:
        scales = torch.cat([p[0] for p in params], dim=1).float()
        zeros = torch.cat([p[1] for p in params], dim=1)
        step = params[0][2].float()
        return TwoLevelTensor(
            fmt=self,
            shape=tuple(codes.shape),
            codes=codes.round().to(torch.uint8),
            scales=scales,
            zeros=None if self.symmetric else zeros.round().to(torch.uint8),
            step=step,
        )

    def quantize_tensor(
        self, weight: torch.Tensor, clip_search: bool = False, grid: int = 40, max_shrink: float = 0.8, **_
    ) -> TwoLevelTensor:
        """Round-to-nearest; `clip_search` picks, per group, the range shrink with least MSE."""
        out, n = weight.shape
        w3, mask = self.to_groups(weight.float())
        fits = self.fit_clips(w3, mask, [1.0 - max_shrink * i / grid for i in range(grid + 1 if clip_search else 1)])
        params = next(fits)
        if clip_search:
            best = self._group_error(w3, mask, *params[:2])
            for p in fits:
                err = self._group_error(w3, mask, *p[:2])
                better = err < best
                best = torch.where(better, err, best)
                params = tuple(torch.where(better, a, b) for a, b in zip(p, params, strict=True))
        q = self.quantize(w3, *params).reshape(out, -1)[:, :n]
        return self.assemble(q, [tuple(t[:, g] for t in params) for g in range(params[0].shape[1])])

    # ---- packed storage ----------------------------------------------------------------------
    def packed_buffers(self, out_features: int, in_features: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        ng = self.num_groups(in_features)
        buffers = {
            "qweight": ((out_features, packed_words(in_features, self.bits)), torch.int32),
            "scale_codes": ((out_features, packed_words(ng, self.scale_code_bits)), torch.int32),
            "scale_step": ((out_features, 1), DTYPES[self.scale_dtype]),
        }
        if not self.symmetric:
            buffers["qzeros"] = ((out_features, packed_words(ng, self.bits)), torch.int32)
        return buffers

    def dequantize_packed(self, packed: dict[str, torch.Tensor], in_features: int) -> torch.Tensor:
        return self.unpack((packed["qweight"].shape[0], in_features), packed).dequantize()

    def unpack(self, shape: tuple[int, int], packed: dict[str, torch.Tensor]) -> TwoLevelTensor:
        out, n = shape
        ng = self.num_groups(n)
        offset = self.max_scale_code + 1 if self.symmetric else 0
        scale_codes = unpack_codes(packed["scale_codes"], self.scale_code_bits, ng, dtype=torch.float32) - offset
        step = packed["scale_step"].float()
        zeros = None if self.symmetric else unpack_codes(packed["qzeros"], self.bits, ng)
        codes = unpack_codes(packed["qweight"], self.bits, n)
        return TwoLevelTensor(self, shape, codes, scale_codes * step, zeros, step)


@dataclass(frozen=True)
class TwoLevelFormat(TwoLevelScales, IntFormat):
    """An integer grid with two-level scales: `int3-g32-s8`."""

    scale_code_bits: int = 8

    kind: ClassVar[str] = "twolevel"


@dataclass(frozen=True)
class TwoLevelGridFormat(TwoLevelScales, LevelFormat):
    """A level grid (NormalFloat, IQ4_NL's, FP4's) with two-level scales: `nf3-g32-s8`."""

    scale_code_bits: int = 8

    kind: ClassVar[str] = "twolevel-grid"


@dataclass
class TwoLevelTensor(QuantizedTensor):
    """A QuantizedTensor whose float32 scales [out, G] are whole multiples of `step` [out, 1]."""

    step: torch.Tensor = None  # type: ignore[assignment]

    def scale_codes(self) -> torch.Tensor:
        return torch.round(self.scales / self.step)

    def with_scales(self, scales: torch.Tensor) -> TwoLevelTensor:
        """Same codes, new scales, on a new step per row (a refit may widen a row's widest scale)."""
        step = self.fmt.row_step(scales.float())
        rounded = self.fmt.on_step(scales.float(), step)
        return TwoLevelTensor(self.fmt, self.shape, self.codes, rounded, self.zeros, step)

    def split_rows(self, sizes: list[int]) -> list[TwoLevelTensor]:
        parts = super().split_rows(sizes)
        return [
            TwoLevelTensor(p.fmt, p.shape, p.codes, p.scales, p.zeros, s)
            for p, s in zip(parts, self.step.split(sizes), strict=True)
        ]

    def pack(self) -> dict[str, torch.Tensor]:
        fmt = self.fmt
        offset = fmt.max_scale_code + 1 if fmt.symmetric else 0
        packed = {
            "qweight": pack_codes(self.codes, fmt.bits),
            "scale_codes": pack_codes((self.scale_codes() + offset).to(torch.uint8), fmt.scale_code_bits),
            "scale_step": self.step.to(DTYPES[fmt.scale_dtype]),
        }
        if self.zeros is not None:
            packed["qzeros"] = pack_codes(self.zeros, fmt.bits)
        return packed
