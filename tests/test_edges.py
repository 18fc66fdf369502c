"""Edge values and edge inputs on every backend, against torch.nn.utils and a float64 reference: signed zeros with
negative orders, zeros and NaN/inf for every order, max_norm = 0, clip_value = 0, tiny totals, gradients listed
twice or as views of one another, errors raised before any write, sparse gradients, error types."""
import math
import warnings

import pytest
import torch

import gradclip_cuda as gc
from conftest import (RTOL, assert_close_rel, backends_for, clone_params, make_grads, ref_coef, ref_total,
                      total_rtol)


def _params(grads):
    out = []
    for g in grads:
        q = torch.nn.Parameter(torch.zeros_like(g))
        q.grad = g.clone()
        out.append(q)
    return out


def _same_as_torch(ours_total, theirs_total, ours, theirs, msg=""):
    """Totals equal (NaN equal to NaN, sign of zero included) and gradients equal, bitwise."""
    o, t = float(ours_total), float(theirs_total)
    assert (math.isnan(o) and math.isnan(t)) or (o == t and math.copysign(1, o) == math.copysign(1, t)), \
        f"{msg}: {o} vs {t}"
    for q, r in zip(ours, theirs):
        assert torch.equal(q.grad.nan_to_num(), r.grad.nan_to_num()), msg
        assert torch.equal(q.grad.isnan(), r.grad.isnan()), msg
        assert torch.equal(q.grad.signbit(), r.grad.signbit()), msg


# ---- values ----

@pytest.mark.parametrize("p", [-1.0, -3.0, -math.inf, -0.5])
def test_negative_orders_of_signed_zeros_match_torch(device, p):
    # |-0.0| must be +0.0: pow(-0.0, -1) = -inf would meet pow(+0.0, -1) = +inf and give NaN.
    grads = [torch.tensor([0.0, -0.0, 1.0], device=device), torch.tensor([-0.0, 2.0], device=device)]
    theirs = _params(grads)
    t = torch.nn.utils.clip_grad_norm_(theirs, 1.0, p)
    assert float(t) == 0.0
    for backend in backends_for(device):
        ours = _params(grads)
        o = gc.clip_grad_norm_(ours, 1.0, p, backend=backend)
        _same_as_torch(o, t, ours, theirs, backend)
        total = gc.get_total_norm(grads, p, backend=backend)
        assert float(total) == 0.0 and not total.signbit(), backend


@pytest.mark.parametrize("p", [0.0, 1.0, 2.0, 3.0, math.inf, -math.inf, -1.5])
def test_zero_and_partly_zero_gradients(device, p):
    # p = 0 counts the tensors with a nonzero element (torch's composition), so a count of elements fails here.
    grads = [torch.zeros(5, device=device), torch.tensor([0.0, 2.0, 0.0, -3.0], device=device),
             torch.tensor([1.5, 0.0], device=device), torch.zeros(3, device=device)]
    ref = ref_total(grads, p)
    theirs = _params(grads)
    t = torch.nn.utils.clip_grad_norm_(theirs, 0.5, p)
    for backend in backends_for(device):
        ours = _params(grads)
        o = gc.clip_grad_norm_(ours, 0.5, p, backend=backend)
        assert_close_rel(o, ref, RTOL[torch.float32], backend)
        assert_close_rel(o, t, RTOL[torch.float32], backend)
        coef = ref_coef(ref, 0.5)
        for q, g in zip(ours, grads):
            torch.testing.assert_close(q.grad.double(), g.double() * coef, rtol=2e-6, atol=0)
        if p == 0:
            assert float(o) == 2.0


@pytest.mark.parametrize("p", [0.0, 1.0, 2.0, 3.0, math.inf, -math.inf, -1.5])
def test_all_zero_gradients_are_left_alone(device, p):
    grads = [torch.zeros(7, device=device), torch.zeros(3, 3, device=device)]
    theirs = _params(grads)
    t = torch.nn.utils.clip_grad_norm_(theirs, 1.0, p)
    for backend in backends_for(device):
        ours = _params(grads)
        o = gc.clip_grad_norm_(ours, 1.0, p, backend=backend)
        _same_as_torch(o, t, ours, theirs, backend)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("p", [-math.inf, math.inf, 3.0, -1.5, 1.0, 0.0])
