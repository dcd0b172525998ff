"""The residual rotation (`lowbit rotate`) against the plain model, and either with activation-aware
scaling (`--awq`) or float targets (`--float-target`): the same `lowbit quantize` runs on both,
smollm2-135m, quick protocol (issue: better bits below 3.5 bpw).

Every step is the CLI in its own process, as a user runs it. First `lowbit rotate MODEL --out
WORK/rotated` (kept if there), and `lowbit eval WORK/rotated --reference MODEL`: the float cost
of the rotation itself (should be ~0). Then, for each run spec, `lowbit quantize ... --eval --quick
--json` on the rotated copy (`--runs`) and on MODEL itself (`--plain`). Run specs:

    u:BITS:GROUP     the uniform integer format, GPTQ          u:FORMAT   a named format (nf3-g128)
    r:BITS:GROUP     the uniform integer format, round-to-nearest
    b:BPW            a bit budget with the default allocator; budget runs of one model share a
    s:SIZE           a size budget (`--size 96846977B`...)      measurement file in WORK
    SPEC+awq         any of them with activation-aware scaling (`--awq`); +ft: with float
                     targets (`--float-target`), +ft0.1 with `--float-target-damp 0.1`; both: SPEC+awq+ft

Every run's KLD is against its own float model; the rotated float model's KLD against MODEL is
recorded so the two can be added. A finished run's JSON in WORK is reused. The results file is
rewritten after every run, with every command, the machine and the date.

    LOWBIT_DATA_DIR=../shared/data .venv/bin/python benchmarks/rotation.py --work /tmp/rot \\
        --runs u:3:128 u:4:128 b:3.0 b:3.5 b:4.25 --plain u:3:128 u:3:128+awq

With no `--runs`, nothing is rotated and only the `--plain` runs are made.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from budget_frontier import spec_args as frontier_spec_args  # noqa: E402
from budget_frontier import suffix_args  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "rotation.json"


def spec_args(spec: str) -> tuple[str, list[str]]:
    spec, *suffixes = spec.split("+")
    if suffixes:
        name, args = spec_args(spec)
        for suffix in suffixes:
            name, args = f"{name}-{suffix}", [*args, *suffix_args(suffix)]
        return name, args
    kind, *rest = spec.split(":")
    if kind == "u":  # the uniform runs are named and spelled as in the frontier sweep
        return frontier_spec_args(spec)
    if kind == "r" and len(rest) == 2:
        return f"rtn-int{rest[0]}g{rest[1]}", ["--method", "rtn", "--bits", rest[0], "--group-size", rest[1]]
    if kind == "s" and len(rest) == 1:
        return f"s{rest[0]}", ["--size", rest[0]]
    if kind == "b" and len(rest) == 1:
        return f"b{rest[0]}", ["--bits", rest[0]]
    raise SystemExit(f"bad run spec {spec!r}: u:BITS:GROUP, u:FORMAT, r:BITS:GROUP, b:BPW or s:SIZE")


def _file(log: Path, suffix: str) -> Path:
    return log.parent / (log.name + suffix)  # not with_suffix: run names hold dots (b3.5)


def run(cmd: list[str], log: Path, commands: list[str]) -> tuple[dict, float] | None:
    """Run one CLI command, its JSON on stdout; None (and the log named) when it fails."""
    commands.append(shlex.join(cmd))
    print(f"=== {shlex.join(cmd)}", flush=True)
    start = time.perf_counter()
    with _file(log, ".json").open("w") as out, _file(log, ".err").open("w") as err:
        rc = subprocess.run(cmd, stdout=out, stderr=err, check=False).returncode
    if rc:
        _file(log, ".json").unlink()
        print(f"failed (exit {rc}); see {_file(log, '.err')}", file=sys.stderr)
        return None
    return json.loads(_file(log, ".json").read_text()), time.perf_counter() - start


def cached(log: Path) -> dict | None:
    path = _file(log, ".json")
    return json.loads(path.read_text()) if path.is_file() and path.stat().st_size else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True, help="the rotated model, artifacts, logs, measurements")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--runs", nargs="*", default=[], help="run specs for the rotated model (see above)")
    ap.add_argument("--plain", nargs="*", default=[], help="run specs for the unrotated model too")
    ap.add_argument("--heads", action="store_true", help="rotate the attention heads' values as well (R1 + R2)")
    ap.add_argument("--seed", type=int, default=0, help="the rotation's seed")
    ap.add_argument("--lowbit", default=str(Path(sys.executable).with_name("lowbit")))
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--note", default="", help="a line recorded with the results (e.g. what shared the CPU)")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    commands: list[str] = []
    results: dict = {
        "script": "benchmarks/rotation.py",
        "argv": shlex.join(sys.argv),
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {platform.processor() or '?'}, {__import__('os').cpu_count()} CPUs",
        "model": args.model,
        "protocol": "quick",
        "commands": commands,
        "note": args.note,
        "rows": [],
    }

    rotated = args.work / "rotated"
    if args.runs and not rotated.is_dir():
        cmd = [args.lowbit, "rotate", args.model, "--out", str(rotated), "--seed", str(args.seed)]
        cmd += ["--heads"] if args.heads else []
        commands.append(shlex.join(cmd))
        start = time.perf_counter()
        subprocess.run(cmd, check=True)
        results["rotate_s"] = time.perf_counter() - start
    results["rotation"] = json.loads((rotated / "lowbit_rotation.json").read_text()) if args.runs else None
    float_log = args.work / "rotated-float"
    done = cached(float_log)
    if done is None and args.runs:
        cmd = [args.lowbit, "eval", str(rotated), "--reference", args.model, "--quick", "--json"]
        got = run(cmd, float_log, commands)
        done = got[0] if got else None
    if done:
        results["rotated_float_vs_model"] = {k: done.get(k) for k in ("kld", "perplexity", "top1_agreement")}

    runs = [("rotated", str(rotated), spec) for spec in args.runs] + [("plain", args.model, s) for s in args.plain]
    for label, model, spec in runs:
        name, spec_cli = spec_args(spec)
        log = args.work / f"{label}-{name}"
        extra = ["--measurements", str(args.work / f"{label}-measurements.json")] if name[0] in "bs" else []
        r, seconds = cached(log), None
        cmd = [args.lowbit, "quantize", model, *spec_cli, *extra, "--out", str(log)]
        cmd += ["--overwrite", "--eval", "--quick", "--json"]
        if r is not None:
            commands.append("reused (an earlier run of this script): " + shlex.join(cmd))
        else:
            got = run(cmd, log, commands)
            if got is None:
                continue
            r, seconds = got
        ev, b = r["evaluation"], r.get("budget") or {}
        results["rows"].append(
            {
                "model": label,
                "run": name,
                "bpw": r["bits_per_weight"],
                "artifact_bytes": r["artifact_bytes"],
                "kld": ev["kld"],
                "ppl": ev["perplexity"],
                "top1": ev["top1_agreement"],
                "quantize_s": r["quantize_seconds"],
                "wall_s": seconds,
                "measure_s": b.get("measurement_seconds") if b and not b.get("measurements_reused") else None,
            }
        )
        args.results.write_text(json.dumps(results, indent=1) + "\n")
    args.results.write_text(json.dumps(results, indent=1) + "\n")
    print("\n| model | run | bpw | MB | KLD | ppl | top-1 |\n|---|---|---|---|---|---|---|")
    for x in results["rows"]:
        cells = [x["model"], x["run"], f"{x['bpw']:.4f}", f"{x['artifact_bytes'] / 1e6:.1f}", f"{x['kld']:.4f}"]
        print("| " + " | ".join([*cells, f"{x['ppl']:.2f}", f"{x['top1']:.4f}"]) + " |")


if __name__ == "__main__":
    main()
