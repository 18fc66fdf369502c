"""A tensor above 2**31 elements: 64-bit offsets through the plan and the kernels. Slow (4 GiB); run with -m slow."""
import math

import pytest
import torch

import gradclip_cuda as gc
from conftest import DEVICES


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_tensor_above_2_pow_31_elements(device):
    n = 2**31 + 3
    g = torch.ones(n, dtype=torch.bfloat16, device=device)
    g[-1] = 1024.0   # past every 32-bit offset
    g[2**31 - 1] = -2.0
    q = torch.nn.Parameter(torch.zeros(1, dtype=torch.bfloat16, device=device).expand(n))  # no 4 GiB param
    q.grad = g
    small = torch.nn.Parameter(torch.empty(5, device=device))
    small.grad = torch.full((5,), 3.0, device=device)
    expected_sq = (n - 2) + 1024.0**2 + 4.0 + 5 * 9.0
    total = gc.get_total_norm([g, small.grad], backend="auto")
    assert abs(float(total) - math.sqrt(expected_sq)) <= 1e-6 * math.sqrt(expected_sq)
    assert float(gc.get_total_norm([g], math.inf)) == 1024.0
    total = gc.clip_grad_norm_([q, small], 1.0)
    coef = 1.0 / (float(total) + 1e-6)
    assert float(g[-1]) == pytest.approx(1024.0 * coef, rel=1e-2)        # bf16 rounding
    assert float(g[2**31 - 1]) == pytest.approx(-2.0 * coef, rel=1e-2)
    assert float(small.grad[0]) == pytest.approx(3.0 * coef, rel=1e-6)
