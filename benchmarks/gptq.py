"""GPTQ vs RTN on smollm2-135m (protocol.md: quick protocol, 128 x 512 calibration windows of C4).

Each configuration is one `lowbit quantize ... --eval --json` under /usr/bin/time -v (wall time
and peak memory of the whole command). The floor of GPTQ's time, one forward pass of the
calibration set through the float model's decoder (no output head), is timed in a fresh process
right before the GPTQ runs, so ratios compare like with like.

    LOWBIT_DATA_DIR=../shared/data .venv/bin/python benchmarks/gptq.py [--only gptq] [--nsamples 128]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from foundation import MODEL, timed  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "gptq.json"
CONFIGS = [(4, 128), (3, 128), (2, 64)]


def forward_floor(nsamples: int, seqlen: int, batch: int) -> float:
    """Seconds for one no-grad forward of the calibration windows through the decoder."""
    code = f"""
import time, torch, lowbit
from lowbit.data import calibration_data
loaded = lowbit.load_model({MODEL!r})
w = calibration_data(loaded.tokenizer, "c4", {nsamples}, {seqlen})
base = loaded.model.get_decoder()
with torch.no_grad():
    base(input_ids=w[:1], use_cache=False)  # warm-up
    t = time.perf_counter()
    for i in range(0, w.shape[0], {batch}):
        base(input_ids=w[i:i + {batch}], use_cache=False)
print(time.perf_counter() - t)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return float(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", choices=["gptq", "rtn"], help="run one method only")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--extra", nargs="*", default=[], help="extra quantize options for the gptq runs")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    lowbit = [sys.executable, "-m", "lowbit.cli"]
    work = Path(tempfile.mkdtemp(prefix="lowbit-gptq-bench-"))
    results: dict = {"date": time.strftime("%Y-%m-%d"), "model": MODEL, "nsamples": args.nsamples, "runs": []}
    methods = [args.only] if args.only else ["rtn", "gptq"]
    if "gptq" in methods:
        results["floor_seconds"] = forward_floor(args.nsamples, args.seqlen, 8)
        print(f"floor (one calibration forward through the decoder): {results['floor_seconds']:.1f} s", flush=True)
    for bits, gs in CONFIGS:
        for method in methods:
            out = work / f"{method}{bits}g{gs}"
            cmd = [*lowbit, "quantize", MODEL, "--method", method, "--bits", str(bits), "--group-size", str(gs)]
            cmd += ["--out", str(out), "--eval", "--json"]
            if method == "gptq":
                cmd += ["--nsamples", str(args.nsamples), "--calib-seqlen", str(args.seqlen), *args.extra]
            stdout, wall, rss = timed(cmd)
            s = json.loads(stdout)
            ev = s["evaluation"]
            run = {
                "method": method,
                "bits": bits,
                "group_size": gs,
                "bpw": s["bits_per_weight"],
                "perplexity": ev["perplexity"],
                "kld": ev["kld"],
                "top1_agreement": ev["top1_agreement"],
                "quantize_seconds": s["quantize_seconds"],
                "command_seconds": wall,
                "peak_rss_mb": rss,
                "pipeline": s.get("pipeline"),
                "extra": args.extra if method == "gptq" else [],
            }
            if method == "gptq" and "floor_seconds" in results:
                run["ratio_to_floor"] = s["quantize_seconds"] / results["floor_seconds"]
            results["runs"].append(run)
            print(json.dumps(run), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))

    print("\n| method | bits | group | bpw | ppl | KLD | top-1 | quantize s | x floor | command s | peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results["runs"]:
        ratio = f"{r['ratio_to_floor']:.1f}" if "ratio_to_floor" in r else ""
        print(
            f"| {r['method']} | {r['bits']} | {r['group_size']} | {r['bpw']:.4f} | {r['perplexity']:.2f} | "
            f"{r['kld']:.4f} | {r['top1_agreement']:.4f} | {r['quantize_seconds']:.1f} | {ratio} | "
            f"{r['command_seconds']:.0f} | {r['peak_rss_mb']:.0f} |"
        )
    for r in results["runs"]:
        p = r.get("pipeline")
        if p:
            print(
                f"gptq {r['bits']}-bit: capture {p['capture']:.1f} s, block forwards {p['forward']:.1f} s, "
                f"Hessians {p['hessian']:.1f} s, solver {p['solve']:.1f} s, checkpoints {p['checkpoint']:.1f} s, "
                f"total {p['total']:.1f} s"
            )


if __name__ == "__main__":
    main()
