"""Benchmark: gradclip_cuda against torch.nn.utils.clip_grad_norm_ on real models' gradient sets.

    python -m bench                      # every set, every provider, on the CPU; writes bench/results/
    python -m bench --quick              # a short run (under a minute)
    python -m bench --sets gpt2-124m-fp32 5000x256-fp32 --providers torch-foreach gradclip

Each provider is first checked against a float64 reference (total and gradients), within the inputs' precision
or torch's own error, whichever is larger; one that disagrees is reported as wrong and
not timed. Then each call is timed alone (perf_counter on the CPU, CUDA events on a GPU) after the gradients are
restored from a pristine copy outside the timed region, so every clipped call really clips. Reported: median and
interquartile time, speed-up against torch's foreach implementation, effective GB/s (N bytes read for an
unclipped step, 3N read and written for a clipped one, the same count for every provider) and that bandwidth as a
share of a device-to-device copy of N bytes measured in the same run.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

import gradclip_cuda as gc
from bench import sets as gsets

PROVIDERS = {
    "torch-foreach": lambda ps, m: torch.nn.utils.clip_grad_norm_(ps, m, foreach=True),
    "torch-per-tensor": lambda ps, m: torch.nn.utils.clip_grad_norm_(ps, m, foreach=False),
    "gradclip": lambda ps, m: gc.clip_grad_norm_(ps, m),                       # backend="auto"
    "gradclip-pytorch": lambda ps, m: gc.clip_grad_norm_(ps, m, backend="torch"),
}
BASELINE = "torch-foreach"
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _time_once(device, fn):
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _params(grads):
    """Parameters whose .grad are `grads`; the parameters' own data is an expanded scalar (no memory)."""
    out = []
    for g in grads:
        p = torch.nn.Parameter(torch.zeros((), dtype=g.dtype, device=g.device).expand(g.shape))
        p.grad = g.clone()
        out.append(p)
    return out


def _restore(params, pristine):
    torch._foreach_copy_([p.grad for p in params], pristine)


def _reference(grads):
    """float64 total 2-norm, one tensor at a time."""
    return float(torch.linalg.vector_norm(torch.stack([g.double().norm() for g in grads])))


def _agrees(provider, pristine, max_norm, ref, tol):
    """Runs `provider` on a copy; None when its total and gradients match the float64 reference within `tol`
    (which allows for torch's own error), else what differs."""
    params = _params(pristine)
    total = float(PROVIDERS[provider](params, max_norm))
    if abs(total - ref) > tol * ref:
        return f"total {total:.7g} vs float64 {ref:.7g}"
    coef = min(max_norm / (ref + 1e-6), 1.0)
    for p, g in zip(params, pristine):
        if not torch.allclose(p.grad.double(), g.double() * coef, rtol=2 * tol, atol=1e-12):
            return "gradients differ from the float64 reference"
    return None


def _copy_gbps(nbytes, device, repeats):
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    times = [_time_once(device, lambda: dst.copy_(src)) for _ in range(repeats + 1)][1:]
    return 2 * nbytes / statistics.median(times) / 1e9


def run_set(name, providers, device, repeats, scale):
    grads = gsets.make(name, device, scale)
    nbytes = sum(g.numel() * g.element_size() for g in grads)
    total = _reference(grads)
    # Tolerance of the correctness guard: the precision of the inputs, or torch's own error if that is larger.
    low = any(g.dtype in (torch.float16, torch.bfloat16) for g in grads)
    torch_err = abs(float(torch.nn.utils.get_total_norm(grads)) - total) / total
    tol = max(2e-2 if low else 1e-4, 2 * torch_err)
    copy = _copy_gbps(nbytes, device, repeats)
    rows = []
    for regime, max_norm in (("clipped", 0.5 * total), ("unclipped", 2.0 * total)):
        moved = 3 * nbytes if regime == "clipped" else nbytes
        for provider in providers:
            row = {"set": name, "tensors": len(grads), "bytes": nbytes, "scale": scale, "regime": regime,
                   "provider": provider}
            wrong = _agrees(provider, grads, max_norm, total, tol)
            if wrong:
                rows.append({**row, "wrong": wrong})
                continue
            params = _params(grads)
            fn = PROVIDERS[provider]
            times = []
            for _ in range(repeats + 1):  # the first call warms up and is dropped
                _restore(params, grads)
                _sync(device)
                times.append(_time_once(device, lambda: fn(params, max_norm)))
            times = sorted(times[1:])
            med = statistics.median(times)
            q1, q3 = (statistics.quantiles(times, n=4)[::2] if len(times) > 1 else (med, med))
            gbps = moved / med / 1e9
            rows.append({**row, "median_ms": med * 1e3, "iqr_ms": (q3 - q1) * 1e3, "gbps": gbps,
                         "copy_share": gbps / copy, "copy_gbps": copy})
            print(f"  {name:22s} {regime:9s} {provider:18s} {med * 1e3:9.3f} ms", file=sys.stderr)
        base = next((r for r in rows if r["regime"] == regime and r["provider"] == BASELINE and "median_ms" in r),
                    None)
        for r in rows:
            if r["regime"] == regime and base and "median_ms" in r:
                r["speedup"] = base["median_ms"] / r["median_ms"]
    return rows


