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


_PACK_ROWS_ELEMENTS = 1 << 21  # codes packed per slice of rows: its int64 temporaries stay ~16 MB each


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack `codes` [rows, n] (values in [0, 2**bits)) into int32 [rows, words].

    Rows are packed a slice at a time: the bit arithmetic runs in int64, several copies of
    the codes' size (~260 MB for one 5632 x 2048 layer packed whole)."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    rows, n = codes.shape
    step = max(1, _PACK_ROWS_ELEMENTS // max(n, 1))
    if rows > step:
        return torch.cat([_pack_rows(codes[r : r + step], bits) for r in range(0, rows, step)])
    return _pack_rows(codes, bits)


def _pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
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


def _chunk_tables(bits: int, device: torch.device):
    """Where each of the 32 codes of a chunk (exactly `bits` words) lives."""
    off = torch.arange(_WORD, dtype=torch.int64) * bits
    word, shift = off // _WORD, off % _WORD
    nxt = torch.clamp(word + 1, max=bits - 1)
    # bits shifted in from the next word; a shift of 31 for codes that do not spill puts
    # them above the code's width, where the final mask drops them
    up = torch.where(shift + bits > _WORD, _WORD - shift, torch.full_like(shift, 31))
    low_mask = torch.where(shift == 0, torch.full_like(shift, -1), (1 << (_WORD - shift)) - 1)
    as32 = lambda t: t.to(torch.int32).to(device)  # noqa: E731
    return word.to(device), nxt.to(device), as32(shift), as32(up), as32(low_mask)


def unpack_codes(packed: torch.Tensor, bits: int, n: int, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    """Inverse of `pack_codes`: int32 [rows, words] -> codes [rows, n] (uint8 unless `dtype`).

    Works on chunks of 32 codes, which fill exactly `bits` words, so every
    index table has 32 entries whatever the row length; all arithmetic is int32.
    """
    rows = packed.shape[0]
    chunks = (n + _WORD - 1) // _WORD
    need = chunks * bits
    p = packed
    if p.shape[1] < need:
        p = torch.nn.functional.pad(p, (0, need - p.shape[1]))
    p = p[:, :need].reshape(rows, chunks, bits)
    word, nxt, shift, up, low_mask = _chunk_tables(bits, packed.device)
    low = (p[:, :, word] >> shift) & low_mask
    high = p[:, :, nxt] << up
    val = (low | high) & ((1 << bits) - 1)
    return val.reshape(rows, chunks * _WORD)[:, :n].to(dtype)
