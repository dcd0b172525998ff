"""Writing a lowbit artifact as a GGUF file that llama.cpp (Ollama, LM Studio ...) loads.

The quantized layers go in as the ggml types whose grids they already are (lowbit.formats.ggml):
their codes and scales are repacked into blocks, never re-rounded. Tensors kept in float go in
as F32 (one-dimensional: norms, biases) or F16. Llama's q/k projections are stored with their
rows permuted, as llama.cpp's converter does (a whole row moves, its blocks with it).

The metadata (architecture keys, tokenizer, chat template) is copied from the source model's
own GGUF file, key by key, as gguf-py's gguf_new_metadata does; for a Hugging Face source it is
written from its config and tokenizer files (lowbit.export.gguf_metadata).
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from gguf import (
    MODEL_ARCH_NAMES,
    GGMLQuantizationType,
    GGUFReader,
    GGUFValueType,
    GGUFWriter,
    LlamaFileType,
    get_tensor_name_map,
)
from safetensors import safe_open

from lowbit.artifact import WEIGHTS, read_manifest
from lowbit.errors import ArtifactError, FormatError
from lowbit.eval.llamacpp import SOURCE_KEY
from lowbit.export.gguf_metadata import Shape, hf_metadata
from lowbit.formats import format_from_dict
from lowbit.formats.ggml import ggml_type, pack_blocks
from lowbit.layers import QuantizedLayer, quantized_layers
from lowbit.models.loading import resolve_model_source
from lowbit.targets import TARGETS

# architectures whose llama.cpp graph reads q/k rows in GGUF's permuted order
_PERMUTED_QK = {"llama"}
_ARCH_BY_NAME = {name: arch for arch, name in MODEL_ARCH_NAMES.items()}
# architectures whose RMSNorm weights are stored as w - 1 by Hugging Face (Gemma: x * (1 + w))
_UNIT_OFFSET_NORMS = {"gemma3"}


def check_artifact_fits(manifest: dict) -> None:
    """Refuse an artifact holding a format GGUF cannot (naming the first such layer and the
    nearest format it can), or a tensor whose rows do not split into blocks."""
    target = TARGETS["gguf"]
    for name, rec in manifest["layers"].items():
        fmt = format_from_dict(rec["format"])
        target.check(fmt, f"layer {name}")
        target.check_shape(name, rec["shape"][1], fmt)


def _source_metadata(manifest: dict) -> tuple[Shape, Callable[[GGUFWriter], None]]:
    """The source's shape and a writer of its metadata: copied from a GGUF source, written from a
    Hugging Face source's files."""
    source = manifest.get("source")
    if not source:
        raise FormatError("the artifact does not name its source model, whose metadata (tokenizer ...) GGUF needs")
    found = resolve_model_source(source)
    if found.kind != "gguf":
        return hf_metadata(Path(found.path))
    reader = GGUFReader(str(Path(found.path) / found.gguf_file))
    arch = str(reader.fields["general.architecture"].contents())
    if arch not in _ARCH_BY_NAME:
        raise FormatError(f"the source's architecture {arch!r} is unknown to the gguf package")
    heads = int(reader.fields[f"{arch}.attention.head_count"].contents())
    kv_key = f"{arch}.attention.head_count_kv"
    kv_heads = int(reader.fields[kv_key].contents()) if kv_key in reader.fields else heads
    shape = Shape(arch, int(reader.fields[f"{arch}.block_count"].contents()), heads, kv_heads)

    def copy(writer: GGUFWriter) -> None:
        for key, field in reader.fields.items():
            if key.startswith("GGUF.") or key in ("general.architecture", "general.file_type"):
                continue
            sub = field.types[-1] if field.types[0] == GGUFValueType.ARRAY else None
            writer.add_key_value(key, field.contents(), field.types[0], sub)

    return shape, copy


