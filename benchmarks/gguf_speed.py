"""Prompt and decode speed in llama.cpp of a lowbit GGUF file against llama.cpp's own file of
the very same tensor types (gguf.quants' reference quantizers, tensor by tensor), side by side in
one run: the ratio should be 1.0, since the engine runs the same kernels on the same types.

Each file is served by xllamacpp (prebuilt llama.cpp, 2 threads); a request is a 256-token
prompt and 64 generated tokens (greedy); llama.cpp's own `timings` give prompt and decode
tokens per second. The files alternate A, B, A, B ... for `--repeats` rounds after one warm-up
each; the table gives medians and the ratio lowbit / llama.cpp. Nothing else may run meanwhile.

    .venv/bin/python benchmarks/gguf_speed.py --lowbit-gguf /tmp/gguf-bench/lowbit-bits4.gguf
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter
from gguf.quants import dequantize, quantize

sys.path.insert(0, str(Path(__file__).parent))
from gguf_vs_llamacpp import copy_metadata  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "gguf_speed.json"


def same_types_file(lowbit_gguf: Path, out: Path) -> None:
    """llama.cpp's own quantization of the file's float weights, every tensor in the type the
    lowbit file gives it (the source is the lowbit file's own dequantized tensors: speed does not
    depend on the values)."""
    reader = GGUFReader(str(lowbit_gguf))
    writer = GGUFWriter(str(out), str(reader.fields["general.architecture"].contents()))
    copy_metadata(reader, writer, skip=())
    for t in reader.tensors:
        w = dequantize(t.data, t.tensor_type).astype(np.float32)
        qtype = t.tensor_type
        if qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
            writer.add_tensor(t.name, w.astype(np.float16 if qtype == GGMLQuantizationType.F16 else np.float32))
        else:
            writer.add_tensor(t.name, quantize(w, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def serve(path: Path):
    import xllamacpp

    params = xllamacpp.CommonParams()
    params.model.path = str(path)
    params.n_ctx = 512
    params.n_parallel = 1
    params.cpuparams.n_threads = params.cpuparams_batch.n_threads = 2
    return xllamacpp.Server(params)


def timings(server, prompt: list[int]) -> dict:
    request = {"prompt": prompt, "n_predict": 64, "temperature": 0, "ignore_eos": True, "cache_prompt": False}
    t = server.handle_completions(request)["timings"]
    return {"prompt_tps": t["prompt_per_second"], "decode_tps": t["predicted_per_second"]}


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lowbit-gguf", type=Path, required=True)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    reference = args.lowbit_gguf.with_name(args.lowbit_gguf.stem + ".llama-same-types.gguf")
    if not reference.exists():
        same_types_file(args.lowbit_gguf, reference)
    prompt = list(np.random.default_rng(0).integers(100, 40000, 256))
    prompt = [int(x) for x in prompt]
    files = {"lowbit": args.lowbit_gguf, "llama.cpp": reference}
    servers = {name: serve(path) for name, path in files.items()}
    runs: dict[str, list[dict]] = {name: [] for name in files}
    for server in servers.values():
        timings(server, prompt)  # warm-up
    for _ in range(args.repeats):
        for name, server in servers.items():
            runs[name].append(timings(server, prompt))
    med = {n: {k: statistics.median(r[k] for r in rs) for k in ("prompt_tps", "decode_tps")} for n, rs in runs.items()}
    ratio = {k: med["lowbit"][k] / med["llama.cpp"][k] for k in ("prompt_tps", "decode_tps")}
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": f"{_cpu_name()}, {os.cpu_count()} CPUs",
        "files": {n: str(p) for n, p in files.items()},
        "runs": runs,
        "median": med,
        "ratio_lowbit_over_llamacpp": ratio,
    }
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps({"median": med, "ratio": ratio}, indent=1))


if __name__ == "__main__":
    main()
