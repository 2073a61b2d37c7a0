"""DP-SGD as optax gradient transformations.

Every transformation is an ``(init, update)`` pair whose NamedTuple state carries
the PRNG key; nothing draws randomness on the host, so everything runs under
``jax.jit``. Two families:

* per-example transformations (:func:`clip_and_aggregate`, :func:`dp_aggregate`,
  :func:`dp_accumulate`, :func:`dp_aggregate_adaptive`, :func:`dp_sgd`, ...) take
  per-example gradients (leaves with a leading batch axis) and clip them inside;
* clipped-sum transformations (:func:`dp_accumulate_clipped_sums`,
  :func:`dp_accumulate_clipped_sums_adaptive`) take the clipped sum of one
  physical chunk and its :class:`~dp_jax.ClipAux`, from any gradient function
  with the contract of :func:`dp_jax.clipped_grad`; the caller clips with the
  bound the transformation adds noise for (see :func:`current_hyperparams`).

Every transformation accepts ``key=None`` (key-free mode): it then never draws
noise itself and each noising ``update`` needs ``noise=`` (and ``count_noise=``
for adaptive clipping), drawn on the host in JAX leaf order, e.g. by
``dpcore.noise.NoiseSource``; this is how secure mode and the conformance suite
feed noise. Given noise is cast to each leaf's dtype, added to the clipped sum,
and the result divided by the averaging denominator: ``(clipped_sum + noise) / m``.

Guarantee:
    For a Poisson-sampled batch, one ``update`` of :func:`dp_aggregate` releases
    ``(sum_i clip(g_i) + N(0, (sigma C)^2 I)) / m``, the sampled Gaussian
    mechanism with noise multiplier ``sigma`` on a query of L2 sensitivity ``C``
    (``sqrt(sum C_i^2)`` for per-layer clipping), post-processed by the public
    division by ``m = expected_batch_size``. The privacy cost of a run is what
    the ``dpcore`` accountant reports for ``(sigma, q, steps)``, provided the PRNG
    key is secret and never reused. JAX's PRNG is not a cryptographic sampler:
    for secure mode build with ``key=None`` and pass noise from
    ``dpcore.noise.NoiseSource(secure_mode=True)``.
"""

from dp_jax._transforms._accumulate import DPAccumulateState
from dp_jax._transforms._accumulate import DPMultiStepsState
from dp_jax._transforms._accumulate import dp_accumulate
from dp_jax._transforms._accumulate import dp_accumulate_clipped_sums
from dp_jax._transforms._accumulate import dp_accumulate_sums
from dp_jax._transforms._accumulate import dp_multi_steps
from dp_jax._transforms._adaptive import AdaptiveClipState
from dp_jax._transforms._adaptive import DPAccumulateAdaptiveState
from dp_jax._transforms._adaptive import adaptive_clip_update
from dp_jax._transforms._adaptive import dp_accumulate_clipped_sums_adaptive
from dp_jax._transforms._adaptive import dp_accumulate_sums_adaptive
from dp_jax._transforms._adaptive import dp_aggregate_adaptive
from dp_jax._transforms._aggregate import ClipAggregateState
from dp_jax._transforms._aggregate import DPAggregateState
from dp_jax._transforms._aggregate import clip_and_aggregate
from dp_jax._transforms._aggregate import dp_adam
from dp_jax._transforms._aggregate import dp_aggregate
from dp_jax._transforms._aggregate import dp_sgd
from dp_jax._transforms._hyperparams import current_hyperparams
from dp_jax._transforms._noise import NoiseState
from dp_jax._transforms._noise import add_gaussian_noise
from dp_jax._transforms._noise import noise_from_normals
