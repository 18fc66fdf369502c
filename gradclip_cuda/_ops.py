"""The ops: one schema each, in this file only; their fake kernels; their pure-PyTorch default kernels; and the
loading of the compiled library, whose kernels register against these schemas.

Dispatch: the pure-PyTorch kernels are registered as CompositeExplicitAutograd, so every op works on every device
with no compiled library. The compiled library adds a CPU kernel for each op (csrc/cpu/), which the dispatcher
prefers for CPU tensors.

Semantics shared by every implementation:
- ``multi_tensor_norm(xs, p, per_tensor)``: the total is torch's composition, the p-norm of the vector of per-tensor
  p-norms (for p = 0 that counts the tensors holding a nonzero element, as torch's ``get_total_norm`` does), as a 0-d
  tensor in the promoted dtype of ``xs`` (what torch returns), computed in float32 or better (float64 for float64
  inputs) and rounded once. ``per_tensor`` adds each tensor's norm (else an empty tensor).
- ``multi_tensor_scale_(xs, total, max_norm, eps)``: multiplies ``xs`` in place by
  ``clamp(max_norm / (total + eps), max=1)`` (torch's formula with its eps = 1e-6 by default; eps = 0 gives
  TensorFlow's exact ``max_norm / max(total, max_norm)``), computed on the device from ``total`` in float32 (float64
  for a float64 total); NaN propagates as in torch. ``total`` holds one value (one coefficient for all) or one per
  tensor (tensor i scaled by its own coefficient: per-tensor clipping). Nothing is written where a coefficient is 1.
- ``multi_tensor_mul_(xs, coef)``: multiplies ``xs`` in place by ``coef`` (one value, or one per tensor), a
  coefficient computed elsewhere on the device (adaptive thresholds, GradScaler hand-off), in each tensor's
  accumulation type; nothing written where it is 1.
- ``clip_grad_norm_(xs, max_norm, p, eps)``: both; the coefficient comes from the unrounded total.
- ``adaptive_clip_grad_(grads, params, clip_factor, eps, p, unit_axis)``: unit-wise adaptive clipping (AGC): for
  each unit (slice along ``unit_axis`` of a tensor with more than one dimension; the whole tensor otherwise),
  ``max = max(||param_unit||_p, eps) * clip_factor``; the gradient unit is scaled by
  ``max / max(||grad_unit||_p, 1e-6)`` where ``||grad_unit||_p >= max``, else left alone. Norms in float32
  (float64 for float64 tensors), in a fixed order.
- ``clip_grad_value_(xs, v)``: clamps ``xs`` in place to [-v, v] (clamp_min then clamp_max, as torch).
"""
from __future__ import annotations

import functools
import math
import os
import warnings

import torch

NAMESPACE = "gradclip_cuda"

SCHEMAS = {
    "multi_tensor_norm": "(Tensor[] xs, float p, bool per_tensor=False) -> (Tensor, Tensor)",
    "multi_tensor_scale_": "(Tensor(a!)[] xs, Tensor total, float max_norm, float eps=1e-06) -> ()",
    "multi_tensor_mul_": "(Tensor(a!)[] xs, Tensor coef) -> ()",
    "clip_grad_norm_": "(Tensor(a!)[] xs, float max_norm, float p, float eps=1e-06) -> Tensor",
    "clip_grad_value_": "(Tensor(a!)[] xs, float clip_value) -> ()",
    "adaptive_clip_grad_": "(Tensor(a!)[] grads, Tensor[] params, float clip_factor, float eps, float p, "
                           "int unit_axis=0) -> ()",
    "clip_policy_step_": "(Tensor(a!) state, Tensor total, int policy, float[] args) -> Tensor",
}

_lib = torch.library.Library(NAMESPACE, "DEF")
for _name, _schema in SCHEMAS.items():
    _lib.define(_name + _schema)

ops = getattr(torch.ops, NAMESPACE)


_REAL = {torch.complex32: torch.float16, torch.complex64: torch.float32, torch.complex128: torch.float64}


