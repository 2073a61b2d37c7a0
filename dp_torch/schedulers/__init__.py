"""Epoch schedulers for the noise multiplier and the clipping bound.

Mirrors ``opacus.schedulers``: ``*Noise`` schedulers change ``noise_multiplier``,
``*GradClip`` schedulers change ``max_grad_norm``, once per ``step()``.
"""

from __future__ import annotations

from dp_torch.schedulers.grad_clip_scheduler import (
    ExponentialGradClip,
    LambdaGradClip,
    StepGradClip,
    _GradClipScheduler,
)
from dp_torch.schedulers.noise_scheduler import (
    ExponentialNoise,
    LambdaNoise,
    StepNoise,
    _NoiseScheduler,
)

__all__ = [
    "ExponentialGradClip",
    "ExponentialNoise",
    "LambdaGradClip",
    "LambdaNoise",
    "StepGradClip",
    "StepNoise",
    "_GradClipScheduler",
    "_NoiseScheduler",
]
