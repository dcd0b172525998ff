"""llama.cpp's k-quants: two-level grids over super-blocks of 256 weights.

A super-block holds 8 or 16 sub-blocks (of 32 or 16 weights). Each sub-block has its own scale
(and, for the types with a minimum, its own min), but those are small integers against one
float16 `d` (and `dmin`) per super-block, so a sub-block scale costs 4-8 bits instead of 16:

- Q2_K: 16 x 16, 2-bit codes, 4-bit scale and min; w = d*sc*q - dmin*m        (84 bytes, 2.625 bpw)
- Q3_K: 16 x 16, 3-bit codes, signed 6-bit scale;  w = d*sc*(q - 4)            (110 bytes, 3.4375 bpw)
- Q4_K:  8 x 32, 4-bit codes, 6-bit scale and min; w = d*sc*q - dmin*m         (144 bytes, 4.5 bpw)
- Q5_K:  8 x 32, 5-bit codes, 6-bit scale and min; w = d*sc*q - dmin*m         (176 bytes, 5.5 bpw)
- Q6_K: 16 x 16, 6-bit codes, int8 scale;          w = d*sc*(q - 32)           (210 bytes, 6.5625 bpw)

The sub-block scale is part of the grid: `fit` quantizes it against the super-block's `d` before
any weight is rounded, so GPTQ rounds every weight to exactly what is stored. A lowbit k-quant
tensor is stored as llama.cpp's own blocks (uint8 rows; layouts from ggml-common.h, checked
against gguf.quants' dequantizers), so its bytes in an artifact are its bytes in a GGUF file, and
the runtime decodes those blocks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch

from lowbit.errors import FormatError
from lowbit.formats.integer import IntFormat, _compute_dtype

QK = 256  # weights per super-block


class KSpec(NamedTuple):
    bits: int
    sub: int  # weights per sub-block
    scale_levels: int  # sub-block scale codes: 0..levels-1 (unsigned) or -levels/2..levels/2-1 (signed)
    has_min: bool
    block_bytes: int


K_SPECS: dict[str, KSpec] = {
    "Q2_K": KSpec(2, 16, 16, True, 84),
    "Q3_K": KSpec(3, 16, 64, False, 110),
    "Q4_K": KSpec(4, 32, 64, True, 144),
    "Q5_K": KSpec(5, 32, 64, True, 176),
    "Q6_K": KSpec(6, 16, 256, False, 210),
}


@dataclass(frozen=True)
class KQuantFormat(IntFormat):
    """One of llama.cpp's k-quant types (`ggml`), as a lowbit format."""

    ggml: str = "Q4_K"

    kind: ClassVar[str] = "kquant"

    def __post_init__(self) -> None:
        spec = K_SPECS.get(self.ggml)
        if spec is None:
            raise FormatError(f"unknown k-quant {self.ggml!r}; known: {', '.join(K_SPECS)}")
        if (self.bits, self.group_size, self.symmetric) != (spec.bits, spec.sub, not spec.has_min):
            raise FormatError(f"{self.ggml} is {spec.bits}-bit in groups of {spec.sub}; build it with kquant()")
        super().__post_init__()

    @property
    def spec(self) -> KSpec:
        return K_SPECS[self.ggml]

    @property
    def name(self) -> str:
        return self.ggml.lower()

    @property
    def row_multiple(self) -> int:
        return QK

    @property
    def groups_per_fit(self) -> int:
        """Sub-blocks fitted together: a super-block's scales share its `d`."""
        return QK // self.spec.sub

    def fit_len(self, in_features: int) -> int:
        return QK

    refits_scales: ClassVar[bool] = False  # the scales live on the super-block grid

    def storage_bits(self, out_features: int, in_features: int) -> int:
        return out_features * math.ceil(in_features / QK) * self.spec.block_bytes * 8

    def bits_per_weight(self, out_features: int, in_features: int) -> float:
        return self.storage_bits(out_features, in_features) / (out_features * in_features)

    def _check_rows(self, n: int) -> None:
        if n % QK:
            raise FormatError(f"{self.ggml} needs rows that are a multiple of {QK} weights, got {n}")

    # ---- fit / quantize / dequantize on grouped tensors [..., G, sub] ------------------
    def fit(self, w: torch.Tensor, mask: torch.Tensor | None = None, clip: float = 1.0) -> tuple[torch.Tensor, ...]:
        """Per sub-block (s, m, d, sc, dmin, mn), each [..., G, 1]: the effective scale s = d*sc and
        min m = dmin*mn that rounding uses, and their stored parts (d, dmin repeated per sub-block).
        G must cover whole super-blocks."""
        spec = self.spec
        w = _compute_dtype(w)
        if mask is None:
            mask = torch.ones_like(w, dtype=torch.bool)
        *lead, g, sub = w.shape
        k = QK // sub
        if g % k:
            raise ValueError(f"{self.ggml} fits whole super-blocks of {k} sub-blocks, got {g}")
        half = 1 << (self.bits - 1)
        if spec.has_min:
            inf = torch.tensor(float("inf"), dtype=w.dtype, device=w.device)
            lo = torch.where(mask, w, inf).amin(-1, keepdim=True).clamp(max=0) * clip
            hi = torch.where(mask, w, -inf).amax(-1, keepdim=True).clamp(min=0) * clip
            raw_s, raw_m = (hi - lo) / self.maxq, -lo
            d, sc = self._two_level(raw_s, spec.scale_levels - 1, k)
            dmin, mn = self._two_level(raw_m, spec.scale_levels - 1, k)
            return d * sc, dmin * mn, d, sc, dmin, mn
        wm = torch.where(mask, w, torch.zeros_like(w))
        peak = wm.gather(-1, wm.abs().argmax(-1, keepdim=True)) * clip
        raw_s = peak / -half  # the signed largest weight on the lowest code, as Q4_0 does
        d, sc = self._two_level(raw_s, spec.scale_levels // 2, k, signed=True)
        zero = torch.zeros_like(d)
        return d * sc, zero, d, sc, zero, zero

    def _two_level(
        self, raw: torch.Tensor, top: int, k: int, signed: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """fp16 `d` per super-block and integer codes per sub-block with d*code close to `raw`.
        Unsigned: codes 0..top, d = max/top. Signed: the sub-block scale of largest magnitude gets
        code -top, the others -top..top-1."""
        shape = raw.shape
        r = raw.reshape(*shape[:-2], shape[-2] // k, k)
        if signed:
            peak = r.gather(-1, r.abs().argmax(-1, keepdim=True))
            d = _fp16(peak / -top)
            code = torch.where(d == 0, torch.zeros_like(r), torch.round(r / d)).clamp(-top, top - 1)
        else:
            d = _fp16(r.amax(-1, keepdim=True) / top)
            code = torch.where(d == 0, torch.zeros_like(r), torch.round(r / d)).clamp(0, top)
            code = torch.where((r > 0) & (code == 0), torch.ones_like(code), code)  # keep a live sub-block alive
        d = d.expand_as(r)
        return d.reshape(shape), code.reshape(shape)

    def quantize(self, w: torch.Tensor, s: torch.Tensor, m: torch.Tensor, *stored: torch.Tensor) -> torch.Tensor:
        w = _compute_dtype(w)
        safe = torch.where(s == 0, torch.ones_like(s), s)
        if self.spec.has_min:  # a dead sub-block (s = 0) holds code 0, i.e. -m
            q = torch.where(s == 0, 0.0, torch.round((w + m) / safe))
        else:
            half = 1 << (self.bits - 1)
            q = torch.where(s == 0, float(half), torch.round(w / safe) + half)
        return q.clamp(0, self.maxq)

    def dequantize(self, q: torch.Tensor, s: torch.Tensor, m: torch.Tensor, *stored: torch.Tensor) -> torch.Tensor:
        if self.spec.has_min:
            return s * q - m
        return s * (q - (1 << (self.bits - 1)))

    def assemble(self, codes: torch.Tensor, params: list[tuple[torch.Tensor, ...]]) -> KQuantTensor:
        """A KQuantTensor from codes [out, in] and each sub-block's fitted tuple ([out, 1] each)."""
        out, n = codes.shape
        k = self.groups_per_fit
        stacked = [torch.cat([p[i] for p in params], dim=1) for i in range(6)]  # [out, G] each
        _, _, d, sc, dmin, mn = stacked
        return KQuantTensor(
            self,
            (out, n),
            codes.round().to(torch.uint8),
            d[:, ::k].to(torch.float16),
            sc.round().to(torch.int16),
            dmin[:, ::k].to(torch.float16),
            mn.round().to(torch.int16),
        )

    def quantize_tensor(
        self, weight: torch.Tensor, clip_search: bool = False, grid: int = 40, max_shrink: float = 0.8, **_
    ) -> KQuantTensor:
        """Round-to-nearest; `clip_search` picks, per super-block, the range shrink with least MSE."""
        out, n = weight.shape
        self._check_rows(n)
        w3, mask = self.to_groups(weight.float())
        best = self.fit(w3, mask)
        if clip_search:
            best_err = self._span_error(w3, best)
            for i in range(1, grid + 1):
                p = self.fit(w3, mask, clip=1.0 - max_shrink * i / grid)
                err = self._span_error(w3, p)
                better = err < best_err
                best_err = torch.where(better, err, best_err)
                best = tuple(torch.where(better, a, b) for a, b in zip(p, best, strict=True))
        q = self.quantize(w3, *best)
        params = [tuple(t[:, g] for t in best) for g in range(w3.shape[1])]
        return self.assemble(q.reshape(out, n), params)

    def _span_error(self, w3: torch.Tensor, p: tuple[torch.Tensor, ...]) -> torch.Tensor:
        err = ((self.dequantize(self.quantize(w3, *p), *p) - w3) ** 2).sum(-1, keepdim=True)
        return span_sum(err, self.groups_per_fit)

    # ---- packed storage: llama.cpp's blocks -------------------------------------------
    def packed_buffers(self, out_features: int, in_features: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        self._check_rows(in_features)
        return {"qweight": ((out_features, in_features // QK * self.spec.block_bytes), torch.uint8)}

    def dequantize_packed(self, packed: dict[str, torch.Tensor], in_features: int) -> torch.Tensor:
        return decode(self, packed["qweight"], in_features).dequantize()

    def unpack(self, shape: tuple[int, int], packed: dict[str, torch.Tensor]) -> KQuantTensor:
        return decode(self, packed["qweight"], shape[1])


def span_sum(err: torch.Tensor, k: int) -> torch.Tensor:
    """Per-group values [..., G, 1] summed over each run of k groups and repeated back."""
    if k == 1:
        return err
    *lead, g, one = err.shape
    s = err.reshape(*lead, g // k, k, one).sum(-2, keepdim=True)
    return s.expand(*lead, g // k, k, one).reshape(err.shape)


def kquant(name: str) -> KQuantFormat:
    spec = K_SPECS[name]
    return KQuantFormat(spec.bits, spec.sub, not spec.has_min, "float16", name)


def _fp16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16).to(x.dtype)


@dataclass
class KQuantTensor:
    """Codes and the two-level parameters of one weight: d/dmin [out, super-blocks] float16,
    sc/mn [out, sub-blocks] integers (signed for Q3_K and Q6_K; mn zero there)."""

    fmt: KQuantFormat
    shape: tuple[int, int]
    codes: torch.Tensor  # uint8 [out, in]
    d: torch.Tensor
    sc: torch.Tensor
    dmin: torch.Tensor
    mn: torch.Tensor

    @property
    def scales(self) -> torch.Tensor:
        """Each sub-block's effective scale d*sc, float32 [out, sub-blocks]."""
        return self.d.float().repeat_interleave(self.fmt.groups_per_fit, 1) * self.sc.float()

    zeros = None

    def dequantize(self) -> torch.Tensor:
        out, n = self.shape
        sub = self.fmt.spec.sub
        k = self.fmt.groups_per_fit
        q = self.codes.float().reshape(out, n // sub, sub)
        s = (self.d.float().repeat_interleave(k, 1) * self.sc.float()).unsqueeze(-1)
        if self.fmt.spec.has_min:
            m = (self.dmin.float().repeat_interleave(k, 1) * self.mn.float()).unsqueeze(-1)
            w = s * q - m
        else:
            w = s * (q - (1 << (self.fmt.bits - 1)))
        return w.reshape(out, n)

    def split_rows(self, sizes: list[int]) -> list[KQuantTensor]:
        n = self.shape[1]
        parts = zip(
            sizes,
            *(t.split(sizes) for t in (self.codes, self.d, self.sc, self.dmin, self.mn)),
            strict=True,
        )
        return [KQuantTensor(self.fmt, (rows, n), c, d, sc, dm, mn) for rows, c, d, sc, dm, mn in parts]

    def pack(self) -> dict[str, torch.Tensor]:
        return {"qweight": encode(self)}


# ---- llama.cpp's block layouts --------------------------------------------------------------
def _u8(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.uint8)


def _fp16_bytes(x: torch.Tensor) -> torch.Tensor:
    """float16 [nb] -> uint8 [nb, 2] (little-endian, as the file stores it)."""
    return x.to(torch.float16).contiguous().view(torch.uint8).reshape(-1, 2)


def _pack_6bit_scales(sc: torch.Tensor, mn: torch.Tensor) -> torch.Tensor:
    """Q4_K/Q5_K: 8 six-bit scales and 8 six-bit mins in 12 bytes [nb, 12]."""
    sc, mn = sc.to(torch.int32), mn.to(torch.int32)
    low = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    mid = mn[:, :4] | ((mn[:, 4:] >> 4) << 6)
    high = (sc[:, 4:] & 0xF) | ((mn[:, 4:] & 0xF) << 4)
    return _u8(torch.cat([low, mid, high], dim=1))


def _unpack_6bit_scales(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    b = b.to(torch.int32)
    d, m, md = b[:, 0:4], b[:, 4:8], b[:, 8:12]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=1)
    return sc, mn


def _bits_into_bytes(q: torch.Tensor, width: int, lanes: int) -> torch.Tensor:
    """[nb, lanes, L] codes of `width` bits -> [nb, L] bytes, lane i at bit width*i."""
    out = torch.zeros(q.shape[0], q.shape[2], dtype=torch.int32)
    for i in range(lanes):
        out |= (q[:, i, :].to(torch.int32) & ((1 << width) - 1)) << (width * i)
    return _u8(out)


def _bytes_into_bits(b: torch.Tensor, width: int, lanes: int) -> torch.Tensor:
    """The inverse: [nb, L] bytes -> [nb, lanes, L] codes."""
    b = b.to(torch.int32)
    return torch.stack([(b >> (width * i)) & ((1 << width) - 1) for i in range(lanes)], dim=1)


def encode(t: KQuantTensor) -> torch.Tensor:
    """uint8 [out, super-blocks x block bytes]: the tensor as llama.cpp stores it."""
    fmt, (out, n) = t.fmt, t.shape
    nb = out * (n // QK)
    q = t.codes.reshape(nb, QK).to(torch.int32)
    g = fmt.groups_per_fit
    sc, mn = t.sc.reshape(nb, g).to(torch.int32), t.mn.reshape(nb, g).to(torch.int32)
    d, dmin = _fp16_bytes(t.d.reshape(nb)), _fp16_bytes(t.dmin.reshape(nb))
    name = fmt.ggml
    if name == "Q2_K":
        scales = _u8((sc & 0xF) | ((mn & 0xF) << 4))
        qs = _bits_into_bytes(q.reshape(nb * 2, 4, 32), 2, 4).reshape(nb, 64)
        parts = [scales, qs, d, dmin]
    elif name == "Q3_K":
        u = sc + 32
        lo = _u8((u[:, :8] & 0xF) | ((u[:, 8:] & 0xF) << 4))
        hi = _bits_into_bytes((u >> 4).reshape(nb, 4, 4), 2, 4)
        hmask = _bits_into_bytes((q >> 2).reshape(nb, 8, 32), 1, 8)
        qs = _bits_into_bytes((q & 3).reshape(nb * 2, 4, 32), 2, 4).reshape(nb, 64)
        parts = [hmask, qs, lo, hi, d]
    elif name in ("Q4_K", "Q5_K"):
        qs = _bits_into_bytes((q & 0xF).reshape(nb * 4, 2, 32), 4, 2).reshape(nb, 128)
        parts = [d, dmin, _pack_6bit_scales(sc, mn)]
        if name == "Q5_K":
            parts.append(_bits_into_bytes((q >> 4).reshape(nb, 8, 32), 1, 8))
        parts.append(qs)
    else:  # Q6_K
        ql = _bits_into_bytes((q & 0xF).reshape(nb * 2, 2, 64), 4, 2).reshape(nb, 128)
        qh = _bits_into_bytes((q >> 4).reshape(nb * 2, 4, 32), 2, 4).reshape(nb, 64)
        parts = [ql, qh, _u8(sc & 0xFF), d]  # int8 scales, two's complement
    return torch.cat(parts, dim=1).reshape(out, -1)


def decode(fmt: KQuantFormat, blocks: torch.Tensor, n: int) -> KQuantTensor:
    """The inverse of `encode`, for blocks [out, super-blocks x block bytes]."""
    out = blocks.shape[0]
    nb = out * (n // QK)
    b = blocks.reshape(nb, fmt.spec.block_bytes)
    g = fmt.groups_per_fit

    def half(x: torch.Tensor) -> torch.Tensor:
        return x.contiguous().view(torch.float16).reshape(nb)

    zeros = torch.zeros(nb, g, dtype=torch.int32)
    dmin = torch.zeros(nb, dtype=torch.float16)
    name = fmt.ggml
    if name == "Q2_K":
        scales, qs, d, dmin = b[:, :16].to(torch.int32), b[:, 16:80], half(b[:, 80:82]), half(b[:, 82:84])
        sc, mn = scales & 0xF, scales >> 4
        q = _bytes_into_bits(qs.reshape(nb * 2, 32), 2, 4).reshape(nb, QK)
    elif name == "Q3_K":
        hmask, qs, lo, hi, d = b[:, :32], b[:, 32:96], b[:, 96:104], b[:, 104:108], half(b[:, 108:110])
        low = _bytes_into_bits(lo, 4, 2).reshape(nb, 16)
        high = _bytes_into_bits(hi, 2, 4).reshape(nb, 16)
        sc, mn = (low | (high << 4)) - 32, zeros
        ql = _bytes_into_bits(qs.reshape(nb * 2, 32), 2, 4).reshape(nb, QK)
        qh = _bytes_into_bits(hmask, 1, 8).reshape(nb, QK)
        q = ql | (qh << 2)
    elif name in ("Q4_K", "Q5_K"):
        d, dmin = half(b[:, 0:2]), half(b[:, 2:4])
        sc, mn = _unpack_6bit_scales(b[:, 4:16])
        rest = b[:, 16:]
        qh = None
        if name == "Q5_K":
            qh, rest = _bytes_into_bits(rest[:, :32], 1, 8).reshape(nb, QK), rest[:, 32:]
        q = _bytes_into_bits(rest.reshape(nb * 4, 32), 4, 2).reshape(nb, QK)
        if qh is not None:
            q = q | (qh << 4)
    else:  # Q6_K
        ql, qh, scales, d = b[:, :128], b[:, 128:192], b[:, 192:208], half(b[:, 208:210])
        low = _bytes_into_bits(ql.reshape(nb * 2, 64), 4, 2).reshape(nb, QK)
        high = _bytes_into_bits(qh.reshape(nb * 2, 32), 2, 4).reshape(nb, QK)
        q = low | (high << 4)
        sc, mn = scales.contiguous().view(torch.int8).to(torch.int32), zeros
    sub_blocks = n // fmt.spec.sub
    return KQuantTensor(
        fmt,
        (out, n),
        q.reshape(out, n).to(torch.uint8),
        d.reshape(out, -1),
        sc.reshape(out, sub_blocks).to(torch.int16),
        dmin.reshape(out, -1),
        mn.reshape(out, sub_blocks).to(torch.int16),
    )
