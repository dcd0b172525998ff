from lowbit.data.sources import DATASETS, load_text
from lowbit.data.windows import (
    QUICK_WINDOWS,
    calibration_windows,
    eval_windows,
    tokenize,
    tokens_digest,
)

__all__ = [
    "DATASETS",
    "QUICK_WINDOWS",
    "calibration_windows",
    "eval_windows",
    "load_text",
    "tokenize",
    "tokens_digest",
]
