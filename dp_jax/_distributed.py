"""Data-parallel DP-SGD over a JAX device mesh (one host or many).

The privacy rules do not change when the batch is spread over devices (DESIGN
section 3): every example is clipped once, on the device that holds it; the
clipped sums of all devices are added with ``jax.lax.psum``; Gaussian noise is
added ONCE to that global sum, from one replicated PRNG key; the update is the
same on every device, so parameters stay identical everywhere; the accountant
records one step per logical batch with the *global* sample rate.

How a step runs (:func:`make_sharded_step`). The batch and its mask are sharded
along the mesh axis (``NamedSharding(mesh, P("data"))``), the training state is
replicated (``NamedSharding(mesh, P())``). Inside ``jax.shard_map`` each device
evaluates ``grad_fn(params, local_batch, local_mask, max_grad_norm=C) ->
(clipped_sum, ClipAux)`` (the contract of :func:`dp_jax.clipped_grad`) on its
rows, and :func:`psum_clipped` adds the clipped sums and the clipping counts
over the axis. Outside the ``shard_map``, in the same ``jax.jit``, the optax DP
transformation receives the *global* clipped sum and draws the noise from the
replicated key: one logical draw, computed identically by every device. The
output shardings are replicated, so the step cannot return device-dependent
parameters.

One device of the mesh, one process, or many processes: the code is the same.
For several hosts (or several processes on one host), start every process with
:func:`jax.distributed.initialize` *before* any other JAX call::

    import jax
    jax.distributed.initialize(
        coordinator_address="10.0.0.1:1234",  # process 0's host and a free port
        num_processes=2,
        process_id=int(os.environ["PROCESS_ID"]),  # 0 .. num_processes - 1
        # Failure detection (seconds): a process that sends no heartbeat for this
        # long is declared dead and every other process fails instead of hanging.
        heartbeat_timeout_seconds=100,
        initialization_timeout=300,    # how long to wait for all processes to join
        shutdown_timeout_seconds=300,  # how long the exit barrier waits
    )
    mesh = dp_jax.data_mesh()          # all devices of all processes, one axis

On CPU the cross-process collectives use gloo (``jax_cpu_collectives_implementation``
is ``"gloo"`` by default in JAX 0.10; set it explicitly with
``jax.config.update`` on older versions); the number of CPU devices per process
is ``XLA_FLAGS=--xla_force_host_platform_device_count=K`` (or
``jax.config.update("jax_num_cpu_devices", K)``) before the first JAX call.
Every process runs the same Python program: it builds the same model, calls
:func:`replicate` on the same initial state, and iterates a
:class:`ShardedBatches` built on the same data; each process gathers only the
rows that land on its own devices. The indices of each logical batch are
broadcast from process 0, so all processes agree on the Poisson batch even in
secure mode or without a seed.

If a process dies, the others do not hang: a gloo collective with the dead peer
fails (``JaxRuntimeError: Gloo all-reduce failed``), and the coordination
service declares the process dead once it has missed heartbeats for
``heartbeat_timeout_seconds``, after which JAX terminates every other process
("Terminating process because the JAX distributed service detected fatal
errors"); with a 5 s heartbeat the survivors exit within about 5-8 s in the
tests. A step is one XLA computation, so a failed step returns nothing and no
partially noised update is applied. A process that hangs while alive keeps
sending heartbeats and is not detected: run multi-process jobs under an outer
wall-clock limit (as the tests do).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dp_jax._data import PhysicalChunk
from dp_jax._grads import ClipAux
from dp_jax._step import make_step_fn
from dpcore import sampling as core_sampling

__all__ = [
    "ShardedBatches",
    "data_mesh",
    "make_sharded_step",
    "pad_to_multiple",
    "psum_clipped",
    "replicate",
    "shard_batch",
    "sharded_clipped_grad",
]

_INT32_MAX = np.iinfo(np.int32).max


# --------------------------------------------------------------------------- validation


def _check_mesh(mesh: Any) -> None:
    if not isinstance(mesh, Mesh):
        raise TypeError(
            f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}; build one with "
            "dp_jax.data_mesh()."
        )


def _check_axis(mesh: Any, axis_name: Any) -> int:
    """The size of ``axis_name`` in ``mesh``; raises on a bad mesh or axis."""
    _check_mesh(mesh)
    if axis_name not in mesh.axis_names:
        raise ValueError(
            f"axis_name={axis_name!r} is not an axis of the mesh (axes {mesh.axis_names}); pass "
            "the name the mesh was built with."
        )
    return int(mesh.shape[axis_name])


def _check_multiple(size: int, multiple: int, name: str) -> None:
    if size % multiple:
        raise ValueError(
            f"{name} has {size} rows, not a multiple of the {multiple} devices of the data axis; "
            "pad it with dp_jax.pad_to_multiple (padded rows masked out) or use "
            "dp_jax.shard_batch / dp_jax.ShardedBatches, which pad."
        )


def _leading_size(tree: Any, name: str) -> int:
    leaves = jax.tree_util.tree_leaves(tree)
    if not leaves:
        raise ValueError(f"{name} has no array leaves; pass a pytree of arrays with a batch axis.")
    sizes = {int(np.shape(x)[0]) if np.ndim(x) else -1 for x in leaves}
    if -1 in sizes or len(sizes) != 1:
        raise ValueError(
            f"every leaf of {name} needs the same leading (example) axis, got shapes "
            f"{[np.shape(x) for x in leaves]}."
        )
    return sizes.pop()


# --------------------------------------------------------------------------- mesh and placement


def data_mesh(devices: Optional[Sequence[Any]] = None, *, axis_name: str = "data") -> Mesh:
    """A one-axis mesh for data parallelism.

    Args:
        devices: The devices, in mesh order; default ``jax.devices()`` (every device of
            every process). They are ordered by ``(process_index, id)`` so each process
            owns a contiguous block of the batch.
        axis_name: Name of the mesh axis the batch is split along.

    Returns:
        ``jax.sharding.Mesh(devices, (axis_name,))``.

    Raises:
        ValueError: If ``devices`` is empty or repeats a device, or ``axis_name`` is not
            a non-empty string.
    """
    if not isinstance(axis_name, str) or not axis_name:
        raise ValueError(f"axis_name must be a non-empty string, got {axis_name!r}.")
    chosen = list(jax.devices() if devices is None else devices)
    if not chosen:
        raise ValueError("devices is empty; pass at least one device (default jax.devices()).")
    if len({d.id for d in chosen}) != len(chosen):
        raise ValueError(f"devices repeats a device: {chosen}; pass each device once.")
    chosen.sort(key=lambda d: (d.process_index, d.id))
    return Mesh(np.array(chosen, dtype=object), (axis_name,))


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Place a pytree (parameters, optimizer state, a TrainState) on every device of ``mesh``.

    Every process must pass the same values (same initialisation and seed); with
    several processes ``jax.device_put`` checks that they do (one small collective
    per leaf) and raises otherwise.

    Args:
        tree: Pytree of arrays (PRNG key arrays included).
        mesh: The mesh.

    Returns:
        The pytree with every leaf a ``jax.Array`` with ``NamedSharding(mesh, P())``.
    """
    _check_mesh(mesh)
    sharding = NamedSharding(mesh, P())
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)
    return jax.tree_util.tree_map(lambda leaf: _replicate_leaf(leaf, sharding), tree)


