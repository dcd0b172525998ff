"""The reference model's predictions, cached compactly.

Full-vocabulary log-probabilities for 32k positions would take gigabytes, so
the cache keeps what produces them: the input of the output head at every
position (hidden size, not vocabulary size) and the head itself. Rebuilding
the log-probabilities is one matrix product, exact in float32.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm


def cache_dir() -> Path:
    return Path(os.environ.get("LOWBIT_CACHE_DIR", Path.home() / ".cache" / "lowbit"))


@dataclass
class ReferenceCache:
    hidden: torch.Tensor  # float32 [windows, seqlen, d]: input of the output head
    head_weight: torch.Tensor  # [vocab, d]
    head_bias: torch.Tensor | None
    softcap: float | None  # Gemma-2/3 style final logit soft-capping

    def logits(self, index: slice) -> torch.Tensor:
        z = F.linear(self.hidden[index], self.head_weight, self.head_bias)
        if self.softcap:
            z = torch.tanh(z / self.softcap) * self.softcap
        return z

    @property
    def num_windows(self) -> int:
        return self.hidden.shape[0]

    def save(self, path: Path, meta: dict) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {"hidden": self.hidden, "head_weight": self.head_weight.contiguous()}
        if self.head_bias is not None:
            tensors["head_bias"] = self.head_bias
        tmp = path.with_suffix(".partial")
        save_file(tensors, str(tmp), metadata={"meta": json.dumps({**meta, "softcap": self.softcap})})
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> ReferenceCache:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = json.loads(f.metadata()["meta"])
        t = load_file(str(path))
        return cls(t["hidden"], t["head_weight"], t.get("head_bias"), meta.get("softcap"))


def _softcap(model: nn.Module) -> float | None:
    cap = getattr(model.config, "final_logit_softcapping", None)
    return float(cap) if cap else None


@torch.no_grad()
def build_reference(
    model: nn.Module, windows: torch.Tensor, batch_size: int = 4, progress: bool = True
) -> ReferenceCache:
    """Run the reference model once over `windows`, keeping the output head's inputs."""
    head = model.get_output_embeddings()
    captured: list[torch.Tensor] = []
    hook = head.register_forward_hook(lambda _m, args, _o: captured.append(args[0].detach().float()))
    try:
        for i in tqdm(range(0, len(windows), batch_size), desc="reference model", disable=not progress):
            model(windows[i : i + batch_size], use_cache=False)
    finally:
        hook.remove()
    bias = head.bias.detach().float().clone() if getattr(head, "bias", None) is not None else None
    return ReferenceCache(torch.cat(captured), head.weight.detach().float().clone(), bias, _softcap(model))


def reference_cache_path(fingerprint: str, windows: torch.Tensor) -> Path:
    h = hashlib.sha256()
    h.update(fingerprint.encode())
    h.update(windows.numpy().tobytes())
    return cache_dir() / "reference" / f"{h.hexdigest()[:24]}.safetensors"


def cached_reference(
    fingerprint: str,
    windows: torch.Tensor,
    load_model_fn,
    batch_size: int = 4,
    progress: bool = True,
) -> ReferenceCache:
    """The reference for these windows from the disk cache, computing it on a miss."""
    path = reference_cache_path(fingerprint, windows)
    if path.is_file():
        try:
            ref = ReferenceCache.load(path)
            if ref.num_windows == len(windows):
                return ref
        except Exception:  # a damaged cache entry is recomputed, never trusted
            path.unlink(missing_ok=True)
    ref = build_reference(load_model_fn(), windows, batch_size, progress)
    ref.save(path, {"fingerprint": fingerprint, "windows": len(windows)})
    return ref
