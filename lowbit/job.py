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

from torch import nn

from lowbit.artifact import check_output_dir, read_manifest, save
from lowbit.errors import LowbitError
from lowbit.eval import EvalSettings, cached_reference, evaluate_against
from lowbit.models import load_model
from lowbit.models.lazy import lazy_weights
from lowbit.quantize import peak_rss_mb, quantize
from lowbit.recipe import Recipe

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
    model: nn.Module
    manifest: dict[str, Any]
    evaluation: dict[str, Any] | None


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
) -> QuantizeResult:
    """Load `model`, quantize it by `recipe`, optionally evaluate it against the float model
    (`evaluation`), and write the artifact `out` (refused if it exists, unless `overwrite`).

    The run keeps its state beside `out` after every block; if it is interrupted, the same call
    with `resume=True` continues from there. Without `resume`, finished blocks left by an
    interrupted run are refused (`overwrite` discards them), so they are never lost silently.
    The state is removed once the artifact is written."""
    check_output_dir(out, overwrite)
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
    # blocks stay on disk until the passes reach them, unless a refinement runs the whole model anyway
    lazy = recipe.budget is None or recipe.budget.refine_seconds == 0
    loaded = load_model(model, trust_remote_code=trust_remote_code, lazy=lazy)
    windows = reference = None
    if evaluation is not None:  # the float model's predictions, before it is quantized in place
        windows = evaluation.windows(loaded.tokenizer)
        fingerprint = loaded.source.fingerprint()

        def float_model() -> nn.Module:  # a lazy model's float reference: the model loaded whole, once
            if lazy_weights(loaded.model) is None:
                return loaded.model
            return load_model(model, trust_remote_code=trust_remote_code).model

        reference = cached_reference(fingerprint, windows, float_model, evaluation.batch_size, progress)
    quantized = quantize(
        loaded.model,
        recipe,
        tokenizer=loaded.tokenizer,
        measurements=measurements,
        checkpoint_dir=work if recipe.needs_calibration else None,
        resume=resume,
        progress=progress,
    )
    result = None
    if evaluation is not None:
        result = evaluate_against(quantized, windows, reference, evaluation, progress, desc="quantized model")
    quantized.lowbit_info.stats["peak_rss_mb"] = peak_rss_mb()  # evaluation included
    path = save(quantized, out, loaded.tokenizer, overwrite=overwrite, evaluation=result)
    shutil.rmtree(work, ignore_errors=True)
    return QuantizeResult(path, quantized, read_manifest(path), result)
