"""Foundation benchmark on smollm2-135m (protocol.md, quick protocol unless noted).

Runs the real CLI under /usr/bin/time -v, so wall time and peak memory are those
of the whole command, then prints a markdown table for BENCHMARKS.md.

    LOWBIT_DATA_DIR=../shared/data python benchmarks/foundation.py [--skip-full]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODEL = "smollm2-135m"
RESULTS = Path(__file__).parent / "results" / "foundation.json"


def timed(cmd: list[str], env: dict[str, str] | None = None, preexec_fn=None) -> tuple[str, float, float]:
    """stdout, wall seconds, peak RSS (MB) of a command; `preexec_fn` runs in the child first."""
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, env=env, preexec_fn=preexec_fn)
    if proc.returncode != 0:
        sys.exit(f"command failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    wall = re.search(r"Elapsed \(wall clock\) time.*: (?:(\d+):)?(\d+):([\d.]+)", proc.stderr)
    h, m, s = (float(x) if x else 0.0 for x in wall.groups())
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    return proc.stdout, h * 3600 + m * 60 + s, rss / 1024


def resident_mb(spec: str) -> dict:
    """RSS growth from loading a model (after imports), in a fresh process."""
    code = f"""
import gc, json, psutil, torch, lowbit
proc = psutil.Process()
base = proc.memory_info().rss
m = lowbit.load_model({spec!r}).model
gc.collect()
loaded = proc.memory_info().rss
with torch.no_grad():
    m(torch.randint(0, 1000, (1, 512)))
print(json.dumps({{"load_mb": (loaded - base) / 2**20, "after_forward_mb": (proc.memory_info().rss - base) / 2**20}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip-full", action="store_true", help="skip the full-protocol float perplexity")
    args = ap.parse_args()
    lowbit = [sys.executable, "-m", "lowbit.cli"]
    results: dict = {"date": time.strftime("%Y-%m-%d"), "model": MODEL, "runs": []}
    work = Path(tempfile.mkdtemp(prefix="lowbit-bench-"))

    for bits in (4, 3, 2):
        for clip in (False, True):
            out = work / f"rtn{bits}{'-clip' if clip else ''}"
            cmd = [
                *lowbit,
                "quantize",
                MODEL,
                "--bits",
                str(bits),
                "--group-size",
                "128",
                "--out",
                str(out),
                "--eval",
                "--json",
            ] + (["--clip-search"] if clip else [])
            stdout, wall, rss = timed(cmd)
            s = json.loads(stdout)
            run = {
                "bits": bits,
                "group_size": 128,
                "sym": False,
                "clip_search": clip,
                "bpw": s["bits_per_weight"],
                "artifact_bytes": s["artifact_bytes"],
                "fp16_bytes": s["fp16_bytes"],
                "quantize_seconds": s["quantize_seconds"],
                "command_seconds": wall,
                "peak_rss_mb": rss,
                **{k: s["evaluation"][k] for k in ("perplexity", "kld", "top1_agreement", "reference_perplexity")},
            }
            results["runs"].append(run)
            print(json.dumps(run), flush=True)

    art4 = work / "rtn4"
    stdout, wall, rss = timed([*lowbit, "eval", str(art4), "--quick", "--json"])
    results["quick_eval_4bit"] = {
        "command_seconds": wall,
        "eval_seconds": json.loads(stdout)["seconds"],
        "peak_rss_mb": rss,
    }
    stdout, wall, rss = timed([*lowbit, "eval", MODEL, "--quick", "--no-reference", "--json"])
    results["quick_eval_float"] = {
        "command_seconds": wall,
        "eval_seconds": json.loads(stdout)["seconds"],
        "perplexity": json.loads(stdout)["perplexity"],
        "peak_rss_mb": rss,
    }
    results["resident"] = {"float": resident_mb(MODEL), "rtn4_artifact": resident_mb(str(art4))}
    print(json.dumps({k: results[k] for k in ("quick_eval_4bit", "quick_eval_float", "resident")}), flush=True)
    if not args.skip_full:
        stdout, wall, rss = timed([*lowbit, "eval", MODEL, "--full", "--no-reference", "--json"])
        full = json.loads(stdout)
        results["float_full"] = {"perplexity": full["perplexity"], "windows": full["windows"], "command_seconds": wall}
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2))
    print_table(results)


def print_table(r: dict) -> None:
    print("\n| bits | clip search | bpw | ppl | KLD | top-1 | artifact MB | quantize s | command s | peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for x in r["runs"]:
        print(
            f"| {x['bits']} | {'yes' if x['clip_search'] else 'no'} | {x['bpw']:.4f} | {x['perplexity']:.2f} | "
            f"{x['kld']:.4f} | {x['top1_agreement']:.4f} | {x['artifact_bytes'] / 1e6:.1f} | "
            f"{x['quantize_seconds']:.1f} | {x['command_seconds']:.0f} | {x['peak_rss_mb']:.0f} |"
        )
    print(
        f"\nfloat quick ppl {r['quick_eval_float']['perplexity']:.3f}; reference from cache in runs: "
        f"{r['runs'][0]['reference_perplexity']:.3f}"
    )
    if "float_full" in r:
        print(f"float full ppl {r['float_full']['perplexity']:.3f} over {r['float_full']['windows']} windows")
    print(json.dumps({k: r[k] for k in ("quick_eval_4bit", "quick_eval_float", "resident")}, indent=1))


if __name__ == "__main__":
    main()
