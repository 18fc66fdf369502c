"""Mixed precision and the optimizer step: ``clip_grad_norm_(..., scaler=, optimizer=, defer=, skip_nonfinite=)``.

Three recipes (README: "AMP and optimizers"):

- ``scaler=scaler, optimizer=opt``: for a ``torch.amp.GradScaler`` that scaled this step's loss. One read pass
  computes the norm of the *scaled* gradients (non-finite iff a gradient is, or the scaled sum overflows); the
  coefficient ``min(1, max_norm / (total / scale + 1e-6)) / scale`` is computed on the device; one multiply applies
  unscale and clip together. The scaler's state for ``opt`` is left as ``scaler.unscale_(opt)`` leaves it (stage
  unscaled, ``found_inf`` per device), so ``scaler.step(opt)`` and ``scaler.update()`` work unchanged, skip an
  overflowed step and back the scale off as they do after torch's ``unscale_`` + ``clip_grad_norm_``.
- ``defer=True`` (``opt`` built with ``fused=True``: Adam, AdamW, SGD): nothing is written. The combined
  coefficient goes to the optimizer as its ``grad_scale`` (the reciprocal: the fused kernels divide by it) and the
  non-finite flag as its ``found_inf``, for the next ``step()``, which divides the gradients in its kernel (and
  stores the divided gradients back: after the step ``.grad`` holds the clipped, unscaled gradient; after a skipped
  step it holds the gradient as it was). With a scaler, ``scaler.step(opt)`` passes both on (the scale folded into
  ``grad_scale``); without one, ``opt.step()`` reads them and a step post-hook removes them. With an optimizer that
  is not fused, ``defer=True`` warns once and takes the write pass.
- ``skip_nonfinite=True``: a non-finite total skips the optimizer step through ``found_inf`` (no host sync) instead of
  scaling every gradient by NaN; it needs a fused optimizer, or a scaler (whose ``step`` skips as usual).

No host sync anywhere (``error_if_nonfinite=True`` keeps its one, as in torch). Errors (before any gradient changes):
``scaler`` without ``optimizer``; ``defer`` or ``skip_nonfinite`` without ``optimizer``; parameters the optimizer
does not own; with a scaler, gradients of the optimizer that are not among ``parameters`` (the scaler would then
leave them scaled); a scaler that did not scale this step's loss, or whose ``unscale_``/``step`` already ran for
``opt``; fp16 gradients with a scaler (torch's ``unscale_`` refuses them too); ``skip_nonfinite`` with neither a
scaler nor a fused optimizer.
"""
from __future__ import annotations

import warnings

import torch
from torch.amp.grad_scaler import OptState


_ATTRS = ("grad_scale", "found_inf")
_warned_defer = []


def _owned(optimizer) -> dict:
    return {id(p): p for group in optimizer.param_groups for p in group["params"]}


def _fused(optimizer) -> bool:
    return getattr(optimizer, "_step_supports_amp_scaling", False) and all(
        g.get("fused") for g in optimizer.param_groups)


