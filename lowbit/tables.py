"""The token embedding and the output head as quantizable tables, for size budgets.

Under `--size` the whole weights file counts, and in small models the embedding is a large
share of it (smollm2-135m: 28M of 135M weights, tied to the head). These tables are not in
any decoder block, so GPTQ's block pipeline does not reach them: each is rounded (RTN with a
per-group range search). Their candidates are scored by the KL divergence that rounding
causes (allocate/kl_probe.py): scored by the lookup's weight error alone, a tied table looked
as cheap to round as one more linear, when as the output head it is the dearest tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lowbit.formats import Format
from lowbit.modules import set_module
from lowbit.records import layer_record
from lowbit.runtime import QuantizedEmbedding, QuantizedLinear

CLIP_GRID = 20  # range-search steps per group; the tables are big, and 20 is within noise of 40


@dataclass(frozen=True)
class Table:
    name: str  # the module holding the weight
    kind: str  # "embedding" or "head"
    shape: tuple[int, int]  # [rows (tokens), columns (hidden)]
    tied_head: str | None = None  # a head module that shares this embedding's weight


def find_tables(model: nn.Module) -> list[Table]:
    """The input embedding (plain nn.Embedding only: subclasses may scale or reshape their
    output) and an output head that is a plain nn.Linear, noting whether they share a weight."""
    names = {id(m): n for n, m in model.named_modules()}
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    plain_emb = type(emb) is nn.Embedding and emb.max_norm is None and id(emb) in names
    plain_head = type(head) is nn.Linear and id(head) in names
    tied = plain_head and emb is not None and head.weight is getattr(emb, "weight", None)
    if tied and not plain_emb:  # a head tied to, say, Gemma's scaled embedding stays with it in float
        return []
    tables = []
    if plain_emb:
        tables.append(Table(names[id(emb)], "embedding", tuple(emb.weight.shape), names[id(head)] if tied else None))
    if plain_head and not tied:
        tables.append(Table(names[id(head)], "head", tuple(head.weight.shape)))
    return tables


def quantize_weight(weight: torch.Tensor, fmt: Format):
    return fmt.quantize_tensor(weight.detach().float(), clip_search=True, grid=CLIP_GRID)


def quantize_table(model: nn.Module, table: Table, fmt: Format) -> dict:
    """Swap the table (and a head tied to it) for packed modules; returns its layer record."""
    module = model.get_submodule(table.name)
    qt = quantize_weight(module.weight, fmt)
    diff = qt.dequantize() - module.weight.detach().float()
    rel = float(diff.pow(2).sum() / module.weight.detach().float().pow(2).sum().clamp_min(1e-30))
    if table.kind == "embedding":
        new: nn.Module = QuantizedEmbedding.from_quantized(qt, module.padding_idx)
    else:
        new = QuantizedLinear.from_quantized(qt, module.bias)
    set_module(model, table.name, new)
    if table.tied_head is not None:
        set_module(model, table.tied_head, new.tied_head())
    head = {"kind": table.kind, "tied_head": table.tied_head, "padding_idx": getattr(module, "padding_idx", None)}
    return {**head, **layer_record(fmt, table.shape, weight_rel_mse=rel)}
