"""The ops themselves: torch.library.opcheck, per-tensor norms, the fake kernels, torch.compile."""
import math

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import gradclip_cuda as gc
from gradclip_cuda import _ops
from conftest import NORM_TYPES, RTOL, assert_close_rel, make_grads, ref_coef, ref_total

ops = torch.ops.gradclip_cuda
MIXED = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def _xs(device="cpu", seed=0):
    return make_grads([(5,), (3, 7), (65537,), ()], MIXED, device, seed=seed, params=False)


@pytest.mark.parametrize("p", [2.0, 1.0, math.inf, 0.0, 3.0])
def test_opcheck_norm(device, p):
    for per_tensor in (False, True):
        torch.library.opcheck(ops.multi_tensor_norm, (_xs(device), p, per_tensor))


def test_opcheck_mutating_ops(device):
    torch.library.opcheck(ops.multi_tensor_scale_, (_xs(device), torch.tensor(50.0, device=device), 1.0))
    torch.library.opcheck(ops.multi_tensor_scale_, (_xs(device), torch.tensor(0.5, device=device), 1.0))
    torch.library.opcheck(ops.clip_grad_norm_, (_xs(device), 1.0, 2.0))
    torch.library.opcheck(ops.clip_grad_value_, (_xs(device), 0.7))


def test_schemas_and_kernels_are_registered():
    for name, schema in _ops.SCHEMAS.items():
        qualname = f"gradclip_cuda::{name}"
        assert str(getattr(ops, name).default._schema) == str(torch._C.parse_schema(qualname + schema))
        assert torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "CompositeExplicitAutograd")
        assert torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "CPU") == (_ops.C is not None)


def test_triton_ops_take_the_schemas_of_their_ops():
    pytest.importorskip("triton")
    import inspect

    from gradclip_cuda import triton as gt  # registers the triton_* ops
    if "schema" not in inspect.signature(torch.library.triton_op).parameters:
        pytest.skip("this torch infers triton_op schemas from type hints")
    for name in set(_ops.SCHEMAS) - {"clip_policy_step_"}:  # one thread of scalar code: CUDA kernel or torch ops
        op = getattr(ops, "triton_" + name).default
        assert str(op._schema) == str(torch._C.parse_schema(f"gradclip_cuda::triton_{name}" + _ops.SCHEMAS[name]))
    assert gt.CHUNK == _ops.C.CUDA_CHUNK if _ops.C is not None else True


@pytest.mark.parametrize("p", NORM_TYPES)
def test_per_tensor_norms(device, p):
    xs = _xs(device, seed=1)
    for impl in ((ops.multi_tensor_norm, _ops.norm_torch) if _ops.C is not None else (_ops.norm_torch,)):
        # torch's own CPU norm for a general p accumulates float32 less carefully than we do
        tol = RTOL[torch.float32] * (10 if impl is _ops.norm_torch and p not in (0, 1, 2, math.inf, -math.inf) else 1)
        total, each = impl(xs, p, True)
        assert each.shape == (len(xs),) and each.dtype == total.dtype == torch.float64
        for x, e in zip(xs, each):
            assert_close_rel(e, torch.linalg.vector_norm(x.double(), p), tol)
        assert_close_rel(total, ref_total(xs, p), tol)
        _, none = impl(xs, p, False)
        assert none.shape == (0,)


def test_compiled_and_pytorch_kernels_match_torch_and_float64(device):
    xs = _xs(device, seed=2)
    for p in NORM_TYPES:
        ref_each = [torch.linalg.vector_norm(x.double().cpu(), p) for x in xs]
        theirs = torch.nn.utils.get_total_norm(xs, p)
        for impl in ((ops.multi_tensor_norm, _ops.norm_torch) if _ops.C is not None else (_ops.norm_torch,)):
            total, each = impl(xs, p, True)
            assert_close_rel(total, ref_total(xs, p), RTOL[torch.float32] * 10, f"{impl} p={p}")
            # torch rounds each tensor's norm to its dtype (bf16 here): within torch's own error of torch
            torch_err = abs(float(theirs) - float(ref_total(xs, p)))
            assert abs(float(total) - float(theirs)) <= torch_err + RTOL[torch.float32] * 10 * abs(float(theirs))
            for e, r in zip(each, ref_each):
                assert_close_rel(e, r, RTOL[torch.float32] * 10, f"{impl} p={p} per tensor")


