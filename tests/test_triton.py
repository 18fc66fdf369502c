"""The Triton backend against torch and a float64 reference. On the CPU its kernels run under TRITON_INTERPRET=1
(set here before Triton is imported: slow, exact), on small sets; on a GPU they compile. torch.compile and CUDA-graph
tests of this path need a GPU."""
import math
import os

import pytest
import torch

triton = pytest.importorskip("triton")

import gradclip_cuda as gc  # noqa: E402
from conftest import (RTOL, assert_close_rel, clone_params, make_grads, ref_coef, ref_total, requires_gpu,  # noqa: E402
                      total_rtol)
from gradclip_cuda import _ops  # noqa: E402
from gradclip_cuda import triton as gt  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1",
                                reason="Triton on the CPU needs TRITON_INTERPRET=1 before triton is imported")

# Odd sizes, 0-d, empty, and both sides of the chunk (65536 elements); small enough for the interpreter.
SHAPES = [(), (1,), (7,), (33, 5), (2049,), (65_535,), (65_537,)]
MIXED = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
DTYPE_SETS = [[torch.float32], [torch.bfloat16], [torch.float64], MIXED]


def _shapes(p):
    return SHAPES if (math.isinf(p) or p < 0) else SHAPES + [(0,), (3, 0)]


@pytest.mark.parametrize("dtypes", DTYPE_SETS, ids=lambda d: "+".join(str(x)[6:] for x in d))
@pytest.mark.parametrize("p", [2.0, 1.0, math.inf, -math.inf, 0.0, 3.0, -1.5])
def test_total_norm(p, dtypes):
    xs = make_grads(_shapes(p), dtypes, DEVICE, seed=1, params=False)
    ours = gc.get_total_norm(xs, p, backend="triton")
    theirs = torch.nn.utils.get_total_norm(xs, p)
    assert ours.dtype == theirs.dtype and ours.device == theirs.device and ours.shape == ()
    if p == 0:
        assert float(ours) == float(ref_total(xs, p)) == float(theirs)
    else:
        assert_close_rel(ours, ref_total(xs, p), total_rtol(xs, ours.dtype))


@pytest.mark.parametrize("dtypes", DTYPE_SETS, ids=lambda d: "+".join(str(x)[6:] for x in d))
@pytest.mark.parametrize("clipped", [True, False])
def test_clip_grad_norm(dtypes, clipped):
    params = make_grads(SHAPES + [(0,)], dtypes, DEVICE, seed=2)
    grads = [q.grad for q in params]
    total64 = ref_total(grads, 2.0)
    max_norm = float(total64) * (0.3 if clipped else 2.0)
    before = [g.clone() for g in grads]
    coef = ref_coef(total64, max_norm)
    total = gc.clip_grad_norm_(params, max_norm, backend="triton")
    assert_close_rel(total, total64, total_rtol(grads, total.dtype))
    for q, b in zip(params, before):
        if not clipped:
            assert torch.equal(q.grad, b)  # coefficient 1: nothing written
        else:
            rtol = max(RTOL[q.grad.dtype], total_rtol(grads, total.dtype)) * 2  # the coefficient carries the total's
            torch.testing.assert_close(q.grad.double(), b.double() * coef, rtol=rtol, atol=1e-30)


def test_float32_clip_is_bitwise_torch_given_the_same_total():
    params = make_grads([(1000,), (65_537,)], [torch.float32], DEVICE, seed=3)
    theirs = clone_params(params)
    total = gc.clip_grad_norm_(params, 0.5, backend="triton")
    torch.nn.utils.clip_grads_with_norm_(theirs, 0.5, total)
    for a, b in zip(params, theirs):
        assert torch.equal(a.grad, b.grad)


