"""The package version (mirrors ``opacus.version``)."""

from dp_torch import __version__

__all__ = ["__version__"]
