"""Writing a lowbit artifact as a compressed-tensors checkpoint, the format llm-compressor writes
and vLLM and transformers load.

A quantized linear becomes `weight_packed` (int32), `weight_scale` (the model's dtype),
`weight_shape` and, for an asymmetric grid, `weight_zero_point`; the weight is
(q - z) * s with q and z signed. lowbit's integer grids are that grid already: a code c in
[0, 2^b) is q + 2^(b-1), which is exactly what compressed-tensors packs (dense, LSB first,
across int32 words, as lowbit packs its own rows), so `weight_packed` is lowbit's qweight
byte for byte and the zero points are only re-laid along the output dimension. Nothing is
re-rounded. The float tensors (norms, embedding, head, biases) are copied in the model's
dtype, which is the dtype of the scales.

config.json gets a `quantization_config` with one config group per distinct format, whose
`targets` name its layers by regular expression; layers kept in float are in no group.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lowbit.artifact import MANIFEST, WEIGHTS, check_output_dir, read_manifest, staged_dir, verify
from lowbit.errors import FormatError
from lowbit.formats import Format, format_from_dict
from lowbit.formats.packing import pack_codes, unpack_codes
from lowbit.models.adapters import get_adapter
from lowbit.targets import CT_GROUPS, TARGETS

TARGET = TARGETS["compressed-tensors"]
# the artifact's own files, not copied: lowbit's weights and config are rewritten, the rest is lowbit's
_NOT_COPIED = {WEIGHTS, "config.json", MANIFEST, "plan.png"}


def check_artifact_fits(manifest: dict) -> None:
    """Refuse what compressed-tensors or vLLM cannot load, naming the first layer concerned: a
    format it does not hold, a group that does not divide the row, a quantized embedding or head,
    fused layers (q/k/v, gate/up) in different formats, scales in another dtype than the rest."""
    layers = manifest["layers"]
    dtypes = set()
    for name, rec in layers.items():
        fmt = format_from_dict(rec["format"])
        if rec.get("kind", "linear") != "linear":
            raise FormatError(
                f"layer {name} ({rec.get('kind')}) is quantized; compressed-tensors keeps the embedding and head in "
                "float: quantize with --target compressed-tensors"
            )
        TARGET.check(fmt, f"layer {name}")
        TARGET.check_shape(name, rec["shape"][1], fmt)
        dtypes.add(fmt.scale_dtype)
    if len(dtypes) > 1:
        raise FormatError(f"the artifact mixes {' and '.join(sorted(dtypes))} scales; compressed-tensors has one dtype")
    storage = manifest.get("storage_dtype", "float16")
    if dtypes and dtypes != {storage}:
        raise FormatError(
            f"the scales are {dtypes.pop()} but the float tensors {storage}; compressed-tensors stores both in the "
            "model's dtype: quantize with --target compressed-tensors"
        )
    for group in fused_groups(manifest):
        formats = {n: layers.get(n, {}).get("format") for n in group}
        if len({json.dumps(f, sort_keys=True) for f in formats.values()}) > 1:
            shown = ", ".join(f"{n}: {format_from_dict(f).name if f else 'float'}" for n, f in formats.items())
            raise FormatError(
                f"vLLM fuses {', '.join(n.rsplit('.', 1)[-1] for n in group)} into one matrix with one scheme, but "
                f"the artifact has {shown}; quantize with --target compressed-tensors"
            )


def fused_groups(manifest: dict) -> list[tuple[str, ...]]:
    """Every block's linears that share an input (vLLM fuses them), from the architecture."""
    adapter = get_adapter(manifest["model_type"])
    in_block = re.compile(rf"{re.escape(adapter.blocks)}\.(\d+)\.")
    blocks = {int(m.group(1)) for n in manifest["layers"] if (m := in_block.match(n))}
    return [
        tuple(f"{adapter.blocks}.{i}.{n}" for n in group)
        for i in sorted(blocks)
        for group in adapter.linear_groups
        if len(group) > 1
    ]


def kernel_warnings(manifest: dict) -> list[str]:
    """Where vLLM's fast Marlin kernels will not run the export (it then falls back or refuses):
    groups other than 32/64/128/channel, output rows not a multiple of 64, inputs not of 128."""
    notes = []
    for name, rec in manifest["layers"].items():
        fmt, (out, n) = format_from_dict(rec["format"]), rec["shape"]
        why = []
        if fmt.group_size not in CT_GROUPS:
            why.append(f"group {fmt.group_size}")
        if out % 64:
            why.append(f"{out} output rows (not a multiple of 64)")
        if n % 128:
            why.append(f"{n} inputs (not a multiple of 128)")
        if fmt.bits not in (4, 8):
            why.append(f"{fmt.bits} bits (Marlin runs 4 and 8)")
        if why:
            notes.append(f"vLLM's Marlin kernels will not run {name}: {', '.join(why)}")
    return notes