def _replicate_leaf(leaf: Any, sharding: NamedSharding) -> Any:
    """One leaf onto a multi-process mesh (``device_put`` checks all processes agree)."""
    if isinstance(leaf, jax.Array) and jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        data = _replicate_leaf(jax.random.key_data(leaf), sharding)
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(leaf))
    if isinstance(leaf, jax.Array) and leaf.is_fully_addressable:
        leaf = np.asarray(leaf)  # a process-local array: its host value is the input
    return jax.device_put(leaf, sharding)


def pad_to_multiple(batch: Any, mask: Any, multiple: int) -> tuple[Any, np.ndarray]:
    """Pad a host batch and its mask so the row count is a multiple of ``multiple``.

    Padded rows repeat row 0 (zeros for an empty batch, which becomes ``multiple``
    masked rows so every device has one) and are masked out, so they contribute
    exactly zero to the clipped sum.

    Args:
        batch: Pytree of arrays with a common leading axis ``B``.
        mask: ``[B]`` booleans (``None``: all rows are real).
        multiple: The number of devices along the data axis, ``>= 1``.

    Returns:
        ``(batch, mask)`` as numpy arrays with ``ceil(B / multiple) * multiple`` rows
        (``multiple`` rows for ``B = 0``).
    """
    if isinstance(multiple, bool) or not isinstance(multiple, (int, np.integer)) or multiple < 1:
        raise ValueError(f"multiple must be an int >= 1, got {multiple!r}.")
    size = _leading_size(batch, "batch")
    mask = np.ones(size, bool) if mask is None else np.asarray(mask, dtype=bool)
    if mask.shape != (size,):
        raise ValueError(f"mask must have shape ({size},) (one flag per row), got {mask.shape}.")
    extra = multiple if size == 0 else -size % multiple
    if extra == 0:
        return jax.tree_util.tree_map(np.asarray, batch), mask

    def pad(leaf: Any) -> np.ndarray:
        arr = np.asarray(leaf)
        fill = arr[:1] if size else np.zeros((1,) + arr.shape[1:], arr.dtype)
        return np.concatenate([arr, np.repeat(fill, extra, axis=0)])

    return jax.tree_util.tree_map(pad, batch), np.concatenate([mask, np.zeros(extra, bool)])


