"""Throughput of the compiled CPU kernels per dtype and norm order, on one large tensor:

    python -m bench.kernels [--elems 30000000]

Prints GB/s: the norm reads N bytes; scale and clamp read and write N bytes each (their time is measured after
restoring the input, minus the time of that restore, so they run partly from cache).
"""
import argparse
import math
import time

import torch

from gradclip_cuda import _ops

ops = torch.ops.gradclip_cuda


def _ms(fn, repeats=4):
    fn()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats * 1e3


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.kernels", description=__doc__.split("\n")[0])
    ap.add_argument("--elems", type=int, default=30_000_000)
    args = ap.parse_args(argv)
    if _ops.C is None:
        raise SystemExit(f"needs the compiled library: {_ops.WHY_NOT_COMPILED}")
    orders = [2.0, 1.0, math.inf, 0.0, 3.0]
    print("| dtype | " + " | ".join(f"norm p={p:g}" for p in orders) + " | scale | clamp |")
    print("|---" * (len(orders) + 3) + "|")
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        x = (torch.randn(args.elems) * 1e-3).to(dtype)
        y = x.clone()
        gb = x.numel() * x.element_size() / 1e9
        cells = [f"{gb / _ms(lambda: ops.multi_tensor_norm([x], p)) * 1e3:.3g}" for p in orders]
        restore = _ms(lambda: y.copy_(x))
        scale = _ms(lambda: (y.copy_(x), ops.multi_tensor_scale_([y], torch.tensor(2.0), 1.0)))
        clamp = _ms(lambda: (y.copy_(x), ops.clip_grad_value_([y], 1e-3)))
        # the pass alone is the call less the restore copy; below the timer's resolution there is no figure
        cells += [f"{2 * gb / (t - restore) * 1e3:.3g}" if t > 1.05 * restore else "n/a" for t in (scale, clamp)]
        print(f"| {str(dtype).replace('torch.', '')} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
