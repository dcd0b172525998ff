"""Does a KL probe of a whole plan predict its KLD better than the plan's summed proxy?

The `kl` weighting's proxy sums per-layer errors scaled by per-role probes; plans that mix bit
widths have KLD 1.5-1.7 times their proxy where NF plans have 1.24-1.36 (proxy_split.py). This
probes the plans themselves: for each finished run (an artifact directory beside its
`lowbit quantize --json` output), the plan (linear -> candidate) is read from its manifest, and
one walk over the blocks carries one stream per plan in which every planned linear moves toward
its candidate's round-to-nearest grid, as far as the error GPTQ left there (the measurement
file's), as kl_probe.probe_roles does per role. Each stream's KL on the probe windows (the
first 4 of the 128 x 512 C4 calibration windows) is recorded beside the run's KLD (quick
protocol, WikiText-2) and its summed proxy. A predictor whose ratio to KLD is the same for every
plan ranks plans correctly; the spread of the ratios is the number to compare.

    LOWBIT_DATA_DIR=../shared/data .venv/bin/python benchmarks/plan_probe.py \\
        --measurements /tmp/frontier3/measurements.json \\
        --runs /tmp/frontier3/u-nf3-g128 /tmp/frontier3/b3.0-kl-upgrade-nf --out benchmarks/results/plan_probe.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import shlex
import sys
import time
from collections import defaultdict
from contextlib import ExitStack
from pathlib import Path

import torch
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).parent))
from plan_equivalence import run_formats  # noqa: E402

import lowbit  # noqa: E402
from lowbit.allocate.kl_probe import _ProbeWalk, _RoundingError, _swapped, probe_windows
from lowbit.allocate.sensitivity import Measurements
from lowbit.data import calibration_data
from lowbit.eval.metrics import evaluate_windows
from lowbit.eval.reference import build_reference, replayed
from lowbit.formats import format_from_dict
from lowbit.models.adapters import get_adapter, linear_weight
from lowbit.quantize import round_parameters
from lowbit.walker import Block, walk


class PlanProbe(_ProbeWalk):
    """Walker client: the float stream, and one stream per plan with each planned linear moved
    toward its candidate's grid by the measured error."""

    desc = "plan probe"

    def __init__(self, plans: list[dict[str, int]], errors: dict[str, list[float]], candidates) -> None:
        self.plans, self.errors, self.candidates = plans, errors, candidates
        self.streams: list[list[torch.Tensor] | None] = [None] * len(plans)

    def process(self, block: Block) -> list[torch.Tensor]:
        modules = self.modules_in(block, list(self.errors))
        used = {n: sorted({plan[n] for plan in self.plans}) for n in modules}
        observers = {n: _RoundingError(m, {j: self.candidates[j] for j in used[n]}) for n, m in modules.items()}
        outputs = self.run_float(block, observers)
        for k, plan in enumerate(self.plans):
            by_format: dict[int, dict[str, torch.Tensor]] = defaultdict(dict)
            shrink = {}
            for n, m in modules.items():
                j = plan[n]
                by_format[j][n] = linear_weight(m)
                rtn = observers[n].relative(j)
                shrink[n] = (self.errors[n][j] / rtn) ** 0.5 if rtn > 0 else 0.0
            stream = block.inputs if self.streams[k] is None else self.streams[k]
            with ExitStack() as stack:
                for j, weights in by_format.items():
                    stack.enter_context(_swapped(weights, self.candidates[j], True, {n: shrink[n] for n in weights}))
                self.streams[k] = block.outputs_for(stream)
        return outputs


def plan_of(run: Path, meas: Measurements, names: list[str]) -> dict[str, int]:
    formats = run_formats(run)
    return {n: names.index(formats[n]) for n in meas.layers}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--measurements", type=Path, required=True)
    ap.add_argument("--runs", type=Path, nargs="+", required=True, help="artifact directories (NAME and NAME.json)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    meas = Measurements.load(args.measurements)
    names = [format_from_dict(c).name for c in meas.candidates]
    candidates = [format_from_dict(c) for c in meas.candidates]
    plans = [plan_of(run, meas, names) for run in args.runs]
    loaded = lowbit.load_model("smollm2-135m")
    model = loaded.model
    with torch.no_grad():
        round_parameters(model, torch.float16)  # as `lowbit quantize` does before it probes
        windows = probe_windows(calibration_data(loaded.tokenizer, "c4", 128, 512))
        t0 = time.perf_counter()
        reference = build_reference(model, windows, len(windows), progress=False)
        client = PlanProbe(plans, {n: meas.weighted_errors(n, "relative") for n in meas.layers}, candidates)
        walk(model, get_adapter(model.config.model_type), windows, client, len(windows), progress=True)
        probe_kl = []
        for stream in client.streams:
            with replayed(model, stream, client.returns_tuple):
                probe_kl.append(evaluate_windows(model, windows, reference, len(windows), progress=False)["kld"])
        seconds = time.perf_counter() - t0
    rows = []
    for run, plan, kl in zip(args.runs, plans, probe_kl, strict=True):
        result = json.loads((run.parent / f"{run.name}.json").read_text())
        proxy = sum(meas.weighted_errors(n, "kl")[j] for n, j in plan.items())
        kld = result["evaluation"]["kld"]
        rows.append(
            {
                "run": run.name,
                "bpw": result["bits_per_weight"],
                "kld": kld,
                "proxy": proxy,
                "probe_kl": kl,
                "kld_over_proxy": kld / proxy,
                "kld_over_probe": kld / kl,
            }
        )

    def spread(key: str) -> float:
        ratios = [r[key] for r in rows]
        return max(ratios) / min(ratios)

    record = {
        "date": datetime.date.today().isoformat(),
        "command": shlex.join(sys.argv),
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}",
        "probe_seconds": seconds,
        "spread_kld_over_proxy": spread("kld_over_proxy"),
        "spread_kld_over_probe": spread("kld_over_probe"),
        "spearman_proxy": spearmanr([r["proxy"] for r in rows], [r["kld"] for r in rows]).statistic,
        "spearman_probe": spearmanr([r["probe_kl"] for r in rows], [r["kld"] for r in rows]).statistic,
        "rows": rows,
    }
    args.out.write_text(json.dumps(record, indent=1))
    print("| run | bpw | KLD | proxy | probe KL | KLD/proxy | KLD/probe |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['run']} | {r['bpw']:.4f} | {r['kld']:.4f} | {r['proxy']:.4f} | {r['probe_kl']:.4f} "
            f"| {r['kld_over_proxy']:.2f} | {r['kld_over_probe']:.2f} |"
        )
    proxy_spread, probe_spread = record["spread_kld_over_proxy"], record["spread_kld_over_probe"]
    print(f"max/min of KLD/proxy {proxy_spread:.2f}, of KLD/probe {probe_spread:.2f}")


if __name__ == "__main__":
    main()
