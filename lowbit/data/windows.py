"""Token windows: contiguous evaluation windows and randomly placed calibration windows."""

from __future__ import annotations

import torch

from lowbit.data.sources import load_text
from lowbit.errors import DataError

QUICK_WINDOWS = 64


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """The whole text tokenized once, with the tokenizer's default special tokens."""
    ids = tokenizer(text, return_attention_mask=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def eval_windows(tokens: torch.Tensor, seqlen: int = 512, limit: int | None = None) -> torch.Tensor:
    """Non-overlapping windows from the start, tail dropped; `limit` keeps the first ones."""
    n = tokens.numel() // seqlen
    if n == 0:
        raise DataError(
            f"evaluation text has {tokens.numel()} tokens, fewer than one window of {seqlen}; "
            "use a longer text or a shorter --eval-seqlen"
        )
    if limit is not None:
        n = min(n, limit)
    return tokens[: n * seqlen].view(n, seqlen)


def calibration_windows(tokens: torch.Tensor, nsamples: int = 128, seqlen: int = 512, seed: int = 0) -> torch.Tensor:
    """`nsamples` windows at uniform random starts (torch.Generator seeded as the protocol says)."""
    n = tokens.numel()
    if n <= seqlen:
        raise DataError(
            f"calibration text has {n} tokens, fewer than one window of {seqlen} (+1); "
            "use a longer text or a shorter --calib-seqlen"
        )
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, n - seqlen, (nsamples,), generator=g)
    return torch.stack([tokens[s : s + seqlen] for s in starts.tolist()])


def calibration_data(
    tokenizer, source: str | torch.Tensor = "c4", nsamples: int = 128, seqlen: int = 512, seed: int = 0
) -> torch.Tensor:
    """Calibration windows [nsamples, seqlen] from a named data set or file, as protocol.md samples
    them (ready token windows pass through)."""
    if isinstance(source, torch.Tensor):
        return source.long()
    if tokenizer is None:
        raise DataError("GPTQ needs calibration text: pass tokenizer= (with calib=...) or calib=<token windows>")
    tokens = tokenize(tokenizer, load_text(source))
    if tokens.numel() < nsamples * seqlen:
        raise DataError(
            f"calibration text {source!r} has {tokens.numel()} tokens, fewer than the {nsamples} x {seqlen} = "
            f"{nsamples * seqlen} requested; give more text or lower --nsamples/--calib-seqlen"
        )
    return calibration_windows(tokens, nsamples, seqlen, seed)
