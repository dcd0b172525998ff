from lowbit.eval.metrics import (
    evaluate,
    evaluate_windows,
    protocol_windows,
    reference_perplexity,
    resolve_reference,
)
from lowbit.eval.reference import ReferenceCache, build_reference, cached_reference

__all__ = [
    "ReferenceCache",
    "build_reference",
    "cached_reference",
    "evaluate",
    "evaluate_windows",
    "protocol_windows",
    "reference_perplexity",
    "resolve_reference",
]