def shard_batch(
    batch: Any, mask: Any, mesh: Mesh, *, axis_name: str = "data"
) -> tuple[Any, jax.Array]:
    """Pad a host batch to the data axis and place it sharded along that axis.

    Every process passes the same *global* batch; each process copies only the rows
    of its own devices. For per-process feeding use :class:`ShardedBatches`.

    Args:
        batch: Pytree of arrays with a common leading axis.
        mask: ``[B]`` booleans (``None``: all rows are real).
        mesh: The mesh.
        axis_name: The data axis of ``mesh``.

    Returns:
        ``(batch, mask)`` as global ``jax.Array`` with ``NamedSharding(mesh, P(axis_name))``.
    """
    n = _check_axis(mesh, axis_name)
    batch, mask = pad_to_multiple(batch, mask, n)
    sharding = NamedSharding(mesh, P(axis_name))
    place = lambda arr: jax.make_array_from_callback(arr.shape, sharding, lambda i: arr[i])
    return jax.tree_util.tree_map(place, batch), place(mask)


# --------------------------------------------------------------------------- the per-device body


def psum_clipped(clipped_sum: Any, aux: ClipAux, axis_name: str) -> tuple[Any, ClipAux]:
    """Reduce one device's clipping result over the data axis (call inside ``shard_map``).

    The clipped sums and the counts are added with ``jax.lax.psum``; the mean loss is
    re-weighted by the local example counts, so it is the mean over all real rows of
    the global batch. Per-example norms stay local (they are per row).

    Args:
        clipped_sum: This device's params-shaped clipped sum.
        aux: This device's :class:`~dp_jax.ClipAux`.
        axis_name: The mesh axis to reduce over.

    Returns:
        ``(global_clipped_sum, aux)`` with global counts and loss, local norms.
    """
    total = jax.lax.psum(clipped_sum, axis_name)
    count = jax.lax.psum(aux.num_examples, axis_name)
    loss = aux.loss
    if loss is not None:
        weighted = jax.lax.psum(loss * aux.num_examples.astype(loss.dtype), axis_name)
        loss = weighted / jnp.maximum(count, 1).astype(loss.dtype)
    return total, aux._replace(
        num_nonfinite=jax.lax.psum(aux.num_nonfinite, axis_name),
        num_unclipped=jax.lax.psum(aux.num_unclipped, axis_name),
        num_examples=count,
        loss=loss,
    )


def _aux_specs(axis_name: str) -> ClipAux:
    row = P(axis_name)
    return ClipAux(norms=row, num_nonfinite=P(), num_unclipped=P(), num_examples=P(),
                   loss=P(), layer_norms=row)


