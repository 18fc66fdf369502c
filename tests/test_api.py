"""The drop-in API against torch.nn.utils and a float64 reference: values, dtypes, errors, warnings, patching."""
import math
import types
import warnings

import pytest
import torch

import gradclip_cuda as gc
from conftest import (FLOAT_DTYPES, NORM_TYPES, RTOL, assert_close_rel, backends_for, clone_params, make_grads,
                      ref_coef, ref_total, total_rtol)

# Odd sizes, 0-d, and sizes on both sides of the CPU chunk (65536 elements).
SHAPES = [(), (1,), (7,), (33, 5), (1000,), (3, 17, 19), (65535,), (65537,), (2, 65536)]
DTYPE_SETS = [[torch.float32], [torch.float16], [torch.bfloat16], [torch.float64],
              [torch.float32, torch.float16, torch.bfloat16, torch.float64]]
NEEDS_NONEMPTY = lambda p: math.isinf(p) or p < 0  # noqa: E731  (norms with no identity)


def _ids(dtypes):
    return "+".join(str(d).replace("torch.", "") for d in dtypes)


def _shapes_for(p):
    return SHAPES if NEEDS_NONEMPTY(p) else SHAPES + [(0,), (4, 0)]


@pytest.mark.parametrize("dtypes", DTYPE_SETS, ids=_ids)
@pytest.mark.parametrize("p", NORM_TYPES)
def test_total_norm_matches_reference_and_torch(device, p, dtypes):
    tensors = make_grads(_shapes_for(p), dtypes, device, seed=1, params=False)
    ref = ref_total(tensors, p)
    theirs = torch.nn.utils.get_total_norm(tensors, p)
    for backend in backends_for(device):
        ours = gc.get_total_norm(tensors, p, backend=backend)
        assert ours.dtype == theirs.dtype and ours.device == theirs.device and ours.shape == ()
        if p == 0:
            assert float(ours) == float(ref) == float(theirs)
            continue
        tol = total_rtol(tensors, ours.dtype)
        assert_close_rel(ours, ref, tol, f"{backend} vs float64")
        if ours.dtype == torch.float64:
            continue  # the reference is float64 arithmetic too: it cannot rank two float64 sums
        # at least as close to the float64 reference as torch is, to a few units in the last place of the result
        ulp = 4 * float(torch.finfo(ours.dtype).eps) * max(abs(float(ref)), float(torch.finfo(ours.dtype).tiny))
        assert abs(float(ours) - float(ref)) <= abs(float(theirs) - float(ref)) + ulp, (backend, float(ours),
                                                                                         float(theirs), float(ref))


@pytest.mark.parametrize("clipped", [True, False], ids=["clipped", "unclipped"])
@pytest.mark.parametrize("dtypes", DTYPE_SETS, ids=_ids)
@pytest.mark.parametrize("p", NORM_TYPES)
def test_clip_grad_norm_matches_reference_and_torch(device, p, dtypes, clipped):
    base = make_grads(_shapes_for(p), dtypes, device, seed=2)
    ref = ref_total([q.grad for q in base], p)
    max_norm = float(ref) * (0.25 if clipped else 4.0)
    coef = ref_coef(ref, max_norm)
    theirs = clone_params(base)
    t_total = torch.nn.utils.clip_grad_norm_(theirs, max_norm, p)
    for backend in backends_for(device):
        ours = clone_params(base)
        versions = [q.grad._version for q in ours]
        total = gc.clip_grad_norm_(ours, max_norm, p, backend=backend)
        assert total.dtype == t_total.dtype and total.device == t_total.device
        if p == 0:
            assert float(total) == float(ref)
        else:
            assert_close_rel(total, ref, total_rtol(ours, total.dtype), backend)
        for q, b, t, v in zip(ours, base, theirs, versions):
            if not clipped:
                assert torch.equal(q.grad, b.grad), "an unclipped step must leave the gradients as they were"
                if device == "cpu":  # on other devices the pure-PyTorch kernels multiply (no sync to test coef == 1)
                    assert q.grad._version == v, "an unclipped step must not write"
                continue
            expected = b.grad.double() * coef
            tol = max(RTOL[q.grad.dtype], total_rtol(ours, total.dtype) if p != 0 else 0) * 2
            torch.testing.assert_close(q.grad.double(), expected, rtol=tol, atol=1e-30)
            assert q.grad._version > v
            if not math.isfinite(float(t_total)):
                continue  # torch's fp16 per-tensor norms overflowed and it zeroed the gradients; we do not
            torch_err = abs(float(t_total) - float(ref)) / float(ref) if p != 0 else 0.0  # torch's own error
            torch.testing.assert_close(q.grad.double(), t.grad.double(), rtol=2 * tol + 2 * torch_err, atol=1e-30)


