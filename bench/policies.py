"""Clipping policies: ours against the recipes people run, on the GPT-2 and ResNet-50 gradient sets.

    python -m bench --policies                          # both sets, every policy; a few minutes on 2 CPU cores
    python -m bench --policies --sets resnet50-fp32 --scale 0.2

Rows per set (each call timed alone, gradients restored from a pristine copy outside the timed region):
- agc:        timm's adaptive_clip_grad (a loop over parameters: four norms and a where per parameter) against
              gradclip_cuda.adaptive_clip_grad_ (one fused pass);
- per-tensor: a loop of torch ops (norm, clamp, mul per gradient, as Keras' clipnorm applies) against
              gradclip_cuda.clip_grad_norm_per_tensor_;
- autoclip:   the published recipe (the total norm read with .item(), a Python history, numpy's percentile, then
              torch.nn.utils.clip_grad_norm_) against gradclip_cuda.GradClipper("autoclip");
- zclip:      the published recipe (.item() of the total, the z-score rules on host floats, torch's clip) against
              GradClipper("zclip").
Each policy's ratio is the recipe's median over ours (speed-up), and ours against a plain fused clip
(gradclip_cuda.clip_grad_norm_ of the same set, timed in the same run) with the same outcome: the clip that writes
when the policy's step clipped (AutoClip here: the 10th percentile of equal totals is the total itself), the clip
that finds nothing to write when it did not (ZClip here: equal totals are no spike): the cost of the policy's
bookkeeping.
Targets (issue 12, CPU): AGC at least 3x the per-parameter recipe; AutoClip and ZClip within 10% of the fused clip.
"""
from __future__ import annotations

import statistics

import numpy as np
import torch

import gradclip_cuda as gc
from bench import sets as gsets

SETS = ("gpt2-124m-fp32", "resnet50-fp32")


# ---- the recipes people run, written with torch ops ----

def _timm_agc(params, clip_factor=0.01, eps=1e-3):
    for p in params:
        g = p.grad.detach()
        w = p.detach()
        dims = tuple(range(1, g.dim())) if g.dim() > 1 else None
        limit = w.norm(2.0, dim=dims, keepdim=g.dim() > 1).clamp_(min=eps).mul_(clip_factor)
        gn = g.norm(2.0, dim=dims, keepdim=g.dim() > 1)
        g.copy_(torch.where(gn < limit, g, g * (limit / gn.clamp(min=1e-6))))


def _loop_per_tensor(params, max_norm):
    for p in params:
        g = p.grad.detach()
        g.mul_(torch.clamp(max_norm / (g.norm() + 1e-6), max=1.0))


class _AutoClipRecipe:
    """Seetharaman et al.'s recipe: history in a Python list, numpy's percentile, torch's clip."""

    def __init__(self, percentile=10.0):
        self.history, self.percentile = [], percentile

    def __call__(self, params):
        total = torch.nn.utils.get_total_norm([p.grad for p in params]).item()
        self.history.append(total)
        torch.nn.utils.clip_grad_norm_(params, float(np.percentile(self.history, self.percentile)))


class _ZClipRecipe:
    """Kumar et al.'s rules on host floats (z-score mode, adaptive scaling), .item() every step, torch's clip."""

    def __init__(self, alpha=0.97, z_thresh=2.5, warmup=25, eps=1e-6):
        self.alpha, self.z, self.warmup, self.eps = alpha, z_thresh, warmup, eps
        self.buffer, self.mean, self.var = [], None, None

    def __call__(self, params):
        total = torch.nn.utils.get_total_norm([p.grad for p in params]).item()
        if self.mean is None:
            self.buffer.append(total)
            if len(self.buffer) == self.warmup:
                self.mean = sum(self.buffer) / len(self.buffer)
                self.var = sum((x - self.mean) ** 2 for x in self.buffer) / len(self.buffer)
            return
        std = self.var ** 0.5
        z = (total - self.mean) / (std + self.eps)
        value = total
        if z > self.z:
            value = self.mean + self.z * std / (z / self.z)
            torch.nn.utils.clip_grad_norm_(params, value)
        self.mean = self.alpha * self.mean + (1 - self.alpha) * value
        self.var = self.alpha * self.var + (1 - self.alpha) * (value - self.mean) ** 2


