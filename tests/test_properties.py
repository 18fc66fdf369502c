"""Property test: any list of float tensors, any norm type, any max_norm: clip_grad_norm_ agrees with a float64
reference, leaves the gradients unchanged when unclipped, and never writes on a bad argument."""
import math
import os

import pytest
import torch

pytest.importorskip("hypothesis")
from hypothesis import given, settings, strategies as st

import gradclip_cuda as gc
from conftest import assert_close_rel, backends_for, ref_coef, ref_total, total_rtol

dtypes = st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64])
shapes = st.lists(st.integers(0, 70), min_size=0, max_size=3).map(tuple)
tensors = st.lists(st.tuples(shapes, dtypes, st.integers(0, 2**31 - 1), st.floats(1e-3, 1e3)), min_size=1, max_size=12)
norm_types = st.sampled_from([2.0, 1.0, math.inf, -math.inf, 0.0, 3.0, 0.5, -2.0])


def _build(spec):
    params = []
    for shape, dtype, seed, scale in spec:
        gen = torch.Generator().manual_seed(seed)
        g = ((torch.rand(shape, generator=gen, dtype=torch.float64) + 0.25) * scale
             * (torch.randint(0, 2, shape, generator=gen) * 2 - 1)).to(dtype)
        q = torch.nn.Parameter(torch.zeros(shape, dtype=dtype))
        q.grad = g
        params.append(q)
    return params


@settings(max_examples=int(os.environ.get("GRADCLIP_HYPOTHESIS_EXAMPLES", 150)), deadline=None, derandomize=True)
@given(spec=tensors, p=norm_types, ratio=st.floats(0.01, 100.0))
def test_clip_grad_norm_property(spec, p, ratio):
    grads = [q.grad for q in _build(spec)]
    if (math.isinf(p) or p < 0) and any(g.numel() == 0 for g in grads):
        return  # torch raises here too; covered by the error tests
    ref = ref_total(grads, p)
    if not math.isfinite(float(ref)) or float(ref) == 0:
        return
    max_norm = float(ref) * ratio
    for backend in backends_for("cpu"):
        params = _build(spec)
        before = [q.grad.clone() for q in params]
        total = gc.clip_grad_norm_(params, max_norm, p, backend=backend)
        assert total.dtype == torch.nn.utils.get_total_norm(grads, p).dtype
        tol = total_rtol(grads, total.dtype)
        if backend == "torch" and p not in (0, 1, 2, math.inf, -math.inf):
            tol *= 10  # torch's own CPU norm for a general p accumulates float32 less carefully
        assert_close_rel(total, ref, tol if p != 0 else 0.0, backend)
        coef = ref_coef(ref, max_norm)
        for q, b in zip(params, before):
            if ratio > 1.001:  # clearly unclipped: nothing written
                assert torch.equal(q.grad, b)
                continue
            rt = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}.get(q.grad.dtype, 2e-5)
            atol = 2.0**-24 if q.grad.dtype == torch.float16 else 1e-30  # fp16 subnormal spacing
            torch.testing.assert_close(q.grad.double(), b.double() * coef, rtol=2 * (rt + tol), atol=atol)
