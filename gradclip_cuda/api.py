"""Drop-in replacements for torch.nn.utils.clip_grad_norm_, clip_grad_value_, get_total_norm and
clip_grads_with_norm_: same signatures, defaults, return values, errors and warnings, plus a keyword-only
``backend``. Arguments torch silently mishandles (a NaN or negative ``max_norm``, a NaN or non-numeric
``norm_type``, a NaN or negative ``clip_value``) raise ``ValueError`` before any gradient is touched.

Each function validates its arguments, collects the gradients, groups them by device, picks an implementation
per device, and calls one op per device (gradclip_cuda/_ops.py). With the compiled library, when every gradient is
on one CPU or CUDA device, the whole call, `.grad` reading included, runs in C++ (``_C.fast``): no Python loop
over tensors.

DTensor gradients, and the keyword-only ``process_group`` and ``pp_group``, go to gradclip_cuda/distributed.py: local
shards through the same ops, one all-reduce per distinct process group.

``foreach`` is accepted for compatibility: ``foreach=True`` on a device without torch's foreach support raises
torch's error; otherwise our kernels are fused whatever its value.
"""
from __future__ import annotations

import functools
import math
import os
import types
import warnings
from collections import namedtuple

import torch
from torch.utils._foreach_utils import _device_has_foreach_support

from . import _ops
from . import distributed as _dist
from ._ops import ops

__all__ = ["clip_grad_norm_", "clip_grad_value_", "get_total_norm", "clip_grads_with_norm_", "patch_torch",
           "available_backends", "BACKENDS", "clip_grad_norm_per_tensor_", "adaptive_clip_grad_"]

BACKENDS = ("auto", "cpu", "cuda", "triton", "torch")
"""auto: per device, the compiled kernels where the library has them (CPU; CUDA when built with CUDA), else the
Triton kernels on a CUDA device when Triton imports, else the pure-PyTorch kernels (README: "Backends").
cpu: the compiled CPU kernels (CPU tensors only). cuda: the compiled CUDA kernels (CUDA tensors only).
triton: the Triton kernels (gradclip_cuda/triton; CUDA tensors, or CPU tensors under TRITON_INTERPRET=1).
torch: the pure-PyTorch kernels, on any device."""

_Impl = namedtuple("_Impl", "norm scale clip value mul agc")
_OPS = _Impl(ops.multi_tensor_norm, ops.multi_tensor_scale_, ops.clip_grad_norm_, ops.clip_grad_value_,
             ops.multi_tensor_mul_, ops.adaptive_clip_grad_)
_TORCH = _Impl(_ops.norm_torch, _ops.scale_torch_, _ops.clip_torch_, _ops.value_torch_, _ops.mul_torch_,
               _ops.agc_torch_)
_COMPILED_DTYPES = frozenset((torch.float32, torch.float16, torch.bfloat16, torch.float64))
_NORM, _SCALE, _CLIP, _VALUE, _PARTIALS = 0, 1, 2, 3, 5  # operations of _C.fast
_CPU, _CUDA = 1, 2  # device types of _C.fast


def _cuda_compiled() -> bool:
    return _ops.C is not None and _ops.BUILD.get("cuda") is not None


@functools.cache
def _triton():
    """The Triton implementation, or None when Triton does not import."""
    try:
        from . import triton as t
    except ImportError:
        return None
    return _Impl(t.multi_tensor_norm, t.multi_tensor_scale_, t.clip_grad_norm_, t.clip_grad_value_,
                 t.multi_tensor_mul_, t.adaptive_clip_grad_)


def available_backends() -> tuple[str, ...]:
    """The backends usable here, "auto" first."""
    cuda = torch.cuda.is_available()
    triton_ok = _triton() is not None and (cuda or _triton_interpreted())
    return (("auto",) + (("cpu",) if _ops.C is not None else ()) + (("cuda",) if cuda and _cuda_compiled() else ())
            + (("triton",) if triton_ok else ()) + ("torch",))


def _triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


# ---- argument handling ----

