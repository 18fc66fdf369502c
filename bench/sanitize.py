"""A small clip through every GPU kernel, for compute-sanitizer (memcheck, initcheck, racecheck, synccheck): the CUDA
norm (one launch, spilled over two launch tables, over 33 small tables, per-tensor values, p = 0), scale,
clip-by-value, the fused single launch, a clip captured into a CUDA graph and replayed, and the Triton kernels.
Exits non-zero if a result is wrong.

    compute-sanitizer --tool memcheck python bench/sanitize.py
"""
import math
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
import gradclip_cuda as gc  # noqa: E402
from conftest import assert_close_rel, make_grads, ref_total  # noqa: E402


def graph_check():
    """A two-launch clip captured into a CUDA graph (the ticket word's memset is a node of it), replayed twice."""
    os.environ["GRADCLIP_CUDA_FUSED_MAX_BYTES"] = "0"
    params = make_grads([(70_000,), (5,)], [torch.float32], "cuda", seed=4)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        gc.clip_grad_norm_(params, 1e9, backend="cuda")
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        total = gc.clip_grad_norm_(params, 1e9, backend="cuda")
    for _ in range(2):
        graph.replay()
        torch.cuda.synchronize()
        assert_close_rel(total, ref_total([q.grad for q in params], 2.0), 2e-5, "graph replay")


def main():
    shapes = [(), (7,), (65_537,), (33, 5), (0,), (1000,)]
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
    backends = [b for b in ("cuda", "triton") if b in gc.available_backends()]
    for backend in backends:
        for fused in ("1000000000", "0"):  # fused single launch, then norm + scale
            os.environ["GRADCLIP_CUDA_FUSED_MAX_BYTES"] = fused
            for p in (2.0, math.inf, 0.0, 1.5):
                params = make_grads(shapes, dtypes, "cuda", seed=1)
                expected = ref_total([q.grad for q in params], p)
                total = gc.clip_grad_norm_(params, 0.5, p, backend=backend)
                assert_close_rel(total, expected, 2e-5, f"{backend} p={p} fused={fused}")
        grads = make_grads([(300,)] * 2_100, dtypes, "cuda", seed=2, params=False)  # two launch tables
        assert_close_rel(gc.get_total_norm(grads, backend=backend), ref_total(grads, 2.0), 2e-5, "spilled")
        if backend == "cuda":  # 33 launches of small tables sharing the call's ticket word
            os.environ["GRADCLIP_CUDA_SMALL_TABLES"] = "1"
            assert_close_rel(gc.get_total_norm(grads, backend=backend), ref_total(grads, 2.0), 2e-5, "small tables")
            del os.environ["GRADCLIP_CUDA_SMALL_TABLES"]
            graph_check()
        each = gc.ops.multi_tensor_norm(grads[:5], 0.0, True)[1] if backend == "cuda" else None  # per tensor, p=0
        assert each is None or bool((each == 1).all())
        params = make_grads(shapes, dtypes, "cuda", seed=3, scale=3.0)
        gc.clip_grad_value_(params, 1.0, backend=backend)
        assert all(float(q.grad.abs().max()) <= 1.0 for q in params if q.grad.numel())
    torch.cuda.synchronize()
    print("sanitize workload ran on:", backends)


if __name__ == "__main__":
    main()