def result_dtype(xs) -> torch.dtype:
    """torch's dtype for a total norm of ``xs``: their promoted dtype (its real counterpart for complex)."""
    if C is not None and isinstance(xs, (list, tuple)) and not torch.compiler.is_compiling():
        dtype = C.result_dtype(xs)  # a C++ loop: thousands of tensors' .dtype cost a Python pass otherwise
        if dtype is not None:
            return dtype
    dtype = functools.reduce(torch.promote_types, (x.dtype for x in xs))
    return _REAL.get(dtype, dtype)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_nonempty(xs, p: float) -> None:
    if math.isinf(p) or p < 0:
        for x in xs:
            if x.numel() == 0:
                shown = int(p) if math.isfinite(p) and p == int(p) else p
                raise RuntimeError(f"linalg.vector_norm cannot compute the {shown} norm on an empty tensor "
                                   "because the operation does not have an identity")


# ---- pure-PyTorch default kernels (any device, no compiled library, no host sync on CUDA) ----

def _float8(x: torch.Tensor) -> bool:
    return x.is_floating_point() and x.element_size() == 1  # float8 variants: torch has no norm, mul or clamp for them


def check_tensors(xs, p: float) -> None:
    """The errors torch raises for a norm of order p of xs: integer tensors, float8 ones, and empty ones where p has no
    identity."""
    _check_nonempty(xs, p)
    for x in xs:
        if not (x.is_floating_point() or x.is_complex()):
            raise RuntimeError(f"linalg.vector_norm: Expected a floating point or complex tensor as input. Got {x.dtype}")
        if _float8(x):
            raise NotImplementedError(f"gradclip_cuda: the norm is not implemented for {x.dtype} (torch has none)")


def _per_tensor_norms(xs, p: float) -> torch.Tensor:
    """Each tensor's p-norm, in float32 (float64 for float64 tensors), in the order of ``xs``, as one float64 vector."""
    check_tensors(xs, p)
    xs = [x.abs() if x.is_complex() and x.layout == torch.strided else x for x in xs]
    by_acc: dict[torch.dtype, list[int]] = {}
    norms: list = [None] * len(xs)
    for i, x in enumerate(xs):
        if x.layout != torch.strided:  # sparse: torch's own norm of it, which is what torch's clip uses
            norms[i] = torch.linalg.vector_norm(x, p).to(torch.float64)
        else:
            by_acc.setdefault(_acc_dtype(x.dtype), []).append(i)
    for acc, idx in by_acc.items():
        for i, n in zip(idx, torch._foreach_norm([xs[i] for i in idx], p, dtype=acc)):
            norms[i] = n.to(torch.float64)
    return torch.stack(norms)


def _compose(per_tensor: torch.Tensor, p: float) -> torch.Tensor:
    """The total from per-tensor norms, in float64: torch's composition (for p = 0, a count of nonzero norms)."""
    if p == 0:
        return (per_tensor != 0).sum().to(torch.float64)
    return torch.linalg.vector_norm(per_tensor, p)


def norm_torch(xs, p: float, per_tensor: bool = False):
    each = _per_tensor_norms(xs, p)
    dtype = result_dtype(xs)
    return _compose(each, p).to(dtype), (each if per_tensor else each[:0]).to(dtype)


def coefficient(total: torch.Tensor, max_norm: float, device, eps: float = 1e-6) -> torch.Tensor:
    """clamp(max_norm / (total + eps), max=1) on ``device``, as torch evaluates it, in float32 (float64 for a
    float64 total); one value per value of ``total``."""
    t = total.to(device=device, dtype=_acc_dtype(total.dtype))
    return torch.clamp(torch.reciprocal(t + eps) * max_norm, max=1.0)


def check_coefficients(xs, values: torch.Tensor, what: str) -> None:
    """A total or coefficient tensor holds one value, or one per tensor."""
    if values.numel() != 1 and values.numel() != len(xs):
        raise RuntimeError(f"gradclip_cuda: {what} must hold one value or one per tensor ({len(xs)}), "
                           f"got {values.numel()}")