def test_per_tensor_norms_and_the_ops_directly():
    xs = make_grads([(5,), (65_537,), (0,), (3, 3)], [torch.float32, torch.bfloat16], DEVICE, seed=4, params=False)
    total, each = gt.multi_tensor_norm(xs, 2.0, True)
    ref_each = torch.stack([torch.linalg.vector_norm(x.double(), 2.0) for x in xs])  # float64
    theirs = torch.stack([torch.linalg.vector_norm(x, 2.0).to(each.dtype) for x in xs])  # torch's, per tensor
    assert each.dtype == theirs.dtype == torch.float32 and each.shape == (4,)
    torch.testing.assert_close(each.double(), ref_each, rtol=RTOL[torch.float32], atol=0)
    for x, e, t in zip(xs, each, theirs):  # torch rounds each norm to the tensor's dtype
        assert_close_rel(e, t, RTOL[x.dtype])
    assert_close_rel(total, ref_total(xs, 2.0), total_rtol(xs, total.dtype))
    assert_close_rel(total, torch.nn.utils.get_total_norm(xs, 2.0), RTOL[torch.bfloat16])  # torch's bf16 norms
    assert torch.ops.gradclip_cuda.triton_clip_grad_norm_.default is not None


@pytest.mark.parametrize("p", [2.0, 0.0, math.inf, 3.0])
def test_per_tensor_norms_of_many_tensors_in_blocks(p):
    """The finishing program reduces tensors TBLOCK at a time, chunk partials CBLOCK at a time: more tensors than a
    block, tensors of more chunks than CBLOCK, empty ones (not for inf); bitwise the same on a second run."""
    shapes = [(1 + (i * 37) % 300,) for i in range(gt.TBLOCK + 45)]
    shapes[3] = (gt.CHUNK * (gt.CBLOCK + 1) + 5,)
    shapes[gt.TBLOCK + 2] = (gt.CHUNK * 2,)
    if p != math.inf:
        shapes[7] = (0,)
    xs = make_grads(shapes, [torch.float32, torch.float16], DEVICE, seed=21, params=False)
    for x in xs[::5]:
        x.zero_()
    total, each = gt.multi_tensor_norm(xs, p, True)
    ref_each = torch.stack([torch.linalg.vector_norm(x.double(), p) for x in xs])
    torch.testing.assert_close(each.double(), ref_each, rtol=RTOL[torch.float16], atol=0)
    assert_close_rel(total, ref_total(xs, p), total_rtol(xs, total.dtype))
    total2, each2 = gt.multi_tensor_norm(xs, p, True)
    assert torch.equal(each, each2) and torch.equal(total, total2)


def test_clip_grad_value_and_nonfinite():
    params = make_grads([(7,), (2049,)], MIXED, DEVICE, seed=5, scale=3.0)
    params[0].grad[0] = float("nan")
    theirs = clone_params(params)
    gc.clip_grad_value_(params, 1.25, backend="triton")
    torch.nn.utils.clip_grad_value_(theirs, 1.25)
    for a, b in zip(params, theirs):
        assert torch.equal(a.grad, b.grad) or torch.allclose(a.grad, b.grad, equal_nan=True, rtol=0, atol=0)
    nan_total = gc.get_total_norm([params[0].grad], math.inf, backend="triton")
    assert math.isnan(float(nan_total))


def test_noncontiguous_and_repeated_grads():
    base = make_grads([(40, 30)], [torch.float32], DEVICE, seed=6, params=False)[0]
    q = torch.nn.Parameter(torch.zeros(30, 40, device=DEVICE))
    q.grad = base.t()  # dense, transposed
    r = torch.nn.Parameter(torch.zeros(20, 15, device=DEVICE))
    r.grad = make_grads([(20, 30)], [torch.float32], DEVICE, seed=7, params=False)[0][:, ::2]  # gapped
    expected_total = ref_total([q.grad, r.grad, q.grad], 2.0)
    before = [q.grad.clone(), r.grad.clone()]
    total = gc.clip_grad_norm_([q, r, q], 0.1, backend="triton")  # q listed twice: counted twice, scaled once
    assert_close_rel(total, expected_total, 1e-5)
    coef = ref_coef(expected_total, 0.1)
    torch.testing.assert_close(q.grad.double(), before[0].double() * coef, rtol=1e-5, atol=0)
    torch.testing.assert_close(r.grad.double(), before[1].double() * coef, rtol=1e-5, atol=0)


