"""The privacy ledger: an accountant's history in a portable JSON form.

Both backends record the same events (``noise_multiplier``, ``sample_rate``,
``num_steps``) in a :mod:`dpcore` accountant. A :class:`Ledger` is that history
plus the accountant kind that wrote it and the library version, serialised to
JSON so that a run in one framework can be re-accounted with another kind of
accountant, or resumed in the other framework. The round trip is exact: floats
are written with Python's shortest repr, which reads back bit for bit.

Example:
    >>> from dpcore.accounting import RDPAccountant
    >>> acc = RDPAccountant()
    >>> acc.step(noise_multiplier=1.1, sample_rate=0.01, num_steps=500)
    >>> text = Ledger.from_accountant(acc).to_json()
    >>> prv = Ledger.from_json(text).to_accountant("prv")   # re-account the same run
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

from dpcore.accounting._base import Accountant, HistoryEntry, validate_history
from dpcore.accounting._registry import create_accountant

__all__ = ["FORMAT", "FORMAT_VERSION", "Ledger", "load_ledger", "save_ledger"]

FORMAT = "dp-parity-ledger"
FORMAT_VERSION = 1


def _library_version() -> str:
    from dpcore import __version__

    return __version__


@dataclasses.dataclass(frozen=True)
class Ledger:
    """An immutable privacy ledger.

    Attributes:
        entries: ``(noise_multiplier, sample_rate, num_steps)`` triples, with
            identical consecutive entries merged.
        mechanism: The accountant kind that recorded it (e.g. ``"rdp"``), if known.
        library_version: The dp-parity version that wrote it.
    """

    entries: tuple[HistoryEntry, ...]
    mechanism: str | None = None
    library_version: str = dataclasses.field(default_factory=_library_version)

    def __post_init__(self) -> None:
        object.__setattr__(self, "entries", tuple(validate_history(self.entries)))
        if self.mechanism is not None and not isinstance(self.mechanism, str):
            raise ValueError(f"mechanism must be a string or None, got {self.mechanism!r}.")

    @property
    def total_steps(self) -> int:
        """The number of steps the ledger records."""
        return sum(entry[2] for entry in self.entries)

    # ------------------------------------------------------------------ accountants
    @classmethod
    def from_accountant(cls, accountant: Accountant) -> Ledger:
        """The ledger of an accountant's current history."""
        return cls(entries=tuple(accountant.history), mechanism=accountant.mechanism())

    def to_accountant(self, kind: str | None = None, **kwargs: Any) -> Accountant:
        """A fresh accountant of ``kind`` (default: the recording kind) holding this ledger.

        Args:
            kind: A registered accountant name; defaults to :attr:`mechanism`.
            **kwargs: Passed to the accountant's constructor.
        """
        name = kind if kind is not None else self.mechanism
        if name is None:
            raise ValueError(
                "this ledger records no mechanism; pass kind='rdp', 'prv', 'pld' or 'gdp'."
            )
        accountant = create_accountant(name, **kwargs)
        self.load_into(accountant)
        return accountant

    def load_into(self, accountant: Accountant) -> None:
        """Replace ``accountant``'s history with this ledger's entries."""
        accountant.history = list(self.entries)

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready mapping of this ledger."""
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "library_version": self.library_version,
            "mechanism": self.mechanism,
            "entries": [
                {"noise_multiplier": nm, "sample_rate": q, "num_steps": n}
                for nm, q, n in self.entries
            ],
        }

    def to_json(self, *, indent: int | None = 1) -> str:
        """Serialise to JSON (exact: floats keep every bit)."""
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Ledger:
        """Parse the mapping written by :meth:`to_dict`, validating every field."""
        if not isinstance(data, Mapping) or data.get("format") != FORMAT:
            raise ValueError(
                f"not a dp-parity ledger: expected a mapping with format={FORMAT!r}, got "
                f"{data.get('format') if isinstance(data, Mapping) else type(data).__name__!r}."
            )
        if data.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"unsupported ledger format_version {data.get('format_version')!r}; this "
                f"library reads version {FORMAT_VERSION}. Upgrade dp-parity."
            )
        raw = data.get("entries")
        if not isinstance(raw, list):
            raise ValueError(f"ledger 'entries' must be a list, got {type(raw).__name__}.")
        entries = []
        for index, item in enumerate(raw):
            if not isinstance(item, Mapping) or set(item) != {
                "noise_multiplier", "sample_rate", "num_steps"
            }:
                raise ValueError(
                    f"ledger entries[{index}] must have exactly the keys noise_multiplier, "
                    f"sample_rate and num_steps, got {item!r}."
                )
            entries.append((item["noise_multiplier"], item["sample_rate"], item["num_steps"]))
        return cls(
            entries=tuple(entries),
            mechanism=data.get("mechanism"),
            library_version=str(data.get("library_version", "unknown")),
        )

    @classmethod
    def from_json(cls, text: str) -> Ledger:
        """Parse a ledger from the JSON written by :meth:`to_json`."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"ledger text is not valid JSON: {err}") from None
        return cls.from_dict(data)


def save_ledger(accountant_or_ledger: Accountant | Ledger, path: str | os.PathLike[str]) -> None:
    """Write the ledger of an accountant (or a ledger) to ``path`` as JSON."""
    ledger = (
        accountant_or_ledger
        if isinstance(accountant_or_ledger, Ledger)
        else Ledger.from_accountant(accountant_or_ledger)
    )
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(ledger.to_json() + "\n")


def load_ledger(path: str | os.PathLike[str]) -> Ledger:
    """Read a ledger written by :func:`save_ledger`."""
    with open(path, encoding="utf-8") as handle:
        return Ledger.from_json(handle.read())
