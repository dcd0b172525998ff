"""A linear layer that keeps packed codes and dequantizes them in its forward.

This is the torch reference path: it runs everywhere and keeps the weight
small in memory; fast kernels can replace `dequantized_weight` per device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.formats import Format, QuantizedTensor


class QuantizedLinear(nn.Module):
    """y = x Wᵀ + b with W rebuilt from packed codes on every call; the format says which
    tensors it packs into (`Format.packed_buffers`) and how to read them back."""

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
        for name, (shape, dtype) in fmt.packed_buffers(out_features, in_features).items():
            self.register_buffer(name, torch.zeros(shape, dtype=dtype, device=device))
        for name in ("scales", "qzeros"):  # attributes of every format's layer, None where not packed
            if name not in self._buffers:
                setattr(self, name, None)
        self.bias = nn.Parameter(torch.zeros(out_features, device=device)) if bias else None

    @property
    def packed(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in self.fmt.packed_buffers(self.out_features, self.in_features)}

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
        return self.fmt.dequantize_packed(self.packed, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.dequantized_weight().to(x.dtype)
        b = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, w, b)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, format={self.fmt.name}"
