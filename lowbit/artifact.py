"""The artifact directory: config.json with a quantization section, packed safetensors,
tokenizer files and lowbit_manifest.json (plan, sizes, checksums, evaluation).

It is written to a hidden temporary folder and renamed into place when
complete, so an interrupted save never leaves something that looks whole.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from lowbit.dtypes import DTYPES
from lowbit.errors import ArtifactError, BudgetError, LowbitError
from lowbit.formats import format_from_dict
from lowbit.modules import set_module
from lowbit.records import QuantizationInfo
from lowbit.report import plan_heatmap
from lowbit.runtime import QuantizedEmbedding, QuantizedLinear
from lowbit.spill import model_spill
from lowbit.streamed_safetensors import Pending, save_streamed
from lowbit.version import __version__

MANIFEST = "lowbit_manifest.json"
WEIGHTS = "model.safetensors"
ARTIFACT_VERSION = 1


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def check_output_dir(out: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse an existing output unless overwriting; call this before long work starts."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise ArtifactError(f"output directory {out} already exists; pass --overwrite or choose another --out")
    if out.exists() and not out.is_dir():
        raise ArtifactError(f"output path {out} is a file; choose a directory for --out")
    return out


@contextlib.contextmanager
def staged_dir(out: Path) -> Iterator[Path]:
    """A hidden temporary directory beside `out`, renamed to `out` (replacing it) when the block
    ends without error and removed otherwise: an interrupted write never looks complete."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():
            trash = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(trash)
            tmp.rename(out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _packed_state(model: nn.Module, info: QuantizationInfo) -> tuple[dict[str, Pending], list]:
    """State dict with parameters in the storage dtype and tied tensors stored once.

    Each float parameter is converted only when the writer reaches it, so saving holds one
    converted copy at a time (a float32 table of a 1 B-parameter model is 400 MB)."""
    dtype = DTYPES[info.storage_dtype]
    params = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    tensors: dict[str, Pending] = {}
    first_name: dict[object, str] = {}
    tied = []
    for name, t in model.state_dict(keep_vars=True).items():
        # tensors still on disk (a spilled block, a lazy model's table) are told apart by identity
        key = ("meta", id(t)) if t.is_meta else t.data_ptr() if t.numel() else id(t)
        if key in first_name:
            tied.append([name, first_name[key]])
            continue
        first_name[key] = name
        store_as = dtype if name in params and t.is_floating_point() else t.dtype
        if t.is_meta:
            tensors[name] = Pending(store_as, tuple(t.shape), _from_disk(model, name, name in params, store_as))
        elif store_as != t.dtype:
            tensors[name] = Pending(store_as, tuple(t.shape), lambda t=t: t.detach().to(dtype))
        else:
            tensors[name] = Pending.of(t.detach())
    return tensors, tied


def _from_disk(model: nn.Module, name: str, is_parameter: bool, dtype: torch.dtype):
    """How to read tensor `name` of a model that keeps it on disk (spill.py, models/lazy.py)."""
    # models/lazy.py's lazy_weights(model), read without importing lowbit.models (whose loading
    # imports this module)
    spill, lazy = model_spill(model), getattr(model, "lowbit_lazy", None)
    if spill is not None and spill.holds(name):
        return lambda: spill.read(name).to(dtype)
    if lazy is not None and is_parameter:
        return lambda: lazy.rows(model, name, dtype)  # a large table converted and written a slice at a time
    raise LowbitError(f"tensor {name} was never loaded or computed; the model is incomplete and cannot be saved")


def _check_size(weights: Path, info: QuantizationInfo) -> None:
    """A size budget is a promise: refuse to write an artifact that breaks it (the planner counts
    exact packed bytes, so this only fires if its accounting and the file disagree)."""
    limit = (info.settings.get("budget") or {}).get("size_bytes")
    actual = weights.stat().st_size
    if limit is not None and actual > limit:
        raise BudgetError(
            f"the weights file would be {actual} bytes, over the --size budget of {limit}; "
            "nothing was written: please report this, and use a slightly smaller --size meanwhile"
        )


def save(
    model: nn.Module,
    out: str | os.PathLike,
    tokenizer=None,
    overwrite: bool = False,
    evaluation: dict[str, Any] | None = None,
) -> Path:
    """Write the quantized `model` (from `lowbit.quantize`) to the directory `out`."""
    info: QuantizationInfo | None = getattr(model, "lowbit_info", None)
    if info is None:
        raise LowbitError("this model is not quantized; run lowbit.quantize(model, ...) before save")
    out = check_output_dir(out, overwrite)
    with staged_dir(out) as tmp:
        tensors, tied = _packed_state(model, info)
        # one metadata key only: safetensors writes metadata in hash-map order, so with two keys
        # the same tensors gave files that differed byte for byte from run to run
        save_streamed(tensors, tmp / WEIGHTS, metadata={"format": "pt"})
        _check_size(tmp / WEIGHTS, info)
        config = model.config.to_dict()
        config["quantization_config"] = {
            "quant_method": "lowbit",
            "artifact_version": ARTIFACT_VERSION,
            "method": info.method,
            "bits_per_weight": info.bits_per_weight,
            "manifest": MANIFEST,
        }
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        files = {
            name: {"sha256": sha256_file(tmp / name), "bytes": (tmp / name).stat().st_size}
            for name in (WEIGHTS, "config.json")
        }
        unique_params = sum(p.numel() for p in model.parameters())
        original_params = (
            unique_params
            - sum(sum(p.numel() for p in m.parameters()) for m in model.modules() if isinstance(m, QuantizedLinear))
            + info.quantized_weights
        )
        manifest = {
            "artifact_version": ARTIFACT_VERSION,
            "lowbit_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "model_type": model.config.model_type,
            **info.to_dict(),
            "tied": tied,
            "files": files,
            "sizes": {
                "artifact_bytes": sum(f["bytes"] for f in files.values()),
                "weights_bytes": files[WEIGHTS]["bytes"],
                "original_params": original_params,
                "fp16_bytes": 2 * original_params,
            },
            "evaluation": evaluation or {},
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        budget = info.settings.get("budget")
        if budget:  # mixed precision: show the plan at a glance
            title = f"{budget['allocator']} plan: {budget['achieved_bpw']:.3f} bpw (budget {budget['bpw']})"
            plan_heatmap(info.layers, tmp / "plan.png", title)
    return out


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_dir():
        raise ArtifactError(f"artifact directory {path} does not exist; check the path")
    mf = path / MANIFEST
    if not mf.is_file():
        raise ArtifactError(f"{path} is not a lowbit artifact (no {MANIFEST}); run lowbit quantize to make one")
    try:
        return json.loads(mf.read_text())
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{mf} is corrupt ({exc.msg}); re-create the artifact with lowbit quantize") from exc


def verify(path: str | os.PathLike, manifest: dict[str, Any]) -> None:
    """Every listed file exists with its recorded checksum."""
    path = Path(path)
    for name, meta in manifest["files"].items():
        f = path / name
        if not f.is_file():
            raise ArtifactError(f"artifact file {f} is missing; re-create the artifact with lowbit quantize")
        if f.stat().st_size != meta["bytes"] or sha256_file(f) != meta["sha256"]:
            raise ArtifactError(
                f"artifact file {f} is corrupt or truncated (checksum mismatch); "
                "re-create the artifact with lowbit quantize"
            )


def load(path: str | os.PathLike, return_tokenizer: bool = False, verify_checksums: bool = True):
    """Rebuild a quantized model from an artifact; float weights are never materialised."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    manifest = read_manifest(path)
    if verify_checksums:
        verify(path, manifest)
    config_dict = json.loads((path / "config.json").read_text())
    config_dict.pop("quantization_config", None)
    model_type = config_dict.pop("model_type")
    config = AutoConfig.for_model(model_type, **config_dict)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config)
    try:
        tensors = load_file(str(path / WEIGHTS))
    except SafetensorError as exc:
        raise ArtifactError(f"{path / WEIGHTS} is corrupt ({exc}); re-create the artifact") from exc
    quantized_embedding = False
    for name, layer in manifest["layers"].items():
        out, n = layer["shape"]
        fmt = format_from_dict(layer["format"])
        if layer.get("kind") == "embedding":
            qlayer = QuantizedEmbedding(out, n, fmt, layer.get("padding_idx"), device="meta")
            quantized_embedding = True
            if layer.get("tied_head"):  # its buffers come from the embedding's, via `tied` below
                set_module(model, layer["tied_head"], QuantizedLinear(n, out, fmt, device="meta"))
        else:
            qlayer = QuantizedLinear(n, out, fmt, bias=f"{name}.bias" in tensors, device="meta")
        set_module(model, name, qlayer)
    params = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    state = {k: (v.float() if k in params and v.is_floating_point() else v) for k, v in tensors.items()}
    result = model.load_state_dict(state, strict=False, assign=True)
    if result.unexpected_keys:
        raise ArtifactError(
            f"artifact has tensors the model does not ({result.unexpected_keys[0]}, ...); "
            "it was written by another lowbit version or edited"
        )
    for name, source in manifest.get("tied", []):  # stored once: point every other name at it
        set_module(model, name, model.get_parameter_or_buffer(source))
    if not quantized_embedding:  # transformers' own tying reads the embedding's float weight
        model.tie_weights()
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.device.type == "meta":
            raise ArtifactError(f"artifact is missing tensor {name}; re-create the artifact with lowbit quantize")
    model.eval()
    info = QuantizationInfo.from_manifest(manifest)
    model.lowbit_info = info
    model.lowbit_manifest = manifest
    if not return_tokenizer:
        return model
    tokenizer = None
    if (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    return model, tokenizer
