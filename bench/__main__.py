"""Benchmark: gradclip_cuda against torch.nn.utils.clip_grad_norm_ on real models' gradient sets.

    python -m bench                      # every set, every provider, on the CPU; writes bench/results/
    python -m bench --quick              # a short run (under a minute)
    python -m bench --sets gpt2-124m-fp32 5000x256-fp32 --providers torch-foreach gradclip

Providers: torch.nn.utils.clip_grad_norm_ (foreach and per-tensor), torch.compile of it (compile time bounded by
--compile-timeout; a set that does not compile in time is reported so), apex.contrib.clip_grad when apex imports,
and gradclip_cuda's backends (auto, cuda, triton, cpu, and the pure-PyTorch kernels) where they run on the device.
Triton on the CPU runs in its interpreter: far too slow to time, so it is left out there unless named.

Each provider is first checked against torch's result and a float64 reference (total and gradients), within the
inputs' precision or torch's own error, whichever is larger; one that disagrees is reported as wrong and not timed.
Then each call is timed alone (perf_counter on the CPU, CUDA events on a GPU) after the gradients are restored from
a pristine copy outside the timed region, so every clipped call really clips; on a GPU the calls rotate over several
copies of the gradients so that L2 does not flatter. Reported: median and interquartile time, speed-up against
torch's foreach implementation, effective GB/s (N bytes read for an unclipped step, 3N read and written for a clipped
one, the same count for every provider), that bandwidth as a share of a device-to-device copy (2N bytes moved)
measured in the same run, and on a GPU kernel launches and host syncs per call.
Writes bench/results/<device>-<date>.json, .md and .png (speed-up per set).
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
import signal
import time

import torch

import gradclip_cuda as gc
from bench import sets as gsets

def _torch_foreach(ps, m):
    return torch.nn.utils.clip_grad_norm_(ps, m, foreach=True)


def _apex(ps, m):
    from apex.contrib.clip_grad import clip_grad_norm_
    return clip_grad_norm_(ps, m)


_compiled = []


def _torch_compile(ps, m):
    if not _compiled:
        # one graph per set and step: keep dynamo from falling back to eager (its default limit is 8 graphs)
        import torch._dynamo.config as dynamo_config
        name = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
        setattr(dynamo_config, name, max(getattr(dynamo_config, name), 64))
        _compiled.append(torch.compile(_torch_foreach))
    return _compiled[0](ps, m)


PROVIDERS = {
    "torch-foreach": _torch_foreach,
    "torch-per-tensor": lambda ps, m: torch.nn.utils.clip_grad_norm_(ps, m, foreach=False),
    "torch-compile": _torch_compile,
    "apex": _apex,
    "gradclip": lambda ps, m: gc.clip_grad_norm_(ps, m),                       # backend="auto"
    "gradclip-cuda": lambda ps, m: gc.clip_grad_norm_(ps, m, backend="cuda"),
    "gradclip-triton": lambda ps, m: gc.clip_grad_norm_(ps, m, backend="triton"),
    "gradclip-cpu": lambda ps, m: gc.clip_grad_norm_(ps, m, backend="cpu"),
    "gradclip-pytorch": lambda ps, m: gc.clip_grad_norm_(ps, m, backend="torch"),
}
BASELINE = "torch-foreach"


def available(provider, device):
    """Why `provider` cannot run on `device` here, or None."""
    if provider == "apex":
        try:
            import apex.contrib.clip_grad  # noqa: F401
        except ImportError:
            return "apex does not import"
    if provider.startswith("gradclip-") and provider != "gradclip-pytorch":
        backend = provider.split("-", 1)[1]
        if backend in ("cpu", "cuda") and backend != device:
            return f"{backend} kernels take {backend} tensors"
        if backend not in gc.available_backends():
            return f"backend {backend!r} is not available here"
    return None


def default_providers(device, quick):
    skip = {"gradclip-triton"} if device == "cpu" else set()  # the interpreter: not worth timing
    if quick:
        skip |= {"torch-compile", "torch-per-tensor"}
    return [p for p in PROVIDERS if p not in skip and available(p, device) is None]


class _Timeout(Exception):
    pass


def _bounded(seconds, fn):
    """Runs fn, raising _Timeout after `seconds` (SIGALRM: the main thread only; unbounded elsewhere). The alarm may
    surface wrapped in another exception (inductor wraps what its compile raises): it is unwrapped here."""
    if seconds <= 0 or not hasattr(signal, "SIGALRM"):
        return fn()
    fired = []

    def alarm(*_):
        fired.append(True)
        raise _Timeout()
    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(int(seconds))
    try:
        return fn()
    except BaseException:
        if fired:
            raise _Timeout() from None
        raise
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


class Progress:
    """A one-line progress bar on stderr."""

    def __init__(self, total):
        self.total, self.done, self.t0 = max(total, 1), 0, time.perf_counter()

    def step(self, what):
        self.done += 1
        n = 30 * self.done // self.total
        print(f"\r[{'#' * n}{'.' * (30 - n)}] {self.done}/{self.total} {time.perf_counter() - self.t0:5.0f}s "
              f"{what[:60]:60s}", end="" if self.done < self.total else "\n", file=sys.stderr, flush=True)
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


def _agrees(provider, pristine, max_norm, ref, theirs, tol):
    """Runs `provider` on a copy; None when its total matches torch's (`theirs`) and the float64 reference, and its
    gradients match the reference, within `tol` (which allows for torch's own error); else what differs."""
    params = _params(pristine)
    total = float(PROVIDERS[provider](params, max_norm))
    if abs(total - theirs) > tol * theirs:
        return f"total {total:.7g} vs torch {theirs:.7g}"
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


def _copies(nbytes, device):
    """How many copies of a set the timed calls rotate over: on a GPU enough to overflow L2 (up to 4) while memory
    allows; one on the CPU (the restore before each call already evicts what fits in its caches)."""
    if device != "cuda":
        return 1
    free, _ = torch.cuda.mem_get_info()
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20)
    return int(max(1, min(4, -(-2 * l2 // max(nbytes, 1)), free // (3 * max(nbytes, 1)))))


def run_set(name, providers, device, repeats, scale, compile_timeout, progress=None):
    grads = gsets.make(name, device, scale)
    nbytes = sum(g.numel() * g.element_size() for g in grads)
    total = _reference(grads)
    # Tolerance of the correctness guard: the precision of the inputs, or torch's own error if that is larger.
    low = any(g.dtype in (torch.float16, torch.bfloat16) for g in grads)
    theirs = float(torch.nn.utils.get_total_norm(grads))
    tol = max(2e-2 if low else 1e-4, 2 * abs(theirs - total) / total)
    copy = _copy_gbps(nbytes, device, repeats)
    rows = []
    not_compiled = {}  # a set that did not compile for one step is not tried again for the other
    n_copies = _copies(nbytes, device)
    for regime, max_norm in (("clipped", 0.5 * total), ("unclipped", 2.0 * total)):
        moved = 3 * nbytes if regime == "clipped" else nbytes
        for provider in providers:
            if progress:
                progress.step(f"{name} {regime} {provider}")
            row = {"set": name, "tensors": len(grads), "bytes": nbytes, "scale": scale, "regime": regime,
                   "provider": provider}
            why_not = available(provider, device) or not_compiled.get(provider)
            if why_not:
                rows.append({**row, "skipped": why_not})
                continue
            try:
                bound = compile_timeout if provider == "torch-compile" else 0
                wrong = _bounded(bound, lambda: _agrees(provider, grads, max_norm, total, theirs, tol))
            except _Timeout:
                not_compiled[provider] = f"did not compile in {compile_timeout:.0f} s"
                rows.append({**row, "skipped": not_compiled[provider]})
                continue
            except Exception as e:  # noqa: BLE001  (a provider that fails is reported, the run goes on)
                rows.append({**row, "wrong": f"raised {type(e).__name__}: {str(e).splitlines()[0][:120]}"})
                continue
            if wrong:
                rows.append({**row, "wrong": wrong})
                continue
            fn = PROVIDERS[provider]
            sets = [_params(grads) for _ in range(n_copies)]
            times = []
            for i in range(repeats + 1):  # the first call warms up and is dropped
                params = sets[i % n_copies]
                _restore(params, grads)
                _sync(device)
                times.append(_time_once(device, lambda: fn(params, max_norm)))
            times = sorted(times[1:])
            med = statistics.median(times)
            q1, q3 = (statistics.quantiles(times, n=4)[::2] if len(times) > 1 else (med, med))
            gbps = moved / med / 1e9
            rows.append({**row, "median_ms": med * 1e3, "iqr_ms": (q3 - q1) * 1e3, "gbps": gbps,
                         "copy_share": gbps / copy, "copy_gbps": copy, "copies": n_copies,
                         **_counts(device, fn, sets[0], grads, max_norm)})
        base = next((r for r in rows if r["regime"] == regime and r["provider"] == BASELINE and "median_ms" in r),
                    None)
        for r in rows:
            if r["regime"] == regime and base and "median_ms" in r:
                r["speedup"] = base["median_ms"] / r["median_ms"]
    return rows


def _counts(device, fn, params, grads, max_norm):
    """Kernel launches and host syncs of one call (GPU only)."""
    if device != "cuda":
        return {}
    from bench.counters import device_ops, host_syncs
    _restore(params, grads)
    launches = len(device_ops(lambda: fn(params, max_norm)))
    _restore(params, grads)
    return {"launches": launches, "syncs": host_syncs(lambda: fn(params, max_norm))}


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
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"device": device, "device_name": name, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "triton": triton_version, "gradclip_cuda": gc.build_info(),
            "commit": _commit(), "date": datetime.date.today().isoformat()}


def _fmt(r, key, spec, default="-"):
    return format(r[key], spec) if key in r else default


def markdown(stamp, rows):
    lines = [f"# gradclip_cuda benchmark: {stamp['device_name']} ({stamp['device']}, {stamp['threads']} threads)",
             "", f"torch {stamp['torch']}, CUDA {stamp['cuda']}, Triton {stamp['triton']}, commit {stamp['commit']}, "
             f"{stamp['date']}.",
             "Median of single calls; speed-up against torch.nn.utils.clip_grad_norm_(foreach=True) in the same "
             "run; GB/s counts N bytes for an unclipped step and 3N for a clipped one; copy share is that over a "
             "device copy (2N bytes moved) measured in the same run; launches and syncs per call on a GPU.", "",
             "| set | tensors | MB | scale | step | provider | median ms | IQR ms | speed-up | GB/s | copy share "
             "| launches | syncs |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        head = f"| {r['set']} | {r['tensors']} | {r['bytes'] / 1e6:.1f} | {r['scale']:.3g} | {r['regime']} | " \
               f"{r['provider']} |"
        if "wrong" in r or "skipped" in r:
            lines.append(head + (f" wrong: {r['wrong']}" if "wrong" in r else f" not run: {r['skipped']}")
                         + " | | | | | | |")
        else:
            lines.append(head + f" {r['median_ms']:.3f} | {r['iqr_ms']:.3f} | {_fmt(r, 'speedup', '.2f')}x"
                         f" | {r['gbps']:.1f} | {r['copy_share']:.0%} | {_fmt(r, 'launches', 'd')} |"
                         f" {_fmt(r, 'syncs', 'd')} |")
    return "\n".join(lines) + "\n"


def plot(stamp, rows, path):
    """Speed-up against torch foreach per set and provider, clipped and unclipped, as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    timed = [r for r in rows if "speedup" in r]
    sets = list(dict.fromkeys(r["set"] for r in timed))
    providers = list(dict.fromkeys(r["provider"] for r in timed))
    fig, axes = plt.subplots(1, 2, figsize=(14, 5), sharey=True)
    width = 0.8 / max(len(providers), 1)
    for ax, regime in zip(axes, ("clipped", "unclipped")):
        for j, prov in enumerate(providers):
            ys = [next((r["speedup"] for r in timed if r["set"] == s and r["provider"] == prov
                        and r["regime"] == regime), 0.0) for s in sets]
            ax.bar([i + j * width for i in range(len(sets))], ys, width, label=prov)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(sets))], sets, rotation=30, ha="right", fontsize=8)
        ax.set_title(f"{regime} step")
        ax.set_yscale("log")
    axes[0].set_ylabel("speed-up vs torch foreach (log)")
    axes[1].legend(fontsize=8)
    fig.suptitle(f"gradclip_cuda on {stamp['device_name']}: torch {stamp['torch']}, CUDA {stamp['cuda']}, "
                 f"Triton {stamp['triton']}, commit {stamp['commit']}, {stamp['date']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    ap.add_argument("--sets", nargs="+", default=None, choices=list(gsets.SETS))
    ap.add_argument("--providers", nargs="+", default=None, choices=list(PROVIDERS),
                    help="default: every provider that runs on the device (on the CPU, Triton only when named)")
    ap.add_argument("--compile-timeout", type=float, default=None,
                    help="seconds torch.compile may take per set before it is reported as not compiled (default 300)")
    ap.add_argument("--repeats", type=int, default=None, help="timed calls per provider (default 11, quick 5)")
    ap.add_argument("--scale", type=float, default=None, help="override the size scale of every set")
    ap.add_argument("--quick", action="store_true", help="small sets, few repeats: under a minute on a CPU")
    ap.add_argument("--out", default=RESULTS, help="folder for the JSON and Markdown results")
    ap.add_argument("--no-save", action="store_true", help="print only")
    args = ap.parse_args(argv)
    names = args.sets or (["gpt2-124m-fp32", "5000x256-fp32", "resnet50-fp32"] if args.quick else list(gsets.SETS))
    repeats = args.repeats or (5 if args.quick else 11)
    providers = args.providers or default_providers(args.device, args.quick)
    if BASELINE not in providers:
        providers = [BASELINE] + providers
    compile_timeout = args.compile_timeout if args.compile_timeout is not None else 300
    progress = Progress(len(names) * len(providers) * 2)
    rows = []
    for name in names:
        scale = args.scale or gsets.scale_for(name, args.device, 50e6 if args.quick else None)
        rows += run_set(name, providers, args.device, repeats, scale, compile_timeout, progress)
    stamp = _stamp(args.device)
    md = markdown(stamp, rows)
    print(md)
    if not args.no_save:
        os.makedirs(args.out, exist_ok=True)
        device = "cpu" if args.device == "cpu" else "-".join(stamp["device_name"].lower().split()[:2])  # nvidia-h100
        base = os.path.join(args.out, f"{device}-{stamp['date']}" + ("-quick" if args.quick else ""))
        with open(base + ".json", "w") as f:
            json.dump({"stamp": stamp, "rows": rows}, f, indent=1)
        with open(base + ".md", "w") as f:
            f.write(md)
        try:
            plot(stamp, rows, base + ".png")
        except ImportError as e:  # a GPU machine without matplotlib still gets its tables
            print(f"no plot: {e}", file=sys.stderr)
        print(f"wrote {base}.json, .md and .png", file=sys.stderr)
    return rows


if __name__ == "__main__":
    main()
