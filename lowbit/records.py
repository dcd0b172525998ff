"""What a quantization did, as the artifact's manifest stores it.

A leaf module: the artifact writes and reads these records, the library builds them, and
neither has to import the other's machinery to do so.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class QuantizationInfo:
    """Stored in the artifact manifest and shown by `lowbit inspect`; `model.lowbit_info`."""

    method: str
    settings: dict[str, Any]
    storage_dtype: str
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)
    unquantized: list[str] = field(default_factory=list)
    source: str | None = None
    stats: dict[str, Any] = field(default_factory=dict)  # wall time, peak memory
    plan: dict[str, Any] | None = None  # Plan.to_dict(): every target's format, and the budget's account

    @property
    def quantized_weights(self) -> int:
        return sum(int(v["numel"]) for v in self.layers.values())

    @property
    def quantized_bits(self) -> int:
        return sum(int(v["storage_bits"]) for v in self.layers.values())

    @property
    def bits_per_weight(self) -> float:
        return self.quantized_bits / max(self.quantized_weights, 1)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["bits_per_weight"] = self.bits_per_weight
        d["quantized_weights"] = self.quantized_weights
        return d

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any]) -> QuantizationInfo:
        return cls(
            method=manifest["method"],
            settings=manifest["settings"],
            storage_dtype=manifest["storage_dtype"],
            layers=manifest["layers"],
            unquantized=manifest["unquantized"],
            source=manifest.get("source"),
            stats=manifest.get("stats", {}),
            plan=manifest.get("plan"),
        )


def layer_record(fmt: Any, shape: tuple[int, int], **extra: Any) -> dict[str, Any]:
    """The manifest entry of one packed tensor: its format and exact size."""
    out, n = shape
    return {
        "format": fmt.to_dict(),
        "shape": [out, n],
        "numel": out * n,
        "storage_bits": fmt.storage_bits(out, n),
        "bpw": fmt.bits_per_weight(out, n),
        **extra,
    }
