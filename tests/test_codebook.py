"""Per-row fitted codebooks (`cb2`..`cb4`, lowbit.formats.codebook)."""

import pytest
import torch
from conftest import logits_before_and_after_reload, make_tiny_model

import lowbit
from lowbit.errors import FormatError, LowbitError
from lowbit.formats import CodebookFormat, format_from_dict
from lowbit.formats.codebook import nearest, weighted_kmeans
from lowbit.keep import parse_format
from lowbit.solvers import gptq_quantize
from lowbit.solvers.gptq import refit_levels


def _layer(out=32, n=160, tokens=1024, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, n, generator=g) @ (torch.randn(n, n, generator=g) / n**0.5 + torch.eye(n))
    x[:, ::9] *= 5  # a few high-energy input channels
    w = torch.randn(out, n, generator=g) * torch.linspace(0.5, 2.0, out).unsqueeze(1)
    w[:, 3] *= 6  # an outlier column
    return w, x, 2 * x.T @ x / tokens


def _output_error(w, q, x):
    return ((w - q) @ x.T).pow(2).sum().item()


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_every_weight_is_one_of_its_rows_levels_and_the_bytes_are_counted(bits):
    fmt = parse_format(f"cb{bits}")
    assert fmt == CodebookFormat(bits) and fmt.name == f"cb{bits}" and format_from_dict(fmt.to_dict()) == fmt
    w, _, _ = _layer()
    qt = fmt.quantize_tensor(w)
    deq = qt.dequantize()
    assert qt.levels.shape == (32, 1 << bits) and qt.levels.dtype == torch.float16
    assert (deq.unsqueeze(-1) - qt.levels.float().unsqueeze(1)).abs().min(-1).values.max() == 0
    packed = qt.pack()
    assert sum(t.numel() * t.element_size() for t in packed.values()) * 8 == fmt.storage_bits(32, 160)
    assert fmt.storage_bits(32, 160) == 32 * (160 * bits + 16 * (1 << bits))
    assert torch.equal(fmt.dequantize_packed(packed, 160), deq)
    assert torch.equal(fmt.unpack((32, 160), packed).dequantize(), deq)
    # rows stored apart after a stacked solve keep their own levels
    top, bottom = qt.split_rows([12, 20])
    assert torch.equal(torch.cat([top.dequantize(), bottom.dequantize()]), deq)


def test_kmeans_lowers_the_weighted_error_of_its_start_and_keeps_levels_sorted():
    g = torch.Generator().manual_seed(1)
    w = torch.cat([torch.randn(8, 300, generator=g) * 0.1, torch.randn(8, 20, generator=g) * 3], dim=1)
    weight = torch.rand(8, 320, generator=g)
    start = torch.linspace(-1, 1, 8).expand(8, 8) * w.abs().amax(-1, keepdim=True)
    fitted = weighted_kmeans(w, weight, start)

    def err(levels):
        return (weight * (nearest(w, levels) - w) ** 2).sum(-1)

    assert (fitted.diff(dim=-1) >= 0).all()
    assert (err(fitted) < 0.5 * err(start)).all()


def test_a_row_of_one_repeated_value_reconstructs_exactly_and_a_zero_row_stays_zero():
    w = torch.zeros(3, 64)
    w[1] = 0.25
    w[2, ::2] = -1.5
    deq = parse_format("cb3").quantize_tensor(w).dequantize()
    assert torch.equal(deq, w)


def test_a_fitted_codebook_rounds_heavy_tailed_rows_closer_than_normalfloat_per_row():
    """Fitted levels against NF3's fixed shape scaled per row, both round-to-nearest; the codebook
    stores more (8 levels against 1 scale per row), so it must be clearly closer, not equal."""
    torch.manual_seed(3)
    w = torch.distributions.StudentT(3.0).sample((64, 512)) * torch.rand(64, 1)
    mse = [((parse_format(s).quantize_tensor(w).dequantize() - w) ** 2).mean().item() for s in ("cb3", "nf3-gch")]
    assert mse[0] < 0.8 * mse[1], mse


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_gptq_beats_round_to_nearest_and_the_level_refit_lowers_the_output_error(bits):
    w, x, h = _layer()
    fmt = CodebookFormat(bits)
    rtn = _output_error(w, fmt.quantize_tensor(w).dequantize(), x)
    plain = gptq_quantize(w, h, fmt, act_order=True)
    refit = gptq_quantize(w, h, fmt, act_order=True, scale_refit=True)
    assert torch.equal(plain.qt.codes, refit.qt.codes)  # the refit moves levels only
    e_plain, e_refit = _output_error(w, plain.qt.dequantize(), x), _output_error(w, refit.qt.dequantize(), x)
    assert e_plain < rtn
    assert e_refit < 0.99 * e_plain
    # the refit's levels solve the least-squares problem: a small move of any level only adds error
    levels = refit.qt.levels.double()
    best = _output_error(w.double(), refit.qt.dequantize().double(), x.double())
    for k in range(1 << bits):
        for step in (-1e-2, 1e-2):
            moved = levels.clone()
            moved[:, k] += step * levels.abs().mean()
            deq = moved.gather(1, refit.qt.codes.long())
            assert _output_error(w.double(), deq, x.double()) > best * (1 - 1e-6)


