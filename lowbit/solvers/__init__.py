from lowbit.solvers.gptq import GPTQResult, HessianError, gptq_quantize
from lowbit.solvers.rtn import rtn_quantize

# solvers that need no calibration data; GPTQ runs through the block pipeline
SOLVERS = {"rtn": rtn_quantize}

__all__ = ["SOLVERS", "GPTQResult", "HessianError", "gptq_quantize", "rtn_quantize"]
