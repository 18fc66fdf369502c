"""Gradient sets the benchmark runs: shapes of real models' gradients, filled with random non-zero values."""
from __future__ import annotations

import math

import torch


def _gpt2_124m():
    shapes = [(50257, 768), (1024, 768)]
    for _ in range(12):
        shapes += [(768,), (768,), (768, 2304), (2304,), (768, 768), (768,),
                   (768,), (768,), (768, 3072), (3072,), (3072, 768), (768,)]
    return shapes + [(768,), (768,)]


def _llama_7b():
    shapes = [(32000, 4096)]
    for _ in range(32):
        shapes += [(4096, 4096)] * 4 + [(11008, 4096), (11008, 4096), (4096, 11008), (4096,), (4096,)]
    return shapes + [(4096,), (32000, 4096)]


def _resnet50():
    shapes = [(64, 3, 7, 7), (64,), (64,)]
    cin = 64
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for b in range(blocks):
            shapes += [(width, cin, 1, 1), (width,), (width,), (width, width, 3, 3), (width,), (width,),
                       (4 * width, width, 1, 1), (4 * width,), (4 * width,)]
            if b == 0:
                shapes += [(4 * width, cin, 1, 1), (4 * width,), (4 * width,)]
            cin = 4 * width
    return shapes + [(1000, 2048), (1000,)]


def _two_thousand():
    # sizes spread log-uniformly over 1K .. 256K elements, a fixed pattern
    return [(int(2 ** (10 + 8 * ((i * 7919) % 2000) / 2000)),) for i in range(2000)]


SETS = {
    # name: (shapes, dtypes cycled over the tensors, note)
    "gpt2-124m-fp32": (_gpt2_124m(), [torch.float32]),
    "llama-7b-bf16": (_llama_7b(), [torch.bfloat16]),
    "resnet50-fp32": (_resnet50(), [torch.float32]),
    "5000x256-fp32": ([(256,)] * 5000, [torch.float32]),
    "2000-fp32": (_two_thousand(), [torch.float32]),
    "mixed-fp32-bf16-fp16": (_gpt2_124m() * 2, [torch.float32, torch.bfloat16, torch.float16]),
}
# What fits where: the full sets on a GPU; on the CPU the big ones shrink so that a run stays short.
CPU_BYTES = 300e6


def scale_for(name: str, device: str, limit: float | None = None) -> float:
    """Fraction of each tensor's leading dimension kept (1 = the real shapes) so the set fits in `limit` bytes
    (default: CPU_BYTES on the CPU; on a GPU an eighth of its memory: the harness holds several copies)."""
    full = set_bytes(name, 1.0)
    if limit is None:
        limit = CPU_BYTES if device == "cpu" else torch.cuda.get_device_properties(0).total_memory / 8
    return 1.0 if full <= limit else limit / full


def _scaled(shape, scale):
    if scale == 1.0 or not shape:
        return shape
    return (max(1, int(math.ceil(shape[0] * scale))),) + tuple(shape[1:])


def shapes_of(name: str, scale: float):
    shapes, dtypes = SETS[name]
    return [(_scaled(s, scale), dtypes[i % len(dtypes)]) for i, s in enumerate(shapes)]


def set_bytes(name: str, scale: float) -> int:
    return sum(math.prod(s) * torch.empty(0, dtype=d).element_size() for s, d in shapes_of(name, scale))


def make(name: str, device: str, scale: float, seed: int = 0):
    """The set's gradients: uniform magnitudes in [0.5, 1.5) * 1e-3 with random signs."""
    gen = torch.Generator(device=device).manual_seed(seed)
    grads = []
    for shape, dtype in shapes_of(name, scale):
        g = torch.rand(shape, generator=gen, device=device, dtype=torch.float32).add_(0.5).mul_(1e-3)
        sign = torch.randint(0, 2, shape, generator=gen, device=device, dtype=torch.int8)
        grads.append(torch.where(sign.bool(), g, -g).to(dtype))
    return grads
