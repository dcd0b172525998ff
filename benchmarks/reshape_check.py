"""Does the reshaped core (walker, recipe, plan) quantize exactly as lowbit did before it?

Runs the same `lowbit quantize` commands with two versions of lowbit, one after the other on
this machine: the checkout this script is in, and an older one (`--old-src`, e.g. a
`git worktree add ../old fd1cba1`), put first on PYTHONPATH. Both use this checkout's venv and
libraries, so only lowbit's code differs. For each command it records KLD, perplexity, bpw,
times and peak memory, and whether the weights files (and, for budgets, the measurement files)
are identical (tensors, and bytes). The rows are the GPTQ table's int3 g128 and the end-to-end table's
`--bits 3.5` (BENCHMARKS.md). A run whose JSON is already in WORK is not repeated.

    LOWBIT_DATA_DIR=../shared/data .venv/bin/python benchmarks/reshape_check.py --old-src ../old --work /tmp/reshape
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).parent))
from foundation import MODEL, timed  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "reshape_check.json"
RUNS: dict[str, list[str]] = {
    "u-int3g128": ["--bits", "3", "--group-size", "128"],
    "b3.5": ["--bits", "3.5"],
}


def run(version: str, src: Path, work: Path, name: str, args: list[str]) -> dict:
    folder = work / version
    folder.mkdir(parents=True, exist_ok=True)
    result = folder / f"{name}.json"
    if not (result.is_file() and result.stat().st_size):
        cmd = [sys.executable, "-m", "lowbit.cli", "quantize", MODEL, *args, "--out", str(folder / name)]
        if name.startswith("b"):
            cmd += ["--measurements", str(folder / "measurements.json")]
        cmd += ["--overwrite", "--eval", "--json"]
        print(f"=== {version} {name}: {' '.join(args)}", flush=True)
        stdout, wall, rss = timed(cmd, env={**os.environ, "PYTHONPATH": str(src)})
        result.write_text(json.dumps({**json.loads(stdout), "command_seconds": wall, "command_peak_rss_mb": rss}))
    return json.loads(result.read_text())


def same_tensors(a: Path, b: Path) -> bool:
    """Same tensor names, dtypes and values. (Bytes can differ where nothing else does: the older
    version wrote two metadata keys, which safetensors orders by hash, differently per process.)"""
    with safe_open(str(a), "pt") as fa, safe_open(str(b), "pt") as fb:
        if sorted(fa.keys()) != sorted(fb.keys()):
            return False
        return all(torch.equal(fa.get_tensor(k), fb.get_tensor(k)) for k in fa.keys())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old-src", type=Path, required=True, help="checkout of the older lowbit")
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    new_src = Path(__file__).resolve().parents[1]
    rows = []
    for name, options in RUNS.items():
        old = run("old", args.old_src.resolve(), args.work, name, options)
        new = run("new", new_src, args.work, name, options)
        files = [args.work / v / name / "model.safetensors" for v in ("old", "new")]
        row = {"run": name, "options": options, "weights_identical": same_tensors(*files)}
        row["weights_bytes_identical"] = filecmp.cmp(*files, shallow=False)
        if name.startswith("b"):
            a, b = (args.work / v / "measurements.json" for v in ("old", "new"))
            old_m, new_m = json.loads(a.read_text()), json.loads(b.read_text())
            old_m.pop("seconds", None)  # the older version stored the pass's time in the file
            row["measurements_identical"] = old_m == new_m
        for version, r in (("old", old), ("new", new)):
            ev = r["evaluation"]
            row[version] = {
                "bpw": r["bits_per_weight"],
                "kld": ev["kld"],
                "ppl": ev["perplexity"],
                "top1": ev["top1_agreement"],
                "quantize_seconds": r["quantize_seconds"],
                "command_seconds": r.get("command_seconds"),  # None: run by hand, not under /usr/bin/time
                "peak_rss_mb": r.get("command_peak_rss_mb"),
            }
        rows.append(row)
        print(json.dumps(row), flush=True)
    args.out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "model": MODEL, "runs": rows}, indent=1))
    print("\n| run | version | bpw | KLD | ppl | top-1 | same tensors |\n|---|---|---|---|---|---|---|")
    for row in rows:
        for version in ("old", "new"):
            r = row[version]
            cells = [row["run"], version, f"{r['bpw']:.4f}", f"{r['kld']:.4f}", f"{r['ppl']:.2f}", f"{r['top1']:.4f}"]
            print("| " + " | ".join(cells) + f" | {row['weights_identical']} |")


if __name__ == "__main__":
    main()
