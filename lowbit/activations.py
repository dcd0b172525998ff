"""Where the hidden states between decoder blocks wait: on the compute device, in CPU memory,
or in memory-mapped files on disk.

A walk holds one block boundary of calibration activations (its inputs, its outputs, and what a
GPTQ block keeps for its output correction). With many or long windows that is more than a GPU
holds (or, on a CPU, more than the rest of the run): `--offload-activations cpu` keeps them in
CPU memory and moves one batch at a time to the device; `disk` writes each batch to a file
mapped into memory, whose pages the kernel can write back and drop under pressure instead of
failing. Both give the same numbers as keeping them on the device: only where the bytes wait
changes.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from lowbit.errors import LowbitError

OFFLOAD_CHOICES = ("cpu", "disk")


@dataclass(frozen=True)
class Offload:
    """Where activations wait when not on the compute device; `directory` holds `disk` files."""

    where: str
    directory: Path | None = None

    def __post_init__(self) -> None:
        if self.where not in OFFLOAD_CHOICES:
            raise LowbitError(f"unknown activation offload {self.where!r}; choose one of {', '.join(OFFLOAD_CHOICES)}")

    def check(self) -> Offload:
        """Make sure `disk` files can be written, before any slow work; the directory made."""
        if self.where != "disk":
            return self
        directory = Path(self.directory) if self.directory is not None else Path(tempfile.gettempdir())
        try:
            directory.mkdir(parents=True, exist_ok=True)
            probe = tempfile.NamedTemporaryFile(dir=directory)
            probe.close()
        except OSError as exc:
            raise LowbitError(f"cannot write activations to {directory} ({exc}); pick a writable directory") from exc
        return Offload("disk", directory)


class Activations:
    """`keep` puts a batch's activations where they wait; `fetch` brings one to the compute device."""

    def __init__(self, device: torch.device, offload: Offload | None = None) -> None:
        self.device = device
        self.offload = offload
        self._files = 0

    def keep(self, x: torch.Tensor) -> torch.Tensor:
        if self.offload is None:
            return x.to(self.device)
        if self.offload.where == "cpu":
            return x.to("cpu")
        return self._to_file(x)

    def fetch(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.device)

    def _to_file(self, x: torch.Tensor) -> torch.Tensor:
        """A shared mapping of a new file; its name is removed at once (the mapping keeps the
        file alive until the tensor is freed), so nothing is left behind, even after a crash."""
        path = self.offload.directory / f".lowbit-activations-{os.getpid()}-{self._files}"
        self._files += 1
        kept = torch.from_file(str(path), shared=True, size=x.numel(), dtype=x.dtype)
        path.unlink()
        return kept.view(x.shape).copy_(x)
