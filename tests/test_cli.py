"""The command line, including one test per bad input the foundation issue lists."""

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_model

from lowbit.cli import main


def run(capsys, *argv):
    capsys.readouterr()  # drop what fixtures printed
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code, err, pattern):
    import re

    assert code != 0
    # progress bars (tqdm, from model loading) may precede the error; nothing else may
    lines = [line for line in err.strip().splitlines() if line.strip() and "it/s]" not in line]
    assert len(lines) == 1, err
    assert lines[0].startswith("lowbit: error: ")
    assert re.search(pattern, lines[0]), lines[0]


def test_quantize_eval_inspect_end_to_end(capsys, tmp_path, tiny_model_dir, text_file):
    out = tmp_path / "q"
    code, stdout, _ = run(
        capsys,
        "quantize",
        tiny_model_dir,
        "--bits",
        "4",
        "--group-size",
        "32",
        "--out",
        out,
        "--eval",
        "--data",
        text_file,
        "--eval-seqlen",
        "64",
        "--calib",
        text_file,
        "--nsamples",
        "8",
        "--seqlen",
        "64",
        "--offload-activations",  # the reference's and GPTQ's activations in files beside --out
        "disk",
        "--json",
    )
    assert code == 0
    assert not (tmp_path / ".q.lowbit-resume").exists()  # nothing left beside the artifact
    summary = json.loads(stdout)
    assert summary["bits_per_weight"] == pytest.approx(4 + 2 * 20 / 64, rel=0.05)
    ev = summary["evaluation"]
    assert ev["kld"] > 0 and 0 < ev["top1_agreement"] <= 1 and ev["reference_perplexity"] > 1

    code, stdout, _ = run(capsys, "eval", out, "--data", text_file, "--seqlen", "64", "--json")
    assert code == 0
    again = json.loads(stdout)
    # the artifact's source is found and used as the reference: same numbers as at quantize time
    assert again["reference"] == str(tiny_model_dir.resolve())
    assert again["kld"] == pytest.approx(ev["kld"], rel=1e-5)
    assert again["perplexity"] == pytest.approx(ev["perplexity"], rel=1e-5)

    code, stdout, _ = run(capsys, "inspect", out, "--json")
    m = json.loads(stdout)
    assert code == 0 and m["evaluation"]["kld"] == pytest.approx(ev["kld"])
    code, stdout, _ = run(capsys, "inspect", out, "--layers")
    assert code == 0 and "model.layers.1.mlp.down_proj" in stdout and "int4-g32-asym" in stdout


def test_eval_float_model_perplexity_only(capsys, tiny_model_dir, text_file):
    code, stdout, _ = run(capsys, "eval", tiny_model_dir, "--data", text_file, "--seqlen", "64", "--json")
    res = json.loads(stdout)
    assert code == 0 and res["perplexity"] > 1 and "kld" not in res