def _as_list(parameters, warn_empty_generator: bool = False):
    if isinstance(parameters, torch.Tensor):
        return [parameters]
    if isinstance(parameters, (list, tuple)):
        return parameters
    is_generator = isinstance(parameters, types.GeneratorType)
    parameters = list(parameters)
    if warn_empty_generator and is_generator and not parameters:
        warnings.warn("`parameters` is an empty generator, no gradient clipping will occur.", stacklevel=3)
    return parameters


def _grads(params) -> list:
    """The defined ``.grad`` of each parameter (a C++ pass with the compiled library: DTensor parameters' Python
    ``.grad`` costs microseconds each)."""
    if _ops.C is not None and isinstance(params, (list, tuple)) and not torch.compiler.is_compiling():
        grads = _ops.C.grads_of(params)
        if grads is not None:
            return grads
    return [q.grad for q in params if q.grad is not None]


def _number(name: str, value, *, allow_negative: bool, what: str) -> float:
    """float(value), with torch's exception types where torch's own float() raises (TypeError for None or another
    non-number, ValueError for a string that is not one), and ValueError for NaN or a negative value."""
    if isinstance(value, torch.Tensor):
        value = value.detach()  # a max_norm that requires grad converts silently, as in torch
    try:
        v = float(value)
    except TypeError:
        raise TypeError(f"{name} must be {what}, got {value!r}") from None
    except ValueError:
        raise ValueError(f"{name} must be {what}, got {value!r}") from None
    if math.isnan(v) or (not allow_negative and v < 0):
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return v


def _max_norm(v) -> float:
    return _number("max_norm", v, allow_negative=False, what="a non-negative number")


def _norm_type(v) -> float:
    return _number("norm_type", v, allow_negative=True, what="a number (or 'inf'), not NaN")


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "cpu" and _ops.C is None:
        raise RuntimeError(f"backend='cpu' needs the compiled library: {_ops.WHY_NOT_COMPILED}")
    if backend == "cuda" and not _cuda_compiled():
        why = _ops.WHY_NOT_COMPILED or "it was built without CUDA"
        raise RuntimeError(f"backend='cuda' needs the compiled library with its CUDA kernels: {why}")
    if backend == "triton" and _triton() is None:
        raise RuntimeError("backend='triton' needs Triton (pip install triton)")


def _fast(backend: str) -> int:
    """The device types (_CPU | _CUDA) whose calls may take _C.fast; 0 for none."""
    if _ops.C is None or torch.compiler.is_compiling():
        return 0
    cuda = _CUDA if _cuda_compiled() else 0
    return {"auto": _CPU | cuda, "cpu": _CPU, "cuda": cuda}.get(backend, 0)


# ---- grouping by device ----

def _impl_for(device: torch.device, ts, backend: str) -> _Impl:
    if backend in ("cpu", "cuda") and device.type != backend:
        raise ValueError(f"backend='{backend}' takes {backend.upper()} tensors, got tensors on {device}")
    if backend == "triton" and device.type != "cuda" and not (device.type == "cpu" and _triton_interpreted()):
        raise ValueError(f"backend='triton' takes CUDA tensors (CPU ones under TRITON_INTERPRET=1), got tensors on "
                         f"{device}")
    if backend == "torch" or not (backend in ("cpu", "cuda") or all(t.dtype in _COMPILED_DTYPES for t in ts)):
        return _TORCH
    if backend == "triton" or (backend == "auto" and device.type == "cuda" and not _cuda_compiled()
                               and _triton() is not None):
        return _triton()
    return _OPS  # the dispatcher takes the compiled kernel of the device, or the pure-PyTorch one