def loader_notes(manifest: dict) -> list[str]:
    """What transformers (5.24, compressed-tensors 0.20) cannot load of the export: with
    dequantize=True it decompresses every layer with the first config group's scheme, so a
    mixed plan loads only through the compressed path (dequantize=False), which in turn does
    not read packed zero points."""
    formats = {json.dumps(rec["format"], sort_keys=True) for rec in manifest["layers"].values()}
    asym = any(not format_from_dict(json.loads(f)).symmetric for f in formats)
    if len(formats) > 1 and asym:
        return ["transformers cannot load a mixed plan with zero points (asymmetric grids); quantize with --sym"]
    if len(formats) > 1:
        return ["transformers loads this mixed plan with CompressedTensorsConfig(dequantize=False) only"]
    return []


def _scheme(fmt: Format, act_order: bool) -> dict[str, Any]:
    return {
        "num_bits": fmt.bits,
        "type": "int",
        "symmetric": fmt.symmetric,
        "strategy": "channel" if fmt.group_size is None else "group",
        "group_size": fmt.group_size,
        "dynamic": False,
        # lowbit's act-order fits every group's scale before the solve: compressed-tensors' "static"
        "actorder": "static" if act_order else None,
        "observer": "minmax",
    }


def _regex(names: list[str]) -> list[str]:
    """Compact `re:` targets for these module names: one per module path with the block
    numbers as alternatives (e.g. re:^model\\.layers\\.(0|2)\\.self_attn\\.q_proj$)."""
    by_shape: dict[tuple[str, str], list[str]] = defaultdict(list)
    singles = []
    for n in names:
        m = re.match(r"^(.*?\.)(\d+)(\..*)$", n)
        if m is None:
            singles.append(f"re:^{re.escape(n)}$")
        else:
            by_shape[(m.group(1), m.group(3))].append(m.group(2))
    out = [
        f"re:^{re.escape(pre)}({'|'.join(sorted(set(nums), key=int))}){re.escape(post)}$"
        for (pre, post), nums in sorted(by_shape.items())
    ]
    return out + singles


def quantization_config(manifest: dict) -> dict[str, Any]:
    """config.json's `quantization_config` for the artifact's plan."""
    gptq = manifest.get("settings", {}).get("gptq") or {}
    by_format: dict[str, list[str]] = defaultdict(list)
    formats: dict[str, Format] = {}
    for name, rec in manifest["layers"].items():
        fmt = format_from_dict(rec["format"])
        by_format[fmt.name].append(name)
        formats[fmt.name] = fmt
    groups = {}
    for i, (key, names) in enumerate(sorted(by_format.items(), key=lambda kv: manifest_order(manifest, kv[1][0]))):
        groups[f"group_{i}"] = {
            "targets": _regex(names),
            "weights": _scheme(formats[key], bool(gptq.get("act_order"))),
            "input_activations": None,
            "output_activations": None,
            "format": "pack-quantized",
        }
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": groups,
        "ignore": ["lm_head"],
        "kv_cache_scheme": None,
        "sparsity_config": {},
        "transform_config": {},
        "global_compression_ratio": None,
        "version": "0.18.0",
    }


def manifest_order(manifest: dict, name: str) -> int:
    return list(manifest["layers"]).index(name)


def export_compressed_tensors(
    artifact: str | os.PathLike, out: str | os.PathLike, overwrite: bool = False
) -> tuple[Path, list[str]]:
    """Write the artifact directory `artifact` as a compressed-tensors model directory `out`
    (a temporary directory, renamed when complete); refused if `out` exists, unless `overwrite`.
    Returns the directory and notes on what engines will not run well (kernel_warnings,
    loader_notes)."""
    artifact, out = Path(artifact), check_output_dir(out, overwrite)
    manifest = read_manifest(artifact)
    verify(artifact, manifest)
    check_artifact_fits(manifest)
    config = json.loads((artifact / "config.json").read_text())
    storage = manifest.get("storage_dtype", "float16")
    dtype = getattr(torch, storage)
    layers = manifest["layers"]
    tensors: dict[str, torch.Tensor] = {}
    with safe_open(str(artifact / WEIGHTS), "pt") as f:
        keys = list(f.keys())
        packed = {f"{n}.{k}" for n, rec in layers.items() for k in ("qweight", "scales", "qzeros")}
        for key in keys:
            if key not in packed:
                t = f.get_tensor(key)
                tensors[key] = t.to(dtype) if t.is_floating_point() else t
        for name, rec in layers.items():
            fmt = format_from_dict(rec["format"])
            rows, n = rec["shape"]
            tensors[f"{name}.weight_packed"] = f.get_tensor(f"{name}.qweight")
            tensors[f"{name}.weight_scale"] = f.get_tensor(f"{name}.scales").to(dtype)
            tensors[f"{name}.weight_shape"] = torch.tensor([rows, n], dtype=torch.int64)
            if not fmt.symmetric:  # along the output dimension, as compressed-tensors packs zero points
                zeros = unpack_codes(f.get_tensor(f"{name}.qzeros"), fmt.bits, fmt.num_groups(n))
                tensors[f"{name}.weight_zero_point"] = pack_codes(zeros.t().contiguous(), fmt.bits).t().contiguous()
    config["quantization_config"] = quantization_config(manifest)
    config["torch_dtype"] = storage
    config["dtype"] = storage

    with staged_dir(out) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        for p in artifact.iterdir():
            if p.is_file() and p.name not in _NOT_COPIED:
                shutil.copy2(p, tmp / p.name)
    return out, loader_notes(manifest) + kernel_warnings(manifest)
