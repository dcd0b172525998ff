"""Random orthogonal transforms that mix every input into every output, kept as factors.

Q = diag(s) (A ⊗ H): random signs s, a Haar-random m x m matrix A and a normalised Hadamard H of
2^k, for a width d = m 2^k (576 = 9 x 64, 1536 = 3 x 512). Deterministic for a seed. Used folded
into the weights (transforms.rotation) and at run time on a layer's inputs (formats.rotated);
the factors apply in d (m + 2^k) operations per row instead of d², which is what makes the run-time
use affordable.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
from scipy.linalg import hadamard


@dataclass(frozen=True)
class Orthogonal:
    signs: torch.Tensor  # [d] float64, ±1
    left: torch.Tensor  # [m, m] float64, Haar-random ([[1]] when d is a power of two)
    hadamard: torch.Tensor  # [2^k, 2^k] float64, H / sqrt(2^k)

    @property
    def width(self) -> int:
        return self.signs.numel()

    def matrix(self) -> torch.Tensor:
        """Q as a dense float64 [d, d] matrix."""
        return self.signs[:, None] * torch.kron(self.left, self.hadamard)

    def _factors(self, like: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(t.to(dtype=like.dtype, device=like.device) for t in (self.signs, self.left, self.hadamard))

    def right(self, x: torch.Tensor) -> torch.Tensor:
        """x Q for x [..., d]: a layer's inputs (or a weight's columns) turned into Q's basis."""
        s, a, h = self._factors(x)
        m, p = a.shape[0], h.shape[0]
        y = torch.einsum("ki,...kl,lj->...ij", a, (x * s).reshape(*x.shape[:-1], m, p), h)
        return y.reshape(x.shape)

    def right_t(self, x: torch.Tensor) -> torch.Tensor:
        """x Qᵀ for x [..., d]: back from Q's basis (Q Qᵀ = I)."""
        s, a, h = self._factors(x)
        m, p = a.shape[0], h.shape[0]
        y = torch.einsum("ik,...kl,jl->...ij", a, x.reshape(*x.shape[:-1], m, p), h)
        return y.reshape(x.shape) * s


@lru_cache(maxsize=32)
def orthogonal_factors(width: int, seed: int = 0) -> Orthogonal:
    if width <= 0:
        raise ValueError(f"width must be positive, got {width}")
    power = width & -width  # largest power of two dividing width
    rest = width // power
    gen = torch.Generator().manual_seed(seed)
    h = torch.from_numpy(hadamard(power).astype("float64")) / power**0.5
    left = torch.ones(1, 1, dtype=torch.float64)
    if rest > 1:
        q, r = torch.linalg.qr(torch.randn(rest, rest, generator=gen, dtype=torch.float64))
        left = (q * torch.sign(torch.diagonal(r))).contiguous()  # Haar-distributed
    signs = torch.randint(0, 2, (width,), generator=gen).to(torch.float64) * 2 - 1
    return Orthogonal(signs, left, h)


def orthogonal(width: int, seed: int = 0) -> torch.Tensor:
    """A random orthogonal [width, width] float64 matrix that mixes every input into every output."""
    return orthogonal_factors(width, seed).matrix()
