from lowbit.data.sources import DATASETS, load_text
from lowbit.data.windows import (
    QUICK_WINDOWS,
    calibration_data,
    calibration_windows,
    eval_windows,
    tokenize,
)

__all__ = [
    "DATASETS",
    "QUICK_WINDOWS",
    "calibration_data",
    "calibration_windows",
    "eval_windows",
    "load_text",
    "tokenize",
]
