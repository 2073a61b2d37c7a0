"""Finds differentiable uses of a parameter outside the layers that own it, during forward.

Ghost clipping computes each example's gradient norm from the calls of the layers that own
a parameter. A use elsewhere (``F.linear(x, self.fc.weight)`` in a parent's forward) adds
to the gradient that the clipped backward pass computes but not to the norm, so the clip
factor would be too large. The tracker watches every torch function called during the
model's forward (a ``TorchFunctionMode``) and records the parameters that reach a
differentiable result while none of their owning layers is running.

Guarantee:
    Every differentiable use of a tracked parameter by a torch function during the forward
    pass, outside the forward of each layer that owns it, is recorded under the parameter's
    name. Uses inside ``torch.no_grad`` or that give no gradient (``p.detach()``, ``p.shape``)
    are not uses.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode

__all__ = ["ParameterUseTracker"]


def _differentiable(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return value.requires_grad
    if isinstance(value, (list, tuple)):
        return any(_differentiable(v) for v in value)
    return False


def _tensors(args: tuple, kwargs: Optional[dict]) -> list:
    found = []
    for value in (*args, *(kwargs or {}).values()):
        if isinstance(value, (list, tuple)):
            found.extend(v for v in value if isinstance(v, torch.Tensor))
        elif isinstance(value, torch.Tensor):
            found.append(value)
    return found


class _UseMode(TorchFunctionMode):
    def __init__(self, tracker: "ParameterUseTracker"):
        super().__init__()
        self.tracker = tracker

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: Optional[dict] = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if torch.is_grad_enabled() and _differentiable(out):
            self.tracker.observe(_tensors(args, kwargs))
        return out


class ParameterUseTracker:
    """Records parameters used outside their owning layers during the model's forward.

    Attributes:
        outside: Names of the parameters used outside their layers since :meth:`take`.
    """

    def __init__(self, owned: dict, names: dict[int, str], unowned: tuple = (),
                 aliases: Optional[Callable[[], dict]] = None):
        """Build the owner map.

        Args:
            owned: ``{layer: [parameters it owns]}`` (a parameter may have several owners,
                e.g. tied embeddings).
            names: ``{id(parameter): qualified name}``.
            unowned: Trainable parameters no hooked layer owns (a layer left unhooked with
                ``strict=False``): every differentiable use of them is recorded.
            aliases: For models whose forward runs on stand-ins of the registered parameters
                (FSDP2's unsharded parameters): returns ``{id(stand-in): registered
                parameter}``. Uses of an unknown ``nn.Parameter`` are then kept and resolved
                through it in :meth:`take` (stand-ins may be created during the forward).
        """
        self._owners: dict[int, set] = {id(p): set() for p in unowned}
        for module, params in owned.items():
            for p in params:
                self._owners.setdefault(id(p), set()).add(module)
        self._names = names
        self._active: list = []
        self._mode: Optional[_UseMode] = None
        self._depth = 0
        self._aliases = aliases
        self._deferred: dict = {}
        self.outside: set = set()

    def install(self, handles: list) -> None:
        """Register the pre/post forward hooks that track which owning layers are running.

        Args:
            handles: The list collecting hook handles (removed with the other hooks).
        """
        for module in {m for owners in self._owners.values() for m in owners}:
            handles.append(module.register_forward_pre_hook(self._push))
            handles.append(module.register_forward_hook(self._pop, always_call=True))

    def _push(self, module: nn.Module, args: tuple) -> None:
        self._active.append(module)

    def _pop(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self._active and self._active[-1] is module:
            self._active.pop()

    def enter(self) -> None:
        """Start watching (the model's forward begins); nested calls are counted."""
        self._depth += 1
        if self._depth == 1:
            self._active = []
            self._mode = _UseMode(self)
            self._mode.__enter__()

    def exit(self) -> None:
        """Stop watching when the outermost forward ends."""
        if self._depth == 0:
            return
        self._depth -= 1
        if self._depth == 0 and self._mode is not None:
            mode, self._mode = self._mode, None
            mode.__exit__(None, None, None)

    def observe(self, tensors: list) -> None:
        """Record each tracked parameter among ``tensors`` whose owners are not running."""
        active = set(self._active)
        for t in tensors:
            owners = self._owners.get(id(t))
            if owners is not None and not owners & active:
                self.outside.add(self._names.get(id(t), "<unnamed>"))
            elif owners is None and self._aliases is not None and isinstance(t, nn.Parameter):
                self._deferred.setdefault((id(t), frozenset(active)), t)

    def _resolve_deferred(self) -> None:
        """Record the deferred uses of stand-ins whose registered parameter's owners were idle."""
        if not self._deferred:
            return
        aliases = self._aliases()
        for (key, active), _ in self._deferred.items():
            registered = aliases.get(key)
            owners = None if registered is None else self._owners.get(id(registered))
            if owners is not None and not owners & active:
                self.outside.add(self._names.get(id(registered), "<unnamed>"))
        self._deferred = {}

    def take(self) -> list[str]:
        """The recorded names, sorted, and clear them."""
        self._resolve_deferred()
        names, self.outside = sorted(self.outside), set()
        return names
