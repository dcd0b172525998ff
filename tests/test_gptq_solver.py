import pytest
import torch

from lowbit.formats import IntFormat, LevelFormat
from lowbit.solvers import HessianError, gptq_quantize


def _layer(out=24, n=96, tokens=512, seed=0, dtype=torch.float32):
    """A weight and correlated inputs X (as real activations are), with H = 2XXᵀ/tokens."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n, n, generator=g, dtype=dtype) / n**0.5 + torch.eye(n, dtype=dtype)
    x = torch.randn(tokens, n, generator=g, dtype=dtype) @ mix
    x[:, ::7] *= 4  # a few high-energy input channels
    w = torch.randn(out, n, generator=g, dtype=dtype)
    return w, x, 2 * x.T @ x / tokens


def _output_error(w, q, x):
    return ((w - q) @ x.T).pow(2).sum().item()


FORMATS = [
    IntFormat(b, gs, sym)
    for b in (2, 3, 4, 5, 6, 8)
    for gs, sym in ((32, False), (None, False), (40, True))  # 40 leaves a partial group of 16
] + [LevelFormat(b, gs, grid=grid) for b, grid in ((4, "nf4"), (3, "nf3"), (4, "fp4")) for gs in (32, 40)]


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_gptq_beats_rtn_output_error_for_every_integer_and_level_format(fmt):
    w, x, h = _layer()
    rtn = fmt.quantize_tensor(w).dequantize()
    res = gptq_quantize(w, h, fmt)
    gptq = res.qt.dequantize()
    assert _output_error(w, gptq, x) < _output_error(w, rtn, x)
    # the reported error is the normalised Hessian-weighted one, tr(dW H dWᵀ)/tr(W H Wᵀ)
    expected = _output_error(w, gptq, x) / _output_error(w, torch.zeros_like(w), x)
    assert res.error == pytest.approx(expected, rel=1e-3)


def _obq_reference(w, h, fmt, percdamp=0.01):
    """Greedy optimal-brain-quantization, column order 0..n-1, written plainly."""
    w = w.clone()
    n = w.shape[1]
    h = h + percdamp * torch.diag(h).mean() * torch.eye(n, dtype=h.dtype)
    hinv = torch.linalg.inv(h)
    gl = fmt.group_len(n)
    codes = torch.zeros_like(w)
    for j in range(n):
        if j % gl == 0:
            scale, zero = fmt.fit(w[:, j : j + gl])
        q = fmt.quantize(w[:, j : j + 1], scale, zero)
        codes[:, j : j + 1] = q
        err = (w[:, j] - fmt.dequantize(q, scale, zero)[:, 0]) / hinv[j, j]
        w -= torch.outer(err, hinv[j, :])  # optimal update of the remaining weights
        hinv = hinv - torch.outer(hinv[:, j], hinv[j, :]) / hinv[j, j]  # eliminate column j
    return codes


@pytest.mark.parametrize("fmt", [IntFormat(3, 8), IntFormat(4, None), IntFormat(2, 12, symmetric=True)], ids=str)
def test_one_column_blocks_equal_obq_reference(fmt):
    w, _, h = _layer(out=6, n=20, tokens=200, seed=1, dtype=torch.float64)
    ref = _obq_reference(w, h, fmt)
    res = gptq_quantize(w, h, fmt, block_size=1)
    assert torch.equal(res.qt.codes.to(torch.float64), ref)


def test_lazy_block_updates_equal_one_column_blocks():
    w, _, h = _layer(out=8, n=64, tokens=300, seed=2, dtype=torch.float64)
    fmt = IntFormat(3, 16)
    a = gptq_quantize(w, h, fmt, block_size=1).qt
    b = gptq_quantize(w, h, fmt, block_size=128).qt
    c = gptq_quantize(w, h, fmt, block_size=5).qt  # blocks that do not divide the group
    assert torch.equal(a.codes, b.codes) and torch.equal(a.codes, c.codes)
    assert torch.equal(a.scales, b.scales)


def test_act_order_uses_static_groups_in_original_layout():
    w, x, h = _layer(seed=3)
    fmt = IntFormat(3, 32)
    res = gptq_quantize(w, h, fmt, act_order=True)
    # group parameters are those fitted on the original weights, so no permutation is stored
    assert torch.equal(res.qt.scales, fmt.quantize_tensor(w).scales)
    assert res.qt.shape == tuple(w.shape)
    rtn = fmt.quantize_tensor(w).dequantize()
    assert _output_error(w, res.qt.dequantize(), x) < _output_error(w, rtn, x)


@pytest.mark.parametrize("act_order", [False, True])
def test_dead_inputs_are_zeroed_and_ignored(act_order):
    """An input that is always zero has no effect on the output: its weights are stored as zero,
    and whatever they were, every other code comes out the same."""
    w, x, h = _layer(seed=4)
    x[:, 5] = 0
    h = 2 * x.T @ x / x.shape[0]
    fmt = IntFormat(4, 32)
    res = gptq_quantize(w, h, fmt, act_order=act_order)
    other = w.clone()
    other[:, 5] = 100 * torch.randn(w.shape[0], generator=torch.Generator().manual_seed(1))
    again = gptq_quantize(other, h, fmt, act_order=act_order)
    assert torch.equal(res.qt.dequantize()[:, 5], torch.zeros(w.shape[0]))
    keep = torch.arange(w.shape[1]) != 5
    assert torch.equal(res.qt.codes[:, keep], again.qt.codes[:, keep])
    assert torch.equal(res.qt.scales, again.qt.scales)
    assert _output_error(w, res.qt.dequantize(), x) < _output_error(w, fmt.quantize_tensor(w).dequantize(), x)


def test_damping_is_raised_when_cholesky_fails():
    w, _, _ = _layer(n=64)
    x = torch.randn(8, 64)  # 8 tokens for 64 inputs: H is singular
    h = 2 * x.T @ x / 8
    res = gptq_quantize(w, h, IntFormat(4, 32), percdamp=0.0)
    assert res.damp > 0.0
    assert torch.isfinite(res.qt.dequantize()).all()


def test_hessian_that_stays_indefinite_names_the_layer():
    w = torch.randn(4, 16)
    with pytest.raises(HessianError, match="model.layers.3.mlp.up_proj.*not positive definite"):
        gptq_quantize(w, -torch.eye(16), IntFormat(4, 8), name="model.layers.3.mlp.up_proj")


@pytest.mark.parametrize("fmt", [IntFormat(2, 32), IntFormat(3, 40, True), IntFormat(4, None)], ids=lambda f: f.name)
@pytest.mark.parametrize("act_order", [False, True])
def test_clip_search_and_scale_refit_lower_the_output_error(fmt, act_order):
    w, x, h = _layer(seed=3)
    w[:, 5] *= 6  # an outlier weight column: the absmax grid wastes levels on it
    plain = gptq_quantize(w, h, fmt, act_order=act_order)
    clipped = gptq_quantize(w, h, fmt, act_order=act_order, clip_search=True)
    both = gptq_quantize(w, h, fmt, act_order=act_order, clip_search=True, scale_refit=True)
    assert clipped.error < plain.error
    assert both.error < clipped.error
    # the refit changes scales only; codes stay those GPTQ chose
    assert torch.equal(both.qt.codes, clipped.qt.codes)


def test_scale_refit_recovers_the_scales_that_produced_the_weight():
    from lowbit.solvers.gptq import refit_scales

    w, _, h = _layer(seed=4)
    qt = IntFormat(4, 32).quantize_tensor(w)
    target = qt.dequantize()  # exactly representable with qt's codes and scales
    g = torch.Generator().manual_seed(0)
    off = qt.with_scales(qt.scales.float() * (1 + 0.2 * torch.rand(qt.scales.shape, generator=g)))
    back = refit_scales(off, target, h)
    torch.testing.assert_close(back.scales.float(), qt.scales.float(), rtol=2e-3, atol=0)
    torch.testing.assert_close(back.dequantize(), target, rtol=0, atol=1e-2)


@pytest.mark.parametrize("damp", [float("nan"), -0.1, 2.0])
def test_a_damping_that_is_not_a_fraction_is_refused_not_looped_on(damp):
    w, _, h = _layer(n=32)
    with pytest.raises(HessianError, match=r"damping must be a fraction from 0 to 1, got"):
        gptq_quantize(w, h, IntFormat(4, 32), percdamp=damp)