def _groups(tensors, foreach, backend: str, writes: bool = False, complex_ok: bool = True) -> dict:
    """(device, sparse) -> (implementation, tensors), in order of first appearance. Sparse gradients take torch's own
    ops (the pure-PyTorch kernels), as torch's clip does. Raises, before anything is written, on foreach=True for a
    device without foreach support, on backend='cpu' or 'cuda' for another device, and, for an in-place pass
    (``writes``), on any gradient of the whole call that the pass cannot write (_ops.check_writable) and on
    gradients that share memory partly."""
    device = _ops.C.plain_device(tensors) if (_ops.C is not None and isinstance(tensors, (list, tuple))
                                             and not torch.compiler.is_compiling()) else None
    if device is not None:  # one device, dense dtypes the kernels take: nothing to raise, one group (a C++ pass)
        return _one_group(device, tensors, foreach, backend)
    by_key: dict = {}
    for t in tensors:
        by_key.setdefault((t.device, t.layout != torch.strided), []).append(t)
    if writes:
        _ops.check_writable(tensors, complex_ok)
    out = {}
    for (device, sparse), ts in by_key.items():
        if foreach and not _device_has_foreach_support(device):
            raise RuntimeError(f"foreach=True was passed, but can't use the foreach API on {device.type} tensors")
        out[(device, sparse)] = (_TORCH if sparse else _impl_for(device, ts, backend), ts)
    if writes and len(out) > 1:  # each op refuses overlapping gradients itself; here, before the first op writes
        for _, ts in out.values():
            _ops.check_overlaps(ts)
    return out


def _one_group(device: torch.device, tensors, foreach, backend: str) -> dict:
    """_groups of tensors known to be on ``device`` and of dense dtypes the compiled kernels take (_C.plain_device)."""
    if foreach and not _device_has_foreach_support(device):
        raise RuntimeError(f"foreach=True was passed, but can't use the foreach API on {device.type} tensors")
    return {(device, False): (_impl_for(device, (), backend), tensors)}


def _total(groups: dict, p: float) -> torch.Tensor:
    return _combine([impl.norm(ts, p)[0] for impl, ts in groups.values()], groups, p)


def total_and_each(groups: dict, tensors, p: float):
    """(total, per-tensor norms in the order of ``tensors``) with one norm pass per device group."""
    outs = [impl.norm(ts, p, True) for impl, ts in groups.values()]
    total = _combine([o[0] for o in outs], groups, p)
    if len(outs) == 1:
        return total, outs[0][1]
    position = {id(t): i for i, t in enumerate(tensors)}
    index = torch.tensor([position[id(t)] for _, ts in groups.values() for t in ts], device=total.device)
    each = torch.empty(len(tensors), dtype=total.dtype, device=total.device)
    each[index] = torch.cat([o[1].to(total.device, total.dtype) for o in outs])
    return total, each


def _combine(totals, groups: dict, p: float) -> torch.Tensor:
    """The total of the per-device totals (torch's composition)."""
    if len(totals) == 1:
        return totals[0]
    first = next(iter(groups))[0]
    dtype = _ops.result_dtype(totals)
    stacked = torch.stack([t.to(first, torch.float64) for t in totals])
    combined = stacked.sum() if p == 0 else torch.linalg.vector_norm(stacked, p)  # p = 0: counts add up
    return combined.to(dtype)


def _check_dist(process_group, pp_group) -> bool:
    """Whether group keywords were given (validated here, before anything is read or written)."""
    if process_group is None and pp_group is None:
        return False
    _dist.check_groups(process_group, pp_group)
    return True


def _check_finite(total: torch.Tensor, p: float) -> None:
    # The one host sync of the API, as in torch: the caller asked to fail on a non-finite norm.
    if torch.logical_or(total.isnan(), total.isinf()):
        raise RuntimeError(
            f"The total norm of order {p} for gradients from `parameters` is non-finite, so it cannot be clipped. "
            "To disable this error and scale the gradients by the non-finite norm anyway, set "
            "`error_if_nonfinite=False`")


def _eps(v) -> float:
    return _number("eps", v, allow_negative=False, what="a non-negative number")


def _scale(groups: dict, total: torch.Tensor, max_norm: float, eps: float = 1e-6, backend: str = "auto") -> None:
    devices = _fast(backend)
    for (device, _), (impl, ts) in groups.items():
        t = total if total.device == device else total.to(device)
        if impl is _OPS and devices and _ops.C.fast(ts, False, devices, _SCALE, max_norm, 0.0, t, eps) is not None:
            continue  # the compiled kernel without the dispatcher's conversion of the list
        impl.scale(ts, t, max_norm, eps)


