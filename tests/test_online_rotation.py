"""Online rotations (`int3-g128-rot`, lowbit.formats.rotated): a layer stored in an orthogonal
basis, its inputs turned at run time, and export targets that refuse it."""

import pytest
import torch
from conftest import kl_judge, logits_before_and_after_reload, make_tiny_model

import lowbit
from lowbit.errors import FormatError, LowbitError
from lowbit.formats import RotatedFormat, format_from_dict
from lowbit.keep import parse_format
from lowbit.orthogonal import orthogonal, orthogonal_factors
from lowbit.solvers import gptq_quantize
from lowbit.solvers.gptq import relative_output_error


@pytest.mark.parametrize("width", [576, 1536, 64, 96, 7])
def test_the_structured_transform_is_the_dense_orthogonal_matrix(width):
    factors = orthogonal_factors(width, seed=3)
    q = orthogonal(width, seed=3)
    x = torch.randn(5, width, dtype=torch.float64)
    assert torch.allclose(q @ q.T, torch.eye(width, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(factors.right(x), x @ q, atol=1e-12)
    assert torch.allclose(factors.right_t(x), x @ q.T, atol=1e-12)
    assert not torch.allclose(q, orthogonal(width, seed=4))


def _outlier_layer(out=96, n=256, tokens=2048, seed=0):
    """A layer whose inputs have a few channels far larger than the rest, as down_proj's do."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, n, generator=g)
    x[:, [3, 70, 200]] *= 25
    w = torch.randn(out, n, generator=g) * 0.05
    return w, 2 * x.T @ x / tokens


@pytest.mark.parametrize("spec", ["int3-g128", "nf3-g64-s8", "int2-g32"])
def test_gptq_in_the_rotated_basis_lowers_the_error_of_a_layer_with_outlier_inputs(spec):
    w, h = _outlier_layer()
    plain = gptq_quantize(w, h, parse_format(spec))
    turned = gptq_quantize(w, h, parse_format(f"{spec}-rot"))
    deq = turned.qt.dequantize()
    # the error the solver reports is the model-basis error of what is stored
    assert turned.error == pytest.approx(relative_output_error(w, deq, h), rel=1e-4)
    assert turned.error < 0.8 * plain.error
    # what is stored is the base format's tensor in the rotated basis
    inner = turned.qt.inner
    assert inner.fmt == parse_format(spec)
    q = orthogonal(w.shape[1])
    assert torch.allclose(deq.double(), inner.dequantize().double() @ q.T, atol=1e-5)


@pytest.mark.parametrize("spec", ["int3-g128", "nf3-g64-s8", "q4_0", "cb3"])
def test_a_rotated_format_costs_its_base_formats_bits_and_round_trips_by_name_and_dict(spec):
    base = parse_format(spec)
    fmt = parse_format(f"{spec}-rot")
    assert isinstance(fmt, RotatedFormat) and fmt.base == base
    assert fmt.storage_bits(96, 256) == base.storage_bits(96, 256)
    assert parse_format(fmt.name) == fmt
    assert format_from_dict(fmt.to_dict()) == fmt
    assert parse_format(f"{spec}-rot2").seed == 2


def test_a_format_rotated_twice_is_refused():
    with pytest.raises(FormatError, match="already rotated"):
        parse_format("int3-g128-rot-rot")


@pytest.mark.parametrize("method", ["gptq", "rtn"])
def test_a_rotated_model_saves_loads_and_runs_to_the_same_logits(tmp_path, method):
    model = make_tiny_model("llama")
    calib = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(1))
    lowbit.quantize(model, format="int3-g16-rot", method=method, calib=calib, progress=False)
    before, after, _ = logits_before_and_after_reload(model, tmp_path / "art", torch.randint(0, 256, (2, 24)))
    assert torch.equal(before, after)
    layers = lowbit.quantized_layers(tmp_path / "art")
    assert layers and all(layer.format == parse_format("int3-g16-rot") for layer in layers)


def test_the_rotation_runs_in_the_layer_so_dropping_it_breaks_the_model():
    """The stored codes are in the rotated basis: read as the base format, the model is lost."""
    model = make_tiny_model("llama")
    reference = make_tiny_model("llama")
    windows = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(2))
    kld = kl_judge(reference, windows)
    calib = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(1))
    lowbit.quantize(model, format="int4-g16-rot", method="gptq", calib=calib, progress=False)
    with_rotation = kld(model)
    for module in model.modules():
        if isinstance(getattr(module, "fmt", None), RotatedFormat):
            module.fmt = module.fmt.base
    assert with_rotation < 0.05 < kld(model)


@pytest.mark.parametrize("target", ["gguf", "compressed-tensors"])
def test_export_targets_refuse_an_online_rotation_by_name(tmp_path, target):
    model = make_tiny_model("llama")
    with pytest.raises(LowbitError, match=r"int4-g32-\w+-rot turns the layer's inputs at run time"):
        lowbit.quantize(model, format="int4-g32-rot", method="rtn", target=target, progress=False)
    lowbit.quantize(model, format="int4-g32-rot", method="rtn", progress=False)
    lowbit.save(model, tmp_path / "art")
    if target == "gguf":
        from lowbit.export.gguf import export_gguf as export
    else:
        from lowbit.export.compressed_tensors import export_compressed_tensors as export
    with pytest.raises(LowbitError, match="online rotation"):
        export(tmp_path / "art", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_budget_chooses_between_rotated_and_plain_candidates_within_its_bits(tmp_path):
    from lowbit.recipe import GPTQSettings

    model = make_tiny_model("llama")
    names = ("int2-g16-s8", "int2-g16-s8-rot", "int3-g32-s8", "int3-g32-s8-rot", "int4-g32-s8", "int8-g128")
    candidates = [parse_format(s) for s in names]
    windows = torch.randint(2, 256, (8, 64), generator=torch.Generator().manual_seed(0))
    q = lowbit.quantize(
        model, budget_bpw=3.0, calib=windows, gptq=GPTQSettings(batch_size=4), candidates=candidates, progress=False
    )
    assert 2.8 < q.lowbit_info.bits_per_weight <= 3.0
    used = {layer.format for layer in lowbit.quantized_layers(q)}
    assert used <= set(candidates) and any(isinstance(f, RotatedFormat) for f in used)
    before, after, _ = logits_before_and_after_reload(q, tmp_path / "art", torch.randint(0, 256, (2, 16)))
    assert torch.equal(before, after)
