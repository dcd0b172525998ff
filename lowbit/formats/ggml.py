"""llama.cpp's (ggml's) quantization types that are lowbit formats, and their block layouts.

One table, as llama.cpp keeps one: each ggml type lowbit can write, the lowbit format whose grid
it is, and how that format's codes and scales pack into the type's blocks. A block covers 32
consecutive weights of a row; the rows stay whole, so permuting rows (as GGUF does for Llama's
q/k projections) moves blocks along with them.

- Q8_0: fp16 d, then 32 int8 q;            w = d * q          (lowbit int8-g32-sym, code = q + 128)
- Q5_0: fp16 d, 4 bytes of high bits, 16 bytes of low nibbles; w = d * (q - 16)   (int5-g32-sym)
- Q4_0: fp16 d, 16 bytes of nibbles (weight j low, j + 16 high); w = d * (q - 8) (int4-g32-sym)
- IQ4_NL: Q4_0's bytes; w = d * kvalues[q], 16 non-uniform levels (lowbit iq4nl-g32)
- Q4_1: fp16 d, fp16 m, Q4_0's nibbles; w = d * q + m                      (lowbit int4-g32-min)
- Q5_1: fp16 d, fp16 m, Q5_0's high bits and nibbles; w = d * q + m         (lowbit int5-g32-min)

lowbit's symmetric grid is ggml's: the signed largest weight of a block maps to the lowest code
(d = max / -2^(b-1)). The k-quants (Q2_K .. Q6_K, lowbit.formats.kquants) cover 256 weights of a row per block and
are stored in llama.cpp's own layout already. The types with a float minimum (Q4_1, Q5_1) are
not lowbit formats yet.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGMLQuantizationType

from lowbit.formats.floatmin import MinFormat, MinTensor
from lowbit.formats.integer import IntFormat, QuantizedTensor
from lowbit.formats.kquants import K_SPECS, QK, KQuantTensor, kquant
from lowbit.formats.levels import LevelFormat

BLOCK = 32


@dataclass(frozen=True)
class GGMLType:
    name: str  # as llama.cpp spells it
    qtype: GGMLQuantizationType
    fmt: IntFormat
    block_bytes: int
    block: int = BLOCK  # weights of a row per block


def _k(name: str) -> GGMLType:
    return GGMLType(name, GGMLQuantizationType[name], kquant(name), K_SPECS[name].block_bytes, QK)


# fewest bits first; of one width, the type with blocks of 32 (it fits more rows) first
GGML_TYPES: tuple[GGMLType, ...] = (
    _k("Q2_K"),
    _k("Q3_K"),
    GGMLType("Q4_0", GGMLQuantizationType.Q4_0, IntFormat(4, BLOCK, symmetric=True), 18),
    GGMLType("IQ4_NL", GGMLQuantizationType.IQ4_NL, LevelFormat(4, BLOCK, grid="iq4nl"), 18),
    GGMLType("Q4_1", GGMLQuantizationType.Q4_1, MinFormat(4, BLOCK), 20),
    _k("Q4_K"),
    GGMLType("Q5_0", GGMLQuantizationType.Q5_0, IntFormat(5, BLOCK, symmetric=True), 22),
    GGMLType("Q5_1", GGMLQuantizationType.Q5_1, MinFormat(5, BLOCK), 24),
    _k("Q5_K"),
    _k("Q6_K"),
    GGMLType("Q8_0", GGMLQuantizationType.Q8_0, IntFormat(8, BLOCK, symmetric=True), 34),
)
_BY_FORMAT = {t.fmt: t for t in GGML_TYPES}
_BY_NAME = {t.name.lower(): t for t in GGML_TYPES}


def ggml_type(fmt: IntFormat) -> GGMLType | None:
    """The ggml type whose grid `fmt` is, or None."""
    return _BY_FORMAT.get(fmt)


def ggml_type_named(name: str) -> GGMLType | None:
    return _BY_NAME.get(name.strip().lower())


def fits_rows(fmt: IntFormat, in_features: int) -> bool:
    """Whether rows of `in_features` weights split into whole blocks of the type."""
    t = ggml_type(fmt)
    return t is not None and in_features % t.block == 0


def pack_blocks(qt: QuantizedTensor | KQuantTensor | MinTensor) -> np.ndarray:
    """uint8 [rows, blocks x block_bytes]: the tensor as the ggml type stores it."""
    t = ggml_type(qt.fmt)
    if t is None:
        raise ValueError(f"{qt.fmt.name} is not a ggml type")
    if isinstance(qt, KQuantTensor):  # already in llama.cpp's layout
        return qt.pack()["qweight"].cpu().numpy()
    out, n = qt.shape
    if n % BLOCK:
        raise ValueError(f"rows of {n} weights do not split into blocks of {BLOCK}")
    nb = n // BLOCK
    q = qt.codes.cpu().numpy().astype(np.uint8).reshape(out, nb, BLOCK)
    d = qt.scales.to(torch.float16).cpu().numpy().reshape(out, nb, 1).view(np.uint8)  # 2 bytes each
    if isinstance(qt, MinTensor):  # Q4_1 / Q5_1: d, then m, then Q4_0's / Q5_0's body
        d = np.concatenate([d, qt.mins.to(torch.float16).cpu().numpy().reshape(out, nb, 1).view(np.uint8)], -1)
    if t.name == "Q8_0":
        body = (q.astype(np.int16) - 128).astype(np.int8).view(np.uint8)
    elif t.name in ("Q4_0", "IQ4_NL", "Q4_1"):
        body = q[..., :16] | (q[..., 16:] << np.uint8(4))
    else:  # Q5_0, Q5_1
        low = q & np.uint8(0x0F)
        qs = low[..., :16] | (low[..., 16:] << np.uint8(4))
        qh = np.packbits(q >> np.uint8(4), axis=-1, bitorder="little")  # 32 bits -> 4 bytes
        body = np.concatenate([qh, qs], axis=-1)
    return np.concatenate([d, body], axis=-1).reshape(out, nb * t.block_bytes)
