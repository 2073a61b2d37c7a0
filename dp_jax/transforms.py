"""DP-SGD as optax gradient transformations: clip, accumulate, noise, adapt the bound.

Per-example transformations (:func:`dp_aggregate`, :func:`dp_accumulate`,
:func:`dp_aggregate_adaptive`, :func:`dp_sgd`, :func:`dp_adam`, ...) take
per-example gradients; clipped-sum transformations
(:func:`dp_accumulate_clipped_sums`, :func:`dp_accumulate_clipped_sums_adaptive`)
take the clipped sum of one physical chunk from a gradient function such as
:func:`dp_jax.clipped_grad`; :func:`dp_multi_steps` gates the optimizer after an
accumulator. ``dp_accumulate_sums`` and ``dp_accumulate_sums_adaptive`` are the
former names of the clipped-sum transformations, kept as aliases.

Guarantee:
    For a Poisson-sampled batch, one ``update`` of :func:`dp_aggregate` releases
    ``(sum_i clip(g_i) + N(0, (sigma C)^2 I)) / m``, the sampled Gaussian
    mechanism with noise multiplier ``sigma`` on a query of L2 sensitivity ``C``,
    post-processed by the public division by ``m = expected_batch_size``,
    provided the PRNG key is secret and never reused.
"""

from dp_jax._transforms import AdaptiveClipState
from dp_jax._transforms import ClipAggregateState
from dp_jax._transforms import DPAccumulateAdaptiveState
from dp_jax._transforms import DPAccumulateState
from dp_jax._transforms import DPAggregateState
from dp_jax._transforms import DPMultiStepsState
from dp_jax._transforms import NoiseState
from dp_jax._transforms import adaptive_clip_update
from dp_jax._transforms import add_gaussian_noise
from dp_jax._transforms import clip_and_aggregate
from dp_jax._transforms import current_hyperparams
from dp_jax._transforms import dp_accumulate
from dp_jax._transforms import dp_accumulate_clipped_sums
from dp_jax._transforms import dp_accumulate_clipped_sums_adaptive
from dp_jax._transforms import dp_accumulate_sums
from dp_jax._transforms import dp_accumulate_sums_adaptive
from dp_jax._transforms import dp_adam
from dp_jax._transforms import dp_aggregate
from dp_jax._transforms import dp_aggregate_adaptive
from dp_jax._transforms import dp_multi_steps
from dp_jax._transforms import dp_sgd
from dp_jax._transforms import noise_from_normals

__all__ = [
    "AdaptiveClipState",
    "ClipAggregateState",
    "DPAccumulateAdaptiveState",
    "DPAccumulateState",
    "DPAggregateState",
    "DPMultiStepsState",
    "NoiseState",
    "adaptive_clip_update",
    "add_gaussian_noise",
    "clip_and_aggregate",
    "current_hyperparams",
    "dp_accumulate",
    "dp_accumulate_clipped_sums",
    "dp_accumulate_clipped_sums_adaptive",
    "dp_accumulate_sums",
    "dp_accumulate_sums_adaptive",
    "dp_adam",
    "dp_aggregate",
    "dp_aggregate_adaptive",
    "dp_multi_steps",
    "dp_sgd",
    "noise_from_normals",
]
