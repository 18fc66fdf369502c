"""The whole post-backward step: (unscale with a GradScaler) + clip + fused AdamW step, torch's recipe against ours.

    python -m bench --step                     # GPT-2 fp32 with a GradScaler, LLaMA-shaped bf16 without; ~1 minute
    python -m bench --step --sets gpt2-124m-fp32 --scale 0.1

Recipes, timed on the same gradients (restored before each call, outside the timed region):
- torch:        scaler.unscale_(opt); torch.nn.utils.clip_grad_norm_(...); scaler.step(opt); scaler.update()
- ours-write:   gradclip_cuda.clip_grad_norm_(..., scaler=, optimizer=); scaler.step(opt); scaler.update()
- ours-defer:   the same with defer=True: the coefficient rides the fused step's grad_scale, nothing is written
- bare-step:    the fused AdamW step alone (the floor: what any recipe pays for the optimizer)
Without a scaler (bf16 sets: no loss scaling) the unscale and update parts drop out. Passes over the gradients
before the optimizer reads them, as a model of bytes moved: torch 5 with a scaler (unscale read+write, norm read,
clip read+write) or 3 without; ours-write 3 (norm read, one multiply read+write); ours-defer 1 (the norm read).
fp16 gradients are not run with a scaler: torch's unscale_ refuses them ("Attempting to unscale FP16 gradients").
"""
from __future__ import annotations

import statistics

import torch

import gradclip_cuda as gc
from bench import sets as gsets

SETS = {"gpt2-124m-fp32": True, "llama-7b-bf16": False}  # set -> with a GradScaler
PASSES = {("torch", True): 5, ("torch", False): 3, ("ours-write", True): 3, ("ours-write", False): 3,
          ("ours-defer", True): 1, ("ours-defer", False): 1, ("bare-step", True): 0, ("bare-step", False): 0}


def _setup(name, device, scale, with_scaler):
    grads = gsets.make(name, device, scale)
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    opt = torch.optim.AdamW(params, lr=1e-3, fused=True)
    scaler = torch.amp.GradScaler(device, init_scale=1024.0) if with_scaler else None
    if scaler is not None:
        scaler.scale(torch.ones((), device=device))  # the scale tensor exists, as after a scaled backward
        grads = [g * 1024.0 for g in grads]
    for p, g in zip(params, grads):
        p.grad = g.clone()  # kept: the fused step writes its divided gradients back into them
    return params, grads, opt, scaler


def _recipe(name, params, opt, scaler, max_norm):
    def torch_recipe():
        if scaler is not None:
            scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(params, max_norm)
        _step()

    def ours(defer):
        gc.clip_grad_norm_(params, max_norm, scaler=scaler, optimizer=opt, defer=defer)
        _step()

    def _step():
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()

    return {"torch": torch_recipe, "ours-write": lambda: ours(False), "ours-defer": lambda: ours(True),
            "bare-step": opt.step}[name]


def run(names, device, repeats, scale_arg, timer, sync):
    rows = []
    for name in names:
        with_scaler = SETS[name]
        scale = scale_arg or gsets.scale_for(name, device, 100e6 if device == "cpu" else None)
        results = {}
        for recipe in ("torch", "ours-write", "ours-defer", "bare-step"):
            params, grads, opt, scaler = _setup(name, device, scale, with_scaler)
            total = float(torch.linalg.vector_norm(torch.stack([g.double().norm() for g in grads])))
            max_norm = 0.5 * total / (1024.0 if with_scaler else 1.0)  # every step clips
            fn = _recipe(recipe, params, opt, scaler, max_norm)
            times = []
            for i in range(repeats + 1):
                torch._foreach_copy_([p.grad for p in params], grads)
                sync()
                times.append(timer(fn))
            results[recipe] = [p.detach().clone() for p in params]
            times = sorted(times[1:])
            rows.append({"set": name, "scaler": with_scaler, "recipe": recipe,
                         "median_ms": statistics.median(times) * 1e3, "min_ms": times[0] * 1e3, "passes": PASSES[(recipe, with_scaler)],
                         "bytes": sum(g.numel() * g.element_size() for g in grads), "scale": scale})
        # the recipes trained the same parameters from the same gradients: they must agree (bare-step did not clip)
        for recipe in ("ours-write", "ours-defer"):
            for a, b in zip(results[recipe], results["torch"]):
                if not torch.allclose(a.float(), b.float(), rtol=2e-2, atol=1e-5):
                    raise AssertionError(f"{name}: {recipe} trained other parameters than torch's recipe")
        base = next(r for r in rows if r["set"] == name and r["recipe"] == "torch")
        bare = next(r for r in rows if r["set"] == name and r["recipe"] == "bare-step")
        for r in rows:
            if r["set"] == name:
                r["vs_torch"] = base["median_ms"] / r["median_ms"]
                r["vs_bare_step"] = r["median_ms"] / bare["median_ms"]
    return rows


def markdown(rows, stamp):
    lines = [f"# gradclip_cuda step benchmark: {stamp['device_name']} ({stamp['device']}, {stamp['threads']} threads)",
             "", f"torch {stamp['torch']}, commit {stamp['commit']}, {stamp['date']}. Whole post-backward step "
             "(unscale with a GradScaler where marked, clip, fused AdamW step); speed-up: torch's recipe's median over "
             "the row's; x bare step: the row's median over the fused AdamW step alone; passes: reads or "
             "read+writes of the gradients before the optimizer reads them.", "",
             "| set | MB | scaler | recipe | median ms | min ms | speed-up vs torch | x bare step | passes |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['set']} | {r['bytes'] / 1e6:.0f} | {'yes' if r['scaler'] else 'no'} | {r['recipe']} | "
                     f"{r['median_ms']:.2f} | {r['min_ms']:.2f} | {r['vs_torch']:.2f}x | {r['vs_bare_step']:.2f} | "
                     f"{r['passes']} |")
    return "\n".join(lines) + "\n"