def _setup(name, device, scale):
    grads = gsets.make(name, device, scale)
    gen = torch.Generator(device=device).manual_seed(1)
    params = [torch.nn.Parameter(torch.randn(g.shape, generator=gen, device=device, dtype=torch.float32)
                                 .mul_(0.02).to(g.dtype)) for g in grads]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    return params, grads


def _calls(params, max_norm):
    """policy -> (recipe, ours) callables; 'fused' is the plain fused clip every policy is compared with."""
    auto_recipe, z_recipe = _AutoClipRecipe(), _ZClipRecipe(warmup=2)
    autoclip = gc.GradClipper("autoclip")
    zclip = gc.GradClipper("zclip", warmup_steps=2)
    return {
        "fused": (lambda: torch.nn.utils.clip_grad_norm_(params, max_norm), lambda: gc.clip_grad_norm_(params, max_norm)),
        "fused-unclipped": (lambda: torch.nn.utils.clip_grad_norm_(params, 1e30),
                            lambda: gc.clip_grad_norm_(params, 1e30)),
        "agc": (lambda: _timm_agc(params), lambda: gc.adaptive_clip_grad_(params)),
        "per-tensor": (lambda: _loop_per_tensor(params, max_norm),
                       lambda: gc.clip_grad_norm_per_tensor_(params, max_norm)),
        "autoclip": (lambda: auto_recipe(params), lambda: autoclip(params)),
        "zclip": (lambda: z_recipe(params), lambda: zclip(params)),
    }


def run(names, device, repeats, scale_arg, timer, sync):
    rows = []
    for name in names:
        scale = scale_arg or gsets.scale_for(name, device, 100e6 if device == "cpu" else None)
        params, grads = _setup(name, device, scale)
        total = float(torch.linalg.vector_norm(torch.stack([g.double().norm() for g in grads])))
        calls = _calls(params, 0.5 * total)  # the fixed clips clip every step
        nbytes = sum(g.numel() * g.element_size() for g in grads)
        medians = {}
        for policy, pair in calls.items():
            for who, fn in zip(("recipe", "ours"), pair):
                times = []
                for _ in range(repeats + 3):  # the first three warm up (and fill ZClip's warm-up of two)
                    torch._foreach_copy_([p.grad for p in params], grads)
                    sync()
                    times.append(timer(fn))
                times = sorted(times[3:])
                medians[(policy, who)] = statistics.median(times)
                torch._foreach_copy_([p.grad for p in params], grads)
                fn()  # one more step, untimed: did it write?
                clips = any(not torch.equal(p.grad, g) for p, g in zip(params, grads))
                rows.append({"set": name, "policy": policy, "who": who, "median_ms": medians[(policy, who)] * 1e3,
                             "min_ms": times[0] * 1e3, "bytes": nbytes, "scale": scale, "clips": clips})
        for r in rows:
            if r["set"] == name:
                r["speedup_vs_recipe"] = medians[(r["policy"], "recipe")] / medians[(r["policy"], r["who"])]
                # against our plain clip of the same outcome: one that writes, or one that finds nothing to clip
                r["x_fused_clip"] = medians[(r["policy"], r["who"])] / medians[
                    ("fused" if r["clips"] else "fused-unclipped", "ours")]
    return rows


def markdown(rows, stamp):
    lines = [f"# gradclip_cuda clipping policies: {stamp['device_name']} ({stamp['device']}, {stamp['threads']} "
             "threads)", "", f"torch {stamp['torch']}, commit {stamp['commit']}, {stamp['date']}. Speed-up: the "
             "recipe's median over the row's; x fused clip: the row's median over gradclip_cuda.clip_grad_norm_'s "
             "on the same set with the same outcome (it wrote: the clip that writes; it did not: the clip with "
             "nothing to write); 1.00 = a policy costs no more than a plain fused clip.", "",
             "| set | MB | policy | who | writes | median ms | min ms | speed-up vs recipe | x fused clip |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['set']} | {r['bytes'] / 1e6:.0f} | {r['policy']} | {r['who']} | "
                     f"{'yes' if r['clips'] else 'no'} | {r['median_ms']:.2f} | {r['min_ms']:.2f} | "
                     f"{r['speedup_vs_recipe']:.2f}x | {r['x_fused_clip']:.2f} |")
    return "\n".join(lines) + "\n"
