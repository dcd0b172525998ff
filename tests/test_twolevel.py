"""Two-level integer grids (`int3-g32-s8`, lowbit.formats.twolevel): group scales stored as small
integer codes times one float16 step per row."""

import pytest
import torch
from conftest import logits_before_and_after_reload, make_tiny_model

import lowbit
from lowbit.errors import FormatError, LowbitError
from lowbit.formats import IntFormat, LevelFormat, format_from_dict
from lowbit.formats.twolevel import TwoLevelScales
from lowbit.keep import parse_format
from lowbit.solvers import gptq_quantize
from lowbit.solvers.gptq import relative_output_error


def _layer(out=48, n=200, tokens=1024, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n, n, generator=g) / n**0.5 + torch.eye(n)  # correlated inputs, as a model's are
    x = torch.randn(tokens, n, generator=g) @ mix * torch.rand(n, generator=g)
    w = torch.randn(out, n, generator=g) * torch.rand(out, 1, generator=g)
    w[:, 5] *= 8  # an outlier column: its group's scale is far above the row's others
    return w, 2 * x.T @ x / tokens


@pytest.mark.parametrize(
    "spec", ["int3-g32-s8", "int3-g32-sym-s8", "int2-g16-asym-s6", "int4-g64-s4", "nf3-g32-s8", "nf4-g64-s6"]
)
def test_every_scale_is_a_whole_multiple_of_its_rows_step_and_the_bytes_are_counted(spec):
    fmt = parse_format(spec)
    assert isinstance(fmt, TwoLevelScales) and format_from_dict(fmt.to_dict()) == fmt
    assert parse_format(fmt.name) == fmt
    w, h = _layer()
    qt = gptq_quantize(w, h, fmt, act_order=True, clip_search=True, scale_refit=True).qt
    codes = qt.scales / qt.step
    assert torch.equal(codes, codes.round())
    top = fmt.max_scale_code
    assert codes.abs().max() <= top and (codes.abs() >= 1).all()
    assert (codes > 0).all() if not fmt.symmetric else (codes < 0).any()  # signed absmax: negative scales
    assert qt.step.dtype == torch.float32 and torch.equal(qt.step, qt.step.half().float())
    packed = qt.pack()
    assert packed["scale_step"].dtype == torch.float16 and packed["scale_step"].shape == (48, 1)
    assert torch.equal(fmt.dequantize_packed(packed, 200), qt.dequantize())
    groups = 48 * fmt.num_groups(200)
    code_and_zero = fmt.scale_code_bits + (0 if fmt.symmetric else fmt.bits)
    assert fmt.storage_bits(48, 200) == 48 * 200 * fmt.bits + groups * code_and_zero + 48 * 16
    top_rows, bottom_rows = qt.split_rows([20, 28])
    assert torch.equal(torch.cat([top_rows.dequantize(), bottom_rows.dequantize()]), qt.dequantize())
    assert torch.equal(top_rows.step, qt.step[:20])


@pytest.mark.parametrize(
    ("plain", "coded", "bound"),
    # NF3's scales are signed (its levels are not symmetric), so its codes keep 7 bits of magnitude
    [(IntFormat(3, 32), "int3-g32-s8", 1.01), (LevelFormat(3, 32, grid="nf3"), "nf3-g32-s8", 1.03)],
)
def test_eight_bit_scale_codes_lose_almost_nothing_to_float16_scales_at_fewer_bits(plain, coded, bound):
    w, h = _layer()
    coded = parse_format(coded)
    assert coded.grid == plain.grid if isinstance(plain, LevelFormat) else coded.bits == plain.bits
    e_plain = gptq_quantize(w, h, plain, act_order=True, clip_search=True, scale_refit=True).error
    e_coded = gptq_quantize(w, h, coded, act_order=True, clip_search=True, scale_refit=True).error
    assert e_coded < bound * e_plain
    assert coded.bits_per_weight(48, 200) < plain.bits_per_weight(48, 200) - 0.15


def test_a_row_whose_widest_group_is_far_above_the_rest_keeps_that_group_unclipped():
    """The step is set from the widest group, rounded up, so that group's scale gets the largest
    code and its outlier is rounded, not clipped: off by at most half a step of its grid."""
    fmt = parse_format("int4-g32-s8")
    w = torch.randn(4, 128) * 0.01
    w[:, 70] = torch.tensor([3.0, -2.0, 1.0, 0.5])
    qt = fmt.quantize_tensor(w)
    assert torch.equal((qt.scales[:, 2] / qt.step[:, 0]).round(), torch.full((4,), 255.0))
    assert ((qt.dequantize()[:, 70] - w[:, 70]).abs() <= qt.scales[:, 2] / 2 + 1e-6).all()


