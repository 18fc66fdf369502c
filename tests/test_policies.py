"""GradClipper (fixed, AutoClip, ZClip) and ClipStats against float64 references written here, step by step.

The references follow the published algorithms as plain Python on host floats (the total read with ``.item()``, as
the published code does), plus the library's documented decision for non-finite totals (they never enter the
state; gradclip_cuda/policies.py). They are replayed on the totals the clipper reports, for gradients built to have
chosen total norms: steady values, spikes, warm-up, inf and NaN totals."""
import io
import math

import numpy as np
import pytest
import torch

import gradclip_cuda as gc

EPS = 1e-6
INF, NAN = math.inf, math.nan
# Tolerance of a gradient times a coefficient, rounded to its dtype, against the float64 product.
GRAD_RTOL = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
GRAD_ATOL = {torch.float16: 6e-8}  # below 6.1e-5, float16 is subnormal: steps of 6e-8
MIXED = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


# ---- references (host floats) ----

class FixedRef:
    def __init__(self, max_norm):
        self.max_norm = max_norm

    def step(self, total):
        return self.max_norm


class AutoClipRef:
    """Seetharaman et al. 2020: append the total to the history, clip to np.percentile(history, p)."""

    def __init__(self, percentile, history, max_grad_norm=None):
        self.p, self.size, self.cap, self.hist = percentile, history, max_grad_norm, []

    def step(self, total):
        if math.isfinite(total):
            self.hist = (self.hist + [total])[-self.size:]
        threshold = float(np.percentile(self.hist, self.p)) if self.hist else INF
        return threshold if self.cap is None else min(threshold, self.cap)


class ZClipRef:
    """The published ZClip step (warm-up buffer, EMA mean/variance, z-score or percentile spikes)."""

    def __init__(self, alpha=0.97, z_thresh=2.5, max_grad_norm=None, eps=EPS, warmup_steps=25, mode="zscore",
                 clip_option="adaptive_scaling", clip_factor=1.0, skip_update_on_spike=False):
        self.alpha, self.z_thresh, self.cap, self.eps = alpha, z_thresh, max_grad_norm, eps
        self.warmup_steps, self.mode, self.clip_option = warmup_steps, mode, clip_option
        self.clip_factor, self.skip = clip_factor, skip_update_on_spike
        self.buffer, self.initialized, self.mean, self.var = [], False, None, None

    def _clip_value(self, g):
        std = self.var ** 0.5
        if self.mode == "percentile":
            threshold = self.mean + self.z_thresh * std
            return threshold if g > threshold else None
        z = (g - self.mean) / (std + self.eps)
        if z > self.z_thresh:
            if self.clip_option == "mean":
                return self.mean
            return (self.mean + (self.z_thresh * std) / (z / self.z_thresh)) * self.clip_factor
        return None

    def step(self, g):
        """The step's threshold (+inf: no clipping)."""
        if not self.initialized:
            if math.isfinite(g):  # decision: non-finite totals stay out of the state
                self.buffer.append(g)
                if len(self.buffer) >= self.warmup_steps:
                    self.mean = sum(self.buffer) / len(self.buffer)
                    self.var = sum((x - self.mean) ** 2 for x in self.buffer) / len(self.buffer)
                    self.initialized, self.buffer = True, []
            return INF if self.cap is None else self.cap
        clip = self._clip_value(g)
        threshold = INF if clip is None else clip
        if self.cap is not None:
            threshold = min(threshold, self.cap)
        if math.isfinite(g) and not (clip is not None and self.skip):
            value = clip if clip is not None else g
            self.mean = self.alpha * self.mean + (1 - self.alpha) * value
            self.var = self.alpha * self.var + (1 - self.alpha) * (value - self.mean) ** 2
        return threshold


def ref_coef(total, threshold, eps=EPS):
    if threshold == INF:
        return 1.0
    if math.isnan(total):
        return NAN
    return min(threshold / (total + eps), 1.0)


# ---- gradients with chosen total norms ----

def make_params(dtypes, per_dtype=2, numel=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(numel, generator=g).to(dt)) for _ in range(per_dtype) for dt in dtypes]


