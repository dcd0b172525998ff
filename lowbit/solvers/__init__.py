from lowbit.solvers.rtn import rtn_quantize

SOLVERS = {"rtn": rtn_quantize}

__all__ = ["SOLVERS", "rtn_quantize"]
