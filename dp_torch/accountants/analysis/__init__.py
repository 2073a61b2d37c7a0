"""Privacy analysis functions under Opacus' module paths (``opacus.accountants.analysis``)."""

from dp_torch.accountants.analysis import rdp

__all__ = ["rdp"]
