"""Reading quantized layers as values, from a model in memory and from its artifact."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import make_tiny_model

import lowbit
from lowbit.errors import BudgetError
from lowbit.formats import IntFormat
from lowbit.recipe import GPTQSettings
from lowbit.runtime import QuantizedEmbedding

WINDOWS = torch.randint(2, 256, (8, 64), generator=torch.Generator().manual_seed(0))


def _rtn_llama():
    model = make_tiny_model("llama")
    return lowbit.quantize(model, bits=3, group_size=48, symmetric=True, method="rtn", progress=False)


def _gpt2_with_packed_tables():
    """A size budget at its smallest: the tied embedding/head is packed too."""
    kw = {"calib": WINDOWS, "gptq": GPTQSettings(batch_size=4), "progress": False}
    kw["candidates"] = [IntFormat(2, 32), IntFormat(4, 32)]
    with pytest.raises(BudgetError) as err:
        lowbit.quantize(make_tiny_model("gpt2"), size_bytes=1000, **kw)
    smallest = int(float(re.search(r"--size ([0-9.]+)MB", str(err.value)).group(1)) * 1e6)
    return lowbit.quantize(make_tiny_model("gpt2"), size_bytes=smallest, **kw)


@pytest.mark.parametrize("make", [_rtn_llama, _gpt2_with_packed_tables], ids=["llama-rtn-sym", "gpt2-tables"])
def test_layers_read_the_same_from_memory_and_from_the_artifact(tmp_path, make):
    model = make()
    lowbit.save(model, tmp_path / "art")
    in_memory = lowbit.quantized_layers(model)
    on_disk = lowbit.quantized_layers(tmp_path / "art")
    assert [x.name for x in in_memory] == [x.name for x in on_disk] == list(model.lowbit_info.layers)
    for a, b in zip(in_memory, on_disk, strict=True):
        assert (a.kind, a.format, a.shape, a.tied_head) == (b.kind, b.format, b.shape, b.tied_head)
        assert torch.equal(a.codes, b.codes) and torch.equal(a.scales, b.scales)
        assert (a.zeros is None) == (b.zeros is None) == a.format.symmetric
        if a.zeros is not None:
            assert torch.equal(a.zeros, b.zeros)
        assert (a.bias is None) == (b.bias is None)
        if a.bias is not None:
            assert torch.equal(a.bias, b.bias)
        assert a.codes.dtype == torch.uint8 and int(a.codes.max()) < 2**a.format.bits
        assert a.codes.shape == a.shape and a.scales.shape == (a.shape[0], a.format.num_groups(a.shape[1]))
        module = model.get_submodule(a.name)
        if isinstance(module, QuantizedEmbedding):
            rows = torch.arange(a.shape[0])
            assert torch.equal(a.dequantize(), module(rows))
        else:
            assert torch.equal(a.dequantize(), module.dequantized_weight())


def test_a_tied_head_is_named_by_its_embedding_and_not_listed_twice():
    layers = {x.name: x for x in lowbit.quantized_layers(_gpt2_with_packed_tables())}
    assert layers["transformer.wte"].kind == "embedding" and layers["transformer.wte"].tied_head == "lm_head"
    assert "lm_head" not in layers
    assert {x.kind for x in layers.values()} == {"embedding", "linear"}
