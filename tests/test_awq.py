"""Activation-aware scaling: exact folds, a search that never picks worse than no scaling, scales
that survive resume and the artifact, refusals in one line."""

from __future__ import annotations

import copy
import json
import sys

import pytest
import torch
from conftest import kl_judge, make_tiny_model
from safetensors.torch import load_file
from torch import nn

import lowbit
from lowbit.cli import main
from lowbit.formats import IntFormat
from lowbit.recipe import GPTQSettings
from lowbit.transforms.awq import ScalingError, apply_fold, folds, search_scale, tie_heads

WINDOWS = torch.randint(2, 256, (8, 64), generator=torch.Generator().manual_seed(0))
PROBE = torch.randint(2, 256, (2, 32), generator=torch.Generator().manual_seed(1))
AWQ = GPTQSettings(batch_size=4, awq=True)


def _with_loud_channels(model: nn.Module) -> nn.Module:
    """A few input channels much larger than the rest, as trained models have (random init has none)."""
    with torch.no_grad():
        for block in model.model.layers:
            block.input_layernorm.weight[:4] = 8.0
            block.post_attention_layernorm.weight[:3] = 6.0
    return model


def _quantize(model, **kw):
    kw = {"bits": 3, "group_size": 32, "calib": WINDOWS, "progress": False, "gptq": AWQ, **kw}
    return lowbit.quantize(model, **kw)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])
def test_every_fold_keeps_the_logits(arch):
    """Random positive scales on all four folds of every block (o_proj's shared across the query
    heads of each grouped value head): the float model computes the same function."""
    model = make_tiny_model(arch)
    assert model.config.num_key_value_heads < model.config.num_attention_heads  # grouped-query attention
    with torch.no_grad():
        before = model(PROBE).logits
        gen = torch.Generator().manual_seed(2)
        for block in model.model.layers:
            for fold in folds(model.config):
                width = block.get_submodule(fold.readers[0]).in_features
                s = torch.rand(width, generator=gen, dtype=torch.float64) * 3 + 0.2
                s = tie_heads(s, fold.kv_groups, fold.head_dim)
                apply_fold(block, fold, s, lambda t: t)
        after = model(PROBE).logits
    assert (after - before).abs().max() <= 1e-4 * before.abs().max()
    fresh = make_tiny_model(arch).model.layers[0].self_attn.q_proj.weight
    assert not torch.allclose(model.model.layers[0].self_attn.q_proj.weight, fresh)


def test_the_search_never_picks_a_scale_worse_than_none_and_finds_loud_channels():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 64, generator=gen)
    x[:, :4] *= 20  # four loud channels
    h = 2 * x.T @ x / x.shape[0]
    w = torch.randn(48, 64, generator=gen) * 0.05
    fmt = IntFormat(3, 32)
    stat = (torch.diagonal(h).double() / 2).sqrt()
    s, alpha, base, err = search_scale([w], [fmt], h, stat)
    assert alpha > 0 and err < 0.8 * base
    assert s[:4].min() > s[4:].max()  # the loud channels are scaled up
    # with all channels alike there is nothing to gain: the search may keep s = 1, never worsen
    flat = torch.ones(64, dtype=torch.float64)
    s, alpha, base, err = search_scale([w], [fmt], 2 * torch.eye(64), flat)
    assert err <= base and torch.allclose(s, torch.ones_like(s))


def test_awq_lowers_the_kl_of_gptq_on_loud_channels_and_records_its_scales():
    base = _with_loud_channels(make_tiny_model("llama"))
    kld = kl_judge(base, PROBE)
    plain = _quantize(copy.deepcopy(base), gptq=GPTQSettings(batch_size=4))
    scaled = _quantize(copy.deepcopy(base))
    assert kld(scaled) < kld(plain)
    rec = scaled.lowbit_info.layers["model.layers.0.self_attn.q_proj"]["awq"]
    assert rec["source"] == "input_layernorm" and rec["alpha"] > 0 and rec["rtn_error_ratio"] < 1
    assert scaled.lowbit_info.settings["gptq"]["awq"] is True
    # the scale went into the norm: block 0's input norm is no longer what it was
    assert not torch.equal(scaled.model.layers[0].input_layernorm.weight, base.model.layers[0].input_layernorm.weight)


