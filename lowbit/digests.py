"""Short digests that name a model or a set of calibration windows in caches and resume states."""

from __future__ import annotations

import hashlib
import json

import torch
from torch import nn


def model_digest(model: nn.Module) -> str:
    """Config plus the first few tensors (embedding, first block): cheap, and distinct per checkpoint."""
    lazy = getattr(model, "lowbit_lazy", None)  # models/lazy.py; a leaf module does not import it
    config = model.config.to_dict()
    if (config.get("quantization_config") or {}).get("quant_method") == "gguf":
        # transformers notes a GGUF source's file name when it loads it whole, not when built lazily;
        # the tensors below already say which file it was
        del config["quantization_config"]
    h = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for name, p in list(model.named_parameters())[:4]:
        t = lazy.tensor(model, name) if lazy is not None else p  # the same digest, whole or lazy
        h.update(t.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:24]


def windows_digest(windows: torch.Tensor) -> str:
    """Token windows (any shape; the tokens in order) as 16 hex digits."""
    return hashlib.sha256(windows.reshape(-1).numpy().tobytes()).hexdigest()[:16]
