from lowbit.runtime.qembedding import QuantizedEmbedding
from lowbit.runtime.qlinear import QuantizedLinear

__all__ = ["QuantizedEmbedding", "QuantizedLinear"]