def test_float32_clip_is_bitwise_torch_given_the_same_total(device):
    # Same total in, same coefficient and products out: torch's formula, evaluated the way torch evaluates it.
    base = make_grads([(100,), (31, 7), (65537,)], [torch.float32], device, seed=3)
    total = torch.tensor(123.456, device=device)
    ours, theirs = clone_params(base), clone_params(base)
    torch.nn.utils.clip_grads_with_norm_(theirs, 1.0, total)
    for backend in backends_for(device):
        ours = clone_params(base)
        gc.clip_grads_with_norm_(ours, 1.0, total, backend=backend)
        for q, t in zip(ours, theirs):
            assert torch.equal(q.grad, t.grad), backend


def test_many_tensors_odd_sizes(device):
    gen = torch.Generator().manual_seed(4)
    shapes = [(int(n),) for n in torch.randint(1, 300, (3001,), generator=gen)]
    base = make_grads(shapes, FLOAT_DTYPES, device, seed=4)
    ref = ref_total([q.grad for q in base], 2.0)
    for backend in backends_for(device):
        ours = clone_params(base)
        total = gc.clip_grad_norm_(ours, 1.0, backend=backend)
        assert_close_rel(total, ref, RTOL[torch.float32], backend)  # float64 total, float32 accumulation
        after = ref_total([q.grad for q in ours], 2.0)
        assert_close_rel(after, 1.0, 2e-2, backend)  # bf16/fp16 rounding of the scaled grads


def test_fp16_total_above_fp16_range_still_clips_exactly():
    # torch rounds each fp16 norm to fp16 and computes the coefficient in fp16: a total above 65504 becomes inf and
    # zeroes the gradients. We return torch's dtype (inf here) but scale by the exact coefficient.
    base = make_grads([(4096,)] * 4, [torch.float16], seed=5, scale=1000.0)
    ref = ref_total([q.grad for q in base], 2.0)
    assert float(ref) > 65504
    ours = clone_params(base)
    total = gc.clip_grad_norm_(ours, 1.0)
    assert total.dtype == torch.float16 and math.isinf(float(total))
    assert_close_rel(ref_total([q.grad for q in ours], 2.0), 1.0, 2e-3)


def test_nonfinite_gradients_propagate_like_torch(device):
    for bad in (math.nan, math.inf):
        for p in (2.0, math.inf, 1.0):
            base = make_grads([(10,), (5,)], [torch.float32], device, seed=6)
            base[1].grad[2] = bad
            ours, theirs = clone_params(base), clone_params(base)
            t = torch.nn.utils.clip_grad_norm_(theirs, 1.0, p)
            for backend in backends_for(device):
                ours = clone_params(base)
                o = gc.clip_grad_norm_(ours, 1.0, p, backend=backend)
                assert (math.isnan(float(o)) and math.isnan(float(t))) or float(o) == float(t)
                for q, r in zip(ours, theirs):
                    torch.testing.assert_close(q.grad, r.grad, equal_nan=True)


def _strided_params(device):
    gen = torch.Generator().manual_seed(21)
    grads = [torch.randn(64, 48, generator=gen).to(device).t(),         # permuted but dense
             torch.randn(40, 70, generator=gen).to(device)[:, ::3],     # gaps between elements
             torch.randn(1, 30, generator=gen).to(device).t()[:, :]]    # a view with a size-1 dim
    params = []
    for g in grads:
        q = torch.nn.Parameter(torch.zeros(g.shape, device=device))
        q.grad = g
        params.append(q)
    return params


