"""Editing a model's module tree by dotted names."""

from __future__ import annotations

import torch
from torch import nn


def set_module(root: nn.Module, name: str, value: nn.Module | torch.Tensor) -> None:
    """Put `value` (a submodule, parameter or buffer) at the dotted `name` under `root`."""
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, value)
