"""State-dict renaming for layers that re-implement a ``torch.nn`` layer from submodules.

A DP layer such as :class:`~dp_torch.layers.DPLSTM` keeps its weights in ``nn.Linear``
submodules (so a hook-based per-sample-gradient engine can see them), but its ``state_dict``
should read exactly like the ``torch.nn`` layer it replaces, so that checkpoints move freely
between the two. :class:`RenameParamsMixin` does that with a pair of state-dict hooks.

Each parameter lives in one place; only the state dict is renamed, on save and on load, and both
naming schemes load (the difference from Opacus' mixin: ``docs/opacus_differences.md``).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch.nn as nn

__all__ = ["RenameParamsMixin"]


def _rename_on_save(module: nn.Module, state_dict: dict, prefix: str, local_metadata: Any) -> None:
    """State-dict post-hook: internal names -> public names, public ones in map order."""
    old_to_new: dict[str, str] = module.old_to_new
    own = [k for k in state_dict if k.startswith(prefix)]
    values = OrderedDict((k, state_dict.pop(k)) for k in own)
    renamed_emitted = False
    for key, value in values.items():
        rel = key[len(prefix):]
        if rel not in old_to_new:
            state_dict[key] = value
            continue
        if renamed_emitted:
            continue
        for old, new in old_to_new.items():
            if prefix + old in values:
                state_dict[prefix + new] = values[prefix + old]
        renamed_emitted = True


def _rename_on_load(
    module: nn.Module,
    state_dict: dict,
    prefix: str,
    local_metadata: Any,
    strict: bool,
    missing_keys: list,
    unexpected_keys: list,
    error_msgs: list,
) -> None:
    """Load pre-hook: public names -> internal names; internal names are accepted as they are."""
    for new, old in module.new_to_old.items():
        if prefix + new not in state_dict:
            continue
        if prefix + old in state_dict:
            error_msgs.append(
                f"state_dict holds both {prefix + new!r} and {prefix + old!r}, two names for the "
                f"same tensor of {type(module).__name__}; keep only one of them"
            )
            continue
        state_dict[prefix + old] = state_dict.pop(prefix + new)


class RenameParamsMixin:
    """Mixin for an ``nn.Module`` whose ``state_dict`` uses other names than its parameters.

    Example:
        >>> class Cell(RenameParamsMixin, nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.ih = nn.Linear(2, 3)
        ...         self.set_rename_map({"ih.weight": "weight_ih", "ih.bias": "bias_ih"})
        >>> list(Cell().state_dict())
        ['weight_ih', 'bias_ih']
    """

    old_to_new: dict[str, str]
    new_to_old: dict[str, str]

    def set_rename_map(self, rename_map: dict[str, str]) -> None:
        """Sets the names the state dict uses.

        Args:
            rename_map: Internal name (relative to this module, e.g. ``"l0.ih.weight"``) ->
                public name (e.g. ``"weight_ih_l0"``). Must be one-to-one. Its order is the
                order of the renamed entries in ``state_dict()``.

        Raises:
            ValueError: If ``rename_map`` maps two internal names to the same public name.
        """
        inverse = {new: old for old, new in rename_map.items()}
        if len(inverse) != len(rename_map):
            raise ValueError(
                f"rename_map must be one-to-one, got {rename_map!r}: two internal names share "
                "a public name; give each its own"
            )
        self.old_to_new = dict(rename_map)
        self.new_to_old = inverse
        if not getattr(self, "_rename_hooks_registered", False):
            self.register_state_dict_post_hook(_rename_on_save)  # type: ignore[attr-defined]
            self.register_load_state_dict_pre_hook(_rename_on_load)  # type: ignore[attr-defined]
            self._rename_hooks_registered = True
