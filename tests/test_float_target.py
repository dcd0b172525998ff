"""Float targets: the solver's target is the least-squares map from the quantized stream's inputs
to the float model's outputs; it is the weight itself where the streams agree; the float stream
survives resume; refusals in one line."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
from conftest import kl_judge, make_tiny_model
from safetensors.torch import load_file

import lowbit
from lowbit.activations import Activations
from lowbit.cli import main
from lowbit.errors import BudgetError
from lowbit.formats import IntFormat
from lowbit.recipe import GPTQSettings
from lowbit.solvers.float_target import float_target
from lowbit.walker import CrossAccumulator, FloatInputs

WINDOWS = torch.randint(2, 256, (16, 64), generator=torch.Generator().manual_seed(0))
HELD_OUT = torch.randint(2, 256, (8, 64), generator=torch.Generator().manual_seed(5))
FLOAT_TARGET = GPTQSettings(batch_size=4, float_target=True, float_target_damp=0.01)  # what pays on the tiny model


def _quantize(model, **kw):
    kw = {"bits": 2, "group_size": 32, "calib": WINDOWS, "progress": False, "gptq": FLOAT_TARGET, **kw}
    return lowbit.quantize(model, **kw)


def _streams(seed: int = 0, batches: int = 3, tokens: int = 40, width: int = 12):
    gen = torch.Generator().manual_seed(seed)
    xs = [torch.randn(2, tokens, width, generator=gen) for _ in range(batches)]
    xq = [x + 0.3 * torch.randn(x.shape, generator=gen) for x in xs]
    return xs, xq


def _accumulate(xs, xq) -> CrossAccumulator:
    store = Activations(torch.device("cpu"))
    kept = FloatInputs(store)
    for x in xs:
        kept.update(x)
    acc = CrossAccumulator(kept.inputs, store=store)
    for x in xq:
        acc.update(x)
    return acc


def test_the_cross_term_is_the_sum_over_batches_and_zero_when_the_streams_agree():
    xs, xq = _streams()
    acc = _accumulate(xs, xq)
    a, b = torch.cat([x.reshape(-1, 12) for x in xq]), torch.cat([x.reshape(-1, 12) for x in xs])
    n = a.shape[0]
    torch.testing.assert_close(acc.cross_term(), 2 * a.t() @ (b - a) / n, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(acc.hessian(), 2 * a.t() @ a / n, rtol=1e-5, atol=1e-5)
    same = _accumulate(xq, xq)
    assert torch.count_nonzero(same.cross_term()) == 0
    w = torch.randn(5, 12, generator=torch.Generator().manual_seed(1))
    assert torch.equal(float_target(w, same.hessian(), same.cross_term(), 0.01), w)


def test_the_target_is_the_least_squares_map_to_the_float_outputs():
    """Undamped, W* solves min ||X Wᵀ - X̃ W*ᵀ||: it matches lstsq and beats W itself on that error."""
    xs, xq = _streams(seed=3)
    acc = _accumulate(xs, xq)
    w = torch.randn(7, 12, generator=torch.Generator().manual_seed(4), dtype=torch.float64).float()
    target = float_target(w, acc.hessian(), acc.cross_term(), 0.0)
    x = torch.cat([t.reshape(-1, 12) for t in xs]).double()
    xt = torch.cat([t.reshape(-1, 12) for t in xq]).double()
    best = torch.linalg.lstsq(xt, x @ w.double().t()).solution.t()
    torch.testing.assert_close(target.double(), best, rtol=1e-4, atol=1e-4)

    def err(q):
        return (x @ w.double().t() - xt @ q.double().t()).square().sum().item()

    assert err(target) < 0.9 * err(w)


def test_float_targets_lower_the_kl_on_held_out_windows_and_start_at_the_weight():
    """A 4-block tiny Llama at 2 bits: solving toward the float outputs lowers the KL divergence to the
    float model on windows not calibrated on. Block 0's q/k/v read the same embedding on both streams,
    so their target is their weight (shift 0); later blocks' targets move."""
    base = make_tiny_model("llama", layers=4)
    kld = kl_judge(base, HELD_OUT)
    plain = _quantize(copy.deepcopy(base), gptq=GPTQSettings(batch_size=4))
    targeted = _quantize(copy.deepcopy(base))
    assert kld(targeted) < 0.95 * kld(plain)
    layers = targeted.lowbit_info.layers
    assert layers["model.layers.0.self_attn.q_proj"]["float_target_shift"] == 0.0
    assert layers["model.layers.3.self_attn.q_proj"]["float_target_shift"] > 1e-4
    assert layers["model.layers.0.mlp.down_proj"]["float_target_shift"] > 0.0
    assert "float_target_shift" not in plain.lowbit_info.layers["model.layers.3.self_attn.q_proj"]
    assert targeted.lowbit_info.settings["gptq"]["float_target"] is True


