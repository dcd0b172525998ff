"""Embedding and head as size-budget candidates: packed tables, shared buffers when tied,
errors scored by KL, and artifacts that reload to the same logits."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from conftest import make_tiny_model

import lowbit
from lowbit.allocate.kl_probe import probe_tables, probe_windows
from lowbit.errors import BudgetError
from lowbit.eval.metrics import evaluate_windows
from lowbit.eval.reference import build_reference
from lowbit.formats import IntFormat
from lowbit.models.adapters import get_adapter, quantizable_linears
from lowbit.recipe import GPTQSettings
from lowbit.runtime import QuantizedEmbedding, QuantizedLinear
from lowbit.tables import find_tables, quantize_weight

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


def test_the_table_probe_scores_each_table_by_the_kl_its_rounding_causes_and_restores_the_model():
    model = make_tiny_model("llama")
    tables = find_tables(model)
    linears = [n for n, _ in quantizable_linears(model, get_adapter("llama"))]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    probe = probe_tables(model, linears, tables, CANDIDATES, WINDOWS, progress=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # more bits, less error and less KL, for the linears together and for each table
    assert probe.linear_error == sorted(probe.linear_error, reverse=True)
    assert probe.linear_kl == sorted(probe.linear_kl, reverse=True) and probe.linear_kl[-1] < 1e-3
    assert all(k > 0 for k in probe.kappa)
    for t in tables:
        kl = probe.table_kl[t.name]
        assert kl == sorted(kl, reverse=True) and kl[-1] < 1e-3 < kl[0]
    # the head's score is the KL of the model with only the head rounded, measured here on its own
    head = next(t for t in tables if t.kind == "head")
    rounded = copy.deepcopy(model)
    w = rounded.lm_head.weight
    w.data = quantize_weight(w.detach(), CANDIDATES[1]).dequantize()
    windows = probe_windows(WINDOWS)
    ref = build_reference(model, windows, progress=False)
    alone = evaluate_windows(rounded, windows, ref, progress=False)["kld"]
    assert probe.table_kl[head.name][1] == pytest.approx(alone, rel=1e-4)
    assert probe.table_errors(head.name)[1] == pytest.approx(alone / probe.scale)


def test_the_table_probe_reads_a_lazy_model_one_block_at_a_time_and_agrees_with_the_whole_one(
    tmp_path, tiny_tokenizer, monkeypatch
):
    """Tables sit at both ends of the model, yet the probe walks the blocks once: a rounded
    embedding is a stream of its own from block 0, a rounded head scores the float stream."""
    from lowbit import walker

    path = tmp_path / "sharded"
    make_tiny_model("llama", layers=3).save_pretrained(path, max_shard_size="40KB")
    tiny_tokenizer.save_pretrained(path)
    eager = lowbit.load_model(path, lazy=False).model
    tables = find_tables(eager)
    assert sorted(t.kind for t in tables) == ["embedding", "head"]
    linears = [n for n, _ in quantizable_linears(eager, get_adapter("llama"))]
    whole = probe_tables(eager, linears, tables, CANDIDATES, WINDOWS, progress=False)

    lazy = lowbit.load_model(path, lazy=True).model
    held = []
    run = walker.Block.run
    monkeypatch.setattr(
        walker.Block, "run", lambda self, *a, **k: held.append(_loaded_blocks(lazy)) or run(self, *a, **k)
    )
    by_blocks = probe_tables(lazy, linears, tables, CANDIDATES, WINDOWS, progress=False)
    assert held and max(held) == 1
    assert by_blocks.linear_kl == pytest.approx(whole.linear_kl, rel=1e-4)
    assert by_blocks.linear_error == pytest.approx(whole.linear_error, rel=1e-4)
    for t in tables:
        assert by_blocks.table_kl[t.name] == pytest.approx(whole.table_kl[t.name], rel=1e-4), t.name
    assert _loaded_blocks(lazy) == 0  # every block released again


def _loaded_blocks(model) -> int:
    return sum(not next(b.parameters()).is_meta for b in model.model.layers)


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
    budget = q.lowbit_info.settings["budget"]
    tables = budget["tables"]
    assert tables and all(f is not None for f in tables.values())
    # the summed prediction counts the packed tables' probed KL (kl weighting: KL itself)
    table_kl = budget["table_probe"]["table_kl"]
    assert budget["weighting"] == "kl"
    expected = sum(table_kl[n][budget["candidates"].index(f)] for n, f in tables.items())
    assert expected > 0 and budget["predicted_error_tables"] == pytest.approx(expected)
    assert budget["predicted_error"] > budget["predicted_error_tables"]
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
