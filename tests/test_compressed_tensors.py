"""compressed-tensors export: the target's rules, the bytes, and transformers + compressed-tensors
loading what lowbit solved."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import warnings

import pytest
import torch
from conftest import make_tiny_model

import lowbit
from lowbit.errors import ArtifactError, FormatError, LowbitError, ModelLoadError
from lowbit.formats import IntFormat
from lowbit.layers import quantized_layers
from lowbit.recipe import GPTQSettings, Recipe

ct = pytest.importorskip("compressed_tensors", reason="the oracle: pip install compressed-tensors (Python >= 3.11)")
WINDOWS = torch.randint(2, 256, (8, 32), generator=torch.Generator().manual_seed(0))
QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")


def _quantize(model, **kw):
    options = {"calib": WINDOWS, "gptq": GPTQSettings(batch_size=4), "progress": False, "target": "compressed-tensors"}
    return lowbit.quantize(copy.deepcopy(model), **{**options, **kw})


def _export(q, folder, name="ct"):
    from lowbit.export.compressed_tensors import export_compressed_tensors

    lowbit.save(q, folder / f"{name}-art")
    return export_compressed_tensors(folder / f"{name}-art", folder / name)


def _load(path, dequantize: bool):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging
    from transformers.utils.quantization_config import CompressedTensorsConfig

    logging.set_verbosity_error()
    config = CompressedTensorsConfig(dequantize=dequantize)
    with warnings.catch_warnings():  # "the checkpoint has a quantization_config; dequantize is taken from yours"
        warnings.simplefilter("ignore", UserWarning)
        return AutoModelForCausalLM.from_pretrained(path, quantization_config=config, dtype=torch.float32).eval()


def test_the_target_holds_integer_grids_whose_groups_divide_the_rows():
    r = Recipe.build(bits=4, target="compressed-tensors")
    assert r.format == IntFormat(4, 128, symmetric=True)  # llm-compressor's W4A16 grid
    assert Recipe.build(bits=3, group_size=64, symmetric=False, target="compressed-tensors").format.name == (
        "int3-g64-asym"
    )
    budget = Recipe.build(budget_bpw=4.25, target="compressed-tensors").budget
    assert {f.group_size for f in budget.candidates} == {32, 64, 128}
    assert all(f.symmetric and type(f) is IntFormat for f in budget.candidates)
    with pytest.raises(
        FormatError,
        match=r"the format \(--bits or --format, --group-size, --sym\): iq4nl-g32 cannot be written to "
        r"compressed-tensors; the nearest format it holds is int4-g32-sym",
    ):
        Recipe.build(format="iq4_nl", target="compressed-tensors")
    with pytest.raises(LowbitError, match=r"stores scales in the model's dtype, the storage dtype \(float16\); "):
        Recipe.build(bits=4, target="compressed-tensors", scale_dtype="bfloat16")
    assert Recipe.build(bits=4, target="compressed-tensors", scale_dtype="bfloat16", storage_dtype="bfloat16")
    model = make_tiny_model("llama")  # rows of 64 (attention, gate/up) and 96 (down_proj)
    with pytest.raises(
        FormatError,
        match=r"q_proj has rows of 64 weights, not a multiple of 128 \(the block of int4-g128-sym\); use "
        r"int4-g64-sym, int4-g32-sym, int4-gch-sym for it",
    ):
        lowbit.quantize(copy.deepcopy(model), bits=4, method="rtn", target="compressed-tensors", progress=False)


def test_fused_layers_get_one_format_in_every_plan_and_pins_must_agree():
    """vLLM fuses q/k/v and gate/up: a budget plans each such group as one item, and keep rules
    that pin part of a group are refused before anything runs."""
    model = make_tiny_model("llama")
    with pytest.raises(FormatError, match=r"needs q_proj, k_proj, v_proj of block 0 in one format \(vLLM fuses"):
        _quantize(model, bits=4, group_size=32, keep="*.0.self_attn.q_proj=int8-g32-sym")
    q = _quantize(model, budget_bpw=4.6, candidates=[IntFormat(b, 32, True) for b in (3, 4, 5, 8)])
    formats = {n: json.dumps(rec["format"], sort_keys=True) for n, rec in q.lowbit_info.layers.items()}
    for block in (0, 1):
        for group in (QKV, ("mlp.gate_proj", "mlp.up_proj")):
            assert len({str(formats[f"model.layers.{block}.{n}"]) for n in group}) == 1
    assert len({str(v) for v in formats.values()}) > 1  # a mixed plan, not a uniform one


def test_packed_weights_are_lowbit_bytes_and_transformers_loads_the_solved_weights(tmp_path):
    """weight_packed is lowbit's qweight byte for byte; compressed-tensors unpacks it (and the zero
    points, packed along the output dimension) to lowbit's codes less 2^(b-1). transformers'
    dequantizing loader rebuilds every weight exactly as lowbit's rounded to the model dtype
    (float16 or bfloat16: it multiplies in that dtype), and the logits agree within that rounding."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from safetensors.torch import load_file

    model = make_tiny_model("llama")
    for name, kw in {
        "asym": {"bits": 4, "group_size": 32, "symmetric": False},
        "sym8": {"bits": 8, "group_size": 32, "symmetric": True},
        "channel": {"bits": 4, "group_size": "channel", "symmetric": True},
        "bfloat16": {"bits": 4, "group_size": 32, "symmetric": True, "scale_dtype": "bfloat16"},
    }.items():
        dtype = getattr(torch, kw.get("scale_dtype", "float16"))
        if "scale_dtype" in kw:
            kw = {**kw, "storage_dtype": kw["scale_dtype"]}
        q = _quantize(model, **{**kw, "group_size": None if kw["group_size"] == "channel" else kw["group_size"]})
        out, _ = _export(q, tmp_path, name)
        config = json.loads((out / "config.json").read_text())["quantization_config"]
        assert config["quant_method"] == "compressed-tensors" and len(config["config_groups"]) == 1
        stored = load_file(str(out / "model.safetensors"))
        for layer in quantized_layers(q):
            fmt, half = layer.format, 1 << (layer.format.bits - 1)
            packed = stored[f"{layer.name}.weight_packed"]
            assert torch.equal(packed, layer.tensor.pack()["qweight"])
            codes = unpack_from_int32(packed, fmt.bits, torch.Size(layer.shape))
            assert torch.equal(codes.to(torch.int16), layer.codes.to(torch.int16) - half)
            if not fmt.symmetric:
                zp = unpack_from_int32(
                    stored[f"{layer.name}.weight_zero_point"], fmt.bits, layer.scales.shape, packed_dim=0
                )
                assert torch.equal(zp.to(torch.int16), layer.zeros.to(torch.int16) - half)
        loaded = _load(out, dequantize=True)
        for layer in quantized_layers(q):
            rounded = layer.dequantize().to(dtype).float()
            assert torch.equal(loaded.get_submodule(layer.name).weight, rounded), layer.name
        with torch.no_grad():
            a, b = loaded(WINDOWS[:2]).logits, q(WINDOWS[:2]).logits
        # weights rounded to float16: measured 1.3-1.7e-3 / 2.4; to bfloat16 (3 mantissa bits fewer): 1.1e-2 / 2.3
        assert (a - b).abs().max() < (1e-3 if dtype == torch.float16 else 1e-2) * b.abs().max(), name


