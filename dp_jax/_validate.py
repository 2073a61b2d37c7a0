"""Model checks for DP training: BatchNorm in training mode mixes examples.

Per-example gradient clipping bounds one example's influence only if the loss
of each example depends on that example alone. BatchNorm in training mode
normalises with statistics of the whole batch, so one example changes every
other example's output and the privacy analysis no longer holds. GroupNorm and
LayerNorm normalise each example on its own and are the usual replacements.
BatchNorm in *inference* mode (running averages, frozen) is per-example and allowed.

What is supported:

* ``flax.nnx`` models: :func:`validate` finds every ``nnx.BatchNorm`` with
  ``use_running_average=False``; :func:`fix` returns a copy in which each of them
  is replaced by an ``nnx.GroupNorm`` over the same number of features.
* ``flax.linen`` modules: submodules are only known once the module runs, so
  :func:`validate` traces ``module.init`` abstractly (``jax.eval_shape``, no
  computation) on the example inputs you pass and reports every ``nn.BatchNorm``
  called in training mode (the ``use_running_average`` attribute merged with the
  call argument). Without example inputs only BatchNorm modules held in dataclass
  fields are found. :func:`fix` returns a :class:`GroupNormLinen` wrapper whose
  ``init`` / ``apply`` run the module with every ``nn.BatchNorm`` call computed as
  ``nn.GroupNorm`` instead, with the same ``scale`` / ``bias`` parameters at the
  same paths (so the parameter tree is unchanged and no ``batch_stats`` are used).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
from flax import linen as nn
from flax import nnx

__all__ = ["GroupNormLinen", "UnsupportedModuleError", "fix", "is_valid", "validate"]

_ADVICE = (
    "BatchNorm in training mode mixes the examples of a batch, which breaks per-example "
    "clipping; use GroupNorm or LayerNorm instead (dp_jax.fix(model) swaps BatchNorm for "
    "GroupNorm), or run BatchNorm with use_running_average=True (frozen statistics)."
)


class UnsupportedModuleError(ValueError):
    """A model has layers that cannot be trained with per-example clipping.

    Attributes:
        paths: The offending submodules' paths, e.g. ``["block/BatchNorm_0"]``.
    """

    def __init__(self, paths: list[str]) -> None:
        self.paths = list(paths)
        super().__init__(
            f"model has {len(paths)} BatchNorm layer(s) in training mode at {self.paths}. "
            + _ADVICE
        )


def _path_str(path: Any) -> str:
    return "/".join(str(p) for p in path) or "<root>"


def default_num_groups(num_features: int) -> int:
    """The largest divisor of ``num_features`` that is at most 32 (GroupNorm's groups)."""
    return max(g for g in range(1, min(32, num_features) + 1) if num_features % g == 0)


# --------------------------------------------------------------------------- nnx


def _nnx_bad_paths(model: nnx.Module) -> list[tuple[Any, ...]]:
    return [
        tuple(path)
        for path, module in nnx.iter_modules(model)
        if isinstance(module, nnx.BatchNorm) and not module.use_running_average
    ]


def _nnx_fix(model: nnx.Module, num_groups: int | None) -> nnx.Module:
    fixed = nnx.clone(model)
    for path in _nnx_bad_paths(fixed):
        parent: Any = fixed
        for key in path[:-1]:
            parent = parent[key] if isinstance(key, int) else getattr(parent, key)
        bn = parent[path[-1]] if isinstance(path[-1], int) else getattr(parent, path[-1])
        groups = default_num_groups(bn.num_features) if num_groups is None else num_groups
        gn = nnx.GroupNorm(
            bn.num_features,
            num_groups=groups,
            epsilon=bn.epsilon,
            use_bias=bn.use_bias,
            use_scale=bn.use_scale,
            rngs=nnx.Rngs(0),
        )
        if isinstance(path[-1], int):
            parent[path[-1]] = gn
        else:
            setattr(parent, path[-1], gn)
    return fixed


# --------------------------------------------------------------------------- linen


def _field_bad_paths(module: nn.Module, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Training-mode BatchNorm modules reachable through dataclass fields (no tracing)."""
    found = []
    for field in dataclasses.fields(module):
        value = getattr(module, field.name, None)
        items = value if isinstance(value, (list, tuple)) else [value]
        for i, item in enumerate(items):
            if not isinstance(item, nn.Module):
                continue
            path = prefix + ((field.name, str(i)) if isinstance(value, (list, tuple)) else (field.name,))
            if isinstance(item, nn.BatchNorm) and item.use_running_average is not True:
                found.append(path)
            found.extend(_field_bad_paths(item, path))
    return found


def _bn_training(module: nn.BatchNorm, kwargs: dict[str, Any]) -> bool:
    call_value = kwargs.get("use_running_average")
    value = module.use_running_average if call_value is None else call_value
    return not bool(value)


def _traced_bad_paths(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> list[str]:
    found: list[str] = []

    def record(next_fun: Callable, call_args: tuple, call_kwargs: dict, context: Any) -> Any:
        bn = context.module
        if (isinstance(bn, nn.BatchNorm) and context.method_name == "__call__"
                and _bn_training(bn, call_kwargs)):
            path = _path_str(bn.scope.path)
            if path not in found:
                found.append(path)
        return next_fun(*call_args, **call_kwargs)

    def init() -> Any:
        with nn.intercept_methods(record):
            return module.init(jax.random.key(0), *args, **kwargs)

    jax.eval_shape(init)
    return found


def _group_norm_interceptor(num_groups: int | None) -> Callable:
    def intercept(next_fun: Callable, args: tuple, kwargs: dict, context: Any) -> Any:
        bn = context.module
        if not (isinstance(bn, nn.BatchNorm) and context.method_name == "__call__"):
            return next_fun(*args, **kwargs)
        x = args[0]
        features = x.shape[-1]
        groups = default_num_groups(features) if num_groups is None else num_groups
        params = {}
        if bn.use_scale:
            params["scale"] = bn.param("scale", bn.scale_init, (features,), bn.param_dtype)
        if bn.use_bias:
            params["bias"] = bn.param("bias", bn.bias_init, (features,), bn.param_dtype)
        gn = nn.GroupNorm(
            num_groups=groups, epsilon=bn.epsilon, use_bias=bn.use_bias,
            use_scale=bn.use_scale, dtype=bn.dtype, param_dtype=bn.param_dtype,
        )
        return gn.apply({"params": params}, x)

    return intercept


class GroupNormLinen:
    """A linen module run with every ``nn.BatchNorm`` computed as ``nn.GroupNorm``.

    Returned by :func:`fix` for linen modules. It offers ``init``, ``init_with_output``
    and ``apply`` with the wrapped module's signatures; the parameters keep the
    BatchNorm's names (``scale``, ``bias``) and paths, and no ``batch_stats``
    collection is created or read. The group count is the largest divisor of the
    feature count that is at most 32 unless ``num_groups`` is given.

    Attributes:
        module: The wrapped linen module.
        num_groups: Fixed group count, or ``None`` for the default rule.
    """

    def __init__(self, module: nn.Module, num_groups: int | None = None) -> None:
        self.module = module
        self.num_groups = num_groups

    def _run(self, method: str, *args: Any, **kwargs: Any) -> Any:
        with nn.intercept_methods(_group_norm_interceptor(self.num_groups)):
            return getattr(self.module, method)(*args, **kwargs)

    def init(self, *args: Any, **kwargs: Any) -> Any:
        """``module.init`` with BatchNorm replaced by GroupNorm."""
        return self._run("init", *args, **kwargs)

    def init_with_output(self, *args: Any, **kwargs: Any) -> Any:
        """``module.init_with_output`` with BatchNorm replaced by GroupNorm."""
        return self._run("init_with_output", *args, **kwargs)

    def apply(self, *args: Any, **kwargs: Any) -> Any:
        """``module.apply`` with BatchNorm replaced by GroupNorm."""
        return self._run("apply", *args, **kwargs)

    def __repr__(self) -> str:
        return f"GroupNormLinen({self.module!r}, num_groups={self.num_groups!r})"


# --------------------------------------------------------------------------- public


def _bad_paths(model: Any, args: tuple, kwargs: dict[str, Any]) -> list[str]:
    if isinstance(model, GroupNormLinen):
        return []
    if isinstance(model, nnx.Module):
        return [_path_str(p) for p in _nnx_bad_paths(model)]
    if isinstance(model, nn.Module):
        if args or kwargs:
            return _traced_bad_paths(model, args, kwargs)
        return [_path_str(p) for p in _field_bad_paths(model)]
    raise TypeError(
        f"model must be a flax.nnx.Module or a flax.linen.Module, got {type(model).__name__}."
    )


def validate(model: Any, *example_args: Any, **example_kwargs: Any) -> None:
    """Raise if ``model`` has a BatchNorm in training mode.

    Args:
        model: A ``flax.nnx.Module``, a ``flax.linen.Module`` or a :class:`GroupNormLinen`.
        *example_args: For linen modules: example inputs (a batch) to trace
            ``model.init`` with, abstractly; without them only BatchNorm held in
            dataclass fields is found (submodules made inside ``@compact`` methods
            or ``setup`` exist only while the module runs).
        **example_kwargs: Keyword inputs for the traced call (e.g. ``train=True``).

    Raises:
        UnsupportedModuleError: Naming every offending submodule path and suggesting
            GroupNorm or LayerNorm.
        TypeError: If ``model`` is not a flax module.
    """
    paths = _bad_paths(model, example_args, example_kwargs)
    if paths:
        raise UnsupportedModuleError(paths)


def is_valid(model: Any, *example_args: Any, **example_kwargs: Any) -> bool:
    """Whether :func:`validate` would pass (same arguments)."""
    return not _bad_paths(model, example_args, example_kwargs)


def fix(model: Any, *, num_groups: int | None = None) -> Any:
    """Return a copy of ``model`` with training-mode BatchNorm replaced by GroupNorm.

    Args:
        model: An ``nnx.Module`` (a clone is returned with each training-mode
            ``nnx.BatchNorm`` attribute or list entry replaced by ``nnx.GroupNorm``,
            freshly initialised: scale 1, bias 0) or a ``linen.Module`` (wrapped in a
            :class:`GroupNormLinen`, see the module docstring). ``model`` itself is
            not modified.
        num_groups: Groups of every GroupNorm; default: the largest divisor of the
            feature count that is at most 32. It must divide every feature count.

    Returns:
        The fixed model.

    Raises:
        ValueError: If ``num_groups`` is not a positive integer.
        TypeError: If ``model`` is not a flax module.
    """
    if num_groups is not None and (
        isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1
    ):
        raise ValueError(f"num_groups must be a positive int or None, got {num_groups!r}.")
    if isinstance(model, nnx.Module):
        return _nnx_fix(model, num_groups)
    if isinstance(model, GroupNormLinen):
        return GroupNormLinen(model.module, num_groups if num_groups else model.num_groups)
    if isinstance(model, nn.Module):
        return GroupNormLinen(model.clone(), num_groups)
    raise TypeError(
        f"model must be a flax.nnx.Module or a flax.linen.Module, got {type(model).__name__}."
    )