def _is_traced(bound: Any) -> bool:
    """Whether a clipping bound holds JAX arrays (traced under ``jit``)."""
    return any(isinstance(leaf, jax.Array) for leaf in jax.tree_util.tree_leaves(bound))


def sharded_clipped_grad(
    grad_fn: Callable[..., tuple[Any, ClipAux]], mesh: Mesh, *, axis_name: str = "data"
) -> Callable[..., tuple[Any, ClipAux]]:
    """Turn a per-device ``grad_fn`` into a global one that clips on each device and psums.

    Args:
        grad_fn: ``grad_fn(params, batch, mask, max_grad_norm=None) -> (clipped_sum,
            ClipAux)``, e.g. :func:`dp_jax.clipped_grad`'s result.
        mesh: The mesh.
        axis_name: The data axis of ``mesh``.

    Returns:
        ``fn(params, batch, mask, max_grad_norm=None) -> (clipped_sum, aux)`` (traceable;
        call it inside ``jax.jit``). ``params`` are replicated, ``batch`` and ``mask``
        sharded along ``axis_name`` (their row count a multiple of the axis size). The
        result's clipped sum, counts and loss are global and replicated; ``aux.norms``
        (and ``layer_norms``) are the ``[B]`` global per-row norms, sharded by rows.
    """
    n = _check_axis(mesh, axis_name)
    if not callable(grad_fn):
        raise TypeError(f"grad_fn must be callable, got {type(grad_fn).__name__}.")

    # check_vma=False in both shard_maps below: with JAX's replication typing on, every
    # device-invariant value that meets a per-device one inside grad_fn (the replicated
    # parameters, or the zero probes of ghost clipping) is cast to varying, and autodiff
    # transposes that cast into a psum -- the gradient of each example would be added to
    # the examples in the same row of the other devices. Each device's gradients must stay
    # its own; the only reduction is the explicit psum_clipped after clipping.
    def body(params: Any, batch: Any, mask: jax.Array, bound: Any):
        kwargs = {} if bound is None else {"max_grad_norm": bound}
        clipped_sum, aux = grad_fn(params, batch, mask, **kwargs)
        return psum_clipped(clipped_sum, aux, axis_name)

    def fn(params: Any, batch: Any, mask: Any, max_grad_norm: Any = None):
        size = _leading_size(batch, "batch")
        _check_multiple(size, n, "batch")
        mask = jnp.ones((size,), bool) if mask is None else jnp.asarray(mask, dtype=bool)
        if mask.shape != (size,):
            raise ValueError(f"mask must have shape ({size},), got {mask.shape}.")
        if _is_traced(max_grad_norm):  # an injected or adaptive bound: an input
            mapped = jax.shard_map(
                body, mesh=mesh, in_specs=(P(), P(axis_name), P(axis_name), P()),
                out_specs=(P(), _aux_specs(axis_name)), check_vma=False,
            )
            return mapped(params, batch, mask, max_grad_norm)
        # A static bound (a float, or per-layer bounds as a list) stays a Python value.
        mapped = jax.shard_map(
            lambda p, b, m: body(p, b, m, max_grad_norm), mesh=mesh,
            in_specs=(P(), P(axis_name), P(axis_name)), out_specs=(P(), _aux_specs(axis_name)),
            check_vma=False,
        )
        return mapped(params, batch, mask)

    return fn


# --------------------------------------------------------------------------- the step


def _check_tx(tx: Any) -> None:
    if not (callable(getattr(tx, "init", None)) and callable(getattr(tx, "update", None))):
        raise TypeError(
            f"tx must be an optax GradientTransformation taking the clipped SUM, got "
            f"{type(tx).__name__}; e.g. optax.chain(optax.scale(1 / m), "
            "dp_jax.add_gaussian_noise(sigma, C, m, key), optax.sgd(lr))."
        )


