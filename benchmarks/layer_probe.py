"""Per-layer KL probe: each linear alone replaced by its GPTQ solution at one candidate, the
model's KL divergence from float on the probe windows, against the `kl` proxy's prediction.

The `kl` weighting scales each layer's relative error by a KL-per-unit-error measured per layer
role and bit width, the same at every depth. Plans that demote a few layers to a narrower grid
lose far more end to end than it predicts (a plan of nf4-g128 with 32 layers at nf3-g64: KLD
0.193 where uniform nf4-g128 has 0.128, the proxy +12 %). This measures, layer by layer, what
one layer at `--candidate` costs: Hessians from the 128 x 512 C4 calibration windows (the
measurement pass's), GPTQ with lowbit's default settings, KL on the first 4 windows (as the role
probe scores). Each row: the KL, the proxy's value for that layer and candidate, and their
ratio (`factor`: 1 where the role probe's scale is right for this layer).

    LOWBIT_DATA_DIR=../shared/data .venv/bin/python benchmarks/layer_probe.py \\
        --measurements /tmp/frontier3/measurements.json --candidate nf3-g64 \\
        --out benchmarks/results/layer_probe.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

import lowbit
from lowbit.allocate.kl_probe import probe_windows
from lowbit.allocate.sensitivity import Measurements
from lowbit.data import calibration_data
from lowbit.formats import format_from_dict
from lowbit.quantize import round_parameters
from lowbit.recipe import GPTQSettings
from lowbit.solvers.gptq import gptq_quantize, hessian_weighted_error


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--measurements", type=Path, required=True)
    ap.add_argument("--candidate", default="nf3-g64", help="the format each layer is probed at")
    ap.add_argument(
        "--direction",
        choices=["gptq", "rtn"],
        default="gptq",
        help="rtn: move the weight toward its round-to-nearest grid until its error is GPTQ's, as the role probe does",
    )
    ap.add_argument("--layers", help="comma-separated layer names (default: every measured one)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    meas = Measurements.load(args.measurements)
    names = [format_from_dict(c).name for c in meas.candidates]
    j = names.index(args.candidate)
    fmt = format_from_dict(meas.candidates[j])
    loaded = lowbit.load_model("smollm2-135m")
    model = loaded.model
    t0 = time.perf_counter()
    hessians: dict[str, torch.Tensor] = {}
    hooks = []

    def observe(name):
        def hook(module, inputs, output):
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).float()
            hessians[name] = hessians.get(name, 0) + x.T @ x

        return hook

    layers = args.layers.split(",") if args.layers else list(meas.layers)
    for name in layers:
        hooks.append(model.get_submodule(name).register_forward_hook(observe(name)))
    with torch.no_grad():
        round_parameters(model, torch.float16)  # as `lowbit quantize` does before it measures
        calib = calibration_data(loaded.tokenizer, "c4", 128, 512)
        for i in tqdm(range(0, len(calib), 8), desc="Hessians"):
            model(calib[i : i + 8])
        for h in hooks:
            h.remove()
        windows = probe_windows(calib)
        reference = torch.log_softmax(model(windows).logits.float(), -1)

        def kl() -> float:
            logq = torch.log_softmax(model(windows).logits.float(), -1)
            return (reference.exp() * (reference - logq)).sum(-1).mean().item()

        rows = {}
        for name in tqdm(layers, desc=f"layers at {args.candidate}"):
            linear = model.get_submodule(name)
            w0 = linear.weight.data.clone()
            h = hessians.pop(name)
            if args.direction == "gptq":
                moved = gptq_quantize(w0.float(), h, fmt, **GPTQSettings().solver_options()).qt.dequantize()
            else:  # as kl_probe's role probe: RTN's direction, GPTQ's measured size
                w = w0.float().double()
                step = fmt.quantize_tensor(w0.float()).dequantize().double() - w
                rtn = hessian_weighted_error(step, h.double()) / hessian_weighted_error(w, h.double())
                moved = (w + (meas.weighted_errors(name)[j] / rtn) ** 0.5 * step).float()
            linear.weight.data = moved.to(w0.dtype)
            value = kl()
            linear.weight.data = w0
            proxy = meas.weighted_errors(name, "kl")[j]
            rows[name] = {
                "kl": value,
                "proxy": proxy,
                "relative": meas.weighted_errors(name)[j],
                "factor": value / proxy,
            }
    factors = [r["factor"] for r in rows.values()]
    record = {
        "date": datetime.date.today().isoformat(),
        "command": shlex.join(sys.argv),
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}",
        "candidate": args.candidate,
        "direction": args.direction,
        "seconds": time.perf_counter() - t0,
        "median_factor": statistics.median(factors),
        "summed_kl": sum(r["kl"] for r in rows.values()),
        "summed_proxy": sum(r["proxy"] for r in rows.values()),
        "layers": rows,
    }
    args.out.write_text(json.dumps(record, indent=1))
    ranked = sorted(rows.items(), key=lambda kv: kv[1]["factor"])
    print(f"median factor {record['median_factor']:.2f}; lowest and highest:")
    for name, r in ranked[:5] + ranked[-12:]:
        print(f"  {name:36s} KL {r['kl']:.5f} proxy {r['proxy']:.5f} factor {r['factor']:.2f}")


if __name__ == "__main__":
    main()