def each_partial(impl, ts, p: float, backend: str = "auto") -> torch.Tensor:
    """Each tensor's un-finalised partial of the p-norm, in float64 on the group's device: sum |x|^p for finite p,
    max |x| (inf), min |x| (-inf), the nonzero count (p = 0). From the compiled kernel where it applies (its float64
    accumulators: exact for bfloat16 gradients too), else from the per-tensor norms (rounded to their dtype)."""
    devices = _fast(backend)
    if impl is _OPS and devices:
        each = _ops.C.fast(ts, False, devices, _PARTIALS, p)
        if each is not None:
            return each
    each = impl.norm(ts, p, True)[1].to(torch.float64)
    return each if p in (0.0, 1.0, math.inf, -math.inf) else each.pow(p)


def multiply_(groups: dict, coef: torch.Tensor) -> None:
    """Multiplies every gradient of ``groups`` (from _groups, writes=True) in place by the device coefficient
    ``coef`` (one value): one launch per device (op multi_tensor_mul_), nothing written where it is 1."""
    for (device, _), (impl, ts) in groups.items():
        impl.mul(ts, coef if coef.device == device else coef.to(device))


# ---- the drop-in functions ----

def get_total_norm(tensors, norm_type: float = 2.0, error_if_nonfinite: bool = False, foreach=None, *,
                   backend: str = "auto", process_group=None, pp_group=None) -> torch.Tensor:
    """Same as ``torch.nn.utils.get_total_norm``: the norm of all ``tensors`` together, as a 0-d tensor in their
    promoted dtype on the first tensor's device (CPU ``tensor(0.)`` for no tensors). DTensors, ``process_group``
    and ``pp_group``: gradclip_cuda/distributed.py (the total is then reduced over every group they need)."""
    tensors = _as_list(tensors)
    p = _norm_type(norm_type)
    _check_backend(backend)
    grouped = _check_dist(process_group, pp_group)
    devices = 0 if grouped else _fast(backend)
    total = _ops.C.fast(tensors, False, devices, _NORM, p) if devices else None
    if total is None:
        if grouped or _dist.has_dtensor(tensors):
            with torch.no_grad():
                total, _, _, mesh = _dist.total_norm(tensors, p, foreach, backend, writes=False,
                                                     process_group=process_group, pp_group=pp_group)
            if error_if_nonfinite:
                _check_finite(total, p)
            return _dist.wrap(total, mesh)
        if len(tensors) == 0:
            return torch.tensor(0.0)
        with torch.no_grad():
            total = _total(_groups(tensors, foreach, backend), p)
    if error_if_nonfinite:
        _check_finite(total, p)
    return total


def clip_grads_with_norm_(parameters, max_norm: float, total_norm: torch.Tensor, foreach=None, *,
                          backend: str = "auto", eps: float = 1e-6) -> None:
    """Same as ``torch.nn.utils.clip_grads_with_norm_``: scales the gradients by
    ``min(max_norm / (total_norm + eps), 1)`` (torch's eps = 1e-6 by default; ``eps=0``: TensorFlow's exact cap);
    writes nothing where that is 1. Purely local for DTensor gradients (their local shards are scaled; a DTensor
    ``total_norm`` is read as its local value: no collective)."""
    params = _as_list(parameters)
    max_norm = _max_norm(max_norm)
    eps = _eps(eps)
    _check_backend(backend)
    total = total_norm if isinstance(total_norm, torch.Tensor) else torch.as_tensor(float(total_norm))
    total = _dist.local(total)
    if total.numel() != 1:
        raise RuntimeError(f"gradclip_cuda: total_norm must hold one value, got {total.numel()}")
    devices = _fast(backend)
    if devices and _ops.C.fast(params, True, devices, _SCALE, max_norm, 0.0, total, eps) is not None:
        return
    with torch.no_grad():
        grads = [_dist.local(p.grad) for p in params if p.grad is not None]
        if grads:
            _scale(_groups(grads, foreach, backend, writes=True), total, max_norm, eps, backend)


