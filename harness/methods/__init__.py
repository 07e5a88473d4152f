"""Adaptation methods, one module each; importing this package registers them all."""

from . import full, lora  # noqa: F401  (registration happens on import)
from .base import METHODS, Method, MethodConfig, register_method

__all__ = ["METHODS", "Method", "MethodConfig", "register_method"]
