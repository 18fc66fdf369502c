"""Lightning: ``Trainer(gradient_clip_val=..., gradient_clip_algorithm="norm" | "value")`` with our kernels.

    from gradclip_cuda.integrations.lightning import GradClipCallback
    trainer = lightning.Trainer(gradient_clip_val=1.0, callbacks=[GradClipCallback()])

Lightning clips in ``Precision.clip_grad_by_norm`` / ``clip_grad_by_value``, which call
``torch.nn.utils.clip_grad_norm_`` / ``clip_grad_value_`` looked up at call time. The callback enters
``gradclip_cuda.patch_torch()`` when fitting starts and undoes it when fitting ends or fails, so every precision
plugin that clips through those functions (32-bit, 16-mixed after unscaling, bf16, ...) uses ours, and a
``configure_gradient_clipping`` override that calls ``self.clip_gradients`` too. A Precision subclass would have
to replace the plugin the ``precision=`` flag picks. Strategies that clip themselves (DeepSpeed, FSDP) are
unaffected. The patch is process-wide while fitting: other code in the process that calls torch's functions in
that time gets ours too.

Works with ``lightning`` (``import lightning``) and with the older ``pytorch_lightning`` package; importing this
module imports Lightning (``gradclip_cuda`` and ``gradclip_cuda.integrations`` do not).
"""
from __future__ import annotations

from ..api import patch_torch

# lightning's Callback when `lightning` is installed, else pytorch_lightning's (for pytorch_lightning.Trainer alone).
try:
    from lightning.pytorch.callbacks import Callback
except ImportError:
    try:
        from pytorch_lightning.callbacks import Callback
    except ImportError:
        raise ImportError("gradclip_cuda.integrations.lightning needs lightning (pip install lightning) or "
                          "pytorch_lightning") from None


class GradClipCallback(Callback):
    """Makes Lightning's gradient clipping (``gradient_clip_val``, both algorithms) use gradclip_cuda while
    ``trainer.fit`` runs."""

    def __init__(self):
        self._patch = None

    def _enter(self):
        self._exit()
        self._patch = patch_torch()

    def _exit(self):
        if self._patch is not None:
            self._patch.undo()
            self._patch = None

    def on_fit_start(self, trainer, pl_module):
        self._enter()

    def on_fit_end(self, trainer, pl_module):
        self._exit()

    def on_exception(self, trainer, pl_module, exception):
        self._exit()

    def __getstate__(self):  # a callback pickled for spawned workers: each worker patches its own process
        state = dict(self.__dict__)
        state["_patch"] = None
        return state


__all__ = ["GradClipCallback"]
