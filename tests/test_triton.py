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
    ref_total_, ref_each = _ops.norm_torch(xs, 2.0, True)
    assert each.dtype == ref_each.dtype and each.shape == (4,)
    torch.testing.assert_close(each.double(), ref_each.double(), rtol=1e-5, atol=0)
    assert_close_rel(total, ref_total_, 1e-5)
    assert torch.ops.gradclip_cuda.triton_clip_grad_norm_.default is not None


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


def test_table_is_cached_for_the_same_tensors():
    xs = make_grads([(10,), (20,)], [torch.float32], DEVICE, seed=8, params=False)
    gc.get_total_norm(xs, backend="triton")
    table = gt._tables[xs[0].device][1]
    gc.get_total_norm(xs, backend="triton")
    assert gt._tables[xs[0].device][1] is table
    gc.get_total_norm([xs[0], xs[1].clone()], backend="triton")
    assert gt._tables[xs[0].device][1] is not table


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


@requires_gpu
def test_triton_under_torch_compile_and_cuda_graphs():
    params = make_grads([(1000,), (65_537,)], [torch.float32], "cuda", seed=10)
    expected_total = ref_total([q.grad for q in params], 2.0)
    total = torch.compile(lambda ps: gc.clip_grad_norm_(ps, 0.5, backend="triton"), fullgraph=True)(params)
    assert_close_rel(total, expected_total, 1e-5)
    gc.clip_grad_norm_(params, 0.5, backend="triton")  # warm-up: the table is cached before capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        t = gc.clip_grad_norm_(params, 0.5, backend="triton")
    graph.replay()
    torch.cuda.synchronize()
    assert math.isfinite(float(t))


COMPILE = """
import os
os.environ.pop("TRITON_INTERPRET", None)
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from gradclip_cuda.triton import kernels as K
target = GPUTarget("cuda", 90, 32)  # H100
def compile_(fn, signature, constexprs):
    k = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs), target=target)
    assert k.asm["cubin"], fn
for kind in range(6):
    for per_tensor in (False, True):
        compile_(K.norm_kernel, {"rows": "*i64", "first": "*i64", "n_chunks": "i32", "n_tensors": "i32",
                                 "partials": "*fp64", "tensor_partials": "*fp64", "total_acc": "*fp64",
                                 "total_out": "*bf16", "each_out": "*bf16" if per_tensor else "*fp64",
                                 "counter": "*i64", "p_bits": "i64", "KIND": "constexpr",
                                 "TENSOR_VALUES": "constexpr", "PER_TENSOR": "constexpr", "BLOCK": "constexpr",
                                 "RBLOCK": "constexpr"},
                 {"KIND": kind, "TENSOR_VALUES": per_tensor, "PER_TENSOR": per_tensor, "BLOCK": 2048,
                  "RBLOCK": 1024})
for f64 in (False, True):
    compile_(K.scale_kernel, {"rows": "*i64", "total": "*fp64", "max_norm_bits": "i64", "F64": "constexpr",
                              "BLOCK": "constexpr"}, {"F64": f64, "BLOCK": 2048})
compile_(K.clamp_kernel, {"rows": "*i64", "v_bits": "i64", "BLOCK": "constexpr"}, {"BLOCK": 2048})
print("compiled")
"""


def test_every_triton_kernel_compiles_for_sm90(tmp_path):
    """What the interpreter cannot show: the kernels go through Triton's real compiler, down to an sm_90 cubin
    (no GPU needed to compile), for every norm kind, with and without per-tensor values, and both coefficients."""
    import subprocess
    import sys
    env = {**os.environ, "TRITON_CACHE_DIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", COMPILE], capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0 and "compiled" in out.stdout, out.stderr[-3000:]
