"""Where the work runs and in which float type: `--device` and `--dtype`.

The model lives on the CPU (lazily, block by block, for models larger than memory); the block
walker moves one block at a time to the compute device and its packed result back. Hessians,
their inverses and GPTQ's error updates are float32 (float64 where the solver needs it) whatever
the compute dtype: only the model's forward passes run in it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import torch

from lowbit.dtypes import DTYPES
from lowbit.errors import LowbitError

DEVICE_CHOICES = "auto, cpu, cuda, cuda:N or mps"
DTYPE_CHOICES = ("auto", *DTYPES)


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """The torch device `spec` names, checked to exist here; auto: CUDA, else MPS, else the CPU."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    match = re.fullmatch(r"cuda(?::(\d+))?", spec)
    if match:
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else "no visible GPU or driver"
            raise LowbitError(
                f"--device {spec}: torch {torch.__version__} sees no CUDA device ({build}); use --device cpu"
            )
        index = int(match.group(1) or 0)
        count = torch.cuda.device_count()
        if index >= count:
            raise LowbitError(f"--device {spec}: only {count} CUDA device(s) are visible (cuda:0 to cuda:{count - 1})")
        return torch.device("cuda", index)
    if spec == "mps":
        if not _mps_available():
            raise LowbitError("--device mps: this torch build or machine has no Metal (MPS) device; use --device cpu")
        return torch.device("mps")
    raise LowbitError(f"--device {spec!r} is not a device lowbit knows; use {DEVICE_CHOICES}")


def resolve_dtype(spec: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """The compute dtype: auto is float32 on a CPU (protocol.md: measured fastest and exact
    enough there), bfloat16 on a GPU that computes it, else float16."""
    if isinstance(spec, torch.dtype):
        spec = str(spec).removeprefix("torch.")
    spec = spec or "auto"
    if spec == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if device.type == "mps":
            return torch.float16
        return torch.float32
    if spec not in DTYPES:
        raise LowbitError(f"--dtype {spec!r} is not supported; use one of {', '.join(DTYPE_CHOICES)}")
    dtype = DTYPES[spec]
    if dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        name = torch.cuda.get_device_name(device)
        raise LowbitError(f"--dtype bfloat16: {name} cannot compute in bfloat16; use --dtype float16")
    if dtype == torch.bfloat16 and device.type == "mps" and not _mps_bf16():
        raise LowbitError("--dtype bfloat16: this MPS device cannot compute in bfloat16; use --dtype float16")
    return dtype


def cast_parameters(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """A loaded artifact's float parameters (embeddings, norms, biases) in the compute dtype;
    packed codes and scales are buffers and stay exactly as stored."""
    for p in model.parameters():
        if p.is_floating_point():
            p.data = p.data.to(dtype)


def to_device(value: Any, device: torch.device, moved: dict[int, torch.Tensor] | None = None) -> Any:
    """`value` with every tensor inside it (tuples, lists, dicts, nested) moved to `device`; a
    tensor met twice (e.g. one rotary table passed to every block) is moved once (`moved`)."""
    moved = {} if moved is None else moved

    def move(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in moved:
            moved[id(t)] = t.to(device)
        return moved[id(t)]

    return _map_tensors(value, move)


def _map_tensors(value: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, tuple):
        return tuple(_map_tensors(v, fn) for v in value)
    if isinstance(value, list):
        return [_map_tensors(v, fn) for v in value]
    if isinstance(value, dict):
        return {k: _map_tensors(v, fn) for k, v in value.items()}
    return value


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()


def _mps_bf16() -> bool:
    try:
        torch.ones(1, dtype=torch.bfloat16, device="mps")
    except (RuntimeError, TypeError):
        return False
    return True