def make_sharded_step(
    grad_fn: Callable[..., tuple[Any, ClipAux]],
    tx: optax.GradientTransformation,
    mesh: Mesh,
    *,
    axis_name: str = "data",
    bound_of: Optional[Callable[[Any], Any]] = None,
) -> Callable[..., tuple[Any, dict[str, jax.Array]]]:
    """Build the jitted data-parallel DP step.

    ``step(state, batch, mask, apply_update, noise=None) -> (state, metrics)``:

    1. on each device, ``grad_fn(params, local_batch, local_mask, max_grad_norm=...)``
       clips the device's rows and sums them (padded rows contribute zero);
    2. :func:`psum_clipped` adds the sums and the counts over ``axis_name``;
    3. ``tx.update(global_clipped_sum, opt_state, params, clip_aux=aux,
       apply_update=apply_update[, noise=noise])`` (the keyword arguments only when
       ``tx`` is an ``optax.GradientTransformationExtraArgs``, as ``optax.chain``
       results are) adds the noise once, from the replicated key, and averages;
    4. the update is applied; the new state and the metrics are replicated.

    ``state`` is any NamedTuple with fields ``params``, ``opt_state`` and ``step``
    (e.g. :class:`dp_jax.TrainState`), placed with :func:`replicate` (``jax.jit``
    refuses a state committed to a single device); ``step`` is incremented by
    ``apply_update``. An extra-args ``tx`` must accept the keywords ``clip_aux`` and
    ``apply_update`` (``**extra`` will do; ``optax.chain`` passes them on). A ``tx``
    that takes no extra arguments is applied at every call whatever ``apply_update``
    says: each call is then one whole logical batch (a chunk of a virtual batch
    would get its own noise).

    Args:
        grad_fn: ``grad_fn(params, batch, mask, max_grad_norm=None) -> (clipped_sum,
            ClipAux)``, e.g. ``dp_jax.clipped_grad(loss_fn, C)``.
        tx: The optax transformation taking the clipped SUM and adding the noise.
        mesh: The device mesh (:func:`data_mesh`).
        axis_name: The data axis of ``mesh``.
        bound_of: ``bound_of(opt_state) -> max_grad_norm`` for a bound that lives in
            the optimizer state (injected or adaptive); ``None`` uses ``grad_fn``'s.

    Returns:
        The jitted ``step``. ``batch`` and ``mask`` must have a row count that is a
        multiple of the data axis size (:func:`shard_batch` / :class:`ShardedBatches`
        pad); ``metrics`` is ``{"loss": mean loss over the real rows, "applied": bool}``.

    Raises:
        TypeError: If ``grad_fn``/``bound_of`` is not callable, ``tx`` is not a
            transformation or ``mesh`` not a ``Mesh``.
        ValueError: If ``axis_name`` is not an axis of ``mesh``.
    """
    _check_tx(tx)
    if bound_of is not None and not callable(bound_of):
        raise TypeError(f"bound_of must be callable or None, got {type(bound_of).__name__}.")
    clip = sharded_clipped_grad(grad_fn, mesh, axis_name=axis_name)
    replicated = NamedSharding(mesh, P())
    step = make_step_fn(clip, tx, bound_of)
    return jax.jit(step, out_shardings=replicated)


# --------------------------------------------------------------------------- batches


