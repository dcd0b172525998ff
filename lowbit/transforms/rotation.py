"""Rotations folded into the weights: the residual stream (QuaRot / SpinQuant's R1) and each
attention head's values (SpinQuant's R2).

Why: a weight row with a few large entries wastes a low-bit grid on them. Multiplying the
residual stream by an orthogonal Q spreads every row's energy evenly over its inputs, and the
model computes exactly the same function when every linear that reads the stream takes W Q,
every linear that writes it takes Q^T W, the embedding E Q and the head W diag(g) Q. This holds
because RMSNorm commutes with an orthogonal map once its weight g has been moved into the
linears that read it (RMSNorm(x Q) = RMSNorm(x) Q when g = 1). The architecture is unchanged,
so a rotated model is an ordinary checkpoint: every lowbit path and every exporter takes it.

Costs: a head tied to the embedding cannot stay tied (the head absorbs the final norm, the
embedding does not), so the rotated model carries a second table. LayerNorm models (mean
subtraction), Gemma's norms around each sublayer's output and Gemma's (1 + w) norms are refused.

Q is a randomized Hadamard for widths that are powers of two, and for d = m * 2^k the Kronecker
product of a random m x m orthogonal matrix with a Hadamard of 2^k (576 = 9 x 64), with random
signs on the inputs: deterministic for a seed, orthogonal to float64 precision. R2 turns each
head's value vectors by one head_dim x head_dim matrix, undone in o_proj's inputs: no table and no
norm is involved, so it needs no untying.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lowbit.errors import UnsupportedArchitectureError
from lowbit.models.adapters import decoder_blocks, get_adapter
from lowbit.orthogonal import orthogonal

# Model types whose blocks are pre-norm RMSNorm -> (q, k, v) -> o and RMSNorm -> (gate, up) -> down.
ROTATABLE = ("llama", "mistral", "qwen2", "qwen3")
TOLERANCE = 1e-4  # largest |hidden state difference| / max |hidden state| accepted per block


class RotationError(UnsupportedArchitectureError):
    """The model cannot be rotated, or rotating it changed what it computes."""


@dataclass(frozen=True)
class Rotation:
    """What was done to a model, recorded beside the rotated checkpoint."""

    residual: bool  # the residual stream (R1)
    heads: bool  # each attention head's values and o_proj's inputs (R2)
    seed: int
    width: int
    untied_head: bool
    max_block_error: float  # the largest per-block relative difference the check measured

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def check_rotatable(model: nn.Module) -> None:
    """Refuse, before any work, a model whose norms or layout the rotation cannot fold."""
    model_type = getattr(model.config, "model_type", None)
    get_adapter(model_type)  # unsupported architectures get the adapter's own error
    if model_type not in ROTATABLE:
        raise RotationError(
            f"the residual rotation supports {', '.join(ROTATABLE)}; the {model_type!r} adapter's norms "
            "cannot be folded into its linears (LayerNorm, or Gemma-style (1 + w) and post-sublayer norms); "
            "quantize it without rotation"
        )
    if any(p.is_meta for p in model.parameters()):
        raise RotationError("the model's weights are not loaded (a lazy model); load it whole to rotate it")
    for i, block in enumerate(_blocks(model)):
        for norm in ("input_layernorm", "post_attention_layernorm"):
            if not hasattr(block, norm):
                raise RotationError(f"block {i} has no {norm}; this {model_type} variant cannot be rotated")


def rotate(
    model: nn.Module, seed: int = 0, residual: bool = True, heads: bool = False, probe_tokens: int = 16
) -> Rotation:
    """Rotate `model` in place; checks block by block that it still computes the same function.

    `residual` rotates the residual stream (R1: every linear of a block, the tables and the head);
    `heads` rotates each attention head's values (R2: v_proj's rows and o_proj's inputs, head by
    head, with one head_dim x head_dim matrix; free of any untying). A short random token sequence
    runs through the model before and after; each block's output, rotated back, must match within
    TOLERANCE of its largest entry, or the first block that does not is named (the weights are then
    left rotated: reload the model)."""
    if not (residual or heads):
        raise RotationError("nothing to rotate: choose the residual stream, the attention heads, or both")
    check_rotatable(model)
    width = model.config.hidden_size
    q = orthogonal(width, seed) if residual else None
    tokens = torch.randint(0, model.config.vocab_size, (1, probe_tokens), generator=torch.Generator().manual_seed(seed))
    before = _hidden_states(model, tokens)

    tied = _tied(model) and residual
    if residual:
        _rotate_residual(model, q, tied)
    if heads:
        head_dim = getattr(model.config, "head_dim", None) or width // model.config.num_attention_heads
        r = orthogonal(head_dim, seed + 1)
        for block in _blocks(model):
            _rotate_values(block.self_attn, r)

    after = _hidden_states(model, tokens)
    worst = 0.0
    for i, (b, a) in enumerate(zip(before, after, strict=True)):
        expected = b if q is None or i == len(before) - 1 else b @ q  # the logits are not rotated
        err = ((a - expected).abs().max() / expected.abs().max().clamp_min(1e-12)).item()
        worst = max(worst, err)
        if not err <= TOLERANCE:
            where = "the embedding" if i == 0 else "the output head" if i == len(before) - 1 else f"block {i - 1}"
            raise RotationError(
                f"rotation changed the output of {where} by {err:.2e} of its largest value "
                f"(tolerance {TOLERANCE:g}); this model's layout is not the {model.config.model_type} one "
                "the rotation folds (an unusual norm or residual); quantize it without rotation"
            )
    return Rotation(residual, heads, seed, width, tied, worst)


def _rotate_residual(model: nn.Module, q: torch.Tensor, tied: bool) -> None:
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    if tied:
        head.weight = nn.Parameter(head.weight.detach().clone())
        model.config.tie_word_embeddings = False
        if hasattr(model.config, "get_text_config"):
            model.config.get_text_config().tie_word_embeddings = False
    _set(embed, (embed.weight.double() @ q).to(embed.weight.dtype))
    for block in _blocks(model):
        attn, mlp = block.self_attn, block.mlp
        _fold_norm_into(block.input_layernorm, [attn.q_proj, attn.k_proj, attn.v_proj], q)
        _write_rotated(attn.o_proj, q)
        _fold_norm_into(block.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj], q)
        _write_rotated(mlp.down_proj, q)
    _fold_norm_into(model.model.norm, [head], q)


@torch.no_grad()
def _rotate_values(attn: nn.Module, r: torch.Tensor) -> None:
    """Every head's values V_h become V_h R (v_proj's rows, and its bias, per head) and o_proj reads
    them through R^T (its input columns per head), so attention's output is unchanged: the
    attention weights mix a head's value vectors, never their coordinates."""
    v, o = attn.v_proj, attn.o_proj
    hd = r.shape[0]
    w = v.weight.double().reshape(-1, hd, v.in_features)
    _set(v, torch.einsum("dk,hdi->hki", r, w).reshape(v.weight.shape).to(v.weight.dtype))
    if v.bias is not None:
        v.bias.data = (v.bias.double().reshape(-1, hd) @ r).reshape(v.bias.shape).to(v.bias.dtype)
    wo = o.weight.double().reshape(o.out_features, -1, hd)
    _set(o, (wo @ r).reshape(o.weight.shape).to(o.weight.dtype))