def _params(grads):
    out = []
    for g in grads:
        q = torch.nn.Parameter(torch.zeros(g.shape, dtype=g.dtype, device=g.device))
        q.grad = g
        out.append(q)
    return out


@pytest.mark.parametrize("op", ["clip", "scale", "value"])
def test_contained_gradients_are_written_once(op):
    """Contiguous repeats apart from each other ([q, r, q]) and same-start views (base[:50] beside base): counted
    in the norm each time, written once (the skip bit of the chunk table's rows)."""
    q, r, base = make_grads([(70,), (65_537,), (100,)], [torch.float32], DEVICE, seed=12, params=False)
    grads = [q, r, q, base[:50], base, base[10:20]]
    before = {id(g): g.clone() for g in (q, r, base)}
    expected_total = ref_total(grads, 2.0)
    if op == "clip":
        total = gc.clip_grad_norm_(_params(grads), 0.1, backend="triton")
        assert_close_rel(total, expected_total, 1e-5)
    elif op == "scale":
        gc.clip_grads_with_norm_(_params(grads), 0.1, expected_total.float(), backend="triton")
    else:
        gc.clip_grad_value_(_params(grads), 0.6, backend="triton")
    for g in (q, r, base):
        b = before[id(g)]
        if op == "value":
            assert torch.equal(g, b.clamp(-0.6, 0.6))
        else:
            torch.testing.assert_close(g.double(), b.double() * ref_coef(expected_total, 0.1), rtol=1e-5, atol=0)


def test_partly_overlapping_gradients_refused_by_in_place_ops_not_by_the_norm():
    base = make_grads([(100,)], [torch.float32], DEVICE, seed=13, params=False)[0]
    grads = [base[:60], base[40:]]
    before = base.clone()
    for call in (lambda: gt.clip_grad_norm_(grads, 1e-3, 2.0), lambda: gt.clip_grad_value_(grads, 1e-3),
                 lambda: gt.multi_tensor_scale_(grads, torch.tensor(1e3), 1e-3)):
        with pytest.raises(RuntimeError, match="share part of their memory"):
            call()
        assert torch.equal(base, before)
    total, _ = gt.multi_tensor_norm(grads, 2.0)
    assert_close_rel(total, ref_total(grads, 2.0), 1e-5)


def test_scale_writes_nothing_when_the_coefficient_is_1():
    """A signaling NaN is quieted by any multiplication, by 1.0 included: its bits show whether the scale kernel
    wrote (its `coef != 1` exit). Passed with a total whose coefficient is 1."""
    g = torch.tensor([0x7F800001, 0x3F800000, -0x80000000, 0x00000001], dtype=torch.int32).view(torch.float32)
    g = torch.cat([g, torch.randn(3000)]).to(DEVICE)
    bits = g.view(torch.int32).clone()
    gt.multi_tensor_scale_([g], torch.tensor(0.5), 1.0)
    assert torch.equal(g.view(torch.int32), bits)
    gt.multi_tensor_scale_([g], torch.tensor(4.0), 1.0)  # coefficient below 1: written, the NaN quieted
    assert int(g.view(torch.int32)[0]) == 0x7FC00001


def test_table_is_cached_for_the_same_tensors():
    xs = make_grads([(10,), (20,)], [torch.float32], DEVICE, seed=8, params=False)
    ys = [xs[0], xs[1].clone()]
    gc.get_total_norm(xs, backend="triton")
    table = gt._tables[xs[0].device][gt._key(xs, 2.0)].table
    gc.get_total_norm(ys, backend="triton")
    gc.get_total_norm(xs, backend="triton")  # alternating sets: both cached
    assert gt._tables[xs[0].device][gt._key(xs, 2.0)].table is table
    assert gt._key(ys, 2.0) in gt._tables[xs[0].device]