def test_the_refit_keeps_a_level_no_code_uses():
    w, _, h = _layer(out=4, n=32)
    qt = CodebookFormat(2).quantize_tensor(w)
    codes = qt.codes.clone()
    codes[codes == 3] = 2  # level 3 unused in every row
    qt.codes = codes
    refit = refit_levels(qt, w, h)
    assert torch.equal(refit.levels[:, 3], qt.levels[:, 3])


def test_the_importance_moves_levels_toward_the_columns_that_matter():
    """GPTQ passes diag(H): a fit that counts column 3 (an outlier of high energy) reconstructs it
    better than a fit that counts every column equally."""
    w, _, _ = _layer()
    fmt = CodebookFormat(2)
    w3, mask = fmt.to_groups(w)
    importance = torch.ones(1, 1, w.shape[1])
    importance[..., 3] = 1e4
    plain, weighted = fmt.fit(w3, mask)[0], fmt.fit(w3, mask, importance=importance)[0]
    col = w3[:, :, 3:4]
    assert ((nearest(col, weighted) - col) ** 2).sum() < 0.5 * ((nearest(col, plain) - col) ** 2).sum()


@pytest.mark.parametrize("spec", ["cb1", "cb5", "cb8"])
def test_codebooks_outside_2_to_4_bits_are_refused(spec):
    with pytest.raises(FormatError, match="2 to 4 bits"):
        parse_format(spec)


def test_a_grouped_or_asymmetric_codebook_is_refused():
    with pytest.raises(FormatError, match="per row"):
        CodebookFormat(3, 64)
    with pytest.raises(FormatError, match="no zero point"):
        CodebookFormat(3, symmetric=False)


def test_a_codebook_model_saves_loads_and_runs_to_the_same_logits(tmp_path):
    model = make_tiny_model("llama")
    x = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        reference = model(x).logits
    lowbit.quantize(model, format="cb3", method="gptq", calib=torch.randint(0, 256, (8, 32)), progress=False)
    before, after, _ = logits_before_and_after_reload(model, tmp_path / "art", x)
    assert torch.equal(before, after)
    assert not torch.equal(before, reference)
    assert all(layer.format == CodebookFormat(3) for layer in lowbit.quantized_layers(tmp_path / "art"))


@pytest.mark.parametrize("target", ["gguf", "compressed-tensors"])
def test_export_targets_refuse_a_codebook_by_name(target):
    model = make_tiny_model("llama")
    with pytest.raises(LowbitError, match="cb3 cannot be written"):
        lowbit.quantize(model, format="cb3", method="rtn", target=target, progress=False)


def test_the_probes_perturb_a_layer_with_a_grid_not_a_codebook_and_per_channel_counts_as_the_largest_group():
    from lowbit.allocate.sensitivity import layer_probe_candidate

    names = ["cb3", "int3-g128", "int3-gch", "int2-g64", "int4-g128"]
    candidates = [parse_format(s) for s in names]
    assert names[layer_probe_candidate([0.1] * 5, candidates)] == "int3-gch"
    assert names[layer_probe_candidate([0.1, 0.1, None, 0.1, 0.1], candidates)] == "int3-g128"
    assert names[layer_probe_candidate([0.1, None, None, 0.1, 0.1], candidates)] == "cb3"


def test_the_cli_quantizes_to_a_codebook_reports_its_true_size_and_refuses_a_wide_one(capsys, tmp_path, tiny_model_dir):
    import json

    from test_cli import one_line_error, run

    out = tmp_path / "q"
    code, stdout, _ = run(
        capsys, "quantize", tiny_model_dir, "--format", "cb3", "--method", "rtn", "--out", out, "--json"
    )
    assert code == 0
    layers = lowbit.quantized_layers(out)
    bits = sum(layer.format.storage_bits(*layer.shape) for layer in layers)
    weights = sum(layer.shape[0] * layer.shape[1] for layer in layers)
    assert json.loads(stdout)["bits_per_weight"] == pytest.approx(bits / weights)
    code, stdout, _ = run(capsys, "inspect", out, "--layers")
    assert code == 0 and "cb3" in stdout
    code, _, err = run(capsys, "quantize", tiny_model_dir, "--format", "cb5", "--out", tmp_path / "o")
    one_line_error(code, err, "a codebook has 2 to 4 bits per code")
