"""Models whose decoder blocks stay on disk until a pass reaches them.

A lazy model is transformers' own module tree built on the meta device (no memory), with the
tables, the final norm and the head loaded at once and every decoder block's tensors read only
when the block walker arrives: from safetensors shards (just that block's tensors, the file
mapping closed again after) or from a GGUF (just those tensors dequantized). Passes that only
look at a block (the measurement pass) hand its float tensors back afterwards; GPTQ replaces
them with packed layers. Peak memory is then the tables, one float block, the calibration
activations and the packed model so far, instead of the whole float model.

The tensors are the ones transformers' eager loading would put in the model, bit for bit
(same files, same name mapping, same dtype conversion); tests compare both.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from safetensors import safe_open
from torch import nn

from lowbit.errors import ModelLoadError
from lowbit.memory import trim

INDEX = "model.safetensors.index.json"
_ROWS_BYTES = 64 << 20  # tensors larger than this (in float32) are read and converted in slices of rows


class TensorStore(Protocol):
    """Where a lazy model's tensors come from, by the model's own parameter names."""

    def names(self) -> set[str]: ...

    def read(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """The named tensors, read in one go (a store may open its files once per call)."""


class SafetensorsStore:
    """A Hugging Face checkpoint folder: one model.safetensors, or shards listed by an index."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        index = self.folder / INDEX
        if index.is_file():
            try:
                weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError) as exc:
                raise ModelLoadError(f"{index} is unreadable ({exc}); re-download the checkpoint") from exc
            for shard in sorted(set(weight_map.values())):
                if not (self.folder / shard).is_file():
                    raise ModelLoadError(
                        f"shard {shard} listed in {index} is missing; re-download the checkpoint's missing file"
                    )
            self.files = weight_map
            self._check_index()  # headers only: a damaged index is refused before anything slow
        else:
            self.files = {}
            for file in sorted(self.folder.glob("*.safetensors")):
                with safe_open(str(file), "pt") as f:
                    self.files.update(dict.fromkeys(f.keys(), file.name))
        self._names = set(self.files)

    def names(self) -> set[str]:
        return self._names

    def _check_index(self) -> None:
        by_file: dict[str, list[str]] = {}
        for name, file in self.files.items():
            by_file.setdefault(file, []).append(name)
        for file, names in by_file.items():
            with safe_open(str(self.folder / file), "pt") as f:
                held = set(f.keys())
            for name in names:
                if name not in held:
                    raise ModelLoadError(
                        f"{self.folder / INDEX} places tensor {name} in {file}, which does not hold it; "
                        "the checkpoint is damaged: re-download it"
                    )

    def read(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        by_file: dict[str, list[str]] = {}
        for name in names:
            by_file.setdefault(self.files[name], []).append(name)
        out = {}
        with ExitStack() as stack:
            for file, wanted in by_file.items():
                f = stack.enter_context(safe_open(str(self.folder / file), "pt"))
                for name in wanted:
                    out[name] = f.get_tensor(name)
        return out

    def shape(self, name: str) -> tuple[int, ...]:
        with safe_open(str(self.folder / self.files[name]), "pt") as f:
            return tuple(f.get_slice(name).get_shape())

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows start:stop of tensor `name`, read from the file without the rest."""
        with safe_open(str(self.folder / self.files[name]), "pt") as f:
            return f.get_slice(name)[start:stop]


class GGUFStore:
    """A GGUF file, read through transformers' own name mapping and tensor processors (the q/k
    row permutation of llama-family files is undone exactly as its eager loader does)."""

    def __init__(self, file: str | Path, model: nn.Module) -> None:
        from gguf import GGUFReader
        from transformers.modeling_gguf_pytorch_utils import (
            TENSOR_PROCESSORS,
            TensorProcessor,
            get_gguf_hf_weights_map,
            read_field,
        )

        self.file = str(file)
        # the file is parsed once (a vocabulary's metadata takes seconds), and only the tensors'
        # descriptions are kept: the parsed metadata (smollm2: ~90 MB of small arrays) is freed. The
        # tensors' file mapping keeps the pages read resident (file-backed, reclaimable).
        reader = GGUFReader(self.file)
        arch = read_field(reader, "general.architecture")[0]
        self.processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=model.config.to_dict())
        self.mapping = get_gguf_hf_weights_map(model, self.processor)
        self.tensors = {self.mapping[t.name]: t for t in reader.tensors if t.name in self.mapping}
        self._names = set(self.tensors)

    def names(self) -> set[str]:
        return self._names

    def read(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        from gguf import dequantize

        out = {}
        for name in names:
            t = self.tensors[name]
            result = self.processor.process(
                weights=dequantize(t.data, t.tensor_type), name=t.name, tensor_key_mapping=self.mapping
            )
            if result.name != t.name:
                raise ModelLoadError(f"{self.file}: tensor {t.name} needs renaming, which lazy loading does not do")
            out[name] = torch.from_numpy(np.copy(result.weights))
        return out


@dataclass
class LazyWeights:
    """The store behind a lazy model, and what to do to every tensor read from it.

    `prepare(name, tensor)` runs on each tensor as it arrives (quantize sets it to its finite
    check and storage-dtype rounding, which an eager model gets once for all tensors)."""

    store: TensorStore
    prepare: Callable[[str, torch.Tensor], torch.Tensor] | None = None

    def tensor(self, model: nn.Module, name: str) -> torch.Tensor:
        """Parameter `name` as it would be installed, without installing it."""
        param = model.get_parameter(name)
        if not param.is_meta:
            return param.data
        return self._assemble(_stored_name(self.store, [name]), param, param.dtype)

    def load(self, model: nn.Module, prefix: str = "") -> int:
        """Install every parameter under `prefix` that is still on the meta device; returns how many."""
        groups = _meta_groups(model, prefix)
        if not groups:
            return 0
        stored = [_stored_name(self.store, names) for names in groups]
        whole = [k for k, names in zip(stored, groups, strict=True) if not self._in_rows(model.get_parameter(names[0]))]
        tensors = dict(zip(whole, self._read(whole), strict=True))
        for names, key in zip(groups, stored, strict=True):
            param = model.get_parameter(names[0])
            if key in tensors:
                ready = self._ready(key, tensors.pop(key), param)
            else:
                ready = self._assemble(key, param, param.dtype)
            new = nn.Parameter(ready, requires_grad=False)
            for name in names:  # tied names share the one new parameter
                owner, _, leaf = name.rpartition(".")
                model.get_submodule(owner)._parameters[leaf] = new
        return len(groups)

    def rows(self, model: nn.Module, name: str, dtype: torch.dtype) -> Iterator[torch.Tensor]:
        """Parameter `name` (still on disk) as it would be installed, converted to `dtype`, in slices
        of rows: what writing it to a file needs, without ever holding it whole."""
        param = model.get_parameter(name)
        key = _stored_name(self.store, [name])
        for rows in self._slices(key, param):
            yield (self.prepare(key, rows) if self.prepare is not None else rows).to(dtype)

    def _in_rows(self, param: nn.Parameter) -> bool:
        """Whether a tensor is read a slice of rows at a time: a large table held whole in its file's
        dtype beside its float32 copy would double what it costs (a 1 B model's: 200 + 400 MB)."""
        return param.dim() >= 2 and hasattr(self.store, "read_rows") and param.numel() * 4 > _ROWS_BYTES

    def _slices(self, key: str, param: nn.Parameter) -> Iterator[torch.Tensor]:
        """Stored tensor `key` in `param`'s dtype, unprepared: whole, or a slice of rows at a time
        when it is large (only one slice in the file's and the compute dtype is held)."""
        if not self._in_rows(param):
            tensor = self._read([key])[0]
            self._check_shape(key, tuple(tensor.shape), param)
            yield tensor.to(param.dtype)
            return
        shape = self.store.shape(key)
        self._check_shape(key, shape, param)
        step = max(1, _ROWS_BYTES // (4 * param[0].numel()))
        for a in range(0, shape[0], step):
            yield self.store.read_rows(key, a, min(a + step, shape[0])).to(param.dtype)

    def _assemble(self, key: str, param: nn.Parameter, dtype: torch.dtype) -> torch.Tensor:
        """The prepared tensor in `dtype`, built from `_slices`."""
        parts = self._slices(key, param)
        if not self._in_rows(param):
            tensor = next(parts)
            return (self.prepare(key, tensor) if self.prepare is not None else tensor).to(dtype)
        out, a = torch.empty(param.shape, dtype=dtype), 0
        for rows in parts:
            out[a : a + rows.shape[0]] = (self.prepare(key, rows) if self.prepare is not None else rows).to(dtype)
            a += rows.shape[0]
        return out

    def scan(self, model: nn.Module, visit: Callable[[str, torch.Tensor], object], progress: bool = True) -> None:
        """Read every tensor still on disk, block by block, and show it to `visit` (which may
        raise), without installing it: bad weights are found before any slow work, in the
        memory of one block."""
        from tqdm.auto import tqdm

        blocks = _blocks_prefix(model)
        by_block: dict[str, list[list[str]]] = {}
        for names in _meta_groups(model, ""):
            name = names[0]
            key = blocks + name[len(blocks) :].split(".")[0] if name.startswith(blocks) else name
            by_block.setdefault(key, []).append(names)
        for part in tqdm(list(by_block.values()), desc="checking weights", disable=not progress):
            for names in part:  # one tensor at a time: a block of a large model is hundreds of MB
                for part in self._slices(_stored_name(self.store, names), model.get_parameter(names[0])):
                    visit(names[0], part)
            trim()

    def release(self, model: nn.Module, prefix: str) -> None:
        """Put the float parameters under `prefix` back on the meta device, freeing them."""
        module = model.get_submodule(prefix.rstrip("."))
        for sub in module.modules():
            for leaf, p in list(sub._parameters.items()):
                if p is not None and not p.is_meta:
                    sub._parameters[leaf] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)

    def _read(self, names: list[str]) -> list[torch.Tensor]:
        tensors = self.store.read(names)
        return [tensors[n] for n in names]

    @staticmethod
    def _check_shape(name: str, shape: tuple[int, ...], param: nn.Parameter) -> None:
        if shape != tuple(param.shape):
            raise ModelLoadError(
                f"tensor {name} has shape {shape} in the checkpoint, the model's config says "
                f"{tuple(param.shape)}; the checkpoint and its config.json do not match"
            )

    def _ready(self, name: str, tensor: torch.Tensor, param: nn.Parameter) -> torch.Tensor:
        self._check_shape(name, tuple(tensor.shape), param)
        tensor = tensor.to(param.dtype)
        return self.prepare(name, tensor) if self.prepare is not None else tensor


def lazy_weights(model: nn.Module) -> LazyWeights | None:
    """The lazy store behind `model`, or None for a model held whole in memory."""
    return getattr(model, "lowbit_lazy", None)


def load_block(model: nn.Module, prefix: str) -> None:
    """Make the tensors under `prefix` present (a no-op for an eager model)."""
    lazy = lazy_weights(model)
    if lazy is not None:
        lazy.load(model, prefix)


def load_rest(model: nn.Module) -> None:
    """Make every tensor still on disk present: the model is whole afterwards."""
    load_block(model, "")


def release_blocks(model: nn.Module) -> None:
    """Put every decoder block of a lazy model back on disk (a no-op for an eager model)."""
    lazy = lazy_weights(model)
    if lazy is not None:
        lazy.release(model, _blocks_prefix(model))
        trim()


def release_unquantized(model: nn.Module) -> None:
    """Put a lazy model's float parameters that the store holds back on the meta device, tied
    names together (a no-op for an eager model): the artifact writer reads them again one at a
    time. Parameters of quantized modules (biases) are not the store's and stay."""
    lazy = lazy_weights(model)
    if lazy is None:
        return
    held = lazy.store.names()
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    for names in groups.values():
        param = model.get_parameter(names[0])
        if param.is_meta or not any(n in held for n in names) or _in_quantized_module(model, names[0]):
            continue
        meta = nn.Parameter(torch.empty_like(param, device="meta"), requires_grad=False)
        for name in names:
            owner, _, leaf = name.rpartition(".")
            model.get_submodule(owner)._parameters[leaf] = meta
    trim()


def _in_quantized_module(model: nn.Module, name: str) -> bool:
    from lowbit.runtime import QuantizedEmbedding, QuantizedLinear

    owner = name.rpartition(".")[0]
    return isinstance(model.get_submodule(owner), QuantizedLinear | QuantizedEmbedding)


def build_lazy(
    config,
    store_for: Callable[[nn.Module], TensorStore],
    dtype: torch.dtype,
    trust_remote_code: bool,
    load_outside: bool = True,
):
    """transformers' model for `config` on the meta device, its tables and head loaded (unless
    not `load_outside`); None when the checkpoint's names do not cover the model's parameters
    (then load it eagerly)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    model.tie_weights()
    store = store_for(model)
    held = store.names()
    groups = _meta_groups(model, "")
    missing = [names[0] for names in groups if not any(n in held for n in names)]
    if len(missing) == len(groups):  # another naming (an older export, a base model): transformers maps it
        return None
    if missing:
        raise ModelLoadError(f"the checkpoint holds no tensor {missing[0]}; it is incomplete: re-download it")
    model.lowbit_lazy = LazyWeights(store)
    if load_outside:
        blocks = _blocks_prefix(model)
        for name in [n for n, _ in model.named_parameters() if not n.startswith(blocks)]:
            model.lowbit_lazy.load(model, name)
    return model.eval()


def _blocks_prefix(model: nn.Module) -> str:
    from lowbit.models.adapters import get_adapter

    return get_adapter(model.config.model_type).blocks + "."


def _meta_groups(model: nn.Module, prefix: str) -> list[list[str]]:
    """Names of the meta parameters under `prefix`, one list per parameter (tied names together)."""
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if p.is_meta:
            groups.setdefault(id(p), []).append(name)
    return [names for names in groups.values() if any(n == prefix or n.startswith(prefix) for n in names)]


def _stored_name(store: TensorStore, names: list[str]) -> str:
    held = store.names()
    for name in names:
        if name in held:
            return name
    raise ModelLoadError(f"the checkpoint holds no tensor {names[0]}; it is incomplete: re-download it")