def test_help_explains_options(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["quantize", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for option in ("--bits", "--group-size", "--sym", "--out", "--overwrite", "--clip-search", "--trust", "--fade"):
        assert option in out
    from lowbit.recipe import UPGRADE_TRUST

    assert f"(default {UPGRADE_TRUST:g};" in " ".join(out.split())  # the default the recipe applies


def test_missing_model_path(capsys, tmp_path):
    code, _, err = run(capsys, "quantize", tmp_path / "no-such-model", "--bits", "4", "--out", tmp_path / "o")
    one_line_error(code, err, "does not exist")
    assert not (tmp_path / "o").exists()


def test_directory_that_is_not_a_model(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    code, _, err = run(capsys, "quantize", tmp_path / "empty", "--bits", "4", "--out", tmp_path / "o")
    one_line_error(code, err, "not a model directory")


def test_unsupported_architecture(capsys, tmp_path, tiny_tokenizer):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "gpt_neox", vocab_size=256, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "neox")
    code, _, err = run(capsys, "quantize", tmp_path / "neox", "--bits", "4", "--out", tmp_path / "o")
    one_line_error(code, err, "'gpt_neox' is not supported; supported: .*llama.*qwen2")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(("text", "parsed"), [("4", 4), (" 3", 3), ("3.0", 3.0), ("3.25", 3.25), ("8.", 8.0)])
def test_bits_with_a_decimal_point_is_a_budget(text, parsed):
    from lowbit.cli import _bits

    bits = _bits(text)
    assert bits == parsed and type(bits) is type(parsed)  # int: uniform code width; float: bpw budget


BAD_INPUTS = [
    (["--bits", "1"], r"bits must be an integer from 2 to 8, got 1"),
    (["--bits", "9"], r"bits must be an integer from 2 to 8, got 9"),
    (["--bits", "1.5"], r"bit budget \(--bits/--bpw\) must be a number from 2 to 8, got 1\.5"),
    (["--bits", "four"], r"--bits must be a number of bits, got 'four'"),
    (["--bpw", "nan"], r"bit budget \(--bits/--bpw\) must be a number from 2 to 8, got nan"),
    (["--bpw", "9"], r"bit budget \(--bits/--bpw\) must be a number from 2 to 8, got 9\.0"),
    (["--bpw", "-1"], r"bit budget \(--bits/--bpw\) must be a number from 2 to 8, got -1\.0"),
    (["--bits", "3.25", "--bpw", "3.25"], r"give --bits or --bpw, not both"),
    (["--format", "nine"], r"unknown format 'nine' in --format; write e\.g\. 8bit, .* or a llama\.cpp type"),
    (["--format", "q4_0", "--bits", "4"], r"give --format or --bits/--bpw/--size, not both"),
    (["--format", "int4-g128", "--target", "gguf"], r"--sym\): int4-g128-sym cannot be written to gguf; the nearest"),
    (["--bits", "4", "--damp", "nan"], r"damping \(--damp\) must be a number from 0 to 1, got nan; e\.g\. --damp"),
    (["--bits", "4", "--damp", "-1"], r"damping \(--damp\) must be a number from 0 to 1, got -1\.0"),
    (["--bits", "4", "--eval-seqlen", "0"], r"--eval-seqlen must be a positive whole number, got 0"),
    (["--bits", "4", "--batch-size", "0"], r"--eval-batch-size must be a positive whole number, got 0"),
    (["--bits", "4", "--nsamples", "0"], r"calibration windows \(--nsamples\) must be a positive whole number"),
    (["--bits", "4", "--calib-seqlen", "-5"], r"window length \(--calib-seqlen\) must be a positive whole number"),
    (["--bits", "4", "--calib-batch-size", "0"], r"--calib-batch-size\) must be a positive whole number, got 0"),
    (["--bits", "3.5", "--refine", "-5"], r"refinement time \(--refine, seconds\) must be a number from 0"),
    (["--bits", "3.5", "--refine-windows", "0"], r"--refine-windows\) must be a positive whole number"),
    (["--size", "0MB"], r"--size must be positive, got '0MB'"),
    (["--size", "abc"], r"--size must be a byte count with an optional unit"),
    (["--bits", "3.5", "--method", "rtn"], r"a budget needs --method gptq"),
    (["--bits", "4", "--storage-dtype", "float8"], r"storage dtype \(--storage-dtype\) 'float8' is not supported"),
    (["--bits", "4", "--scale-dtype", "int8"], r"scale dtype 'int8' is not supported"),
    (["--bits", "3.5", "--allocator", "greedy"], r"unknown allocator 'greedy'; use one of upgrade, knapsack, baq"),
    (["--bits", "3.5", "--weighting", "depth"], r"unknown error weighting 'depth'"),
    (["--bits", "3.5", "--trust", "0.5"], r"the upgrade allocator's trust \(--trust\) must be a number from 1 to 100"),
    (["--bits", "3.5", "--trust", "nan"], r"the upgrade allocator's trust \(--trust\) must be a number from 1 to 100"),
    (["--bits", "4", "--nsamples", "many"], r"argument --nsamples: invalid int value: 'many'; see lowbit quantize"),
]


@pytest.mark.parametrize(("options", "pattern"), BAD_INPUTS, ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_bad_quantize_options_are_refused_in_one_line_before_the_model_is_read(capsys, tmp_path, options, pattern):
    """The model path does not exist: each refusal comes from checking the options first."""
    code, _, err = run(capsys, "quantize", tmp_path / "no-such-model", *options, "--out", tmp_path / "o")
    one_line_error(code, err, pattern)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("options", [["--seqlen", "0"], ["--eval-seqlen", "0"], ["--batch-size", "-2"]])
def test_bad_eval_options_are_refused_before_the_model_is_read(capsys, tmp_path, options):
    code, _, err = run(capsys, "eval", tmp_path / "no-such-model", *options)
    one_line_error(code, err, r"--eval-(seqlen|batch-size) must be a positive whole number")


def test_bpw_and_bits_with_a_decimal_point_are_one_budget_and_seqlen_spellings_agree():
    from lowbit.cli import build_parser, recipe_from_args
    from lowbit.recipe import UPGRADE_FADE, UPGRADE_TRUST

    def recipe(*argv):
        return recipe_from_args(build_parser().parse_args(["quantize", "m", "--out", "o", *argv]))

    a, b = recipe("--bits", "3.25"), recipe("--bpw", "3.25")
    assert a.budget == b.budget and a.budget.bpw == 3.25 and a.format is None is b.format
    assert recipe("--bpw", "4").budget.bpw == 4.0  # --bpw is always a budget
    assert recipe("--bits", "3.5", "--trust", "1.4").budget.trust == 1.4
    assert recipe("--bits", "3.5").budget.trust == UPGRADE_TRUST
    assert recipe("--bits", "3.5", "--fade").budget.fade is True
    assert recipe("--bits", "3.5", "--no-fade").budget.fade is False
    assert recipe("--bits", "3.5").budget.fade is UPGRADE_FADE
    assert recipe("--bits", "4").format.bits == 4 and recipe("--bits", "4").budget is None
    old, new = recipe("--bits", "4", "--seqlen", "256"), recipe("--bits", "4", "--calib-seqlen", "256")
    assert old.calibration.seqlen == new.calibration.seqlen == 256


def test_candidates_name_a_budgets_formats(capsys, tmp_path, tiny_model_dir):
    """--candidates replaces the default candidates (llama.cpp names or lowbit's), in the order
    given, duplicates once; without a budget, empty, or unknown, it is refused on one line."""
    from lowbit.cli import build_parser, recipe_from_args
    from lowbit.formats import IntFormat

    def recipe(*argv):
        return recipe_from_args(build_parser().parse_args(["quantize", "m", "--out", "o", *argv]))

    r = recipe("--target", "gguf", "--size", "90MB", "--candidates", "q4_0, q6_k,q8_0,q4_0")
    assert [f.name for f in r.budget.candidates] == ["int4-g32-sym", "q6_k", "int8-g32-sym"]
    r = recipe("--bits", "3.5", "--candidates", "int3-g64,int4")
    assert r.budget.candidates == (IntFormat(3, 64), IntFormat(4, 128))
    for argv, message in [
        (["--bits", "4", "--candidates", "q4_0"], "--candidates are what a budget chooses from"),
        (["--bits", "3.5", "--candidates", " , "], "--candidates names no format"),
        (["--bits", "3.5", "--candidates", "int4,q9_9"], "unknown format 'q9_9' in --candidates"),
    ]:
        code, _, err = run(capsys, "quantize", tiny_model_dir, "--out", tmp_path / "o", *argv)
        one_line_error(code, err, message)


@pytest.mark.parametrize("gs", ["0", "-3", "abc", "1.5"])
def test_bad_group_size(capsys, tmp_path, tiny_model_dir, gs):
    code, _, err = run(capsys, "quantize", tiny_model_dir, "--bits", "4", "--group-size", gs, "--out", tmp_path / "o")
    one_line_error(code, err, "--group-size must be a positive integer")


def test_missing_data_set(capsys, tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("LOWBIT_DATA_DIR", str(tmp_path / "nowhere"))
    code, _, err = run(capsys, "quantize", tiny_model_dir, "--bits", "4", "--out", tmp_path / "o", "--eval")
    one_line_error(code, err, "LOWBIT_DATA_DIR=.*not a directory")
    assert not (tmp_path / "o").exists()
    monkeypatch.setenv("LOWBIT_DATA_DIR", str(tmp_path))
    code, _, err = run(capsys, "eval", tiny_model_dir)
    one_line_error(code, err, "data set 'wikitext2' not found")


def test_evaluation_text_shorter_than_a_window(capsys, tmp_path, tiny_model_dir):
    short = tmp_path / "short.txt"
    short.write_text("too short")
    code, _, err = run(capsys, "eval", tiny_model_dir, "--data", short)
    one_line_error(code, err, "fewer than one window of 512")


def test_corrupt_artifact(capsys, tmp_path, tiny_model_dir):
    out = tmp_path / "q"
    assert run(capsys, "quantize", tiny_model_dir, "--bits", "3", "--out", out, "--method", "rtn")[0] == 0
    weights = out / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    code, _, err = run(capsys, "eval", out, "--no-reference")
    one_line_error(code, err, "corrupt or truncated \\(checksum mismatch\\)")


def test_existing_output_directory(capsys, tmp_path, tiny_model_dir):
    out = tmp_path / "q"
    out.mkdir()
    code, _, err = run(capsys, "quantize", tiny_model_dir, "--bits", "4", "--out", out, "--method", "rtn")
    one_line_error(code, err, "already exists; pass --overwrite")
    code, stdout, _ = run(
        capsys, "quantize", tiny_model_dir, "--bits", "4", "--out", out, "--overwrite", "--method", "rtn"
    )
    assert code == 0 and "wrote" in stdout and (out / "lowbit_manifest.json").is_file()


def test_nan_weight(capsys, tmp_path, tiny_tokenizer):
    model = make_tiny_model("qwen2")
    with torch.no_grad():
        model.model.layers[0].self_attn.k_proj.weight[0, 0] = float("nan")
    model.save_pretrained(tmp_path / "m")
    code, _, err = run(capsys, "quantize", tmp_path / "m", "--bits", "4", "--out", tmp_path / "o")
    one_line_error(code, err, r"model\.layers\.0\.self_attn\.k_proj\.weight contains NaN or Inf")
    assert not (tmp_path / "o").exists()


def test_hub_id_that_cannot_be_reached_fails_in_one_line(tmp_path):
    """Through the installed entry point, offline: the hub path reports what went wrong."""
    import os
    import shutil
    import subprocess
    import sys

    exe = shutil.which("lowbit") or str(Path(sys.executable).with_name("lowbit"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    proc = subprocess.run([exe, "eval", "someorg/no-such-model"], capture_output=True, text=True, env=env)
    one_line_error(
        proc.returncode, proc.stderr, "could not load model 'someorg/no-such-model' from the Hugging Face hub"
    )


def test_budget_from_the_command_line(capsys, tmp_path, tiny_model_dir, text_file):
    common = ["quantize", tiny_model_dir, "--calib", text_file, "--nsamples", "8", "--seqlen", "64"]
    code, _, err = run(capsys, *common, "--bits", "2.1", "--out", tmp_path / "o")
    one_line_error(code, err, r"below the cheapest plan the candidates allow \(2\.\d+ bpw\); use --bits")
    assert not (tmp_path / "o").exists()

    meas = tmp_path / "m.json"
    code, stdout, _ = run(capsys, *common, "--bits", "3.5", "--measurements", meas, "--out", tmp_path / "q")
    assert code == 0 and "budget 3.5 bpw (upgrade): achieved 3." in stdout and meas.is_file()
    achieved = json.loads((tmp_path / "q" / "lowbit_manifest.json").read_text())["bits_per_weight"]
    assert achieved <= 3.5
    code, stdout, _ = run(capsys, "inspect", tmp_path / "q")
    assert code == 0 and "mixed" in stdout and "plan         budget 3.5 bpw" in stdout


def test_size_budget_from_the_command_line(capsys, tmp_path, tiny_model_dir, text_file):
    common = ["quantize", tiny_model_dir, "--calib", text_file, "--nsamples", "8", "--seqlen", "64"]
    code, _, err = run(capsys, *common, "--size", "10KB", "--out", tmp_path / "o")
    one_line_error(code, err, r"a size of 0\.01 MB is below the smallest weights file .*; use --size [0-9.]+MB")
    assert not (tmp_path / "o").exists()
    code, _, err = run(capsys, *common, "--size", "lots", "--out", tmp_path / "o")
    one_line_error(code, err, r"--size must be a byte count")
    code, _, err = run(capsys, *common, "--size", "1MB", "--bits", "3.5", "--out", tmp_path / "o")
    one_line_error(code, err, r"not both")
    code, _, err = run(capsys, *common, "--size", "10KB", "--out", tmp_path / "o")
    smallest = re.search(r"use --size ([0-9.]+MB)", err).group(1)
    code, stdout, _ = run(capsys, *common, "--size", smallest, "--out", tmp_path / "o")
    assert code == 0 and re.search(r"embedding/head: \S+ (int\d-g\d+-asym|nf\d-g\d+)", stdout)  # packed
    code, stdout, _ = run(capsys, "inspect", tmp_path / "o")
    assert code == 0 and "embedding/head:" in stdout


def test_a_budget_run_interrupted_while_measuring_resumes_to_the_same_files(
    capsys, tmp_path, tiny_model_dir, text_file, monkeypatch
):
    from lowbit.job import resume_dir
    from lowbit.walker import Checkpoint

    common = ["quantize", tiny_model_dir, "--bits", "3.5", "--calib", text_file, "--nsamples", "4", "--seqlen", "32"]
    common += ["--calib-batch-size", "2"]
    assert run(capsys, *common, "--measurements", tmp_path / "m-ref.json", "--out", tmp_path / "ref")[0] == 0

    real = Checkpoint.save

    def interrupted(self, index, *args, **kw):
        real(self, index, *args, **kw)
        if self.path.name == "measure" and index == 0:
            raise KeyboardInterrupt

    monkeypatch.setattr(Checkpoint, "save", interrupted)
    out, meas = tmp_path / "q", tmp_path / "m.json"
    code, _, err = run(capsys, *common, "--measurements", meas, "--out", out)
    assert code == 130 and "rerun with --resume" in err and not out.exists() and not meas.exists()
    assert (resume_dir(out) / "measure" / "state.json").is_file()
    monkeypatch.setattr(Checkpoint, "save", real)
    assert run(capsys, *common, "--measurements", meas, "--out", out, "--resume")[0] == 0
    assert meas.read_bytes() == (tmp_path / "m-ref.json").read_bytes()
    assert (out / "model.safetensors").read_bytes() == (tmp_path / "ref" / "model.safetensors").read_bytes()
    assert not resume_dir(out).exists()