def _permute(rows: np.ndarray, heads: int) -> np.ndarray:
    """Llama's q/k rows as GGUF stores them (llama.cpp's convert_hf_to_gguf permute)."""
    out = rows.shape[0]
    return rows.reshape(heads, 2, out // heads // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def _float(t: torch.Tensor) -> np.ndarray:
    return t.float().numpy() if t.dim() <= 1 else t.to(torch.float16).numpy()


def export_gguf(artifact: str | os.PathLike, out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write the artifact directory `artifact` as the GGUF file `out` (atomically: a temporary
    file, renamed when complete); refused if `out` exists, unless `overwrite`."""
    artifact, out = Path(artifact), Path(out)
    if out.exists() and not overwrite:
        raise ArtifactError(f"output file {out} already exists; pass --overwrite or choose another --out")
    if out.is_dir():
        raise ArtifactError(f"output path {out} is a directory; give a file name such as model.gguf")
    manifest = read_manifest(artifact)
    check_artifact_fits(manifest)
    shape, write_metadata = _source_metadata(manifest)
    arch_name, heads, kv_heads = shape.arch, shape.heads, shape.kv_heads
    layers = {layer.name: layer for layer in quantized_layers(artifact)}
    names = get_tensor_name_map(_ARCH_BY_NAME[arch_name], shape.blocks)

    def gguf_name(hf: str) -> str:
        mapped = names.get_name(hf, try_suffixes=(".weight", ".bias"))
        if mapped is None:
            raise FormatError(f"tensor {hf} has no GGUF name for architecture {arch_name}")
        return mapped

    def permuted(gname: str, rows: np.ndarray) -> np.ndarray:
        if arch_name in _PERMUTED_QK and gname.endswith("attn_q.weight"):
            return _permute(rows, heads)
        if arch_name in _PERMUTED_QK and gname.endswith("attn_k.weight"):
            return _permute(rows, kv_heads)
        return rows

    tensors: list[tuple[str, np.ndarray, GGMLQuantizationType | None]] = []
    used: Counter[str] = Counter()
    with safe_open(str(artifact / WEIGHTS), "pt") as f:
        packed_keys = {f"{n}.{k}" for n, x in layers.items() for k in x.format.packed_buffers(*x.shape)}
        for key in f.keys():
            if key in packed_keys:
                owner = key.rsplit(".", 1)[0]
                if key.endswith(".qweight"):
                    layer: QuantizedLayer = layers[owner]
                    gname = gguf_name(f"{owner}.weight")
                    t = ggml_type(layer.format)
                    tensors.append((gname, permuted(gname, pack_blocks(layer.tensor)), t.qtype))
                    used[t.name] += 1
                continue
            gname = gguf_name(key)
            t = f.get_tensor(key)
            if arch_name in _UNIT_OFFSET_NORMS and gname.endswith("norm.weight"):
                t = t.float() + 1.0  # Gemma's norms scale by (1 + w); llama.cpp's by w
            tensors.append((gname, permuted(gname, _float(t)), None))
    tensors.sort(key=lambda x: _order(x[0]))

    writer_out = out.with_name(f".{out.name}.partial-{os.getpid()}")
    writer = GGUFWriter(str(writer_out), arch_name)
    try:
        write_metadata(writer)
        if manifest.get("source"):
            writer.add_string(SOURCE_KEY, manifest["source"])
        if used:
            common = used.most_common(1)[0][0]
            # the file type only labels the file; the k-quants have it per mix (_S: mostly that type)
            names = LlamaFileType.__members__
            label = next((n for n in (f"MOSTLY_{common}", f"MOSTLY_{common}_S") if n in names), None)
            if label is not None:
                writer.add_file_type(LlamaFileType[label])
        for gname, data, qtype in tensors:
            writer.add_tensor(gname, data, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(writer_out, out)
    except BaseException:
        writer_out.unlink(missing_ok=True)
        raise
    return out


def _order(gname: str) -> tuple:
    """token_embd first, then the blocks in order, then the output norm and head."""
    parts = gname.split(".")
    if parts[0] == "token_embd":
        return (0, 0, gname)
    if parts[0] == "blk":
        return (1, int(parts[1]), gname)
    return (2, 0, gname)
