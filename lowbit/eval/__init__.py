from lowbit.eval.metrics import (
    EvalSettings,
    default_reference,
    evaluate,
    evaluate_against,
    evaluate_windows,
    protocol_windows,
    reference_perplexity,
    resolve_reference,
)
from lowbit.eval.reference import ReferenceCache, build_reference, cached_reference

__all__ = [
    "EvalSettings",
    "ReferenceCache",
    "build_reference",
    "cached_reference",
    "default_reference",
    "evaluate",
    "evaluate_against",
    "evaluate_windows",
    "protocol_windows",
    "reference_perplexity",
    "resolve_reference",
]
