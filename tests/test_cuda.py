"""The CUDA kernels on a GPU: launches and host syncs per call, fused vs two launches, CUDA graphs, streams, the plan
cache, alignment. The value tests of test_api.py / test_ops.py run on CUDA too (their `device` fixture). What can be
checked without a GPU (host policies, index arithmetic, the built PTX/SASS) is in test_cuda_host.py."""
import os
import sys

import pytest
import torch

import gradclip_cuda as gc
from conftest import (RTOL, assert_close_rel, clone_params, make_grads, ref_coef, ref_total, requires_gpu,
                      total_rtol)
from gradclip_cuda import _ops

pytestmark = [pytest.mark.gpu, requires_gpu,
              pytest.mark.skipif(not (_ops.C is not None and _ops.BUILD.get("cuda")), reason="built without CUDA")]

FUSED_ENV = "GRADCLIP_CUDA_FUSED_MAX_BYTES"
SMALL_TABLES_ENV = "GRADCLIP_CUDA_SMALL_TABLES"


def _counters():
    # bench/ sits beside tests/; a plain `pytest` does not put the checkout on sys.path.
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if root not in sys.path:
        sys.path.insert(0, root)
    from bench import counters
    return counters


def _device_ops(fn):
    """(kernel names, memset names) one call of fn runs on the GPU."""
    c = _counters()
    names = c.device_ops(fn)
    return [n for n in names if c.is_kernel(n)], [n for n in names if n.lower().startswith("memset")]


@pytest.fixture
def fused_off(monkeypatch):
    monkeypatch.setenv(FUSED_ENV, "0")


@pytest.fixture
def fused_on(monkeypatch):
    monkeypatch.delenv(FUSED_ENV, raising=False)


def _info():
    return _ops.C.last_cuda_call()


def _expected(params, max_norm, p=2.0):
    total = ref_total([q.grad for q in params], p)
    coef = ref_coef(total, max_norm)
    return total, [q.grad.double() * coef for q in params]


def _check(params, total, expected_total, expected_grads):
    grads = [q.grad for q in params]
    assert_close_rel(total, expected_total, total_rtol(grads, total.dtype))  # the total's own dtype
    for q, e in zip(params, expected_grads):
        tol = max(RTOL[q.grad.dtype], RTOL[torch.float32]) * 2  # the coefficient carries the fp32-accumulated total
        fi = torch.finfo(q.grad.dtype)
        # one unit in the last place of the subnormal range: a scaled gradient that lands there keeps no relative
        # precision
        torch.testing.assert_close(q.grad.double(), e, rtol=tol, atol=fi.tiny * fi.eps)


@pytest.mark.parametrize("fused", [True, False])
def test_clip_takes_at_most_two_launches_and_never_syncs(monkeypatch, fused):
    if fused:
        monkeypatch.delenv(FUSED_ENV, raising=False)
    else:
        monkeypatch.setenv(FUSED_ENV, "0")
    params = make_grads([(256,)] * 2_000, [torch.float32, torch.bfloat16, torch.float16, torch.float64], "cuda")
    saved = [q.grad.clone() for q in params]
    max_norm = 100.0  # total ~ 740: coefficient ~ 0.13, every scaled gradient stays normal in fp16
    gc.clip_grad_norm_(params, max_norm)  # warm-up: module load, plan cache
    for q, s in zip(params, saved):
        q.grad.copy_(s)  # same storage: the cached plan applies
    expected_total, expected = _expected(params, max_norm)
    kernels, memsets = _device_ops(lambda: gc.clip_grad_norm_(params, max_norm))
    info = _info()
    assert len(kernels) == (1 if fused else 2), kernels
    assert len(memsets) == (0 if fused else 1), memsets  # the two-launch path zeroes its ticket word
    assert info == {"launches": 1 if fused else 2, "memsets": 0 if fused else 1, "fused": fused, "cached": True,
                    "device_table": False}
    for q, s in zip(params, saved):
        q.grad.copy_(s)
    torch.cuda.set_sync_debug_mode("error")  # any host sync in the call raises
    try:
        total = gc.clip_grad_norm_(params, max_norm)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    _check(params, total, expected_total, expected)


