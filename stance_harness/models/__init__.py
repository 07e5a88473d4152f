"""Models: the registry of names, offline loading, anatomy, and the embedded tiny models."""

from stance_harness.models.anatomy import ARCHITECTURES, KIND_GROUPS, Anatomy, ParamName, locus_of, relative_depth_analog
from stance_harness.models.loading import (DEFAULT_MODEL, MODELS, LoadedModel, ModelArgs, ModelSpec, load_model, resolve_model,
                      share_frozen_weights)

__all__ = [
    "ARCHITECTURES", "KIND_GROUPS", "Anatomy", "ParamName", "locus_of", "relative_depth_analog",
    "DEFAULT_MODEL", "MODELS", "LoadedModel", "ModelArgs", "ModelSpec", "load_model", "resolve_model",
    "share_frozen_weights",
]
