"""Stateful clipping policies (``GradClipper``) and clip statistics (``ClipStats``), with no host sync per step.

Both keep their state in device tensors and update it with a few torch ops on 0-d (or small) tensors: no
``.item()``, no Python branch on a device value, state updated in place, so a step can be captured in a CUDA graph
(after one eager call, which moves the state to the gradients' device). One norm pass reads the gradients, one
multiply (op multi_tensor_mul_, nothing written where the coefficient is 1) writes them.

Decisions (each also stated where it applies):

- Coefficient: ``clamp(threshold / (total + eps), max=1)``, torch's formula with the policy's threshold in place of
  ``max_norm``, in float32 (float64 for a float64 total), so a step clips as ``torch.nn.utils.clip_grad_norm_(params,
  threshold)`` does. A threshold of +inf means "no clipping this step": coefficient exactly 1, nothing written.
  (ZClip's own code scales only when ``total > threshold``; the two differ only for a total within ``eps`` below the
  threshold.)
- Non-finite totals (inf, NaN) never enter a policy's state: not the AutoClip history, not the ZClip warm-up buffer
  (they do not count as warm-up steps), not the ZClip EMA. The step still applies the coefficient its threshold
  gives, as ``clip_grad_norm_`` would (0 for an inf total under a finite threshold, NaN for a NaN one, 1 where the
  policy sets no threshold); ClipStats counts the step as non-finite. Skip such steps with a GradScaler, or
  ``skip_nonfinite=True`` of ``clip_grad_norm_``.
- "autoclip": the current (finite) total enters the ring buffer before the percentile, as in the original code; the
  percentile is numpy's default ("linear") over the filled part; an empty history (every total so far non-finite)
  means no clipping. ``max_norm`` is ignored; ``max_grad_norm``, when given, caps the threshold.
- "zclip": follows the published reference: ``max_grad_norm`` (default None here, 1.0 there) clips during warm-up
  and caps the threshold after it; ``clip_factor`` multiplies the whole adaptive threshold (as the reference code
  does); the EMA is updated with the adaptive threshold on a spike (before the ``max_grad_norm`` cap), else with the
  total, and the variance update uses the already-updated mean; ``skip_update_on_spike`` leaves the EMA untouched
  on a spike. ``max_norm`` is ignored.
- ``threshold`` of a step: the value the coefficient used: ``max_norm`` (fixed), the capped percentile (autoclip),
  the capped spike threshold or +inf (zclip; during warm-up ``max_grad_norm`` or +inf); NaN before the first step.
"""
from __future__ import annotations

import math

import torch

from . import _ops, api
from . import distributed as _dist

__all__ = ["ClipStats", "GradClipper", "POLICIES"]

POLICIES = ("fixed", "autoclip", "zclip")
_INF = math.inf


def _coefficient(total: torch.Tensor, threshold: torch.Tensor, eps: float) -> torch.Tensor:
    """``clamp(threshold / (total + eps), max=1)`` as torch evaluates it (float32, float64 for a float64 total;
    the threshold rounded to that dtype, as a Python max_norm is); exactly 1 where the threshold is +inf."""
    acc = torch.float64 if total.dtype == torch.float64 else torch.float32
    t = total.to(acc)
    thr = threshold.to(device=t.device, dtype=acc)
    coef = torch.clamp(torch.reciprocal(t + eps) * thr, max=1.0)
    return torch.where(torch.isposinf(thr), 1.0, coef)


def _in_range(name: str, value, low: float, high: float, *, low_open: bool, high_open: bool) -> float:
    v = api._number(name, value, allow_negative=True, what="a number")
    if (v < low or (low_open and v == low)) or (v > high or (high_open and v == high)):
        left, right = "(" if low_open else "[", ")" if high_open else "]"
        raise ValueError(f"{name} must be in {left}{low}, {high}{right}, got {value!r}")
    return v


