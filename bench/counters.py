"""What one call puts on the GPU and how often it makes the host wait: kernel launches (torch.profiler) and host
syncs (torch.cuda.set_sync_debug_mode). Used by the harness and the GPU tests."""
from __future__ import annotations

import warnings

import torch


def device_ops(fn) -> list[str]:
    """Names of the kernels, copies and memsets one call of fn runs on the GPU. The profiler records CPU and CUDA
    activities (CUDA alone misses device events on some torch versions, which correlate them with the CPU side);
    only the events on the device are returned."""
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


def is_kernel(name: str) -> bool:
    """Whether a device_ops name is a kernel launch (not a memset or a copy)."""
    return not name.startswith(("Memset", "Memcpy", "memset", "memcpy"))


def host_syncs(fn) -> int:
    """Host-device synchronisations in one call of fn, as torch's sync debug mode reports them."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return sum("synchroniz" in str(w.message) for w in caught)