def clip_grad_norm_(parameters, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False,
                    foreach=None, *, backend: str = "auto", eps: float = 1e-6, scaler=None, optimizer=None,
                    defer: bool = False, skip_nonfinite: bool = False, process_group=None, pp_group=None,
                    stats=None) -> torch.Tensor:
    """Same as ``torch.nn.utils.clip_grad_norm_``: computes the total norm of the gradients of ``parameters``,
    scales them in place by ``min(max_norm / (total + eps), 1)`` and returns the total. ``eps`` (keyword-only):
    torch's 1e-6 by default; ``eps=0`` gives TensorFlow's exact ``clip_by_global_norm`` cap (README, "Clipping
    policies"). ``stats`` (a gradclip_cuda.ClipStats): records the total, the coefficient and whether it clipped,
    on the device (no sync).

    Keyword-only, for mixed precision and the optimizer step (gradclip_cuda/amp.py): ``scaler`` (a GradScaler that
    scaled this step's loss, with ``optimizer``) unscales and clips in one multiply and leaves the scaler as its
    ``unscale_`` would; ``defer=True`` hands the coefficient to a fused optimizer's next step instead of writing;
    ``skip_nonfinite=True`` skips that step on a non-finite total, without a host sync.

    Keyword-only, for distributed training (gradclip_cuda/distributed.py): DTensor gradients (FSDP2, TP, HSDP, any
    meshes) need nothing more; ``process_group``: the plain gradients are shards over that group (ZeRO-style);
    ``pp_group`` (a group or a list of groups): the total is further combined over it (pipeline stages). The total
    is reduced with one all-reduce per distinct group and returned as a DTensor replicated on the first DTensor's
    mesh when any gradient is a DTensor."""
    params = _as_list(parameters, warn_empty_generator=True)
    max_norm = _max_norm(max_norm)
    p = _norm_type(norm_type)
    eps = _eps(eps)
    _check_backend(backend)
    grouped = _check_dist(process_group, pp_group)
    if scaler is not None or optimizer is not None or defer or skip_nonfinite or stats is not None:
        return _clip_with_optimizer(params, max_norm, p, error_if_nonfinite, foreach, backend, scaler, optimizer,
                                    defer, skip_nonfinite, process_group, pp_group, eps, stats)
    devices = 0 if grouped else _fast(backend)
    if devices and not error_if_nonfinite:
        total = _ops.C.fast(params, True, devices, _CLIP, max_norm, p, None, eps)
        if total is not None:
            return total
    with torch.no_grad():
        from_params = grouped or _dist.first_is_dtensor(params)  # the distributed path reads the .grad itself
        grads = params if from_params else _grads(params)
        if from_params or _dist.has_dtensor(grads):
            total, acc, shards, mesh = _dist.total_norm(grads, p, foreach, backend, writes=True,
                                                        process_group=process_group, pp_group=pp_group,
                                                        from_params=from_params, keep_set=True)
            if error_if_nonfinite:
                _check_finite(total, p)
            _dist.scale(shards, acc, max_norm, eps, backend)
            return _dist.wrap(total, mesh)
        if not grads:
            return torch.tensor(0.0)
        groups = _groups(grads, foreach, backend, writes=True)
        if len(groups) == 1 and not error_if_nonfinite:
            impl, ts = next(iter(groups.values()))
            return impl.clip(ts, max_norm, p, eps)
        total = _total(groups, p)
        if error_if_nonfinite:
            _check_finite(total, p)
        _scale(groups, total, max_norm, eps, backend)
        return total


def _clip_with_optimizer(params, max_norm, p, error_if_nonfinite, foreach, backend, scaler, optimizer, defer,
                         skip_nonfinite, process_group=None, pp_group=None, eps=1e-6, stats=None) -> torch.Tensor:
    """The clip as a norm pass, a coefficient computed on the device and one multiply (or a hand-off to the
    optimizer): for a GradScaler, a fused optimizer, skip_nonfinite, and ClipStats."""
    from . import amp
    hand_off = amp.check(params, scaler, optimizer, defer, skip_nonfinite)
    with torch.no_grad():
        grads = _grads(params)
        if process_group is not None or pp_group is not None or _dist.has_dtensor(grads):
            total, _, groups, mesh = _dist.total_norm(grads, p, foreach, backend, writes=not hand_off,
                                                      process_group=process_group, pp_group=pp_group)
            if error_if_nonfinite:
                _check_finite(total, p)
            locals_ = [_dist.local(g) for g in grads]
        else:
            if not grads:
                return torch.tensor(0.0)
            groups = _groups(grads, foreach, backend, writes=not hand_off)
            mesh, locals_ = None, grads
            if stats is not None and stats.top_k:  # one read pass, with the per-tensor norms
                total, each = total_and_each(groups, grads, p)
            else:
                total, each = _total(groups, p), None  # one read pass
            if error_if_nonfinite:
                _check_finite(total, p)
        unscaled = amp.apply(params, locals_, total, max_norm, scaler, optimizer, hand_off, skip_nonfinite,
                             multiply=lambda _, coef: multiply_(groups, coef), eps=eps)
        if stats is not None:
            stats.record(unscaled, max_norm, eps=eps, per_tensor=each if mesh is None else None,
                         positions=[i for i, q in enumerate(params) if q.grad is not None])
        return _dist.wrap(unscaled, mesh)