def _count(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value


class ClipStats:
    """Clip statistics kept on the device: recorded with no host sync, read with one device-to-host copy.

    Pass it as ``stats=`` to ``gradclip_cuda.clip_grad_norm_`` or to a ``GradClipper``; each call records into it.
    Kept (device tensors, created on the first record's device, or on ``device``): the number of steps, of clipped
    steps (coefficient < 1) and of non-finite steps (total inf or NaN); the last total norm before clipping, the
    last coefficient applied, whether the last step clipped, and the last threshold (+inf: no clipping that step).
    With ``top_k > 0``: the ``top_k`` largest per-tensor norms of the last step and their parameter positions
    (shown under ``names[position]`` when ``names`` is given; a GradClipper called with named parameters or a
    module fills ``names`` in).

    ``fetch()`` reads everything at once; ``write_tensorboard(writer, step)`` logs it."""

    _COUNTERS = ("steps", "clipped_steps", "nonfinite_steps")
    _LAST = ("total_norm", "coef", "clipped", "threshold")

    def __init__(self, top_k: int = 0, names=None, device=None):
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
            raise ValueError(f"top_k must be an int >= 0, got {top_k!r}")
        self.top_k = top_k
        self.names = list(names) if names is not None else None
        self.device = torch.device(device) if device is not None else None
        self._state: dict | None = None
        self._positions: tuple | None = None  # (positions, their device tensor): reused while they stay the same

    def _make_state(self, device: torch.device) -> dict:
        long = dict(dtype=torch.int64, device=device)
        dbl = dict(dtype=torch.float64, device=device)
        state = {k: torch.zeros((), **long) for k in self._COUNTERS}
        state.update({k: torch.full((), math.nan, **dbl) for k in self._LAST})
        if self.top_k:
            state["top_norms"] = torch.full((self.top_k,), math.nan, **dbl)
            state["top_positions"] = torch.full((self.top_k,), -1, **long)
        return state

    def record(self, total, threshold, *, eps: float = 1e-6, coef=None, per_tensor=None, positions=None,
               clipped=None) -> None:
        """Records one step, on the device (no host sync).

        ``total``: the total norm before clipping (0-d tensor). ``threshold``: the threshold of the step (a number
        or a 0-d tensor; +inf for none). ``coef``: the coefficient applied; by default torch's
        ``clamp(threshold / (total + eps), max=1)`` (1 for an infinite threshold). ``clipped``: whether the step
        clipped; by default ``coef < 1``. ``per_tensor``: the per-tensor norms (for top-k), and ``positions``
        (host list) the parameter position of each (default: 0, 1, ...)."""
        device = self.device or total.device
        if self._state is None:
            self._state = self._make_state(device)
        s = self._state
        total = total.detach().to(device)
        if not isinstance(threshold, torch.Tensor):
            threshold = torch.full((), float(threshold), dtype=torch.float64, device=device)
        threshold = threshold.to(device)
        if coef is None:
            coef = _coefficient(total, threshold, eps)
        coef = torch.as_tensor(coef, device=device)
        clipped = coef < 1 if clipped is None else torch.as_tensor(clipped, device=device)
        s["steps"].add_(1)
        s["clipped_steps"].add_(clipped.to(torch.int64))
        s["nonfinite_steps"].add_((~torch.isfinite(total)).to(torch.int64))
        s["total_norm"].copy_(total)
        s["coef"].copy_(coef)
        s["clipped"].copy_(clipped)
        s["threshold"].copy_(threshold)
        if self.top_k:
            self._record_top(per_tensor, positions)

    def _record_top(self, per_tensor, positions) -> None:
        norms, where = self._state["top_norms"], self._state["top_positions"]
        norms.fill_(math.nan)
        where.fill_(-1)
        if per_tensor is None or per_tensor.numel() == 0:
            return  # unknown this step
        k = min(self.top_k, per_tensor.numel())
        values, index = torch.topk(per_tensor.detach().to(norms.device, torch.float64).reshape(-1), k)
        if positions is not None:
            if self._positions is None or self._positions[0] != tuple(positions):
                self._positions = (tuple(positions), torch.tensor(positions, dtype=torch.int64, device=norms.device))
            index = self._positions[1].index_select(0, index)
        norms[:k].copy_(values)
        where[:k].copy_(index)

    def fetch(self) -> dict:
        """The statistics as Python numbers, read with one device-to-host copy: ``steps``, ``clipped_steps``,
        ``nonfinite_steps``, ``clip_rate`` (clipped / steps; 0.0 before any step), ``total_norm``, ``coef``,
        ``threshold`` (floats; None before any step), ``clipped`` (bool; None before any step), and with top-k
        ``top``: a list of (name, or parameter position without names, norm), largest first."""
        if self._state is None:
            out = {k: 0 for k in self._COUNTERS}
            out.update({"clip_rate": 0.0, **{k: None for k in self._LAST}})
            if self.top_k:
                out["top"] = []
            return out
        s = self._state
        packed = torch.cat([torch.stack([s[k].to(torch.float64) for k in self._COUNTERS + self._LAST])]
                           + ([s["top_norms"], s["top_positions"].to(torch.float64)] if self.top_k else []))
        values = packed.cpu().tolist()  # the one copy
        n = len(self._COUNTERS) + len(self._LAST)
        out = {k: int(v) for k, v in zip(self._COUNTERS, values)}
        out.update(zip(self._LAST, values[len(self._COUNTERS):n]))
        out["clip_rate"] = out["clipped_steps"] / out["steps"] if out["steps"] else 0.0
        if out["steps"] == 0:
            out.update({k: None for k in self._LAST})
        else:
            out["clipped"] = bool(out["clipped"])
        if self.top_k:
            norms, where = values[n:n + self.top_k], values[n + self.top_k:]
            out["top"] = [(self._label(int(i)), v) for v, i in zip(norms, where) if i >= 0]
        return out

    def _label(self, position: int):
        if self.names is not None and position < len(self.names):
            return self.names[position]
        return position

    def write_tensorboard(self, writer, step: int, prefix: str = "grad_clip") -> dict:
        """Logs the statistics (one fetch) with ``writer.add_scalar(tag, value, step)`` (a
        ``torch.utils.tensorboard.SummaryWriter`` or anything with that method): ``{prefix}/total_norm``,
        ``coef``, ``clipped`` (0/1), ``clip_rate``, ``nonfinite_steps``, ``threshold``, and the top-k norms as
        ``{prefix}/top/{name}``. Nothing is logged before the first step. Returns the fetched dict."""
        data = self.fetch()
        if not data["steps"]:
            return data
        for key in ("total_norm", "coef", "clipped", "clip_rate", "nonfinite_steps", "threshold"):
            writer.add_scalar(f"{prefix}/{key}", float(data[key]), step)
        for name, norm in data.get("top", []):
            writer.add_scalar(f"{prefix}/top/{name}", norm, step)
        return data

    def reset(self) -> None:
        """Back to no steps recorded (in place: the tensors keep their storage)."""
        if self._state is not None:
            fresh = self._make_state(next(iter(self._state.values())).device)
            for k, v in self._state.items():
                v.copy_(fresh[k])

    def state_dict(self) -> dict:
        """The state tensors (copies); empty before the first record."""
        return {k: v.clone() for k, v in (self._state or {}).items()}

    def load_state_dict(self, state: dict) -> None:
        """Restores ``state_dict()``'s output (onto this object's device, or the saved tensors' one)."""
        if not state:
            self._state = None
            return
        device = self.device or next(iter(state.values())).device
        expected = self._make_state(device)
        if set(state) != set(expected):
            raise ValueError(f"ClipStats state has keys {sorted(state)}, expected {sorted(expected)} "
                             f"(top_k={self.top_k})")
        for k, v in expected.items():
            if state[k].shape != v.shape:
                raise ValueError(f"ClipStats state {k!r} has shape {tuple(state[k].shape)}, expected {tuple(v.shape)}")
            v.copy_(state[k])
        self._state = expected


class GradClipper:
    """Gradient clipping with a stateful threshold policy, after ``backward()``: ``total = clipper(parameters)``.

    ``parameters``: parameters, ``(name, parameter)`` pairs or a module; returns the total norm before clipping
    (0-d tensor, as ``clip_grad_norm_``). A step: one norm pass, the threshold and the coefficient from a few ops on
    small device tensors, one multiply (nothing written where the coefficient is 1). No host sync; the state
    (device tensors, moved to the gradients' device on the first call) is updated in place, so after one eager call
    a step can be captured in a CUDA graph. Calls with no gradient return ``tensor(0.)`` and leave the state alone.
    Plain (non-DTensor) gradients only.

    Coefficient: ``clamp(threshold / (total + eps), max=1)`` (torch's), exactly 1 when the threshold is +inf (no
    clipping). Non-finite totals never enter the state (see gradclip_cuda/policies.py).

    Policies:

    - ``"fixed"``: threshold ``max_norm``: the same as ``clip_grad_norm_(parameters, max_norm, norm_type)``.
    - ``"autoclip"`` (Seetharaman et al. 2020): the total enters a ring buffer of the last ``history`` finite totals
      (float64), then threshold = the ``percentile``-th percentile of the buffer (numpy's linear interpolation),
      capped at ``max_grad_norm`` when given. ``max_norm`` is ignored. Empty buffer: no clipping.
    - ``"zclip"`` (Kumar et al. 2025, ZClip): the first ``warmup_steps`` finite totals fill a buffer (clipped at
      ``max_grad_norm`` when given, else untouched); its mean and population variance start an EMA. After that,
      with ``std = sqrt(var)`` and ``z = (total - mean) / (std + eps)``: ``zclip_mode="zscore"`` flags a spike when
      ``z > z_thresh`` and clips to ``(mean + z_thresh * std / (z / z_thresh)) * clip_factor``
      (``clip_option="adaptive_scaling"``) or to ``mean`` (``"mean"``); ``zclip_mode="percentile"`` flags a spike
      when ``total > mean + z_thresh * std`` and clips to that. The threshold is capped at ``max_grad_norm`` when
      given. Then, unless ``skip_update_on_spike`` and a spike, the EMA takes the spike threshold (spike) or the
      total: ``mean = alpha * mean + (1 - alpha) * value``, then ``var = alpha * var + (1 - alpha) *
      (value - mean) ** 2`` with the new mean. ``max_norm`` is ignored.

    ``stats``: a ClipStats recording every call (threshold, coefficient, total, top-k per-tensor norms).
    ``threshold``: the last step's threshold (device tensor). ``state_dict()`` / ``load_state_dict()``: the state
    tensors; a restored clipper continues exactly as the saved one would have."""

    def __init__(self, policy: str = "fixed", max_norm: float = 1.0, norm_type: float = 2.0, *, eps: float = 1e-6,
                 percentile: float = 10.0, history: int = 1000, alpha: float = 0.97, z_thresh: float = 2.5,
                 warmup_steps: int = 25, zclip_mode: str = "zscore", clip_option: str = "adaptive_scaling",
                 clip_factor: float = 1.0, max_grad_norm=None, skip_update_on_spike: bool = False,
                 stats: ClipStats | None = None, foreach=None, backend: str = "auto"):
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        if zclip_mode not in ("zscore", "percentile"):
            raise ValueError(f"zclip_mode must be 'zscore' or 'percentile', got {zclip_mode!r}")
        if clip_option not in ("adaptive_scaling", "mean"):
            raise ValueError(f"clip_option must be 'adaptive_scaling' or 'mean', got {clip_option!r}")
        if stats is not None and not isinstance(stats, ClipStats):
            raise TypeError(f"stats must be a gradclip_cuda.ClipStats, got {type(stats).__name__}")
        api._check_backend(backend)
        self.policy = policy
        self.max_norm = api._max_norm(max_norm)
        self.norm_type = api._norm_type(norm_type)
        self.eps = api._eps(eps)
        self.percentile = _in_range("percentile", percentile, 0.0, 100.0, low_open=False, high_open=False)
        self.history = _count("history", history)
        self.alpha = _in_range("alpha", alpha, 0.0, 1.0, low_open=True, high_open=True)
        self.z_thresh = _in_range("z_thresh", z_thresh, 0.0, _INF, low_open=True, high_open=True)
        self.warmup_steps = _count("warmup_steps", warmup_steps)
        self.zclip_mode = zclip_mode
        self.clip_option = clip_option
        self.clip_factor = api._number("clip_factor", clip_factor, allow_negative=False, what="a non-negative number")
        self.max_grad_norm = None if max_grad_norm is None else api._number(
            "max_grad_norm", max_grad_norm, allow_negative=False, what="a non-negative number or None")
        self.skip_update_on_spike = bool(skip_update_on_spike)
        self.stats = stats
        self.foreach = foreach
        self.backend = backend
        self._op_args = self._args()
        self._state = self._initial_state(torch.device("cpu"))

    # ---- state ----

    _POLICY = {"fixed": 0, "autoclip": 1, "zclip": 2}  # the op's policy codes (csrc/common/rules.h)

    def _size(self) -> int:
        return {"fixed": 0, "autoclip": self.history, "zclip": self.warmup_steps}[self.policy]

    def _args(self) -> list:
        """The op's arguments (gradclip_cuda/_ops.py, POLICY_ARGS)."""
        cap = math.inf if self.max_grad_norm is None else self.max_grad_norm
        return [self.max_norm, self.eps, self.percentile / 100, cap, self.alpha, self.z_thresh, self.clip_factor,
                float(self._size()), float(self.zclip_mode == "percentile"), float(self.clip_option == "mean"),
                float(self.skip_update_on_spike)]

    def _initial_state(self, device: torch.device) -> dict:
        """The flat float64 state the op advances (layout: csrc/common/rules.h) and, by name, views of it."""
        code = self._POLICY[self.policy]
        flat = torch.zeros(_ops.policy_state_size(code, self._size()), dtype=torch.float64, device=device)
        flat[_ops.THRESHOLD] = self.max_norm if self.policy == "fixed" else math.nan
        if self.policy == "autoclip":
            flat[_ops.DATA:] = math.nan  # unfilled history
        self._flat = flat
        views = {"step": flat[_ops.STEPS], "threshold": flat[_ops.THRESHOLD]}
        if self.policy == "autoclip":
            views.update(count=flat[_ops.COUNT], history=flat[_ops.DATA:_ops.DATA + self.history],
                         sorted=flat[_ops.DATA + self.history:])
        elif self.policy == "zclip":
            views.update(count=flat[_ops.COUNT], buffer=flat[_ops.DATA:], mean=flat[_ops.MEAN], var=flat[_ops.VAR])
        return views

    def _to(self, device: torch.device) -> None:
        if self._flat.device != device:
            flat = self._flat.to(device)
            self._state = self._initial_state(device)
            self._flat.copy_(flat)

    @property
    def threshold(self) -> torch.Tensor:
        """The threshold of the last step (float64 device tensor; +inf: no clipping; NaN before the first step,
        except ``max_norm`` for "fixed")."""
        return self._state["threshold"]

    def state_dict(self) -> dict:
        """The policy's state: a dict of tensor copies (step count included)."""
        return {k: v.clone() for k, v in self._state.items()}

    def load_state_dict(self, state: dict) -> None:
        """Restores ``state_dict()``'s output into this clipper's state tensors (same policy, ``history`` and
        ``warmup_steps`` needed)."""
        if set(state) != set(self._state):
            raise ValueError(f"state has keys {sorted(state)}, but a {self.policy!r} clipper keeps "
                             f"{sorted(self._state)}")
        for k, v in self._state.items():
            if state[k].shape != v.shape:
                raise ValueError(f"state {k!r} has shape {tuple(state[k].shape)}, expected {tuple(v.shape)} "
                                 "(history and warmup_steps must match the saved clipper's)")
            v.copy_(state[k])

    # ---- a step ----

    def __call__(self, parameters) -> torch.Tensor:
        """Clips the gradients of ``parameters`` (parameters, (name, parameter) pairs or a module) in place by this
        step's threshold; returns the total norm before clipping."""
        names, params = api._named(parameters)
        if names is not None and self.stats is not None and self.stats.names is None:
            self.stats.names = names
        with torch.no_grad():
            grads = [q.grad for q in params if q.grad is not None]
            if not grads:
                return torch.tensor(0.0)
            if _dist.has_dtensor(grads):
                raise ValueError("GradClipper takes plain gradients; for DTensor gradients use "
                                 "gradclip_cuda.clip_grad_norm_")
            groups = api._groups(grads, self.foreach, self.backend, writes=True)
            top = self.stats is not None and self.stats.top_k
            total, each = api.total_and_each(groups, grads, self.norm_type) if top else (
                api._total(groups, self.norm_type), None)
            self._to(total.device)
            step = _ops.policy_step_torch if self.backend == "torch" else _ops.ops.clip_policy_step_
            coef = step(self._flat, total.detach(), self._POLICY[self.policy], self._op_args)
            threshold = self._state["threshold"]
            api.multiply_(groups, coef)
            if self.stats is not None:
                self.stats.record(total, threshold, eps=self.eps, coef=coef, per_tensor=each,
                                  positions=[i for i, q in enumerate(params) if q.grad is not None])
            return total
