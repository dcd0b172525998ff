"""Keep rules, which pin layers: `--keep "lm_head,*.0.self_attn.*=8bit"`.

A rule is a glob over full module names. `PATTERN` alone keeps the matching layers in
floating point; `PATTERN=FORMAT` gives them that format whatever the plan says. The
first matching rule wins. Formats: `8bit`, `int4`, `int4-g64`, `int3-g128-sym`,
`int8-gch` (per channel), `int3-g32-s8` (8-bit scale codes on a float16 step per row), a
level grid (`nf4-g64`, `nf3-g128`, `fp4-g32`, `iq4nl-g32`, `nf3-g32-s8`), a per-row fitted
codebook (`cb3`: 2 to 4 bits), or a llama.cpp type lowbit writes (`q2_k` ... `q8_0`,
lowbit.formats.ggml); the group defaults to the run's --group-size. Any of them with `-rot`
(`int3-g128-rot`, `nf3-g64-s8-rot`) turns the layer's inputs at run time (formats.rotated).
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass

from lowbit.errors import LowbitError
from lowbit.formats import (
    CodebookFormat,
    Format,
    IntFormat,
    LevelFormat,
    RotatedFormat,
    TwoLevelFormat,
    TwoLevelGridFormat,
)
from lowbit.formats.ggml import GGML_TYPES, ggml_type_named
from lowbit.formats.levels import GRIDS

_FORMAT = re.compile(r"^(?:int)?([2-8])(?:bits?)?(?:[-_]?g(\d+|ch))?(?:[-_]?(sym|asym))?(?:[-_]?s(\d+))?$")
_CODEBOOK = re.compile(r"^cb(\d+)$")
_ROTATED = re.compile(r"^(.+)-rot(\d*)$")
_GRID = re.compile(rf"^({'|'.join(GRIDS)})(?:[-_]?g(\d+|ch))?(?:[-_]?s(\d+))?$")


@dataclass(frozen=True)
class KeepRule:
    pattern: str
    fmt: Format | None  # None: keep in floating point


def parse_format(spec: str, group_size: int | None = 128, symmetric: bool = False, option: str = "--keep") -> Format:
    turned = _ROTATED.match(spec.strip().lower())
    if turned:  # int3-g128-rot: the base format on inputs turned at run time (seed 0, or -rot1 ...)
        base, seed = turned.groups()
        return RotatedFormat(parse_format(base, group_size, symmetric, option), int(seed or 0))
    ggml = ggml_type_named(spec)
    if ggml is not None:  # llama.cpp's names: q4_0, iq4_nl, q4_k ...
        return ggml.fmt
    codebook = _CODEBOOK.match(spec.strip().lower())
    if codebook:  # per-row fitted levels: cb3
        return CodebookFormat(int(codebook.group(1)))
    grid = _GRID.match(spec.strip().lower())
    if grid:  # lowbit's names of the level grids: nf4-g64, fp4-g32, nf3-gch, iq4nl-g32
        name, group, scale_code_bits = grid.groups()
        bits, group = len(GRIDS[name]).bit_length() - 1, _group(group, group_size)
        if scale_code_bits is None:
            return LevelFormat(bits, group, grid=name)
        return TwoLevelGridFormat(bits, group, grid=name, scale_code_bits=int(scale_code_bits))
    m = _FORMAT.match(spec.strip().lower())
    if not m:
        raise LowbitError(
            f"unknown format {spec!r} in {option}; write e.g. 8bit, int4-g64, int3-g128-sym, int3-g32-s8, nf4-g64, "
            "cb3, int3-g128-rot "
            f"(level grids: {', '.join(GRIDS)}) or a llama.cpp type "
            f"({', '.join(t.name.lower() for t in GGML_TYPES)})"
        )
    bits, group, sym, scale_code_bits = m.groups()
    fmt = IntFormat(int(bits), _group(group, group_size), symmetric if sym is None else sym == "sym")
    if scale_code_bits is None:
        return fmt
    # int3-g32-s8: each group's scale an 8-bit code times one float16 step per row
    return TwoLevelFormat(fmt.bits, fmt.group_size, fmt.symmetric, scale_code_bits=int(scale_code_bits))


def _group(spelled: str | None, default: int | None) -> int | None:
    """A group size as a format name spells it (`g64`, `gch` per channel), or the run's default."""
    return default if spelled is None else (None if spelled == "ch" else int(spelled))


def parse_rules(text: str | None, group_size: int | None = 128, symmetric: bool = False) -> list[KeepRule]:
    rules = []
    for part in (text or "").split(","):
        part = part.strip()
        if not part:
            continue
        pattern, _, spec = part.partition("=")
        fmt = parse_format(spec, group_size, symmetric) if spec else None
        rules.append(KeepRule(pattern.strip(), fmt))
    return rules


def apply_rules(
    layers: list[str], rules: list[KeepRule], other_names: list[str] | tuple[str, ...] = ()
) -> dict[str, Format | None]:
    """Pinned layers (name -> format, or None for floating point); every rule must match something."""
    pinned: dict[str, Format | None] = {}
    for rule in rules:
        hits = fnmatch.filter(layers, rule.pattern)
        if not hits and not (rule.fmt is None and fnmatch.filter(other_names, rule.pattern)):
            example = layers[0] if layers else "model.layers.0.self_attn.q_proj"
            raise LowbitError(
                f"--keep rule {rule.pattern!r} matches no quantizable layer; names look like {example!r} "
                "(globs: * matches anything, dots included)"
            )
        for name in hits:
            pinned.setdefault(name, rule.fmt)
    return pinned
