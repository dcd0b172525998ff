"""The measurement pass: costs, errors, persistence and refusal of foreign measurements."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_tiny_model

import lowbit
from lowbit.allocate.sensitivity import MeasurementMismatchError, Measurements, StoredProbeBank, measure
from lowbit.digests import model_digest, windows_digest
from lowbit.errors import LowbitError
from lowbit.formats import IntFormat
from lowbit.models.adapters import get_adapter, quantizable_linears
from lowbit.recipe import GPTQSettings

WINDOWS = torch.randint(2, 256, (8, 64), generator=torch.Generator().manual_seed(0))
CANDIDATES = [IntFormat(2, 32), IntFormat(4, 32), IntFormat(8, 32)]
SETTINGS = GPTQSettings(batch_size=4, act_order=False)


def _measure(model):
    adapter = get_adapter(model.config.model_type)
    names = [n for n, _ in quantizable_linears(model, adapter)]
    return measure(model, adapter, names, CANDIDATES, WINDOWS, SETTINGS, progress=False), names


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_measurement_covers_every_layer_and_candidate(arch):
    model = make_tiny_model(arch)
    before = copy.deepcopy(model.state_dict())
    m, names = _measure(model)
    assert list(m.layers) == names
    for rec in m.layers.values():
        out, n = rec["shape"]
        assert rec["costs"] == [f.storage_bits(out, n) for f in CANDIDATES]
        e2, e4, e8 = rec["errors"]
        assert e2 > e4 > e8 >= 0 and e2 < rec["base"]  # more bits, less error; 2-bit still beats zeroing
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # measuring changes nothing


def test_first_block_errors_equal_the_pipeline_on_float_inputs():
    """Block 0 sees float inputs in both: the measured 4-bit error is the pipeline's."""
    model = make_tiny_model("llama")
    m, _ = _measure(copy.deepcopy(model))
    settings = GPTQSettings(batch_size=4, act_order=False, true_sequential=False)
    q = lowbit.quantize(
        model, bits=4, group_size=32, calib=WINDOWS, gptq=settings, storage_dtype="float32", progress=False
    )
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"):
        rec = m.layers[name]
        assert rec["errors"][1] / rec["base"] == pytest.approx(q.lowbit_info.layers[name]["output_error"], rel=1e-4)


def test_measurements_round_trip_and_refuse_other_inputs(tmp_path):
    model = make_tiny_model("llama")
    m, _ = _measure(model)
    path = tmp_path / "m.json"
    m.save(path)
    again = Measurements.load(path)
    assert again.layers == m.layers
    cands = [f.to_dict() for f in CANDIDATES]
    again.check_matches(model_digest(model), windows_digest(WINDOWS), cands)
    with pytest.raises(MeasurementMismatchError, match="another model"):
        again.check_matches(model_digest(make_tiny_model("llama", seed=1)), windows_digest(WINDOWS), cands)
    with pytest.raises(MeasurementMismatchError, match="another calibration set"):
        again.check_matches(model_digest(model), windows_digest(WINDOWS[:4]), cands)
    with pytest.raises(MeasurementMismatchError, match="other candidate formats"):
        again.check_matches(model_digest(model), windows_digest(WINDOWS), cands[:2])


class _Crash(Exception):
    pass


@pytest.mark.parametrize(("keep_weights", "keep_probe"), [(False, False), (True, False), (False, True)])
def test_a_resumed_measurement_pass_writes_the_same_file(tmp_path, keep_weights, keep_probe):
    model = make_tiny_model("llama", layers=4)
    adapter = get_adapter("llama")
    names = [n for n, _ in quantizable_linears(model, adapter)]
    args = (model, adapter, names, CANDIDATES, WINDOWS, SETTINGS)
    kept = {"keep_weights": keep_weights, "keep_probe": keep_probe}
    full = measure(*args, progress=False, **kept)
    full.save(tmp_path / "full.json")

    def crash_after_1(i: int) -> None:
        if i == 1:
            raise _Crash

    ckpt = tmp_path / "ckpt"
    with pytest.raises(_Crash):
        measure(*args, progress=False, **kept, checkpoint_dir=ckpt, on_block_done=crash_after_1)
    finished = model.model.layers[1]  # (the capture runs block 0 once, to learn how it returns)
    calls = []
    handle = finished.register_forward_pre_hook(lambda *_: calls.append(1))
    resumed = measure(*args, progress=False, **kept, checkpoint_dir=ckpt, resume=True)
    handle.remove()
    assert calls == []  # the finished blocks were not run again
    resumed.save(tmp_path / "resumed.json")
    assert (tmp_path / "resumed.json").read_bytes() == (tmp_path / "full.json").read_bytes()
    if keep_weights:
        assert resumed.bank.keys() == full.bank.keys()
        assert all(torch.equal(resumed.bank[n][j], w) for n, ws in full.bank.items() for j, w in ws.items())
    if keep_probe:  # every layer's solution at its probe candidate, the restored blocks' too
        assert full.bank is None and full.probe_bank.keys() == set(names) == resumed.probe_bank.keys()
        assert isinstance(resumed.probe_bank, StoredProbeBank)  # with a checkpoint: read from it when asked
        assert all(torch.equal(resumed.probe_bank[n], w) for n, w in full.probe_bank.items())
    with pytest.raises(LowbitError, match="another model, calibration set or settings"):
        measure(*args[:3], CANDIDATES[:2], WINDOWS, SETTINGS, progress=False, checkpoint_dir=ckpt, resume=True)