@pytest.mark.parametrize("spec", ["int3-g32-s8", "nf3-g32-s8"])
def test_a_range_search_finds_each_rows_step_once_and_fits_as_one_clip_at_a_time_would(spec, monkeypatch):
    """The step depends on the unclipped ranges only, so a search over clips (GPTQ's, RTN's)
    fits it once: half the grid fits it did when every clip found it again."""
    fmt = parse_format(spec)
    w3, mask = fmt.to_groups(torch.randn(8, 256))
    clips = [1.0, 0.9, 0.75, 0.6]
    alone = [fmt.fit(w3, mask, clip=c) for c in clips]
    grid_fits = []
    grid = type(fmt).__mro__[2]  # the grid's own format: IntFormat or LevelFormat
    original = grid._fit_with
    monkeypatch.setattr(grid, "_fit_with", lambda self, *a: grid_fits.append(a[2]) or original(self, *a))
    together = list(fmt.fit_clips(w3, mask, clips))
    assert grid_fits == [1.0, *clips]  # the unclipped fit for the step, then one per clip
    for a, b in zip(alone, together, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_gptq_with_static_or_lazy_groups_rounds_every_weight_to_the_stored_scales():
    w, h = _layer()
    fmt = parse_format("int3-g32-s8")
    for act_order in (True, False):
        res = gptq_quantize(w, h, fmt, act_order=act_order, clip_search=True, scale_refit=False)
        qt = res.qt
        rebuilt = fmt.unpack(qt.shape, qt.pack())
        assert torch.equal(rebuilt.dequantize(), qt.dequantize())
        rtn_error = relative_output_error(w, fmt.quantize_tensor(w, clip_search=True).dequantize(), h)
        assert res.error < rtn_error  # the error feedback still pays with two-level scales


def test_the_scale_refit_lowers_the_output_error_and_stays_on_a_step_per_row():
    w, h = _layer(seed=3)
    fmt = parse_format("int3-g32-s8")
    before = gptq_quantize(w, h, fmt, act_order=True, clip_search=True, scale_refit=False)
    after = gptq_quantize(w, h, fmt, act_order=True, clip_search=True, scale_refit=True)
    assert torch.equal(before.qt.codes, after.qt.codes)
    assert after.error < 0.99 * before.error
    assert torch.equal(after.qt.scales / after.qt.step, (after.qt.scales / after.qt.step).round())


@pytest.mark.parametrize(
    ("spec", "message"),
    [("int3-g32-s3", "4 to 8 bits"), ("int3-g32-s9", "4 to 8 bits"), ("int3-gch-s8", "per-channel")],
)
def test_nonsense_scale_codes_are_refused(spec, message):
    with pytest.raises(FormatError, match=message):
        parse_format(spec)


def test_a_two_level_model_saves_loads_and_runs_to_the_same_logits(tmp_path):
    model = make_tiny_model("llama")
    x = torch.randint(0, 256, (2, 24))
    lowbit.quantize(model, format="int3-g16-s8", method="gptq", calib=torch.randint(0, 256, (8, 32)), progress=False)
    before, after, _ = logits_before_and_after_reload(model, tmp_path / "art", x)
    assert torch.equal(before, after)
    assert all(layer.format == parse_format("int3-g16-s8") for layer in lowbit.quantized_layers(tmp_path / "art"))


@pytest.mark.parametrize("target", ["gguf", "compressed-tensors"])
def test_export_targets_refuse_two_level_scales_by_name(target):
    model = make_tiny_model("llama")
    with pytest.raises(LowbitError, match="int4-g32-asym-s8 cannot be written"):
        lowbit.quantize(model, format="int4-g32-asym-s8", method="rtn", target=target, progress=False)


def test_a_budget_plans_over_two_level_candidates_within_its_bits_and_reloads(tmp_path):
    from lowbit.recipe import GPTQSettings

    model = make_tiny_model("llama")
    names = ("int2-g16-s8", "int3-g32-s8", "nf3-g32-s8", "int4-g32-s8", "int8-g128")
    candidates = [parse_format(s) for s in names]
    windows = torch.randint(2, 256, (8, 64), generator=torch.Generator().manual_seed(0))
    q = lowbit.quantize(
        model, budget_bpw=3.4, calib=windows, gptq=GPTQSettings(batch_size=4), candidates=candidates, progress=False
    )
    info = q.lowbit_info
    assert 3.2 < info.bits_per_weight <= 3.4
    used = {layer.format for layer in lowbit.quantized_layers(q)}
    assert len(used) >= 2 and used <= set(candidates)
    before, after, _ = logits_before_and_after_reload(q, tmp_path / "art", torch.randint(0, 256, (2, 16)))
    assert torch.equal(before, after)


def test_the_default_candidates_are_mostly_two_level_and_each_costs_less_than_its_float16_twin():
    """Budgets offer the 19 candidates measured against lowbit 0.1's 22 (BENCHMARKS, "Two-level
    scales"): every two-level one is cheaper than the same grid with float16 scales, and the
    run's symmetry and scale dtype reach them all."""
    from lowbit.recipe import Recipe, default_candidates

    cands = default_candidates()
    assert Recipe.build(budget_bpw=3.0).budget.candidates == cands
    assert len({c.name for c in cands}) == len(cands) == 19
    coded = [c for c in cands if isinstance(c, TwoLevelScales)]
    assert len(coded) == 13
    for c in coded:
        twin = parse_format(c.name.removesuffix(f"-s{c.scale_code_bits}"))
        assert type(twin) in (IntFormat, LevelFormat) and twin.bits == c.bits
        assert c.bits_per_weight(1536, 576) < twin.bits_per_weight(1536, 576)
    sym = default_candidates(symmetric=True, scale_dtype="bfloat16")
    assert all(c.symmetric and c.scale_dtype == "bfloat16" for c in sym)
