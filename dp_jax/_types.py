"""Type aliases shared by the modules of dp_jax."""

from __future__ import annotations

from typing import Any, TypeAlias

__all__ = ["PyTree"]

PyTree: TypeAlias = Any
"""A JAX pytree: an array, or nested tuples, lists, dicts and registered nodes of arrays."""