def test_a_mixed_symmetric_plan_loads_in_transformers_with_lowbits_exact_logits(tmp_path):
    """A plan with several formats: one config group each, targets by regex. transformers' compressed
    path (dequantize=False) matches every layer to its group and computes lowbit's logits exactly
    (float32 model; measured max difference 0). Its dequantizing path (dequantize=True) reads
    every layer with the first group's scheme in transformers 5.24, so it must fail rather than
    load something else."""
    model = make_tiny_model("llama")
    q = _quantize(model, bits=4, group_size=32, keep="*.1.mlp.down_proj=int3-g32-sym,*.0.self_attn.o_proj=int8-g64-sym")
    out, notes = _export(q, tmp_path)
    groups = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]
    assert sorted(g["weights"]["num_bits"] for g in groups.values()) == [3, 4, 8]
    assert any("dequantize=False" in n for n in notes), notes
    loaded = _load(out, dequantize=False)
    with torch.no_grad():
        a, b = loaded(WINDOWS[:2]).logits, q(WINDOWS[:2]).logits
    assert (a - b).abs().max() <= 1e-5
    with pytest.raises(Exception):  # noqa: B017 - transformers raises RuntimeError with a report
        _load(out, dequantize=True)


def test_export_refusals_name_the_layer_and_what_would_do(tmp_path):
    from lowbit.artifact import read_manifest
    from lowbit.export.compressed_tensors import check_artifact_fits, export_compressed_tensors

    model = make_tiny_model("llama")
    rtn = lowbit.quantize(copy.deepcopy(model), format="iq4_nl", method="rtn", progress=False)
    lowbit.save(rtn, tmp_path / "gguf-art")
    with pytest.raises(
        FormatError,
        match=r"layer model\.layers\.0\.self_attn\.q_proj: iq4nl-g32 cannot be written to compressed-tensors; "
        r"the nearest format it holds is int4-g32-sym",
    ):
        export_compressed_tensors(tmp_path / "gguf-art", tmp_path / "out")
    split = lowbit.quantize(
        copy.deepcopy(model), bits=4, group_size=32, method="rtn", keep="*.0.self_attn.k_proj=int8-g32", progress=False
    )
    lowbit.save(split, tmp_path / "split-art")
    with pytest.raises(FormatError, match=r"vLLM fuses q_proj, k_proj, v_proj into one matrix .*\.k_proj: int8-g32"):
        export_compressed_tensors(tmp_path / "split-art", tmp_path / "out")
    (tmp_path / "exists").mkdir()
    q = lowbit.quantize(
        copy.deepcopy(model), bits=4, group_size=32, method="rtn", target="compressed-tensors", progress=False
    )
    lowbit.save(q, tmp_path / "ok-art")
    manifest = read_manifest(tmp_path / "ok-art")  # a size budget's packed embedding, as the manifest records it
    manifest["layers"]["model.embed_tokens"] = {**manifest["layers"]["model.layers.0.mlp.up_proj"], "kind": "embedding"}
    with pytest.raises(FormatError, match=r"layer model\.embed_tokens \(embedding\) is quantized; compressed-tensors"):
        check_artifact_fits(manifest)
    with pytest.raises(ArtifactError, match="already exists; pass --overwrite"):
        export_compressed_tensors(tmp_path / "ok-art", tmp_path / "exists")
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.partial-*"))
    export_compressed_tensors(tmp_path / "ok-art", tmp_path / "no-tokenizer")  # saved without one
    with pytest.raises(ModelLoadError, match=r"could not load the tokenizer of .*no-tokenizer \(.*\); put the source"):
        lowbit.load_model(tmp_path / "no-tokenizer")