def set_grads(params, target, seed):
    """Random gradients with total 2-norm ``target`` (one inf or NaN element for a non-finite target)."""
    g = torch.Generator().manual_seed(seed)
    raw = [torch.randn(q.shape, generator=g, dtype=torch.float64) for q in params]
    scale = (1.0 if not math.isfinite(target) else target) / math.sqrt(sum(float(r.square().sum()) for r in raw))
    for q, r in zip(params, raw):
        q.grad = (r * scale).to(q.dtype)
    if not math.isfinite(target):
        params[len(params) // 2].grad[0] = target


def sequence(n, spikes=(), nonfinite=(), seed=0):
    rng = np.random.default_rng(seed)
    totals = list(np.exp(rng.normal(0.0, 0.15, n)))
    for i in spikes:
        totals[i] *= 12.0
    for i, v in nonfinite:
        totals[i] = v
    return totals


def close(a, b, rtol):
    if math.isnan(b) or math.isinf(b):
        return (math.isnan(a) and math.isnan(b)) or a == b
    return abs(a - b) <= rtol * abs(b)


def replay(clipper, ref, params, totals, *, stats=None, against_torch=True, seed=0):
    """Runs both on ``totals`` and checks each step: the total, the threshold (1e-12), the coefficient, and the
    clipped gradients (vs the float64 product, and vs torch's clip_grad_norm_ with the reference threshold)."""
    stats = stats if stats is not None else clipper.stats
    coef_rtol = 1e-12 if all(q.dtype == torch.float64 for q in params) else 1e-6
    # torch rounds each tensor's norm to the tensor's dtype before the total: its coefficient is that precise
    torch_rtol = max(GRAD_RTOL[q.dtype] for q in params)
    thresholds = []
    for step, target in enumerate(totals):
        set_grads(params, target, seed + step)
        before = [q.grad.clone() for q in params]
        total = clipper(params)
        t = total.item()
        if math.isfinite(target):
            assert close(t, target, 1e-12 if coef_rtol == 1e-12 else 5e-3)
        threshold = ref.step(t)
        thresholds.append(threshold)
        assert close(clipper.threshold.item(), threshold, 1e-12), (step, clipper.threshold.item(), threshold)
        coef = ref_coef(t, threshold, clipper.eps)
        if stats is not None:
            got = stats.fetch()
            assert close(got["coef"], coef, coef_rtol), (step, got["coef"], coef)
            assert got["threshold"] == clipper.threshold.item() or (math.isnan(threshold))
        for q, b in zip(params, before):
            expected = b.double() * coef
            torch.testing.assert_close(q.grad.double(), expected, rtol=GRAD_RTOL[q.dtype],
                                       atol=GRAD_ATOL.get(q.dtype, 0), equal_nan=True)
        if against_torch and (math.isfinite(t) or threshold != INF):  # inf/inf: torch's NaN; here: no clipping
            copies = [torch.nn.Parameter(b.clone()) for b in before]
            for c, b in zip(copies, before):
                c.grad = b.clone()
            torch.nn.utils.clip_grad_norm_(copies, threshold)
            for q, c in zip(params, copies):
                torch.testing.assert_close(q.grad, c.grad, rtol=torch_rtol, atol=GRAD_ATOL.get(q.dtype, 0),
                                           equal_nan=True)
    return thresholds


ZCLIP_CASES = [
    dict(),
    dict(clip_option="mean"),
    dict(mode="percentile"),
    dict(clip_factor=0.8, skip_update_on_spike=True),
    dict(max_grad_norm=1.1),
    dict(mode="percentile", skip_update_on_spike=True, max_grad_norm=3.0),
]


def zclip_kwargs(case, warmup=6):
    kw = dict(case)
    mode = kw.pop("mode", "zscore")
    return dict(warmup_steps=warmup, zclip_mode=mode, **kw), dict(warmup_steps=warmup, mode=mode, **kw)


ZCLIP_TOTALS = sequence(40, spikes=(9, 10, 21, 33), nonfinite=((2, INF), (4, NAN), (14, INF), (15, NAN), (27, INF)))


# ---- the policies against their references ----

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fixed_is_clip_grad_norm(dtype):
    params = make_params([dtype])
    clipper = gc.GradClipper("fixed", max_norm=1.05, stats=gc.ClipStats())
    replay(clipper, FixedRef(1.05), params, sequence(8, spikes=(3,), nonfinite=((5, INF), (6, NAN))))
    # and the same gradients as gradclip_cuda.clip_grad_norm_
    other = make_params([dtype])
    for step, target in enumerate(sequence(4, spikes=(1,))):
        set_grads(params, target, step)
        set_grads(other, target, step)
        clipper(params)
        gc.clip_grad_norm_(other, 1.05)
        for a, b in zip(params, other):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-7 if dtype == torch.float32 else 1e-15, atol=0)


