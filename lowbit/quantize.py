"""Turn a float model into a quantized one in place, and record what was done."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.errors import LowbitError, NonFiniteWeightError
from lowbit.formats import IntFormat
from lowbit.formats.integer import SCALE_DTYPES
from lowbit.models.adapters import get_adapter, linear_weight, quantizable_linears
from lowbit.runtime import QuantizedLinear
from lowbit.solvers import SOLVERS

STORAGE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass
class QuantizationInfo:
    """What `quantize` did: stored in the artifact manifest and shown by `lowbit inspect`."""

    method: str
    settings: dict[str, Any]
    storage_dtype: str
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)
    unquantized: list[str] = field(default_factory=list)
    source: str | None = None
    stats: dict[str, Any] = field(default_factory=dict)  # wall time, peak memory

    @property
    def quantized_weights(self) -> int:
        return sum(int(v["numel"]) for v in self.layers.values())

    @property
    def quantized_bits(self) -> int:
        return sum(int(v["storage_bits"]) for v in self.layers.values())

    @property
    def bits_per_weight(self) -> float:
        return self.quantized_bits / max(self.quantized_weights, 1)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["bits_per_weight"] = self.bits_per_weight
        d["quantized_weights"] = self.quantized_weights
        return d


def check_finite(model: nn.Module) -> None:
    """Refuse NaN/Inf weights up front, naming the tensor, before any output exists."""
    for name, p in model.named_parameters():
        if p.is_floating_point() and not torch.isfinite(p).all():
            raise NonFiniteWeightError(
                f"weight {name} contains NaN or Inf; the model file is damaged, re-download or re-convert it"
            )


def quantize(
    model: nn.Module,
    bits: int = 4,
    group_size: int | None = 128,
    symmetric: bool = False,
    method: str = "rtn",
    clip_search: bool = False,
    scale_dtype: str = "float16",
    storage_dtype: str = "float16",
    progress: bool = True,
) -> nn.Module:
    """Quantize every decoder-block linear of `model` in place; returns the model.

    Embeddings, the output head and norms stay unquantized but are stored (and,
    so that a reloaded artifact computes exactly the same logits, rounded) in
    `storage_dtype`. The record of what was done is `model.lowbit_info`.
    """
    if method not in SOLVERS:
        raise LowbitError(f"unknown method {method!r}; available: {', '.join(sorted(SOLVERS))}")
    if storage_dtype not in STORAGE_DTYPES:
        raise LowbitError(f"storage dtype {storage_dtype!r} is not supported; use one of {sorted(STORAGE_DTYPES)}")
    if scale_dtype not in SCALE_DTYPES:
        raise LowbitError(f"scale dtype {scale_dtype!r} is not supported; use one of {sorted(SCALE_DTYPES)}")
    fmt = IntFormat(bits=bits, group_size=group_size, symmetric=symmetric, scale_dtype=scale_dtype)
    adapter = get_adapter(model.config.model_type)
    check_finite(model)
    solver = SOLVERS[method]
    info = QuantizationInfo(
        method=method,
        settings={"format": fmt.to_dict(), "clip_search": clip_search},
        storage_dtype=storage_dtype,
    )
    targets = quantizable_linears(model, adapter)
    with torch.no_grad():
        for name, module in tqdm(targets, desc=f"quantizing ({method})", disable=not progress):
            w = linear_weight(module).detach().float()
            qt = solver(w, fmt, clip_search=clip_search)
            err = ((qt.dequantize() - w).pow(2).sum() / w.pow(2).sum().clamp_min(1e-30)).item()
            qlayer = QuantizedLinear.from_quantized(qt, module.bias)
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, qlayer)
            out, n = qt.shape
            info.layers[name] = {
                "format": fmt.to_dict(),
                "shape": [out, n],
                "numel": out * n,
                "storage_bits": fmt.storage_bits(out, n),
                "bpw": fmt.bits_per_weight(out, n),
                "weight_rel_mse": err,
            }
        _round_unquantized(model, STORAGE_DTYPES[storage_dtype], info)
    model.lowbit_info = info
    return model


def _round_unquantized(model: nn.Module, dtype: torch.dtype, info: QuantizationInfo) -> None:
    """Round every float parameter through the storage dtype, as the artifact will hold it."""
    seen: set[int] = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) not in seen:
            seen.add(id(p))
            p.data = p.data.to(dtype).to(p.dtype)
        owner = model.get_submodule(name.rpartition(".")[0])
        if not isinstance(owner, QuantizedLinear):
            info.unquantized.append(name)
