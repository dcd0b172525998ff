"""A token embedding kept as packed codes, in the same row layout as QuantizedLinear.

Only the rows looked up are dequantized, so a 50k-token table costs its packed bytes in
memory and a few rows of work per token. The layout is that of a linear layer with
`num_embeddings` outputs, so a head tied to the embedding shares the very same buffers.
"""

from __future__ import annotations

import torch
from torch import nn

from lowbit.formats import Format, QuantizedTensor
from lowbit.runtime.qlinear import QuantizedLinear


class QuantizedEmbedding(nn.Module):
    """nn.Embedding's lookup over packed integer codes (no max_norm, no sparse gradients)."""

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        fmt: Format,
        padding_idx: int | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.padding_idx = padding_idx
        self.fmt = fmt
        # the buffers a linear of the same shape would have, so a tied head can share them
        for name, (shape, dtype) in fmt.packed_buffers(num_embeddings, embedding_dim).items():
            self.register_buffer(name, torch.zeros(shape, dtype=dtype, device=device))
        for name in ("scales", "qzeros"):  # attributes of every format's layer, None where not packed
            if name not in self._buffers:
                setattr(self, name, None)

    @property
    def packed(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in self.fmt.packed_buffers(self.num_embeddings, self.embedding_dim)}

    @classmethod
    def from_quantized(cls, qt: QuantizedTensor, padding_idx: int | None = None) -> QuantizedEmbedding:
        rows, dim = qt.shape
        layer = cls(rows, dim, qt.fmt, padding_idx, device="meta")
        for name, t in qt.pack().items():
            setattr(layer, name, t)
        return layer

    def tied_head(self) -> QuantizedLinear:
        """An output head over the same buffers (for models whose head is tied to the embedding)."""
        head = QuantizedLinear(self.embedding_dim, self.num_embeddings, self.fmt, device="meta")
        for name, t in self.packed.items():
            setattr(head, name, t)
        return head

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        flat = input_ids.reshape(-1)
        rows = self.fmt.dequantize_packed({k: t[flat] for k, t in self.packed.items()}, self.embedding_dim)
        return rows.reshape(*input_ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, format={self.fmt.name}"
