"""A whole run, from a model name to an artifact directory: what `lowbit quantize` does.

The command line only parses arguments into a Recipe and prints what comes back; everything
a run needs besides quantizing (the output and resume folders' lifecycle, the evaluation
before and after, the source and statistics in the manifest) happens here, so a run from
Python behaves exactly as one from the shell.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit.activations import Offload
from lowbit.artifact import check_output_dir, read_manifest, save
from lowbit.devices import resolve_device, resolve_dtype
from lowbit.errors import LowbitError
from lowbit.eval import EvalSettings, cached_reference, evaluate_against
from lowbit.eval.reference import reference_key
from lowbit.models import load_model
from lowbit.quantize import peak_rss_mb, quantize
from lowbit.recipe import Recipe
from lowbit.spill import model_spill
from lowbit.transforms.rotation import check_rotation_source, rotate

logger = logging.getLogger(__name__)


def resume_dir(out: str | os.PathLike) -> Path:
    """Where an interrupted run keeps its finished blocks: a hidden sibling of the output."""
    out_path = Path(out).expanduser().resolve()
    return out_path.parent / f".{out_path.name}.lowbit-resume"


def has_resume_state(out: str | os.PathLike) -> bool:
    """Whether an interrupted run left finished blocks (of any pass) to resume from."""
    folder = resume_dir(out)
    return folder.is_dir() and any(folder.rglob("state.json"))


@dataclass
class QuantizeResult:
    out: Path
    manifest: dict[str, Any]
    evaluation: dict[str, Any] | None
    _model: nn.Module | None = None  # None when the run kept its finished blocks on disk

    @property
    def model(self) -> nn.Module:
        """The quantized model. A run that did not evaluate wrote each block out as it finished
        (so a model larger than memory can be quantized); its model is read back from the
        artifact on first use."""
        if self._model is None:
            from lowbit.artifact import load

            self._model = load(self.out)
        return self._model


def quantize_to_artifact(
    model: str | os.PathLike,
    recipe: Recipe,
    out: str | os.PathLike,
    *,
    overwrite: bool = False,
    resume: bool = False,
    measurements: str | os.PathLike | None = None,
    evaluation: EvalSettings | None = None,
    trust_remote_code: bool = False,
    progress: bool = True,
    device: str = "auto",
    dtype: str = "auto",
    lazy: bool = True,
    offload_activations: str | None = None,
    rotation_seed: int | None = None,
) -> QuantizeResult:
    """Load `model`, quantize it by `recipe`, optionally evaluate it against the float model
    (`evaluation`), and write the artifact `out` (refused if it exists, unless `overwrite`).

    The run keeps its state beside `out` after every block; if it is interrupted, the same call
    with `resume=True` continues from there. Without `resume`, finished blocks left by an
    interrupted run are refused (`overwrite` discards them), so they are never lost silently.
    The state is removed once the artifact is written.

    The work runs on `device` in `dtype` (auto: a GPU when there is one; float32 on a CPU).
    With `lazy` (the default), decoder blocks are read from the checkpoint only when a pass
    reaches them, so the float model need not fit in memory (a refinement, which runs the whole
    model on every plan it scores, loads it whole). `offload_activations` ("cpu" or "disk") keeps
    the calibration activations between blocks in CPU memory or in memory-mapped files beside
    `out`, not on the device.

    With `rotation_seed`, the residual stream is rotated first (transforms/rotation.py, that
    seed): the model is then loaded whole, since the rotation touches every block and the tables.
    The evaluation's reference is the model before it (the same function)."""
    check_output_dir(out, overwrite)
    offload = None if offload_activations is None else Offload(offload_activations)  # refused before loading
    compute = resolve_device(device)
    compute_dtype = resolve_dtype(dtype, compute)
    work = resume_dir(out)
    if work.exists() and not resume:
        if not overwrite:
            raise LowbitError(
                f"an interrupted run left its finished blocks in {work}; "
                "pass --resume to continue it, or --overwrite to start over"
            )
        shutil.rmtree(work)
    if resume and not has_resume_state(out):
        logger.warning("nothing to resume; starting from the first block")
    lazy = lazy and (recipe.budget is None or recipe.budget.refine_seconds == 0) and rotation_seed is None
    # a run that never runs the model (RTN, one format, no evaluation) leaves its tables on disk too
    never_runs = recipe.method == "rtn" and recipe.budget is None and evaluation is None
    load_dtype = torch.float32 if rotation_seed is not None else compute_dtype  # rotated in float32, then cast
    loaded = load_model(
        model, load_dtype, trust_remote_code=trust_remote_code, lazy=lazy, tables_on_disk=lazy and never_runs
    )
    if rotation_seed is not None:
        check_rotation_source(loaded, model)
    windows = reference = None
    if evaluation is not None:  # the float model's predictions, before it is quantized in place
        windows = evaluation.windows(loaded.tokenizer)
        fingerprint = reference_key(loaded.source.fingerprint(), load_dtype)  # a bf16 reference is another
        if offload is not None:
            offload = Offload(offload.where, work / "activations").check()
        reference = cached_reference(
            fingerprint, windows, lambda: loaded.model, evaluation.batch_size, progress, compute, offload
        )
    rotation = None
    if rotation_seed is not None:
        rotation = rotate(loaded.model, rotation_seed)
        loaded.model.to(compute_dtype)
    quantized = quantize(
        loaded.model,
        recipe,
        tokenizer=loaded.tokenizer,
        measurements=measurements,
        checkpoint_dir=work if recipe.needs_calibration else None,
        resume=resume,
        progress=progress,
        device=compute,
        # nothing reads the packed blocks again before they are written, unless the run evaluates
        spill_dir=work / "spill" if evaluation is None else None,
        offload_activations=offload_activations,
    )
    result = None
    if evaluation is not None:
        quantized.to(compute)
        result = evaluate_against(quantized, windows, reference, evaluation, progress, desc="quantized model")
        quantized.to("cpu")
    quantized.lowbit_info.stats["peak_rss_mb"] = peak_rss_mb()  # evaluation included
    if rotation is not None:
        quantized.lowbit_info.settings["rotation"] = rotation.to_dict()
    path = save(quantized, out, loaded.tokenizer, overwrite=overwrite, evaluation=result)
    shutil.rmtree(work, ignore_errors=True)
    spilled = model_spill(quantized) is not None
    return QuantizeResult(path, read_manifest(path), result, None if spilled else quantized)