def test_tiny_gradients_general_p():
    """|x|^3 of x = 1e-20 is 1e-60: zero in float32 (and under 2^-126 flushed by ex2.approx.ftz on a GPU); the
    general p-norm is computed in float64."""
    xs = [torch.full((100,), 1e-20, device=DEVICE), torch.full((3,), -3e-14, device=DEVICE)]
    for p in (3.0, 2.5, -1.5):
        total, each = gt.multi_tensor_norm(xs, p, True)
        assert_close_rel(total, ref_total(xs, p), 1e-5, f"p={p}")
        torch.testing.assert_close(each.double(), torch.stack([torch.linalg.vector_norm(x.double(), p) for x in xs]),
                                   rtol=1e-5, atol=0)


EDGE_SETS = {
    "p0-zero-and-partly-zero": ([[0.0] * 5, [0.0, 1.0, 0.0], [0.0, -0.0], [2.0, -3.0]], [0.0]),
    "nan": ([[1.0, float("nan"), 2.0], [3.0]], [-math.inf, 3.0, -1.5, 2.0, math.inf]),
    "inf": ([[1.0, float("inf"), -2.0], [3.0]], [-math.inf, 3.0, -1.5, 2.0, 1.0, 0.0]),
    "all-zero": ([[0.0] * 4, [-0.0, 0.0]], [2.0, 1.0, math.inf, -math.inf, 0.0, 3.0, -1.0]),
    "signed-zeros": ([[0.0, -0.0, 1.0]], [-1.0, -3.0, -math.inf, 2.0]),
    "total-near-1e-7": ([[6e-8, -8e-8], [1e-9] * 7], [2.0, 1.0, math.inf]),
}


def _bits_of(t):
    return t.view(torch.int64 if t.dtype == torch.float64 else torch.int32)


@pytest.mark.parametrize("name", list(EDGE_SETS))
def test_edge_values_against_torch_and_float64(name):
    values, ps = EDGE_SETS[name]
    for dtype in (torch.float32, torch.float64):
        grads = [torch.tensor(v, dtype=dtype, device=DEVICE) for v in values]
        for p in ps:
            expected = ref_total(grads, p)
            ours = gc.get_total_norm(grads, p, backend="triton")
            theirs = torch.nn.utils.get_total_norm(grads, p)
            msg = f"{name} p={p} {dtype}"
            assert_close_rel(ours, expected, total_rtol(grads, ours.dtype), msg)
            assert_close_rel(ours, theirs, total_rtol(grads, ours.dtype), msg + " vs torch")
            for max_norm in (0.0, 1e-7, 1.0):
                ps_ours, ps_theirs = _params([g.clone() for g in grads]), _params([g.clone() for g in grads])
                t_ours = gc.clip_grad_norm_(ps_ours, max_norm, p, backend="triton")
                t_theirs = torch.nn.utils.clip_grad_norm_(ps_theirs, max_norm, p)
                assert_close_rel(t_ours, t_theirs, total_rtol(grads, t_ours.dtype), msg + f" clip {max_norm}")
                coef = ref_coef(expected, max_norm) if not math.isnan(float(expected)) else float("nan")
                for a, b, g in zip(ps_ours, ps_theirs, grads):
                    torch.testing.assert_close(a.grad.double(), g.double() * coef, rtol=2e-5, atol=0, equal_nan=True,
                                               msg=msg)
                    torch.testing.assert_close(a.grad, b.grad, rtol=2e-5, atol=0, equal_nan=True, msg=msg)
                    if coef == 1:  # nothing written: bitwise the gradient, signed zeros included
                        assert torch.equal(_bits_of(a.grad), _bits_of(g)), msg
        for clip_value in (0.0, 1.5):
            ps_ours, ps_theirs = _params([g.clone() for g in grads]), _params([g.clone() for g in grads])
            gc.clip_grad_value_(ps_ours, clip_value, backend="triton")
            torch.nn.utils.clip_grad_value_(ps_theirs, clip_value)
            for a, b in zip(ps_ours, ps_theirs):
                assert torch.equal(a.grad.isnan(), b.grad.isnan())
                assert torch.equal(_bits_of(torch.nan_to_num(a.grad)), _bits_of(torch.nan_to_num(b.grad)))


