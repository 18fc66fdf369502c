"""gradclip_cuda: fused, sync-free gradient clipping for PyTorch.

    import gradclip_cuda as gc
    total = gc.clip_grad_norm_(model.parameters(), max_norm=1.0)   # same call as torch.nn.utils.clip_grad_norm_
    clipper = gc.GradClipper("zclip")                               # stateful policies (gradclip_cuda/policies.py)

See README.md. The ops live in gradclip_cuda._ops (torch.ops.gradclip_cuda.*).
"""
import torch as _torch

from . import _ops
from ._ops import ops
from .api import (BACKENDS, adaptive_clip_grad_, available_backends, clip_grad_norm_, clip_grad_norm_per_tensor_,
                  clip_grad_value_, clip_grads_with_norm_, get_total_norm, patch_torch)
from .policies import POLICIES, ClipStats, GradClipper

__version__ = "0.1.0"


def _built_with():
    try:
        from . import _build_config as c  # written by setup.py
    except ImportError:
        return None, "not built here"
    return c.CUDA_ARCHS, c.WHY_NO_CUDA


def build_info() -> dict:
    """Which backends are usable, and what the compiled library (if any) was built against: its torch and CUDA
    versions, the GPU architectures its CUDA kernels were compiled for (``cuda_archs``, None without them), and why
    the CUDA kernels were left out of the build (``why_no_cuda``), if they were."""
    built = _ops.BUILD or {}
    archs, why_no_cuda = _built_with()
    return {
        "version": __version__,
        "torch": _torch.__version__,
        "compiled": _ops.C is not None,
        "built_for_torch": built.get("torch"),
        "built_for_cuda": built.get("cuda"),
        "cuda_archs": archs if built.get("cuda") else None,
        "why_no_cuda": None if built.get("cuda") else why_no_cuda,
        "why_not_compiled": _ops.WHY_NOT_COMPILED,
        "backends": available_backends(),
    }


__all__ = ["clip_grad_norm_", "clip_grad_value_", "get_total_norm", "clip_grads_with_norm_", "patch_torch",
           "available_backends", "build_info", "BACKENDS", "ops", "clip_grad_norm_per_tensor_", "adaptive_clip_grad_",
           "ClipStats", "GradClipper", "POLICIES"]
