"""nestlearn: a JAX platform for models that keep learning after deployment."""

from nestlearn._errors import ConfigError, DataError, NestlearnError

__all__ = ["ConfigError", "DataError", "NestlearnError"]