def test_noncontiguous_grads_keep_strides(device):
    for backend in backends_for(device):
        ours = _strided_params(device)
        assert not ours[0].grad.is_contiguous() and not ours[1].grad.is_contiguous()
        strides = [q.grad.stride() for q in ours]
        ref = ref_total([q.grad for q in ours], 2.0)
        assert_close_rel(gc.get_total_norm([q.grad for q in ours], backend=backend), ref, RTOL[torch.float32])
        before = [q.grad.clone() for q in ours]
        gc.clip_grad_norm_(ours, 0.5, backend=backend)
        for q, b, s in zip(ours, before, strides):
            assert q.grad.stride() == s
            torch.testing.assert_close(q.grad.double(), b.double() * ref_coef(ref, 0.5), rtol=1e-5, atol=0)
        gc.clip_grad_value_(ours, 0.01, backend=backend)
        for q, s in zip(ours, strides):
            assert q.grad.stride() == s and float(q.grad.abs().max()) <= 0.01


def test_sliced_grad_is_written_in_place():
    storage = torch.randn(10, 10)
    q = torch.nn.Parameter(torch.zeros(10, 5))
    q.grad = storage[:, ::2]
    untouched = storage[:, 1::2].clone()
    gc.clip_grad_norm_([q], 0.1)
    assert torch.equal(storage[:, 1::2], untouched), "elements between the slice's elements must not change"
    assert_close_rel(torch.linalg.vector_norm(storage[:, ::2]), 0.1, 1e-5)


@pytest.mark.parametrize("dtypes", DTYPE_SETS, ids=_ids)
def test_clip_grad_value_is_torchs(device, dtypes):
    base = make_grads(SHAPES + [(0,)], dtypes, device, seed=7)
    base[3].grad.view(-1)[0] = math.nan
    theirs = clone_params(base)
    torch.nn.utils.clip_grad_value_(theirs, 0.75)
    for backend in backends_for(device):
        ours = clone_params(base)
        gc.clip_grad_value_(ours, 0.75, backend=backend)
        for q, t in zip(ours, theirs):
            assert torch.equal(q.grad.nan_to_num(7.0), t.grad.nan_to_num(7.0)), backend
            assert q.grad.isnan().sum() == t.grad.isnan().sum()


def test_clip_grads_with_norm_and_get_total_norm_compose(device):
    base = make_grads(SHAPES, [torch.float32, torch.bfloat16], device, seed=8)
    for backend in backends_for(device):
        a, b = clone_params(base), clone_params(base)
        total = gc.get_total_norm([q.grad for q in a], 2.0, backend=backend)
        gc.clip_grads_with_norm_(a, 1.0, total, backend=backend)
        gc.clip_grad_norm_(b, 1.0, backend=backend)
        for x, y in zip(a, b):
            assert torch.equal(x.grad, y.grad), backend
        c = clone_params(base)
        gc.clip_grads_with_norm_(c, 1.0, float(total), backend=backend)  # a number works too
        for x, y in zip(a, c):
            assert torch.equal(x.grad, y.grad)


@pytest.mark.skipif("cpu" not in gc.available_backends(), reason="a property of the compiled CPU kernels")
def test_thread_count_does_not_change_the_bits():
    tensors = make_grads([(300_000,), (70_001,), (5,)] * 4, FLOAT_DTYPES, seed=9, params=False)
    threads = torch.get_num_threads()
    try:
        results = {}
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results[n] = [gc.get_total_norm(tensors, p, backend="cpu").item() for p in NORM_TYPES]
    finally:
        torch.set_num_threads(threads)
    assert results[1] == results[2] == results[3]


# ---- inputs: None grads, bare tensors, generators, nothing to clip ----

