"""Quantizing to a bit budget: plans within budget, reusable measurements, clear refusals."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_tiny_model

import lowbit
from lowbit.allocate import Measurements, plan_for_budget
from lowbit.allocate.sensitivity import MeasurementMismatchError
from lowbit.errors import BudgetError, LowbitError
from lowbit.formats import IntFormat
from lowbit.keep import KeepRule, parse_rules
from lowbit.recipe import GPTQSettings

WINDOWS = torch.randint(2, 256, (8, 64), generator=torch.Generator().manual_seed(0))
CANDIDATES = [IntFormat(b, 32) for b in (2, 3, 4, 8)]
KW = {"calib": WINDOWS, "gptq": GPTQSettings(batch_size=4), "candidates": CANDIDATES, "progress": False}


def test_budget_plan_is_mixed_and_within_budget(tmp_path):
    model = make_tiny_model("llama")
    path = tmp_path / "measurements.json"
    q = lowbit.quantize(copy.deepcopy(model), budget_bpw=3.9, measurements=path, **KW)
    info = q.lowbit_info
    budget = info.settings["budget"]
    assert info.bits_per_weight <= 3.9 and budget["achieved_bpw"] == pytest.approx(info.bits_per_weight)
    assert info.bits_per_weight > 3.6  # the budget is used, not wasted
    assert len(budget["formats"]) >= 2  # mixed precision
    assert path.is_file() and not budget["measurements_reused"]

    # a new budget for the same model and calibration reuses the measurements
    q2 = lowbit.quantize(copy.deepcopy(model), budget_bpw=3.0, measurements=path, **KW)
    assert q2.lowbit_info.settings["budget"]["measurements_reused"]
    assert q2.lowbit_info.bits_per_weight <= 3.0 < info.bits_per_weight

    # the artifact stores per-layer formats and reloads to the same logits
    lowbit.save(q2, tmp_path / "art")
    png = (tmp_path / "art" / "plan.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    again = lowbit.load(tmp_path / "art")
    probe = WINDOWS[:2]
    with torch.no_grad():
        assert torch.equal(q2(probe).logits, again(probe).logits)


def test_knapsack_is_never_worse_than_baq_on_the_same_measurements(tmp_path):
    model = make_tiny_model("qwen2")
    path = tmp_path / "m.json"
    lowbit.quantize(copy.deepcopy(model), budget_bpw=3.5, measurements=path, **KW)
    meas = Measurements.load(path)
    for bpw in (2.8, 3.5, 5.0):
        exact, baq = plan_for_budget(meas, bpw, "knapsack"), plan_for_budget(meas, bpw, "baq")
        assert exact.achieved_bpw <= bpw and baq.achieved_bpw <= bpw
        assert exact.predicted_error <= baq.predicted_error * (1 + 1e-9)


@pytest.mark.parametrize("trust", [1.0, 1.5])
def test_upgrade_plan_keeps_every_layer_within_trust_of_the_uniform_base(tmp_path, trust):
    model = make_tiny_model("qwen2")
    path = tmp_path / "m.json"
    lowbit.quantize(copy.deepcopy(model), budget_bpw=3.5, measurements=path, **KW)
    meas = Measurements.load(path)
    names = list(meas.layers)
    for bpw in (3.3, 4.25, 5.0):
        plan = plan_for_budget(meas, bpw, "upgrade", trust=trust, fade=False)
        # the uniform format it starts from: least summed error among those that fit
        fits = [j for j in range(len(meas.candidates)) if sum(plan.costs[n][j] for n in names) <= plan.budget_bits]
        base = min(fits, key=lambda j: sum(meas.weighted_errors(n, "relative")[j] for n in names))
        assert plan.achieved_bpw <= bpw
        errors = {n: meas.layers[n]["errors"] for n in names}
        assert all(errors[n][j] <= trust * errors[n][base] for n, j in plan.choice.items())
        if trust == 1.0:  # no layer worse, so it can only spend bits
            uniform_bits = sum(plan.costs[n][base] for n in names)
            assert sum(plan.costs[n][j] for n, j in plan.choice.items()) >= uniform_bits
        assert plan.predicted_error <= sum(meas.weighted_errors(n, "relative")[base] for n in names)
        # a wider trust region is never worse on the proxy, nor the free knapsack, having more choices
        wider = plan_for_budget(meas, bpw, "upgrade", trust=2 * trust, fade=False)
        assert wider.predicted_error <= plan.predicted_error * (1 + 1e-9)
        assert plan_for_budget(meas, bpw, "knapsack").predicted_error <= plan.predicted_error * (1 + 1e-9)
        # fade only opens more choices, each at its measured error or dearer
        faded = plan_for_budget(meas, bpw, "upgrade", trust=trust, fade=True)
        assert faded.achieved_bpw <= bpw and faded.predicted_error <= plan.predicted_error * (1 + 1e-9)
    spare = plan_for_budget(meas, 4.25, "upgrade", trust=trust)
    assert len(set(spare.choice.values())) >= 2  # something was upgraded


def test_infeasible_budget_names_the_smallest_feasible_one():
    """int2 g32: 2 + (16-bit scale + 2-bit zero)/32 = 2.5625 bpw, rounded up."""
    model = make_tiny_model("llama")
    with pytest.raises(BudgetError, match=r"candidates allow \(2\.563 bpw\); use --bits 2\.563"):
        lowbit.quantize(model, budget_bpw=2.5, **KW)


def test_measurements_of_another_model_are_refused(tmp_path):
    path = tmp_path / "m.json"
    lowbit.quantize(make_tiny_model("llama"), budget_bpw=3.5, measurements=path, **KW)
    with pytest.raises(MeasurementMismatchError, match="another model"):
        lowbit.quantize(make_tiny_model("llama", seed=3), budget_bpw=3.5, measurements=path, **KW)


def test_keep_rules_parse_and_pin_formats():
    rules = parse_rules("lm_head, *.0.self_attn.*=8bit ,*.down_proj=int3-g64-sym", group_size=32)
    assert rules[0] == KeepRule("lm_head", None)
    assert rules[1].fmt == IntFormat(8, 32) and rules[2].fmt == IntFormat(3, 64, symmetric=True)
    with pytest.raises(LowbitError, match="unknown format 'nine' in --keep"):
        parse_rules("*.q_proj=nine")


def test_pinned_layers_keep_their_format_in_uniform_and_budget_runs():
    model = make_tiny_model("llama")
    keep = "*.0.self_attn.*=8bit,*.1.mlp.down_proj"
    q = lowbit.quantize(copy.deepcopy(model), bits=3, group_size=32, keep=keep, **KW)
    layers = q.lowbit_info.layers
    assert layers["model.layers.0.self_attn.q_proj"]["format"]["bits"] == 8
    assert layers["model.layers.1.self_attn.q_proj"]["format"]["bits"] == 3
    assert "model.layers.1.mlp.down_proj" not in layers  # kept in float
    assert isinstance(q.model.layers[1].mlp.down_proj, torch.nn.Linear)

    qb = lowbit.quantize(copy.deepcopy(model), budget_bpw=4.0, keep=keep, **KW)
    layers = qb.lowbit_info.layers
    assert all(layers[f"model.layers.0.self_attn.{p}_proj"]["format"]["bits"] == 8 for p in "qkvo")
    assert qb.lowbit_info.bits_per_weight <= 4.0


def test_pins_that_eat_the_budget_and_rules_that_match_nothing_are_refused():
    model = make_tiny_model("llama")
    with pytest.raises(BudgetError, match=r"with the pinned layers \(\d\.\d+ bpw\)"):
        lowbit.quantize(copy.deepcopy(model), budget_bpw=2.8, keep="*.mlp.*=8bit", **KW)
    with pytest.raises(LowbitError, match="--keep rule '\\*.mlp.fc9' matches no quantizable layer"):
        lowbit.quantize(copy.deepcopy(model), bits=4, keep="*.mlp.fc9", **KW)


def test_sizes_parse_with_units_and_bad_ones_are_refused():
    from lowbit.allocate.size import parse_size

    assert parse_size("70MB") == 70_000_000 and parse_size("64MiB") == 64 * 2**20
    assert parse_size("1.5GB") == 1_500_000_000 and parse_size("1234") == 1234 and parse_size("2kib") == 2048
    for bad in ("70 parsecs", "", "-3MB", "0MB"):
        with pytest.raises(LowbitError, match="--size"):
            parse_size(bad)


@pytest.mark.parametrize("fmt", [IntFormat(3, 32), IntFormat(4, 64, symmetric=True), IntFormat(2, None)])
def test_layer_bytes_are_the_packed_bytes_of_a_real_layer(fmt):
    from lowbit.allocate.size import layer_bytes
    from lowbit.runtime import QuantizedLinear

    w = torch.randn(48, 100)
    layer = QuantizedLinear.from_quantized(fmt.quantize_tensor(w), None)
    assert layer_bytes(fmt, 48, 100) == sum(b.numel() * b.element_size() for b in layer.buffers())


def test_size_budget_bounds_the_weights_file_and_names_the_smallest_size(tmp_path):
    import re

    model = make_tiny_model("llama")
    with pytest.raises(BudgetError, match=r"smallest weights file .* use --size ([0-9.]+)MB") as err:
        lowbit.quantize(copy.deepcopy(model), size_bytes=1000, **KW)
    smallest = int(float(re.search(r"--size ([0-9.]+)MB", str(err.value)).group(1)) * 1e6)
    cheap = lowbit.quantize(copy.deepcopy(model), size_bytes=smallest, **KW)
    assert "int2-g32-asym" in cheap.lowbit_info.settings["budget"]["formats"]  # the named size works
    lowbit.save(cheap, tmp_path / "cheap")
    floor = (tmp_path / "cheap" / "model.safetensors").stat().st_size
    assert floor <= smallest

    size = floor + 40_000  # room for some layers at more bits
    q = lowbit.quantize(copy.deepcopy(model), size_bytes=size, **KW)
    budget = q.lowbit_info.settings["budget"]
    lowbit.save(q, tmp_path / "art")
    actual = (tmp_path / "art" / "model.safetensors").stat().st_size
    assert actual <= budget["planned_bytes"] <= size
    assert actual > size - 12_000  # the budget is spent, not wasted (a header allowance aside)
    assert len(budget["formats"]) >= 2 and budget["size_bytes"] == size
    with pytest.raises(LowbitError, match="not both"):
        lowbit.quantize(copy.deepcopy(model), size_bytes=size, budget_bpw=3.0, **KW)