# "auto": the compiled policy step (csrc/common/rules.h) where the library is built; "torch": the same rules in
# torch ops (gradclip_cuda/_ops.py, policy_step_torch).
STEP_BACKENDS = ["auto", "torch"]


@pytest.mark.parametrize("backend", STEP_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("percentile,history,cap", [(10.0, 1000, None), (50.0, 7, None), (90.0, 5, 1.2),
                                                    (0.0, 3, None), (100.0, 4, None)])
def test_autoclip(dtype, percentile, history, cap, backend):
    params = make_params([dtype])
    clipper = gc.GradClipper("autoclip", percentile=percentile, history=history, max_grad_norm=cap,
                             stats=gc.ClipStats(), backend=backend)
    totals = sequence(24, spikes=(5, 17), nonfinite=((0, NAN), (1, INF), (11, INF), (12, NAN)))
    replay(clipper, AutoClipRef(percentile, history, cap), params, totals)


@pytest.mark.parametrize("backend", STEP_BACKENDS)
@pytest.mark.parametrize("percentile", [0.0, 10.0, 37.5, 50.0, 90.0, 99.9, 100.0])
def test_autoclip_percentile_is_numpys_over_the_ring(percentile, backend):
    """History shorter than the run: the ring wraps several times; numpy.percentile over the last 7 totals."""
    params = make_params([torch.float64], per_dtype=1, numel=5)
    clipper = gc.GradClipper("autoclip", percentile=percentile, history=7, backend=backend)
    seen = []
    for step, target in enumerate(sequence(30, spikes=(4, 12, 13))):
        set_grads(params, target, step)
        seen.append(clipper(params).item())
        assert clipper.threshold.item() == float(np.percentile(seen[-7:], percentile))


@pytest.mark.parametrize("backend", STEP_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", ZCLIP_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()) or "default")
def test_zclip(dtype, case, backend):
    ours, theirs = zclip_kwargs(case)
    params = make_params([dtype])
    clipper = gc.GradClipper("zclip", stats=gc.ClipStats(), backend=backend, **ours)
    thresholds = replay(clipper, ZClipRef(**theirs), params, ZCLIP_TOTALS)
    assert any(math.isfinite(t) and t < 3 for t in thresholds[8:])  # spikes were clipped after warm-up


def test_zclip_warmup_skips_nonfinite_totals():
    """Warm-up ends after warmup_steps finite totals: the inf and NaN ones do not count."""
    params = make_params([torch.float64])
    clipper = gc.GradClipper("zclip", warmup_steps=3, max_grad_norm=0.5)
    for step, target in enumerate([1.0, INF, 1.1, NAN, 0.9]):
        set_grads(params, target, step)
        clipper(params)
        assert clipper.threshold.item() == 0.5  # warm-up: clipped to max_grad_norm only
    state = clipper.state_dict()
    assert state["count"].item() == 3
    torch.testing.assert_close(state["mean"], torch.tensor(1.0, dtype=torch.float64), rtol=1e-12, atol=0)
    torch.testing.assert_close(state["var"], torch.tensor(((0.0 + 0.01 + 0.01) / 3), dtype=torch.float64),
                               rtol=1e-9, atol=0)


@pytest.mark.parametrize("policy", gc.POLICIES)
def test_mixed_dtypes(policy):
    params = make_params(MIXED, per_dtype=2, numel=9)
    kw, ref = {"fixed": ({}, FixedRef(1.0)),
               "autoclip": (dict(history=6), AutoClipRef(10.0, 6)),
               "zclip": (zclip_kwargs({}, warmup=5)[0], ZClipRef(**zclip_kwargs({}, warmup=5)[1]))}[policy]
    clipper = gc.GradClipper(policy, stats=gc.ClipStats(top_k=3), **kw)
    replay(clipper, ref, params, sequence(14, spikes=(8, 11), nonfinite=((3, INF), (9, NAN))))


@pytest.mark.parametrize("policy", gc.POLICIES)
def test_many_tensors(policy):
    params = make_params(MIXED, per_dtype=525, numel=3)  # 2,100 tensors
    assert len(params) == 2100
    kw, ref = {"fixed": ({}, FixedRef(1.0)),
               "autoclip": (dict(percentile=50.0, history=4), AutoClipRef(50.0, 4)),
               "zclip": (zclip_kwargs({}, warmup=3)[0], ZClipRef(**zclip_kwargs({}, warmup=3)[1]))}[policy]
    clipper = gc.GradClipper(policy, stats=gc.ClipStats(top_k=5), **kw)
    replay(clipper, ref, params, sequence(7, spikes=(5,), nonfinite=((4, INF),)), against_torch=False)


# ---- checkpoints ----

def same(a, b):
    """Bitwise equal (NaN where NaN)."""
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("policy,kw", [("fixed", {}), ("autoclip", dict(history=5, percentile=30.0)),
                                       ("zclip", dict(warmup_steps=4)),
                                       ("zclip", dict(warmup_steps=4, zclip_mode="percentile", max_grad_norm=2.0))])
@pytest.mark.parametrize("cut", [2, 9])  # inside and after the warm-up / before and after the ring wraps
def test_checkpoint_round_trip(policy, kw, cut):
    totals = sequence(16, spikes=(6, 12), nonfinite=((3, INF), (10, NAN)))
    params, other = make_params([torch.float32]), make_params([torch.float32])
    stats = gc.ClipStats(top_k=2)
    whole = gc.GradClipper(policy, stats=stats, **kw)
    first = gc.GradClipper(policy, **kw)
    for step, target in enumerate(totals[:cut]):
        set_grads(params, target, step)
        set_grads(other, target, step)
        whole(params)
        first(other)
    buffer = io.BytesIO()
    torch.save({"clipper": first.state_dict(), "stats": stats.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    resumed = gc.GradClipper(policy, stats=gc.ClipStats(top_k=2), **kw)
    resumed.load_state_dict(saved["clipper"])
    resumed.stats.load_state_dict(saved["stats"])
    for step, target in enumerate(totals[cut:], cut):
        set_grads(params, target, step)
        set_grads(other, target, step)
        same(whole(params), resumed(other))
        same(whole.threshold, resumed.threshold)
        same(whole.stats.state_dict(), resumed.stats.state_dict())
        for x, y in zip(params, other):
            same(x.grad, y.grad)
    same(whole.state_dict(), resumed.state_dict())


def test_load_state_dict_refuses_another_shape():
    saved = gc.GradClipper("autoclip", history=5).state_dict()
    with pytest.raises(ValueError, match="shape"):
        gc.GradClipper("autoclip", history=6).load_state_dict(saved)
    with pytest.raises(ValueError, match="keys"):
        gc.GradClipper("zclip").load_state_dict(saved)


# ---- no host sync ----

def _forbid_host_reads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("host read of a tensor on the step path")
    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, refuse)


@pytest.mark.parametrize("policy", gc.POLICIES)
def test_no_host_sync(policy, monkeypatch):
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2)).double()
    stats = gc.ClipStats(top_k=2)
    clipper = gc.GradClipper(policy, warmup_steps=2, history=3, max_grad_norm=5.0 if policy != "fixed" else None,
                             stats=stats)
    params = list(model.parameters())
    for step, target in enumerate([1.0, 1.1, INF, 0.9, 30.0, NAN, 1.0]):
        set_grads(params, target, step)
        with monkeypatch.context() as m:
            _forbid_host_reads(m)
            clipper(model)
            stats.record(torch.tensor(2.0), 1.0, per_tensor=torch.tensor([1.0, 3.0, 2.0]), positions=[0, 2, 3])
            stats.record(torch.tensor(2.0), clipper.threshold)
    assert stats.fetch()["steps"] == 21


def test_clip_grad_norm_with_stats_has_no_host_sync(monkeypatch):
    params = make_params([torch.float32, torch.float64])
    stats = gc.ClipStats(top_k=3)
    set_grads(params, 4.0, 0)
    with monkeypatch.context() as m:
        _forbid_host_reads(m)
        gc.clip_grad_norm_(params, 1.0, stats=stats)
    assert stats.fetch()["clipped"] is True


def test_fetch_copies_once(monkeypatch):
    stats = gc.ClipStats(top_k=2, names=["a", "b", "c"])
    stats.record(torch.tensor(3.0), 1.0, per_tensor=torch.tensor([1.0, 2.0, 2.5]))
    calls = []
    cpu = torch.Tensor.cpu

    def counted(self, *args, **kwargs):
        calls.append(self.shape)
        return cpu(self, *args, **kwargs)

    def refuse(*args, **kwargs):
        raise AssertionError("a second read")
    monkeypatch.setattr(torch.Tensor, "cpu", counted)
    for name in ("item", "__float__", "__int__", "__bool__", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    got = stats.fetch()
    assert len(calls) == 1
    assert got["top"] == [("c", 2.5), ("b", 2.0)]


# ---- ClipStats ----

def _per_tensor(params):
    return [(i, float(torch.linalg.vector_norm(q.grad.double()))) for i, q in enumerate(params) if q.grad is not None]


def test_stats_with_clip_grad_norm():
    params = make_params([torch.float32, torch.float64], per_dtype=3)
    names = [f"p{i}" for i in range(len(params))]
    stats = gc.ClipStats(top_k=3, names=names)
    totals = [0.5, 2.0, INF, 0.7, NAN, 3.0]
    for step, target in enumerate(totals):
        set_grads(params, target, step)
        params[1].grad = None  # positions skip it
        norms = _per_tensor(params)
        total = gc.clip_grad_norm_(params, 1.0, stats=stats)
        got = stats.fetch()
        assert got["steps"] == step + 1
        assert close(got["total_norm"], total.item(), 0)
        assert got["threshold"] == 1.0
        if math.isfinite(target):
            top = sorted(norms, key=lambda x: -x[1])[:3]
            assert [n for n, _ in got["top"]] == [names[i] for i, _ in top]
            for (_, v), (_, r) in zip(got["top"], top):
                assert close(v, r, 1e-6)
    got = stats.fetch()
    clipped = sum(1 for t in totals if math.isfinite(t) and t > 1.0) + 1  # inf: coefficient 0
    assert (got["clipped_steps"], got["nonfinite_steps"]) == (clipped, 2)
    assert got["clip_rate"] == clipped / len(totals)
    assert got["clipped"] is True and close(got["coef"], 1.0 / (total.item() + EPS), 1e-6)


def test_stats_with_clipper_names_and_top_k():
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.ReLU(), torch.nn.Linear(4, 3))
    stats = gc.ClipStats(top_k=2)
    clipper = gc.GradClipper("zclip", warmup_steps=3, stats=stats)
    params = list(model.parameters())
    names = [n for n, _ in model.named_parameters()]
    ref = ZClipRef(warmup_steps=3)
    clipped = nonfinite = 0
    for step, target in enumerate([1.0, 1.1, 0.9, 1.0, 20.0, INF, 1.05, 25.0]):
        set_grads(params, target, step)
        norms = _per_tensor(params)
        total = clipper(model).item()
        threshold = ref.step(total)
        coef = ref_coef(total, threshold)
        clipped += coef < 1
        nonfinite += not math.isfinite(total)
        got = stats.fetch()
        assert close(got["threshold"], threshold, 1e-12) and close(got["coef"], coef, 1e-6)
        assert got["clipped"] == (coef < 1)
        if math.isfinite(target):
            top = sorted(norms, key=lambda x: -x[1])[:2]
            assert [n for n, _ in got["top"]] == [names[i] for i, _ in top]
            assert all(close(v, r, 1e-6) for (_, v), (_, r) in zip(got["top"], top))
    assert stats.names == names
    got = stats.fetch()
    assert (got["steps"], got["clipped_steps"], got["nonfinite_steps"]) == (8, clipped, nonfinite)
    assert clipped == 3 and nonfinite == 1


def test_stats_reset_state_dict_and_empty():
    stats = gc.ClipStats(top_k=2)
    empty = stats.fetch()
    assert empty["steps"] == 0 and empty["total_norm"] is None and empty["top"] == []
    stats.record(torch.tensor(2.0), 1.0, per_tensor=torch.tensor([0.5]))
    assert stats.fetch()["top"] == [(0, 0.5)]  # fewer tensors than top_k
    saved = stats.state_dict()
    stats.reset()
    assert stats.fetch()["steps"] == 0 and stats.fetch()["clipped"] is None
    stats.load_state_dict(saved)
    assert stats.fetch()["steps"] == 1 and stats.fetch()["clipped"] is True
    with pytest.raises(ValueError, match="keys"):
        gc.ClipStats().load_state_dict(saved)


class FakeWriter:
    def __init__(self):
        self.calls = []

    def add_scalar(self, tag, value, step):
        self.calls.append((tag, value, step))


def _stats_for_logging():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2))
    stats = gc.ClipStats(top_k=2)
    clipper = gc.GradClipper("fixed", max_norm=1.0, stats=stats)
    set_grads(list(model.parameters()), 2.0, 0)
    clipper(model)
    return stats


