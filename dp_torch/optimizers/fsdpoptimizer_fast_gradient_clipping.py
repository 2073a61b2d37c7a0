"""``FSDPOptimizerFastGradientClipping``: ghost clipping for FSDP2-sharded models (Opacus' name).

The ghost FSDP module (:mod:`dp_torch.grad_sample.grad_sample_module_fast_gradient_clipping_fsdp`)
leaves in every rank's sharded ``p.grad`` its shard of the clipped sum over *all* ranks'
examples. This optimizer accumulates it (``BatchMemoryManager`` chunks included), adds
the noise to each shard once per logical step, divides by the global expected batch
size for ``"mean"`` and steps the wrapped optimizer on the shards. No collective runs in
the step itself.

Where the noise comes from:

* not secure (``torch.Generator``, ``dpcore.noise.NoiseSource`` or ``None``): every rank
  holds the *same* generator, draws the noise of the whole parameter and keeps its own
  shard of it. The ranks' shards together are then exactly the noise an unsharded run
  with that generator adds (same draws, same order). Without a generator, rank 0 draws a
  seed from OS entropy and broadcasts it; with one, every rank must pass a generator in
  the same state (checked at construction).
* ``secure_mode=True``: each rank draws the noise of its own shard from OS entropy
  (dpcore's hardened sampler; a seed cannot be shared without making the noise
  predictable). Each coordinate of the global parameter receives independent
  ``N(0, (sigma * C)**2)`` noise exactly once, so the mechanism is the same Gaussian
  mechanism in distribution, though not draw for draw.
"""

from __future__ import annotations

import hashlib
import secrets
from typing import Any

import torch
import torch.distributed as dist

from dp_torch.distributed import require_process_group
from dp_torch.optimizers.optimizer import NoiseGenerator, _generate_noise
from dp_torch.optimizers.optimizer_fast_gradient_clipping import DPOptimizerFastGradientClipping

__all__ = ["FSDPOptimizerFastGradientClipping"]


def _fingerprint(generator: NoiseGenerator) -> str:
    """A digest of a generator's state (equal on ranks whose generators will draw alike)."""
    if isinstance(generator, torch.Generator):
        return hashlib.sha256(generator.get_state().numpy().tobytes()).hexdigest()
    return hashlib.sha256(repr(sorted(generator.state_dict().items())).encode()).hexdigest()


def _shared_generator(generator: NoiseGenerator, device: torch.device) -> NoiseGenerator:
    """The generator every rank draws the same noise from (collective: call on every rank).

    Raises:
        ValueError: If the ranks' generators are in different states.
    """
    if generator is None:
        seed = [secrets.randbits(63) if dist.get_rank() == 0 else None]
        dist.broadcast_object_list(seed, src=0)
        shared = torch.Generator(device=device)
        shared.manual_seed(int(seed[0]))
        return shared
    prints: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(prints, _fingerprint(generator))
    if len(set(prints)) > 1:
        raise ValueError(
            f"noise_generator is in different states on the ranks ({len(set(prints))} distinct "
            "states): under FSDP every rank draws the noise of the whole parameter and keeps its "
            "shard, so every rank must pass a generator seeded alike (e.g. "
            "torch.Generator().manual_seed(seed) with the same seed), or noise_generator=None."
        )
    return generator


class FSDPOptimizerFastGradientClipping(DPOptimizerFastGradientClipping):
    """:class:`~dp_torch.optimizers.DPOptimizerFastGradientClipping` for FSDP2 (``"ghost_fsdp"``).

    Arguments are those of :class:`~dp_torch.optimizers.DPOptimizer`, with the **global**
    ``expected_batch_size`` ``int(N * q)`` (the sum over ranks); construction is a
    collective (call it on every rank, as ``make_private`` does) and raises ``ValueError``
    if the ranks' generators differ. See the module docstring for the noise.

    Attributes:
        rank: This process's rank.
        world_size: Number of ranks.
    """

    def _finish_setup(self) -> None:
        """Agree with the other ranks on the noise generator (a collective; see the module
        docstring). Raises ``ValueError`` if the ranks' generators differ."""
        if not self.secure_mode:
            device = self.params[0].device if self.params else torch.device("cpu")
            self.generator = _shared_generator(self.generator, device)

    def _check_environment(self) -> None:
        """Refuse to start without a process group; record :attr:`rank` and :attr:`world_size`."""
        require_process_group(type(self).__name__)
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()

    def agree_on_chunks(self, count: int) -> int:
        """The largest physical-chunk count over the ranks (``BatchMemoryManager`` under FSDP:
        FSDP communicates in every forward and backward, so all ranks take the same number)."""
        device = self.params[0].to_local().device if self.params else torch.device("cpu")
        agreed = torch.tensor([count], dtype=torch.int64, device=device)
        dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
        return int(agreed.item())

    def _noise_like(self, summed: torch.Tensor, std: float) -> torch.Tensor:
        """This rank's shard of the parameter's noise, as a tensor placed like ``summed``."""
        from torch.distributed.tensor import DTensor, distribute_tensor

        if not isinstance(summed, DTensor):
            raise TypeError(
                f"FSDPOptimizerFastGradientClipping got a gradient of type {type(summed).__name__}; "
                "every trainable parameter must be sharded by fully_shard (a DTensor)."
            )
        if self.secure_mode:
            local = _generate_noise(std, summed.to_local(), None, True)
            return DTensor.from_local(local, summed.device_mesh, summed.placements,
                                      shape=summed.shape, stride=summed.stride())
        # the whole parameter's shape, dtype and device, without allocating it
        like = torch.zeros((), dtype=summed.dtype, device=summed.to_local().device).expand(summed.shape)
        noise = _generate_noise(std, like, self.generator, False)
        return distribute_tensor(noise, summed.device_mesh, summed.placements, src_data_rank=None)
