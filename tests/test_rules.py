"""The clipping rules beyond torch's: the eps keyword (TensorFlow's exact cap with eps=0), per-tensor norm clipping,
the multiply-by-a-device-coefficient op, and unit-wise adaptive clipping (AGC), on every backend (Triton in its
interpreter on the CPU), against float64 references written here."""
import math

import pytest
import torch

import gradclip_cuda as gc
from gradclip_cuda import _ops, ops
from conftest import RTOL, backends_for, clone_params, make_grads

MIXED = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def _backends(device, triton=True):
    out = backends_for(device)
    if triton and "triton" in gc.available_backends():
        out = out + ["triton"]
    return out


def _close(actual: torch.Tensor, expected64: torch.Tensor, msg="", rtol=None):
    rtol = max(RTOL[actual.dtype], RTOL[torch.float32]) if rtol is None else rtol  # float32 accumulation
    if expected64.numel() == 0:
        assert actual.numel() == 0, msg
        return
    diff = (actual.double().cpu() - expected64).abs()
    bound = rtol * expected64.abs() + rtol * expected64.abs().max() * 1e-3 + 1e-30
    assert bool((diff <= bound).all()), f"{msg}: max rel diff {float((diff / expected64.abs().clamp(min=1e-30)).max()):.2e}"


# ---- eps ----

@pytest.mark.parametrize("eps", [0.0, 1e-6, 0.25])
def test_eps_sets_the_coefficients_epsilon(device, eps):
    params = make_grads([(40,), (7, 9), (3,)], MIXED, device=device, seed=3)
    grads64 = [p.grad.double().cpu() for p in params]
    total = float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads64])))
    max_norm = total / 3
    coef = min(max_norm / (total + eps), 1.0)
    for backend in _backends(device):
        ours = clone_params(params)
        t = gc.clip_grad_norm_(ours, max_norm, eps=eps, backend=backend)
        assert abs(float(t) - total) <= 2e-3 * total, backend
        for q, g in zip(ours, grads64):
            _close(q.grad, g * coef, f"{backend} eps={eps}")
        ours = clone_params(params)
        gc.clip_grads_with_norm_(ours, max_norm, torch.tensor(total, dtype=torch.float64, device=device), eps=eps,
                                 backend=backend)
        for q, g in zip(ours, grads64):
            _close(q.grad, g * coef, f"{backend} with_norm eps={eps}")


def test_eps_zero_is_tensorflows_exact_cap_and_leaves_small_totals_alone(device):
    # TensorFlow's clip_by_global_norm: t * clip_norm / max(global_norm, clip_norm); a total at or under the cap is
    # left exactly as it is (torch's eps would scale it by max_norm / (total + 1e-6) < 1 at total == max_norm).
    g = torch.tensor([3.0, 4.0], device=device)  # norm 5
    for backend in _backends(device):
        p = torch.nn.Parameter(torch.zeros(2, device=device))
        p.grad = g.clone()
        gc.clip_grad_norm_([p], 5.0, eps=0.0, backend=backend)
        assert torch.equal(p.grad, g), backend
        p.grad = torch.zeros(2, device=device)
        assert float(gc.clip_grad_norm_([p], 1.0, eps=0.0, backend=backend)) == 0.0
        assert torch.equal(p.grad, torch.zeros(2, device=device)), backend
        p.grad = g.clone()
        gc.clip_grad_norm_([p], 5.0, backend=backend)  # torch's eps: scaled by 5 / (5 + 1e-6)
        assert bool((p.grad < g).all()), backend


@pytest.mark.parametrize("eps", [-1e-6, float("nan"), None])
def test_bad_eps_raises_before_writing(eps):
    params = make_grads([(5,)], [torch.float32], scale=10)
    before = params[0].grad.clone()
    with pytest.raises((ValueError, TypeError)):
        gc.clip_grad_norm_(params, 1.0, eps=eps)
    assert torch.equal(params[0].grad, before)


# ---- per-tensor clipping ----

