from lowbit.solvers.gptq import GPTQResult, HessianError, gptq_quantize, gptq_quantize_stacked

__all__ = ["GPTQResult", "HessianError", "gptq_quantize", "gptq_quantize_stacked"]
