"""RDP of the Poisson-subsampled Gaussian mechanism (``opacus.accountants.analysis.rdp``).

:func:`compute_rdp` and :func:`get_privacy_spent` are dpcore's, with Opacus'
keyword-only signatures: ``compute_rdp(q=, noise_multiplier=, steps=, orders=)``
returns the RDP at each order and ``get_privacy_spent(orders=, rdp=, delta=)``
returns ``(epsilon, best_order)`` (conversion of Balle et al. 2020).
"""

from dpcore.accounting.rdp import compute_rdp
from dpcore.accounting.rdp import get_privacy_spent

__all__ = ["compute_rdp", "get_privacy_spent"]
