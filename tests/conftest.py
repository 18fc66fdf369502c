import math
import os

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's interpreter, which must be chosen before they are defined.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import gradclip_cuda as gc  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# Backends usable here for each device ("auto" always; "cpu"/"cuda" for their device with the compiled library).
# The Triton backend has its own tests (tests/test_triton.py): on the CPU it runs in the slow interpreter.
BACKENDS = [b for b in gc.available_backends() if b != "triton"]
NORM_TYPES = [2.0, 1.0, math.inf, -math.inf, 0.0, 3.0, 0.5, -1.5]
FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]

# Tolerance of a result rounded to `dtype`, against a float64 reference.
RTOL = {torch.float32: 2e-5, torch.float64: 1e-12, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def backends_for(device):
    return [b for b in BACKENDS if b not in ("cpu", "cuda") or b == device]


def pytest_collection_modifyitems(config, items):
    """Deselects the tests marked slow unless the -m expression names them (-m slow, -m "slow or gpu"). Done here,
    not by an -m in pyproject's addopts, so that another -m (-m "not integration") keeps them out too."""
    if "slow" in (config.getoption("markexpr") or ""):
        return
    slow = [item for item in items if item.get_closest_marker("slow") is not None]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if item.get_closest_marker("slow") is None]


requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def make_grads(shapes, dtypes, device="cpu", seed=0, scale=1.0, params=True):
    """Parameters (or bare tensors) with random, non-zero gradients: uniform in +-[0.5, 1.5] * scale, random signs."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i, shape in enumerate(shapes):
        dtype = dtypes[i % len(dtypes)]
        mag = torch.rand(shape, generator=gen, dtype=torch.float64) + 0.5
        sign = torch.randint(0, 2, shape, generator=gen).to(torch.float64) * 2 - 1
        g = (mag * sign * scale).to(dtype).to(device)
        if not params:
            out.append(g)
            continue
        p = torch.nn.Parameter(torch.zeros(shape, dtype=dtype, device=device))
        p.grad = g
        out.append(p)
    return out


def ref_total(tensors, p):
    """float64 reference of torch's composition: p-norm of the per-tensor p-norms (p = 0: tensors with a nonzero)."""
    each = torch.stack([torch.linalg.vector_norm(t.detach().double().cpu().flatten(), p) for t in tensors])
    if p == 0:
        return (each != 0).sum().double()
    return torch.linalg.vector_norm(each, p)


def ref_coef(total64, max_norm):
    return min(max_norm / (float(total64) + 1e-6), 1.0)


def clone_params(params):
    out = []
    for p in params:
        q = torch.nn.Parameter(p.detach().clone())
        q.grad = None if p.grad is None else p.grad.clone()
        out.append(q)
    return out


def assert_close_rel(actual, expected, rtol, msg=""):
    """|actual - expected| <= rtol |expected|; a reference beyond the range of actual's dtype must give inf."""
    a, e = float(actual), float(expected)
    if isinstance(actual, torch.Tensor) and math.isinf(float(torch.tensor(e).to(actual.dtype))):
        e = float(torch.tensor(e).to(actual.dtype))
    if math.isnan(e):
        assert math.isnan(a), msg
    elif math.isinf(e):
        assert a == e, f"{msg}: {a} != {e}"
    else:
        assert abs(a - e) <= rtol * abs(e) + 1e-30, f"{msg}: {a} vs {e} (rel {abs(a - e) / max(abs(e), 1e-300):.2e})"


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


def total_rtol(tensors, result_dtype):
    """Tolerance of a total: its rounding to result_dtype, and float32 accumulation for any non-float64 input."""
    acc = RTOL[torch.float32] if any(t.dtype != torch.float64 for t in tensors) else RTOL[torch.float64]
    return max(RTOL[result_dtype], acc)