@pytest.mark.parametrize("p", [2.0, 1.0, math.inf])
@pytest.mark.parametrize("eps", [1e-6, 0.0])
def test_per_tensor_clipping_against_a_float64_reference(device, p, eps):
    shapes = [(30,), (4, 5), (1,), (0,), (17, 3), (64,)] if math.isfinite(p) else [(30,), (4, 5), (1,), (17, 3)]
    params = make_grads(shapes, MIXED, device=device, seed=5)
    for i, q in enumerate(params):  # half above the cap, half below
        q.grad.mul_(4.0 if i % 2 == 0 else 0.02)
    max_norm = 1.5
    grads64 = [q.grad.double().cpu() for q in params]
    norms64 = torch.stack([torch.linalg.vector_norm(g, p) for g in grads64])
    for backend in _backends(device):
        ours = clone_params(params)
        norms = gc.clip_grad_norm_per_tensor_(ours, max_norm, p, eps=eps, backend=backend)
        assert norms.shape == (len(params),) and norms.dtype == torch.float64
        _close(norms, norms64, backend)
        for q, g, n in zip(ours, grads64, norms64.tolist()):
            _close(q.grad, g * (min(max_norm / (n + eps), 1.0) if n + eps > 0 else 1.0), f"{backend} p={p}")
            if n * 1.001 < max_norm:
                assert torch.equal(q.grad.cpu(), g.to(q.grad.dtype)), "a tensor under the cap is left alone"


def test_per_tensor_clipping_of_many_tensors_and_its_errors():
    params = make_grads([(i % 13 + 1,) for i in range(2100)], MIXED, seed=9, scale=3.0)
    grads64 = [q.grad.double() for q in params]
    ours = clone_params(params)
    norms = gc.clip_grad_norm_per_tensor_(ours, 2.0)
    for q, g, n in zip(ours, grads64, norms.double().tolist()):
        _close(q.grad, g * min(2.0 / (float(g.norm()) + 1e-6), 1.0), "2,100 tensors")
        assert abs(n - float(g.norm())) <= 2e-2 * float(g.norm())
    bad = clone_params(params[:3])
    bad[1].grad[0] = float("inf")
    before = [q.grad.clone() for q in bad]
    with pytest.raises(RuntimeError, match="non-finite"):
        gc.clip_grad_norm_per_tensor_(bad, 1.0, error_if_nonfinite=True)
    assert all(torch.equal(q.grad, b) for q, b in zip(bad, before))
    assert gc.clip_grad_norm_per_tensor_([torch.nn.Parameter(torch.ones(2))], 1.0).numel() == 0


def test_per_tensor_totals_of_the_wrong_length_raise_before_writing(device):
    xs = [torch.full((4,), 3.0, device=device) for _ in range(3)]
    for backend in _backends(device):
        impl = gc.api._impl_for(torch.device(device), xs, backend)
        with pytest.raises(RuntimeError, match="one value or one per tensor"):
            impl.scale(xs, torch.ones(2, device=device), 1.0, 1e-6)
        with pytest.raises(RuntimeError, match="one value or one per tensor"):
            impl.mul(xs, torch.ones(4, device=device))
        assert all(bool((x == 3).all()) for x in xs), backend


# ---- multiply by a device coefficient ----

def test_multiply_by_one_or_per_tensor_coefficients(device):
    xs = [t.to(device) for t in (torch.randn(100), torch.randn(7, 3).bfloat16(), torch.randn(5).double(),
                                   torch.randn(9).half())]
    for backend in _backends(device):
        impl = gc.api._impl_for(torch.device(device), xs, backend)
        ys = [x.clone() for x in xs]
        impl.mul(ys, torch.tensor(0.375, device=device))
        for x, y in zip(xs, ys):
            _close(y, x.double().cpu() * 0.375, backend)
        coefs = torch.tensor([0.5, 2.0, 1.0, 0.25], device=device)
        ys = [x.clone() for x in xs]
        impl.mul(ys, coefs)
        for x, y, c in zip(xs, ys, coefs.tolist()):
            _close(y, x.double().cpu() * c, backend)
        assert torch.equal(ys[2], xs[2]), "coefficient 1 leaves its tensor as it was"


# ---- AGC ----

def _agc_ref(grads, params, clip_factor, eps, p, unit_axis):
    """timm's adaptive_clip_grad rule in float64, unit axis generalised (one kept dimension)."""
    out = []
    for g, w in zip(grads, params):
        g64, w64 = g.double().cpu(), w.double().cpu()
        if g64.numel() == 0:  # nothing to clip (and no unit norm of an empty unit)
            out.append(g64)
            continue
        if g64.dim() <= 1:
            gn = torch.linalg.vector_norm(g64, p).reshape([1] * g64.dim())
            wn = torch.linalg.vector_norm(w64, p).reshape([1] * g64.dim())
        else:
            axis = unit_axis % g64.dim()
            dims = tuple(d for d in range(g64.dim()) if d != axis)
            gn = torch.linalg.vector_norm(g64, p, dim=dims, keepdim=True)
            wn = torch.linalg.vector_norm(w64, p, dim=dims, keepdim=True)
        limit = wn.clamp(min=eps) * clip_factor
        coef = torch.where(gn < limit, torch.ones_like(gn), limit / gn.clamp(min=1e-6))
        out.append(g64 * coef)
    return out