TRACE = """
import os, sys
os.environ.pop("TRITON_INTERPRET", None)  # real JIT kernels: what torch.compile meets on a GPU
import torch
import gradclip_cuda as gc
import gradclip_cuda.triton  # the kernels are JIT ones now; the API's device check below looks at the variable
os.environ["TRITON_INTERPRET"] = "1"
graphs = []
def backend(gm, example_inputs):
    from torch._dynamo.backends.common import aot_autograd
    def forward(g, _):
        graphs.append(g.code)
        return lambda *args: (_ for _ in ()).throw(SystemExit(0))  # traced only: no GPU to run on
    return aot_autograd(fw_compiler=forward)(gm, example_inputs)
ps = []
for n in (1000, 70000):
    q = torch.nn.Parameter(torch.zeros(n)); q.grad = torch.randn(n); ps.append(q)
try:
    torch.compile(lambda ps: gc.clip_grad_norm_(ps, 0.5, backend="triton"), fullgraph=True, backend=backend)(ps)
except SystemExit:
    pass
print(graphs[0])
"""


def test_torch_compile_keeps_the_triton_ops_opaque():
    """The traced graph calls the clip op itself (functionalized: its writes to the gradients known), not its kernels:
    traced into, the scale kernel's writes through the chunk table's pointers would vanish from the graph."""
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-c", TRACE], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    graph = out.stdout
    assert "gradclip_cuda.triton_clip_grad_norm_" in graph and "triton_kernel_wrapper" not in graph
    assert "auto_functionalized" in graph and "_xs_length = 2" in graph  # its writes to both gradients are known


def test_triton_backend_refuses_cpu_tensors_outside_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    params = make_grads([(4,)], [torch.float32], "cpu", seed=11)
    before = params[0].grad.clone()
    with pytest.raises(ValueError, match="backend='triton' takes CUDA tensors"):
        gc.clip_grad_norm_(params, 1e-3, backend="triton")
    assert torch.equal(params[0].grad, before)


def test_errors_before_any_write():
    xs = make_grads([(4,), (5,)], [torch.float32], DEVICE, seed=9, params=False)
    before = [x.clone() for x in xs]
    with pytest.raises(RuntimeError, match="Expected a floating point"):
        gt.clip_grad_norm_(xs + [torch.arange(3, device=DEVICE)], 1e-3, 2.0)
    with pytest.raises(RuntimeError, match="does not have an identity"):
        gt.clip_grad_norm_(xs + [torch.ones(0, device=DEVICE)], 1e-3, math.inf)
    for x, b in zip(xs, before):
        assert torch.equal(x, b)


def _ref_clip(grads64, max_norm, p=2.0):
    """One clip of float64 copies: (new grads, total)."""
    total = ref_total(grads64, p)
    coef = ref_coef(total, max_norm)
    return [g * coef for g in grads64], total


def _check_grads(params, grads64, rtol=1e-5):
    for q, g in zip(params, grads64):
        torch.testing.assert_close(q.grad.double().cpu(), g, rtol=rtol, atol=1e-30)


