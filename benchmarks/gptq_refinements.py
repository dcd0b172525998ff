"""What GPTQ's two refinements (diag(H)-weighted clip search, least-squares scale refit) do to
the layer output error, on every linear of smollm2-135m.

One measurement pass per solver variant (lowbit.allocate.sensitivity.measure: every layer solved
on float inputs, its Hessian-weighted output error recorded) with the formats of the GPTQ table
in BENCHMARKS.md; reported per format: the mean over the 210 linears of the relative output
error tr(ΔW H ΔWᵀ)/tr(W H Wᵀ), and the change against plain GPTQ. Fewer calibration windows than
the protocol's 128 (default 32, said in the results) to keep it to minutes: this compares solvers
on the same Hessians, it is not the pipeline's end-to-end error.

    LOWBIT_DATA_DIR=../shared/data .venv/bin/python benchmarks/gptq_refinements.py [--nsamples 32]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from foundation import MODEL  # noqa: E402

import lowbit  # noqa: E402
from lowbit.allocate.sensitivity import measure  # noqa: E402
from lowbit.data import calibration_data  # noqa: E402
from lowbit.formats import IntFormat  # noqa: E402
from lowbit.models.adapters import get_adapter, quantizable_linears  # noqa: E402
from lowbit.quantize import round_parameters  # noqa: E402
from lowbit.recipe import GPTQSettings  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "gptq_refinements.json"
FORMATS = [IntFormat(4, 128), IntFormat(3, 128), IntFormat(2, 64)]
VARIANTS = {
    "plain": GPTQSettings(clip_search=False, scale_refit=False),
    "clip search": GPTQSettings(clip_search=True, scale_refit=False),
    "clip search + scale refit": GPTQSettings(clip_search=True, scale_refit=True),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    loaded = lowbit.load_model(MODEL)
    model = loaded.model
    with torch.no_grad():
        round_parameters(model, torch.float16)
    adapter = get_adapter(model.config.model_type)
    names = [n for n, _ in quantizable_linears(model, adapter)]
    windows = calibration_data(loaded.tokenizer, "c4", args.nsamples, 512)
    results: dict = {"date": time.strftime("%Y-%m-%d"), "model": MODEL, "nsamples": args.nsamples, "layers": len(names)}
    results["variants"] = {}
    for label, settings in VARIANTS.items():
        t0 = time.perf_counter()
        meas = measure(model, adapter, names, FORMATS, windows, settings)
        row = {}
        for j, fmt in enumerate(FORMATS):
            rel = [meas.layers[n]["errors"][j] / meas.layers[n]["base"] for n in names]
            row[fmt.name] = sum(rel) / len(rel)
        results["variants"][label] = {"mean_relative_error": row, "seconds": time.perf_counter() - t0}
        print(label, json.dumps(row), flush=True)
    plain = results["variants"]["plain"]["mean_relative_error"]
    print("\n| solver | " + " | ".join(f.name for f in FORMATS) + " |\n|---|" + "---|" * len(FORMATS))
    for label, v in results["variants"].items():
        cells = [f"{v['mean_relative_error'][f.name]:.4f}" for f in FORMATS]
        if label != "plain":
            cells = [
                f"{c} ({(v['mean_relative_error'][f.name] / plain[f.name] - 1) * 100:+.0f} %)"
                for c, f in zip(cells, FORMATS, strict=True)
            ]
        print(f"| {label} | " + " | ".join(cells) + " |")
    args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
