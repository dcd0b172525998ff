"""Finished packed layers kept on disk until the artifact is written.

On a model larger than memory the packed layers add up (a 4-bit 1 B-parameter model: ~500 MB
by its last block) while nothing reads them again before the artifact is saved. A spill writes
each finished block's packed layers to a file of its own and puts meta tensors in their place;
the artifact writer (artifact.save) reads them back one tensor at a time. A run that needs the
model whole afterwards does not spill (`--eval`), or reads the artifact back (job.QuantizeResult).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from lowbit.runtime import QuantizedLinear


class Spill:
    """Where each spilled tensor of a model lives: `model.lowbit_spill`."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self.files: dict[str, Path] = {}  # full tensor name -> file holding it

    def put(self, model: nn.Module, prefix: str, changed: Iterable[str] = ()) -> None:
        """Move the packed layers under `prefix` (a finished block, "model.layers.3.") to disk, with
        the float parameters `changed` names (relative to the block: a norm an activation-aware
        scale was folded into), which the model's own files no longer hold."""
        module = model.get_submodule(prefix.rstrip("."))
        tensors: dict[str, torch.Tensor] = {}
        for name, sub in module.named_modules(prefix=prefix.rstrip(".")):
            if isinstance(sub, QuantizedLinear):
                for leaf, t in sub.state_dict().items():
                    if not t.is_meta:
                        tensors[f"{name}.{leaf}"] = t.detach().cpu().contiguous()
        for rel in changed:
            t = module.get_parameter(rel)
            if not t.is_meta:
                tensors[prefix + rel] = t.detach().cpu().contiguous()
        if not tensors:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        file = self.folder / f"{prefix.rstrip('.')}.safetensors"
        tmp = file.with_name(f".{file.name}.tmp")
        save_file(tensors, str(tmp))
        os.replace(tmp, file)
        for name in tensors:
            self.files[name] = file
            owner, _, leaf = name.rpartition(".")
            sub = model.get_submodule(owner)
            if leaf in sub._buffers:
                sub._buffers[leaf] = torch.empty_like(sub._buffers[leaf], device="meta")
            else:
                sub._parameters[leaf] = nn.Parameter(torch.empty_like(sub._parameters[leaf], device="meta"), False)

    def holds(self, name: str) -> bool:
        return name in self.files

    def read(self, name: str) -> torch.Tensor:
        with safe_open(str(self.files[name]), "pt") as f:
            return f.get_tensor(name)


def model_spill(model: nn.Module) -> Spill | None:
    return getattr(model, "lowbit_spill", None)
