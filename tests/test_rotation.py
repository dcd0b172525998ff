"""The residual rotation: same function, norms folded, tied heads untied, refusals in one line."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny_model
from safetensors.torch import load_file
from torch import nn

from lowbit.cli import main
from lowbit.models import load_model
from lowbit.transforms.rotation import ROTATION_FILE, RotationError, orthogonal, rotate

ROTATABLE = ["llama", "mistral", "qwen2", "qwen3"]


def _with_uneven_norms(model: nn.Module, seed: int = 1) -> nn.Module:
    """Random init leaves every norm at 1, which would hide a fold that forgets the norm."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.4 * torch.randn(p.shape, generator=gen))
    return model


@pytest.mark.parametrize("width", [64, 96, 576, 640])
def test_the_rotation_is_orthogonal_dense_and_fixed_by_its_seed(width):
    q = orthogonal(width, seed=3)
    assert torch.allclose(q.T @ q, torch.eye(width, dtype=torch.float64), atol=1e-12)
    assert (q.abs() > 0).float().mean() > 0.99  # every input reaches (almost) every output
    assert torch.equal(q, orthogonal(width, seed=3))
    assert not torch.allclose(q, orthogonal(width, seed=4))


@pytest.mark.parametrize("arch", ROTATABLE)
def test_a_rotated_model_computes_the_same_logits(arch):
    model = _with_uneven_norms(make_tiny_model(arch))
    tokens = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(tokens).logits
    q_proj_before = model.model.layers[0].self_attn.q_proj.weight.clone()
    rotation = rotate(model, seed=0)
    with torch.no_grad():
        after = model(tokens).logits
    assert (after - before).abs().max() <= 1e-4
    assert rotation.max_block_error <= 1e-4
    # the norms moved into the linears, and the linears really changed
    for name, p in model.named_parameters():
        if name.endswith("norm.weight") and ".self_attn." not in name:  # qwen3's q/k norms act per head, untouched
            assert torch.equal(p, torch.ones_like(p)), name
    assert not torch.allclose(model.model.layers[0].self_attn.q_proj.weight, q_proj_before, atol=1e-3)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("residual", [True, False])
def test_rotating_the_attention_heads_values_keeps_the_logits(arch, residual):
    model = _with_uneven_norms(make_tiny_model(arch))
    if arch == "qwen2":  # a value bias must turn with its rows
        with torch.no_grad():
            model.model.layers[0].self_attn.v_proj.bias.normal_(0, 0.5)
    tokens = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(tokens).logits
    v_before = model.model.layers[1].self_attn.v_proj.weight.clone()
    rotation = rotate(model, residual=residual, heads=True)
    assert rotation.heads and rotation.residual == residual
    with torch.no_grad():
        assert (model(tokens).logits - before).abs().max() <= 1e-4
    if not residual:  # the values' rows really turned
        assert not torch.allclose(model.model.layers[1].self_attn.v_proj.weight, v_before, atol=1e-3)


def test_heads_alone_leave_a_tied_head_tied_and_nothing_to_rotate_is_refused(capsys, tmp_path, tiny_model_dir):
    model = make_tiny_model("llama")
    model.config.tie_word_embeddings = True
    model.tie_weights()
    assert not rotate(model, residual=False, heads=True).untied_head
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert main(["rotate", str(tiny_model_dir), "--out", str(tmp_path / "r"), "--no-residual"]) == 1
    assert "nothing to rotate: drop --no-residual or add --heads" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_a_head_tied_to_the_embedding_becomes_its_own_table():
    model = make_tiny_model("llama")
    model.config.tie_word_embeddings = True
    model.tie_weights()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    _with_uneven_norms(model)
    tokens = torch.arange(40).reshape(2, 20)
    with torch.no_grad():
        before = model(tokens).logits
    rotation = rotate(model)
    assert rotation.untied_head and not model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        assert (model(tokens).logits - before).abs().max() <= 1e-4


@pytest.mark.parametrize("arch", ["gpt2", "opt", "gemma", "gemma3_text", "phi3"])
def test_architectures_whose_norms_cannot_be_folded_are_refused_naming_the_adapter(arch):
    model = make_tiny_model(arch)
    with pytest.raises(RotationError, match=f"the '{arch}' adapter's norms cannot be folded"):
        rotate(model)


