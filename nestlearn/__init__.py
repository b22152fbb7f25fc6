"""nestlearn: a JAX platform for models that keep learning after deployment."""

from nestlearn._errors import (
    CheckpointError,
    ConfigError,
    DataError,
    NestlearnError,
    OperatingError,
    Preempted,
)
from nestlearn.engine._cache import enable_compilation_cache

# JAX's persistent compilation cache, on by default (see nestlearn.engine.enable_compilation_cache).
COMPILATION_CACHE = enable_compilation_cache()

__all__ = [
    "COMPILATION_CACHE",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "NestlearnError",
    "OperatingError",
    "Preempted",
]
