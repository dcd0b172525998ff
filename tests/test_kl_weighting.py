"""The `kl` weighting: layer errors put in KL units by probes per layer role and bit width,
probed once per measurement file."""

from __future__ import annotations

import copy
import importlib

import pytest
import torch
from conftest import make_tiny_model

import lowbit
from lowbit.allocate import Measurements, kl_probe
from lowbit.allocate.kl_probe import WEIGHTING_PROBE_TOKENS, probe_layers, probe_roles, probe_windows
from lowbit.allocate.sensitivity import layer_probe_candidate, layer_role
from lowbit.errors import LowbitError
from lowbit.eval.metrics import evaluate_windows
from lowbit.eval.reference import build_reference
from lowbit.formats import IntFormat
from lowbit.models.adapters import get_adapter, linear_weight, quantizable_linears
from lowbit.recipe import GPTQSettings
from lowbit.walker import walk

WINDOWS = torch.randint(2, 256, (8, 64), generator=torch.Generator().manual_seed(0))
CANDIDATES = [IntFormat(2, 32), IntFormat(3, 32), IntFormat(3, 64), IntFormat(8, 32)]
KW = {"calib": WINDOWS, "gptq": GPTQSettings(batch_size=4), "candidates": CANDIDATES, "progress": False}


def test_layer_role_is_the_name_within_its_block():
    assert layer_role("model.layers.11.mlp.down_proj") == "mlp.down_proj"
    assert layer_role("transformer.h.0.attn.c_attn") == "attn.c_attn"


