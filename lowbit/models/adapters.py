"""Architecture adapters: where the decoder blocks are and which linears each has.

Linears are listed in execution order, grouped by shared input (q/k/v read the
same normalised hidden state), which is what block-by-block calibration needs.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from transformers.pytorch_utils import Conv1D

from lowbit.errors import UnsupportedArchitectureError


@dataclass(frozen=True)
class ArchAdapter:
    blocks: str  # dotted path to the ModuleList of decoder blocks
    linear_groups: tuple[tuple[str, ...], ...]  # per block, execution order, shared inputs

    @property
    def linears(self) -> tuple[str, ...]:
        return tuple(name for group in self.linear_groups for name in group)


_LLAMA_LIKE = ArchAdapter(
    blocks="model.layers",
    linear_groups=(
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.o_proj",),
        ("mlp.gate_proj", "mlp.up_proj"),
        ("mlp.down_proj",),
    ),
)

ADAPTERS: dict[str, ArchAdapter] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "gemma3_text": _LLAMA_LIKE,
    "phi3": ArchAdapter(
        blocks="model.layers",
        linear_groups=(
            ("self_attn.qkv_proj",),
            ("self_attn.o_proj",),
            ("mlp.gate_up_proj",),
            ("mlp.down_proj",),
        ),
    ),
    "opt": ArchAdapter(
        blocks="model.decoder.layers",
        linear_groups=(
            ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
            ("self_attn.out_proj",),
            ("fc1",),
            ("fc2",),
        ),
    ),
    "gpt2": ArchAdapter(
        blocks="transformer.h",
        linear_groups=(("attn.c_attn",), ("attn.c_proj",), ("mlp.c_fc",), ("mlp.c_proj",)),
    ),
}


def supported_architectures() -> list[str]:
    return sorted(ADAPTERS)


def get_adapter(model_type: str) -> ArchAdapter:
    if model_type not in ADAPTERS:
        raise UnsupportedArchitectureError(
            f"architecture {model_type!r} is not supported; supported: "
            f"{', '.join(supported_architectures())} (open an issue to add it)"
        )
    return ADAPTERS[model_type]


def decoder_blocks(model: nn.Module, adapter: ArchAdapter) -> nn.ModuleList:
    return model.get_submodule(adapter.blocks)


def linear_weight(module: nn.Module):
    """The weight as [out, in], whichever layout the module stores."""
    if isinstance(module, Conv1D):  # GPT-2 stores [in, out]
        return module.weight.t()
    return module.weight


def quantizable_linears(model: nn.Module, adapter: ArchAdapter) -> list[tuple[str, nn.Module]]:
    """(full name, module) of every linear the adapter names, block by block."""
    out = []
    for i, block in enumerate(decoder_blocks(model, adapter)):
        for name in adapter.linears:
            out.append((f"{adapter.blocks}.{i}.{name}", block.get_submodule(name)))
    return out
