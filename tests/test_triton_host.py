"""The Triton backend's host side, with its kernel launches recorded instead of run (no GPU, no interpreter): the
chunk table cache, CUDA graph capture (its state injected), the device guard, the per-call ticket counter, and the
alignment of what the kernels get. Run as a script, it measures the host time of a call (launches
stubbed) for 5,000 small tensors (`PYTHONPATH=. python tests/test_triton_host.py` from the checkout)."""
import contextlib
import math
import os
import sys
import time

import pytest
import torch

pytest.importorskip("triton")
sys.path.insert(0, os.path.dirname(__file__))

from conftest import make_grads  # noqa: E402
from gradclip_cuda import _ops  # noqa: E402
from gradclip_cuda import triton as gt  # noqa: E402


class _Launches(list):
    """Stands in for wrap_triton: wrap_triton(kernel)[grid](*args, **kwargs) records (kernel, grid, args, kwargs)
    and runs nothing."""

    def __call__(self, kernel):
        launches = self

        class Launcher:
            def __getitem__(self, grid):
                return lambda *args, **kwargs: launches.append((kernel, grid, args, kwargs))
        return Launcher()


@pytest.fixture
def launches(monkeypatch):
    rec = _Launches()
    monkeypatch.setattr(gt, "wrap_triton", rec)
    monkeypatch.setattr(gt, "_tables", {})
    return rec


def _grads(shapes, seed=0):
    return make_grads(shapes, [torch.float32], "cpu", seed=seed, params=False)


def _ops_calls(xs):
    return [lambda: gt.multi_tensor_norm(xs, 2.0, True), lambda: gt.clip_grad_norm_(xs, 1.0, 2.0),
            lambda: gt.multi_tensor_scale_(xs, torch.tensor(3.0), 1.0), lambda: gt.clip_grad_value_(xs, 1.0)]


def test_every_op_runs_under_a_guard_of_its_tensors_device(launches, monkeypatch):
    entered = []

    @contextlib.contextmanager
    def guard(device):
        entered.append(device)
        yield

    monkeypatch.setattr(gt, "_guard", guard)
    xs = _grads([(5,), (7,)])
    for call in _ops_calls(xs):
        n = len(launches)
        call()
        assert len(launches) > n and entered[-1] == xs[0].device  # launched inside the guard
    assert len(entered) == 4


def test_the_guard_of_a_cuda_device_is_torch_cuda_device(monkeypatch):
    seen = []
    monkeypatch.setattr(torch.cuda, "device", lambda d: seen.append(d) or contextlib.nullcontext())
    with gt._guard(torch.device("cuda", 1)):
        pass
    assert seen == [torch.device("cuda", 1)]
    with gt._guard(torch.device("cpu")):  # no guard for CPU tensors (the interpreter)
        pass
    assert seen == [torch.device("cuda", 1)]


def test_ticket_counter_is_per_call_and_zero_at_launch(launches):
    xs = _grads([(5,), (70_000,)])
    gt.multi_tensor_norm(xs, 2.0)
    gt.multi_tensor_norm(xs, 2.0)
    table = gt._tables[xs[0].device][gt._key(xs, 2.0)].table
    counters = [args[9] for _, _, args, _ in launches]
    for c in counters:
        assert c.dtype == torch.int64 and c.numel() == 1 and int(c) == 0
        assert c.untyped_storage().data_ptr() != table.untyped_storage().data_ptr()  # not in the shared table
        c.fill_(7)  # as a launch that never finished would leave it
    gt.multi_tensor_norm(xs, 2.0)
    assert int(launches[-1][2][9]) == 0


@pytest.mark.parametrize("per_tensor", [False, True])
def test_kernel_arguments_are_16_byte_aligned_whatever_the_counts(launches, per_tensor):
    """Triton specializes pointer arguments on 16-byte alignment: views of the table and of the scratch memory at
    offsets that follow the parity of the chunk and tensor counts would compile new variants."""
    sets = [[(3,)], [(3,), (4,)], [(70_000,)], [(70_000,), (5,), (6,)], [(140_000,), (1,)]]
    for i, shapes in enumerate(sets):
        xs = _grads(shapes, seed=i)
        gt.multi_tensor_norm(xs, 0.0 if per_tensor else 2.0, per_tensor)
        gt.clip_grad_norm_(xs, 1.0, 2.0)
    variants = set()
    for kernel, _, args, kwargs in launches:
        for a in args:
            if isinstance(a, torch.Tensor):
                assert a.data_ptr() % 16 == 0
        variants.add((kernel, _specialization(args), tuple(sorted(kwargs.items()))))
    assert len(variants) == 2 + per_tensor  # norm (and norm p=0, per tensor), scale: one each


