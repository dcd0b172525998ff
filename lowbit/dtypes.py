"""Floating-point types by the names users and manifests write them in."""

from __future__ import annotations

import torch

from lowbit.errors import LowbitError

DTYPES: dict[str, torch.dtype] = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def dtype_named(name: str, what: str = "dtype") -> torch.dtype:
    """The torch dtype called `name`, or a one-line error naming the choices."""
    if name not in DTYPES:
        raise LowbitError(f"{what} {name!r} is not supported; use one of {', '.join(DTYPES)}")
    return DTYPES[name]
