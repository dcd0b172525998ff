"""How well a finished run's summed proxy predicted its KLD, split by the bit width of its layers.

For each run (an artifact directory beside its `lowbit quantize --json` output, as
budget_frontier.py leaves them in WORK), every layer's format is read from the manifest and its
weighted error (the measurement file's, under `--weighting`) is summed per bit width; the run's
KLD over that sum is the proxy's miss. Plans whose misses differ by which widths they hold show
where the additive proxy is off (issue: budgets against the uniform frontier). With `kl` and a
measurement file holding the per-layer factors, each run's proxy without them (role scales
only) is recorded too, and the Spearman rank correlation of each proxy with KLD over the runs.

    .venv/bin/python benchmarks/proxy_split.py --measurements /tmp/frontier3/measurements.json \\
        --runs /tmp/frontier3/b3.0-kl-upgrade-nf /tmp/frontier3/u-nf3-g128 \\
        --out benchmarks/results/proxy_split.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import shlex
import sys
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from plan_equivalence import run_formats  # noqa: E402
from scipy.stats import spearmanr  # noqa: E402

from lowbit.allocate.sensitivity import Measurements  # noqa: E402
from lowbit.formats import format_from_dict  # noqa: E402


def split(meas: Measurements, run: Path, weighting: str) -> dict:
    names = [format_from_dict(c).name for c in meas.candidates]
    bits = [format_from_dict(c).bits for c in meas.candidates]
    result = json.loads((run.parent / f"{run.name}.json").read_text())
    by_width: dict[int, float] = defaultdict(float)
    layers: dict[int, int] = defaultdict(int)
    for name, fmt in run_formats(run).items():
        j = names.index(fmt)
        by_width[bits[j]] += meas.weighted_errors(name, weighting)[j]
        layers[bits[j]] += 1
    proxy = sum(by_width.values())
    kld = result["evaluation"]["kld"]
    return {
        "run": run.name,
        "bpw": result["bits_per_weight"],
        "kld": kld,
        "proxy": proxy,
        "kld_over_proxy": kld / proxy,
        "proxy_by_bits": dict(sorted(by_width.items())),
        "layers_by_bits": dict(sorted(layers.items())),
    }


def kl_scales(meas: Measurements) -> dict[str, dict[int, float]]:
    """The `kl` weighting's KL per unit of error, per layer role and bit width (one per width:
    the probe measures a width once, by its coarsest-group candidate)."""
    bits = [format_from_dict(c).bits for c in meas.candidates]
    return {role: {b: scale[bits.index(b)] for b in sorted(set(bits))} for role, scale in (meas.kl_scale or {}).items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--measurements", type=Path, required=True)
    ap.add_argument("--runs", type=Path, nargs="+", required=True, help="artifact directories (NAME and NAME.json)")
    ap.add_argument("--weighting", default="kl")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    meas = Measurements.load(args.measurements)
    rows = [split(meas, run, args.weighting) for run in args.runs]
    proxies = ["proxy"]
    if args.weighting == "kl" and meas.kl_layer:
        role_only = replace(meas, kl_layer={})
        for row, run in zip(rows, args.runs, strict=True):
            row["proxy_role_scales_only"] = split(role_only, run, "kl")["proxy"]
        proxies.append("proxy_role_scales_only")
    klds = [r["kld"] for r in rows]
    spearman = {p: float(spearmanr([r[p] for r in rows], klds).statistic) for p in proxies} if len(rows) > 2 else {}
    record = {
        "date": datetime.date.today().isoformat(),
        "command": shlex.join(sys.argv),
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}",
        "weighting": args.weighting,
        "kl_scale_by_role_and_bits": kl_scales(meas),
        "rows": rows,
        "spearman_with_kld": spearman,
    }
    args.out.write_text(json.dumps(record, indent=1))
    print("| run | bpw | KLD | proxy | KLD/proxy | proxy of 2-bit layers | 2-bit layers |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        two = r["proxy_by_bits"].get(2, 0.0)
        print(
            f"| {r['run']} | {r['bpw']:.4f} | {r['kld']:.4f} | {r['proxy']:.4f} | {r['kld_over_proxy']:.2f} "
            f"| {two:.4f} | {r['layers_by_bits'].get(2, 0)} |"
        )
    print("Spearman with KLD: " + ", ".join(f"{p} {c:.3f}" for p, c in spearman.items()))


if __name__ == "__main__":
    main()
