"""Writing a safetensors file one tensor at a time.

`safetensors.torch.save_file` needs every tensor in memory at once. An artifact's tensors are
not always there: the float tables are converted to the storage dtype as they are written, and
the finished blocks of a large model may wait on disk. This writer takes each tensor's dtype and
shape up front (the header comes first in the file) and fetches the tensor itself only when its
bytes are due, so at most one tensor is held beyond what the caller keeps; a fetch may also
give a large tensor as slices of rows (a table converted as it is written).

The bytes are the ones `save_file` writes for the same tensors and metadata (same header, same
order: dearer dtypes first, then by name; header padded to 8 bytes): tests compare them.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch

# safetensors' dtype names, in the order of its Dtype enum (the file lists larger ones first)
_DTYPES: list[tuple[torch.dtype, str]] = [
    (torch.bool, "BOOL"),
    (torch.uint8, "U8"),
    (torch.int8, "I8"),
    (torch.float8_e5m2, "F8_E5M2"),
    (torch.float8_e4m3fn, "F8_E4M3"),
    (torch.int16, "I16"),
    (torch.uint16, "U16"),
    (torch.float16, "F16"),
    (torch.bfloat16, "BF16"),
    (torch.int32, "I32"),
    (torch.uint32, "U32"),
    (torch.float32, "F32"),
    (torch.float64, "F64"),
    (torch.int64, "I64"),
    (torch.uint64, "U64"),
]
_RANK = {dtype: i for i, (dtype, _) in enumerate(_DTYPES)}
_NAME = dict(_DTYPES)


@dataclass(frozen=True)
class Pending:
    """A tensor to be written: what the header says about it, and how to get it when its turn comes."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    fetch: Callable[[], torch.Tensor | Iterable[torch.Tensor]]  # the tensor, or its rows in slices, in order

    @classmethod
    def of(cls, tensor: torch.Tensor) -> Pending:
        return cls(tensor.dtype, tuple(tensor.shape), lambda: tensor)

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for d in self.shape:
            n *= d
        return n


def save_streamed(
    tensors: Mapping[str, Pending], path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> None:
    """Write `tensors` to `path` as safetensors, fetching each one only when it is written."""
    for name, t in tensors.items():
        if t.dtype not in _RANK:
            raise TypeError(f"tensor {name}: safetensors cannot hold {t.dtype}")
    order = sorted(tensors, key=lambda n: (-_RANK[tensors[n].dtype], n))
    header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name in order:
        t = tensors[name]
        header[name] = {"dtype": _NAME[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for name in order:
            t = tensors[name]
            got = t.fetch()
            parts = [got] if isinstance(got, torch.Tensor) else got
            rows = 0
            for part in parts:
                if part.dtype != t.dtype or tuple(part.shape[1:]) != t.shape[1:] or part.dim() != len(t.shape):
                    raise ValueError(
                        f"tensor {name} arrived as {part.dtype} {tuple(part.shape)}, "
                        f"the header promised {t.dtype} {t.shape}"
                    )
                data = part.detach().cpu().contiguous()
                if data.numel():
                    f.write(memoryview(data.reshape(-1).view(torch.uint8).numpy()))
                rows += part.shape[0] if part.dim() else 1
                del part, data
            if rows != (t.shape[0] if t.shape else 1):
                raise ValueError(f"tensor {name} arrived with {rows} rows, the header promised {t.shape}")