def _packing_tables(base) -> dict:
    """Options of a size budget just below what fits with float tables: both tables are packed."""
    kw = {"calib": WINDOWS, "gptq": FLOAT_TARGET, "candidates": [IntFormat(b, 32) for b in (2, 3, 4)]}
    kw["progress"] = False
    with pytest.raises(BudgetError, match=r"use --size ([0-9.]+)MB") as err:
        lowbit.quantize(copy.deepcopy(base), size_bytes=1000, keep="lm_head,model.embed_tokens", **kw)
    with_float_tables = int(float(re.search(r"--size ([0-9.]+)MB", str(err.value)).group(1)) * 1e6)
    return {**kw, "size_bytes": with_float_tables - 12_000}


def test_with_rounded_tables_the_float_stream_starts_at_the_float_embedding():
    """A size budget that packs the embedding: block 0's inputs differ between the streams, so
    block 0's q/k/v are moved to undo the table's rounding (their shift is 0 when the table is
    kept in float, as the test above checks)."""
    base = make_tiny_model("llama", layers=2)
    q = lowbit.quantize(copy.deepcopy(base), **_packing_tables(base))
    assert q.lowbit_info.settings["budget"]["tables"]["model.embed_tokens"] is not None
    assert q.lowbit_info.layers["model.layers.0.self_attn.q_proj"]["float_target_shift"] > 1e-4


@pytest.mark.parametrize("tables", ["float", "packed"])
def test_a_float_target_run_interrupted_resumes_to_the_same_weights(tmp_path, tables):
    """The float stream is saved with each block's inputs: a resumed run targets the same outputs
    (with packed tables too, where the stream started at the float table's outputs)."""

    class Crash(Exception):
        pass

    def crash_after_1(i: int) -> None:
        if i == 1:
            raise Crash

    base = make_tiny_model("qwen2", layers=4)
    if tables == "packed":
        kw = _packing_tables(base)

        def run(model, **more):
            return lowbit.quantize(model, **kw, **more)
    else:
        run = _quantize
    full = run(copy.deepcopy(base))
    with pytest.raises(Crash):
        run(copy.deepcopy(base), checkpoint_dir=tmp_path, on_block_done=crash_after_1)
    assert json.loads((tmp_path / "execute" / "state.json").read_text())["blocks_done"] == 2
    saved = load_file(tmp_path / "execute" / "inputs_2.safetensors")
    assert {k for k in saved if k.startswith("carried_")} == {f"carried_{b}" for b in range(4)}
    assert not torch.equal(saved["carried_0"], saved["batch_0"])  # the float stream, not a copy of the other
    resumed = run(copy.deepcopy(base), checkpoint_dir=tmp_path, resume=True)
    assert resumed.lowbit_info.stats["pipeline"]["resumed_blocks"] == 2
    a, b = full.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    if tables == "packed":
        assert full.lowbit_info.settings["budget"]["tables"]["model.embed_tokens"] is not None


def test_the_cli_refuses_float_targets_with_round_to_nearest(capsys, tiny_model_dir, tmp_path):
    out = tmp_path / "o"
    args = ["quantize", str(tiny_model_dir), "--bits", "4", "--method", "rtn", "--float-target", "--out", str(out)]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "--float-target" in err and "rtn" in err and not out.exists()


def test_the_cli_refuses_a_float_target_damping_without_float_targets(capsys, tiny_model_dir, tmp_path):
    out = tmp_path / "o"
    args = ["quantize", str(tiny_model_dir), "--bits", "4", "--float-target-damp", "0.1", "--out", str(out)]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "--float-target-damp" in err and "add --float-target" in err and not out.exists()


@pytest.mark.parametrize("damp", [-0.1, float("nan"), 11.0])
def test_a_nonsense_float_target_damping_is_refused(damp):
    with pytest.raises(lowbit.LowbitError, match="float target's damping"):
        GPTQSettings(float_target=True, float_target_damp=damp)


def test_a_larger_target_damping_keeps_the_target_nearer_the_weight():
    xs, xq = _streams(seed=6)
    acc = _accumulate(xs, xq)
    w = torch.randn(7, 12, generator=torch.Generator().manual_seed(7))
    moved = [(float_target(w, acc.hessian(), acc.cross_term(), d) - w).norm().item() for d in (0.01, 0.1, 1.0)]
    assert moved[0] > moved[1] > moved[2] > 0


def test_inspect_names_float_targets(capsys, tiny_model_dir, text_file, tmp_path):
    out = tmp_path / "o"
    args = ["quantize", str(tiny_model_dir), "--bits", "4", "--group-size", "32", "--float-target", "--nsamples", "4"]
    assert main([*args, "--calib-seqlen", "32", "--calib", str(text_file), "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    assert "float targets" in capsys.readouterr().out