def _blocks(model: nn.Module) -> nn.ModuleList:
    return decoder_blocks(model, get_adapter(model.config.model_type))


def _tied(model: nn.Module) -> bool:
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    return head is not None and head.weight.data_ptr() == embed.weight.data_ptr()


@torch.no_grad()
def _hidden_states(model: nn.Module, tokens: torch.Tensor) -> list[torch.Tensor]:
    """The embedding's output, every block's output and the logits."""
    taps = [model.get_input_embeddings(), *_blocks(model), model.get_output_embeddings()]
    seen: list[torch.Tensor] = []
    handles = [t.register_forward_hook(lambda m, i, o: seen.append(o[0] if isinstance(o, tuple) else o)) for t in taps]
    try:
        model(input_ids=tokens)
    finally:
        for h in handles:
            h.remove()
    return [s.detach().double().reshape(-1, s.shape[-1]) for s in seen]


def _set(module: nn.Module, weight: torch.Tensor) -> None:
    module.weight.data = weight.contiguous()


@torch.no_grad()
def _fold_norm_into(norm: nn.Module, readers: list[nn.Module], q: torch.Tensor) -> None:
    """Move the norm's scale into the linears that read it, then rotate their inputs."""
    g = norm.weight.detach().double()
    for linear in readers:
        _set(linear, ((linear.weight.double() * g) @ q).to(linear.weight.dtype))
    norm.weight.data = torch.ones_like(norm.weight)


@torch.no_grad()
def _write_rotated(linear: nn.Module, q: torch.Tensor) -> None:
    """A linear that adds into the stream: its outputs (rows) and bias rotate with it."""
    _set(linear, (q.T @ linear.weight.double()).to(linear.weight.dtype))
    if linear.bias is not None:
        linear.bias.data = (linear.bias.double() @ q).to(linear.bias.dtype)


ROTATION_FILE = "lowbit_rotation.json"


def write_rotated(
    spec: str,
    out: str | os.PathLike,
    seed: int = 0,
    residual: bool = True,
    heads: bool = False,
    overwrite: bool = False,
    trust_remote_code: bool = False,
) -> Rotation:
    """Load `spec` whole in float32, rotate it and write a Hugging Face checkpoint folder (safetensors,
    config, tokenizer, and ROTATION_FILE saying what was done), renamed into place when complete."""
    from lowbit.artifact import check_output_dir, staged_dir
    from lowbit.models.loading import load_model

    out = check_output_dir(out, overwrite)
    if not (residual or heads):
        raise RotationError("nothing to rotate: drop --no-residual or add --heads")
    loaded = load_model(spec, torch.float32, trust_remote_code=trust_remote_code)
    check_rotation_source(loaded, spec)
    rotation = rotate(loaded.model, seed, residual=residual, heads=heads)
    _forget_source_quantization(loaded.model)
    with staged_dir(Path(out)) as tmp:
        loaded.model.save_pretrained(tmp)
        loaded.tokenizer.save_pretrained(tmp)
        record = {**rotation.to_dict(), "source": loaded.source.identity}
        (tmp / ROTATION_FILE).write_text(json.dumps(record, indent=1) + "\n")
    return rotation


def check_rotation_source(loaded, spec: str | os.PathLike) -> None:
    """Refuse a loaded model (models.loading.LoadedModel) the rotation cannot start from."""
    if loaded.source.kind == "artifact":
        raise RotationError(f"{spec} is a quantized lowbit artifact; rotate the float model it was made from")
    check_rotatable(loaded.model)


def _forget_source_quantization(model: nn.Module) -> None:
    """A GGUF source loads dequantized but keeps transformers' note that it was quantized, which
    refuses to save; the rotated weights are plain floats, so the note goes."""
    model.hf_quantizer = None
    if hasattr(model, "is_quantized"):
        model.is_quantized = False
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
