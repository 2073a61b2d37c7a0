"""Integrations of dp_torch with other training libraries.

Each integration is a submodule that imports its library only when it is itself
imported, so importing this package costs nothing:

- :mod:`dp_torch.integrations.transformers`: DP-SGD in the Hugging Face ``Trainer``
  (:class:`~dp_torch.integrations.transformers.DPTrainer`).
- :mod:`dp_torch.integrations.accelerate`: a model, optimizer and data loader made
  private by :class:`~dp_torch.PrivacyEngine`, then prepared by ``accelerate.Accelerator``.
"""

__all__: list[str] = []
