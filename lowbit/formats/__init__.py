"""The format registry: every format kind lowbit can store, by name.

Everything else (solvers, runtime, artifact) asks a format for its geometry,
fit/quantize/dequantize and exact size, so new kinds plug in here.
"""

from __future__ import annotations

from typing import Any

from lowbit.errors import FormatError
from lowbit.formats.codebook import CodebookFormat
from lowbit.formats.floatmin import MinFormat
from lowbit.formats.integer import IntFormat, QuantizedTensor
from lowbit.formats.kquants import KQuantFormat
from lowbit.formats.levels import LevelFormat
from lowbit.formats.rotated import RotatedFormat, RotatedTensor
from lowbit.formats.twolevel import TwoLevelFormat, TwoLevelGridFormat

FORMATS: dict[str, type] = {
    f.kind: f
    for f in (
        IntFormat,
        LevelFormat,
        MinFormat,
        KQuantFormat,
        CodebookFormat,
        TwoLevelFormat,
        TwoLevelGridFormat,
        RotatedFormat,
    )
}

Format = IntFormat  # every kind derives from it (geometry, fit/quantize/dequantize, packed buffers), but
# RotatedFormat, which wraps one and answers for its geometry and whole tensors


def format_from_dict(d: dict[str, Any]) -> Format:
    d = dict(d)
    kind = d.pop("kind", None)
    if kind not in FORMATS:
        raise FormatError(f"unknown format kind {kind!r}; known kinds: {sorted(FORMATS)}")
    if kind == RotatedFormat.kind:  # a wrapper: its base is a format of its own
        return RotatedFormat(format_from_dict(d.pop("base")), **d)
    return FORMATS[kind](**d)


__all__ = [
    "CodebookFormat",
    "FORMATS",
    "Format",
    "IntFormat",
    "KQuantFormat",
    "LevelFormat",
    "MinFormat",
    "QuantizedTensor",
    "RotatedFormat",
    "RotatedTensor",
    "TwoLevelFormat",
    "TwoLevelGridFormat",
    "format_from_dict",
]
