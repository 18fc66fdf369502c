"""The CUDA kernels on a GPU: launches and host syncs per call, fused vs two launches, CUDA graphs, streams, the plan
cache, alignment. The value tests of test_api.py / test_ops.py run on CUDA too (their `device` fixture)."""

import pytest
import torch

import gradclip_cuda as gc
from bench.counters import device_ops
from conftest import RTOL, assert_close_rel, clone_params, make_grads, ref_coef, ref_total, requires_gpu
from gradclip_cuda import _ops

pytestmark = [pytest.mark.gpu, requires_gpu,
              pytest.mark.skipif(not (_ops.C is not None and _ops.BUILD.get("cuda")), reason="built without CUDA")]

FUSED_ENV = "GRADCLIP_CUDA_FUSED_MAX_BYTES"


@pytest.fixture
def fused_off(monkeypatch):
    monkeypatch.setenv(FUSED_ENV, "0")


def _expected(params, max_norm, p=2.0):
    total = ref_total([q.grad for q in params], p)
    coef = ref_coef(total, max_norm)
    return total, [q.grad.double() * coef for q in params]


def _check(params, total, expected_total, expected_grads):
    assert_close_rel(total, expected_total, RTOL[torch.float32])
    for q, e in zip(params, expected_grads):
        tol = max(RTOL[q.grad.dtype], RTOL[torch.float32]) * 2  # the coefficient carries the fp32-accumulated total
        torch.testing.assert_close(q.grad.double(), e, rtol=tol, atol=1e-30)


@pytest.mark.parametrize("fused", [True, False])
def test_clip_takes_at_most_two_launches_and_never_syncs(monkeypatch, fused):
    if not fused:
        monkeypatch.setenv(FUSED_ENV, "0")
    params = make_grads([(256,)] * 2_000, [torch.float32, torch.bfloat16, torch.float16, torch.float64], "cuda")
    saved = [q.grad.clone() for q in params]
    gc.clip_grad_norm_(params, 1e-3)  # warm-up: module load, plan cache
    for q, s in zip(params, saved):
        q.grad.copy_(s)  # same storage: the cached plan applies
    expected_total, expected = _expected(params, 1e-3)
    names = device_ops(lambda: gc.clip_grad_norm_(params, 1e-3))  # (the profiler synchronises: no debug mode here)
    info = _ops.C.last_cuda_call()
    assert len(names) == (1 if fused else 2), names
    assert info == {"launches": 1 if fused else 2, "fused": fused, "cached": True}
    for q, s in zip(params, saved):
        q.grad.copy_(s)
    torch.cuda.set_sync_debug_mode("error")  # any host sync in the call raises
    try:
        total = gc.clip_grad_norm_(params, 1e-3)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    _check(params, total, expected_total, expected)


def test_norm_scale_and_value_are_one_launch_each_and_never_sync():
    params = make_grads([(1000,), (70_000,), (3,)], [torch.float32], "cuda")
    grads = [q.grad for q in params]
    total = gc.get_total_norm(grads)
    assert len(device_ops(lambda: gc.get_total_norm(grads))) == 1
    assert len(device_ops(lambda: gc.clip_grads_with_norm_(params, 1.0, total))) == 1
    assert len(device_ops(lambda: gc.clip_grad_value_(params, 0.1))) == 1
    torch.cuda.set_sync_debug_mode("error")
    try:
        total = gc.get_total_norm(grads)
        gc.clip_grads_with_norm_(params, 1.0, total)
        gc.clip_grad_value_(params, 0.1)
        gc.ops.multi_tensor_norm(grads, 0.0, True)
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_unclipped_step_writes_nothing_and_still_one_scale_launch(fused_off):
    params = make_grads([(5000,), (77,)], [torch.float16], "cuda")
    before = [q.grad.clone() for q in params]
    gc.clip_grad_norm_(params, 1e9)
    for q, b in zip(params, before):
        assert torch.equal(q.grad, b)


@pytest.mark.parametrize("p", [2.0, 1.0, float("inf"), float("-inf"), 3.0])
def test_fused_and_two_launch_paths_give_the_same_bits(monkeypatch, p):
    a = make_grads([(65_537,), (3, 1000), (1,)], [torch.float32, torch.bfloat16], "cuda", seed=7)
    b = clone_params(a)
    ta = gc.clip_grad_norm_(a, 0.5, p)
    assert _ops.C.last_cuda_call()["fused"]
    monkeypatch.setenv(FUSED_ENV, "0")
    tb = gc.clip_grad_norm_(b, 0.5, p)
    assert not _ops.C.last_cuda_call()["fused"]
    assert torch.equal(ta, tb)
    for x, y in zip(a, b):
        assert torch.equal(x.grad, y.grad)