def clip_grad_value_(parameters, clip_value: float, foreach=None, *, backend: str = "auto") -> None:
    """Same as ``torch.nn.utils.clip_grad_value_``: clamps the gradients in place to [-clip_value, clip_value]."""
    params = _as_list(parameters)
    v = _number("clip_value", clip_value, allow_negative=False, what="a non-negative number")
    _check_backend(backend)
    devices = _fast(backend)
    if devices and _ops.C.fast(params, True, devices, _VALUE, v) is not None:
        return
    with torch.no_grad():
        grads = [_dist.local(g.grad) for g in params if g.grad is not None]  # DTensors: purely local
        for impl, ts in _groups(grads, foreach, backend, writes=True, complex_ok=False).values():
            impl.value(ts, v)


def clip_grad_norm_per_tensor_(parameters, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False,
                               foreach=None, *, eps: float = 1e-6, backend: str = "auto") -> torch.Tensor:
    """Per-tensor ("individual") norm clipping, as TensorFlow's ``clip_by_norm`` and Keras' ``clipnorm`` apply it to
    each gradient: gradient i is scaled in place by ``min(max_norm / (norm_i + eps), 1)`` (``eps=0``: their exact
    ``max_norm / max(norm_i, max_norm)``). One norm pass (the per-tensor norms the norm op computes anyway) and one
    scale launch per device. Returns the per-tensor norms before clipping, one per gradient (parameters without a
    gradient are left out), in their promoted dtype, on the first gradient's device."""
    params = _as_list(parameters, warn_empty_generator=True)
    max_norm = _max_norm(max_norm)
    p = _norm_type(norm_type)
    eps = _eps(eps)
    _check_backend(backend)
    with torch.no_grad():
        grads = [_dist.local(q.grad) for q in params if q.grad is not None]
        if not grads:
            return torch.empty(0)
        groups = _groups(grads, foreach, backend, writes=True)
        outs = {key: impl.norm(ts, p, True)[1] for key, (impl, ts) in groups.items()}
        if error_if_nonfinite:
            each = torch.cat([o.double().cpu() for o in outs.values()])
            if not bool(torch.isfinite(each).all()):  # the caller asked for the sync
                raise RuntimeError(f"The norm of order {p} of a gradient from `parameters` is non-finite, so it cannot "
                                   "be clipped. To disable this error and scale the gradients by the non-finite norm "
                                   "anyway, set `error_if_nonfinite=False`")
        for key, (impl, ts) in groups.items():
            impl.scale(ts, outs[key], max_norm, eps)
        if len(groups) == 1:
            return next(iter(outs.values()))
        first = grads[0].device
        dtype = _ops.result_dtype(grads)
        position = {id(t): i for i, t in enumerate(grads)}
        index = torch.tensor([position[id(t)] for _, ts in groups.values() for t in ts], device=first)
        each = torch.empty(len(grads), dtype=dtype, device=first)
        each[index] = torch.cat([o.to(first, dtype) for o in outs.values()])
        return each


def _named(parameters):
    """(names or None, parameters) from a module, (name, parameter) pairs, or parameters."""
    if isinstance(parameters, torch.nn.Module):
        parameters = parameters.named_parameters()
    items = list(_as_list(parameters))
    if items and isinstance(items[0], tuple):
        return [n for n, _ in items], [q for _, q in items]
    return None, items


