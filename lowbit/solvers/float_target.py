"""Float targets: a linear solved to reproduce the float model's output, not its own on
already-quantized inputs (the asymmetric calibration of GPTAQ).

Block by block, GPTQ minimises ||X̃ (W - Q)ᵀ||², X̃ [tokens, in] being the inputs that the
quantized blocks before it produce. What the model needs is X̃ Qᵀ close to X Wᵀ, X being the
float model's inputs at the same positions. With G = X̃ᵀX̃ and D = X̃ᵀ(X - X̃),

    ||X Wᵀ - X̃ Qᵀ||² = ||X̃ (W* - Q)ᵀ||² + const,   W* = W + W Dᵀ G⁻¹,

so the same solver, run on the target W* with the same Hessian, minimises the error to the
float output: it also undoes, where the inputs allow, what the earlier blocks got wrong. When
both streams agree (block 0's first linears), D = 0 and W* = W exactly.
"""

from __future__ import annotations

import torch


def float_target(weight: torch.Tensor, hessian: torch.Tensor, cross: torch.Tensor, percdamp: float) -> torch.Tensor:
    """W* = W + W Dᵀ (H + λI)⁻¹ for `weight` [out, in], with H and D scaled alike and λ the
    solver's damping (`percdamp` of H's mean diagonal), in float64 where the device has it."""
    dtype = torch.float32 if hessian.device.type == "mps" else torch.float64
    h, d, w = hessian.to(dtype), cross.to(dtype), weight.to(dtype)
    lam = percdamp * (torch.diagonal(h).mean().item() or 1.0)
    h = h + lam * torch.eye(h.shape[0], dtype=dtype, device=h.device)
    # (H + λI)⁻¹ D Wᵀ, transposed: H is symmetric
    shift = torch.linalg.solve(h, d @ w.t()).t()
    return (w + shift).to(weight.dtype)
