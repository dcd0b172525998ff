"""auto-round (sign-gradient rounding) in its own environment; writes its fake-quantized weights."""

from __future__ import annotations

import time

import auto_round
import torch
from auto_round import AutoRound
from common import parse_args, read_windows, write_result
from transformers import AutoModelForCausalLM, AutoTokenizer


def main() -> None:
    args = parse_args("auto-round")
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(args.model)
    windows = read_windows(args)
    names = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n}
    t0 = time.perf_counter()
    ar = AutoRound(
        model,
        tokenizer=tok,
        bits=args.bits,
        group_size=args.group_size,
        sym=args.sym,
        iters=args.iters,
        nsamples=windows.shape[0],
        seqlen=windows.shape[1],
        dataset=[{"input_ids": w[None], "attention_mask": torch.ones_like(w[None])} for w in windows],
        device_map="cpu",
    )
    qmodel, _ = ar.quantize()
    seconds = time.perf_counter() - t0
    state = qmodel.state_dict()
    weights = {n: state[f"{n}.weight"] for n in names if f"{n}.weight" in state}
    meta = {"tool": "auto-round", "version": auto_round.__version__, "quantize_seconds": seconds, "config": vars(args)}
    write_result(args.out, weights, meta)


if __name__ == "__main__":
    main()