def _specialization(args):
    """Triton's own specialization of the arguments (its runtime's function, where this Triton has it, as 3.8 does),
    integers left unspecialized as the kernels declare them (do_not_specialize)."""
    try:
        from triton._C.libtriton import native_specialize_impl
        from triton.backends.compiler import BaseBackend
        return tuple(native_specialize_impl(BaseBackend, a, False, isinstance(a, torch.Tensor), True) for a in args)
    except (ImportError, TypeError):  # another Triton: dtypes, and the alignment asserted above
        return tuple(a.dtype if isinstance(a, torch.Tensor) else type(a) for a in args)


def test_aligned_flag(launches):
    base = _grads([(64,)])[0]
    gt.clip_grad_value_([base[4:20], base[32:]], 1.0)
    gt.clip_grad_value_([base[4:20], base[33:]], 1.0)
    assert [kw["ALIGNED"] for _, _, _, kw in launches] == [True, False]


def test_skip_bit_of_contained_gradients(launches):
    q, r, base = _grads([(70,), (70_000,), (100,)])
    xs = [q, r, q, base[:50], base, base[10:20], base.view(10, 10).t()]
    gt.clip_grad_value_(xs, 1.0)
    e = gt._tables[q.device][gt._key(xs, None)]
    codes = e.table[2:3 * e.n_chunks:3]
    first = e.first.tolist()
    skipped = [bool(codes[first[t]] & gt.SKIP) for t in range(len(xs))]
    assert skipped == [False, False, True, True, False, True, True]
    assert all(int(c) & 3 == 0 for c in codes)  # the dtype bits untouched


def test_cache_keeps_several_sets_and_evicts_the_least_recent(launches):
    sets = [_grads([(5 + i,), (3,)], seed=i) for i in range(gt.CACHE_SIZE + 1)]
    gt.multi_tensor_norm(sets[0], 2.0)
    first_table = gt._tables[torch.device("cpu")][gt._key(sets[0], 2.0)].table
    for xs in sets[1:gt.CACHE_SIZE]:
        gt.multi_tensor_norm(xs, 2.0)
    gt.multi_tensor_norm(sets[0], 2.0)  # used again: now the most recent
    gt.multi_tensor_norm(sets[-1], 2.0)
    cache = gt._tables[torch.device("cpu")]
    assert len(cache) == gt.CACHE_SIZE
    assert cache[gt._key(sets[0], 2.0)].table is first_table
    assert gt._key(sets[1], 2.0) not in cache


def test_tables_used_under_capture_are_pinned(launches, monkeypatch):
    """A captured launch keeps the table's address: its table must outlive any number of later sets."""
    xs = _grads([(5,), (70_000,)])
    gt.clip_grad_norm_(xs, 1.0, 2.0)  # warm-up, eager
    monkeypatch.setattr(gt, "_capturing", lambda device: True)
    gt.clip_grad_norm_(xs, 1.0, 2.0)  # "captured"
    monkeypatch.setattr(gt, "_capturing", lambda device: False)
    entry = gt._tables[xs[0].device][gt._key(xs, 2.0)]
    captured_rows = launches[-1][2][0]
    for i in range(3 * gt.CACHE_SIZE):
        gt.clip_grad_norm_(_grads([(3 + i,)], seed=i), 1.0, 2.0)
    assert gt._tables[xs[0].device][gt._key(xs, 2.0)] is entry and entry.pinned
    assert entry.rows is captured_rows
    assert len(gt._tables[xs[0].device]) == gt.CACHE_SIZE + 1


def test_capture_refuses_new_sets_and_gapped_gradients_before_writing(launches, monkeypatch):
    warm = _grads([(5,), (7,)])
    gt.clip_grad_norm_(warm, 1.0, 2.0)
    monkeypatch.setattr(gt, "_capturing", lambda device: True)
    new = _grads([(6,)])
    gapped = [warm[0], _grads([(4, 6)])[0][:, ::2]]
    n = len(launches)
    for xs in (new, gapped):
        for call in _ops_calls(xs):
            with pytest.raises(RuntimeError, match="CUDA graph is being captured"):
                call()
    assert len(launches) == n
    for call in _ops_calls(warm):  # the warm set works, transposed dense views too
        call()
    assert len(launches) > n


def test_dense_views_are_taken_in_place(launches):
    base = _grads([(6, 4)])[0]
    xs = [base.t(), _grads([(4, 6)])[0][:, ::2]]
    dense, back = gt._dense(xs)
    assert dense[0] is xs[0] and len(back) == 1 and back[0][0] is xs[1]


