"""Mixed precision and the optimizer step (gradclip_cuda/amp.py) against torch's recipe, on the CPU: GradScaler
unscale + clip in one multiply, the coefficient handed to fused optimizers, non-finite steps skipped without a sync."""
import contextlib
import math
import warnings

import pytest
import torch

import gradclip_cuda as gc

OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}
STEPS = 20
OVERFLOW, NAN = {5, 6}, {11}  # steps whose gradients get an inf / a NaN after backward
MAX_NORM = 0.5


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))


def _batch(step):
    gen = torch.Generator().manual_seed(1000 + step)
    return torch.randn(8, 16, generator=gen), torch.randn(8, 4, generator=gen)


def _run(recipe, opt_name, fused, amp_dtype=torch.bfloat16, steps=STEPS):
    """Trains a fresh model for `steps` steps with a GradScaler; returns (parameters, totals, scales)."""
    model = _model()
    lr = 0.05 if opt_name == "sgd" else 1e-2
    opt = OPTIMIZERS[opt_name](model.parameters(), lr=lr, fused=fused)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12, growth_interval=4)
    totals, scales = [], []
    for step in range(steps):
        x, y = _batch(step)
        opt.zero_grad()
        with torch.autocast("cpu", dtype=amp_dtype):
            loss = torch.nn.functional.mse_loss(model(x).float(), y) * 40.0
        scaler.scale(loss).backward()
        w = model[0].weight.grad
        if step in OVERFLOW:
            w[0, 0] = math.inf
        if step in NAN:
            w[1, 1] = math.nan
        if recipe == "torch":
            scaler.unscale_(opt)
            total = torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
        else:
            total = gc.clip_grad_norm_(list(model.parameters()), MAX_NORM, scaler=scaler, optimizer=opt,
                                       defer=recipe == "defer")
        scaler.step(opt)
        scaler.update()
        totals.append(float(total))
        scales.append(float(scaler.get_scale()))
    return [p.detach().clone() for p in model.parameters()], totals, scales


@pytest.mark.parametrize("fused", [False, True], ids=["foreach", "fused"])
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("recipe", ["write", "defer"])
def test_scaler_recipe_matches_torchs_over_twenty_steps(recipe, opt_name, fused):
    theirs, t_totals, t_scales = _run("torch", opt_name, fused)
    ctx = pytest.warns(UserWarning, match="not one") if recipe == "defer" and not fused else contextlib.nullcontext()
    from gradclip_cuda import amp
    amp._warned_defer.clear()
    with ctx:
        ours, o_totals, o_scales = _run(recipe, opt_name, fused)
    assert o_scales == t_scales  # same skips, same backoff and growth
    assert t_scales[min(OVERFLOW)] < t_scales[min(OVERFLOW) - 1]  # the overflow was seen and backed off
    for step, (o, t) in enumerate(zip(o_totals, t_totals)):
        if math.isfinite(t):
            assert o == pytest.approx(t, rel=1e-5), step
        else:
            assert not math.isfinite(o), step
    for o, t in zip(ours, theirs):
        torch.testing.assert_close(o, t, rtol=1e-4, atol=1e-6)


def _plain_step(model, opt, recipe, step, skip_nonfinite=False):
    x, y = _batch(step)
    opt.zero_grad()
    torch.nn.functional.mse_loss(model(x), y).mul(40.0).backward()
    if step in NAN:
        model[0].weight.grad[1, 1] = math.nan
    if recipe == "torch":
        total = torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
        if not (skip_nonfinite and not math.isfinite(float(total))):
            opt.step()
    else:
        total = gc.clip_grad_norm_(list(model.parameters()), MAX_NORM, optimizer=opt, defer=recipe == "defer",
                                   skip_nonfinite=skip_nonfinite)
        opt.step()
    return total


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("recipe", ["write", "defer"])
def test_fused_optimizer_hand_off_and_sync_free_skip_match_torch(recipe, opt_name):
    runs = {}
    for who in ("torch", recipe):
        model = _model()
        opt = OPTIMIZERS[opt_name](model.parameters(), lr=0.05 if opt_name == "sgd" else 1e-2, fused=True)
        for step in range(STEPS):
            _plain_step(model, opt, who, step, skip_nonfinite=True)
            assert not hasattr(opt, "grad_scale") and not hasattr(opt, "found_inf")  # cleared after the step
        runs[who] = [p.detach().clone() for p in model.parameters()]
        if opt_name != "sgd":
            steps = {float(s["step"]) for s in opt.state.values()}
            assert steps == {STEPS - len(NAN)}  # the NaN step was skipped, not taken
    for o, t in zip(runs[recipe], runs["torch"]):
        assert torch.isfinite(o).all()
        torch.testing.assert_close(o, t, rtol=1e-4, atol=1e-6)


def test_defer_writes_nothing_and_the_step_leaves_the_clipped_gradient():
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    x, y = _batch(0)
    torch.nn.functional.mse_loss(model(x), y).mul(40.0).backward()
    before = [p.grad.clone() for p in model.parameters()]
    versions = [p.grad._version for p in model.parameters()]
    total = gc.clip_grad_norm_(list(model.parameters()), MAX_NORM, optimizer=opt, defer=True)
    assert [p.grad._version for p in model.parameters()] == versions  # no write pass
    assert all(torch.equal(p.grad, b) for p, b in zip(model.parameters(), before))
    ref = torch.linalg.vector_norm(torch.stack([b.double().norm() for b in before]))
    assert float(total) == pytest.approx(float(ref), rel=1e-6) and float(ref) > MAX_NORM
    opt.step()
    coef = MAX_NORM / (float(ref) + 1e-6)
    for p, b in zip(model.parameters(), before):
        torch.testing.assert_close(p.grad.double(), b.double() * coef, rtol=1e-5, atol=1e-9)