def _agc_set(device, dtypes, seed=0):
    """Parameters and gradients with every unit clearly above or clearly below its limit (no ties)."""
    shapes = [(8, 4, 3, 3), (16, 32), (16,), (), (0, 4), (5, 7), (3, 1, 2)]
    gen = torch.Generator().manual_seed(seed)
    params = []
    for i, shape in enumerate(shapes):
        dtype = dtypes[i % len(dtypes)]
        w = (torch.randn(shape, generator=gen, dtype=torch.float64) * 2).to(dtype).to(device)
        g = torch.randn(shape, generator=gen, dtype=torch.float64) * 0.001
        if g.dim() >= 1 and g.numel():
            g[::2] *= 300  # every other unit (along dim 0) well over a 0.01 * |w| limit
        q = torch.nn.Parameter(w)
        q.grad = g.to(dtype).to(device)
        params.append(q)
    return params


@pytest.mark.parametrize("unit_axis", [0, -1, 1])
@pytest.mark.parametrize("p", [2.0, 1.0, math.inf])
def test_agc_against_timms_rule_in_float64(device, unit_axis, p):
    params = _agc_set(device, MIXED, seed=int(unit_axis) + 7)
    ref = _agc_ref([q.grad for q in params], [q for q in params], 0.01, 1e-3, p, unit_axis)
    changed = 0
    for backend in _backends(device):
        ours = clone_params(params)
        gc.adaptive_clip_grad_(ours, 0.01, 1e-3, p, unit_axis=unit_axis, backend=backend)
        for q, r, o in zip(ours, ref, params):
            _close(q.grad, r, f"{backend} axis={unit_axis} p={p}")
            changed += int(not torch.equal(q.grad, o.grad))
    assert changed > 0


def test_agc_matches_a_per_parameter_torch_recipe_on_float32():
    # The recipe most code runs (timm's loop, one kernel per parameter), in float32.
    params = _agc_set("cpu", [torch.float32], seed=11)
    theirs = clone_params(params)
    for q in theirs:
        w, g = q.detach(), q.grad.detach()
        dims = tuple(range(1, g.dim())) if g.dim() > 1 else None
        limit = torch.linalg.vector_norm(w, 2.0, dim=dims, keepdim=g.dim() > 1).clamp_(min=1e-3).mul_(0.01)
        gn = torch.linalg.vector_norm(g, 2.0, dim=dims, keepdim=g.dim() > 1)
        g.copy_(torch.where(gn < limit, g, g * (limit / gn.clamp(min=1e-6))))
    ours = clone_params(params)
    gc.adaptive_clip_grad_(ours)
    for q, r in zip(ours, theirs):
        torch.testing.assert_close(q.grad, r.grad, rtol=1e-5, atol=1e-8)


def test_agc_exclude_by_name_pattern_and_predicate():
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    for q in model.parameters():
        q.grad = torch.randn_like(q) * 100
    before = {n: q.grad.clone() for n, q in model.named_parameters()}
    gc.adaptive_clip_grad_(model, exclude=["2.*"])
    for n, q in model.named_parameters():
        assert torch.equal(q.grad, before[n]) == n.startswith("2."), n
    for q in model.parameters():
        q.grad = torch.randn_like(q) * 100
    before = {n: q.grad.clone() for n, q in model.named_parameters()}
    gc.adaptive_clip_grad_(model.named_parameters(), exclude=lambda name, q: q.dim() == 1)
    for n, q in model.named_parameters():
        assert torch.equal(q.grad, before[n]) == n.endswith("bias"), n
    with pytest.raises(ValueError, match="named parameters"):
        gc.adaptive_clip_grad_(model.parameters(), exclude="2.weight")


def test_agc_non_contiguous_gradients_and_parameters(device):
    w = torch.randn(12, 10, device=device)
    params = []
    for i in range(2):
        q = torch.nn.Parameter(w.t().contiguous() if i == 0 else w.clone())
        q.grad = (torch.randn(10, 12, device=device) * 5).t().contiguous().t() if i == 0 else \
            torch.randn(12, 10, device=device) * 5
        params.append(q)
    params[1].grad = params[1].grad.t().contiguous().t()  # a transposed (non-contiguous) gradient of shape (12, 10)
    ref = _agc_ref([q.grad for q in params], params, 0.05, 1e-3, 2.0, 0)
    for backend in _backends(device):
        ours = clone_params(params)
        ours[1].grad = params[1].grad.clone().t().contiguous().t()
        assert not ours[1].grad.is_contiguous()
        gc.adaptive_clip_grad_(ours, 0.05, backend=backend)
        for q, r in zip(ours, ref):
            _close(q.grad, r, backend)


