"""Activation-aware scaling (AWQ), folded into the weights block by block during GPTQ.

Why: a few input channels carry much larger activations than the rest, so the rounding error of
their weight columns costs most output error. Scaling those columns up by s (W diag(s)) and the
inputs down by the same factor (folded into whatever writes the input: a norm's weight, or the
rows of the previous linear) leaves the float model's function unchanged while the grid's
relative step on those columns shrinks.

Each group of linears that reads one input gets one scale vector s = stat^alpha, stat being each
input channel's RMS over the calibration tokens (sqrt(diag(H) / 2), so the Hessian GPTQ already
accumulates is all it needs), normalised so that max(s) * min(s) = 1. alpha is searched on a grid
from 0 (no scaling) up, minimising the group's Hessian-weighted output error after round-to-nearest
in each linear's planned format. Because alpha = 0 is on the grid, the search never picks a scaling
that the proxy finds worse than none.

The folds (pre-norm RMSNorm blocks, the layout `ROTATABLE` names):

- q/k/v read `input_layernorm`: its weight is divided by s;
- o_proj reads the attention's values: v_proj's rows (and bias) are divided by s. Under grouped-
  query attention one v row feeds every query head of its group, so s is shared across them
  (the geometric mean of their statistics);
- gate/up read `post_attention_layernorm`;
- down_proj reads act(gate) * up, linear in up: up_proj's rows (and bias) are divided by s.

Dividing a row by a constant is absorbed exactly by a grouped grid's per-row scales, so a fold
into a linear that is itself quantized costs it nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from lowbit.errors import UnsupportedArchitectureError
from lowbit.formats import Format
from lowbit.solvers.gptq import hessian_weighted_error
from lowbit.transforms.rotation import ROTATABLE

ALPHA_GRID = 20  # alpha in {0, 1/20, ..., 19/20}, as AWQ searches


class ScalingError(UnsupportedArchitectureError):
    """The model's layout has no place to fold the scales into."""


@dataclass(frozen=True)
class Fold:
    """One group of linears that read one input (names relative to a block), and what writes it."""

    readers: tuple[str, ...]
    source: str  # a norm, or a linear whose rows produce the input
    source_is_norm: bool
    kv_groups: int = 1  # for o_proj under grouped-query attention: query heads per value head
    head_dim: int = 0  # with kv_groups: the width of one head


def folds(config) -> list[Fold]:
    """The four folds of a pre-norm llama-layout block."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return [
        Fold(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "input_layernorm", True),
        Fold(("self_attn.o_proj",), "self_attn.v_proj", False, heads // kv_heads, head_dim),
        Fold(("mlp.gate_proj", "mlp.up_proj"), "post_attention_layernorm", True),
        Fold(("mlp.down_proj",), "mlp.up_proj", False),
    ]


def check_scalable(model: nn.Module) -> None:
    """Refuse, before any work, a model whose norms and layout the scales cannot be folded into."""
    model_type = getattr(model.config, "model_type", None)
    if model_type not in ROTATABLE:
        raise ScalingError(
            f"activation-aware scaling (--awq) supports {', '.join(ROTATABLE)}; the {model_type!r} adapter's "
            "layout has no fold for it yet (LayerNorm, or Gemma-style norms); quantize it without --awq"
        )
    heads = model.config.num_attention_heads
    kv_heads = getattr(model.config, "num_key_value_heads", None) or heads
    if heads % kv_heads:
        raise ScalingError(f"{heads} attention heads do not divide into {kv_heads} value heads; drop --awq")


def channel_rms(hessian: torch.Tensor) -> torch.Tensor:
    """Each input channel's root mean square over the calibration tokens (H = 2 X^T X / n)."""
    return (torch.diagonal(hessian).float().cpu().double() / 2).clamp_min(0).sqrt()  # on the CPU: MPS has no float64


def tie_heads(stat: torch.Tensor, kv_groups: int, head_dim: int) -> torch.Tensor:
    """One value per (value head, dimension), shared by the query heads of its group: their
    geometric mean, repeated back to o_proj's input layout [heads * head_dim]."""
    if kv_groups == 1:
        return stat
    s = stat.clamp_min(1e-12).log().reshape(-1, kv_groups, head_dim).mean(1, keepdim=True).exp()
    return s.expand(-1, kv_groups, -1).reshape(-1)


def search_scale(
    weights: list[torch.Tensor],
    formats: list[Format],
    hessian: torch.Tensor,
    stat: torch.Tensor,
    grid: int = ALPHA_GRID,
) -> tuple[torch.Tensor, float, float, float]:
    """The scale s (float64 on the CPU, [in]) for linears that share `hessian`, with its alpha and the summed
    Hessian-weighted round-to-nearest error at alpha = 0 and at the chosen alpha."""
    h = hessian.float()  # float32 products: the errors compared differ far above its rounding
    ws = [w.float() for w in weights]
    stat = stat.clamp_min(stat[stat > 0].min() if (stat > 0).any() else 1.0)  # dead channels: the smallest live

    def error(s64: torch.Tensor) -> float:
        s = s64.float().to(h.device)
        total = 0.0
        for w, fmt in zip(ws, formats, strict=True):
            deq = fmt.quantize_tensor(w * s).dequantize().float() / s
            total += hessian_weighted_error(w - deq, h)
        return total

    ones = torch.ones_like(stat)
    base = error(ones)
    best = (ones, 0.0, base)
    for k in range(1, grid):
        alpha = k / grid
        s = stat**alpha
        s = s / (s.max() * s.min()).sqrt()
        err = error(s)
        if err < best[2]:
            best = (s, alpha, err)
    return best[0], best[1], base, best[2]


@torch.no_grad()
def apply_fold(block: nn.Module, fold: Fold, s: torch.Tensor, round_to: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Readers' columns times s, the source's weight (norm) or rows (linear) divided by s; the
    source's new float values go through `round_to` (the artifact's storage dtype)."""
    source = block.get_submodule(fold.source)
    s = s.float().to(source.weight.device)  # float32 products (MPS has no float64): exact to ~1e-7
    if fold.source_is_norm:
        source.weight.data = round_to(source.weight.float() / s).to(source.weight.dtype)
    else:
        rows = s if fold.kv_groups == 1 else s.reshape(-1, fold.kv_groups, fold.head_dim)[:, 0, :].reshape(-1)
        source.weight.data = round_to(source.weight.float() / rows[:, None]).to(source.weight.dtype)
        if source.bias is not None:
            source.bias.data = round_to(source.bias.float() / rows).to(source.bias.dtype)
    for name in fold.readers:
        linear = block.get_submodule(name)
        linear.weight.data = (linear.weight.float() * s).to(linear.weight.dtype)