@contextlib.contextmanager
def _no_host_sync():
    """Makes every way a step could read a tensor on the host raise."""
    saved = {name: getattr(torch.Tensor, name) for name in ("item", "tolist", "cpu", "__bool__", "__float__")}

    def refuse(*args, **kwargs):
        raise AssertionError("host sync in the step path")
    try:
        for name in saved:
            setattr(torch.Tensor, name, refuse)
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)


@pytest.mark.parametrize("defer", [False, True])
def test_the_step_path_reads_nothing_on_the_host(defer):
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, fused=True)
    scaler = torch.amp.GradScaler("cpu")
    x, y = _batch(0)
    scaler.scale(torch.nn.functional.mse_loss(model(x), y)).backward()
    with _no_host_sync():
        gc.clip_grad_norm_(list(model.parameters()), MAX_NORM, scaler=scaler, optimizer=opt, defer=defer)
    opt2 = torch.optim.SGD(model.parameters(), lr=1e-2, fused=True)
    with _no_host_sync():
        gc.clip_grad_norm_(list(model.parameters()), MAX_NORM, optimizer=opt2, defer=defer, skip_nonfinite=True)


def _grads_snapshot(model):
    return [p.grad.clone() for p in model.parameters()]


def test_bad_combinations_raise_before_anything_changes():
    model = _model()
    other = _model(1)
    x, y = _batch(0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu")
    torch.nn.functional.mse_loss(model(x), y).backward()
    before = _grads_snapshot(model)
    params = list(model.parameters())
    cases = [
        (ValueError, "needs optimizer", lambda: gc.clip_grad_norm_(params, 1e-3, scaler=scaler)),
        (ValueError, "need optimizer", lambda: gc.clip_grad_norm_(params, 1e-3, defer=True)),
        (ValueError, "not among the optimizer", lambda: gc.clip_grad_norm_(
            params, 1e-3, optimizer=torch.optim.Adam(other.parameters(), fused=True), defer=True)),
        (ValueError, "not among the parameters", lambda: gc.clip_grad_norm_(params[:2], 1e-3, scaler=scaler,
                                                                            optimizer=opt)),
        (AssertionError, "_scale is None", lambda: gc.clip_grad_norm_(params, 1e-3, scaler=scaler, optimizer=opt)),
        (ValueError, "fused", lambda: gc.clip_grad_norm_(params, 1e-3, optimizer=opt, skip_nonfinite=True)),
    ]
    for exc, match, fn in cases:
        with pytest.raises(exc, match=match):
            fn()
        assert all(torch.equal(p.grad, b) for p, b in zip(model.parameters(), before)), match
    assert not hasattr(opt, "grad_scale") and not hasattr(opt, "found_inf")
    # a scaler whose unscale_ already ran for this optimizer this step
    scaler.scale(torch.ones(()))
    scaler.unscale_(opt)
    before = _grads_snapshot(model)
    with pytest.raises(RuntimeError, match="already been called"):
        gc.clip_grad_norm_(params, 1e-3, scaler=scaler, optimizer=opt)
    assert all(torch.equal(p.grad, b) for p, b in zip(model.parameters(), before))


def test_defer_with_a_non_fused_optimizer_warns_once_and_writes():
    from gradclip_cuda import amp
    amp._warned_defer.clear()
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)  # foreach, not fused
    x, y = _batch(0)
    torch.nn.functional.mse_loss(model(x), y).mul(40.0).backward()
    before = _grads_snapshot(model)
    with pytest.warns(UserWarning, match="not one"):
        total = gc.clip_grad_norm_(list(model.parameters()), MAX_NORM, optimizer=opt, defer=True)
    coef = MAX_NORM / (float(total) + 1e-6)
    assert coef < 1
    for p, b in zip(model.parameters(), before):
        torch.testing.assert_close(p.grad, b * coef, rtol=1e-5, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gc.clip_grad_norm_(list(model.parameters()), MAX_NORM, optimizer=opt, defer=True)  # once only


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("defer", [False, True])
def test_clip_and_fused_step_capture_in_a_cuda_graph_without_syncs(defer):
    """The whole step, the clip handed to (or written before) a capturable fused AdamW, in one CUDA graph: three
    steps on the same gradients (an eager warm-up, then two replays) give the parameters of three eager steps, and an
    eager step makes no host sync."""
    import copy
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 8)).cuda()
    twin = copy.deepcopy(model)
    x, y = torch.randn(16, 64, device="cuda"), torch.randn(16, 8, device="cuda")
    for m in (model, twin):
        torch.nn.functional.mse_loss(m(x), y).mul(40.0).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2, fused=True, capturable=True) for m in (model, twin)]

    def step(m, opt):
        for p, g in zip(m.parameters(), grads):
            p.grad.copy_(g)
        gc.clip_grad_norm_(list(m.parameters()), MAX_NORM, optimizer=opt, defer=defer, skip_nonfinite=True)
        opt.step()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step(model, opts[0])  # warm-up on the capture stream: tables, kernels, optimizer state
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(model, opts[0])
    for _ in range(2):
        graph.replay()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            step(twin, opts[1])  # any host sync raises
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
