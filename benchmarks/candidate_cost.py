"""What a candidate set costs the budget's measurement pass, timed side by side in one process on
smollm2-135m (issues: the measurement pass must not grow more than 1.5x, resp. 2x, with the
candidates; which set becomes the default).

The measurement pass solves every linear with every candidate, so its time is the sum over the
candidates of one GPTQ solve each, block after block: the first `--blocks` decoder blocks (the
model cut after them) stand for the whole. Each set is `lowbit.allocate.sensitivity.measure` with
lowbit's solver settings on the quick protocol's calibration (128 x 512 C4 windows; `--nsamples`,
`--seqlen`), no checkpoint, no progress bar. The sets are timed in turn, `--repeats` rounds, the
order reversed every round, so drift on the machine falls on both; the result is each set's
median time, its time per block, and its ratio to the first set (lowbit's default candidates
unless `--sets` says otherwise).

    LOWBIT_DATA_DIR=../shared/data .venv/bin/python benchmarks/candidate_cost.py --blocks 3 \\
        --sets default s8=int2-g16-s8,nf3-g64-s8,... --out benchmarks/results/candidate_cost.json

Run it alone: two cores are easily shared, and a timing taken beside other work is not a result.
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

import lowbit
from lowbit.allocate.sensitivity import measure
from lowbit.data import calibration_data
from lowbit.models.adapters import decoder_blocks, get_adapter, quantizable_linears
from lowbit.recipe import Recipe


def candidate_sets(specs: list[str]) -> dict[str, tuple]:
    """`default` (lowbit's own), or NAME=FORMAT,FORMAT,...: the formats as `--candidates` parses them."""
    sets = {}
    for spec in specs:
        name, _, names = spec.partition("=")
        recipe = Recipe.build(budget_bpw=4.25, candidates=names or None)
        sets[name] = recipe.budget.candidates
    return sets


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--blocks", type=int, default=3, help="decoder blocks measured (the model is cut after them)")
    ap.add_argument("--sets", nargs="+", default=["default"], help="`default` or NAME=FORMAT,FORMAT,...")
    ap.add_argument("--repeats", type=int, default=2, help="rounds; the order is reversed every round")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    sets = candidate_sets(args.sets)
    loaded = lowbit.load_model(args.model)
    model = loaded.model
    adapter = get_adapter(model.config.model_type)
    blocks = decoder_blocks(model, adapter)
    del blocks[args.blocks :]
    layers = [name for name, _ in quantizable_linears(model, adapter)]
    recipe = Recipe.build(budget_bpw=4.25, nsamples=args.nsamples, seqlen=args.seqlen)
    cal = recipe.calibration
    windows = calibration_data(loaded.tokenizer, cal.source, cal.nsamples, cal.seqlen)
    seconds: dict[str, list[float]] = {name: [] for name in sets}
    order = list(sets)
    for r in range(args.repeats):
        for name in order if r % 2 == 0 else order[::-1]:
            t0 = time.perf_counter()
            with torch.no_grad():
                measure(model, adapter, layers, list(sets[name]), windows, recipe.solver, progress=False)
            seconds[name].append(time.perf_counter() - t0)
            print(f"round {r + 1}: {name} {seconds[name][-1]:.1f} s", flush=True)
    first = statistics.median(seconds[order[0]])
    record = {
        "script": "benchmarks/candidate_cost.py",
        "date": datetime.date.today().isoformat(),
        "command": shlex.join(sys.argv),
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, {torch.get_num_threads()} threads",
        "model": args.model,
        "blocks": args.blocks,
        "linears": len(layers),
        "calibration": [cal.nsamples, cal.seqlen],
        "sets": {
            name: {
                "candidates": [c.name for c in sets[name]],
                "seconds": seconds[name],
                "median_s": statistics.median(seconds[name]),
                "per_block_s": statistics.median(seconds[name]) / args.blocks,
                "vs_first": statistics.median(seconds[name]) / first,
            }
            for name in sets
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print("| set | candidates | median s | s per block | vs first |\n|---|---|---|---|---|")
    for name, x in record["sets"].items():
        cells = [name, str(len(x["candidates"])), f"{x['median_s']:.1f}", f"{x['per_block_s']:.1f}"]
        print("| " + " | ".join([*cells, f"{x['vs_first']:.2f}x"]) + " |")


if __name__ == "__main__":
    main()
