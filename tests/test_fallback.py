"""Without a usable compiled library the package still imports, warns once, and works on the pure-PyTorch kernels."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

import gradclip_cuda

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs in a fresh interpreter: clips a small mixed set with gradclip_cuda and torch and prints what it saw.
PROBE = textwrap.dedent("""
    import json, math, warnings, sys
    {prelude}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import gradclip_cuda as gc
        import importlib; importlib.reload(gc)      # a second import must not warn again
    import torch
    torch.manual_seed(0)
    grads = [torch.randn(n, dtype=d) for n, d in ((100, torch.float32), (7, torch.bfloat16), (3000, torch.float64))]
    def params():
        out = []
        for g in grads:
            q = torch.nn.Parameter(torch.zeros_like(g)); q.grad = g.clone(); out.append(q)
        return out
    ours, theirs = params(), params()
    a = gc.clip_grad_norm_(ours, 1.0)
    b = torch.nn.utils.clip_grad_norm_(theirs, 1.0)
    try:
        gc.clip_grad_norm_(params(), 1.0, backend="cpu"); cpu_backend = "ok"
    except RuntimeError as e:
        cpu_backend = str(e)
    print(json.dumps({{
        "warnings": [str(w.message) for w in caught if "gradclip" in str(w.message)],
        "backends": list(gc.available_backends()),
        "info": gc.build_info(),
        "cpu_kernel": torch._C._dispatch_has_kernel_for_dispatch_key("gradclip_cuda::clip_grad_norm_", "CPU"),
        "total_err": abs(float(a) - float(b)) / float(b),
        "grads_err": max(float((x.grad.double() - y.grad.double()).abs().max()) for x, y in zip(ours, theirs)),
        "cpu_backend": cpu_backend,
    }}))
""")


def _probe(prelude="", env=None):
    out = subprocess.run([sys.executable, "-c", PROBE.format(prelude=prelude)], capture_output=True, text=True,
                         cwd=ROOT, env={**os.environ, **(env or {})}, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def _works_on_pytorch_kernels(r):
    assert [b for b in r["backends"] if b != "triton"] == ["auto", "torch"]  # triton: it needs no compiled library
    assert not r["info"]["compiled"] and not r["cpu_kernel"]
    assert r["total_err"] < 1e-4 and r["grads_err"] < 1e-4  # torch rounds the bf16 norm to bf16
    assert "needs the compiled library" in r["cpu_backend"]


def test_disabled_library_uses_pytorch_kernels_silently():
    r = _probe(env={"GRADCLIP_CUDA_DISABLE_EXT": "1"})
    _works_on_pytorch_kernels(r)
    assert r["warnings"] == []


def test_missing_library_warns_once():
    r = _probe(prelude="sys.modules['gradclip_cuda._C'] = None  # what a missing or unloadable .so looks like")
    _works_on_pytorch_kernels(r)
    assert len(r["warnings"]) == 1 and "could not be imported" in r["warnings"][0]


def test_library_built_for_another_torch_is_not_registered():
    prelude = textwrap.dedent("""
        import types
        fake = types.ModuleType("gradclip_cuda._C")
        fake.build_info = lambda: {"torch": "1.13.1", "cuda": None}
        def _never():
            raise AssertionError("a mismatched build must not register kernels")
        fake.register_kernels = _never
        sys.modules["gradclip_cuda._C"] = fake
    """)
    r = _probe(prelude=prelude)
    _works_on_pytorch_kernels(r)
    assert len(r["warnings"]) == 1 and "built for torch 1.13.1" in r["warnings"][0]
    assert r["info"]["built_for_torch"] == "1.13.1"


@pytest.mark.skipif(not gradclip_cuda.build_info()["compiled"], reason="needs the compiled library")
def test_compiled_library_reports_its_build():
    import torch
    info = gradclip_cuda.build_info()
    assert info["built_for_torch"].split(".")[:2] == torch.__version__.split("+")[0].split(".")[:2]
    assert "cpu" in info["backends"]


@pytest.mark.skipif(gradclip_cuda._ops.C is None, reason="needs the compiled library")
def test_generic_cpu_kernels_can_be_forced_and_give_the_same_values():
    # GRADCLIP_CPU_GENERIC=1 takes the generic inner loops on a processor with AVX2 (CI runs the value tests under
    # it too): they must report so and agree with the float64 reference for every dtype and order.
    code = textwrap.dedent("""
        import json, math, torch, gradclip_cuda as gc
        gen = torch.Generator().manual_seed(7)
        out = {"isa": gc._ops.C.cpu_kernel_isa(), "rows": []}
        for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            x = (torch.rand(70001, generator=gen, dtype=torch.float64) - 0.5).to(dtype)
            for p in (2.0, 1.0, math.inf, -math.inf, 0.0, 3.0):
                ours = float(gc.get_total_norm([x, x[:5]], p, backend="cpu"))
                each = torch.stack([torch.linalg.vector_norm(t.double(), p) for t in (x, x[:5])])
                ref = float((each != 0).sum() if p == 0 else torch.linalg.vector_norm(each, p))
                out["rows"].append([str(dtype), p, ours, ref])
        print(json.dumps(out))
    """)
    for env, isa in (({"GRADCLIP_CPU_GENERIC": "1"}, "generic"), ({}, None)):
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                             env={**os.environ, **env})
        assert run.returncode == 0, run.stderr
        out = json.loads(run.stdout.strip().splitlines()[-1])
        if isa:
            assert out["isa"] == isa
        for dtype, p, ours, ref in out["rows"]:
            rtol = {"torch.float16": 1e-3, "torch.bfloat16": 8e-3}.get(dtype, 2e-5)  # the total is in their dtype
            assert abs(ours - ref) <= rtol * abs(ref), (out["isa"], dtype, p, ours, ref)