def test_fake_kernels_give_shapes_and_dtypes():
    with FakeTensorMode():
        xs = [torch.empty(3, dtype=torch.bfloat16), torch.empty(4, 5, dtype=torch.float16)]
        total, each = ops.multi_tensor_norm(xs, 2.0, True)
        assert total.shape == () and total.dtype == torch.float32 and each.shape == (2,)
        assert ops.clip_grad_norm_(xs, 1.0, 2.0).dtype == torch.float32
        assert ops.clip_grad_norm_([torch.empty(2, dtype=torch.bfloat16)], 1.0, 2.0).dtype == torch.bfloat16


def test_torch_compile_fullgraph_traces_the_ops(device):
    def step(grads):
        return gc.clip_grad_norm_(grads, 1.0)

    params = make_grads([(10,), (7, 3), (65537,)], [torch.float32], device, seed=3)
    expected = [q.grad.clone() for q in params]
    theirs = [_p(e) for e in expected]
    ref = torch.nn.utils.clip_grad_norm_(theirs, 1.0)
    ref64 = ref_total(expected, 2.0)
    graphs = []

    def backend(gm, example_inputs):  # records dynamo's graph, then runs it through aot_eager
        graphs.append(gm.code)
        from torch._dynamo.backends.common import aot_autograd
        return aot_autograd(fw_compiler=lambda g, _: g)(gm, example_inputs)

    compiled = torch.compile(step, fullgraph=True, backend=backend)
    total = compiled(params)
    assert len(graphs) == 1 and "gradclip_cuda.clip_grad_norm_" in graphs[0]
    assert_close_rel(total, ref64, RTOL[torch.float32])
    assert_close_rel(total, ref, RTOL[torch.float32])
    for q, e, t in zip(params, expected, theirs):
        torch.testing.assert_close(q.grad.double(), e.double() * ref_coef(ref64, 1.0), rtol=2e-5, atol=0)
        torch.testing.assert_close(q.grad, t.grad, rtol=2e-5, atol=0)


def _p(grad):
    q = torch.nn.Parameter(torch.zeros_like(grad))
    q.grad = grad.clone()
    return q


@pytest.mark.parametrize("bad", ["int", "complex", "empty-inf"])
def test_op_errors_leave_every_tensor_untouched(bad):
    xs = _xs(seed=4)
    before = [x.clone() for x in xs]
    odd = {"sparse": torch.ones(3, 3).to_sparse(), "int": torch.arange(3), "complex": torch.ones(3, dtype=torch.cfloat),
           "empty-inf": torch.ones(0)}[bad]
    p = math.inf if bad == "empty-inf" else 2.0
    impls = [_ops.clip_torch_] + ([ops.clip_grad_norm_] if _ops.C is not None else [])
    for impl in impls:
        if bad == "complex" and impl is _ops.clip_torch_:
            continue  # the pure-PyTorch kernels handle complex
        with pytest.raises((RuntimeError, NotImplementedError)):
            impl(xs + [odd], 1e-3, p)
        for x, b in zip(xs, before):
            assert torch.equal(x, b)


def test_torch_compile_with_inductor(device):
    params = make_grads([(10,), (300,), (70_000,)], [torch.float32, torch.bfloat16], device, seed=5)
    expected_total = ref_total([q.grad for q in params], 2.0)
    before = [q.grad.clone() for q in params]
    total = torch.compile(lambda ps: gc.clip_grad_norm_(ps, 1.0), fullgraph=True)(params)
    assert_close_rel(total, expected_total, RTOL[torch.float32])
    coef = 1.0 / (float(expected_total) + 1e-6)
    for q, b in zip(params, before):
        torch.testing.assert_close(q.grad.double(), b.double() * coef, rtol=1e-2 if b.dtype == torch.bfloat16 else 1e-5,
                                   atol=0)


# ---- the compiled library's list helpers (borrowed references, no per-tensor Python pass) ----

needs_c = pytest.mark.skipif(_ops.C is None, reason="the compiled library's helpers")