@requires_gpu
def test_triton_under_torch_compile_and_cuda_graphs():
    """Gradients, not just the total, after a torch.compile'd clip, an eager one, and a graph replay."""
    params = make_grads([(1000,), (65_537,)], [torch.float32], "cuda", seed=10, scale=0.01)
    ref = [q.grad.double().cpu() for q in params]
    total = torch.compile(lambda ps: gc.clip_grad_norm_(ps, 0.5, backend="triton"), fullgraph=True)(params)
    ref, expected_total = _ref_clip(ref, 0.5)
    assert_close_rel(total, expected_total, 1e-5)
    _check_grads(params, ref)
    for q in params:
        q.grad.mul_(3.0)  # clipped again below
    ref = [g * 3.0 for g in ref]
    gc.clip_grad_norm_(params, 0.5, backend="triton")  # warm-up: the table is cached before capture
    ref, _ = _ref_clip(ref, 0.5)
    _check_grads(params, ref)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        t = gc.clip_grad_norm_(params, 0.5, backend="triton")
    for step in range(3):
        for q in params:
            q.grad.mul_(2.0)
        ref = [g * 2.0 for g in ref]
        graph.replay()
        torch.cuda.synchronize()
        ref, expected_total = _ref_clip(ref, 0.5)
        assert_close_rel(t, expected_total, 1e-5, f"replay {step}")
        _check_grads(params, ref, rtol=1e-5 * (step + 2))


@requires_gpu
def test_graph_replay_after_other_sets_evicted_the_cache():
    """The captured launches hold the chunk table's address: other tensor sets used eagerly between capture and
    replay must not free it (it is pinned in the cache), and each launch has its own ticket counter."""
    params = make_grads([(1000,), (70_000,)], [torch.float32, torch.bfloat16], "cuda", seed=14)
    gc.clip_grad_norm_(params, 1e9, backend="triton")  # warm-up, nothing clipped
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        t = gc.clip_grad_norm_(params, 1.0, backend="triton")
    for i in range(3 * gt.CACHE_SIZE):  # eager work on other sets, on another stream too
        other = make_grads([(100 + i,), (65_537,)], [torch.float32], "cuda", seed=100 + i)
        with torch.cuda.stream(torch.cuda.Stream()):
            gc.clip_grad_norm_(other, 0.5, backend="triton")
        torch.cuda.synchronize()
    ref = [q.grad.double().cpu() for q in params]
    graph.replay()
    torch.cuda.synchronize()
    ref, expected_total = _ref_clip(ref, 1.0)
    assert_close_rel(t, expected_total, RTOL[torch.bfloat16])
    _check_grads(params, ref, rtol=RTOL[torch.bfloat16])


@requires_gpu
def test_concurrent_norms_on_two_streams():
    """Overlapping launches on two streams: each call's own ticket counter and scratch; tables recorded on the
    streams that read them."""
    sets = [make_grads([(70_000,), (3_000 + i,)], [torch.float32], "cuda", seed=30 + i, params=False) for i in range(2)]
    expected = [float(ref_total(xs, 2.0)) for xs in sets]
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    results = []
    torch.cuda.synchronize()
    for _ in range(20):
        for xs, s in zip(sets, streams):
            with torch.cuda.stream(s):
                results.append(gt.multi_tensor_norm(xs, 2.0)[0])
    torch.cuda.synchronize()
    for i, r in enumerate(results):
        assert_close_rel(r, expected[i % 2], 1e-5)


@requires_gpu
def test_capture_refuses_gapped_gradients_and_new_sets():
    params = make_grads([(40, 30)], [torch.float32], "cuda", seed=15)
    params[0].grad = params[0].grad[:, ::2]
    before = params[0].grad.clone()
    for ps in (params, make_grads([(17,)], [torch.float32], "cuda", seed=16)):
        graph = torch.cuda.CUDAGraph()
        with pytest.raises(RuntimeError, match="CUDA graph is being captured"):
            with torch.cuda.graph(graph):
                gc.clip_grad_norm_(ps, 1e-3, backend="triton")
    assert torch.equal(params[0].grad, before)


