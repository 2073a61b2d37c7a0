"""The privacy-loss-distribution accountant (``dp_torch`` only; Opacus 1.6 has none).

:class:`PLDAccountant` is :class:`dpcore.accounting.pld.PLDAccountant`, the tight
accountant of dp-accounting; importing this module registers it under ``"pld"``.
"""

from dpcore.accounting.pld import PLDAccountant

__all__ = ["PLDAccountant"]
