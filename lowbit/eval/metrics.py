"""Perplexity, KL divergence to the reference and top-1 agreement (protocol.md)."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from lowbit.activations import Offload
from lowbit.data import QUICK_WINDOWS, eval_windows, load_text, tokenize
from lowbit.devices import resolve_device
from lowbit.errors import LowbitError
from lowbit.eval.reference import ReferenceCache, build_reference, cache_dir, cached_reference, reference_key
from lowbit.models import load_model, resolve_model_source

PROTOCOLS = {"quick": QUICK_WINDOWS, "full": None}

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalSettings:
    """Which text, how many windows (quick: the first 64; full: all), how long, how many per forward."""

    data: str = "wikitext2"
    protocol: str = "quick"
    seqlen: int = 512
    batch_size: int = 4

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise LowbitError(f"unknown protocol {self.protocol!r}; use quick or full")
        for value, flag in ((self.seqlen, "--eval-seqlen"), (self.batch_size, "--eval-batch-size")):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise LowbitError(f"{flag} must be a positive whole number, got {value!r}")

    def windows(self, tokenizer) -> torch.Tensor:
        if tokenizer is None:
            raise LowbitError("evaluation needs the model's tokenizer (lowbit.load_model returns one)")
        return eval_windows(tokenize(tokenizer, load_text(self.data)), self.seqlen, PROTOCOLS[self.protocol])


def _device_of(model) -> torch.device:
    """Where `model` computes (the CPU for what is not a module, e.g. a cached reference)."""
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


def protocol_windows(tokenizer, data: str = "wikitext2", protocol: str = "quick", seqlen: int = 512):
    return EvalSettings(data, protocol, seqlen).windows(tokenizer)


@torch.no_grad()
def evaluate_windows(
    model: nn.Module,
    windows: torch.Tensor,
    reference: ReferenceCache | None = None,
    batch_size: int = 4,
    progress: bool = True,
    desc: str = "evaluating",
) -> dict[str, Any]:
    """Metrics of `model` on token `windows`; KLD and agreement when a reference is given."""
    if reference is not None and reference.num_windows != len(windows):
        raise LowbitError("reference cache does not match the evaluation windows; clear the cache")
    nll_sum = kld_sum = 0.0
    agree = count = 0
    start = time.perf_counter()
    device = _device_of(model)
    if reference is not None:
        reference = reference.to(device)
    for i in tqdm(range(0, len(windows), batch_size), desc=desc, disable=not progress):
        batch = windows[i : i + batch_size].to(device)
        logits = model(batch, use_cache=False).logits[:, :-1].float()
        logp = F.log_softmax(logits, dim=-1)
        del logits
        targets = batch[:, 1:]
        nll_sum += -logp.gather(-1, targets.unsqueeze(-1)).sum().item()
        count += targets.numel()
        if reference is not None:
            ref_logp = F.log_softmax(reference.logits(slice(i, i + len(batch)))[:, :-1], dim=-1)
            if ref_logp.shape[-1] != logp.shape[-1]:
                raise LowbitError(
                    f"reference vocabulary ({ref_logp.shape[-1]}) differs from the model's "
                    f"({logp.shape[-1]}); compare models that share a tokenizer"
                )
            kld_sum += (ref_logp.exp() * (ref_logp - logp)).sum().item()
            agree += (ref_logp.argmax(-1) == logp.argmax(-1)).sum().item()
    nll = nll_sum / count
    if not math.isfinite(nll):
        raise LowbitError("the model produced NaN or Inf log-probabilities; the quantized weights are broken")
    result: dict[str, Any] = {
        "perplexity": math.exp(nll),
        "nll": nll,
        "windows": len(windows),
        "seqlen": windows.shape[1],
        "tokens_scored": count,
        "seconds": time.perf_counter() - start,
    }
    if reference is not None:
        result["kld"] = kld_sum / count
        result["top1_agreement"] = agree / count
    return result


class _ReferenceAsModel:
    """Scores the cached reference like a model, for its own perplexity."""

    def __init__(self, ref: ReferenceCache) -> None:
        self.ref, self.pos = ref, 0

    def __call__(self, batch: torch.Tensor, use_cache: bool = False) -> SimpleNamespace:
        logits = self.ref.logits(slice(self.pos, self.pos + len(batch)))
        self.pos += len(batch)
        return SimpleNamespace(logits=logits)


def reference_perplexity(ref: ReferenceCache, windows: torch.Tensor, batch_size: int = 4) -> float:
    """Perplexity of the reference model from its cache: no forward pass needed."""
    return evaluate_windows(_ReferenceAsModel(ref), windows, None, batch_size, progress=False)["perplexity"]


def evaluate(
    model: nn.Module,
    tokenizer=None,
    reference: nn.Module | ReferenceCache | str | None = None,
    data: str = "wikitext2",
    protocol: str = "quick",
    seqlen: int = 512,
    batch_size: int = 4,
    progress: bool = True,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    offload_activations: str | None = None,
) -> dict[str, Any]:
    """Evaluate `model` on `data` windows (quick: first 64; full: all).

    `reference` may be a float model, a ReferenceCache, or a model spec whose
    predictions are cached on disk (LOWBIT_CACHE_DIR) for later evaluations; a spec's model is
    read block by block (models/lazy.py), so it need not fit in memory, with the activations
    between its blocks in CPU memory or in files under the cache directory when
    `offload_activations` is "cpu" or "disk". With `device`, both run there (the model moves
    for the evaluation and back).
    """
    settings = EvalSettings(data, protocol, seqlen, batch_size)
    compute = None if device is None else resolve_device(device)
    offload = None
    if offload_activations is not None:
        offload = Offload(offload_activations, cache_dir() / "activations").check()
    windows = settings.windows(tokenizer)
    ref = resolve_reference(reference, windows, batch_size, progress, compute, dtype, offload)
    if compute is None:
        return evaluate_against(model, windows, ref, settings, progress)
    home = _device_of(model)
    model.to(compute)
    try:
        return evaluate_against(model, windows, ref, settings, progress)
    finally:
        model.to(home)


def evaluate_against(
    model: nn.Module,
    windows: torch.Tensor,
    reference: ReferenceCache | None,
    settings: EvalSettings,
    progress: bool = True,
    desc: str = "evaluating",
) -> dict[str, Any]:
    """`evaluate_windows` plus what was evaluated on and, with a reference, its own perplexity."""
    result = evaluate_windows(model, windows, reference, settings.batch_size, progress, desc)
    result.update({"data": settings.data, "protocol": settings.protocol})
    if reference is not None:
        result["reference_perplexity"] = reference_perplexity(reference, windows, settings.batch_size)
    return result


def default_reference(model: nn.Module) -> str | None:
    """An artifact's source model, when it can still be found (else perplexity only, with a note)."""
    manifest = getattr(model, "lowbit_manifest", None) or {}
    source = manifest.get("source")
    if not source:
        return None
    try:
        resolve_model_source(source)
    except LowbitError:
        logger.warning("source model %s not found; perplexity only", source)
        return None
    return source


def resolve_reference(
    reference,
    windows: torch.Tensor,
    batch_size: int = 4,
    progress: bool = True,
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    offload: Offload | None = None,
) -> ReferenceCache | None:
    """The reference's predictions on `windows`: a model's computed, a spec's from the cache or
    computed block by block (the spec loaded lazily, in `dtype`, on `device`)."""
    if reference is None or isinstance(reference, ReferenceCache):
        return reference
    if isinstance(reference, nn.Module):
        return build_reference(reference, windows, batch_size, progress, device, offload)
    source = resolve_model_source(reference)
    return cached_reference(
        reference_key(source.fingerprint(), dtype),
        windows,
        lambda: load_model(reference, dtype, lazy=True).model,
        batch_size,
        progress,
        device,
        offload,
    )