def _excluder(exclude):
    """A predicate (name, parameter) -> bool from ``exclude``: None, a predicate, or names / fnmatch patterns."""
    if exclude is None:
        return None
    if callable(exclude):
        return exclude
    import fnmatch
    patterns = [exclude] if isinstance(exclude, str) else list(exclude)
    return lambda name, _: name is not None and any(fnmatch.fnmatchcase(name, pat) for pat in patterns)


def adaptive_clip_grad_(parameters, clip_factor: float = 0.01, eps: float = 1e-3, norm_type: float = 2.0, *,
                        unit_axis: int = 0, exclude=None, backend: str = "auto") -> None:
    """Unit-wise adaptive gradient clipping (AGC, Brock et al. 2021), as timm's ``adaptive_clip_grad`` with the same
    defaults: for each unit (a slice along ``unit_axis`` of a parameter with two or more dimensions: the output
    dimension, 0, in PyTorch's layout; -1 for JAX/Haiku's; the whole tensor for one dimension or none),
    ``limit = max(||param_unit||, eps) * clip_factor``, and a gradient unit whose norm reaches it is scaled to it
    (``limit / max(||grad_unit||, 1e-6)``). One fused pass over parameters and gradients per device (op
    adaptive_clip_grad_): both unit-wise norms, then the scale, with no host sync.

    ``parameters``: parameters, (name, parameter) pairs (``model.named_parameters()``) or a module. ``exclude``:
    parameters left unclipped, by name (a name or fnmatch pattern, or a list of them; needs names) or by a predicate
    ``(name, parameter) -> bool`` (name None without names), e.g. the classifier head, as the AGC paper advises."""
    names, params = _named(parameters)
    f = _number("clip_factor", clip_factor, allow_negative=False, what="a non-negative number")
    eps = _eps(eps)
    p = _norm_type(norm_type)
    _check_backend(backend)
    skip = _excluder(exclude)
    if skip is not None and names is None and not callable(exclude):
        raise ValueError("exclude by name needs named parameters: pass model.named_parameters() or the module")
    with torch.no_grad():
        pairs = [(q.grad, q.detach()) for i, q in enumerate(params) if q.grad is not None
                 and not (skip is not None and skip(names[i] if names else None, q))]
        if not pairs:
            return
        by_device: dict = {}
        for g, w in pairs:
            by_device.setdefault(g.device, []).append((g, w))
        groups = _groups([g for g, _ in pairs], None, backend, writes=True, complex_ok=False)
        for (device, _), (impl, _) in groups.items():
            gs, ws = zip(*by_device[device])
            impl.agc(list(gs), list(ws), f, eps, p, int(unit_axis))


# ---- patching torch ----

_TARGETS = {
    "torch.nn.utils": {"clip_grad_norm_": clip_grad_norm_, "clip_grad_value_": clip_grad_value_,
                       "get_total_norm": get_total_norm, "clip_grads_with_norm_": clip_grads_with_norm_},
    "torch.nn.utils.clip_grad": {"clip_grad_norm_": clip_grad_norm_, "clip_grad_value_": clip_grad_value_,
                                 "_get_total_norm": get_total_norm, "_clip_grads_with_norm_": clip_grads_with_norm_},
}


class patch_torch:
    """Makes ``torch.nn.utils.clip_grad_norm_`` (and ``clip_grad_value_``, ``get_total_norm``,
    ``clip_grads_with_norm_``, and the deprecated ``clip_grad_norm``) use gradclip_cuda.

    Use it as a context manager (``with gradclip_cuda.patch_torch(): ...``) or as a plain call whose result's
    ``undo()`` puts torch's functions back. Code that bound torch's function to a name of its own before the patch
    (``from torch.nn.utils import clip_grad_norm_``) keeps torch's.
    """

    def __init__(self):
        import importlib
        self._saved = []
        for module_name, names in _TARGETS.items():
            module = importlib.import_module(module_name)
            for name, fn in names.items():
                if hasattr(module, name):
                    self._saved.append((module, name, getattr(module, name)))
                    setattr(module, name, fn)

    def undo(self) -> None:
        for module, name, original in reversed(self._saved):
            setattr(module, name, original)
        self._saved = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.undo()
        return False