def _measure(n=5000, numel=256, repeats=100):
    """Host time per call on a cache hit, launches stubbed, under no_grad as the API calls the ops: (what,
    microseconds per call, best of 5 runs of CPU time of this process)."""
    import gradclip_cuda as gc
    gt.wrap_triton = _Launches()
    xs = make_grads([(numel,)] * n, [torch.float32], "cpu", seed=0, params=False)
    ps = []
    for x in xs:
        q = torch.nn.Parameter(torch.zeros_like(x))
        q.grad = x
        ps.append(q)
    calls = {("key (_C.tensor_key)" if _ops.C is not None else "key (Python)"): lambda: gt._key(xs, 2.0),
             "contiguity check (_dense)": lambda: gt._dense(xs),
             "multi_tensor_norm": lambda: gt.multi_tensor_norm(xs, 2.0),
             "clip_grad_norm_": lambda: gt.clip_grad_norm_(xs, 1.0, 2.0),
             "clip_grad_value_": lambda: gt.clip_grad_value_(xs, 1.0),
             "multi_tensor_norm through the dispatcher": lambda: gt.multi_tensor_norm.op(xs, 2.0),
             "clip_grad_norm_ through the dispatcher": lambda: gt.clip_grad_norm_.op(xs, 1.0, 2.0),
             "gc.clip_grad_norm_(params, backend='triton')": lambda: gc.clip_grad_norm_(ps, 1.0, backend="triton")}
    out = []
    with torch.no_grad():
        for name, call in calls.items():
            call()
            best = math.inf
            for _ in range(5):
                t0 = time.process_time()
                for _ in range(repeats):
                    call()
                best = min(best, (time.process_time() - t0) / repeats * 1e6)
            out.append((name, best))
    return out


if __name__ == "__main__":
    torch.set_num_threads(1)
    for name, us in _measure():
        print(f"{name:48s} {us:8.1f} us/call")


@pytest.mark.skipif(_ops.C is None, reason="the dense flag comes from the compiled library's key")
def test_dense_sets_take_no_per_tensor_python_pass(launches, monkeypatch):
    # The key (one C++ pass) says every tensor is dense: _dense, the per-tensor Python loop, must not run. A tensor
    # with gaps clears the flag, and then _dense makes its contiguous copy.
    xs = make_grads([(64, 48), (33,), (7, 5)], [torch.float32], params=False)
    xs[0] = xs[0].t()  # dense, not contiguous
    assert gt._key(xs, 2.0)[-1] == 1
    seen = []
    real = gt._dense
    monkeypatch.setattr(gt, "_dense", lambda *a, **k: seen.append(1) or real(*a, **k))
    gt.multi_tensor_norm(xs, 2.0)
    gt.clip_grad_value_(xs, 0.5)
    assert seen == []
    gapped = xs + [torch.randn(10, 6)[:, ::2]]
    assert gt._key(gapped, 2.0)[-1] == 0
    gt.multi_tensor_norm(gapped, 2.0)
    assert seen == [1]


def test_eager_calls_skip_the_dispatcher_and_bump_versions(launches, monkeypatch):
    """Eager calls without autograd or dispatch modes run the op's body directly (the dispatcher's per-tensor work
    costs several times the body's); the versions of written tensors are bumped as the dispatcher would."""
    xs = _grads([(5,), (7,)])
    through_op = []
    for name in ("multi_tensor_norm", "clip_grad_norm_", "multi_tensor_scale_", "clip_grad_value_"):
        fn = getattr(gt, name)
        monkeypatch.setattr(fn, "op", lambda *a, _n=name, **k: through_op.append(_n))
    versions = [x._version for x in xs]
    with torch.no_grad():
        for call in _ops_calls(xs):
            call()
    assert through_op == [] and len(launches) == 5
    assert [x._version for x in xs] == [v + 3 for v in versions]  # clip, scale, value
    q = torch.zeros(3, requires_grad=True)
    gt.multi_tensor_norm([q], 2.0)  # autograd to record: the op
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():  # a dispatch mode: the op
        gt.multi_tensor_norm([torch.zeros(3)], 2.0)
    assert through_op == ["multi_tensor_norm"] * 2


def test_the_registered_ops_agree_with_the_direct_calls():
    """The dispatcher's path (what torch.compile and dispatch modes see) runs the same body."""
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("needs the interpreter or a GPU")
    a = _grads([(70,), (70_000,)], seed=3)
    b = [x.clone() for x in a]
    ta = gt.clip_grad_norm_(a, 1.0, 2.0)
    tb = gt.clip_grad_norm_.op(b, 1.0, 2.0)
    assert torch.equal(ta, tb) and all(torch.equal(x, y) for x, y in zip(a, b))
    na, ea = gt.multi_tensor_norm(a, 3.0, True)
    nb, eb = gt.multi_tensor_norm.op(b, 3.0, True)
    assert torch.equal(na, nb) and torch.equal(ea, eb)
    gt.multi_tensor_scale_(a, torch.tensor(7.0), 1.0)
    gt.multi_tensor_scale_.op(b, torch.tensor(7.0), 1.0)
    gt.clip_grad_value_(a, 1e-3)
    gt.clip_grad_value_.op(b, 1e-3)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
