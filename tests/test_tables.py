"""Embedding and head as size-budget candidates: packed tables, shared buffers when tied,
row-weighted errors, and artifacts that reload to the same logits."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from conftest import make_tiny_model

import lowbit
from lowbit.errors import BudgetError
from lowbit.formats import IntFormat
from lowbit.recipe import GPTQSettings
from lowbit.runtime import QuantizedEmbedding, QuantizedLinear
from lowbit.tables import find_tables, table_errors

WINDOWS = torch.randint(2, 256, (8, 64), generator=torch.Generator().manual_seed(0))
CANDIDATES = [IntFormat(b, 32) for b in (2, 3, 4, 8)]
KW = {"calib": WINDOWS, "gptq": GPTQSettings(batch_size=4), "candidates": CANDIDATES, "progress": False}


def test_quantized_embedding_looks_up_the_dequantized_rows_and_a_tied_head_shares_them():
    w = torch.randn(300, 96)
    qt = IntFormat(4, 32).quantize_tensor(w)
    emb = QuantizedEmbedding.from_quantized(qt)
    ids = torch.randint(0, 300, (3, 7))
    assert torch.equal(emb(ids), qt.dequantize()[ids])
    head = emb.tied_head()
    x = torch.randn(2, 96)
    torch.testing.assert_close(head(x), x @ qt.dequantize().T)
    assert head.qweight is emb.qweight and head.scales is emb.scales


def test_tables_are_found_tied_or_not_and_never_split_from_a_scaled_embedding():
    (tied,) = find_tables(make_tiny_model("gpt2"))
    assert tied.kind == "embedding" and tied.tied_head == "lm_head"
    assert [t.kind for t in find_tables(make_tiny_model("llama"))] == ["embedding", "head"]
    assert find_tables(make_tiny_model("gemma")) == []  # tied to Gemma's scaled embedding: both stay


def test_table_errors_fall_with_more_bits_and_weigh_rows_by_token_use():
    model = make_tiny_model("llama")
    (emb, _) = find_tables(model)
    errs = table_errors(model, emb, CANDIDATES, WINDOWS)
    assert errs == sorted(errs, reverse=True) and errs[-1] < 1e-3 < errs[0] < 1
    # rows the windows never use barely count: spoiling them moves the error little
    unused = torch.ones(256, dtype=torch.bool)
    unused[WINDOWS.unique()] = False
    assert unused.sum() > 0
    spoiled = copy.deepcopy(model)
    spoiled.model.embed_tokens.weight.data[unused] *= 50
    again = table_errors(spoiled, emb, CANDIDATES, WINDOWS)
    used = copy.deepcopy(model)
    used.model.embed_tokens.weight.data[WINDOWS[0, 0]] *= 50
    assert abs(again[1] - errs[1]) < abs(table_errors(used, emb, CANDIDATES, WINDOWS)[1] - errs[1])


def smallest_size(model, **kw) -> int:
    """The size the refusal names as the smallest that works."""
    with pytest.raises(BudgetError, match=r"use --size ([0-9.]+)MB") as err:
        lowbit.quantize(copy.deepcopy(model), size_bytes=1000, **kw, **KW)
    return int(float(re.search(r"--size ([0-9.]+)MB", str(err.value)).group(1)) * 1e6)


@pytest.mark.parametrize(("arch", "keep"), [("gpt2", "lm_head"), ("llama", "lm_head,model.embed_tokens")])
def test_a_size_below_the_float_tables_packs_them_and_the_artifact_reloads(tmp_path, arch, keep):
    model = make_tiny_model(arch)
    with_float_tables = smallest_size(model, keep=keep)
    size = with_float_tables - 12_000  # sizes are named rounded up to 10 kB: this only fits with packed tables
    assert smallest_size(model) <= size
    with pytest.raises(BudgetError):
        lowbit.quantize(copy.deepcopy(model), size_bytes=size, keep=keep, **KW)
    q = lowbit.quantize(copy.deepcopy(model), size_bytes=size, **KW)
    tables = q.lowbit_info.settings["budget"]["tables"]
    assert tables and all(f is not None for f in tables.values())
    assert isinstance(q.get_input_embeddings(), QuantizedEmbedding)
    assert isinstance(q.get_output_embeddings(), QuantizedLinear)
    if arch == "gpt2":  # tied: one set of packed tensors serves both
        assert q.get_output_embeddings().qweight is q.get_input_embeddings().qweight
    lowbit.save(q, tmp_path / "art")
    assert (tmp_path / "art" / "model.safetensors").stat().st_size <= size
    again = lowbit.load(tmp_path / "art")
    probe = WINDOWS[:2]
    with torch.no_grad():
        torch.testing.assert_close(again(probe).logits, q(probe).logits, rtol=0, atol=0)
        ref = model(probe).logits
        assert (again(probe).logits - ref).pow(2).mean() < ref.pow(2).mean()  # still a model of the same text
    if arch == "gpt2":
        assert again.lm_head.qweight is again.transformer.wte.qweight


def test_keeping_the_head_in_float_keeps_a_tied_embedding_too():
    model = make_tiny_model("gpt2")
    assert smallest_size(model, keep="lm_head") == smallest_size(model, keep="transformer.wte") > smallest_size(model)
