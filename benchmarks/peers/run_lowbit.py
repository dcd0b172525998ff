"""lowbit's GPTQ through the same driver interface as the peers (lowbit environment)."""

from __future__ import annotations

import time

import torch
from common import parse_args, read_windows, write_result
from transformers import AutoModelForCausalLM

import lowbit
from lowbit.recipe import GPTQSettings
from lowbit.runtime import QuantizedLinear


def main() -> None:
    args = parse_args("lowbit")
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    windows = read_windows(args)
    t0 = time.perf_counter()
    settings = GPTQSettings(percdamp=args.damp, act_order=args.act_order)
    kw = {"bits": args.bits, "group_size": args.group_size, "symmetric": args.sym, "gptq": settings}
    lowbit.quantize(model, calib=windows, progress=False, **kw)
    seconds = time.perf_counter() - t0
    weights = {n: m.dequantized_weight() for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    meta = {"tool": "lowbit", "version": lowbit.__version__, "quantize_seconds": seconds, "config": vars(args)}
    write_result(args.out, weights, meta)


if __name__ == "__main__":
    main()