def test_a_scaled_artifact_loads_with_the_same_logits(tmp_path):
    model = _quantize(_with_loud_channels(make_tiny_model("qwen2")))
    with torch.no_grad():
        expected = model(PROBE).logits
    loaded = lowbit.load(lowbit.save(model, tmp_path / "art"))
    with torch.no_grad():
        torch.testing.assert_close(loaded(PROBE).logits, expected)


def test_a_scaled_run_interrupted_resumes_to_the_same_weights(tmp_path):
    """The norms the scales were folded into are part of the resume state."""

    class Crash(Exception):
        pass

    def crash_after_0(i: int) -> None:
        if i == 0:
            raise Crash

    base = _with_loud_channels(make_tiny_model("llama", layers=3))
    full = _quantize(copy.deepcopy(base))
    with pytest.raises(Crash):
        _quantize(copy.deepcopy(base), checkpoint_dir=tmp_path, on_block_done=crash_after_0)
    state = json.loads((tmp_path / "execute" / "state.json").read_text())
    assert "input_layernorm.weight" in state["client"]["scaled"]["model.layers.0."]
    resumed = _quantize(copy.deepcopy(base), checkpoint_dir=tmp_path, resume=True)
    assert resumed.lowbit_info.stats["pipeline"]["resumed_blocks"] == 1
    a, b = full.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_layout_the_folds_do_not_fit_is_named_by_block():
    """A LayerNorm with a bias in block 1's input: dividing its weight alone changes the block."""
    model = _with_loud_channels(make_tiny_model("llama"))
    norm = nn.LayerNorm(model.config.hidden_size)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2.0)
        norm.bias.normal_(0, 1.0)
        norm.weight[:4] = 8.0
    model.model.layers[1].input_layernorm = norm
    with pytest.raises(ScalingError, match="block 1 by") as e:
        _quantize(model)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("arch", ["gpt2", "gemma", "phi3"])
def test_awq_on_an_architecture_without_folds_is_refused_before_work(arch, monkeypatch):
    monkeypatch.setattr(sys.modules["lowbit.quantize"], "check_finite", lambda *a, **k: pytest.fail("work started"))
    with pytest.raises(ScalingError, match=f"the '{arch}' adapter") as e:
        _quantize(make_tiny_model(arch))
    assert "\n" not in str(e.value)


def test_the_cli_refuses_awq_with_round_to_nearest(capsys, tiny_model_dir, tmp_path):
    out = tmp_path / "o"
    assert main(["quantize", str(tiny_model_dir), "--bits", "4", "--method", "rtn", "--awq", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "--awq" in err and "rtn" in err and not out.exists()


def test_a_float_source_changed_by_a_fold_reaches_the_artifact_from_a_spilled_lazy_run(tmp_path, tiny_tokenizer):
    """up_proj kept in float takes down_proj's scales into its rows: a lazy run that spills its
    finished blocks must write those rows (not the checkpoint's), byte for byte as a whole run."""
    folder = tmp_path / "src"
    _with_loud_channels(make_tiny_model("llama", layers=3)).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    files = []
    for lazy, spill in ((False, None), (True, tmp_path / "spill")):
        model = lowbit.load_model(folder, lazy=lazy).model
        q = _quantize(model, keep="*.mlp.up_proj", spill_dir=spill)
        assert q.lowbit_info.layers["model.layers.1.mlp.down_proj"]["awq"]["alpha"] > 0
        files.append((lowbit.save(q, tmp_path / f"art-{lazy}") / "model.safetensors").read_bytes())
    assert files[0] == files[1]
    original = load_file(folder / "model.safetensors")["model.layers.1.mlp.up_proj.weight"].half()
    saved = load_file(tmp_path / "art-True" / "model.safetensors")["model.layers.1.mlp.up_proj.weight"]
    assert not torch.equal(saved, original)