@pytest.mark.parametrize("where", ["first", "last", "second tensor"])
def test_nonfinite_values_for_every_order(device, p, bad, where):
    # NaN must win wherever it sits in a min/max (a min that ignores NaN in its second argument returns a number).
    grads = [torch.tensor([0.5, -2.0, 1.0, 4.0], device=device), torch.tensor([3.0, -0.25], device=device)]
    if where == "first":
        grads[0][0] = bad
    elif where == "last":
        grads[0][-1] = bad
    else:
        grads[1][1] = bad
    theirs = _params(grads)
    t = torch.nn.utils.clip_grad_norm_(theirs, 1.0, p)
    for backend in backends_for(device):
        ours = _params(grads)
        o = gc.clip_grad_norm_(ours, 1.0, p, backend=backend)
        if math.isnan(float(t)) or math.isinf(float(t)):
            assert (math.isnan(float(o)) and math.isnan(float(t))) or float(o) == float(t), (backend, float(o))
        else:
            assert_close_rel(o, t, RTOL[torch.float32], backend)
        for q, r in zip(ours, theirs):
            torch.testing.assert_close(q.grad, r.grad, equal_nan=True, rtol=1e-6, atol=0)


def test_max_norm_zero_and_clip_value_zero_are_accepted_like_torch(device):
    base = make_grads([(10,), (65537,)], [torch.float32, torch.bfloat16], device, seed=30)
    theirs = clone_params(base)
    torch.nn.utils.clip_grad_norm_(theirs, 0.0)
    assert all(not r.grad.any() for r in theirs)
    ref = ref_total([q.grad for q in base], 2.0)
    for backend in backends_for(device):
        ours = clone_params(base)
        o = gc.clip_grad_norm_(ours, 0, backend=backend)
        assert_close_rel(o, ref, total_rtol(ours, o.dtype), backend)
        for q in ours:
            assert not q.grad.any(), backend  # scaled by 0
        ours = clone_params(base)
        gc.clip_grads_with_norm_(ours, 0.0, torch.tensor(3.0), backend=backend)
        assert all(not q.grad.any() for q in ours), backend
        ours, theirs_v = clone_params(base), clone_params(base)
        torch.nn.utils.clip_grad_value_(theirs_v, 0)
        gc.clip_grad_value_(ours, 0, backend=backend)
        for q, r in zip(ours, theirs_v):
            assert torch.equal(q.grad, r.grad) and not q.grad.any(), backend


@pytest.mark.parametrize("total", [1e-7, 3e-7, 1e-6, 2.5e-6])
def test_totals_near_the_epsilon(device, total):
    # The coefficient max_norm / (total + 1e-6) is far above 1 or near it: bitwise torch's for float32.
    g = torch.tensor([total, 0.0], device=device)
    theirs = _params([g])
    t = torch.nn.utils.clip_grad_norm_(theirs, 1e-6)
    for backend in backends_for(device):
        ours = _params([g])
        o = gc.clip_grad_norm_(ours, 1e-6, backend=backend)
        _same_as_torch(o, t, ours, theirs, backend)


def test_error_if_nonfinite_with_finite_gradients_still_clips(device):
    base = make_grads([(100,), (65537,)], [torch.float32], device, seed=31)
    theirs = clone_params(base)
    t = torch.nn.utils.clip_grad_norm_(theirs, 0.1, error_if_nonfinite=True)
    for backend in backends_for(device):
        ours = clone_params(base)
        o = gc.clip_grad_norm_(ours, 0.1, error_if_nonfinite=True, backend=backend)
        assert_close_rel(o, t, RTOL[torch.float32], backend)
        for q, r, b in zip(ours, theirs, base):
            assert not torch.equal(q.grad, b.grad), backend  # clipped
            torch.testing.assert_close(q.grad, r.grad, rtol=2e-5, atol=0)


def test_fp16_tensor_whose_own_norm_overflows_fp16_gives_the_exact_total():
    # Decision (README): torch rounds each fp16 tensor's norm to fp16, so a norm above 65504 makes its total inf (and
    # error_if_nonfinite raise) even beside float32 tensors. We keep the exact float32 total and clip by it.
    big = torch.full((4096,), 2000.0, dtype=torch.float16)  # own norm 128,000
    small = torch.full((10,), 0.5)
    theirs = _params([big, small])
    t = torch.nn.utils.clip_grad_norm_(theirs, 1.0)
    assert math.isinf(float(t))
    ref = ref_total([big, small], 2.0)
    for backend in backends_for("cpu"):
        ours = _params([big, small])
        o = gc.clip_grad_norm_(ours, 1.0, error_if_nonfinite=True, backend=backend)
        assert o.dtype == torch.float32
        assert_close_rel(o, ref, RTOL[torch.float32], backend)
        assert_close_rel(ref_total([q.grad for q in ours], 2.0), 1.0, 2e-3, backend)


