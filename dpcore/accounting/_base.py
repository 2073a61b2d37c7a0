"""The accountant contract shared by every privacy accountant in :mod:`dpcore`.

An accountant records the *events* of DP-SGD: each logical (noise-adding) step is
one application of the Poisson-subsampled Gaussian mechanism, described by its
``noise_multiplier`` (noise standard deviation over clipping norm) and its
``sample_rate``. The history of events is the privacy ledger; each accountant
kind turns the same history into an ``(epsilon, delta)`` guarantee with its own
analysis.

Every mutating method validates its input completely *before* changing any
state: a rejected call leaves the history exactly as it was. (Opacus 1.x can
corrupt an accountant's history before raising; this base class cannot.)
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar

from dpcore.checks import check_noise_multiplier, check_num_steps, check_sample_rate

__all__ = ["Accountant", "HistoryEntry", "validate_history"]

#: One ledger entry: ``(noise_multiplier, sample_rate, num_steps)``.
HistoryEntry = tuple[float, float, int]


def _check_entry(entry: Any, index: int) -> HistoryEntry:
    try:
        noise_multiplier, sample_rate, num_steps = entry
    except (TypeError, ValueError):
        raise ValueError(
            f"history[{index}] must be a (noise_multiplier, sample_rate, num_steps) triple, "
            f"got {entry!r}."
        ) from None
    return (
        check_noise_multiplier(noise_multiplier, f"history[{index}].noise_multiplier"),
        check_sample_rate(sample_rate, f"history[{index}].sample_rate"),
        check_num_steps(num_steps, f"history[{index}].num_steps"),
    )


def validate_history(history: Iterable[Any]) -> list[HistoryEntry]:
    """Validate and normalise a history, merging identical consecutive entries.

    Args:
        history: An iterable of ``(noise_multiplier, sample_rate, num_steps)``.

    Returns:
        A new list of normalised entries (floats, floats, ints) in which
        consecutive entries with the same noise multiplier and sample rate are
        merged into one.

    Raises:
        ValueError: If an entry is malformed; the message names its index.
    """
    if isinstance(history, (str, bytes, Mapping)):
        raise ValueError(
            f"history must be a list of (noise_multiplier, sample_rate, num_steps) triples, "
            f"got {type(history).__name__}."
        )
    merged: list[HistoryEntry] = []
    for index, raw in enumerate(history):
        entry = _check_entry(raw, index)
        if merged and merged[-1][:2] == entry[:2]:
            merged[-1] = (entry[0], entry[1], merged[-1][2] + entry[2])
        else:
            merged.append(entry)
    return merged


class Accountant(abc.ABC):
    """Base class of every privacy accountant (Opacus' ``IAccountant`` contract).

    Subclasses implement :meth:`get_epsilon` and set :attr:`name`. They may
    override :meth:`_on_record` and :meth:`_on_reset` to keep caches in step
    with the history.

    Attributes:
        name: The registry key of the accountant kind, e.g. ``"rdp"``.
    """

    name: ClassVar[str] = ""

    def __init__(self) -> None:
        self._history: list[HistoryEntry] = []

    # ------------------------------------------------------------------ history
    @property
    def history(self) -> list[HistoryEntry]:
        """A copy of the ledger: ``(noise_multiplier, sample_rate, num_steps)`` entries.

        Identical consecutive steps are merged into one entry. Assigning a list
        validates it first and replaces the history only if it is valid.
        """
        return list(self._history)

    @history.setter
    def history(self, value: Iterable[Any]) -> None:
        self._replace_history(validate_history(value))

    def _replace_history(self, history: list[HistoryEntry]) -> None:
        previous = self._history
        self._history = []
        self._on_reset()
        try:
            for entry in history:  # already validated and merged
                self._on_record(*entry)
                self._history.append(entry)
        except Exception:
            self._history = []
            self._on_reset()
            for entry in previous:
                self._on_record(*entry)
                self._history.append(entry)
            raise

    def step(self, *, noise_multiplier: float, sample_rate: float, num_steps: int = 1) -> None:
        """Record ``num_steps`` applications of the subsampled Gaussian mechanism.

        Args:
            noise_multiplier: Noise standard deviation divided by the clipping norm.
            sample_rate: Probability that an example joins a (logical) batch.
            num_steps: How many identical steps to record.

        Raises:
            ValueError: On an invalid argument; the history is left unchanged.
        """
        nm = check_noise_multiplier(noise_multiplier)
        q = check_sample_rate(sample_rate)
        n = check_num_steps(num_steps)
        self._on_record(nm, q, n)
        if self._history and self._history[-1][:2] == (nm, q):
            last = self._history[-1]
            self._history[-1] = (nm, q, last[2] + n)
        else:
            self._history.append((nm, q, n))

    def __len__(self) -> int:
        """The total number of recorded steps (sum of ``num_steps`` over the history).

        Opacus 1.x returns the number of merged history entries here, although
        its docstring promises the number of steps; this returns the steps.
        """
        return sum(entry[2] for entry in self._history)

    # ------------------------------------------------------------------ analysis
    @classmethod
    def mechanism(cls) -> str:
        """The accountant kind, e.g. ``"rdp"``; also its registry key."""
        return cls.name

    @abc.abstractmethod
    def get_epsilon(self, delta: float, **kwargs: Any) -> float:
        """Return an epsilon such that the recorded history is ``(epsilon, delta)``-DP.

        Args:
            delta: Target delta, ``0 < delta < 1``.
            **kwargs: Accountant-specific options.
        """

    # ------------------------------------------------------------------ hooks for caches
    def _on_record(self, noise_multiplier: float, sample_rate: float, num_steps: int) -> None:
        """Called with every validated step just before it enters the history.

        ``self._history`` is still the history before this step, so an override
        can tell whether the step will merge into the last entry.
        """

    def _on_reset(self) -> None:
        """Called when the history is replaced wholesale."""

    # ------------------------------------------------------------------ state
    def state_dict(self, destination: dict[str, Any] | None = None) -> dict[str, Any]:
        """Return the accountant's state: its history and mechanism.

        Args:
            destination: An optional mapping to fill in place (Opacus' signature).

        Returns:
            ``{"history": [...], "mechanism": name}`` (``destination`` if given).
        """
        state: dict[str, Any] = {} if destination is None else destination
        state["history"] = list(self._history)
        state["mechanism"] = self.mechanism()
        return state

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Replace the history with the one in ``state_dict``, after validating it.

        A history is the same public record whatever the accountant kind, so a
        state written by another kind loads too and is re-accounted with this
        kind's analysis.

        Args:
            state_dict: A mapping with a ``"history"`` key, as from :meth:`state_dict`.

        Raises:
            ValueError: If the mapping or any entry is malformed; nothing changes.
        """
        if not isinstance(state_dict, Mapping) or "history" not in state_dict:
            raise ValueError(
                "state_dict must be a mapping with a 'history' key, as returned by "
                f"Accountant.state_dict(); got {type(state_dict).__name__}"
                + (f" with keys {sorted(state_dict)}" if isinstance(state_dict, Mapping) else "")
                + "."
            )
        self._replace_history(validate_history(state_dict["history"]))

    # ------------------------------------------------------------------ optimizer hook
    def get_optimizer_hook_fn(self, sample_rate: float) -> Callable[[Any], None]:
        """Return a hook that records one step each time an optimizer adds noise.

        The hook duck-types the optimizer: it reads ``optim.noise_multiplier``
        and, when present, ``optim.accumulated_iterations`` (the number of
        physical batches folded into the logical one, as in Opacus' optimizer).

        Args:
            sample_rate: The sampling rate of one physical batch.

        Returns:
            A callable ``hook(optimizer) -> None``.
        """
        q = check_sample_rate(sample_rate)

        def hook(optim: Any) -> None:
            accumulated = getattr(optim, "accumulated_iterations", 1) or 1
            self.step(
                noise_multiplier=optim.noise_multiplier,
                sample_rate=min(1.0, q * accumulated),
            )

        return hook

    def __repr__(self) -> str:
        return f"{type(self).__name__}(steps={len(self)}, entries={len(self._history)})"