class ShardedBatches:
    """Poisson (or shuffled) batches as global arrays sharded along the mesh's data axis.

    Wraps a :class:`dp_jax.PoissonBatches` (or :class:`dp_jax.ShuffledBatches`): each
    logical batch is the same Poisson batch of the whole data set that the wrapped
    iterator would give, padded to its buckets, each chunk rounded up to a multiple
    of the data axis size (extra rows masked out), and every chunk is a global
    ``jax.Array`` with ``NamedSharding(mesh, P(axis_name))``. Each process gathers
    only the rows placed on its own devices. With several processes the indices are
    drawn by process 0 and broadcast (two small collectives per logical batch), so
    the processes agree even in secure mode; the other processes' samplers are
    advanced but their draws unused.

    Args:
        batches: The wrapped batches; their ``sampler`` draws the global indices,
            their ``gather`` reads examples, their ``buckets`` give the shapes.
        mesh: The mesh.
        axis_name: The data axis of ``mesh``.

    Attributes:
        batches: The wrapped iterator (its ``state_dict`` is the position).
        mesh: The mesh.
        axis_name: The data axis.
    """

    def __init__(self, batches: Any, mesh: Mesh, *, axis_name: str = "data") -> None:
        self._size = _check_axis(mesh, axis_name)
        for name in ("sampler", "gather", "buckets"):
            if not hasattr(batches, name):
                raise TypeError(
                    f"batches must be a dp_jax.PoissonBatches (or ShuffledBatches), got "
                    f"{type(batches).__name__} without {name!r}."
                )
        if batches.num_samples > _INT32_MAX:
            raise ValueError(
                f"ShardedBatches supports at most {_INT32_MAX} examples, got {batches.num_samples}."
            )
        self.batches = batches
        self.mesh = mesh
        self.axis_name = axis_name
        self._sharding = NamedSharding(mesh, P(axis_name))

    def __len__(self) -> int:
        return len(self.batches)

    def state_dict(self) -> dict[str, Any]:
        """The wrapped iterator's position (see :meth:`dp_jax.PoissonBatches.state_dict`)."""
        return self.batches.state_dict()

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Resume the wrapped iterator (see :meth:`dp_jax.PoissonBatches.load_state_dict`)."""
        self.batches.load_state_dict(state_dict)

    def __iter__(self) -> Iterator[list[PhysicalChunk]]:
        for indices in self.batches.sampler:
            yield self.chunks(self._agree(np.asarray(indices, dtype=np.int64)))

    def chunks(self, indices: np.ndarray) -> list[PhysicalChunk]:
        """Pad one logical batch's global indices and place each chunk sharded.

        Args:
            indices: The global example indices of one logical batch (the same on
                every process).

        Returns:
            The chunks; ``batch`` and ``mask`` are global sharded ``jax.Array``.
        """
        out = []
        for padded, mask in core_sampling.pad_to_buckets(indices, self.batches.buckets):
            extra = -padded.size % self._size
            padded = np.concatenate([padded, np.zeros(extra, np.int64)])
            mask = np.concatenate([mask, np.zeros(extra, bool)])
            out.append(PhysicalChunk(self._place_rows(padded), self._place(mask)))
        return out

    def _place(self, array: np.ndarray) -> jax.Array:
        return jax.make_array_from_callback(array.shape, self._sharding, lambda i: array[i])

    def _place_rows(self, padded: np.ndarray) -> Any:
        """Gather only this process's rows of ``padded`` and build global arrays."""
        index_map = self._sharding.addressable_devices_indices_map((padded.size,))
        spans = sorted({(s[0].indices(padded.size)[:2]) for s in index_map.values()})
        rows = np.concatenate([np.arange(a, b) for a, b in spans])
        offset = dict(zip(spans, np.cumsum([0] + [b - a for a, b in spans[:-1]])))
        local = self.batches.gather(padded[rows])

        def place(leaf: Any) -> jax.Array:
            arr = np.asarray(leaf)
            shape = (padded.size,) + arr.shape[1:]

            def block(index: tuple[slice, ...]) -> np.ndarray:
                a, b = index[0].indices(padded.size)[:2]
                start = offset[(a, b)]
                return arr[(slice(start, start + b - a),) + tuple(index[1:])]

            return jax.make_array_from_callback(shape, self._sharding, block)

        return jax.tree_util.tree_map(place, local)

    def _agree(self, indices: np.ndarray) -> np.ndarray:
        """Process 0's indices on every process (identity with one process)."""
        if jax.process_count() == 1:
            return indices
        count = int(multihost_utils.broadcast_one_to_all(np.array([indices.size], np.int32))[0])
        buf = np.zeros(_broadcast_length(count, self.batches.buckets), np.int32)
        if jax.process_index() == 0:
            buf[:count] = indices
        agreed = multihost_utils.broadcast_one_to_all(buf)
        return np.asarray(agreed, dtype=np.int64)[:count]


def _broadcast_length(count: int, buckets: Sequence[int]) -> int:
    """A buffer length from a small set (one compile each) that holds ``count`` indices.

    The smallest bucket that holds them, or a multiple of the largest bucket for an
    oversized batch; plus one so that an empty batch still has a non-empty buffer.
    """
    largest = buckets[-1]
    if count > largest:
        return 1 + -(-count // largest) * largest
    return 1 + next(b for b in buckets if b >= count)
