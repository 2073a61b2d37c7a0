"""Utilities of the PyTorch backend (mirrors ``opacus.utils``).

Submodules: ``batch_memory_manager``, ``fast_gradient_clipping_utils``, ``module_utils``,
``packed_sequences``, ``per_sample_gradients_utils``, ``tensor_utils`` and
``uniform_sampler``.
"""
