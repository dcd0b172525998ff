"""llama.cpp's best files of smollm2-135m: llama-quantize with and without an importance matrix
(llama-imatrix on the C4 sample, 128 chunks of 512 tokens: the corpus lowbit calibrates on),
including the k-quant "_M" mixes, every file scored by llama.cpp itself (`lowbit eval FILE
--engine llama.cpp`, quick protocol). These are the files lowbit's GGUF must beat at equal size
(benchmarks/gguf_vs_llamacpp.py has lowbit's rows).

Needs llama-quantize and llama-imatrix: `bash benchmarks/setup_llamacpp_tools.sh TOOLS`.
The source handed to llama-quantize is the float model as F32 GGUF (the dequantized smollm2 file:
the reference every KLD here is measured against). smollm2's rows are 576 wide, so llama-quantize
falls back from k-quants to Q5_0/Q4_0/Q8_0 on most tensors: sizes are what the files hold.

    LOWBIT_DATA_DIR=../shared/data .venv/bin/python benchmarks/gguf_imatrix.py \\
        --tools /tmp/llamacpp-tools/bin --work /tmp/gguf-bench
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from gguf import GGUFReader, GGUFWriter
from gguf.quants import dequantize

sys.path.insert(0, str(Path(__file__).parent))
from gguf_vs_llamacpp import _metrics, copy_metadata, score  # noqa: E402

from lowbit.models.loading import resolve_model_source  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "gguf_imatrix.json"
# (llama-quantize type, with the importance matrix)
FILES = [
    ("Q4_K_M", False),
    ("Q3_K_M", False),
    ("Q2_K", False),
    ("Q4_0", True),
    ("IQ4_NL", True),
    ("Q4_K_M", True),
    ("Q3_K_M", True),
    ("Q2_K", True),
]


def float_file(source: Path, out: Path) -> None:
    """The source GGUF with every tensor dequantized to F32, metadata copied."""
    reader = GGUFReader(str(source))
    writer = GGUFWriter(str(out), str(reader.fields["general.architecture"].contents()))
    copy_metadata(reader, writer)
    for t in reader.tensors:
        writer.add_tensor(t.name, dequantize(t.data, t.tensor_type).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tools", type=Path, required=True, help="folder holding llama-quantize and llama-imatrix")
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--lowbit", default=str(Path(sys.executable).with_name("lowbit")))
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument(
        "--files",
        help="comma-separated subset, e.g. Q4_K_M,Q4_0-imatrix (default: all; scores are cached in --work)",
    )
    args = ap.parse_args()
    files = FILES
    if args.files:
        wanted = args.files.split(",")
        files = [(q, i) for q, i in FILES if f"{q}{'-imatrix' if i else ''}" in wanted]
    args.work.mkdir(parents=True, exist_ok=True)
    src = resolve_model_source("smollm2-135m")
    f32 = args.work / "smollm2-f32.gguf"
    if not f32.exists():
        float_file(Path(src.path) / src.gguf_file, f32)
    imatrix = args.work / "imatrix.gguf"
    if not imatrix.exists():
        text = Path(os.environ["LOWBIT_DATA_DIR"]) / "c4-sample" / "c4.utf8"
        cmd = [str(args.tools / "llama-imatrix"), "-m", str(f32), "-f", str(text), "-o", str(imatrix)]
        subprocess.run([*cmd, "--chunks", "128", "-c", "512", "-t", "2"], check=True, capture_output=True)
    params = sum(int(t.n_elements) for t in GGUFReader(str(f32)).tensors)
    rows = []
    for qtype, use_imatrix in files:
        tag = f"llama-{qtype}{'-imatrix' if use_imatrix else ''}"
        path = args.work / f"{tag}.gguf"
        if not path.exists():
            cmd = [str(args.tools / "llama-quantize")]
            cmd += ["--imatrix", str(imatrix)] if use_imatrix else []
            subprocess.run([*cmd, str(f32), str(path), qtype, "2"], check=True, capture_output=True)
        ev = score(args.lowbit, path, args.work / f"{tag}.json")
        types = sorted({t.tensor_type.name for t in GGUFReader(str(path)).tensors})
        size = path.stat().st_size
        rows.append({"file": tag, "bytes": size, "bpw_file": 8 * size / params, "tensor_types": types, **_metrics(ev)})
        print(json.dumps(rows[-1]), flush=True)
    args.out.write_text(
        json.dumps(
            {"date": time.strftime("%Y-%m-%d"), "model": "smollm2-135m", "command": " ".join(sys.argv), "rows": rows},
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
