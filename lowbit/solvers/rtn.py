"""Round-to-nearest: each weight rounded to its group's grid, no calibration data."""

from __future__ import annotations

import torch

from lowbit.formats import Format, QuantizedTensor


def rtn_quantize(weight: torch.Tensor, fmt: Format, clip_search: bool = False) -> QuantizedTensor:
    """RTN, optionally with a per-group search for the range shrink of least squared error."""
    return fmt.quantize_tensor(weight, clip_search=clip_search)