def test_write_tensorboard_tags():
    stats = _stats_for_logging()
    writer = FakeWriter()
    assert gc.ClipStats().write_tensorboard(writer, 0)["steps"] == 0 and writer.calls == []
    data = stats.write_tensorboard(writer, 7, prefix="clip")
    tags = {tag: value for tag, value, step in writer.calls}
    assert all(step == 7 for _, _, step in writer.calls)
    assert set(tags) == {"clip/total_norm", "clip/coef", "clip/clipped", "clip/clip_rate", "clip/nonfinite_steps",
                         "clip/threshold", *(f"clip/top/{name}" for name, _ in data["top"])}
    assert {name for name, _ in data["top"]} <= {"0.weight", "0.bias"}
    assert tags["clip/clipped"] == 1.0 and tags["clip/threshold"] == 1.0 and tags["clip/clip_rate"] == 1.0
    assert close(tags["clip/total_norm"], 2.0, 1e-6) and close(tags["clip/coef"], 1 / (2.0 + EPS), 1e-6)


def test_write_tensorboard_summary_writer(tmp_path):
    pytest.importorskip("tensorboard")
    from torch.utils.tensorboard import SummaryWriter
    stats = _stats_for_logging()
    with SummaryWriter(str(tmp_path)) as writer:
        stats.write_tensorboard(writer, 1)
    assert any(tmp_path.iterdir())


