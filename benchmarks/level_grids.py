"""Non-uniform level grids (NF3, NF4, FP4) against the integer grid of the same bytes, end to end:
`lowbit quantize smollm2-135m --format F --eval --quick` (GPTQ pipeline), one CLI process per
format, KLD against the float model (issue: better bits; judge every grid by KL, never by weight
error). At 4 bits smollm2's weights lie on a Q4_1 grid (protocol.md), which flatters integer
grids with groups of 32: compare at 3 bits for a headline.

A finished run's JSON in WORK is reused.

    LOWBIT_DATA_DIR=../shared/data .venv/bin/python benchmarks/level_grids.py --work /tmp/grids \\
        --formats nf3-g64 int3-g64-sym
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import shlex
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "level_grids.json"


def run(work: Path, fmt: str, lowbit: str) -> dict | None:
    out = work / f"{fmt}.json"
    if not (out.is_file() and out.stat().st_size):
        cmd = [lowbit, "quantize", "smollm2-135m", "--format", fmt, "--out", str(work / fmt), "--overwrite"]
        cmd += ["--eval", "--quick", "--json"]
        print(f"=== {shlex.join(cmd)}", flush=True)
        with out.open("w") as stdout, (work / f"{fmt}.err").open("w") as stderr:
            if subprocess.run(cmd, stdout=stdout, stderr=stderr, check=False).returncode:
                out.unlink()
                print(f"{fmt} failed; see {work / fmt}.err", file=sys.stderr)
                return None
    return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--formats", nargs="+", required=True, help="lowbit format names (--format)")
    ap.add_argument("--lowbit", default=str(Path(sys.executable).with_name("lowbit")))
    ap.add_argument("--results", type=Path, default=RESULTS)
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    rows = []
    for fmt in args.formats:
        r = run(args.work, fmt, args.lowbit)
        if r is None:
            continue
        ev = r["evaluation"]
        rows.append(
            {
                "format": fmt,
                "bpw": r["bits_per_weight"],
                "kld": ev["kld"],
                "ppl": ev["perplexity"],
                "top1": ev["top1_agreement"],
            }
        )
        record = {
            "date": datetime.date.today().isoformat(),
            "command": shlex.join(sys.argv),
            "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}",
            "model": "smollm2-135m",
            "protocol": "quick",
            "method": "gptq (CLI defaults)",
            "rows": rows,
        }
        args.results.write_text(json.dumps(record, indent=1))
    print("| format | bpw | KLD | ppl | top-1 |\n|---|---|---|---|---|")
    for x in rows:
        print(f"| {x['format']} | {x['bpw']:.4f} | {x['kld']:.4f} | {x['ppl']:.2f} | {x['top1']:.4f} |")


if __name__ == "__main__":
    main()