def test_none_grads_are_skipped_and_bare_tensor_works(device):
    params = make_grads([(10,), (20,), (30,)], [torch.float32], device, seed=10)
    params[1].grad = None
    ref = ref_total([params[0].grad, params[2].grad], 2.0)
    assert_close_rel(gc.clip_grad_norm_(clone_params(params), 1e9), ref, 1e-6)
    single = params[0]
    assert_close_rel(gc.clip_grad_norm_(single, 1e9), ref_total([single.grad], 2.0), 1e-6)
    assert_close_rel(gc.get_total_norm(single.grad), ref_total([single.grad], 2.0), 1e-6)


def test_generator_is_consumed_once(device):
    params = make_grads([(10,), (20,)], [torch.float32], device, seed=11)
    expected = [q.grad.clone() * ref_coef(ref_total([q.grad for q in params], 2.0), 0.5) for q in params]
    total = gc.clip_grad_norm_((q for q in params), 0.5)
    assert float(total) > 0.5
    for q, e in zip(params, expected):
        torch.testing.assert_close(q.grad, e)


def test_nothing_to_clip_returns_torchs_zero():
    for fn in (gc.clip_grad_norm_, torch.nn.utils.clip_grad_norm_):
        r = fn([torch.nn.Parameter(torch.ones(3))], 1.0)
        assert torch.equal(r, torch.tensor(0.0)) and r.device.type == "cpu" and r.dtype == torch.float32
    assert torch.equal(gc.get_total_norm([]), torch.nn.utils.get_total_norm([]))


def test_empty_generator_warns_like_torch():
    with pytest.warns(UserWarning, match="`parameters` is an empty generator, no gradient clipping will occur.") as w:
        gc.clip_grad_norm_((x for x in []), 1.0)
    assert w[0].filename == __file__, "the warning points at the caller's line"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gc.clip_grad_norm_([], 1.0)  # an empty list is not a generator: no warning (torch's behaviour)


# ---- errors: raised before any gradient changes ----

def _assert_untouched(params, before):
    for q, b in zip(params, before):
        assert torch.equal(q.grad.nan_to_num(), b.nan_to_num())


def _torch_error_type(fn):
    """The exception type torch raises for fn (None when it raises nothing)."""
    try:
        fn()
    except Exception as e:  # noqa: BLE001  (any type: it is what we compare)
        return type(e)
    return None


@pytest.mark.parametrize("bad", [math.nan, -1.0, "big", None, [1.0]])
def test_bad_max_norm_raises_before_writing(device, bad):
    # torch's type where torch raises (TypeError for None or a list, ValueError for a non-numeric string), ValueError
    # where torch silently accepts (NaN, negative).
    params = make_grads([(10,), (3, 3)], [torch.float32], device, seed=12)
    before = [q.grad.clone() for q in params]
    expected = _torch_error_type(lambda: torch.nn.utils.clip_grad_norm_(clone_params(params), bad)) or ValueError
    for fn in (lambda: gc.clip_grad_norm_(params, bad), lambda: gc.clip_grads_with_norm_(params, bad, torch.tensor(1.0))):
        with pytest.raises(expected, match="max_norm") as e:
            fn()
        assert type(e.value) is expected
    _assert_untouched(params, before)


@pytest.mark.parametrize("bad", [math.nan, "fro", None, "nan", object()])
def test_bad_norm_type_raises_before_writing(device, bad):
    params = make_grads([(10,)], [torch.float32], device, seed=13)
    before = [q.grad.clone() for q in params]
    expected = _torch_error_type(lambda: torch.nn.utils.clip_grad_norm_(clone_params(params), 1.0, bad)) or ValueError
    with pytest.raises(expected, match="norm_type") as e:
        gc.clip_grad_norm_(params, 1.0, bad)
    assert type(e.value) is expected
    with pytest.raises(expected, match="norm_type"):
        gc.get_total_norm([params[0].grad], bad)
    _assert_untouched(params, before)


def test_string_inf_norm_type_is_accepted_like_torch():
    params = make_grads([(10,)], [torch.float32], seed=14)
    assert float(gc.get_total_norm([params[0].grad], "inf")) == float(params[0].grad.abs().max())