def mul_torch_(xs, coef: torch.Tensor) -> None:
    """multi_tensor_mul_ with torch's ops, as torch's own clip multiplies (``_foreach_mul_`` / ``mul_`` by a 0-d
    tensor): on a GPU torch rounds that coefficient to a 16-bit gradient's dtype first, where the compiled and
    Triton kernels multiply in float32; the pure-PyTorch backend keeps torch's behaviour."""
    check_coefficients(xs, coef, "coef")
    check_writable(xs)
    if not xs:
        return
    coef = coef.to(xs[0].device).reshape(-1)
    if coef.dtype not in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
        coef = coef.double()
    if coef.numel() == 1 and coef.device.type == "cpu" and bool(coef == 1):
        return  # nothing to write (on an accelerator we multiply instead: the test would cost a sync)
    per = coef.numel() > 1
    index = {id(x): i for i, x in enumerate(xs)}
    targets, back = writable(xs)
    originals = {id(c): o for o, c in back}
    by_acc: dict = {}
    for x in targets:
        i = index[id(originals.get(id(x), x))] if per else 0
        by_acc.setdefault(_acc_dtype(x.dtype), ([], []))
        by_acc[_acc_dtype(x.dtype)][0].append(x)
        by_acc[_acc_dtype(x.dtype)][1].append(i)
    for acc, (ts, idx) in by_acc.items():
        c = coef.to(acc)
        if coef.numel() == 1:
            for x in ts:
                if x.layout != torch.strided:
                    x.mul_(c[0])  # sparse, as torch scales it
            strided = [x for x in ts if x.layout == torch.strided]
            if strided:
                torch._foreach_mul_(strided, c[0])
        else:
            for x, i in zip(ts, idx):
                x.mul_(c[i])
    _write_back(back)


def scale_torch_(xs, total: torch.Tensor, max_norm: float, eps: float = 1e-6) -> None:
    check_coefficients(xs, total, "total_norm")
    check_writable(xs)
    mul_torch_(xs, coefficient(total.reshape(-1), max_norm, xs[0].device, eps))


def clip_torch_(xs, max_norm: float, p: float, eps: float = 1e-6) -> torch.Tensor:
    check_writable(xs)
    check_overlaps(xs)  # before the norm runs
    each = _per_tensor_norms(xs, p)
    dtype = result_dtype(xs)
    total = _compose(each, p).to(_acc_dtype(dtype))
    scale_torch_(xs, total, max_norm, eps)
    return total.to(dtype)


OVERLAP_ERROR = ("gradclip_cuda: two gradients share part of their memory (overlapping views, or views of one buffer "
                 "with different dtypes); an in-place pass cannot change each element exactly once, so nothing was "
                 "written. Pass each gradient once, or views that do not overlap.")


