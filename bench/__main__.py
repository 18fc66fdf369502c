"""Benchmark: gradclip_cuda against torch.nn.utils.clip_grad_norm_ on real models' gradient sets.

    python -m bench                      # every set, the core providers; about 3 minutes on 2 CPU cores
    python -m bench --quick              # a short run (under a minute)
    python -m bench --compile            # adds torch.compile of torch's recipe (minutes of compiling per set)
    python -m bench --sets gpt2-124m-fp32 5000x256-fp32 --providers torch-foreach gradclip

Providers: torch.nn.utils.clip_grad_norm_ (foreach and per-tensor), torch.compile of it (opt-in: --compile, or
named; compile time bounded by --compile-timeout), apex.contrib.clip_grad when apex imports, and gradclip_cuda's
backends (auto, cuda, triton, cpu, and the pure-PyTorch kernels) where they run on the device. Triton on the CPU
runs in its interpreter: far too slow to time, so it is left out there unless named.

Each provider is first checked against torch's result and a float64 reference (total and gradients), within the
inputs' precision or torch's own error, whichever is larger; one that disagrees is reported as wrong and not timed.
Then each call is timed alone (perf_counter on the CPU, CUDA events on a GPU) after the gradients are restored from
a pristine copy outside the timed region, so every clipped call really clips; on a GPU the calls rotate over several
copies of the gradients so that L2 does not flatter. Interleaved with the timed calls, the harness times the floor of
each step: the least work any clip of the set must do, on one flat float32 tensor of the set's byte size (unclipped:
one reduction, N bytes read; clipped: a reduction and an in-place multiply, 3N bytes moved; with our compiled
kernels where the device has them, else torch's ops). Reported per row: median
and minimum time (the minimum is the robust figure for memory-bound work on a noisy machine), interquartile range,
speed-up against torch's foreach implementation, the floor's median time and the share of it the row reaches
(floor / row: 100% means as fast as the bare passes), and on a GPU kernel launches and host syncs per call. A row
whose spread (IQR) exceeds half its median is timed again once; if it is still that noisy it is flagged and kept out
of the headline. Writes <device>-<date>.json, .md and .png (speed-up per set) to bench/results/runs/ (not tracked
by git); publish a run with --out bench/results.
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


def default_providers(device, quick, compile_=False):
    skip = {"gradclip-triton"} if device == "cpu" else set()  # the interpreter: not worth timing
    if not compile_:
        skip.add("torch-compile")  # opt-in: compiling torch's recipe takes minutes per set on a CPU
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
    """A one-line progress bar on stderr, redrawn every second (so it keeps ticking during a long step)."""

    def __init__(self, total):
        import threading
        self.total, self.done, self.t0, self.what = max(total, 1), 0, time.perf_counter(), ""
        self._lock, self._stop = threading.Lock(), threading.Event()
        self._thread = threading.Thread(target=self._tick, daemon=True)
        self._thread.start()

    def _draw(self, end=""):
        n = 30 * self.done // self.total
        print(f"\r[{'#' * n}{'.' * (30 - n)}] {self.done}/{self.total} {time.perf_counter() - self.t0:5.0f}s "
              f"{self.what[:60]:60s}", end=end, file=sys.stderr, flush=True)

    def _tick(self):
        while not self._stop.wait(1.0):
            with self._lock:
                self._draw()

    def step(self, what):
        with self._lock:
            self.done += 1
            self.what = what
            self._draw()

    def close(self):
        self._stop.set()
        self._thread.join()
        with self._lock:
            self._draw("\n")


RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
RUNS = os.path.join(RESULTS, "runs")  # where a run writes by default: ignored by git; published runs go to RESULTS
NOISY = 0.5  # IQR / median above which a row is timed again, and flagged if it stays so


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


def _floor(nbytes, device):
    """The floor steps of a set of `nbytes` bytes, on one flat float32 tensor: (unclipped: one reduction, clipped: a
    reduction and an in-place multiply), with our own compiled kernels where the device has them (the bytes alone,
    no per-tensor work: the best this library does), else torch's ops. The multiply's coefficient is 0.999, so that
    the repeats of a whole run neither underflow nor reach subnormals."""
    flat = torch.empty(max(nbytes // 4, 1), dtype=torch.float32, device=device).uniform_(0.5, 1.5)
    ops = torch.ops.gradclip_cuda
    if device in gc.available_backends():  # "cpu" / "cuda": the compiled kernels of this device
        total = torch.tensor(1.0 / 0.999 - 1e-6, device=device)
        return {"unclipped": lambda: ops.multi_tensor_norm([flat], 2.0),
                "clipped": lambda: (ops.multi_tensor_norm([flat], 2.0), ops.multi_tensor_scale_([flat], total, 1.0))}
    return {"unclipped": lambda: torch.linalg.vector_norm(flat),
            "clipped": lambda: (torch.linalg.vector_norm(flat), flat.mul_(0.999))}


def _time_calls(device, fn, sets, grads, max_norm, floor, repeats):
    """(call times, floor times), sorted: each repeat times the floor step, then restores the gradients and times
    one call, so that both see the same state of the machine. The first repeat warms up and is dropped."""
    calls, floors = [], []
    for i in range(repeats + 1):
        params = sets[i % len(sets)]
        f = _time_once(device, floor)
        _restore(params, grads)
        _sync(device)
        t = _time_once(device, lambda: fn(params, max_norm))
        if i:
            calls.append(t)
            floors.append(f)
    return sorted(calls), sorted(floors)


def _iqr(times):
    if len(times) < 2:
        return 0.0
    q1, _, q3 = statistics.quantiles(times, n=4)
    return q3 - q1


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
    floors = _floor(nbytes, device)
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
            times, floor = _time_calls(device, fn, sets, grads, max_norm, floors[regime], repeats)
            if _iqr(times) > NOISY * statistics.median(times):  # a busy moment: once more
                times, floor = _time_calls(device, fn, sets, grads, max_norm, floors[regime], repeats)
            med, floor_med = statistics.median(times), statistics.median(floor)
            rows.append({**row, "median_ms": med * 1e3, "min_ms": times[0] * 1e3, "iqr_ms": _iqr(times) * 1e3,
                         "noisy": _iqr(times) > NOISY * med, "gbps": moved / med / 1e9, "floor_ms": floor_med * 1e3,
                         "floor_share": floor_med / med, "copies": n_copies,
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
    from bench.counters import device_ops, host_syncs, is_kernel
    _restore(params, grads)
    ops_ = device_ops(lambda: fn(params, max_norm))
    launches = sum(map(is_kernel, ops_))  # kernels only; memsets and copies are counted apart
    other = len(ops_) - launches
    _restore(params, grads)
    return {"launches": launches, "memsets_copies": other, "syncs": host_syncs(lambda: fn(params, max_norm))}


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


def headline(rows):
    """(set, clipped speed-up, unclipped speed-up) of gradclip (auto) against torch foreach, None where either row
    is missing or flagged noisy."""
    out = []
    for name in dict.fromkeys(r["set"] for r in rows):
        cells = []
        for regime in ("clipped", "unclipped"):
            pair = [next((r for r in rows if r["set"] == name and r["regime"] == regime and r["provider"] == p
                          and "median_ms" in r), None) for p in ("gradclip", BASELINE)]
            ok = all(r is not None and not r["noisy"] for r in pair)
            cells.append(pair[1]["median_ms"] / pair[0]["median_ms"] if ok else None)
        out.append((name, *cells))
    return out


def markdown(stamp, rows):
    lines = [f"# gradclip_cuda benchmark: {stamp['device_name']} ({stamp['device']}, {stamp['threads']} threads)",
             "", f"torch {stamp['torch']}, CUDA {stamp['cuda']}, Triton {stamp['triton']}, commit {stamp['commit']}, "
             f"{stamp['date']}.",
             "Median and minimum of single calls; speed-up: torch.nn.utils.clip_grad_norm_(foreach=True)'s median "
             "over the row's, in the same run. Floor: the bare passes any clip of the set needs, on one flat float32 "
             "tensor of its byte size (unclipped: one reduction; clipped: a reduction and an in-place multiply; our "
             "compiled kernels where the device has them, else torch's ops), timed interleaved with the row's calls; "
             "floor share = floor / row (100%: as fast as the bare passes over one flat tensor). "
             "Noisy: the IQR stayed above half the median after a second timing; such rows are left out of the "
             "headline. Launches and syncs per call on a GPU.", "",
             "| set | tensors | MB | scale | step | provider | median ms | min ms | IQR ms | speed-up | floor ms "
             "| floor share | launches | syncs |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        head = f"| {r['set']} | {r['tensors']} | {r['bytes'] / 1e6:.1f} | {r['scale']:.3g} | {r['regime']} | " \
               f"{r['provider']} |"
        if "wrong" in r or "skipped" in r:
            lines.append(head + (f" wrong: {r['wrong']}" if "wrong" in r else f" not run: {r['skipped']}")
                         + " | | | | | | | |")
        else:
            noisy = " (noisy)" if r["noisy"] else ""
            lines.append(head + f" {r['median_ms']:.3f} | {r['min_ms']:.3f} | {r['iqr_ms']:.3f} |"
                         f" {_fmt(r, 'speedup', '.2f')}x{noisy} | {r['floor_ms']:.3f} | {r['floor_share']:.0%} |"
                         f" {_fmt(r, 'launches', 'd')} | {_fmt(r, 'syncs', 'd')} |")
    lines += ["", "Headline: gradclip (backend auto) against torch foreach, speed-up of the median "
              "(rows flagged noisy left out).", "", "| set | clipped | unclipped |", "|---|---|---|"]
    for name, clipped, unclipped in headline(rows):
        lines.append(f"| {name} | " + " | ".join("noisy or missing: re-run" if x is None else f"{x:.2f}x"
                                                 for x in (clipped, unclipped)) + " |")
    return "\n".join(lines) + "\n"


def plot(stamp, rows, path):
    """Speed-up against torch foreach per set and provider, clipped and unclipped, as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    timed = [r for r in rows if "speedup" in r and not r["noisy"]]
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
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"],
                    help="where the gradients live (default: cuda when a GPU is visible, else cpu)")
    ap.add_argument("--sets", nargs="+", default=None, choices=list(gsets.SETS),
                    help="gradient sets to run (default: all; with --quick three of them)")
    ap.add_argument("--providers", nargs="+", default=None, choices=list(PROVIDERS),
                    help="default: every provider that runs on the device, but torch-compile (--compile) and, on the "
                         "CPU, Triton")
    ap.add_argument("--compile", action="store_true", help="add torch.compile of torch's recipe to the providers")
    ap.add_argument("--compile-timeout", type=float, default=None,
                    help="seconds torch.compile may take per set before it is reported as not compiled (default 300)")
    ap.add_argument("--repeats", type=int, default=None, help="timed calls per provider (default 9, quick 5)")
    ap.add_argument("--scale", type=float, default=None,
                    help="fraction of each tensor's leading dimension kept, for every set (default: the real shapes on "
                         "a GPU while they fit an eighth of its memory; on the CPU each set shrunk to about "
                         f"{gsets.CPU_BYTES / 1e6:.0f} MB)")
    ap.add_argument("--quick", action="store_true", help="small sets, few repeats: under a minute on a CPU")
    ap.add_argument("--out", default=RUNS,
                    help="folder for the JSON, Markdown and PNG results (default bench/results/runs, not tracked; "
                         "published runs: --out bench/results)")
    ap.add_argument("--no-save", action="store_true", help="print only")
    ap.add_argument("--step", action="store_true",
                    help="time the whole post-backward step instead (unscale, clip, fused AdamW): bench/step.py")
    ap.add_argument("--policies", action="store_true",
                    help="time the clipping policies (AGC, per-tensor, AutoClip, ZClip) against the recipes people "
                         "run: bench/policies.py")
    args = ap.parse_args(argv)
    if args.step:
        return _main_step(args)
    if args.policies:
        return _main_step(args, "policies")
    names = args.sets or (["gpt2-124m-fp32", "5000x256-fp32", "resnet50-fp32"] if args.quick else list(gsets.SETS))
    repeats = args.repeats or (5 if args.quick else 9)
    providers = args.providers or default_providers(args.device, args.quick, args.compile)
    if BASELINE not in providers:
        providers = [BASELINE] + providers
    compile_timeout = args.compile_timeout if args.compile_timeout is not None else 300
    progress = Progress(len(names) * len(providers) * 2)
    rows = []
    for name in names:
        scale = args.scale or gsets.scale_for(name, args.device, 50e6 if args.quick else None)
        rows += run_set(name, providers, args.device, repeats, scale, compile_timeout, progress)
    progress.close()
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


def _main_step(args, what="step"):
    """--step (bench/step.py) and --policies (bench/policies.py): their own rows, tables and files."""
    import importlib
    mod = importlib.import_module(f"bench.{what}")
    names = args.sets or list(mod.SETS)
    unknown = [n for n in names if n not in mod.SETS]
    if unknown:
        raise SystemExit(f"--{what} runs the sets {list(mod.SETS)}, not {unknown}")
    rows = mod.run(names, args.device, args.repeats or 7, args.scale, lambda fn: _time_once(args.device, fn),
                   lambda: _sync(args.device))
    stamp = _stamp(args.device)
    md = mod.markdown(rows, stamp)
    print(md)
    if not args.no_save:
        os.makedirs(args.out, exist_ok=True)
        base = os.path.join(args.out, f"{args.device}-{what}-{stamp['date']}")
        with open(base + ".json", "w") as f:
            json.dump({"stamp": stamp, "rows": rows}, f, indent=1)
        with open(base + ".md", "w") as f:
            f.write(md)
        print(f"wrote {base}.json and .md", file=sys.stderr)
    return rows


if __name__ == "__main__":
    main()