@pytest.mark.parametrize("bad", [math.nan, -0.5])
def test_bad_clip_value_raises_before_writing(device, bad):
    params = make_grads([(10,)], [torch.float32], device, seed=15)
    before = [q.grad.clone() for q in params]
    with pytest.raises(ValueError, match="clip_value"):
        gc.clip_grad_value_(params, bad)
    _assert_untouched(params, before)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_error_if_nonfinite_raises_torchs_error_before_writing(device, bad):
    params = make_grads([(10,), (65537,)], [torch.float32], device, seed=16)
    params[1].grad[100] = bad
    before = [q.grad.clone() for q in params]
    with pytest.raises(RuntimeError) as theirs:
        torch.nn.utils.clip_grad_norm_(clone_params(params), 1.0, error_if_nonfinite=True)
    for backend in backends_for(device):
        with pytest.raises(RuntimeError) as ours:
            gc.clip_grad_norm_(params, 1.0, error_if_nonfinite=True, backend=backend)
        assert str(ours.value) == str(theirs.value)
        with pytest.raises(RuntimeError, match="non-finite"):
            gc.get_total_norm([q.grad for q in params], error_if_nonfinite=True, backend=backend)
        _assert_untouched(params, before)


@pytest.mark.parametrize("p", [math.inf, -math.inf, -1.0])
def test_empty_tensor_with_a_norm_without_identity_raises_before_writing(device, p):
    params = make_grads([(10,), (0,), (5,)], [torch.float32], device, seed=17)
    before = [q.grad.clone() for q in params]
    with pytest.raises(RuntimeError):
        torch.nn.utils.clip_grad_norm_(clone_params(params), 0.1, p)
    for backend in backends_for(device):
        with pytest.raises(RuntimeError, match="empty tensor"):
            gc.clip_grad_norm_(params, 0.1, p, backend=backend)
        _assert_untouched(params, before)


def test_sparse_value_clip_raises_torchs_error_type_before_writing():
    params = make_grads([(10,), (4, 4)], [torch.float32], seed=18)
    params[1].grad = params[1].grad.to_sparse()
    before = params[0].grad.clone()
    with pytest.raises(NotImplementedError):
        torch.nn.utils.clip_grad_value_(clone_params(params), 1e-3)
    for backend in gc.available_backends():
        with pytest.raises(NotImplementedError, match="layout"):
            gc.clip_grad_value_(params, 1e-3, backend=backend)
        assert torch.equal(params[0].grad, before)


def test_integer_tensors_raise_torchs_error():
    with pytest.raises(RuntimeError, match="Expected a floating point or complex tensor"):
        torch.nn.utils.get_total_norm([torch.arange(3)])
    for backend in gc.available_backends():
        with pytest.raises(RuntimeError, match="Expected a floating point or complex tensor"):
            gc.get_total_norm([torch.ones(3), torch.arange(3)], backend=backend)


def test_complex_grads_use_the_pytorch_path_under_auto():
    tensors = [torch.randn(10, dtype=torch.complex64), torch.randn(5)]
    theirs = torch.nn.utils.get_total_norm(tensors)
    ours = gc.get_total_norm(tensors)
    assert ours.dtype == theirs.dtype
    assert_close_rel(ours, theirs, 1e-5)
    if "cpu" in gc.available_backends():
        with pytest.raises(RuntimeError, match="not supported by the compiled kernels"):
            gc.get_total_norm(tensors, backend="cpu")


def test_foreach_true_on_a_device_without_foreach_raises_torchs_error():
    q = torch.nn.Parameter(torch.empty(3, device="meta"))
    q.grad = torch.empty(3, device="meta")
    with pytest.raises(RuntimeError) as theirs:
        torch.nn.utils.clip_grad_norm_([q], 1.0, foreach=True)
    with pytest.raises(RuntimeError) as ours:
        gc.clip_grad_norm_([q], 1.0, foreach=True)
    assert str(ours.value) == str(theirs.value)
    with pytest.raises(RuntimeError, match="foreach=True was passed"):
        gc.clip_grad_value_([q], 1.0, foreach=True)