@requires_gpu
def test_new_table_does_not_sync_the_host():
    """A table rebuild copies from pinned memory without blocking (a pageable copy synchronises)."""
    xs = make_grads([(123,), (70_001,)], [torch.float32], "cuda", seed=17, params=False)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        total, _ = gt.multi_tensor_norm(xs, 2.0)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert_close_rel(total, ref_total(xs, 2.0), 1e-5)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_gradients_on_another_gpu_than_the_current_one():
    params = make_grads([(1000,), (70_000,)], [torch.float32], "cuda:1", seed=18)
    ref = [q.grad.double().cpu() for q in params]
    with torch.cuda.device(0):
        total = gc.clip_grad_norm_(params, 0.5, backend="triton")
        each = gt.multi_tensor_norm([q.grad for q in params], 0.0, True)[1]
    ref, expected_total = _ref_clip(ref, 0.5)
    assert total.device == torch.device("cuda", 1)
    assert_close_rel(total, expected_total, 1e-5)
    _check_grads(params, ref)
    assert each.tolist() == [1.0, 1.0]


@requires_gpu
def test_per_tensor_norms_of_5000_tensors_on_a_gpu():
    xs = make_grads([(256 + i % 7,) for i in range(5000)], [torch.float32, torch.bfloat16], "cuda", seed=19,
                    params=False)
    for p in (2.0, 0.0, 3.0):
        total, each = gt.multi_tensor_norm(xs, p, True)
        ref_each = torch.stack([torch.linalg.vector_norm(x.double().cpu(), p) for x in xs])
        torch.testing.assert_close(each.double().cpu(), ref_each, rtol=RTOL[torch.float32], atol=0)
        assert_close_rel(total, ref_total(xs, p), 1e-5)
        again = gt.multi_tensor_norm(xs, p, True)
        assert torch.equal(again[0], total) and torch.equal(again[1], each)  # bitwise deterministic


COMPILE = """
import os, sys
os.environ.pop("TRITON_INTERPRET", None)
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from gradclip_cuda.triton import kernels as K
target = GPUTarget("cuda", 90, 32)  # H100
ptx = {}
def compile_(name, fn, signature, constexprs):
    k = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs), target=target)
    assert k.asm["cubin"], fn
    ptx[name] = k.asm["ptx"]
NORM = {"rows": "*i64", "first": "*i64", "n_chunks": "i32", "n_tensors": "i32", "partials": "*fp64",
        "tensor_partials": "*fp64", "total_acc": "*fp64", "total_out": "*bf16", "each_out": "*bf16",
        "counter": "*i64", "p_bits": "i64", "KIND": "constexpr", "TENSOR_VALUES": "constexpr",
        "PER_TENSOR": "constexpr", "ALIGNED": "constexpr", "BLOCK": "constexpr", "RBLOCK": "constexpr",
        "TBLOCK": "constexpr", "CBLOCK": "constexpr"}
for kind in range(6):
    for per_tensor in (False, True):
        for aligned in ((False, True) if kind in (K.L2, K.GENERAL) and per_tensor else (True,)):
            compile_(f"norm-{kind}-{per_tensor}-{aligned}", K.norm_kernel,
                     {**NORM, "each_out": "*bf16" if per_tensor else "*fp64"},
                     {"KIND": kind, "TENSOR_VALUES": per_tensor, "PER_TENSOR": per_tensor, "ALIGNED": aligned,
                      "BLOCK": 2048, "RBLOCK": 1024, "TBLOCK": 128, "CBLOCK": 16})
SCALE = {"rows": "*i64", "total": "*fp64", "max_norm_bits": "i64", "eps_bits": "i64", "F64": "constexpr",
         "PER_TENSOR": "constexpr", "DIRECT": "constexpr", "ALIGNED": "constexpr", "BLOCK": "constexpr"}
for f64 in (False, True):
    for aligned in (False, True):
        for per_tensor, direct in ((False, False), (True, False), (False, True), (True, True)):
            compile_(f"scale-{f64}-{aligned}-{per_tensor}-{direct}", K.scale_kernel,
                     {**SCALE, "total": "*fp64" if f64 or direct else "*fp32"},
                     {"F64": f64, "PER_TENSOR": per_tensor, "DIRECT": direct, "ALIGNED": aligned, "BLOCK": 2048})
for kind in range(6):
    compile_(f"agc-{kind}", K.agc_kernel, {"tensors": "*i64", "unit_tensor": "*i64", "n_units": "i32",
             "p_bits": "i64", "factor_bits": "i64", "eps_bits": "i64", "KIND": "constexpr", "BLOCK": "constexpr"},
             {"KIND": kind, "BLOCK": 2048})
for aligned in (False, True):
    compile_(f"clamp-{aligned}", K.clamp_kernel, {"rows": "*i64", "v_bits": "i64", "ALIGNED": "constexpr",
             "BLOCK": "constexpr"}, {"ALIGNED": aligned, "BLOCK": 2048})
out = sys.argv[1]
for name, text in ptx.items():
    with open(os.path.join(out, name + ".ptx"), "w") as f:
        f.write(text)
print("compiled")
"""