@needs_c
def test_result_dtype_in_cpp_promotes_as_torch():
    import functools
    sets = [[torch.float32], [torch.bfloat16, torch.float16], [torch.float16, torch.float64],
            [torch.bfloat16, torch.complex64], [torch.complex128, torch.float32], [torch.float16] * 3]
    for dtypes in sets:
        xs = [torch.zeros(2, dtype=d) for d in dtypes]
        promoted = functools.reduce(torch.promote_types, dtypes)
        want = {torch.complex64: torch.float32, torch.complex128: torch.float64}.get(promoted, promoted)
        assert _ops.C.result_dtype(xs) == want == _ops.result_dtype(xs), dtypes
        assert _ops.C.result_dtype(tuple(xs)) == want
    assert _ops.C.result_dtype([]) is None and _ops.C.result_dtype([torch.zeros(1), 3.0]) is None


@needs_c
def test_bump_versions_bumps_each_listed_tensor_once_per_listing():
    xs = [torch.zeros(3), torch.zeros(2, 2), torch.zeros(0)]
    before = [x._version for x in xs]
    _ops.C.bump_versions([xs[0], xs[1], xs[0], xs[2]])
    assert [x._version - b for x, b in zip(xs, before)] == [2, 1, 1]
    with torch.inference_mode():
        inf = torch.zeros(2)
    _ops.C.bump_versions([inf])  # inference tensors have no version counter: left alone, no error
    with pytest.raises(TypeError):
        _ops.C.bump_versions([xs[0], "x"])


@needs_c
def test_fast_path_over_the_gil_release_threshold_matches_torch():
    # 2**22 elements and more: the compiled call takes counted references and releases the GIL (bindings.cpp,
    # kReleaseGilElems); below, it borrows the Python objects' references. Both give torch's results.
    for shapes in ([(2**21 + 3,), (2**21,), (7, 5)], [(1000,), (33,)]):
        ours = make_grads(shapes, [torch.float32], seed=4)
        ref = make_grads(shapes, [torch.float32], seed=4)
        total = gc.clip_grad_norm_(ours, 1.0)
        want = torch.nn.utils.clip_grad_norm_(ref, 1.0)
        assert_close_rel(total, want, RTOL[torch.float32])
        for a, b in zip(ours, ref):
            torch.testing.assert_close(a.grad, b.grad, rtol=2e-6, atol=0)


@needs_c
def test_any_instance_and_grads_of_read_every_element():
    class Sub(torch.Tensor):
        pass
    xs = [torch.zeros(1) for _ in range(40)]
    assert not _ops.C.any_instance(xs, Sub)
    for i in (0, 17, 39):  # first, middle, last (past every prefetch distance)
        ys = list(xs)
        ys[i] = torch.zeros(1).as_subclass(Sub)
        assert _ops.C.any_instance(ys, Sub) and _ops.C.any_instance(tuple(ys), torch.Tensor)
    params = [torch.nn.Parameter(torch.zeros(3)) for _ in range(40)]
    for i, q in enumerate(params):
        if i % 3:
            q.grad = torch.full((3,), float(i))
    got = _ops.C.grads_of(params)
    assert [g is q.grad for g, q in zip(got, [q for q in params if q.grad is not None])] == [True] * len(got)
    assert len(got) == sum(1 for q in params if q.grad is not None)
    assert _ops.C.grads_of(params[:5] + [3.0]) is None


class _FakeSpec:
    def __init__(self, mesh, placements):
        self.mesh, self.placements = mesh, placements


class _FakeDTensor(torch.Tensor):
    """What _C.dtensor_locals reads of a DTensor: its ``_local_tensor`` and its ``_spec`` (mesh, placements)."""


class _SlotDTensor(torch.Tensor):
    """The same in __slots__, as torch's DTensor holds them (read from the instance in C++)."""
    __slots__ = ("_local_tensor", "_spec")


class _SlotDTensorSub(_SlotDTensor):
    """A subclass: read through getattr."""


def _fake_dtensor(local, spec, cls=_FakeDTensor):
    d = torch.zeros(0).as_subclass(cls)
    d._local_tensor, d._spec = local, spec
    return d