def test_max_norm_tensor_that_requires_grad_is_silent():
    params = make_grads([(10,)], [torch.float32], seed=32)
    max_norm = torch.tensor(0.5, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.nn.utils.clip_grad_norm_(clone_params(params), max_norm)  # torch is silent
        for backend in backends_for("cpu"):
            gc.clip_grad_norm_(clone_params(params), max_norm, backend=backend)
            gc.clip_grads_with_norm_(clone_params(params), max_norm, torch.tensor(3.0), backend=backend)


# ---- gradients listed twice, views of one another ----

def _listed(device, order):
    """Parameters whose gradients are views of one buffer, listed in `order` (names: a, b, head, whole, tail, t)."""
    gen = torch.Generator().manual_seed(33)
    whole = torch.rand(100, generator=gen).add_(0.5).to(device)
    mat = torch.rand(6, 5, generator=gen).add_(0.5).to(device)
    other = torch.rand(30, generator=gen).add_(0.5).to(device)
    views = {"whole": whole, "head": whole[:50], "tail": whole[60:], "mid": whole[40:70], "b": other,
             "mat": mat, "t": mat.t()}
    params = []
    for name in order:
        q = torch.nn.Parameter(torch.zeros(views[name].shape, device=device))
        q.grad = views[name]
        params.append(q)
    return params, {k: v.clone() for k, v in views.items()}, views


@pytest.mark.parametrize("order", [["whole", "b", "whole"], ["head", "whole"], ["whole", "head"],
                                   ["b", "head", "tail", "whole"], ["mat", "b", "t"], ["t", "mat"],
                                   ["whole", "b", "head", "whole", "tail"]])
def test_views_and_repeats_are_scaled_once(device, order):
    for backend in backends_for(device):
        params, before, views = _listed(device, order)
        ref = ref_total([before[n] for n in order], 2.0)
        total = gc.clip_grad_norm_(params, 0.5, backend=backend)
        assert_close_rel(total, ref, RTOL[torch.float32], backend)  # the norm counts every listing, as torch's
        coef = ref_coef(ref, 0.5)
        for name in set(order) | ({"whole"} if {"head", "tail"} & set(order) else set()):
            torch.testing.assert_close(views[name].double(), before[name].double() * coef, rtol=2e-6, atol=0,
                                       msg=f"{backend} {order}: {name} not scaled exactly once")


@pytest.mark.parametrize("order", [["whole", "b", "whole"], ["head", "whole"], ["b", "tail", "whole"]])
def test_value_clip_reaches_every_element_of_contained_views(device, order):
    for backend in backends_for(device):
        params, before, views = _listed(device, order)
        gc.clip_grad_value_(params, 0.9, backend=backend)
        for name in order:
            assert torch.equal(views[name], before[name].clamp(-0.9, 0.9)), (backend, name)


@pytest.mark.parametrize("order", [["head", "mid"], ["mid", "b", "tail"], ["whole", "b", "f64"]])
def test_partly_overlapping_gradients_raise_before_any_write(device, order):
    for backend in backends_for(device):
        params, before, views = _listed(device, [n for n in order if n != "f64"])
        if "f64" in order:  # the same memory seen as another dtype
            q = torch.nn.Parameter(torch.zeros(50, dtype=torch.float64, device=device))
            q.grad = views["whole"].view(torch.float64)
            params.append(q)
        snapshot = [q.grad.clone() for q in params]
        for fn in (lambda: gc.clip_grad_norm_(params, 1e-3, backend=backend),
                   lambda: gc.clip_grads_with_norm_(params, 1e-3, torch.tensor(5.0), backend=backend),
                   lambda: gc.clip_grad_value_(params, 1e-3, backend=backend)):
            with pytest.raises(RuntimeError, match="share part of their memory"):
                fn()
            for q, s in zip(params, snapshot):
                assert torch.equal(q.grad, s), backend
        # reading is fine: the norm of overlapping views is torch's
        ours = gc.get_total_norm([q.grad for q in params], backend=backend)
        assert_close_rel(ours, torch.nn.utils.get_total_norm([q.grad for q in params]), RTOL[torch.float32])


# ---- errors before writes, torch's exception types ----

def _grad_of(t):
    class Holder:  # a parameter-like object: torch refuses to set an integer .grad on a float Parameter
        grad = t
    return Holder()


@pytest.mark.parametrize("odd", ["int", "bool", "float8", "complex"])
@pytest.mark.parametrize("fn", ["value", "with_norm", "norm"])
def test_unwritable_gradient_raises_torchs_type_before_anything_is_written(device, odd, fn):
    make = {"int": lambda: torch.arange(4, device=device), "bool": lambda: torch.ones(4, dtype=torch.bool, device=device),
            "float8": lambda: torch.ones(4, device=device).to(torch.float8_e4m3fn),
            "complex": lambda: torch.ones(4, dtype=torch.complex64, device=device)}[odd]
    call = {"value": lambda m, ps, **k: m.clip_grad_value_(ps, 0.5, **k),
            "with_norm": lambda m, ps, **k: m.clip_grads_with_norm_(ps, 1.0, torch.tensor(10.0), **k),
            "norm": lambda m, ps, **k: m.clip_grad_norm_(ps, 1e-3, **k)}[fn]
    base = make_grads([(10,), (65537,)], [torch.float32], device, seed=34)
    theirs = clone_params(base) + [_grad_of(make())]
    try:
        call(torch.nn.utils, theirs)
        expected = None
    except Exception as e:  # noqa: BLE001
        expected = type(e)
    for backend in backends_for(device):
        ours = clone_params(base) + [_grad_of(make())]
        if expected is None and backend in ("cpu", "cuda"):  # complex: the compiled kernels refuse it, before writing
            with pytest.raises(NotImplementedError, match="not supported by the compiled kernels"):
                call(gc, ours, backend=backend)
            assert all(torch.equal(q.grad, b.grad) for q, b in zip(ours, base)), backend
            continue
        if expected is None:  # torch takes it (complex scaling): so do we
            call(gc, ours, backend=backend)
            for q, r in zip(ours, theirs):
                torch.testing.assert_close(q.grad, r.grad, rtol=2e-5, atol=0)
            continue
        with pytest.raises(expected):
            call(gc, ours, backend=backend)
        for q, b in zip(ours, base):
            assert torch.equal(q.grad, b.grad), f"{backend}: a gradient changed before the error"


def test_float8_norm_raises_torchs_type():
    x = torch.ones(4).to(torch.float8_e5m2)
    with pytest.raises(NotImplementedError):
        torch.nn.utils.get_total_norm([x])
    for backend in gc.available_backends():
        if backend == "triton":
            continue
        with pytest.raises(NotImplementedError):
            gc.get_total_norm([torch.ones(3), x], backend=backend)


# ---- sparse gradients ----

def _embedding_model(seed):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Embedding(20, 6, sparse=True), torch.nn.Linear(6, 3))
    model(torch.tensor([[1, 4, 4, 7], [2, 9, 1, 1]])).sum().backward()
    return model


@pytest.mark.parametrize("p", [2.0, 1.0, math.inf, 0.0, 3.0])
def test_sparse_gradients_give_torchs_results(p):
    theirs, ours = _embedding_model(35), _embedding_model(35)
    assert theirs[0].weight.grad.is_sparse
    t = torch.nn.utils.clip_grad_norm_(theirs.parameters(), 0.3, p)
    o = gc.clip_grad_norm_(ours.parameters(), 0.3, p)
    assert_close_rel(o, t, RTOL[torch.float32])
    for q, r in zip(ours.parameters(), theirs.parameters()):
        assert q.grad.layout == r.grad.layout
        torch.testing.assert_close(q.grad.to_dense(), r.grad.to_dense(), rtol=1e-5, atol=0)
    fresh = _embedding_model(35)
    grads = [q.grad for q in fresh.parameters()]
    assert_close_rel(gc.get_total_norm(grads, p), torch.nn.utils.get_total_norm(grads, p), RTOL[torch.float32])
    gc.clip_grads_with_norm_(fresh.parameters(), 0.3, t)
    for q, r in zip(fresh.parameters(), theirs.parameters()):
        torch.testing.assert_close(q.grad.to_dense(), r.grad.to_dense(), rtol=1e-5, atol=0)
