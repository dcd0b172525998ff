"""lowbit's GGUF files against llama.cpp's own quantization of the same float model, every file
scored by llama.cpp itself (`lowbit eval FILE --engine llama.cpp`), smollm2-135m, quick protocol.

llama.cpp's files: every 2-D tensor (token embedding included) in one type, by gguf.quants'
reference quantizers, which reproduce llama-quantize's for Q8_0, Q5_1, Q5_0, Q4_1 and Q4_0
without an importance matrix; norms F32; metadata copied from the source GGUF. (Files with an
importance matrix or the k-quant "_M" mixes need llama-quantize built from source; not here.
Q4_1 and Q5_1 contain smollm2's own grid, protocol.md: not a quality comparison.)

lowbit's files: `lowbit quantize smollm2-135m --target gguf --size S` (GPTQ; the budget's plan
over the default candidates per tensor, or `--candidates`; the embedding F16 or one of them)
with S chosen so that the exported GGUF is no larger than llama.cpp's file of that type, then
`lowbit export`; lowbit at a given file size (`bytes:N`: the exported GGUF at most N bytes, for
llama-quantize's files measured by gguf_imatrix.py); and the uniform `--bits 4 --target gguf`
(Q4_0) and `--format iq4_nl --target gguf`. Results land in WORK and a finished step is not
repeated.

    LOWBIT_DATA_DIR=../shared/data .venv/bin/python benchmarks/gguf_vs_llamacpp.py --work /tmp/gguf-bench

With `--quantize-args="--float-target"` (the `=` keeps argparse from reading it as an option)
every lowbit run gets those options too (its files and labels are marked with them).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter
from gguf.quants import dequantize, quantize

sys.path.insert(0, str(Path(__file__).parent))
from foundation import timed  # noqa: E402

from lowbit.formats import format_from_dict  # noqa: E402
from lowbit.models.loading import resolve_model_source  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "gguf_vs_llamacpp.json"
TYPES = ["Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0"]  # llama.cpp's files
SIZED = ["Q8_0", "Q5_0", "Q4_0"]  # lowbit at those files' sizes (Q4_1/Q5_1 hold smollm2's own grid: protocol.md)


def copy_metadata(reader: GGUFReader, writer: GGUFWriter, skip: tuple[str, ...] = ("general.file_type",)) -> None:
    """Every key of `reader` into `writer`, but the ones GGUFWriter writes itself and `skip`."""
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or key in skip:
            continue
        writer.add_key_value(key, field.contents(), field.types[0], field.types[-1] if len(field.types) > 1 else None)


def llama_file(source: Path, qtype: str, out: Path) -> int:
    """Every 2-D tensor of the dequantized source in `qtype`; returns the bytes of tensor data."""
    reader = GGUFReader(str(source))
    writer = GGUFWriter(str(out), str(reader.fields["general.architecture"].contents()))
    copy_metadata(reader, writer)
    data = 0
    for t in reader.tensors:
        w = dequantize(t.data, t.tensor_type).astype(np.float32)
        if w.ndim == 2:
            packed = quantize(w, GGMLQuantizationType[qtype])
            writer.add_tensor(t.name, packed, raw_dtype=GGMLQuantizationType[qtype])
            data += packed.nbytes
        else:
            writer.add_tensor(t.name, w)
            data += w.nbytes
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return data


def score(lowbit: str, gguf_file: Path, result: Path) -> dict:
    if not (result.is_file() and result.stat().st_size):
        cmd = [lowbit, "eval", str(gguf_file), "--engine", "llama.cpp", "--reference", "smollm2-135m", "--json"]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        result.write_text(out)
    return json.loads(result.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--lowbit", default=str(Path(sys.executable).with_name("lowbit")))
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument(
        "--runs",
        default="Q8_0,Q5_0,Q4_0,bits4,iq4_nl",
        help="lowbit's runs, in this order: a llama.cpp type (lowbit at that file's size), bytes:N (lowbit's "
        "GGUF at most N bytes), bits4, iq4_nl",
    )
    ap.add_argument(
        "--llama-types",
        default=",".join(TYPES),
        help="llama.cpp's files to build and score (comma-separated; empty for none)",
    )
    ap.add_argument(
        "--candidates",
        help="lowbit's budget candidates (`lowbit quantize --candidates`); default: the target's. On smollm2 "
        "give q2_k,q3_k,q4_0,iq4_nl,q5_0,q6_k,q8_0: Q4_K and Q5_K nearly reproduce its Q4_1 source grid",
    )
    ap.add_argument(
        "--quantize-args",
        default="",
        help="more options for every `lowbit quantize` (e.g. '--float-target'); its runs' files in WORK and "
        "labels are marked with them, so runs with and without share a work directory",
    )
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    extra = shlex.split(args.quantize_args)
    mark = "".join(f"+{o.lstrip('-')}" for o in extra)  # lowbit-iq4_nl+float-target...
    src = resolve_model_source("smollm2-135m")
    source = Path(src.path) / src.gguf_file
    rows = []
    for qtype in [t for t in args.llama_types.split(",") if t]:
        path = args.work / f"llama-{qtype}.gguf"
        if not path.exists():
            llama_file(source, qtype, path)
        ev = score(args.lowbit, path, args.work / f"llama-{qtype}.json")
        rows.append({"file": f"llama.cpp {qtype} (all 2-D tensors)", "bytes": path.stat().st_size, **_metrics(ev)})
        print(json.dumps(rows[-1]), flush=True)
    fixed = _fixed_bytes()
    runs = {  # tag: (label, options)
        q: (f"lowbit size<=llama {q}", ["--size", str(_budget(args.work / f"llama-{q}.gguf", fixed))])
        for q in SIZED
        if q in args.runs.split(",")
    }
    for tag in args.runs.split(","):
        if tag.startswith("bytes:"):
            limit = int(tag.split(":")[1])
            runs[tag] = (f"lowbit size<={limit / 1e6:.2f} MB", ["--size", str(fixed + limit - _overhead(source))])
    runs["bits4"] = ("lowbit --bits 4 (Q4_0 linears, F16 embedding)", ["--bits", "4"])
    runs["iq4_nl"] = ("lowbit --format iq4_nl (IQ4_NL linears, F16 embedding)", ["--format", "iq4_nl"])
    for tag in args.runs.split(","):
        label, options = runs[tag]
        label, options = (f"{label} {shlex.join(extra)}" if extra else label), [*options, *extra]
        name = tag.replace(":", "-") + mark
        art, out = args.work / f"lowbit-{name}", args.work / f"lowbit-{name}.gguf"
        if not out.exists():
            cmd = [args.lowbit, "quantize", "smollm2-135m", "--target", "gguf", *options, "--out", str(art)]
            cmd += ["--measurements", str(args.work / "measurements.json"), "--overwrite", "--json"]
            if args.candidates and options[0] == "--size":  # a budget
                cmd += ["--candidates", args.candidates]
            stdout, wall, rss = timed(cmd)
            (args.work / f"lowbit-{name}.quantize.json").write_text(
                json.dumps({**json.loads(stdout), "command_seconds": wall, "peak_rss_mb": rss})
            )
            subprocess.run([args.lowbit, "export", str(art), "--to", "gguf", "--out", str(out)], check=True)
        if tag.startswith("bytes:") and out.stat().st_size > int(tag.split(":")[1]):
            sys.exit(f"{out} is {out.stat().st_size} bytes, over the {tag} limit: raise _overhead's margin")
        q = json.loads((args.work / f"lowbit-{name}.quantize.json").read_text())
        budget = q.get("budget") or {}
        ev = score(args.lowbit, out, args.work / f"lowbit-{name}.json")
        row = {
            "file": label,
            "bytes": out.stat().st_size,
            "formats": (q.get("budget") or {}).get("formats"),
            "tables": {n: f and format_from_dict(f).name for n, f in (budget.get("tables") or {}).items()},
            "table_probe": (q.get("budget") or {}).get("table_probe"),
            "resumed_blocks": (q.get("pipeline") or {}).get("resumed_blocks", 0),  # a run resumed after a stop
            **_metrics(ev),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    # a uniform model in lowbit's own runtime: how far scoring through llama.cpp moves the figures
    uniform = [t for t in args.runs.split(",") if t in ("bits4", "iq4_nl")]
    if uniform:
        tag = uniform[0]
        name = tag + mark
        torch_eval = args.work / f"lowbit-{name}.torch.json"
        if not (torch_eval.is_file() and torch_eval.stat().st_size):
            cmd = [args.lowbit, "eval", str(args.work / f"lowbit-{name}"), "--reference", "smollm2-135m", "--json"]
            torch_eval.write_text(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
        label = f"{runs[tag][0]} {shlex.join(extra)}" if extra else runs[tag][0]
        rows.append(
            {
                "file": f"{label}, scored in lowbit's runtime (not llama.cpp)",
                "bytes": (args.work / f"lowbit-{name}.gguf").stat().st_size,
                **_metrics(json.loads(torch_eval.read_text())),
            }
        )
    command = " ".join([Path(sys.executable).name, *sys.argv])
    args.out.write_text(
        json.dumps(
            {"date": time.strftime("%Y-%m-%d"), "model": "smollm2-135m", "command": command, "rows": rows}, indent=1
        )
    )
    print("\n| file | MB | bpw over the file | KLD | ppl | top-1 |\n|---|---|---|---|---|---|")
    params = sum(int(t.n_elements) for t in GGUFReader(str(source)).tensors)
    for r in rows:
        print(
            f"| {r['file']} | {r['bytes'] / 1e6:.2f} | {8 * r['bytes'] / params:.3f} | {r['kld']:.4f} | {r['ppl']:.2f} "
            f"| {r['top1']:.4f} |"
        )


def _budget(llama_gguf: Path, fixed_bytes: int) -> int:
    """A --size that gives lowbit's quantized tensors exactly the bytes llama.cpp's file gives its
    own (every 2-D tensor's), on top of what lowbit's weights file holds besides them (norms in
    float16 and its header allowance: `fixed_bytes`). Norms go into both GGUF files as F32, so
    lowbit's file then holds no more tensor data than llama.cpp's."""
    reader = GGUFReader(str(llama_gguf))
    return fixed_bytes + sum(int(t.n_bytes) for t in reader.tensors if len(t.shape) == 2)


def _overhead(source: Path, margin: int = 4096) -> int:
    """What a GGUF of smollm2 holds besides its 2-D tensors (metadata, tokenizer, F32 norms),
    measured on the source file, plus `margin` for lowbit's few extra keys and per-tensor
    alignment padding (64 bytes and under 1 KB measured at Q4_0's size)."""
    reader = GGUFReader(str(source))
    return source.stat().st_size - sum(int(t.n_bytes) for t in reader.tensors if len(t.shape) == 2) + margin


def _fixed_bytes() -> int:
    """What lowbit's weights file of smollm2-135m holds besides the quantized tensors, under
    --target gguf with the tied embedding as a candidate (allocate.size)."""
    import lowbit
    from lowbit.allocate.plan import find_targets
    from lowbit.models.adapters import get_adapter

    model = lowbit.load_model("smollm2-135m").model
    recipe = lowbit.Recipe.build(size_bytes=10**12, target="gguf")
    return find_targets(model, get_adapter(model.config.model_type), recipe).size.fixed_bytes


def _metrics(ev: dict) -> dict:
    return {"kld": ev["kld"], "ppl": ev["perplexity"], "top1": ev["top1_agreement"], "eval_seconds": ev["seconds"]}


if __name__ == "__main__":
    main()