@needs_c
@pytest.mark.parametrize("cls", [_FakeDTensor, _SlotDTensor])
def test_dtensor_locals_groups_shards_and_reports_device_and_dtype(cls):
    mesh_a, mesh_b = object(), object()
    pl = ("Shard(0)",)
    specs = [_FakeSpec(mesh_a, pl), _FakeSpec(mesh_a, tuple(list(pl))), _FakeSpec(mesh_b, pl)]  # 0, 1: one layout
    gen = torch.Generator().manual_seed(0)
    grads, want = [], {0: [], 1: [], 2: []}  # layout -> its shards in list order (2: plain tensors)
    for i in range(45):  # past every prefetch distance
        local = torch.randn(3 + i % 4, generator=gen, dtype=torch.bfloat16 if i == 30 else torch.float32)
        if i % 5 == 4:
            grads.append(local)
            want[2].append(local)
        else:
            layout = 1 if i % 5 == 3 else 0
            grads.append(_fake_dtensor(local, specs[2 if layout else i % 2], _SlotDTensorSub if i == 7 and cls is _SlotDTensor else cls))
            want[layout].append(local)
    params = []
    for g in grads:
        params.append(torch.nn.Parameter(torch.zeros_like(g)))
        params[-1].grad = g
        params.append(torch.nn.Parameter(torch.zeros(2)))  # no .grad: left out
    for read in (_ops.C.dtensor_locals(grads + [None], cls),
                 _ops.C.dtensor_locals(tuple(grads), cls, False),
                 _ops.C.dtensor_locals(params, cls, True)):
        locals_, runs, uniques, device, dtype, any_dt = read
        assert [u for u, _ in runs] == [0, 1, 2] and [c for _, c in runs] == [len(want[k]) for k in range(3)]
        assert uniques[0][0] is mesh_a and uniques[1][0] is mesh_b and uniques[2] == (None, None)
        assert [t is w for t, w in zip(locals_, want[0] + want[1] + want[2])] == [True] * len(grads)
        assert device == torch.device("cpu") and dtype == torch.float32 and any_dt
    # device: None as soon as one shard is not a tensor the kernels take as it is; the dtype is still torch's
    for odd, dtype in ((torch.zeros(3, dtype=torch.int64), torch.float32),
                       (torch.zeros(3, dtype=torch.float64).to_sparse(), torch.float64),
                       (torch.zeros(3, dtype=torch.complex64), torch.float32)):
        got = _ops.C.dtensor_locals([grads[0], _fake_dtensor(odd, specs[0], cls)], cls)
        assert got[3:] == (None, dtype, True), (odd.dtype, got[3:])
    plain = [torch.zeros(2), torch.zeros(2, dtype=torch.float64)]
    assert _ops.C.dtensor_locals(plain, cls)[3:] == (torch.device("cpu"), torch.float64, False)
    assert _ops.C.dtensor_locals([], cls)[3:] == (None, None, False)
    assert _ops.C.dtensor_locals(plain + [3.0], cls) is None
    assert _ops.C.dtensor_locals(params[:4] + [3.0], cls, True) is None
    if cls is _SlotDTensor:  # an empty slot: getattr's AttributeError
        with pytest.raises(AttributeError):
            _ops.C.dtensor_locals([torch.zeros(0).as_subclass(cls)], cls)