def test_agc_errors_leave_every_gradient_untouched(device):
    for backend in _backends(device):
        params = _agc_set(device, [torch.float32])
        before = [q.grad.clone() for q in params]
        impl = gc.api._impl_for(torch.device(device), [params[0].grad], backend)
        with pytest.raises(RuntimeError, match="shape"):
            impl.agc([q.grad for q in params] + [torch.ones(4, 3, device=device)],
                     [q.detach() for q in params] + [torch.ones(3, 4, device=device)], 0.01, 1e-3, 2.0, 0)
        with pytest.raises(RuntimeError, match="share memory"):
            impl.agc([params[1].grad, params[0].grad, params[0].grad], [params[1].detach(), params[0].detach(),
                                                                          params[0].detach()], 0.01, 1e-3, 2.0, 0)
        with pytest.raises(IndexError):
            gc.adaptive_clip_grad_(params, unit_axis=4, backend=backend)
        with pytest.raises(RuntimeError):
            impl.agc([q.grad for q in params] + [torch.ones(3, dtype=torch.int32, device=device)],
                     [q.detach() for q in params] + [torch.ones(3, device=device)], 0.01, 1e-3, 2.0, 0)
        assert all(torch.equal(q.grad, b) for q, b in zip(params, before)), backend


def test_agc_is_deterministic_across_thread_counts_and_many_tensors():
    params = make_grads([((i % 5) + 1, (i % 7) + 2) for i in range(2100)], MIXED, seed=4, scale=50.0)
    for q in params:
        q.data = torch.randn_like(q.grad, dtype=torch.float64).to(q.grad.dtype)
    ref = _agc_ref([q.grad for q in params], params, 0.01, 1e-3, 2.0, 0)
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            ours = clone_params(params)
            gc.adaptive_clip_grad_(ours)
            results.append([q.grad for q in ours])
    finally:
        torch.set_num_threads(threads)
    for a, b, r in zip(results[0], results[1], ref):
        assert torch.equal(a, b)
        _close(a, r, "2,100 tensors")


def test_agc_op_passes_opcheck():
    params = _agc_set("cpu", [torch.float32])
    grads = [q.grad.clone() for q in params]
    torch.library.opcheck(ops.adaptive_clip_grad_, (grads, [q.detach() for q in params], 0.01, 1e-3, 2.0, 0))
    torch.library.opcheck(ops.multi_tensor_mul_, ([g.clone() for g in grads], torch.tensor(0.5)))
    torch.library.opcheck(ops.multi_tensor_scale_, ([g.clone() for g in grads], torch.ones(len(grads)) * 9, 1.0, 0.0))


def test_unit_shapes():
    assert _ops.unit_shape((8, 4, 3, 3), 0) == (1, 8, 36)
    assert _ops.unit_shape((8, 4, 3, 3), -1) == (96, 3, 1)
    assert _ops.unit_shape((8, 4, 3, 3), 1) == (8, 4, 9)
    assert _ops.unit_shape((10,), 0) == (1, 1, 10)
    assert _ops.unit_shape((), 0) == (1, 1, 1)


def test_agc_refuses_interleaved_views_of_one_buffer(device):
    base = torch.randn(6, 8, device=device) * 100
    w = torch.randn(6, 4, device=device)
    for backend in _backends(device):
        impl = gc.api._impl_for(torch.device(device), [base], backend)
        before = base.clone()
        with pytest.raises(RuntimeError, match="share memory"):  # disjoint elements, one memory span
            impl.agc([base[:, ::2], base[:, 1::2]], [w, w.clone()], 0.01, 1e-3, 2.0, 0)
        assert torch.equal(base, before), backend


@pytest.mark.parametrize("args,match", [({"size": 0.0}, "whole number"), ({"size": 2.5}, "whole number"),
                                        ({"q": 1.5}, r"\[0, 1\]"), ({"q": float("nan")}, r"\[0, 1\]")])
def test_policy_step_op_checks_its_arguments(args, match):
    from gradclip_cuda import policies
    clipper = policies.GradClipper("autoclip", history=4)
    a = dict(zip(_ops.POLICY_ARGS, clipper._op_args))
    a.update(args)
    state = clipper._flat.clone()
    for step in (ops.clip_policy_step_, _ops.policy_step_torch):
        with pytest.raises(RuntimeError, match=match):
            step(state, torch.tensor(1.0), 1, [a[k] for k in _ops.POLICY_ARGS])