def test_a_block_the_rotation_does_not_preserve_is_named():
    model = _with_uneven_norms(make_tiny_model("llama", layers=3))
    # a LayerNorm (mean subtraction) where the config promises RMSNorm: rotating breaks block 1
    norm = nn.LayerNorm(model.config.hidden_size, bias=False)
    model.model.layers[1].post_attention_layernorm = norm
    with pytest.raises(RotationError, match=r"changed the output of block 1 by .* of its largest value"):
        rotate(model)


def test_the_rotate_command_writes_a_checkpoint_that_loads_and_quantizes(capsys, tmp_path, tiny_model_dir, text_file):
    out = tmp_path / "rotated"
    assert main(["rotate", str(tiny_model_dir), "--out", str(out), "--seed", "5"]) == 0
    assert "rotated the 64-wide residual stream (" in capsys.readouterr().out
    record = json.loads((out / ROTATION_FILE).read_text())
    assert record["seed"] == 5 and record["source"] == load_model(tiny_model_dir).source.identity

    original, rotated = load_model(tiny_model_dir).model, load_model(out).model
    tokens = torch.arange(30).reshape(1, 30)
    with torch.no_grad():
        assert (rotated(tokens).logits - original(tokens).logits).abs().max() <= 1e-4

    # an existing output is refused in one line, before the model is read
    assert main(["rotate", str(tiny_model_dir), "--out", str(out)]) == 1
    assert "already exists; pass --overwrite" in capsys.readouterr().err

    artifact = tmp_path / "q"
    args = ["quantize", str(out), "--bits", "4", "--group-size", "32", "--out", str(artifact), "--eval"]
    args += ["--data", str(text_file), "--eval-seqlen", "64", "--calib", str(text_file), "--nsamples", "8"]
    assert main([*args, "--seqlen", "64", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["evaluation"]["kld"] < 0.5


def test_rotating_a_quantized_artifact_is_refused(capsys, tmp_path, tiny_model_dir):
    artifact = tmp_path / "q"
    assert main(["quantize", str(tiny_model_dir), "--bits", "4", "--method", "rtn", "--out", str(artifact)]) == 0, (
        capsys.readouterr().err
    )
    capsys.readouterr()
    assert main(["rotate", str(artifact), "--out", str(tmp_path / "r")]) == 1
    assert "is a quantized lowbit artifact; rotate the float model" in capsys.readouterr().err


def test_a_lazy_model_is_refused_before_anything_changes(tiny_model_dir):
    lazy = load_model(tiny_model_dir, lazy=True).model
    with pytest.raises(RotationError, match="not loaded .a lazy model.; load it whole"):
        rotate(lazy)


def test_quantize_rotate_equals_rotating_first_and_records_it(capsys, tmp_path, tiny_model_dir, text_file):
    """`quantize --rotate` is `rotate` then `quantize` in one command: the same packed weights, the
    rotation in the manifest, the reference the unrotated model (the same function)."""
    common = ["--bits", "4", "--group-size", "32", "--calib", str(text_file), "--nsamples", "8"]
    common += ["--calib-seqlen", "64", "--json"]
    assert main(["rotate", str(tiny_model_dir), "--out", str(tmp_path / "rot"), "--seed", "3"]) == 0
    assert main(["quantize", str(tmp_path / "rot"), *common, "--out", str(tmp_path / "two")]) == 0
    args = ["quantize", str(tiny_model_dir), *common, "--rotate", "--rotate-seed", "3", "--out", str(tmp_path / "one")]
    assert main([*args, "--eval", "--data", str(text_file), "--eval-seqlen", "64"]) == 0
    one, two = (load_file(tmp_path / d / "model.safetensors") for d in ("one", "two"))
    packed = [k for k in one if k.endswith(".qweight")]
    assert packed and all(torch.equal(one[k], two[k]) for k in packed)
    manifest = json.loads((tmp_path / "one" / "lowbit_manifest.json").read_text())
    assert manifest["settings"]["rotation"]["seed"] == 3 and manifest["settings"]["rotation"]["residual"]
    assert manifest["evaluation"]["kld"] < 0.5
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "one")]) == 0
    assert "rotation     residual stream, seed 3" in capsys.readouterr().out


def test_quantize_rotate_refuses_an_architecture_it_cannot_fold(capsys, tmp_path, tiny_tokenizer):
    make_tiny_model("gpt2").save_pretrained(tmp_path / "gpt2")
    tiny_tokenizer.save_pretrained(tmp_path / "gpt2")
    out = tmp_path / "q"
    args = ["quantize", str(tmp_path / "gpt2"), "--bits", "4", "--method", "rtn", "--rotate", "--out", str(out)]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "the 'gpt2' adapter's norms cannot be folded" in err and not out.exists()