def check(params, scaler, optimizer, defer, skip_nonfinite) -> bool:
    """Validates the combination; returns whether the hand-off to the optimizer applies (else the write pass)."""
    if optimizer is None:
        if scaler is not None:
            raise ValueError("scaler= needs optimizer=: a GradScaler keeps its state per optimizer")
        if defer or skip_nonfinite:
            raise ValueError("defer=True and skip_nonfinite=True need optimizer=: the optimizer's step is what "
                             "applies the coefficient or is skipped")
        return False
    owned = _owned(optimizer)
    stray = [i for i, p in enumerate(params) if id(p) not in owned]
    if stray:
        raise ValueError(f"parameters {stray[:5]} are not among the optimizer's parameters")
    enabled = scaler is not None and scaler.is_enabled()
    if enabled:
        listed = {id(p) for p in params}
        missing = [p for p in owned.values() if p.grad is not None and id(p) not in listed]
        if missing:
            raise ValueError(f"{len(missing)} gradients of the optimizer are not among the parameters: the scaler "
                             "unscales every gradient of its optimizer, so pass them all")
        scaler._check_scale_growth_tracker("unscale_")
        stage = scaler._per_optimizer_states[id(optimizer)]["stage"]
        if stage is OptState.UNSCALED:
            raise RuntimeError("unscale_() has already been called on this optimizer since the last update().")
        if stage is OptState.STEPPED:
            raise RuntimeError("unscale_() is being called after step().")
        if any(p.grad is not None and p.grad.dtype == torch.float16 for p in params):
            raise ValueError("Attempting to unscale FP16 gradients.")
    fused = _fused(optimizer)
    if skip_nonfinite and not (enabled or fused):
        raise ValueError("skip_nonfinite=True skips the step through the optimizer's found_inf, which only fused "
                         "torch optimizers (fused=True) read; pass such an optimizer, or a GradScaler")
    if defer and not fused:
        if not _warned_defer:
            _warned_defer.append(True)
            warnings.warn("defer=True hands the clip to a fused torch optimizer (Adam, AdamW or SGD with "
                          "fused=True); this optimizer is not one, so the gradients are scaled in place instead",
                          stacklevel=4)
        return False
    return defer


def coefficient(total, max_norm: float, scaler, eps: float = 1e-6):
    """(unscaled total, combined coefficient as a float32 0-d tensor on the total's device, non-finite flag as a
    float32 0-d tensor): torch's clip coefficient of the unscaled total, times 1 / scale with a scaler."""
    acc = total.to(torch.float64 if total.dtype == torch.float64 else torch.float32)
    nonfinite = (~torch.isfinite(acc)).to(torch.float32)
    if scaler is not None and scaler.is_enabled():
        inv = scaler._scale.double().reciprocal().float().to(acc.device)  # as torch's unscale_ computes it
        unscaled = acc * inv
    else:
        inv, unscaled = None, acc
    clip = torch.clamp(torch.reciprocal(unscaled + eps) * max_norm, max=1.0)
    combined = (clip * inv if inv is not None else clip).to(torch.float32)
    return unscaled.to(total.dtype), combined, nonfinite


def apply(params, grads, total, max_norm, scaler, optimizer, hand_off: bool, skip_nonfinite: bool,
          multiply=None, eps: float = 1e-6):
    """Applies the combined coefficient (in place with ``multiply(grads, coef)``, or handed to the optimizer) and
    records what the scaler and the optimizer need. Returns the unscaled total."""
    unscaled, combined, nonfinite = coefficient(total, max_norm, scaler, eps)
    enabled = scaler is not None and scaler.is_enabled()
    devices = list(dict.fromkeys(g.device for g in grads))
    if enabled:
        state = scaler._per_optimizer_states[id(optimizer)]
        state["found_inf_per_device"] = {d: nonfinite.to(d) for d in devices}
        state["stage"] = OptState.UNSCALED
    if hand_off:
        device = grads[0].device if grads else combined.device
        optimizer.grad_scale = torch.reciprocal(combined).to(device)  # the fused kernels divide by it
        if not enabled:  # with a scaler, scaler.step() sets found_inf from its state and removes both
            if skip_nonfinite:
                optimizer.found_inf = nonfinite.to(device)
            _clear_after_step(optimizer)
        return unscaled
    multiply(grads, combined)
    if skip_nonfinite and not enabled:
        optimizer.found_inf = nonfinite.to(grads[0].device)
        _clear_after_step(optimizer)
    return unscaled


def _clear_after_step(optimizer) -> None:
    """Removes grad_scale / found_inf after the optimizer's next step (once)."""
    def hook(opt, args, kwargs):
        for name in _ATTRS:
            if hasattr(opt, name):
                delattr(opt, name)
        handle.remove()
    handle = optimizer.register_step_post_hook(hook)