def test_cli_quantizes_for_the_target_exports_and_lowbit_loads_the_export(tmp_path, tiny_model_dir):
    lowbit_cli = [sys.executable, "-m", "lowbit.cli"]
    art, out = tmp_path / "art", tmp_path / "out"
    run = subprocess.run(
        [*lowbit_cli, "quantize", str(tiny_model_dir), "--bits", "4", "--group-size", "32", "--method", "rtn"]
        + ["--no-sym", "--target", "compressed-tensors", "--out", str(art)],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    export = [*lowbit_cli, "export", str(art), "--to", "compressed-tensors", "--out", str(out)]
    run = subprocess.run(export, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "wrote" in run.stdout and "Marlin kernels will not run" in run.stderr  # 64-wide rows: not % 128
    assert (out / "tokenizer.json").is_file() and not (out / "lowbit_manifest.json").exists()
    # lowbit eval's loader reads a one-format file through transformers' dequantizing path, zero points included
    ours, theirs = lowbit.load_model(art).model, lowbit.load_model(out).model
    with torch.no_grad():
        a, b = theirs(WINDOWS[:2]).logits, ours(WINDOWS[:2]).logits
    assert (a - b).abs().max() < 1e-3 * b.abs().max()
    export = [*lowbit_cli, "export", str(art), "--to", "compressed-tensors", "--out", str(out)]
    run = subprocess.run(export, capture_output=True, text=True)
    assert run.returncode != 0 and "already exists" in run.stderr and "Traceback" not in run.stderr
