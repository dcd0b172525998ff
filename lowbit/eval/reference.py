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
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from lowbit.activations import Offload
from lowbit.models.adapters import decoder_blocks, get_adapter
from lowbit.models.lazy import lazy_weights
from lowbit.walker import Block, StandIn, Unresumable, walk


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

    def to(self, device: torch.device) -> ReferenceCache:
        bias = None if self.head_bias is None else self.head_bias.to(device)
        return ReferenceCache(self.hidden.to(device), self.head_weight.to(device), bias, self.softcap)

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
    model: nn.Module,
    windows: torch.Tensor,
    batch_size: int = 4,
    progress: bool = True,
    device: torch.device | None = None,
    offload: Offload | None = None,
) -> ReferenceCache:
    """Run the reference model once over `windows`, keeping the output head's inputs. A lazy
    model (one whose blocks are on disk) runs block by block over all windows, one float block
    in memory at a time, its activations between blocks where `offload` says (activations.py);
    with `device`, the blocks (or the whole model) compute there."""
    head = model.get_output_embeddings()
    captured: list[torch.Tensor] = []
    hook = head.register_forward_hook(lambda _m, args, _o: captured.append(args[0].detach().float().cpu()))
    try:
        if lazy_weights(model) is not None:
            _forward_by_blocks(model, windows, batch_size, progress, device, offload)
        else:
            home = next(model.parameters()).device
            model.to(device or home)
            for i in tqdm(range(0, len(windows), batch_size), desc="reference model", disable=not progress):
                model(windows[i : i + batch_size].to(device or home), use_cache=False)
            model.to(home)
    finally:
        hook.remove()
    bias = head.bias.detach().float().clone() if getattr(head, "bias", None) is not None else None
    return ReferenceCache(torch.cat(captured), head.weight.detach().float().clone(), bias, _softcap(model))


def reference_key(fingerprint: str, dtype: torch.dtype) -> str:
    """What names a reference in the cache: the model, and the dtype it was computed in when that
    is not float32 (float32 keeps the keys caches were made with)."""
    return fingerprint if dtype == torch.float32 else f"{fingerprint}|{str(dtype).removeprefix('torch.')}"


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
    device: torch.device | None = None,
    offload: Offload | None = None,
) -> ReferenceCache:
    """The reference for these windows from the disk cache, computing it on a miss (on `device`)."""
    path = reference_cache_path(fingerprint, windows)
    if path.is_file():
        try:
            ref = ReferenceCache.load(path)
            if ref.num_windows == len(windows):
                return ref
        except Exception:  # a damaged cache entry is recomputed, never trusted
            path.unlink(missing_ok=True)
    ref = build_reference(load_model_fn(), windows, batch_size, progress, device, offload)
    ref.save(path, {"fingerprint": fingerprint, "windows": len(windows)})
    return ref


class _FloatForward(Unresumable):
    """Walker client: the float blocks' outputs, nothing changed; keeps the last block's."""

    desc = "reference model (block by block)"
    outputs_hint = "; the float model overflows on this data: compute in float32"
    releases_blocks = True

    def __init__(self, last: int) -> None:
        self.last = last
        self.outputs: list[torch.Tensor] = []
        self.returns_tuple = False

    def process(self, block: Block) -> list[torch.Tensor]:
        outputs = block.run()
        if block.index == self.last:
            self.outputs, self.returns_tuple = outputs, block.calls.returns_tuple
        return outputs


class _Replay(StandIn):
    """Stands in for the decoder blocks once their outputs are known: the first returns the last
    block's output for the batch, the others pass it on, and the model's own code then applies
    the final norm and the head."""

    def __init__(self, block: nn.Module, outputs: list[torch.Tensor] | None, returns_tuple: bool) -> None:
        super().__init__(block)
        self.outputs, self.returns_tuple, self.batch = outputs, returns_tuple, 0

    def forward(self, *args, **kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        if self.outputs is not None:
            hidden = self.outputs[self.batch].to(hidden.device)
            self.batch += 1
        return (hidden,) if self.returns_tuple else hidden


def _forward_by_blocks(
    model: nn.Module, windows: torch.Tensor, batch_size: int, progress: bool, device, offload: Offload | None
) -> None:
    adapter = get_adapter(model.config.model_type)
    client = _FloatForward(len(decoder_blocks(model, adapter)) - 1)
    walk(model, adapter, windows, client, batch_size, progress=progress, device=device, offload=offload)
    with replayed(model, client.outputs, client.returns_tuple):
        for start in range(0, len(windows), batch_size):
            model(windows[start : start + batch_size], use_cache=False)


@contextmanager
def replayed(model: nn.Module, outputs: list[torch.Tensor], returns_tuple: bool) -> Iterator[None]:
    """The model with its decoder blocks standing in for themselves: a forward on batch b (in
    order) costs the embedding, the final norm and the head, with `outputs[b]` as what the last
    block returned. For a walk that ran the blocks already."""
    blocks = decoder_blocks(model, get_adapter(model.config.model_type))
    originals = list(blocks)
    try:
        for i in range(len(blocks)):
            blocks[i] = _Replay(originals[i], outputs if i == 0 else None, returns_tuple)
        yield
    finally:
        for i, block in enumerate(originals):
            blocks[i] = block
