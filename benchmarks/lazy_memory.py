"""Peak memory of quantizing with lazy, block-by-block weights (models/lazy.py) against loading
the whole model first (`--no-lazy`), side by side in one run.

Part `smollm2`: smollm2-135m, GPTQ int4 g128 on 128 x 512 C4 windows, no evaluation: wall time
and peak RSS of the whole `lowbit quantize` command, lazy and whole, alternating. With
`--before DIR` (a checkout of an earlier commit), lazy runs of that code alternate with lazy
runs of this one instead, for a before/after comparison in one run.

Part `big`: a randomly initialised Llama-architecture model (TinyLlama-1.1B's shape with
smollm2's tokenizer: 22 blocks of width 2048, MLP 5632, vocabulary 49152, tied embedding) saved as
bfloat16 safetensors shards, quantized lazily with RTN and with GPTQ on a few windows: its file
size against the command's peak RSS, and the time per block.

Where the machine lets a process make cgroup (v1) memory groups, every command runs in one, and
its peak anonymous memory is sampled (`anon_peak_mb`: what it must hold resident; RSS also counts
file pages the kernel may drop). With `--memory-limit MB` that group's memory limit is MB MiB: a hard
bound on what it may hold resident (this machine has no swap; page cache, the safetensors file
mappings and `--offload-activations disk` files count too, but the kernel can drop or write them
back). A run that needs more is killed, and the benchmark stops there. smollm2 then alternates an
unlimited lazy run with a limited one, side by side, and the big model runs under the limit.
`--extra` appends options to the limited runs (e.g. `--offload-activations disk`); `--key` names
the smollm2 part's entry in the results file, so a limited comparison does not replace the others.

    LOWBIT_DATA_DIR=../shared/data .venv/bin/python benchmarks/lazy_memory.py --work /tmp/lazy-bench
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from foundation import timed  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "lazy_memory.json"
BIG = {
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 22,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "vocab_size": 49152,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": True,
}


def make_big_model(folder: Path, shard_bytes: int = 1 << 30) -> int:
    """The random model as bfloat16 shards with an index; returns the bytes of its weights."""
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    import lowbit

    if (folder / "model.safetensors.index.json").is_file():
        return sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    folder.mkdir(parents=True, exist_ok=True)
    config = AutoConfig.for_model("llama", **BIG, dtype="bfloat16")
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    names = [n for n in skeleton.state_dict() if n != "lm_head.weight"]
    weight_map, shard, size, index, total = {}, {}, 0, 0, 0
    gen = torch.Generator().manual_seed(0)

    def flush() -> None:
        nonlocal shard, size, index
        if shard:
            file = f"model-{index:05d}.safetensors"
            save_file(shard, str(folder / file), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, file))
            shard, size, index = {}, 0, index + 1

    for name in names:
        shape = skeleton.get_parameter(name).shape
        t = torch.ones(shape) if name.endswith("norm.weight") else torch.randn(shape, generator=gen) * 0.02
        shard[name] = t.to(torch.bfloat16)
        size += shard[name].numel() * 2
        total += shard[name].numel() * 2
        if size >= shard_bytes:
            flush()
    flush()
    index_json = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index_json))
    config.save_pretrained(folder)
    lowbit.load_model("smollm2-135m").tokenizer.save_pretrained(folder)
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


CGROUPS = Path("/sys/fs/cgroup/memory")


@contextmanager
def memory_cgroup(limit_mb: int | None):
    """A cgroup v1 memory group, limited to `limit_mb` MiB when given (None where this machine
    has no writable cgroup v1 memory controller and no limit was asked for)."""
    group = CGROUPS / f"lowbit-bench-{os.getpid()}"
    try:
        group.mkdir()
    except OSError:
        if limit_mb is not None:
            raise
        yield None
        return
    try:
        if limit_mb is not None:
            (group / "memory.limit_in_bytes").write_text(str(limit_mb << 20))
        yield group
    finally:
        group.rmdir()


class AnonPeak:
    """The largest anonymous (non-file, non-evictable without swap) memory of a cgroup, sampled
    every 0.2 s from memory.stat: what a run needs resident, where RSS also counts file pages
    (libraries, the mapped model, activation files) that the kernel can drop under pressure."""

    def __init__(self, group: Path) -> None:
        self.stat, self.peak, self._stop = group / "memory.stat", 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.2):
            for line in self.stat.read_text().splitlines():
                if line.startswith("rss "):
                    self.peak = max(self.peak, int(line.split()[1]))

    def __enter__(self) -> AnonPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def run(lowbit: str, args: list[str], out: Path, code: Path | None = None, group: Path | None = None) -> dict:
    """One `lowbit quantize`; with `code`, that checkout's lowbit package is imported instead;
    with `group`, the command runs in that memory cgroup."""
    shutil.rmtree(out, ignore_errors=True)
    env = None if code is None else {**os.environ, "PYTHONPATH": str(code.resolve())}
    join = None
    if group is not None:
        (group / "memory.max_usage_in_bytes").write_text("0")
        procs = str(group / "cgroup.procs")

        def join() -> None:
            with open(procs, "w") as f:
                f.write(str(os.getpid()))

    cmd = [lowbit, "quantize", *args, "--out", str(out), "--overwrite", "--json"]
    with AnonPeak(group) if group is not None else nullcontext() as anon:
        stdout, wall, rss = timed(cmd, env, preexec_fn=join)
    summary = json.loads(stdout)
    manifest = json.loads((out / "lowbit_manifest.json").read_text())
    pipeline = manifest["stats"].get("pipeline") or {}
    shutil.rmtree(out, ignore_errors=True)
    return {
        "args": args,
        "command_seconds": wall,
        "peak_rss_mb": rss,
        "quantize_seconds": manifest["stats"]["quantize_seconds"],
        "pipeline": pipeline,
        "artifact_bytes": summary["artifact_bytes"],
        **(
            {}
            if group is None
            else {
                "anon_peak_mb": anon.peak / 2**20,
                "memory_limit_mb": limit
                if (limit := int((group / "memory.limit_in_bytes").read_text()) >> 20) < 2**40
                else None,
                # the group's peak: resident memory plus the page cache it was charged for
                "cgroup_peak_mb": int((group / "memory.max_usage_in_bytes").read_text()) / 2**20,
                "limit_hits": int((group / "memory.failcnt").read_text()),
            }
        ),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--lowbit", default=str(Path(sys.executable).with_name("lowbit")))
    ap.add_argument("--parts", default="smollm2,big", help="smollm2, big (comma-separated)")
    ap.add_argument("--repeats", type=int, default=1, help="alternating lazy/whole pairs for smollm2")
    ap.add_argument("--before", type=Path, help="smollm2: compare lazy runs with this checkout's code (before/after)")
    ap.add_argument("--big-runs", default="rtn,gptq", help="the big model's runs: rtn, gptq (comma-separated)")
    ap.add_argument("--big-windows", type=int, default=8, help="GPTQ calibration windows (512 tokens) on the big model")
    ap.add_argument("--memory-limit", type=int, help="run every command in a cgroup limited to this many MiB")
    ap.add_argument("--extra", default="", help="options appended to every lowbit quantize under --memory-limit")
    ap.add_argument("--key", default="smollm2", help="the smollm2 part's entry in the results file")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    extra = shlex.split(args.extra)
    args.work.mkdir(parents=True, exist_ok=True)
    result: dict = {"date": time.strftime("%Y-%m-%d"), "command": shlex.join([Path(sys.executable).name, *sys.argv])}
    if args.out.is_file():  # keep the other part's rows when one part is rerun
        result = {**json.loads(args.out.read_text()), **result}
    parts = args.parts.split(",")
    if "smollm2" in parts:
        gptq = ["smollm2-135m", "--bits", "4", "--group-size", "128"]
        rows = []
        # (label, lazy, code, memory limit, extra options)
        variants = (
            [("before", True, args.before, None, []), ("after", True, None, None, [])]
            if args.before
            # the limited run beside the unlimited lazy one (the whole-model path is not meant to fit a limit)
            else [("lazy", True, None, None, []), ("lazy, limited", True, None, args.memory_limit, extra)]
            if args.memory_limit
            else [("lazy", True, None, None, []), ("whole", False, None, None, [])]
        )
        for r in range(args.repeats):
            for label, lazy, code, limit, options in variants:
                flag = "--lazy" if lazy else "--no-lazy"
                with memory_cgroup(limit) as group:
                    row = run(args.lowbit, [*gptq, flag, *options], args.work / "smollm2-art", code, group)
                rows.append({"run": label, "lazy": lazy, "repeat": r, **row})
                print(json.dumps({k: v for k, v in rows[-1].items() if k != "pipeline"}), flush=True)
        before = None
        if args.before:
            git = ["git", "-C", str(args.before), "rev-parse", "HEAD"]
            commit = subprocess.run(git, capture_output=True, text=True)
            before = {"path": str(args.before), "commit": commit.stdout.strip()}
        result[args.key] = {"command": result["command"], "date": result["date"], "before": before, "runs": rows}
    if "big" in parts:
        folder = args.work / "big-llama"
        file_bytes = make_big_model(folder)
        params = file_bytes // 2  # bfloat16
        wanted = args.big_runs.split(",")
        suffix = "" if args.memory_limit is None else f" under {args.memory_limit} MiB"
        rerun = {w + suffix for w in wanted}
        rows = [r for r in (result.get("big") or {}).get("runs", []) if r["run"] not in rerun]  # kept from before
        for label, options in (
            ("rtn", ["--method", "rtn"]),
            ("gptq", ["--nsamples", str(args.big_windows), "--calib-seqlen", "512"]),
        ):
            if label not in wanted:
                continue
            label += suffix
            big = [str(folder), "--bits", "4", "--group-size", "128", *options, *(extra if args.memory_limit else [])]
            with memory_cgroup(args.memory_limit) as group:
                row = run(args.lowbit, big, args.work / "big-art", group=group)
            row["per_block_seconds"] = row["quantize_seconds"] / BIG["num_hidden_layers"]
            row["rss_over_file"] = row["peak_rss_mb"] * 2**20 / file_bytes
            rows.append({"run": label, "file_bytes": file_bytes, **row})
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "pipeline"}), flush=True)
            result["big"] = {"config": BIG, "file_bytes": file_bytes, "params": params, "runs": rows}
            rows[-1]["command"], rows[-1]["date"] = result["command"], result["date"]  # each run's own
            args.out.write_text(json.dumps(result, indent=1))  # after every run: the GPTQ one is long
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