def _commit():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(RESULTS)).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def _stamp(device):
    name = torch.cuda.get_device_name(0) if device == "cuda" else (platform.processor() or platform.machine())
    if device == "cpu":
        try:
            with open("/proc/cpuinfo") as f:
                name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
    return {"device": device, "device_name": name, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "gradclip_cuda": gc.build_info(), "commit": _commit(),
            "date": datetime.date.today().isoformat()}


def markdown(stamp, rows):
    lines = [f"# gradclip_cuda benchmark: {stamp['device_name']} ({stamp['device']}, {stamp['threads']} threads)",
             "", f"torch {stamp['torch']}, CUDA {stamp['cuda']}, commit {stamp['commit']}, {stamp['date']}.",
             "Median of single calls; speed-up against torch.nn.utils.clip_grad_norm_(foreach=True) in the same "
             "run; GB/s counts N bytes for an unclipped step and 3N for a clipped one; copy share is that over a "
             "device copy of N bytes measured in the same run.", "",
             "| set | tensors | MB | scale | step | provider | median ms | IQR ms | speed-up | GB/s | copy share |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        head = f"| {r['set']} | {r['tensors']} | {r['bytes'] / 1e6:.1f} | {r['scale']:.3g} | {r['regime']} | " \
               f"{r['provider']} |"
        if "wrong" in r:
            lines.append(head + f" wrong: {r['wrong']} | | | | |")
        else:
            lines.append(head + f" {r['median_ms']:.3f} | {r['iqr_ms']:.3f} | {r.get('speedup', float('nan')):.2f}x"
                         f" | {r['gbps']:.1f} | {r['copy_share']:.0%} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    ap.add_argument("--sets", nargs="+", default=None, choices=list(gsets.SETS))
    ap.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=list(PROVIDERS))
    ap.add_argument("--repeats", type=int, default=None, help="timed calls per provider (default 11, quick 5)")
    ap.add_argument("--scale", type=float, default=None, help="override the size scale of every set")
    ap.add_argument("--quick", action="store_true", help="small sets, few repeats: under a minute on a CPU")
    ap.add_argument("--out", default=RESULTS, help="folder for the JSON and Markdown results")
    ap.add_argument("--no-save", action="store_true", help="print only")
    args = ap.parse_args(argv)
    names = args.sets or (["gpt2-124m-fp32", "5000x256-fp32", "resnet50-fp32"] if args.quick else list(gsets.SETS))
    repeats = args.repeats or (5 if args.quick else 11)
    if BASELINE not in args.providers:
        args.providers = [BASELINE] + args.providers
    rows = []
    for i, name in enumerate(names):
        scale = args.scale or gsets.scale_for(name, args.device, 50e6 if args.quick else None)
        print(f"[{i + 1}/{len(names)}] {name} (scale {scale:.3g})", file=sys.stderr)
        rows += run_set(name, args.providers, args.device, repeats, scale)
    stamp = _stamp(args.device)
    md = markdown(stamp, rows)
    print(md)
    if not args.no_save:
        os.makedirs(args.out, exist_ok=True)
        base = os.path.join(args.out, f"{args.device}-{stamp['date']}" + ("-quick" if args.quick else ""))
        with open(base + ".json", "w") as f:
            json.dump({"stamp": stamp, "rows": rows}, f, indent=1)
        with open(base + ".md", "w") as f:
            f.write(md)
        print(f"wrote {base}.json and .md", file=sys.stderr)
    return rows


if __name__ == "__main__":
    main()
