"""Integrations with training frameworks. Each submodule imports its framework only when it is used, so
``gradclip_cuda`` and this package import without any of them installed.

- ``gradclip_cuda.integrations.lightning.GradClipCallback``: Lightning's
  ``Trainer(gradient_clip_val=..., gradient_clip_algorithm="norm" | "value")`` clips with our kernels.
- Hugging Face ``transformers.Trainer`` and ``accelerate.Accelerator`` need no module: they look up
  ``torch.nn.utils.clip_grad_norm_`` (and ``clip_grad_value_``) when they clip, so
  ``with gradclip_cuda.patch_torch(): trainer.train()`` is enough (docs/integrations.md).
"""

__all__ = ["GradClipCallback"]


def __getattr__(name):
    if name == "GradClipCallback":
        from .lightning import GradClipCallback
        return GradClipCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
