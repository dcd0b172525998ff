"""A linear layer that keeps packed codes and dequantizes them in its forward.

This is the torch reference path: it runs everywhere and keeps the weight
small in memory; fast kernels can replace `dequantized_weight` per device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.dtypes import DTYPES
from lowbit.formats import Format, QuantizedTensor
from lowbit.formats.integer import dequantize_codes
from lowbit.formats.packing import packed_words, unpack_codes


def dequantize_rows(
    fmt: Format, qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor | None, columns: int
) -> torch.Tensor:
    """Float rows from packed rows (any subset of a layer's rows, with their scales and zeros)."""
    codes = unpack_codes(qweight, fmt.bits, columns, dtype=torch.float32)
    zeros = None if qzeros is None else unpack_codes(qzeros, fmt.bits, fmt.num_groups(columns))
    return dequantize_codes(fmt, codes, scales, zeros, columns)


class QuantizedLinear(nn.Module):
    """y = x Wᵀ + b with W rebuilt from packed integer codes on every call."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        fmt: Format,
        bias: bool = False,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.fmt = fmt
        ng = fmt.num_groups(in_features)
        kw = {"device": device}
        self.register_buffer(
            "qweight",
            torch.zeros(out_features, packed_words(in_features, fmt.bits), dtype=torch.int32, **kw),
        )
        self.register_buffer("scales", torch.zeros(out_features, ng, dtype=DTYPES[fmt.scale_dtype], **kw))
        if not fmt.symmetric:
            self.register_buffer(
                "qzeros",
                torch.zeros(out_features, packed_words(ng, fmt.bits), dtype=torch.int32, **kw),
            )
        else:
            self.qzeros = None
        self.bias = nn.Parameter(torch.zeros(out_features, **kw)) if bias else None

    @classmethod
    def from_quantized(cls, qt: QuantizedTensor, bias: torch.Tensor | None) -> QuantizedLinear:
        out, n = qt.shape
        layer = cls(n, out, qt.fmt, bias=bias is not None, device="meta")
        for name, t in qt.pack().items():
            setattr(layer, name, t)
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach().clone().float(), requires_grad=False)
        return layer

    def dequantized_weight(self) -> torch.Tensor:
        return dequantize_rows(self.fmt, self.qweight, self.scales, self.qzeros, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.dequantized_weight().to(x.dtype)
        b = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, w, b)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, format={self.fmt.name}"
