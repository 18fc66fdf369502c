"""Benchmark of distributed clipping: gradclip_cuda against torch.nn.utils.clip_grad_norm_ on DTensor gradients.

    python -m bench.distributed                    # 2 gloo ranks on this machine's CPU; about 2 minutes
    python -m bench.distributed --sizes 1000 --torch-repeats 2 --torch-max 2000 --out /tmp/runs

Spawns its own ranks (gloo on 127.0.0.1, a free port). Sets: ``fsdp-N``: N parameters of nn.Linear(16, 16) layers,
each layer and the root under ``fully_shard`` (FSDP2, Shard(0) on a 1-D mesh of every rank); ``tp-N``: blocks of
nn.Linear(16, 32) colwise and nn.Linear(32, 16) rowwise (parallelize_module: Shard(0), Shard(1) and Replicate
gradients). Gradients come from one forward and backward of a batch that is the same on every rank (residual
blocks x + 0.1 tanh(Wx + b) for FSDP2, so that 500 layers deep they neither vanish nor explode).

Each provider is first checked against the other (total and every local shard after clipping), then timed: every
call clips (max_norm is a tenth of the total), the gradients are restored from a copy and the ranks meet at a barrier
before each call, outside the timed region; the time of a call is rank 0's perf_counter around it. The first call
(the check) is reported apart: torch's carries a one-time cost that grows about quadratically with the number of
DTensors (not traced; presumably DTensor's dispatch caches), so torch is run only up to --torch-max DTensors and ours is checked against a float64
reference above that. Collectives per
call are counted in one extra, untimed call under torch.profiler (its "gloo:"/"nccl:" events: collectives issued
through torch.distributed and through DTensor's functional collectives alike). --floors adds rows for what any clip
of the set must do at least, timed the same way: list the parameters' ``.grad`` (our C++ pass, the fastest we know),
one all_reduce of one float64, and both in a row; torch's median over theirs bounds the speed-up any implementation
can reach on this machine. torch takes seconds per call at
1,000 DTensors on a CPU on its first call: its repeats are few (--torch-repeats). Prints a Markdown table and writes
distributed-<date>.md and .json to bench/results/runs/ (--out to change).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import queue as queue_mod
import socket
import statistics
import sys
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Residual(torch.nn.Module):
    """x + 0.1 tanh(W x + b): a deep stack whose gradients neither vanish nor explode."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(16, 16)

    def forward(self, x):
        return x + 0.1 * torch.tanh(self.lin(x))


