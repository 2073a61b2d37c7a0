"""Per-sample gradients and per-sample gradient norms (mirrors ``opacus.grad_sample``).

Public names:

* :class:`GradSampleModule` / :class:`GradSampleHooks`: ``p.grad_sample`` after backward;
* :class:`GradSampleModuleFastGradientClipping` / :class:`GradSampleHooksFastGradientClipping`:
  per-example gradient norms (ghost clipping);
* :class:`GradSampleModuleFastGradientClippingFSDP` / :class:`GradSampleHooksFastGradientClippingFSDP`:
  ghost clipping of an FSDP2 (``fully_shard``) model (``grad_sample_mode="ghost_fsdp"``);
* :class:`GradSampleModuleExpandedWeights`: the wrapper of ``grad_sample_mode="ew"``;
* :class:`GradSampleModuleNoOp` / :class:`GradSampleHooksNoOp`: ``grad_sample_mode="no_op"``
  (you set ``p.grad_sample`` yourself);
* :func:`register_grad_sampler`, :func:`register_norm_sampler`,
  :func:`register_batch_grad_sampler`: add layer support;
* :func:`wrap_model` / :func:`prepare_module`, :func:`get_gsm_class`: pick by mode.

Layers with a registered grad sampler, norm sampler (ghost clipping) and batch-gradient
sampler: ``nn.Linear`` (and subclasses), ``nn.Conv1d/2d/3d``, ``nn.Embedding``,
``nn.EmbeddingBag``, ``nn.LayerNorm``, ``nn.GroupNorm``, ``nn.InstanceNorm1d/2d/3d``,
``nn.RMSNorm``, and transformers' GPT-2 ``Conv1D`` (registered once transformers is imported;
dp_torch does not import it). Any other layer with trainable parameters uses the
``torch.func`` fallback.
"""

from . import conv as _conv  # noqa: F401  (registers samplers)
from . import embedding as _embedding  # noqa: F401
from . import group_norm as _group_norm  # noqa: F401
from . import instance_norm as _instance_norm  # noqa: F401
from . import layer_norm as _layer_norm  # noqa: F401
from . import linear as _linear  # noqa: F401
from . import rms_norm as _rms_norm  # noqa: F401
from . import transformers_conv1d as _transformers_conv1d  # noqa: F401
from .conv import compute_conv_grad_sample
from .embedding import (
    compute_embedding_grad_sample,
    compute_embedding_norm_sample,
    compute_embeddingbag_gradsampler,
)
from .functorch import ft_compute_per_sample_gradient
from .grad_sample_module import (
    GradSampleHooks,
    GradSampleModule,
    create_or_accumulate_grad_sample,
    promote_current_grad_sample,
)
from .grad_sample_module_fast_gradient_clipping import (
    GradSampleHooksFastGradientClipping,
    GradSampleModuleFastGradientClipping,
)
from .grad_sample_module_fast_gradient_clipping_fsdp import (
    GradSampleHooksFastGradientClippingFSDP,
    GradSampleModuleFastGradientClippingFSDP,
)
from .group_norm import compute_group_norm_grad_sample
from .gsm_base import AbstractGradSampleHooks, AbstractGradSampleModule
from .gsm_exp_weights import GradSampleModuleExpandedWeights
from .gsm_no_op import GradSampleHooksNoOp, GradSampleModuleNoOp
from .instance_norm import compute_instance_norm_grad_sample
from .layer_norm import compute_layer_norm_grad_sample
from .linear import compute_linear_grad_sample, compute_linear_norm_sample
from .rms_norm import compute_rms_norm_grad_sample
from .utils import (
    get_gsm_class,
    get_hooks_class,
    prepare_module,
    register_batch_grad_sampler,
    register_grad_sampler,
    register_norm_sampler,
    wrap_model,
)

__all__ = [
    "AbstractGradSampleHooks",
    "AbstractGradSampleModule",
    "GradSampleHooks",
    "GradSampleHooksFastGradientClipping",
    "GradSampleHooksFastGradientClippingFSDP",
    "GradSampleHooksNoOp",
    "GradSampleModule",
    "GradSampleModuleExpandedWeights",
    "GradSampleModuleFastGradientClipping",
    "GradSampleModuleFastGradientClippingFSDP",
    "GradSampleModuleNoOp",
    "compute_conv_grad_sample",
    "compute_embedding_grad_sample",
    "compute_embedding_norm_sample",
    "compute_embeddingbag_gradsampler",
    "compute_group_norm_grad_sample",
    "compute_instance_norm_grad_sample",
    "compute_layer_norm_grad_sample",
    "compute_linear_grad_sample",
    "compute_linear_norm_sample",
    "compute_rms_norm_grad_sample",
    "create_or_accumulate_grad_sample",
    "ft_compute_per_sample_gradient",
    "get_gsm_class",
    "get_hooks_class",
    "prepare_module",
    "promote_current_grad_sample",
    "register_batch_grad_sampler",
    "register_grad_sampler",
    "register_norm_sampler",
    "wrap_model",
]
