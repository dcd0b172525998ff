"""lowbit: post-training quantization of LLMs to a size you choose, with honest measurements."""

__version__ = "0.1.0"

from lowbit.artifact import load, save  # noqa: E402
from lowbit.errors import LowbitError  # noqa: E402
from lowbit.eval import evaluate  # noqa: E402
from lowbit.models import load_model  # noqa: E402
from lowbit.quantize import quantize  # noqa: E402

__all__ = ["LowbitError", "evaluate", "load", "load_model", "quantize", "save", "__version__"]