def test_the_role_probe_measures_kl_per_unit_of_error_at_the_measured_error_size_and_restores_the_model():
    model = make_tiny_model("llama")
    linears = [n for n, _ in quantizable_linears(model, get_adapter("llama"))]
    # stand-in measured errors: a fixed fraction of each layer's round-to-nearest error
    errors = {n: [0.02, 0.005, 0.006, 1e-6] for n in linears}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    scale = probe_roles(model, errors, CANDIDATES, WINDOWS, progress=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert set(scale) == {layer_role(n) for n in linears}
    for row in scale.values():
        assert len(row) == len(CANDIDATES) and all(k > 0 for k in row)
        assert row[1] == row[2]  # one probe per bit width: int3 g64 stands for int3 g32 too

    # redo one probe by hand: every down_proj moved toward its int3 g64 rounding until its relative
    # output error is the stated 0.006; the KL of that, per unit of the summed error
    windows = probe_windows(WINDOWS, WEIGHTING_PROBE_TOKENS)
    ref = build_reference(model, windows, progress=False)
    moved = copy.deepcopy(model)
    fmt, names = CANDIDATES[2], [n for n in linears if n.endswith("down_proj")]
    inputs = {}
    hooks = [
        moved.get_submodule(n).register_forward_hook(
            lambda m, a, o, n=n: inputs.__setitem__(n, a[0].reshape(-1, a[0].shape[-1]))
        )
        for n in names
    ]
    with torch.no_grad():
        moved(windows)
    for h in hooks:
        h.remove()
    for n in names:
        w = linear_weight(moved.get_submodule(n))
        w = w.detach()
        x, d = inputs[n], fmt.quantize_tensor(w).dequantize() - w
        rtn = float((x @ d.T).pow(2).sum() / (x @ w.T).pow(2).sum())
        w += (0.006 / rtn) ** 0.5 * d
    kl = evaluate_windows(moved, windows, ref, progress=False)["kld"]
    assert scale["mlp.down_proj"][2] == pytest.approx(kl / (0.006 * len(names)), rel=1e-3)


def test_kl_weighting_scales_relative_errors_and_refuses_measurements_without_a_probe():
    meas = Measurements("m", "c", [c.to_dict() for c in CANDIDATES[:2]], {})
    meas.layers["model.layers.0.mlp.up_proj"] = {"errors": [4.0, 1.0], "base": 2.0, "block": 0}
    with pytest.raises(LowbitError, match="no KL calibration for model.layers.0.mlp.up_proj"):
        meas.weighted_errors("model.layers.0.mlp.up_proj", "kl")
    assert "kl" not in meas.weightings()
    meas.kl_scale = {"mlp.up_proj": [0.5, 0.25]}
    assert "kl" in meas.weightings()
    assert meas.weighted_errors("model.layers.0.mlp.up_proj", "kl") == [1.0, 0.125]


def test_a_kl_weighted_budget_probes_once_and_saves_the_probe_with_the_measurements(tmp_path, monkeypatch):
    """A fresh measurement pass keeps the layer probe's solutions itself (no second pass solves
    them again); a file without layer factors gets them from that second pass, equal to the
    fresh run's, and a file with them is never probed again."""
    model = make_tiny_model("llama")
    path = tmp_path / "measurements.json"

    def no_probe(*a, **k):
        raise AssertionError("probed again")

    monkeypatch.setattr(importlib.import_module("lowbit.quantize"), "_layer_probe_weights", no_probe)
    work = tmp_path / "work"  # (the probe reads the solutions back from the pass's checkpoint there)
    q = lowbit.quantize(
        copy.deepcopy(model), budget_bpw=3.5, weighting="kl", measurements=path, checkpoint_dir=work, **KW
    )
    budget = q.lowbit_info.settings["budget"]
    assert budget["weighting"] == "kl" and q.lowbit_info.bits_per_weight <= 3.5
    assert budget["kl_probe_seconds"] > 0
    saved = Measurements.load(path)
    assert set(saved.kl_layer) == set(saved.layers) and all(f > 0 for f in saved.kl_layer.values())
    assert set(saved.kl_scale) == {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"} | {
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    }
    monkeypatch.undo()
    monkeypatch.setattr(importlib.import_module("lowbit.quantize"), "probe_roles", no_probe)
    monkeypatch.setattr(importlib.import_module("lowbit.quantize"), "probe_layers", no_probe)
    q2 = lowbit.quantize(copy.deepcopy(model), budget_bpw=3.0, weighting="kl", measurements=path, **KW)
    again = q2.lowbit_info.settings["budget"]
    assert again["measurements_reused"] and again["kl_probe_seconds"] is None
    assert q2.lowbit_info.bits_per_weight <= 3.0

    # a file from before the layer probe (role scales only): the layer factors are probed and saved
    fresh, saved.kl_layer = saved.kl_layer, {}
    saved.save(path)
    monkeypatch.undo()
    monkeypatch.setattr(importlib.import_module("lowbit.quantize"), "probe_roles", no_probe)
    q3 = lowbit.quantize(
        copy.deepcopy(model), budget_bpw=3.0, weighting="kl", measurements=path, checkpoint_dir=tmp_path / "w3", **KW
    )
    assert q3.lowbit_info.settings["budget"]["kl_probe_seconds"] > 0
    reprobed = Measurements.load(path).kl_layer
    assert reprobed.keys() == saved.layers.keys()
    assert all(reprobed[n] == pytest.approx(f, rel=1e-5) for n, f in fresh.items())


def test_a_run_stopped_during_the_probes_reads_the_solutions_back_from_the_measure_checkpoint(tmp_path, monkeypatch):
    """The measurement file is written before the probes; a run stopped in the layer probe and
    resumed reuses it and takes the probe solutions its pass left in the checkpoint (no second
    solve), and gets the factors of a run never stopped."""
    model = make_tiny_model("llama")
    mod = importlib.import_module("lowbit.quantize")
    path, work = tmp_path / "measurements.json", tmp_path / "work"
    real = mod.probe_layers

    def stopped(*a, **k):
        raise RuntimeError("stopped in the layer probe")

    def no_solve(*a, **k):
        raise AssertionError("solved the probe candidates again")

    run = dict(budget_bpw=3.5, weighting="kl", measurements=path, checkpoint_dir=work, **KW)
    monkeypatch.setattr(mod, "probe_layers", stopped)
    with pytest.raises(RuntimeError, match="stopped in the layer probe"):
        lowbit.quantize(copy.deepcopy(model), **run)
    assert path.exists() and not Measurements.load(path).kl_layer
    monkeypatch.setattr(mod, "probe_layers", real)
    monkeypatch.setattr(mod, "_layer_probe_weights", no_solve)
    q = lowbit.quantize(copy.deepcopy(model), resume=True, **run)
    assert q.lowbit_info.settings["budget"]["measurements_reused"]
    resumed = Measurements.load(path).kl_layer
    monkeypatch.undo()
    lowbit.quantize(copy.deepcopy(model), budget_bpw=3.5, weighting="kl", measurements=tmp_path / "m2.json", **KW)
    fresh = Measurements.load(tmp_path / "m2.json").kl_layer
    assert resumed.keys() == fresh.keys() and len(fresh) > 0
    assert all(resumed[n] == pytest.approx(f, rel=1e-5) for n, f in fresh.items())
    assert any(f != 1.0 for f in fresh.values())  # (probed, not the default)


def test_the_role_probe_skips_a_candidate_a_role_cannot_hold():
    """int3 g64 unheld by the attention roles (inf, as for k-quants on rows not of 256): their
    int3 probe falls to int3 g32; down_proj still probes its widest int3; a width a role holds
    in no form scales by 1.0 (inf stays inf, never NaN)."""
    model = make_tiny_model("llama")
    linears = [n for n, _ in quantizable_linears(model, get_adapter("llama"))]
    attention = [n for n in linears if "self_attn" in n]
    errors = {n: [0.02, 0.005, float("inf") if n in attention else 0.006, 1e-6] for n in linears}
    errors = {n: e if n not in attention else [e[0], e[1], e[2], float("inf")] for n, e in errors.items()}
    seen = []

    class Recording(IntFormat):
        def quantize_tensor(self, w):  # which candidates the probe rounds to
            seen.append(self.group_size)
            return super().quantize_tensor(w)

    cands = [IntFormat(2, 32), Recording(3, 32), Recording(3, 64), IntFormat(8, 32)]
    scale = probe_roles(model, errors, cands, WINDOWS, progress=False)
    for role, row in scale.items():
        if role.startswith("self_attn"):
            assert row[1] == row[2] and row[1] > 0 and row[3] == 1.0, role
        else:
            assert row[1] == row[2] and row[3] > 0 and row[3] != 1.0, role
    assert 32 in seen and 64 in seen


def test_the_role_probe_reads_a_lazy_model_one_block_at_a_time_and_agrees_with_the_whole_one(
    tmp_path, tiny_tokenizer, monkeypatch
):
    """The probe walks the blocks once, every probed stream beside the float one: a model larger
    than memory is never read whole, and the scale is the one a whole model gives."""
    path = _sharded_llama(tmp_path, tiny_tokenizer)
    eager = lowbit.load_model(path, lazy=False).model
    linears = [n for n, _ in quantizable_linears(eager, get_adapter("llama"))]
    errors = {n: [0.02, 0.005, 0.006, 1e-6] for n in linears}
    whole = probe_roles(eager, errors, CANDIDATES, WINDOWS, progress=False)

    lazy = lowbit.load_model(path, lazy=True).model
    held = _record_loaded_blocks(monkeypatch, lazy)
    by_blocks = probe_roles(lazy, errors, CANDIDATES, WINDOWS, progress=False)
    assert held and max(held) == 1
    assert by_blocks.keys() == whole.keys()
    for role in whole:
        assert by_blocks[role] == pytest.approx(whole[role], rel=1e-4), role


def _loaded_blocks(model) -> int:
    """How many decoder blocks hold real (not meta) weights."""
    return sum(not next(b.parameters()).is_meta for b in model.model.layers)


def test_the_layer_probe_scores_each_linear_alone_against_its_role_prediction_and_restores_the_model(monkeypatch):
    """Each linear replaced alone by its solved weight: the factor times the role's prediction is
    exactly the KL of the model with that one linear swapped (checked by hand for two); a linear
    whose swap changes nothing gets factor 0, one without a solution or probe candidate 1."""
    model = make_tiny_model("llama")
    linears = [n for n, _ in quantizable_linears(model, get_adapter("llama"))]
    errors = {n: [0.02, 0.005, 0.006, 1e-6] for n in linears}
    scale = {layer_role(n): [0.5, 0.4, 0.3, 0.2] for n in linears}
    solved = {
        n: CANDIDATES[1].quantize_tensor(linear_weight(model.get_submodule(n)).detach()).dequantize() for n in linears
    }
    unchanged, missing = linears[0], linears[1]
    solved[unchanged] = linear_weight(model.get_submodule(unchanged)).detach().clone()
    del solved[missing]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    factors = probe_layers(model, errors, CANDIDATES, WINDOWS, scale, solved, progress=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert factors[unchanged] == 0.0 and factors[missing] == 1.0
    assert layer_probe_candidate(errors[linears[2]], CANDIDATES) == 2  # 3 bits, the larger groups
    # streams that may not all be held at once: one walk per linear, the same factors
    module = importlib.import_module("lowbit.allocate.kl_probe")
    walks = []
    monkeypatch.setattr(module, "walk", lambda *a, **k: walks.append(set(a[3].names)) or walk(*a, **k))
    one_by_one = probe_layers(model, errors, CANDIDATES, WINDOWS, scale, solved, progress=False, stream_bytes=1)
    assert walks == [{n} for n in linears if n != missing]
    assert one_by_one == pytest.approx(factors, rel=1e-6)

    windows = probe_windows(WINDOWS, WEIGHTING_PROBE_TOKENS)
    ref = build_reference(model, windows, progress=False)
    for name in (linears[2], linears[-1]):
        swapped = copy.deepcopy(model)
        linear_weight(swapped.get_submodule(name)).data.copy_(solved[name])
        kl = evaluate_windows(swapped, windows, ref, progress=False)["kld"]
        assert kl > 0
        assert factors[name] * 0.006 * 0.3 == pytest.approx(kl, rel=1e-3), name


def test_kl_weighting_multiplies_by_the_layer_factor():
    meas = Measurements("m", "c", [c.to_dict() for c in CANDIDATES[:2]], {})
    for name in ("model.layers.0.mlp.up_proj", "model.layers.1.mlp.up_proj"):
        meas.layers[name] = {"errors": [4.0, 1.0], "base": 2.0, "block": 0}
    meas.kl_scale = {"mlp.up_proj": [0.5, 0.25]}
    meas.kl_layer = {"model.layers.1.mlp.up_proj": 3.0}
    assert meas.weighted_errors("model.layers.0.mlp.up_proj", "kl") == [1.0, 0.125]
    assert meas.weighted_errors("model.layers.1.mlp.up_proj", "kl") == [3.0, 0.375]
    assert meas.weighted_errors("model.layers.1.mlp.up_proj", "relative") == [2.0, 0.5]


def test_the_layer_probe_reads_a_lazy_model_one_block_at_a_time_and_agrees_with_the_whole_one(
    tmp_path, tiny_tokenizer, monkeypatch
):
    path = _sharded_llama(tmp_path, tiny_tokenizer)
    eager = lowbit.load_model(path, lazy=False).model
    linears = [n for n, _ in quantizable_linears(eager, get_adapter("llama"))]
    errors = {n: [0.02, 0.005, 0.006, 1e-6] for n in linears}
    scale = {layer_role(n): [0.5, 0.4, 0.3, 0.2] for n in linears}
    solved = {
        n: CANDIDATES[1].quantize_tensor(linear_weight(eager.get_submodule(n)).detach()).dequantize() for n in linears
    }
    whole = probe_layers(eager, errors, CANDIDATES, WINDOWS, scale, solved, progress=False)

    lazy = lowbit.load_model(path, lazy=True).model
    held = _record_loaded_blocks(monkeypatch, lazy)
    by_blocks = probe_layers(lazy, errors, CANDIDATES, WINDOWS, scale, solved, progress=False)
    assert held and max(held) == 1
    assert by_blocks.keys() == whole.keys()
    for name in whole:
        assert by_blocks[name] == pytest.approx(whole[name], rel=1e-4), name


def _sharded_llama(tmp_path, tokenizer):
    """A 3-block llama saved in small shards, for the lazy (block-by-block) probes."""
    path = tmp_path / "sharded"
    make_tiny_model("llama", layers=3).save_pretrained(path, max_shard_size="40KB")
    tokenizer.save_pretrained(path)
    return path


def _record_loaded_blocks(monkeypatch, lazy) -> list[int]:
    """How many of `lazy`'s blocks are in memory each time the walker runs one."""
    held: list[int] = []
    walker = importlib.import_module("lowbit.walker")
    run = walker.Block.run
    monkeypatch.setattr(
        walker.Block, "run", lambda self, *a, **k: held.append(_loaded_blocks(lazy)) or run(self, *a, **k)
    )
    return held


def test_the_weighting_probes_score_fewer_positions_than_the_table_probe(monkeypatch):
    """The role and layer probes walk the first WEIGHTING_PROBE_TOKENS positions (half of the
    table probe's PROBE_TOKENS: half the cost), the table probe the first PROBE_TOKENS."""
    model = make_tiny_model("llama")
    linears = [n for n, _ in quantizable_linears(model, get_adapter("llama"))]
    errors = {n: [0.1, 0.05, 0.04, 0.001] for n in linears}
    solved = {linears[0]: linear_weight(model.get_submodule(linears[0])).detach().clone()}
    windows = torch.randint(2, 256, (40, 128), generator=torch.Generator().manual_seed(1))
    walked = []

    class Walked(Exception):
        pass

    def spy(model, adapter, windows, *a, **k):
        walked.append(tuple(windows.shape))
        raise Walked

    monkeypatch.setattr(kl_probe, "walk", spy)
    scale = {layer_role(n): [1.0] * len(CANDIDATES) for n in linears}
    for probe in (
        lambda: probe_roles(model, errors, CANDIDATES, windows, progress=False),
        lambda: probe_layers(model, errors, CANDIDATES, windows, scale, solved, progress=False),
        lambda: kl_probe.probe_tables(model, linears, [], CANDIDATES, windows, progress=False),
    ):
        with pytest.raises(Walked):
            probe()
    assert kl_probe.WEIGHTING_PROBE_TOKENS < kl_probe.PROBE_TOKENS
    weighting, table = kl_probe.WEIGHTING_PROBE_TOKENS // 128, kl_probe.PROBE_TOKENS // 128
    assert walked == [(weighting, 128), (weighting, 128), (table, 128)]


def _same_file(a: Measurements, b: Measurements) -> None:
    assert a.candidates == b.candidates and a.layers.keys() == b.layers.keys()
    for name, rec in a.layers.items():
        assert rec["costs"] == b.layers[name]["costs"]
        assert rec["errors"] == pytest.approx(b.layers[name]["errors"], rel=1e-9)
    assert a.kl_scale.keys() == b.kl_scale.keys()
    for role, scale in a.kl_scale.items():
        assert scale == pytest.approx(b.kl_scale[role], rel=1e-6)
    assert a.kl_layer.keys() == b.kl_layer.keys()
    assert all(f == pytest.approx(b.kl_layer[n], rel=1e-6) for n, f in a.kl_layer.items())


@pytest.mark.parametrize(
    "added",
    [
        [IntFormat(3, 32, scale_dtype="bfloat16"), IntFormat(2, 32, True)],  # the probes keep their candidates
        [IntFormat(3, 128)],  # a wider 3-bit group: the probes change candidate and run again
        [IntFormat(4, 32)],  # a new width: probed again
    ],
)
def test_a_file_is_extended_by_candidates_added_to_its_end_as_one_pass_over_all_would_measure_them(
    tmp_path, monkeypatch, added
):
    """Adding candidates measures only the new ones (the old ones are never solved again), and the
    file then holds what a fresh pass over every candidate does, the KL calibration included."""
    model = make_tiny_model("llama")
    path = tmp_path / "m.json"
    lowbit.quantize(copy.deepcopy(model), budget_bpw=3.5, weighting="kl", measurements=path, **KW)
    more = {**KW, "candidates": CANDIDATES + added}
    measured = []  # the candidates of each measurement pass (the layer probe's own solves are apart)
    sensitivity = importlib.import_module("lowbit.allocate.sensitivity")
    real = sensitivity.measure

    def recorded(model, adapter, layers, candidates, *args, **kwargs):
        measured.append(candidates)
        return real(model, adapter, layers, candidates, *args, **kwargs)

    monkeypatch.setattr(sensitivity, "measure", recorded)
    q = lowbit.quantize(copy.deepcopy(model), budget_bpw=3.5, weighting="kl", measurements=path, **more)
    assert measured == [added]
    assert not q.lowbit_info.settings["budget"]["measurements_reused"]
    monkeypatch.undo()
    lowbit.quantize(copy.deepcopy(model), budget_bpw=3.5, weighting="kl", measurements=tmp_path / "all.json", **more)
    _same_file(Measurements.load(path), Measurements.load(tmp_path / "all.json"))


def test_a_file_whose_candidates_are_not_the_start_of_the_new_list_is_refused(tmp_path):
    model = make_tiny_model("llama")
    path = tmp_path / "m.json"
    lowbit.quantize(copy.deepcopy(model), budget_bpw=3.5, measurements=path, **KW)
    reordered = {**KW, "candidates": [IntFormat(4, 32), *CANDIDATES]}
    with pytest.raises(LowbitError, match="cover other candidate formats.*add to its end"):
        lowbit.quantize(copy.deepcopy(model), budget_bpw=3.5, measurements=path, **reordered)
