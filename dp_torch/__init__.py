"""dp_torch: an Opacus-1.x-compatible differentially private training backend for PyTorch."""

__version__ = "0.1.0"