def _fsdp_set(mesh, n):
    from torch.distributed.fsdp import fully_shard
    model = torch.nn.Sequential(*[_Residual() for _ in range(n // 2)])
    for m in model:
        fully_shard(m, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return list(model.parameters()), model


def _tp_set(mesh, n):
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
    blocks = n // 4
    model = torch.nn.ModuleList(torch.nn.ModuleDict({"up": torch.nn.Linear(16, 32), "down": torch.nn.Linear(32, 16)})
                                for _ in range(blocks))
    plan = {}
    for i in range(blocks):
        plan[f"{i}.up"] = ColwiseParallel()
        plan[f"{i}.down"] = RowwiseParallel()
    parallelize_module(model, mesh, plan)

    def forward(x):
        for block in model:
            x = torch.tanh(block["down"](torch.tanh(block["up"](x))))
        return x
    return list(model.parameters()), forward


def _backward_grads(forward, seed):
    """Gradients as training makes them: one forward and backward of a batch that is the same on every rank (FSDP2
    reduce-scatters and TP all-reduces inside backward, outside anything timed). The gradients of a layer type then
    share their DTensor specs, as in a real step."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(8, 16, generator=gen)
    forward(x).square().sum().backward()


def _providers():
    import gradclip_cuda as gc
    return {"torch": lambda ps, m: torch.nn.utils.clip_grad_norm_(ps, m),
            "gradclip": lambda ps, m: gc.clip_grad_norm_(ps, m)}


def _collectives(fn, params, max_norm) -> int:
    from torch.profiler import profile
    with profile() as prof:
        fn(params, max_norm)
    return sum(1 for e in prof.events() if e.name.startswith(("gloo:", "nccl:")))


def _all_sum(x: float) -> float:
    t = torch.tensor([x], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t)


def _value(total) -> float:
    from torch.distributed.tensor import DTensor
    return float(total.full_tensor() if isinstance(total, DTensor) else total)


def _worker(rank, world, port, args, q):
    code = 0
    try:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=600))
        from torch.distributed.device_mesh import init_device_mesh
        mesh = init_device_mesh("cpu", (world,))
        sets = [(f"fsdp-{n}", _fsdp_set, n) for n in args.sizes] + [(f"tp-{n}", _tp_set, n) for n in args.tp_sizes]
        for name, build, n in sets:
            torch.manual_seed(0)
            params, forward = build(mesh, n)
            _backward_grads(forward, seed=1)
            pristine = [p.grad.to_local().clone() for p in params]

            def restore():
                for p, s in zip(params, pristine):
                    p.grad.to_local().copy_(s)
            import gradclip_cuda as gc  # torch's get_total_norm would pay its first call here
            max_norm = 0.1 * _value(gc.get_total_norm([p.grad for p in params]))
            # check: same total and same clipped shards
            results, first = {}, {}
            providers = _providers()
            if n > args.torch_max:
                del providers["torch"]
            for prov, fn in providers.items():
                restore()
                dist.barrier()
                t0 = time.perf_counter()
                total = fn(params, max_norm)
                first[prov] = time.perf_counter() - t0  # the first call: torch's carries a one-time cost
                results[prov] = (_value(total), [p.grad.to_local().clone() for p in params])
            if "torch" in results:
                (t_ref, g_ref), (t_ours, g_ours) = results["torch"], results["gradclip"]
                ok = abs(t_ours - t_ref) <= 1e-5 * abs(t_ref) and all(
                    torch.allclose(a, b, rtol=1e-5, atol=1e-8) for a, b in zip(g_ours, g_ref))
            else:  # against torch's get_total_norm of the pristine gradients and torch's coefficient
                restore()
                # 1-D mesh: a sharded gradient's shards are summed over the ranks, a replicated one counted once
                local_sq = float(sum(torch.linalg.vector_norm(g.double()) ** 2 for p, g in zip(params, pristine)
                                     if rank == 0 or not all(pl.is_replicate() for pl in p.grad.placements)))
                t_ref = math.sqrt(_all_sum(local_sq))
                coef = min(max_norm / (t_ref + 1e-6), 1.0)
                ok = abs(results["gradclip"][0] - t_ref) <= 1e-5 * t_ref and all(
                    torch.allclose(a.double(), b.double() * coef, rtol=1e-5, atol=1e-8)
                    for a, b in zip(results["gradclip"][1], pristine))
            rows = []
            for prov, fn in providers.items():
                restore()
                colls = _collectives(fn, params, max_norm)
                reps = args.torch_repeats if prov == "torch" else args.repeats
                times = []
                for _ in range(reps + (1 if prov != "torch" else 0)):  # ours: one untimed warm-up call
                    restore()
                    dist.barrier()
                    t0 = time.perf_counter()
                    fn(params, max_norm)
                    times.append(time.perf_counter() - t0)
                if prov != "torch":
                    times = times[1:]
                rows.append({"set": name, "params": len(params), "provider": prov, "median_s": statistics.median(times),
                             "min_s": min(times), "first_s": first[prov], "repeats": len(times), "collectives": colls,
                             "correct": ok})
            if args.floors:  # what any clip of the set must do at least, timed as the providers are
                from gradclip_cuda import _ops
                one = torch.zeros(1, dtype=torch.float64)
                floors = {"floor: list the .grad (C++)": lambda: _ops.C.grads_of(params),
                          "floor: one all_reduce": lambda: dist.all_reduce(one),
                          "floor: both": lambda: (_ops.C.grads_of(params), dist.all_reduce(one))}
                for prov, fn in floors.items():
                    times = []
                    for _ in range(args.repeats + 1):
                        restore()
                        dist.barrier()
                        t0 = time.perf_counter()
                        fn()
                        times.append(time.perf_counter() - t0)
                    times = times[1:]
                    rows.append({"set": name, "params": len(params), "provider": prov,
                                 "median_s": statistics.median(times), "min_s": min(times), "first_s": float("nan"),
                                 "repeats": len(times), "collectives": prov.count("all_reduce") + prov.count("both"),
                                 "correct": True})
            if rank == 0:
                q.put(("rows", rows))
            del params, pristine
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:
        q.put(("error", f"rank {rank}:\n{traceback.format_exc()}"))
        code = 1
    q.close()
    q.join_thread()
    os._exit(code)


def _table(rows) -> str:
    lines = ["| set | DTensors | provider | median per call | min | first call | repeats | collectives per call | "
             "speed-up (median) | agrees with torch |", "|---|---:|---|---:|---:|---:|---:|---:|---:|---|"]
    ref = {r["set"]: r["median_s"] for r in rows if r["provider"] == "torch"}
    for r in rows:
        up = f"{ref[r['set']] / r['median_s']:.1f}x" if r["set"] in ref else "torch not run"
        first = "-" if math.isnan(r["first_s"]) else f"{r['first_s'] * 1e3:.0f} ms"
        agrees = "-" if r["provider"].startswith("floor") else "yes" if r["correct"] else "NO"
        lines.append(f"| {r['set']} | {r['params']} | {r['provider']} | {r['median_s'] * 1e3:.2f} ms | "
                     f"{r['min_s'] * 1e3:.2f} ms | {first} | {r['repeats']} | {r['collectives']} | {up} | {agrees} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", type=int, default=2, help="gloo ranks (default 2)")
    ap.add_argument("--sizes", type=int, nargs="*", default=[1000, 5000], help="FSDP2 set sizes (parameters)")
    ap.add_argument("--tp-sizes", type=int, nargs="*", default=[1000], help="TP set sizes (parameters)")
    ap.add_argument("--repeats", type=int, default=20, help="timed calls of gradclip per set")
    ap.add_argument("--torch-repeats", type=int, default=3, help="timed calls of torch per set")
    ap.add_argument("--torch-max", type=int, default=1000,
                    help="largest set torch is run on: its first call on DTensors grows about quadratically with "
                         "their number (13 s at 1,000 and 44 s at 2,000 on one CPU rank here)")
    ap.add_argument("--floors", action="store_true",
                    help="also time what any clip must do at least: list the parameters' .grad (one C++ pass), one "
                         "all_reduce of one float64, and both; their speed-up column bounds any implementation's")
    ap.add_argument("--timeout", type=float, default=900, help="seconds before the ranks are ended")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "runs"))
    args = ap.parse_args(argv)
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, args.world, port, args, q), daemon=True) for r in range(args.world)]
    for p in procs:
        p.start()
    rows, errors = [], []
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline and any(p.is_alive() for p in procs) and not errors:
        try:
            kind, payload = q.get(timeout=1)
        except queue_mod.Empty:
            continue
        if kind == "rows":
            rows += payload
            print(_table(payload).splitlines()[-2], file=sys.stderr)
            print(_table(payload).splitlines()[-1], file=sys.stderr)
        else:
            errors.append(payload)
    for p in procs:
        if p.is_alive():
            p.kill()
        p.join(5)
    if errors or not rows:
        print("\n".join(errors) or "no results (timed out)", file=sys.stderr)
        return 1
    table = _table(rows)
    head = (f"gradclip_cuda distributed benchmark, {args.world} gloo ranks on {platform.processor() or 'cpu'} "
            f"({os.cpu_count()} cores), torch {torch.__version__}, {datetime.datetime.now():%Y-%m-%d %H:%M}")
    print(head + "\n\n" + table)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"distributed-{datetime.date.today()}")
    with open(stem + ".md", "w") as f:
        f.write(head + "\n\nCommand: python -m bench.distributed " + " ".join(argv or sys.argv[1:]) + "\n\n" + table + "\n")
    with open(stem + ".json", "w") as f:
        json.dump({"header": head, "rows": rows, "args": vars(args)}, f, indent=1)
    print(f"\nwritten: {stem}.md, {stem}.json", file=sys.stderr)
    return 0 if all(r["correct"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
