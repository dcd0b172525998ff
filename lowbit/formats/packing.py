"""Dense bit-packing of small unsigned codes into int32 words, row by row.

Codes of any width 1..8 are laid out as one little-endian bit stream per row,
so 3-bit codes cost exactly 3 bits (plus at most 31 bits of padding per row).
"""

from __future__ import annotations

import torch

_WORD = 32


def packed_words(n: int, bits: int) -> int:
    """Number of int32 words that hold `n` codes of `bits` bits."""
    return (n * bits + _WORD - 1) // _WORD


def _positions(n: int, bits: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    offsets = torch.arange(n, device=device, dtype=torch.int64) * bits
    return offsets // _WORD, offsets % _WORD


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack `codes` [rows, n] (values in [0, 2**bits)) into int32 [rows, words]."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    rows, n = codes.shape
    c = codes.to(torch.int64)
    if (c < 0).any() or (c >= (1 << bits)).any():
        raise ValueError(f"codes do not fit in {bits} bits")
    word, shift = _positions(n, bits, codes.device)
    nwords = packed_words(n, bits)
    # one spare word so codes that straddle the last boundary have somewhere to go
    out = torch.zeros(rows, nwords + 1, dtype=torch.int64, device=codes.device)
    low = (c << shift) & 0xFFFFFFFF
    out.index_add_(1, word, low)
    spill = shift + bits > _WORD
    if spill.any():
        high = c[:, spill] >> (_WORD - shift[spill])
        out.index_add_(1, word[spill] + 1, high)
    out = out[:, :nwords]
    out = torch.where(out >= 2**31, out - 2**32, out)
    return out.to(torch.int32)


def unpack_codes(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of `pack_codes`: int32 [rows, words] -> uint8 [rows, n]."""
    p = packed.to(torch.int64) & 0xFFFFFFFF
    p = torch.cat([p, torch.zeros_like(p[:, :1])], dim=1)
    word, shift = _positions(n, bits, packed.device)
    val = p[:, word] >> shift
    spill = shift + bits > _WORD
    if spill.any():
        val[:, spill] |= p[:, word[spill] + 1] << (_WORD - shift[spill])
    return (val & ((1 << bits) - 1)).to(torch.uint8)
