"""Utilities of the PyTorch backend (mirrors ``opacus.utils``)."""
