"""compressed-tensors exports of smollm2-135m, scored through transformers' own loader.

For each run: `lowbit quantize smollm2-135m --target compressed-tensors ...` (GPTQ, lowbit's
defaults: 128 C4 windows of 512 tokens), `lowbit export --to compressed-tensors`, then
`lowbit eval` of the exported directory (transformers + compressed-tensors load it; quick
protocol: the first 64 WikiText-2 windows of 512 tokens, KLD against the float model) and of
lowbit's own artifact, plus the largest logit difference between the two on 4 windows.

smollm2's attention and gate/up rows are 576 wide: groups of 128 do not divide them and
compressed-tensors refuses partial groups, so --group-size 128 is refused (recorded) and the
4-bit rows use groups of 64 and 32. A budget run plans with q/k/v and gate/up fused (vLLM's rule);
its `-unfused` twin plans the same candidates on the same measurements without the rule, which
shows what the rule costs (lowbit's own evaluation: that plan cannot be exported).

    LOWBIT_DATA_DIR=../shared/data .venv/bin/python benchmarks/ct_export.py --work /tmp/ct-bench
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from lowbit.formats import IntFormat

RESULTS = Path(__file__).parent / "results" / "ct_export.json"
RUNS = {
    "int4-g128": ["--bits", "4", "--group-size", "128"],
    "int4-g64": ["--bits", "4", "--group-size", "64"],
    "int4-g32": ["--bits", "4", "--group-size", "32"],
    "int8-channel": ["--bits", "8", "--group-size", "channel"],
}
# 4.25 and 4.5 bpw are exactly int4-g64's and int4-g32's sizes on smollm2 under this target (groups
# of 128 do not divide its rows): there the default allocator returns that uniform plan. 4.75 bpw
# is a budget it mixes.
BUDGETS = {"bits4.25": 4.25, "bits4.5": 4.5, "bits4.75": 4.75}
# a budget's candidates: symmetric grids whose groups divide smollm2's rows
BUDGET_CANDIDATES = [IntFormat(b, g, True) for b, g in ((3, 64), (4, 64), (4, 32), (5, 64), (6, 64), (8, 64))]


def budget_run(bpw: float, out: Path, measurements: Path, fused: bool) -> None:
    """A --bits budget over BUDGET_CANDIDATES, with the target's fused-layer rule or without it."""
    import lowbit

    loaded = lowbit.load_model("smollm2-135m")
    q = lowbit.quantize(
        loaded.model,
        tokenizer=loaded.tokenizer,
        budget_bpw=bpw,
        candidates=BUDGET_CANDIDATES,
        target="compressed-tensors" if fused else None,
        measurements=measurements,
    )
    lowbit.save(q, out, loaded.tokenizer, overwrite=True)


def _summary(art: Path) -> dict:
    manifest = json.loads((art / "lowbit_manifest.json").read_text())
    return {"bits_per_weight": manifest["bits_per_weight"], "formats": _format_counts(manifest)}


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    print("$", " ".join(cmd), flush=True)
    return subprocess.run(cmd, capture_output=True, text=True)


def _eval(lowbit: str, path: Path) -> dict:
    run = _run([lowbit, "eval", str(path), "--reference", "smollm2-135m", "--json"])
    if run.returncode:
        raise SystemExit(run.stderr)
    ev = json.loads(run.stdout)
    return {k: ev[k] for k in ("kld", "top1_agreement", "perplexity") if k in ev}


def logit_gap(artifact: Path, export: Path, windows: int = 4) -> float:
    """Largest |logit difference| between lowbit's model and transformers' load of the export."""
    from transformers import AutoModelForCausalLM

    import lowbit
    from lowbit.eval.metrics import protocol_windows

    ours = lowbit.load_model(artifact)
    theirs = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).eval()
    ids = protocol_windows(ours.tokenizer)[:windows]
    with torch.no_grad():
        return max(float((ours.model(w[None]).logits - theirs(w[None]).logits).abs().max()) for w in ids)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--lowbit", default=str(Path(sys.executable).with_name("lowbit")))
    ap.add_argument("--runs", default=",".join([*RUNS, *BUDGETS]), help="comma-separated run names")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    results = json.loads(args.out.read_text()) if args.out.exists() else {"runs": {}}
    results.update(
        {
            "command": " ".join(sys.argv),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
            "date": time.strftime("%Y-%m-%d"),
            "protocol": "quick: first 64 WikiText-2 windows of 512 tokens, KLD against smollm2-135m in float32",
        }
    )
    for name in args.runs.split(","):
        art, export = args.work / f"art-{name}", args.work / f"ct-{name}"
        t0 = time.perf_counter()
        if name in BUDGETS:
            cmd = f"lowbit.quantize(smollm2-135m, budget_bpw={BUDGETS[name]}, target=compressed-tensors, candidates="
            cmd += f"[{', '.join(f.name for f in BUDGET_CANDIDATES)}])"
            budget_run(BUDGETS[name], art, args.work / "measurements.json", fused=True)
        else:
            cmd = [args.lowbit, "quantize", "smollm2-135m", *RUNS[name], "--target", "compressed-tensors"]
            cmd += ["--out", str(art), "--overwrite"]
            run = _run(cmd)
            if run.returncode:
                results["runs"][name] = {"command": " ".join(cmd[1:]), "refused": run.stderr.strip().splitlines()[-1]}
                print(name, results["runs"][name], flush=True)
                continue
            cmd = " ".join(cmd[1:])
        row = {"command": cmd, "quantize_seconds": round(time.perf_counter() - t0), **_summary(art)}
        row["lowbit"] = _eval(args.lowbit, art)
        run = _run([args.lowbit, "export", str(art), "--to", "compressed-tensors", "--out", str(export), "--overwrite"])
        if run.returncode:
            raise SystemExit(run.stderr)
        row["export_notes"] = [n for n in run.stderr.strip().splitlines() if n.startswith("note")][:3]
        row["file_bytes"] = (export / "model.safetensors").stat().st_size
        row["transformers"] = _eval(args.lowbit, export)
        row["max_logit_gap"] = logit_gap(art, export)
        results["runs"][name] = row
        print(name, json.dumps(row), flush=True)
        args.out.write_text(json.dumps(results, indent=2))
        if name in BUDGETS:  # the same candidates and measurements without the fused-layer rule
            unfused = args.work / f"art-{name}-unfused"
            budget_run(BUDGETS[name], unfused, args.work / "measurements.json", fused=False)
            row = {"command": cmd.replace("target=compressed-tensors, ", ""), **_summary(unfused)}
            row["lowbit"] = _eval(args.lowbit, unfused)
            results["runs"][f"{name}-unfused"] = row
            print(f"{name}-unfused", json.dumps(row), flush=True)
            args.out.write_text(json.dumps(results, indent=2))
    args.out.write_text(json.dumps(results, indent=2))


def _format_counts(manifest: dict) -> dict[str, int]:
    counts: dict[str, int] = {}
    for rec in manifest["layers"].values():
        f = rec["format"]
        name = f"int{f['bits']}-g{f['group_size'] or 'ch'}-{'sym' if f['symmetric'] else 'asym'}"
        counts[name] = counts.get(name, 0) + 1
    return counts


if __name__ == "__main__":
    main()