def test_norm_is_bitwise_repeatable_and_independent_of_the_launch_split():
    grads = make_grads([(300,)] * 2_100, [torch.float32], "cuda", seed=8, params=False)  # 2 launches of tables
    first = gc.get_total_norm(grads)
    assert _ops.C.last_cuda_call()["launches"] == 2
    for _ in range(3):
        assert torch.equal(gc.get_total_norm(grads), first)
    assert_close_rel(first, ref_total(grads, 2.0), RTOL[torch.float32])


def test_spilled_clip_is_correct(fused_off):
    params = make_grads([(257,)] * 2_100, [torch.float32, torch.float16], "cuda", seed=9)
    expected_total, expected = _expected(params, 0.1)
    total = gc.clip_grad_norm_(params, 0.1)
    assert _ops.C.last_cuda_call()["launches"] == 4
    _check(params, total, expected_total, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("offset", [1, 3, 5])
def test_misaligned_views_take_the_scalar_head_and_tail(dtype, offset):
    base = make_grads([(200_003,)], [dtype], "cuda", seed=10, params=False)[0]
    params = []
    for n in (1, 7, 8, 9, 65_537, 100_000):
        q = torch.nn.Parameter(torch.zeros(n, dtype=dtype, device="cuda"))
        q.grad = base[offset:offset + n]  # dense, not 16-byte aligned
        params.append(q)
    # views of one base overlap; give each its own storage but keep the misalignment
    for q in params:
        storage = torch.empty(q.grad.numel() + offset, dtype=dtype, device="cuda")
        storage[offset:].copy_(q.grad)
        q.grad = storage[offset:]
    untouched = base.clone()
    expected_total, expected = _expected(params, 0.25)
    total = gc.clip_grad_norm_(params, 0.25)
    _check(params, total, expected_total, expected)
    assert torch.equal(base, untouched)


def test_cuda_graph_capture_and_replay():
    params = make_grads([(1000,), (65_537,), (33, 7)], [torch.float32, torch.bfloat16], "cuda", seed=11)
    static = [q.grad for q in params]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            gc.clip_grad_norm_(params, 0.5)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        total = gc.clip_grad_norm_(params, 0.5)
    for seed in (12, 13):
        fresh = make_grads([(1000,), (65_537,), (33, 7)], [torch.float32, torch.bfloat16], "cuda", seed=seed)
        for s, f in zip(static, fresh):
            s.copy_(f.grad)
        expected_total, expected = _expected(fresh, 0.5)
        graph.replay()
        torch.cuda.synchronize()
        _check(params, total, expected_total, expected)


def test_concurrent_streams_use_their_own_tickets():
    sets = [make_grads([(5000,)] * 40, [torch.float32], "cuda", seed=20 + i) for i in range(4)]
    expected = [_expected(s, 0.5) for s in sets]
    streams = [torch.cuda.Stream() for _ in sets]
    totals = []
    for s, st in zip(sets, streams):
        st.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(st):
            totals.append(gc.clip_grad_norm_(s, 0.5))
    torch.cuda.synchronize()
    for s, t, (et, eg) in zip(sets, totals, expected):
        _check(s, t, et, eg)


def test_plan_cache_is_reused_only_for_the_same_tensors():
    params = make_grads([(100,), (200,)], [torch.float32], "cuda", seed=30)
    gc.clip_grad_norm_(params, 1e9)
    gc.clip_grad_norm_(params, 1e9)
    assert _ops.C.last_cuda_call()["cached"]
    params[1].grad = params[1].grad.clone()  # new storage
    expected_total, expected = _expected(params, 0.1)
    total = gc.clip_grad_norm_(params, 0.1)
    assert not _ops.C.last_cuda_call()["cached"]
    _check(params, total, expected_total, expected)


def test_auto_backend_takes_the_cuda_kernels():
    params = make_grads([(10,)], [torch.float32], "cuda")
    gc.clip_grad_norm_(params, 1.0)
    assert _ops.C.last_cuda_call()["launches"] >= 1
    assert "cuda" in gc.available_backends()
    with pytest.raises(ValueError, match="backend='cuda' takes CUDA tensors"):
        gc.clip_grad_norm_(make_grads([(3,)], [torch.float32]), 1.0, backend="cuda")
