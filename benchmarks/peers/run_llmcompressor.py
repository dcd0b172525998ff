"""llm-compressor's GPTQ in its own environment; writes the weights it leaves fake-quantized.

After `oneshot` the quantized linears hold the dequantized weights (compression happens only
when saving), so they can be read back directly."""

from __future__ import annotations

import time

import llmcompressor
import torch
from common import parse_args, read_windows, write_result
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import GPTQModifier
from transformers import AutoModelForCausalLM, AutoTokenizer


def main() -> None:
    args = parse_args("llm-compressor")
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(args.model)
    windows = read_windows(args)
    names = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n}
    data = Dataset.from_dict({"input_ids": windows.tolist(), "attention_mask": torch.ones_like(windows).tolist()})
    weights = QuantizationArgs(
        num_bits=args.bits,
        type="int",
        symmetric=args.sym,
        strategy="group",
        group_size=args.group_size,
        actorder="static" if args.act_order else None,
    )
    recipe = GPTQModifier(
        config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights)},
        ignore=["lm_head"],
        dampening_frac=args.damp,
        block_size=128,
    )
    t0 = time.perf_counter()
    oneshot(
        model=model,
        tokenizer=tok,
        dataset=data,
        recipe=recipe,
        max_seq_length=windows.shape[1],
        num_calibration_samples=windows.shape[0],
        shuffle_calibration_samples=False,
    )
    seconds = time.perf_counter() - t0
    state = model.state_dict()
    out = {n: state[f"{n}.weight"] for n in names if f"{n}.weight" in state}
    meta = {
        "tool": "llm-compressor",
        "version": llmcompressor.__version__,
        "quantize_seconds": seconds,
        "config": vars(args),
    }
    write_result(args.out, out, meta)


if __name__ == "__main__":
    main()
