"""lowbit: post-training quantization of LLMs to a size you choose, with honest measurements."""

from lowbit.artifact import load, save
from lowbit.errors import LowbitError
from lowbit.eval import evaluate
from lowbit.layers import QuantizedLayer, quantized_layers
from lowbit.models import load_model
from lowbit.quantize import quantize
from lowbit.recipe import Budget, Calibration, GPTQSettings, Recipe, RTNSettings
from lowbit.version import __version__

__all__ = [
    "Budget",
    "Calibration",
    "GPTQSettings",
    "LowbitError",
    "QuantizedLayer",
    "RTNSettings",
    "Recipe",
    "evaluate",
    "load",
    "load_model",
    "quantize",
    "quantized_layers",
    "save",
    "__version__",
]