def _dense(x: torch.Tensor) -> bool:
    """Whether x's elements fill a span of memory without gaps or overlaps (any order of dimensions)."""
    if x.is_contiguous():
        return True
    expected = 1
    for stride, size in sorted((st, sz) for st, sz in zip(x.stride(), x.shape) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def write_skips(xs) -> list:
    """For tensors whose memory is dense (``_dense``): which ones an in-place pass must not write, as the compiled
    kernels decide it (csrc/common/plan.h, WriteSkips). A tensor whose memory lies inside the memory of a tensor
    before it in address order (start, then larger span, then list position), of the same dtype and at a whole-element
    offset, is skipped: the same gradient listed twice, ``base[:50]`` beside ``base``, a transposed view beside its
    base. Memory shared in any other way raises (``OVERLAP_ERROR``) before anything is written."""
    spans = sorted((x.data_ptr(), -(x.data_ptr() + x.numel() * x.element_size()), i)
                   for i, x in enumerate(xs) if x.numel() > 0)
    skip = [False] * len(xs)
    c = None
    for start, neg_end, i in spans:
        if c is None or start >= c[1]:
            c = (start, -neg_end, xs[i].dtype)
            continue
        if -neg_end <= c[1] and xs[i].dtype == c[2] and (start - c[0]) % xs[i].element_size() == 0:
            skip[i] = True
        else:
            raise RuntimeError(OVERLAP_ERROR)
    return skip


def check_overlaps(xs) -> None:
    """Raises OVERLAP_ERROR where an in-place pass over ``xs`` would (``writable``), without making its copies: only
    dense tensors are written in place, so only they can overlap."""
    write_skips([x for x in xs if x.layout == torch.strided and _dense(x)])


def writable(xs):
    """(tensors to write, pairs (original, copy) to write back afterwards) for an in-place pass over ``xs``, as the
    compiled kernels do it: tensors with gaps in their memory through a contiguous copy, each element of the others
    written once (``write_skips``). Raises before anything is written on overlapping gradients."""
    dense, back = [], []
    for x in xs:
        if x.layout != torch.strided:
            continue  # sparse: written on its own (scale_torch_); its values are a tensor of their own
        if _dense(x):
            dense.append(x)
        else:
            back.append((x, x.contiguous()))
    targets = [x for x, s in zip(dense, write_skips(dense)) if not s]
    return targets + [c for _, c in back] + [x for x in xs if x.layout != torch.strided], back


def _write_back(back) -> None:
    for original, copy in back:
        original.copy_(copy)


def check_writable(xs, complex_ok: bool = True) -> None:
    """The errors of an in-place pass, for the whole list before anything is written: integer (and bool) tensors
    cannot hold a scaled or clamped value, float8 ones have no kernels; complex and sparse ones cannot be clamped
    (``complex_ok=False``). torch's exception types for these tensors."""
    for x in xs:
        if not (x.is_floating_point() or x.is_complex()):
            raise RuntimeError(f"gradclip_cuda: gradients of dtype {x.dtype} cannot be scaled or clamped in place "
                               "(result type Float can't be cast to the desired output type); nothing was written")
        if _float8(x):
            raise NotImplementedError(f"gradclip_cuda: scaling and clamping are not implemented for {x.dtype} "
                                      "(torch has neither); nothing was written")
        if x.layout != torch.strided and not complex_ok:
            raise NotImplementedError(f"gradclip_cuda: clamping a gradient of layout {x.layout} is not supported "
                                      "(torch's clip_grad_value_ cannot either); nothing was written")
        if x.is_complex() and not complex_ok:
            raise NotImplementedError(f"clamp is not supported for complex types (a gradient of dtype {x.dtype}); "
                               "nothing was written")


def value_torch_(xs, clip_value: float) -> None:
    check_writable(xs, complex_ok=False)
    targets, back = writable(xs)
    torch._foreach_clamp_min_(targets, -clip_value)
    torch._foreach_clamp_max_(targets, clip_value)
    _write_back(back)


def unit_shape(shape, unit_axis: int) -> tuple[int, int, int]:
    """(outer, units, inner) of a tensor of ``shape`` for AGC: element i (in contiguous order) belongs to unit
    ``(i // inner) % units``. Tensors of at most one dimension are one unit."""
    numel = math.prod(shape)
    if len(shape) <= 1:
        return 1, 1, numel
    axis = unit_axis % len(shape) if -len(shape) <= unit_axis < len(shape) else None
    if axis is None:
        raise IndexError(f"gradclip_cuda: unit_axis {unit_axis} is out of range for a gradient of {len(shape)} "
                         "dimensions")
    return math.prod(shape[:axis]), shape[axis], math.prod(shape[axis + 1:])


def check_agc(grads, params, unit_axis: int) -> None:
    """The errors of an AGC pass, for the whole list before anything is written."""
    if len(grads) != len(params):
        raise RuntimeError(f"gradclip_cuda: adaptive_clip_grad_ takes one parameter per gradient, got {len(grads)} "
                           f"gradients and {len(params)} parameters")
    check_writable(grads, complex_ok=False)
    for g, w in zip(grads, params):
        if g.layout != torch.strided or w.layout != torch.strided:
            raise NotImplementedError("gradclip_cuda: adaptive_clip_grad_ takes dense (strided) gradients and "
                                      "parameters only; nothing was written")
        if g.shape != w.shape:
            raise RuntimeError(f"gradclip_cuda: a gradient of shape {tuple(g.shape)} belongs to a parameter of shape "
                               f"{tuple(w.shape)}; nothing was written")
        if g.device != w.device or g.device != grads[0].device:
            raise RuntimeError("gradclip_cuda: adaptive_clip_grad_ takes gradients and parameters on one device; "
                               "nothing was written")
        if not w.is_floating_point() or _float8(w):
            raise RuntimeError(f"gradclip_cuda: adaptive_clip_grad_ takes floating-point parameters (float32, "
                               f"float16, bfloat16, float64), got {w.dtype}; nothing was written")
        unit_shape(tuple(g.shape), unit_axis)
    spans = sorted((g.data_ptr(), g.data_ptr() + (sum((n - 1) * st for n, st in zip(g.shape, g.stride())) + 1)
                    * g.element_size()) for g in grads if g.numel() > 0)  # from the first byte past the last
    if any(b[0] < a[1] for a, b in zip(spans, spans[1:])):
        raise RuntimeError("gradclip_cuda: two gradients share memory (the same gradient twice, or views of one "
                           "buffer, interleaved ones included); a unit-wise pass cannot scale shared elements "
                           "consistently, so nothing was written")
    for g in grads:
        if unit_shape(tuple(g.shape), unit_axis)[1] > 2**31 - 1:
            raise RuntimeError("gradclip_cuda: a gradient of more than 2^31 - 1 AGC units; nothing was written")


def unit_norms(x: torch.Tensor, p: float, unit_axis: int) -> torch.Tensor:
    """The p-norm of each AGC unit of x (see unit_shape), in float32 (float64 for float64), shaped (1, units, 1)
    to broadcast over x viewed as (outer, units, inner)."""
    outer, units, inner = unit_shape(tuple(x.shape), unit_axis)
    v = x.detach().reshape(outer, units, inner).to(_acc_dtype(x.dtype)).transpose(0, 1).reshape(units, -1)
    return torch.linalg.vector_norm(v, p, dim=1).reshape(1, units, 1)


def agc_torch_(grads, params, clip_factor: float, eps: float, p: float, unit_axis: int = 0) -> None:
    check_agc(grads, params, unit_axis)
    for g, w in zip(grads, params):
        if g.numel() == 0:
            continue
        outer, units, inner = unit_shape(tuple(g.shape), unit_axis)
        acc = _acc_dtype(g.dtype)
        limit = unit_norms(w, p, unit_axis).to(acc).clamp(min=eps) * clip_factor
        gn = unit_norms(g, p, unit_axis)
        coef = torch.where(gn < limit, torch.ones_like(gn), limit.to(acc) / gn.to(acc).clamp(min=1e-6))
        scaled = (g.detach().reshape(outer, units, inner).to(acc) * coef.to(acc)).to(g.dtype)
        g.copy_(scaled.reshape(g.shape))


POLICY_ARGS = ("max_norm", "eps", "q", "cap", "alpha", "z_thresh", "clip_factor", "size", "percentile_mode",
               "mean_option", "skip_on_spike")  # csrc/common/rules.h, PolicyArgs
STEPS, COUNT, THRESHOLD, MEAN, VAR, DATA = range(6)  # the state layout (csrc/common/rules.h)


def policy_state_size(policy: int, size: int) -> int:
    return DATA + (2 * size if policy == 1 else size if policy == 2 else 0)


def check_policy_args(policy: int, a: dict) -> None:
    """The op's argument checks (csrc/cpu/clip_cpu.cpp, check_policy_state does the same)."""
    if policy in (1, 2) and not (a["size"] >= 1 and a["size"] == int(a["size"]) and a["size"] < 2**31):
        raise RuntimeError(f"gradclip_cuda: a clipping policy's buffer size must be a whole number >= 1, got "
                           f"{a['size']}")
    if policy == 1 and not 0 <= a["q"] <= 1:
        raise RuntimeError(f"gradclip_cuda: AutoClip's quantile must be in [0, 1], got {a['q']}")


def policy_step_torch(state: torch.Tensor, total: torch.Tensor, policy: int, args) -> torch.Tensor:
    """clip_policy_step_ with torch ops on small tensors (no host read): the rules of csrc/common/rules.h."""
    a = dict(zip(POLICY_ARGS, args))
    if len(args) != len(POLICY_ARGS) or policy not in (0, 1, 2):
        raise RuntimeError(f"gradclip_cuda: clip_policy_step_ takes policy 0, 1 or 2 and {len(POLICY_ARGS)} arguments")
    check_policy_args(policy, a)
    size = int(a["size"])
    if state.dtype != torch.float64 or state.dim() != 1 or state.numel() != policy_state_size(policy, size):
        raise RuntimeError("gradclip_cuda: a clipping policy's state is a contiguous float64 vector of "
                           f"{policy_state_size(policy, size)} values")
    g = total.detach().to(device=state.device, dtype=torch.float64).reshape(())
    state[STEPS].add_(1)
    if policy == 0:
        threshold = state[THRESHOLD].fill_(a["max_norm"])
    else:
        t = _autoclip_torch(state, g, a, size) if policy == 1 else _zclip_torch(state, g, a, size)
        state[THRESHOLD].copy_(torch.clamp(t, max=a["cap"]))
        threshold = state[THRESHOLD]
    acc = torch.float64 if total.dtype == torch.float64 else torch.float32
    thr = threshold.to(acc)
    coef = torch.clamp(torch.reciprocal(g.to(acc) + a["eps"]) * thr, max=1.0)
    return torch.where(torch.isposinf(thr), torch.ones_like(coef), coef)


def _autoclip_torch(state, g, a, size):
    ring, ordered = state[DATA:DATA + size], state[DATA + size:]
    finite = torch.isfinite(g)
    count = state[COUNT]
    pos = torch.remainder(count, size).to(torch.int64).reshape(1)
    ring.index_copy_(0, pos, torch.where(finite, g, ring.index_select(0, pos)))
    # NaN marks the unfilled slots: the sorted copy is the filled part, then NaN (torch.sort puts NaN last)
    unfilled = torch.arange(size, device=state.device) >= torch.clamp(count + finite.to(torch.float64), max=size)
    filled = ring.masked_fill(unfilled, math.nan)
    ordered.copy_(torch.sort(filled).values)
    count.add_(finite.to(torch.float64))
    value = torch.nanquantile(filled, a["q"])
    return torch.nan_to_num(value, nan=math.inf)  # an empty history (NaN): no clipping


def _zclip_torch(state, g, a, w):
    buffer = state[DATA:DATA + w]
    count, mean, var = state[COUNT], state[MEAN], state[VAR]
    alpha, zt = a["alpha"], a["z_thresh"]
    finite = torch.isfinite(g)
    warm = count < w
    std = torch.sqrt(var)
    if not a["percentile_mode"]:
        z = (g - mean) / (std + a["eps"])
        spike = z > zt
        spike_threshold = mean.clone() if a["mean_option"] else (mean + (zt * std) / (z / zt)) * a["clip_factor"]
    else:
        spike_threshold = mean + zt * std
        spike = g > spike_threshold
    spike = spike & ~warm
    threshold = torch.where(spike, spike_threshold, math.inf)
    value = torch.where(spike, spike_threshold, g)
    new_mean = alpha * mean + (1 - alpha) * value
    new_var = alpha * var + (1 - alpha) * (value - new_mean) * (value - new_mean)
    update = finite & ~warm
    if a["skip_on_spike"]:
        update = update & ~spike
    take = warm & finite
    slots = torch.arange(w, device=state.device)
    filled = torch.where((slots == count) & take, g, buffer)
    start = take & (count + 1 == w)
    first_mean = filled.sum() / w
    first_var = ((filled - first_mean) * (filled - first_mean)).sum() / w
    buffer.copy_(filled)
    mean_out = torch.where(start, first_mean, torch.where(update, new_mean, mean))
    var_out = torch.where(start, first_var, torch.where(update, new_var, var))
    mean.copy_(mean_out)
    var.copy_(var_out)
    count.add_(take.to(torch.float64))
    return threshold


for _name, _fn in (("multi_tensor_norm", norm_torch), ("multi_tensor_scale_", scale_torch_),
                   ("multi_tensor_mul_", mul_torch_), ("clip_grad_norm_", clip_torch_),
                   ("clip_grad_value_", value_torch_), ("adaptive_clip_grad_", agc_torch_),
                   ("clip_policy_step_", policy_step_torch)):
    _lib.impl(_name, _fn, "CompositeExplicitAutograd")


# ---- fake kernels (shapes and dtypes only), for torch.compile and opcheck ----

@torch.library.register_fake(f"{NAMESPACE}::multi_tensor_norm")
def _norm_fake(xs, p, per_tensor=False):
    dtype = result_dtype(xs)
    return xs[0].new_empty((), dtype=dtype), xs[0].new_empty((len(xs) if per_tensor else 0,), dtype=dtype)


@torch.library.register_fake(f"{NAMESPACE}::multi_tensor_scale_")
def _scale_fake(xs, total, max_norm, eps=1e-6):
    return None


@torch.library.register_fake(f"{NAMESPACE}::multi_tensor_mul_")
def _mul_fake(xs, coef):
    return None


@torch.library.register_fake(f"{NAMESPACE}::clip_grad_norm_")
def _clip_fake(xs, max_norm, p, eps=1e-6):
    return xs[0].new_empty((), dtype=result_dtype(xs))


@torch.library.register_fake(f"{NAMESPACE}::clip_grad_value_")
def _value_fake(xs, clip_value):
    return None


@torch.library.register_fake(f"{NAMESPACE}::adaptive_clip_grad_")
def _agc_fake(grads, params, clip_factor, eps, p, unit_axis=0):
    return None


@torch.library.register_fake(f"{NAMESPACE}::clip_policy_step_")
def _policy_fake(state, total, policy, args):
    return state.new_empty((), dtype=torch.float64 if total.dtype == torch.float64 else torch.float32)


FAKES = {"multi_tensor_norm": _norm_fake, "multi_tensor_scale_": _scale_fake, "multi_tensor_mul_": _mul_fake,
         "clip_grad_norm_": _clip_fake, "clip_grad_value_": _value_fake, "adaptive_clip_grad_": _agc_fake,
         "clip_policy_step_": _policy_fake}


# ---- the compiled library ----

DISABLE_ENV = "GRADCLIP_CUDA_DISABLE_EXT"


def _release(version: str) -> tuple[int, int]:
    major, minor = version.split("+")[0].split(".")[:2]
    return int(major), int(minor)


def _load():
    """Imports gradclip_cuda._C and registers its kernels, or says why not. Never raises."""
    if os.environ.get(DISABLE_ENV) == "1":
        return None, None, f"disabled by {DISABLE_ENV}=1"
    try:
        from gradclip_cuda import _C
    except ImportError as e:  # not built, or built against a torch whose symbols differ
        return None, None, f"gradclip_cuda._C could not be imported ({e})"
    info = _C.build_info()
    if _release(info["torch"]) != _release(torch.__version__):
        return None, info, (f"gradclip_cuda._C was built for torch {info['torch']} but torch {torch.__version__} "
                            "is running; rebuild with `pip install --no-build-isolation .`")
    if info["cuda"] is not None and torch.version.cuda is not None and \
            info["cuda"].split(".")[0] != torch.version.cuda.split(".")[0]:
        return None, info, (f"gradclip_cuda._C was built for CUDA {info['cuda']} but torch uses CUDA "
                            f"{torch.version.cuda}; rebuild it")
    _C.register_kernels()
    return _C, info, None


C, BUILD, WHY_NOT_COMPILED = _load()
if C is None and not WHY_NOT_COMPILED.startswith("disabled"):
    warnings.warn(f"{WHY_NOT_COMPILED}; gradclip_cuda falls back to its pure-PyTorch kernels", RuntimeWarning,
                  stacklevel=2)
