from lowbit.models.adapters import ADAPTERS, ArchAdapter, get_adapter, supported_architectures
from lowbit.models.loading import LoadedModel, load_model, resolve_model_source

__all__ = [
    "ADAPTERS",
    "ArchAdapter",
    "LoadedModel",
    "get_adapter",
    "load_model",
    "resolve_model_source",
    "supported_architectures",
]