def test_norm_scale_and_value_are_one_launch_each_and_never_sync():
    params = make_grads([(1000,), (70_000,), (3,)], [torch.float32], "cuda")
    grads = [q.grad for q in params]
    total = gc.get_total_norm(grads)
    kernels, memsets = _device_ops(lambda: gc.get_total_norm(grads))
    assert len(kernels) == 1 and len(memsets) == 1, (kernels, memsets)
    for fn in (lambda: gc.clip_grads_with_norm_(params, 1.0, total), lambda: gc.clip_grad_value_(params, 0.1)):
        kernels, memsets = _device_ops(fn)
        assert len(kernels) == 1 and not memsets, (kernels, memsets)
    torch.cuda.set_sync_debug_mode("error")
    try:
        total = gc.get_total_norm(grads)
        gc.clip_grads_with_norm_(params, 1.0, total)
        gc.clip_grad_value_(params, 0.1)
        gc.ops.multi_tensor_norm(grads, 0.0, True)
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_unclipped_step_writes_nothing_and_still_one_scale_launch(fused_off):
    # What is observable of "writes nothing" without a write counter: the two-launch clip runs its norm and exactly
    # one scale launch (whose blocks return before touching memory when the coefficient is 1), no copy and no other
    # kernel, and every gradient keeps its bits.
    params = make_grads([(5000,), (77,)], [torch.float16], "cuda")
    before = [q.grad.clone() for q in params]
    gc.clip_grad_norm_(params, 1e9)  # warm-up
    kernels, memsets = _device_ops(lambda: gc.clip_grad_norm_(params, 1e9))
    assert len(kernels) == 2 and len(memsets) == 1, (kernels, memsets)
    assert any("norm_kernel" in k for k in kernels) and any("scale_kernel" in k for k in kernels), kernels
    assert _info() == {"launches": 2, "memsets": 1, "fused": False, "cached": True, "device_table": False}
    for q, b in zip(params, before):
        assert torch.equal(q.grad.view(torch.int16), b.view(torch.int16))


@pytest.mark.parametrize("p", [2.0, 1.0, float("inf"), float("-inf"), 3.0])
def test_fused_and_two_launch_paths_give_the_same_bits(monkeypatch, p):
    monkeypatch.delenv(FUSED_ENV, raising=False)
    a = make_grads([(65_537,), (3, 1000), (1,)], [torch.float32, torch.bfloat16], "cuda", seed=7)
    b = clone_params(a)
    ta = gc.clip_grad_norm_(a, 0.5, p)
    assert _info()["fused"]
    monkeypatch.setenv(FUSED_ENV, "0")
    tb = gc.clip_grad_norm_(b, 0.5, p)
    assert not _info()["fused"]
    assert torch.equal(ta, tb)
    for x, y in zip(a, b):
        assert torch.equal(x.grad, y.grad)