def test_foreach_flags_are_accepted(device):
    base = make_grads(SHAPES, [torch.float32], device, seed=19)
    for foreach in (None, True, False):
        ours, theirs = clone_params(base), clone_params(base)
        t = torch.nn.utils.clip_grad_norm_(theirs, 1.0, foreach=foreach)
        o = gc.clip_grad_norm_(ours, 1.0, foreach=foreach)
        ref = ref_total([q.grad for q in base], 2.0)
        assert_close_rel(o, ref, RTOL[torch.float32])
        assert_close_rel(o, t, RTOL[torch.float32])
        for q, r, b in zip(ours, theirs, base):
            torch.testing.assert_close(q.grad.double(), b.grad.double() * ref_coef(ref, 1.0), rtol=2e-5, atol=0)
            torch.testing.assert_close(q.grad, r.grad, rtol=2e-5, atol=0)


def test_unknown_backend_raises():
    with pytest.raises(ValueError, match="backend"):
        gc.clip_grad_norm_([], 1.0, backend="tpu")


# ---- patch_torch ----

def _is_ours(fn):
    return fn.__module__ == "gradclip_cuda.api"


def test_patch_torch_as_context_manager_and_plain_call():
    originals = (torch.nn.utils.clip_grad_norm_, torch.nn.utils.get_total_norm)
    with gc.patch_torch():
        assert _is_ours(torch.nn.utils.clip_grad_norm_) and _is_ours(torch.nn.utils.clip_grad_value_)
        assert _is_ours(torch.nn.utils.get_total_norm) and _is_ours(torch.nn.utils.clip_grads_with_norm_)
        params = make_grads([(10,)], [torch.float32], seed=20)
        with pytest.raises(ValueError, match="max_norm"):  # our validation runs inside torch's name
            torch.nn.utils.clip_grad_norm_(params, math.nan)
        with pytest.warns(FutureWarning), pytest.raises(ValueError, match="max_norm"):
            torch.nn.utils.clip_grad_norm(params, math.nan)  # the deprecated alias calls the patched function
    assert (torch.nn.utils.clip_grad_norm_, torch.nn.utils.get_total_norm) == originals
    handle = gc.patch_torch()
    try:
        assert _is_ours(torch.nn.utils.clip_grad_norm_)
    finally:
        handle.undo()
    assert torch.nn.utils.clip_grad_norm_ is originals[0]
    assert isinstance(torch.nn.utils.clip_grad_norm_, types.FunctionType)


def test_a_gradient_listed_twice_counts_twice_but_is_scaled_once(device):
    base = make_grads([(1000,), (70_000,)], [torch.float32], device, seed=22)
    for backend in backends_for(device):
        params = clone_params(base)
        listed = [params[0], params[1], params[1]]
        ref = ref_total([q.grad for q in listed], 2.0)
        total = gc.clip_grad_norm_(listed, 0.5, backend=backend)
        assert_close_rel(total, ref, RTOL[torch.float32], backend)
        for q, b in zip(params, base):
            torch.testing.assert_close(q.grad.double(), b.grad.double() * ref_coef(ref, 0.5), rtol=1e-5, atol=0)
        # (a clamp applied twice cannot be told from one: tests/test_edges.py clamps views contained in another)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_every_16_bit_pattern_scales_and_rounds_like_a_float_multiply(dtype):
    """All 65,536 bit patterns (NaNs, infinities, subnormals, ties): the compiled scale widens each to float,
    multiplies by the float32 coefficient and rounds back to nearest even, NaN staying NaN."""
    bits = torch.arange(-2**15, 2**15, dtype=torch.int32).to(torch.int16)
    for backend in backends_for("cpu"):
        q = torch.nn.Parameter(torch.zeros(bits.numel(), dtype=dtype))
        q.grad = bits.clone().view(dtype)
        total = torch.tensor(3.7)
        gc.clip_grads_with_norm_([q], 1.1, total, backend=backend)
        coef = torch.clamp(torch.reciprocal(total + 1e-6) * 1.1, max=1.0)
        expected = (bits.view(dtype).float() * coef).to(dtype)
        nan = expected.isnan()
        assert torch.equal(q.grad.isnan(), nan), backend
        assert torch.equal(q.grad[~nan].view(torch.int16), expected[~nan].view(torch.int16)), backend
