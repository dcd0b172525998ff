"""Quantized layers as values: name, format, codes, scales, zeros, shape.

One way to read what lowbit quantized, whether the model is in memory (just quantized, or
loaded) or an artifact on disk (read tensor by tensor, without building the model). Exporters
read this, never the runtime modules' buffers or the artifact's file layout.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from lowbit.artifact import WEIGHTS, read_manifest, verify
from lowbit.errors import ArtifactError, LowbitError
from lowbit.formats import Format, QuantizedTensor, format_from_dict
from lowbit.runtime import QuantizedEmbedding, QuantizedLinear


@dataclass(frozen=True)
class QuantizedLayer:
    """One packed weight: a decoder linear, the output head, or the token embedding ("embedding",
    whose rows are tokens; `tied_head` names an output head that reads the same codes)."""

    name: str
    kind: str  # "linear" | "head" | "embedding"
    tensor: QuantizedTensor
    bias: torch.Tensor | None = None
    tied_head: str | None = None

    @property
    def format(self) -> Format:
        return self.tensor.fmt

    @property
    def shape(self) -> tuple[int, int]:
        """[out, in]: for an embedding, [tokens, hidden]."""
        return self.tensor.shape

    @property
    def codes(self) -> torch.Tensor:
        """uint8 [out, in], one code per weight."""
        return self.tensor.codes

    @property
    def scales(self) -> torch.Tensor:
        """[out, groups] in the format's scale dtype; for a codebook, its levels [out, 2^b]."""
        return self.tensor.scales

    @property
    def zeros(self) -> torch.Tensor | None:
        """uint8 [out, groups] zero points; None for a symmetric grid."""
        return self.tensor.zeros

    def dequantize(self) -> torch.Tensor:
        return self.tensor.dequantize()


def quantized_layers(source: nn.Module | str | os.PathLike) -> list[QuantizedLayer]:
    """Every quantized layer of a model (quantized in memory, or loaded) or of an artifact
    directory, in the order its manifest lists them; a head tied to the embedding is not listed
    on its own (see `QuantizedLayer.tied_head`)."""
    if isinstance(source, nn.Module):
        return list(_from_model(source))
    return list(_from_artifact(Path(source)))


def _from_model(model: nn.Module) -> Iterator[QuantizedLayer]:
    info = getattr(model, "lowbit_info", None)
    names = list(info.layers) if info is not None else [n for n, m in model.named_modules() if _packed(m)]
    modules = dict(model.named_modules())
    for name in names:
        module = modules.get(name)
        if not _packed(module):
            raise LowbitError(f"{name} is recorded as quantized but the model holds {type(module).__name__} there")
        packed = module.packed
        if isinstance(module, QuantizedEmbedding):
            shape, kind, bias = (module.num_embeddings, module.embedding_dim), "embedding", None
            tied = [n for n, m in modules.items() if isinstance(m, QuantizedLinear) and m.qweight is module.qweight]
            tied_head = tied[0] if tied else None
        else:
            shape, bias, tied_head = (module.out_features, module.in_features), module.bias, None
            kind = "head" if module is model.get_output_embeddings() else "linear"
        tensor = module.fmt.unpack(shape, packed)
        yield QuantizedLayer(name, kind, tensor, None if bias is None else bias.detach(), tied_head)


def _packed(module: nn.Module | None) -> bool:
    return isinstance(module, (QuantizedLinear, QuantizedEmbedding))


def _from_artifact(path: Path) -> Iterator[QuantizedLayer]:
    manifest = read_manifest(path)
    verify(path, manifest)
    try:
        with safe_open(str(path / WEIGHTS), "pt") as f:
            stored = set(f.keys())
            for name, rec in manifest["layers"].items():
                fmt = format_from_dict(rec["format"])
                shape = tuple(rec["shape"])
                packed = {k: f.get_tensor(f"{name}.{k}") for k in fmt.packed_buffers(*shape) if f"{name}.{k}" in stored}
                bias = f.get_tensor(f"{name}.bias").float() if f"{name}.bias" in stored else None
                kind = rec.get("kind", "linear")
                tensor = fmt.unpack(shape, packed)
                yield QuantizedLayer(name, kind, tensor, bias, rec.get("tied_head"))
    except SafetensorError as exc:
        raise ArtifactError(f"{path / WEIGHTS} is corrupt ({exc}); re-create the artifact") from exc