@pytest.fixture(scope="module")
def sm90_ptx(tmp_path_factory):
    """Every kernel variant compiled through Triton's real compiler down to an sm_90 cubin (no GPU needed), for
    every norm kind, with and without per-tensor values, both coefficients, aligned (and, for the PTX checks below,
    unaligned): the PTX of each, by name."""
    import subprocess
    import sys
    tmp = tmp_path_factory.mktemp("ptx")
    env = {**os.environ, "TRITON_CACHE_DIR": str(tmp / "cache")}
    out = subprocess.run([sys.executable, "-c", COMPILE, str(tmp)], capture_output=True, text=True, timeout=900,
                         env=env)
    assert out.returncode == 0 and "compiled" in out.stdout, out.stderr[-3000:]
    return {f.stem: f.read_text() for f in tmp.glob("*.ptx")}


def test_every_triton_kernel_compiles_for_sm90(sm90_ptx):
    """What the interpreter cannot show: the kernels go through Triton's real compiler."""
    assert len(sm90_ptx) == 12 + 2 + 16 + 2 + 6


def test_aligned_variants_load_and_store_16_bytes_at_a_time(sm90_ptx):
    """Full tiles are read without a mask; with ALIGNED (set on the host when every chunk address is 16-byte
    aligned) the loads are ld.global.v4 (fp32/fp16/bf16) and ld.global.v2.b64 (fp64), the scale and clamp stores
    st.global.v4; without it they stay scalar (views at odd offsets)."""
    for name in ("norm-0-True-True", "norm-5-True-True", "scale-False-True-False-False",
                 "scale-True-True-False-False", "scale-False-True-True-True", "clamp-True"):
        assert "ld.global.v4" in sm90_ptx[name], name
    for name in ("scale-False-True-False-False", "scale-False-True-True-False", "clamp-True"):
        assert "st.global.v4" in sm90_ptx[name], name
    for name in ("norm-0-True-False", "norm-5-True-False", "scale-False-False-False-False", "clamp-False"):
        assert "ld.global.v4" not in sm90_ptx[name] and "st.global.v4" not in sm90_ptx[name], name


def test_general_p_uses_no_approximate_exp2_or_log2(sm90_ptx):
    """float32 exp2/log2 lower to ex2.approx.ftz / lg2.approx.ftz, which flush |x|^p under 2^-126 to zero; the
    general p-norm is computed in float64 (libdevice)."""
    for name in ("norm-5-False-True", "norm-5-True-True", "norm-5-True-False", "agc-5"):
        assert "ex2.approx" not in sm90_ptx[name] and "lg2.approx" not in sm90_ptx[name], name


def test_agc_and_scale_coefficients_divide_with_round_to_nearest(sm90_ptx):
    """AGC's limit / max(|g|, 1e-6) and the scale kernel's 1 / (total + eps) are IEEE divisions (div.rn), never
    the approximate division Triton emits for a plain float32 `/`."""
    for name in ("agc-0", "agc-2", "scale-False-True-False-False", "scale-False-True-True-False"):
        assert "div.rn.f32" in sm90_ptx[name], name
        assert "div.full" not in sm90_ptx[name] and "div.approx" not in sm90_ptx[name], name
