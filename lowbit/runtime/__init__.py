from lowbit.runtime.qlinear import QuantizedLinear

__all__ = ["QuantizedLinear"]
