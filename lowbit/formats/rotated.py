"""Any format with its layer's inputs turned at run time: `int3-g128-rot` (an online rotation).

The layer stores its weight in an orthogonal Q's basis, W Q (lowbit.orthogonal, seed in the
format), and computes y = (x Q)(W Q)ᵀ = x Wᵀ. A row with a few large entries then has its energy
spread over all inputs, so a low-bit grid wastes less of its range on them (QuaRot's Hadamard
before down_proj, QuIP#'s incoherence). Unlike the residual rotation (transforms.rotation) it
folds into nothing: the rotation must run beside the layer, so it reaches inputs no offline fold
can (down_proj's, after the gated activation; o_proj's, across heads) and needs no untied head.

Everything outside the solver sees the layer in the model's own basis: `dequantize` and
`dequantize_packed` return (W Q)_q Qᵀ, so measurements, probes, round-to-nearest and the runtime
use a rotated format like any other. GPTQ solves in Q's basis (W Q against Qᵀ H Q, the same output
error) and asks the base format for the grid. The rotation costs no stored bits (the seed is in
the format); it costs lowbit's runtime one structured transform per call. No export target holds
it: llama.cpp and vLLM do not run it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from lowbit.errors import FormatError
from lowbit.formats.integer import IntFormat, QuantizedTensor
from lowbit.orthogonal import Orthogonal, orthogonal_factors

SUFFIX = "-rot"


@dataclass(frozen=True)
class RotatedFormat:
    """`base` on inputs turned by the orthogonal transform of `seed` (one per row width)."""

    base: IntFormat
    seed: int = 0

    kind: ClassVar[str] = "rot"

    def __post_init__(self) -> None:
        if isinstance(self.base, RotatedFormat):
            raise FormatError(f"{self.base.name} is already rotated; name the format once with {SUFFIX}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise FormatError(f"a rotation seed must be a whole number >= 0, got {self.seed!r}")

    # ---- what the base format answers ---------------------------------------------------
    @property
    def name(self) -> str:
        return f"{self.base.name}{SUFFIX}" + (f"{self.seed}" if self.seed else "")

    @property
    def bits(self) -> int:
        return self.base.bits

    @property
    def group_size(self) -> int | None:
        return self.base.group_size

    @property
    def symmetric(self) -> bool:
        return self.base.symmetric

    @property
    def scale_dtype(self) -> str:
        return self.base.scale_dtype

    @property
    def row_multiple(self) -> int:
        return self.base.row_multiple

    def group_len(self, in_features: int) -> int:
        return self.base.group_len(in_features)

    def num_groups(self, in_features: int) -> int:
        return self.base.num_groups(in_features)

    def storage_bits(self, out_features: int, in_features: int) -> int:
        """The base format's bits: the rotation is rebuilt from the seed."""
        return self.base.storage_bits(out_features, in_features)

    def bits_per_weight(self, out_features: int, in_features: int) -> float:
        return self.base.bits_per_weight(out_features, in_features)

    def packed_buffers(self, out_features: int, in_features: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return self.base.packed_buffers(out_features, in_features)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "base": self.base.to_dict(), "seed": self.seed}

    # ---- the basis ----------------------------------------------------------------------
    def rotation(self, in_features: int) -> Orthogonal:
        return orthogonal_factors(in_features, self.seed)

    def to_basis(self, weight: torch.Tensor, hessian: torch.Tensor | None = None):
        """(W Q, Qᵀ H Q): the weight and its inputs' Hessian as the base format's solver sees them."""
        q = self.rotation(weight.shape[1])
        turned = q.right(weight)
        if hessian is None:
            return turned, None
        return turned, q.right(q.right(hessian).T)  # (H Q)ᵀ Q = Qᵀ H Q, H symmetric

    def wrap(self, qt) -> RotatedTensor:
        return RotatedTensor(self, qt)

    # ---- whole tensors, in the model's basis -------------------------------------------------
    def quantize_tensor(self, weight: torch.Tensor, **options) -> RotatedTensor:
        """Round-to-nearest in Q's basis (options as the base format's)."""
        return self.wrap(self.base.quantize_tensor(self.to_basis(weight.float())[0], **options))

    def dequantize_packed(self, packed: dict[str, torch.Tensor], in_features: int) -> torch.Tensor:
        """float32 rows in the model's basis: (W Q)_q Qᵀ."""
        return self.rotation(in_features).right_t(self.base.dequantize_packed(packed, in_features))

    def unpack(self, shape: tuple[int, int], packed: dict[str, torch.Tensor]) -> RotatedTensor:
        return self.wrap(self.base.unpack(shape, packed))


@dataclass
class RotatedTensor:
    """A base format's tensor, stored in Q's basis; `dequantize` answers in the model's."""

    fmt: RotatedFormat
    inner: QuantizedTensor

    @property
    def shape(self) -> tuple[int, int]:
        return self.inner.shape

    @property
    def codes(self) -> torch.Tensor:
        return self.inner.codes

    @property
    def scales(self) -> torch.Tensor:
        return self.inner.scales

    @property
    def zeros(self) -> torch.Tensor | None:
        return self.inner.zeros

    def dequantize(self) -> torch.Tensor:
        return self.fmt.rotation(self.shape[1]).right_t(self.inner.dequantize())

    def split_rows(self, sizes: list[int]) -> list[RotatedTensor]:
        return [RotatedTensor(self.fmt, part) for part in self.inner.split_rows(sizes)]

    def pack(self) -> dict[str, torch.Tensor]:
        return self.inner.pack()
