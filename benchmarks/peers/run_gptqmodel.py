"""GPTQModel's GPTQ in its own environment (torch>=2.14.1); writes the dequantized weights."""

from __future__ import annotations

import os
import time

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")  # it over-subscribes a 2-core machine otherwise

import gptqmodel  # noqa: E402
from common import parse_args, read_windows, write_result  # noqa: E402
from gptqmodel import GPTQModel, QuantizeConfig  # noqa: E402


def main() -> None:
    args = parse_args("GPTQModel")
    windows = read_windows(args)
    qcfg = QuantizeConfig(
        bits=args.bits,
        group_size=args.group_size,
        sym=args.sym,
        desc_act=args.act_order,
        damp_percent=args.damp,
        offload_to_disk=False,  # keep the packed layers in memory so they can be dequantized here
    )
    model = GPTQModel.load(args.model, qcfg, device="cpu")
    calib = [{"input_ids": w.tolist(), "attention_mask": [1] * w.numel()} for w in windows]
    t0 = time.perf_counter()
    model.quantize(calib, batch_size=8)
    seconds = time.perf_counter() - t0
    weights = {}
    for name, mod in model.model.named_modules():
        if hasattr(mod, "qweight") and hasattr(mod, "dequantize_weight"):
            w = mod.dequantize_weight().float()
            if w.shape != (mod.out_features, mod.in_features):
                w = w.t()
            weights[name] = w
    meta = {"tool": "GPTQModel", "version": gptqmodel.__version__, "quantize_seconds": seconds, "config": vars(args)}
    write_result(args.out, weights, meta)


if __name__ == "__main__":
    main()