@needs_c
@pytest.mark.parametrize("p", [2.0, 1.0, 3.0, 0.5])
def test_local_set_partials_finish_and_scale(p):
    # _C.LocalSet: a distributed clip's local shards, one list (and one CPU plan) for the norm and the scale
    gen = torch.Generator().manual_seed(5)
    shapes = [(37,), (5, 9), (70_000,), (1,), (300, 7), (0,), (4, 4)]
    dtypes = [torch.float32, torch.bfloat16, torch.float32, torch.float64, torch.float16, torch.float32, torch.float32]
    xs = [(torch.randn(s, generator=gen) * 0.1).to(dt) for s, dt in zip(shapes, dtypes)]
    xs[6] = xs[6].t()  # not contiguous: processed through a copy, written back
    runs = [(1, 2), (0, 3), (1, 2)]  # key 1, key 0, key 1 again; key 2 has no shard
    keys = [k for k, c in runs for _ in range(c)]
    each = torch.stack([x.double().abs().pow(p).sum() for x in xs])
    want = torch.stack([each[[i for i, k in enumerate(keys) if k == key]].sum() for key in range(3)])
    s = _ops.C.LocalSet(list(xs), torch.device("cpu"), True)
    got = s.partials(p, runs, 3)
    assert got.dtype == torch.float64 and got.shape == (3,) and got[2] == 0
    torch.testing.assert_close(got, want, rtol=2e-6, atol=0)
    # the same values as the partials op the general path reads, summed per key
    ops_each = _ops.C.fast(list(xs), False, 1, 5, p)
    assert torch.equal(got[0], ops_each[2:5].sum())
    combined = got.sum().reshape(1)
    total, acc = s.finish(combined, p, torch.bfloat16)
    assert total.dtype == torch.bfloat16 and acc.dtype == torch.float32 and total.dim() == 0
    ref = combined.reshape(()).pow(1 / p) if p not in (1.0, 2.0) else combined.reshape(()).sqrt() if p == 2 \
        else combined.reshape(())  # finalised in float64, then rounded
    assert torch.equal(acc, ref.float()) and torch.equal(total, ref.bfloat16())
    t64, a64 = s.finish(combined, p, torch.float64)
    assert torch.equal(t64, ref) and torch.equal(a64, ref)
    # the scale: bitwise what the scale op writes, versions bumped as by an in-place op
    copies = [x.clone() for x in xs]
    _ops.C.fast(copies, False, 1, 1, 0.3 * float(acc), 0.0, acc, 1e-6)
    versions = [x._version for x in xs]
    s.scale(acc, 0.3 * float(acc), 1e-6)
    assert all(torch.equal(x, c) for x, c in zip(xs, copies))
    assert all(x._version > v for x, v in zip(xs, versions) if x.numel())
    # a read-only set refuses to scale; bad orders and runs are refused
    ro = _ops.C.LocalSet(list(xs), torch.device("cpu"), False)
    with pytest.raises(RuntimeError, match="read-only"):
        ro.scale(acc, 1.0, 1e-6)
    for bad_p in (0.0, -1.0, math.inf):
        with pytest.raises(RuntimeError, match="finite p > 0"):
            ro.partials(bad_p, runs, 3)
    for bad in ([(0, 3)], [(3, 7)], [(0, 8)]):
        with pytest.raises(RuntimeError, match="run"):
            ro.partials(p, bad, 3)


@needs_c
def test_local_set_refuses_partly_overlapping_shards_in_its_scale_before_writing():
    base = torch.randn(100)
    xs = [base[:60], base[40:]]  # partly overlapping: no order of writes scales each element once
    before = base.clone()
    assert torch.isfinite(_ops.C.LocalSet(xs, torch.device("cpu"), False).partials(2.0, [(0, 2)], 1)).all()
    s = _ops.C.LocalSet(xs, torch.device("cpu"), True)
    got = s.partials(2.0, [(0, 2)], 1)  # read: every rank reaches the collectives; the write refuses
    want = (before[:60].double().square().sum() + before[40:].double().square().sum()).reshape(1)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    with pytest.raises(RuntimeError, match="overlap"):
        s.scale(torch.tensor(10.0), 1.0, 1e-6)
    assert torch.equal(base, before)


@needs_c
def test_local_set_over_the_gil_release_threshold_matches_the_ops():
    # a CPU set of 2**22 elements or more runs its passes with the GIL released (bindings.cpp, LocalSet)
    xs = make_grads([(2**21 + 3,), (2**21,), (7, 5)], [torch.float32], seed=6, params=False)
    ref = [x.clone() for x in xs]
    s = _ops.C.LocalSet(list(xs), torch.device("cpu"), True)
    got = s.partials(2.0, [(0, 3)], 1)
    assert torch.equal(got, _ops.C.fast(ref, False, 1, 5, 2.0).sum().reshape(1))
    total, acc = s.finish(got, 2.0, torch.float32)
    s.scale(acc, 0.5 * float(acc), 1e-6)
    _ops.C.fast(ref, False, 1, 1, 0.5 * float(acc), 0.0, acc, 1e-6)
    assert all(torch.equal(x, r) for x, r in zip(xs, ref))
