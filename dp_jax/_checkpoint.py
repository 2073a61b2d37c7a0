"""Checkpoints of a private JAX run: one ``.npz`` file, no pickle.

A checkpoint holds every leaf of the training state (parameters, optimizer
state including the PRNG key and any DP accumulators, the step counter) as a
numpy array, plus one JSON document with the Poisson sampler's position, the
privacy ledger (the accountant's history, :class:`dpcore.ledger.Ledger`) and the
user's JSON-serialisable extras. Floats in JSON keep every bit and the arrays are
stored exactly, so a resumed run continues bit for bit. Typed PRNG keys
(``jax.random.key``) are stored as their raw key data and re-wrapped on load.

Loading needs a *template*: a state with the same tree structure (e.g. the
initial state of a fresh ``make_private`` with the same arguments). Structure,
shapes and dtypes are checked before anything is returned or changed.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Mapping
from typing import IO, Any, BinaryIO, Union

import jax
import jax.numpy as jnp
import numpy as np

from dp_jax import _tree
from dp_jax._types import PyTree
from dpcore.accounting import Accountant
from dpcore.ledger import Ledger

__all__ = ["load_checkpoint", "load_pytree", "save_checkpoint", "save_pytree"]

PathOrFile = Union[str, os.PathLike, BinaryIO, IO[bytes]]

_FORMAT = "dp-jax-checkpoint"
_VERSION = 1
_META = "__meta__"


def _is_key(leaf: Any) -> bool:
    dtype = getattr(leaf, "dtype", None)
    return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _leaf_to_numpy(leaf: Any) -> tuple[np.ndarray, str | None]:
    if _is_key(leaf):
        return _tree.host_array(jax.random.key_data(leaf)), str(jax.random.key_impl(leaf))
    return _tree.host_array(leaf), None


def _flatten(tree: PyTree) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    arrays, key_impls = {}, {}
    for i, leaf in enumerate(leaves):
        array, impl = _leaf_to_numpy(leaf)
        arrays[f"leaf_{i}"] = array
        if impl is not None:
            key_impls[str(i)] = impl
    meta = {"num_leaves": len(leaves), "treedef": str(treedef), "key_impls": key_impls}
    return arrays, meta


def _check_leaf(i: int, saved: np.ndarray, template: Any) -> None:
    want = np.asarray(jax.random.key_data(template)) if _is_key(template) else np.asarray(template)
    if saved.shape != want.shape or saved.dtype != want.dtype:
        raise ValueError(
            f"checkpoint leaf {i} has shape {saved.shape} dtype {saved.dtype}, the template has "
            f"shape {want.shape} dtype {want.dtype}; load into a state built with the same model "
            "and optimizer as the saved run."
        )


def _unflatten(arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any], template: Any) -> Any:
    leaves, treedef = jax.tree_util.tree_flatten(template)
    if meta["num_leaves"] != len(leaves) or meta["treedef"] != str(treedef):
        raise ValueError(
            f"checkpoint state has {meta['num_leaves']} leaves with structure {meta['treedef']}, "
            f"the template has {len(leaves)} with structure {treedef}; load into a state built "
            "with the same model and optimizer as the saved run."
        )
    out = []
    for i, template_leaf in enumerate(leaves):
        saved = arrays[f"leaf_{i}"]
        _check_leaf(i, saved, template_leaf)
        if _is_key(template_leaf):
            out.append(jax.random.wrap_key_data(saved, impl=jax.random.key_impl(template_leaf)))
        elif isinstance(template_leaf, (np.ndarray, np.generic)):
            out.append(np.array(saved))
        elif isinstance(template_leaf, jax.Array):
            out.append(jnp.asarray(saved))
        else:
            out.append(type(template_leaf)(saved.item()) if saved.ndim == 0 else saved)
    return jax.tree_util.tree_unflatten(treedef, out)


def save_pytree(path: PathOrFile, tree: PyTree, *, metadata: Mapping[str, Any] | None = None) -> None:
    """Write ``tree``'s leaves and a JSON ``metadata`` document to one ``.npz`` file.

    Args:
        path: File path or binary file object.
        tree: PyTree pytree of arrays (typed PRNG keys allowed).
        metadata: JSON-serialisable mapping stored alongside.

    Raises:
        TypeError: If ``metadata`` is not JSON-serialisable.
    """
    arrays, meta = _flatten(tree)
    document = {"format": _FORMAT, "version": _VERSION, "tree": meta, "user": dict(metadata or {})}
    text = json.dumps(document, allow_nan=False)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays, **{_META: np.array(text)})
    data = buffer.getvalue()
    if hasattr(path, "write"):
        path.write(data)  # type: ignore[union-attr]
    else:
        with open(path, "wb") as handle:
            handle.write(data)


def load_pytree(path: PathOrFile, template: Any) -> tuple[Any, dict[str, Any]]:
    """Read a file written by :func:`save_pytree` into ``template``'s structure.

    Args:
        path: File path or binary file object.
        template: A pytree with the saved structure, shapes and dtypes.

    Returns:
        ``(tree, metadata)``.

    Raises:
        ValueError: If the file is not such a checkpoint or does not fit ``template``.
    """
    with np.load(path, allow_pickle=False) as npz:
        if _META not in npz.files:
            raise ValueError(f"{path!r} is not a dp_jax checkpoint (no {_META} entry).")
        document = json.loads(str(npz[_META]))
        if document.get("format") != _FORMAT or document.get("version") != _VERSION:
            raise ValueError(
                f"{path!r} is not a version-{_VERSION} dp_jax checkpoint: format "
                f"{document.get('format')!r}, version {document.get('version')!r}."
            )
        arrays = {name: npz[name] for name in npz.files if name != _META}
    tree = _unflatten(arrays, document["tree"], template)
    return tree, document["user"]


def save_checkpoint(
    path: PathOrFile,
    state: Any,
    *,
    batches: Any = None,
    accountant: Accountant | None = None,
    checkpoint_dict: Mapping[str, Any] | None = None,
) -> None:
    """Save a training state, the sampler position and the privacy ledger.

    Save between logical steps (after the step that adds the noise); a
    checkpoint taken mid-way through a logical batch would hold a partial
    accumulation whose remaining chunks the restored sampler would not replay.

    Args:
        path: File path or binary file object.
        state: The training state pytree (e.g. :class:`dp_jax.TrainState`).
        batches: A :class:`dp_jax.PoissonBatches` (or anything with ``state_dict``)
            whose position to save.
        accountant: The accountant whose history (ledger) to save.
        checkpoint_dict: Extra JSON-serialisable entries of the user.
    """
    metadata = {
        "sampler": None if batches is None else batches.state_dict(),
        "ledger": None if accountant is None else Ledger.from_accountant(accountant).to_dict(),
        "checkpoint_dict": dict(checkpoint_dict or {}),
    }
    save_pytree(path, state, metadata=metadata)


def load_checkpoint(
    path: PathOrFile,
    template: Any,
    *,
    batches: Any = None,
    accountant: Accountant | None = None,
) -> tuple[Any, dict[str, Any]]:
    """Load a checkpoint of :func:`save_checkpoint`; all or nothing.

    Everything is read and validated first; only then are ``batches`` and
    ``accountant`` changed (their previous state is restored if one of them fails).

    Args:
        path: File path or binary file object.
        template: A state with the saved structure (e.g. a fresh run's initial state).
        batches: Poisson batches whose position to restore.
        accountant: Accountant whose history to replace with the saved ledger.

    Returns:
        ``(state, checkpoint_dict)``.

    Raises:
        ValueError: If the file does not fit, or a position/ledger is missing or invalid.
    """
    state, metadata = load_pytree(path, template)
    ledger = metadata.get("ledger")
    sampler = metadata.get("sampler")
    if accountant is not None and ledger is None:
        raise ValueError("the checkpoint has no ledger; it was saved without an accountant.")
    if batches is not None and sampler is None:
        raise ValueError("the checkpoint has no sampler position; it was saved without batches.")
    parsed = None if ledger is None else Ledger.from_dict(ledger)
    previous_sampler = None if batches is None else batches.state_dict()
    if batches is not None:
        batches.load_state_dict(sampler)
    if accountant is not None and parsed is not None:
        try:
            parsed.load_into(accountant)
        except BaseException:
            if batches is not None:
                batches.load_state_dict(previous_sampler)
            raise
    return state, dict(metadata.get("checkpoint_dict", {}))
