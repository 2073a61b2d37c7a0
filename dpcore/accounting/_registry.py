"""Registry of accountant kinds, keyed by name (``"rdp"``, ``"prv"``, ...)."""

from __future__ import annotations

from typing import Any

from dpcore.accounting._base import Accountant

__all__ = ["available_accountants", "create_accountant", "register_accountant"]

_REGISTRY: dict[str, type[Accountant]] = {}


def register_accountant(name: str, cls: type[Accountant], *, overwrite: bool = False) -> None:
    """Register an accountant class under ``name``.

    Args:
        name: The key users pass to :func:`create_accountant` (e.g. ``"rdp"``).
        cls: A subclass of :class:`~dpcore.accounting.Accountant`.
        overwrite: Replace an existing registration instead of raising.

    Raises:
        TypeError: If ``cls`` is not an ``Accountant`` subclass.
        ValueError: If ``name`` is empty or already taken and ``overwrite`` is False.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty string, got {name!r}.")
    if not (isinstance(cls, type) and issubclass(cls, Accountant)):
        raise TypeError(
            f"cls must be a subclass of dpcore.accounting.Accountant, got {cls!r}; "
            f"subclass Accountant and implement get_epsilon()."
        )
    if name in _REGISTRY and not overwrite and _REGISTRY[name] is not cls:
        raise ValueError(
            f"an accountant named {name!r} is already registered ({_REGISTRY[name].__name__}); "
            f"pick another name or pass overwrite=True."
        )
    _REGISTRY[name] = cls


def available_accountants() -> list[str]:
    """The registered accountant names, sorted."""
    return sorted(_REGISTRY)


def create_accountant(name: str, **kwargs: Any) -> Accountant:
    """Create an empty accountant of the registered kind ``name``.

    Args:
        name: A registered name such as ``"rdp"``, ``"gdp"``, ``"prv"`` or ``"pld"``.
        **kwargs: Passed to the accountant's constructor.

    Raises:
        ValueError: If ``name`` is not registered; the message lists the known names.
    """
    try:
        cls = _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"accountant must be one of {available_accountants()}, got {name!r}; "
            f"register a custom kind with dpcore.accounting.register_accountant(name, cls)."
        ) from None
    return cls(**kwargs)