# ---- arguments ----

@pytest.mark.parametrize("kwargs", [dict(policy="adaptive"), dict(percentile=-1.0), dict(percentile=100.5),
                                    dict(percentile=math.nan), dict(alpha=0.0), dict(alpha=1.0), dict(alpha=1.5),
                                    dict(history=0), dict(history=2.5), dict(warmup_steps=0), dict(z_thresh=0.0),
                                    dict(zclip_mode="mad"), dict(clip_option="max"), dict(max_norm=-1.0),
                                    dict(max_grad_norm=-1.0), dict(eps=-1.0), dict(backend="nope")])
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        gc.GradClipper(**kwargs)


def test_bad_stats_arguments():
    with pytest.raises(ValueError):
        gc.ClipStats(top_k=-1)
    with pytest.raises(TypeError):
        gc.GradClipper(stats=object())


def test_no_gradients_leave_the_state_alone():
    clipper = gc.GradClipper("autoclip")
    p = torch.nn.Parameter(torch.ones(3))
    assert torch.equal(clipper([p]), torch.tensor(0.0))
    assert clipper.state_dict()["step"].item() == 0 and clipper.threshold.isnan()


@pytest.mark.parametrize("policy,kw", [("autoclip", dict(history=5, percentile=30.0)),
                                       ("zclip", dict(warmup_steps=4, zclip_mode="percentile", max_grad_norm=2.0))])
def test_compiled_and_torch_policy_steps_keep_the_same_state(policy, kw):
    """The op's compiled kernel and its torch-op kernel advance one state layout the same way (a run may switch
    backends, or resume a checkpoint of the other): thresholds, coefficients and every state value agree."""
    from gradclip_cuda import _ops
    if _ops.C is None:
        pytest.skip("needs the compiled library")
    compiled = gc.GradClipper(policy, **kw)
    torch_ops = gc.GradClipper(policy, backend="torch", **kw)
    code = compiled._POLICY[policy]
    for step, target in enumerate(sequence(18, spikes=(6, 12), nonfinite=((3, INF), (10, NAN)))):
        total = torch.tensor(target, dtype=torch.float64)
        a = _ops.ops.clip_policy_step_(compiled._flat, total, code, compiled._op_args)
        b = _ops.policy_step_torch(torch_ops._flat, total, code, torch_ops._op_args)
        torch.testing.assert_close(a, b, rtol=1e-13, atol=0, equal_nan=True)
        torch.testing.assert_close(compiled._flat, torch_ops._flat, rtol=1e-13, atol=0, equal_nan=True)
