"""lowbit's GPTQ side by side with llm-compressor, GPTQModel and auto-round on smollm2-135m, in one run.

Every tool gets the same float model (the GGUF dequantized and saved as a plain Hugging Face
directory), the same calibration windows (protocol.md: 128 x 512 tokens of C4, seed 0), the
same bits, group size, symmetry, damping and act-order setting. Each runs in its own Python
environment under /usr/bin/time -v and writes its dequantized weights; this script then
evaluates all of them with the same code, windows and reference (quick protocol).

Peer environments (never lowbit's own install; see BENCHMARKS.md for how they were made):
    --llmcompressor-python  a venv with torch==2.13.0 and llmcompressor==0.14.0.1
    --gptqmodel-python      a venv with torch==2.14.1 and gptqmodel==7.7.0
    --autoround-python      a venv with torch==2.13.0 and auto-round==0.16.1

    LOWBIT_DATA_DIR=../shared/data .venv/bin/python benchmarks/peers_gptq.py \
        --llmcompressor-python ../peers/lc/bin/python --autoround-python ../peers/ar/bin/python
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).parent))
from foundation import MODEL, timed  # noqa: E402

import lowbit  # noqa: E402
from lowbit.data import calibration_data  # noqa: E402
from lowbit.eval import evaluate_windows, protocol_windows  # noqa: E402
from lowbit.eval.reference import cached_reference  # noqa: E402
from lowbit.formats import IntFormat  # noqa: E402

PEERS = Path(__file__).parent / "peers"
RESULTS = Path(__file__).parent / "results" / "peers_gptq.json"


def export_float(work: Path, nsamples: int) -> tuple[Path, Path]:
    """The reference model as a plain HF directory, and the calibration windows."""
    loaded = lowbit.load_model(MODEL)
    config = loaded.model.config
    if hasattr(config, "quantization_config"):  # GGUF provenance; the weights are plain floats
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.model.state_dict())
    model_dir = work / "float"
    plain.save_pretrained(model_dir)
    loaded.tokenizer.save_pretrained(model_dir)
    windows = calibration_data(loaded.tokenizer, "c4", nsamples, 512)
    save_file({"windows": windows.contiguous()}, str(work / "windows.safetensors"))
    return model_dir, work / "windows.safetensors"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--llmcompressor-python")
    ap.add_argument("--gptqmodel-python")
    ap.add_argument("--autoround-python")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--asym", action="store_true", help="asymmetric grids (default symmetric)")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--autoround-nsamples", type=int, default=16, help="auto-round tunes by SGD: fewer windows")
    ap.add_argument("--autoround-iters", type=int, default=20)
    ap.add_argument("--timeout", type=int, default=3600, help="seconds a tool may take before it is stopped")
    ap.add_argument("--work", type=Path, help="reuse this work folder: tools with results there are not rerun")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="lowbit-peers-"))
    if (work / "windows.safetensors").is_file():
        model_dir, windows = work / "float", work / "windows.safetensors"
    else:
        model_dir, windows = export_float(work, args.nsamples)

    common = ["--model", str(model_dir), "--windows", str(windows), "--bits", str(args.bits)]
    common += ["--group-size", str(args.group_size), "--damp", "0.01"] + ([] if args.asym else ["--sym"])
    tools = [("lowbit", sys.executable, "run_lowbit.py", ["--act-order"])]
    if args.llmcompressor_python:
        tools.append(("llm-compressor", args.llmcompressor_python, "run_llmcompressor.py", ["--act-order"]))
    if args.gptqmodel_python:
        tools.append(("GPTQModel", args.gptqmodel_python, "run_gptqmodel.py", ["--act-order"]))
    if args.autoround_python:
        extra = ["--nsamples", str(args.autoround_nsamples), "--iters", str(args.autoround_iters)]
        tools.append(("auto-round", args.autoround_python, "run_autoround.py", extra))

    runs, failed = [], []
    for name, python, script, extra in tools:
        out = work / name
        if (out / "timing.json").is_file():  # finished in an earlier invocation
            runs.append(json.loads((out / "timing.json").read_text()))
            continue
        cmd = ["timeout", str(args.timeout), python, str(PEERS / script), *common, *extra, "--out", str(out)]
        try:
            _, wall, rss = timed(cmd)
        except SystemExit:
            failed.append({"tool": name, "failed": f"did not finish within {args.timeout} s (stopped)"})
            print(f"{name}: stopped after {args.timeout} s", flush=True)
            continue
        meta = json.loads((out / "meta.json").read_text())
        run = {"tool": name, "command_seconds": wall, "peak_rss_mb": rss, **meta, "dir": str(out)}
        (out / "timing.json").write_text(json.dumps(run))
        runs.append(run)
        print(f"{name}: {wall:.0f} s, peak {rss:.0f} MB", flush=True)

    loaded = lowbit.load_model(MODEL)
    eval_windows = protocol_windows(loaded.tokenizer, "wikitext2", "quick", 512)
    ref = cached_reference(loaded.source.fingerprint(), eval_windows, lambda: loaded.model, 4)
    fmt = IntFormat(args.bits, args.group_size, symmetric=not args.asym)
    for run in runs:
        weights = load_file(str(Path(run.pop("dir")) / "dequantized.safetensors"))
        model = copy.deepcopy(loaded.model)
        numel = bits = 0
        rel = []
        for layer, w in weights.items():
            lin = model.get_submodule(layer)
            rel.append(((w - lin.weight).norm() / lin.weight.norm()).item())
            lin.weight.data = w.to(lin.weight.dtype)
            numel += w.numel()
            bits += fmt.storage_bits(*w.shape)
        run["layers"] = len(weights)
        run["bpw"] = bits / numel  # same accounting for everyone: codes + fp16 scale (+ zero) per group
        run["mean_weight_rel_error"] = sum(rel) / len(rel)
        ev = evaluate_windows(model, eval_windows, ref, 4, desc=run["tool"])
        run.update({k: ev[k] for k in ("perplexity", "kld", "top1_agreement")})
        print(json.dumps({k: v for k, v in run.items() if k != "config"}), flush=True)

    base = next(r for r in runs if r["tool"] == "lowbit")
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "model": MODEL,
        "format": fmt.to_dict(),
        "nsamples": args.nsamples,
        "runs": runs,
        "failed": failed,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print("\n| tool | version | windows | bpw | ppl | KLD | top-1 | command s | time vs lowbit | peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in runs:
        n = r["config"].get("nsamples") or args.nsamples
        print(
            f"| {r['tool']} | {r['version']} | {n} | {r['bpw']:.4f} | {r['perplexity']:.2f} | {r['kld']:.4f} | "
            f"{r['top1_agreement']:.4f} | {r['command_seconds']:.0f} | "
            f"{r['command_seconds'] / base['command_seconds']:.2f}x | {r['peak_rss_mb']:.0f} |"
        )
    for f in failed:
        print(f"| {f['tool']} | | | | | | | {f['failed']} | | |")


if __name__ == "__main__":
    main()