@pytest.mark.parametrize("p", [2.0, 0.0, float("inf")])
@pytest.mark.parametrize("n,mixed", [(300, False), (2_100, False), (2_100, True)])
def test_norm_is_bitwise_independent_of_the_launch_split(monkeypatch, n, mixed, p):
    # One set, cut into different numbers of launches: the default tables (300: one parameter table; 2,100: one
    # device table, where two parameter tables would be) against small tables forced (64 tensors a launch: 5 and
    # 33 launches). Per-tensor norms too. Tensors of 300-643
    # elements are packed (a warp each, 16 to a block); `mixed` puts a larger tensor (block-reduced chunks) every
    # 7th, so that packs are cut short.
    monkeypatch.delenv(SMALL_TABLES_ENV, raising=False)
    shapes = [((70_000 + i) if mixed and i % 7 == 0 else 300 + 7 * (i % 50),) for i in range(n)]
    grads = make_grads(shapes, [torch.float32, torch.bfloat16], "cuda", seed=8, params=False)
    total, each = gc.ops.multi_tensor_norm(grads, p, True)
    launches = _info()["launches"]
    assert launches == 1 and _info()["device_table"] == (n > 2016)
    monkeypatch.setenv(SMALL_TABLES_ENV, "1")
    total_s, each_s = gc.ops.multi_tensor_norm(grads, p, True)
    assert _info()["launches"] >= -(-n // 64) > launches
    assert torch.equal(total, total_s) and torch.equal(each, each_s)
    for _ in range(2):
        assert torch.equal(gc.ops.multi_tensor_norm(grads, p, True)[0], total)
    assert_close_rel(total, ref_total(grads, p), RTOL[torch.float32])
    for g, e in zip(grads, each):
        assert_close_rel(e, torch.linalg.vector_norm(g.double().cpu().flatten(), p), RTOL[torch.float32])


def test_many_small_tensors_are_clipped_right(fused_off):
    # 5,000 tensors of 256 elements: packs of 16 (313 blocks of one device table), each tensor scaled by its warp.
    params = make_grads([(256,)] * 5_000, [torch.float32, torch.float16], "cuda", seed=33)
    expected_total, expected = _expected(params, 10.0)
    total = gc.clip_grad_norm_(params, 10.0)
    assert _info()["launches"] == 2 and _info()["device_table"]  # norm and scale (three parameter tables: six)
    _check(params, total, expected_total, expected)
    total = gc.clip_grad_norm_(params, 10.0)  # the uploaded table, cached
    assert _info()["launches"] == 2 and _info()["cached"] and _info()["device_table"]


@pytest.mark.parametrize("n", [2_017, 10_000])
def test_up_to_ten_thousand_tensors_take_one_fused_launch_where_it_fits(fused_on, n):
    params = make_grads([(100 + i % 300,) for i in range(n)], [torch.float32, torch.bfloat16], "cuda", seed=34)
    expected_total, expected = _expected(params, 0.5)
    total = gc.clip_grad_norm_(params, 0.5)
    info = _info()
    assert info["device_table"] and info["launches"] == (1 if info["fused"] else 2), info
    assert info["fused"]  # a few MB: within half of L2 on the GPUs this runs on
    _check(params, total, expected_total, expected)


def test_device_table_read_from_another_stream_and_graph_replays(fused_off):
    # Uploaded on the default stream; read from a side stream (which waits for the copy), then captured once the
    # copy is done, and replayed with new gradient values.
    params = make_grads([(300,)] * 3_000, [torch.float32], "cuda", seed=35)
    gc.clip_grad_norm_(params, 1e9)
    assert _info()["device_table"] and not _info()["cached"]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    fresh = make_grads([(300,)] * 3_000, [torch.float32], "cuda", seed=36)
    with torch.cuda.stream(side):
        for q, f in zip(params, fresh):
            q.grad.copy_(f.grad)
        expected_total, expected = _expected(params, 0.5)
        total = gc.clip_grad_norm_(params, 0.5)
        assert _info()["device_table"] and _info()["cached"]
    torch.cuda.current_stream().wait_stream(side)
    _check(params, total, expected_total, expected)
    torch.cuda.synchronize()
    _warm_up(params, 0.5)
    graph, total, info = _capture_clip(params, 0.5)
    assert info["device_table"] and info["launches"] == 2, info
    _replay_with_new_values(graph, params, total, 0.5, [(300,)] * 3_000, [torch.float32], (37, 38))


def test_a_new_large_set_captured_without_warm_up_takes_parameter_tables(fused_off):
    params = make_grads([(64,)] * 2_500, [torch.float32], "cuda", seed=39)
    expected_total, expected = _expected(params, 0.5)
    graph, total, info = _capture_clip(params, 0.5)
    assert not info["device_table"] and info["launches"] == 4, info  # two parameter tables, norm and scale
    graph.replay()
    torch.cuda.synchronize()
    _check(params, total, expected_total, expected)


def test_clip_split_into_many_launches_matches_one_fused_launch(monkeypatch):
    monkeypatch.delenv(FUSED_ENV, raising=False)
    monkeypatch.delenv(SMALL_TABLES_ENV, raising=False)
    a = make_grads([(1000 + i,) for i in range(200)], [torch.float32, torch.float16], "cuda", seed=5)
    b = clone_params(a)
    ta = gc.clip_grad_norm_(a, 0.5)
    assert _info()["fused"] and _info()["launches"] == 1
    monkeypatch.setenv(SMALL_TABLES_ENV, "1")
    tb = gc.clip_grad_norm_(b, 0.5)
    assert not _info()["fused"] and _info()["launches"] == 2 * 4  # 4 tables of 64: norm and scale each
    assert torch.equal(ta, tb)
    for x, y in zip(a, b):
        assert torch.equal(x.grad, y.grad)


def test_spilled_clip_is_correct(fused_off):
    params = make_grads([(257,)] * 2_100, [torch.float32, torch.float16], "cuda", seed=9)
    expected_total, expected = _expected(params, 0.1)
    total = gc.clip_grad_norm_(params, 0.1)
    assert _info()["launches"] == 2 and _info()["memsets"] == 1 and _info()["device_table"]
    _check(params, total, expected_total, expected)


GUARD = 16  # elements of guard on each side of a misaligned view (a multiple of 16 bytes for every element size)
SENTINEL = -7.5  # exact in every dtype, and changed by any coefficient but 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("offset", [1, 3, 5])
def test_misaligned_views_take_the_scalar_head_and_tail(dtype, offset):
    sizes = (1, 7, 8, 9, 65_537, 100_000)
    source = make_grads([(n,) for n in sizes], [dtype], "cuda", seed=10, params=False)
    params, storages = [], []
    for g in source:
        storage = torch.full((GUARD + offset + g.numel() + GUARD,), SENTINEL, dtype=dtype, device="cuda")
        view = storage[GUARD + offset:GUARD + offset + g.numel()]  # dense, `offset` elements off 16-byte alignment
        view.copy_(g)
        q = torch.nn.Parameter(torch.zeros_like(g))
        q.grad = view
        params.append(q)
        storages.append(storage)
    expected_total, expected = _expected(params, 0.25)
    total = gc.clip_grad_norm_(params, 0.25)
    _check(params, total, expected_total, expected)
    for q, storage in zip(params, storages):
        n = q.grad.numel()
        assert bool((storage[:GUARD + offset] == SENTINEL).all()), "bytes before a view were written"
        assert bool((storage[GUARD + offset + n:] == SENTINEL).all()), "bytes after a view were written"


def _capture_clip(params, max_norm, pool=None):
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        total = gc.clip_grad_norm_(params, max_norm)
        info = _info()  # read inside the capture: the path the captured call took
    return graph, total, info


def _replay_with_new_values(graph, params, total, max_norm, shapes, dtypes, seeds):
    """Replays a captured clip of ``params`` after writing new gradient values in place, checking each replay."""
    for seed in seeds:
        fresh = make_grads(shapes, dtypes, "cuda", seed=seed)
        for q, f in zip(params, fresh):
            q.grad.copy_(f.grad)
        expected_total, expected = _expected(fresh, max_norm)
        graph.replay()
        torch.cuda.synchronize()
        _check(params, total, expected_total, expected)


def _warm_up(params, max_norm):
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            gc.clip_grad_norm_(params, max_norm)
    torch.cuda.current_stream().wait_stream(side)
    return _info()


GRAPH_SHAPES = [(1000,), (65_537,), (33, 7)] + [(300_000,)] * 8  # ~40 chunks: grids that overlap with others'


@pytest.mark.parametrize("fused", [True, False])
def test_cuda_graph_capture_and_replay(monkeypatch, fused):
    if fused:
        monkeypatch.delenv(FUSED_ENV, raising=False)
    else:
        monkeypatch.setenv(FUSED_ENV, "0")
    dtypes = [torch.float32, torch.bfloat16]
    params = make_grads(GRAPH_SHAPES, dtypes, "cuda", seed=11)
    eager = _warm_up(params, 0.5)
    assert eager["fused"] == fused
    graph, total, info = _capture_clip(params, 0.5)
    # Under capture the fused path is taken only where an eager fused launch succeeded before (the warm-up).
    assert info["fused"] == fused and info["memsets"] == (0 if fused else 1), info
    _replay_with_new_values(graph, params, total, 0.5, GRAPH_SHAPES, dtypes, (12, 13, 14))


def test_more_captures_than_the_old_ticket_slots_replay_concurrently(fused_off):
    # 2,049 captured launches: with a static array of 2,048 captured ticket slots the first and the last shared one,
    # and their grids, replayed at once on two streams, finished early or left it non-zero. Each call now has its own
    # counter in its scratch.
    a = make_grads([(300_000,)] * 16, [torch.float32], "cuda", seed=40)
    b = make_grads([(300_000,)] * 16, [torch.float32], "cuda", seed=41)
    tiny = make_grads([(10,)], [torch.float32], "cuda", seed=42)
    _warm_up(a, 1e9)
    _warm_up(b, 1e9)
    _warm_up(tiny, 1e9)
    graph_a, total_a, info_a = _capture_clip(a, 1e9)
    assert not info_a["fused"] and info_a["memsets"] == 1
    keep, pool = [], None
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # capture_begin/end directly: torch.cuda.graph collects garbage at every entry
        for _ in range(2_047):
            g = torch.cuda.CUDAGraph()
            g.capture_begin(pool=pool)  # never replayed: they may share a pool
            gc.clip_grad_norm_(tiny, 1e9)
            g.capture_end()
            pool = pool or g.pool()
            keep.append(g)
    torch.cuda.current_stream().wait_stream(side)
    graph_b, total_b, _ = _capture_clip(b, 1e9)
    ea, eb = ref_total([q.grad for q in a], 2.0), ref_total([q.grad for q in b], 2.0)
    sa, sb = torch.cuda.Stream(), torch.cuda.Stream()
    for _ in range(20):
        sa.wait_stream(torch.cuda.current_stream())
        sb.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(sa):
            graph_a.replay()
        with torch.cuda.stream(sb):
            graph_b.replay()
        torch.cuda.synchronize()
        assert_close_rel(total_a, ea, RTOL[torch.float32])
        assert_close_rel(total_b, eb, RTOL[torch.float32])


def test_concurrent_streams_use_their_own_tickets(fused_off):
    sets = [make_grads([(300_000,)] * 12, [torch.float32], "cuda", seed=20 + i) for i in range(4)]  # ~60 chunks each
    expected = [_expected(s, 0.5) for s in sets]
    streams = [torch.cuda.Stream() for _ in sets]
    totals = []
    for s, st in zip(sets, streams):
        st.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(st):
            totals.append(gc.clip_grad_norm_(s, 0.5))
            assert _info()["fused"] is False and _info()["memsets"] == 1
    torch.cuda.synchronize()
    for s, t, (et, eg) in zip(sets, totals, expected):
        _check(s, t, et, eg)


def test_plan_cache_is_reused_only_for_the_same_tensors():
    params = make_grads([(100,), (200,)], [torch.float32], "cuda", seed=30)
    gc.clip_grad_norm_(params, 1e9)
    gc.clip_grad_norm_(params, 1e9)
    assert _info()["cached"]
    params[1].grad = params[1].grad.clone()  # new storage
    expected_total, expected = _expected(params, 0.1)
    total = gc.clip_grad_norm_(params, 0.1)
    assert not _info()["cached"]
    _check(params, total, expected_total, expected)


def test_write_pass_does_not_reuse_tables_of_a_norm_without_skip_flags():
    # A gradient listed twice: the norm counts it twice (torch's composition); an in-place pass scales it once. The
    # norm's cached tables carry no skip flags, so the scale that follows must build its own.
    g = make_grads([(1000,)], [torch.float32], "cuda", seed=31, params=False)[0]
    other = make_grads([(500,)], [torch.float32], "cuda", seed=32, params=False)[0]
    grads = [g, other, g]
    total = gc.ops.multi_tensor_norm(grads, 2.0, False)[0]
    expected_total = ref_total(grads, 2.0)
    assert_close_rel(total, expected_total, RTOL[torch.float32])
    coef = ref_coef(expected_total, 1.0)
    expected_g, expected_other = g.double() * coef, other.double() * coef
    gc.ops.multi_tensor_scale_(grads, total, 1.0)
    assert not _info()["cached"]
    torch.testing.assert_close(g.double(), expected_g, rtol=4e-5, atol=0)  # scaled once, not twice
    torch.testing.assert_close(other.double(), expected_other, rtol=4e-5, atol=0)
    gc.ops.multi_tensor_norm(grads, 2.0, False)
    assert _info()["cached"]  # tables with skip flags serve a norm


def test_auto_backend_takes_the_cuda_kernels(fused_on, monkeypatch):
    # Leave a state no single clip produces (three launches), so a clip that bypassed the CUDA kernels shows.
    monkeypatch.setenv(SMALL_TABLES_ENV, "1")
    gc.ops.multi_tensor_norm(make_grads([(10,)] * 130, [torch.float32], "cuda", params=False), 2.0, False)
    assert _info()["launches"] == 3
    monkeypatch.delenv(SMALL_TABLES_ENV)
    params = make_grads([(10,)], [torch.float32], "cuda")
    expected_total, expected = _expected(params, 1.0)
    total = gc.clip_grad_norm_(params, 1.0)
    info = _info()
    assert info["launches"] == (1 if info["fused"] else 2) and not info["cached"], info
    _check(params, total, expected_total, expected)
    assert "cuda" in gc.available_backends()
    with pytest.raises(ValueError, match="backend='cuda' takes CUDA tensors"):
        gc.clip_grad_norm_(make_grads([(3,)], [torch.float32]), 1.0, backend="cuda")


# ---- clipping policies on the GPU: launches, syncs, graphs ----

def test_policy_ops_launch_once_and_never_sync():
    params = make_grads([(300,), (64, 70), (5,)] * 40, [torch.float32, torch.bfloat16], "cuda", seed=21)
    for q in params:
        q.data = torch.randn_like(q.grad)
    grads = [q.grad for q in params]
    coefs = torch.rand(len(grads), device="cuda")
    calls = {
        "mul": lambda: gc.ops.multi_tensor_mul_(grads, coefs),
        "per-tensor scale": lambda: gc.ops.multi_tensor_scale_(grads, coefs * 100, 1.0, 0.0),
        "agc": lambda: gc.ops.adaptive_clip_grad_(grads, [q.detach() for q in params], 0.01, 1e-3, 2.0, 0),
    }
    for name, fn in calls.items():
        fn()
        kernels, memsets = _device_ops(fn)
        assert len(kernels) == 1 and not memsets, (name, kernels, memsets)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for fn in calls.values():
            fn()
        gc.clip_grad_norm_per_tensor_(params, 1.0)
        gc.adaptive_clip_grad_(params)
        gc.clip_grad_norm_(params, 1.0, eps=0.0)
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_agc_over_more_tensors_than_one_table_matches_the_cpu():
    params = make_grads([(i % 9 + 1, 33) for i in range(1_300)], [torch.float32, torch.float16], "cuda", seed=22,
                        scale=20.0)
    for q in params:
        q.data = torch.randn_like(q.grad)
    cpu = [(q.grad.cpu(), q.detach().cpu()) for q in params]
    gc.adaptive_clip_grad_(params)
    gc.ops.adaptive_clip_grad_([g for g, _ in cpu], [w for _, w in cpu], 0.01, 1e-3, 2.0, 0)
    for q, (g, _) in zip(params, cpu):
        torch.testing.assert_close(q.grad.cpu(), g, rtol=2 * RTOL[q.grad.dtype], atol=1e-6)


@pytest.mark.parametrize("policy", ["fixed", "autoclip", "zclip"])
def test_grad_clipper_step_captures_in_a_cuda_graph(policy):
    from gradclip_cuda import GradClipper
    params = make_grads([(1000,), (300, 7)], [torch.float32], "cuda", seed=23)
    clipper = GradClipper(policy, max_norm=5.0, warmup_steps=2, history=8)
    eager = GradClipper(policy, max_norm=5.0, warmup_steps=2, history=8)
    twins = clone_params(params)
    clipper(params)  # eager: the state moves to the device, tables are built
    eager(twins)
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.cuda.graph(graph):
        total = clipper(params)
    torch.cuda.current_stream().wait_stream(stream)
    for seed in (24, 25, 26, 27):
        fresh = make_grads([(1000,), (300, 7)], [torch.float32], "cuda", seed=seed, scale=1.0 + seed % 3)
        for q, t, f in zip(params, twins, fresh):
            q.grad.copy_(f.grad)
            t.grad.copy_(f.grad)
        graph.replay()
        expected = eager(twins)
        torch.cuda.synchronize()
        assert torch.equal(total, expected), policy
        assert torch.equal(clipper.threshold, eager.threshold), policy
        for q, t in zip(params, twins):
            assert torch.equal(q.grad, t.grad), policy
