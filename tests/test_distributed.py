"""Distributed clipping (gradclip_cuda/distributed.py) on 2 and 4 CPU ranks over gloo.

Each world size is spawned once (a module fixture) and runs every scenario of that size in order; each test then
reads its scenario's outcome. Every scenario compares the total and every clipped gradient with torch's
clip_grad_norm_ on an unsharded copy of the same gradients, checks that every rank got bitwise the same total, and
counts the collectives of the call (torch.distributed's collectives wrapped) against the number of distinct groups.
A rank that fails reports and exits; the others are ended after a short grace; the whole run is bounded in time.
"""
from __future__ import annotations

import contextlib
import copy
import datetime
import math
import os
import queue as queue_mod
import socket
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

INF = math.inf
RUN_TIMEOUT = {2: 120, 4: 150}  # seconds for a whole world's run (spawn included)
COLLECTIVE_TIMEOUT = 40         # a collective that never completes fails (gloo's timeout) instead of hanging


# ---- helpers run in the ranks ----

_COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter", "reduce_scatter_tensor",
                "broadcast", "all_reduce_coalesced", "all_to_all", "all_to_all_single", "reduce", "gather",
                "scatter", "barrier", "all_gather_object", "broadcast_object_list")


@contextlib.contextmanager
def counting():
    """Counts calls to torch.distributed's collectives (both of their names) inside the block."""
    import torch.distributed.distributed_c10d as c10d
    calls = []
    saved = []
    for name in _COLLECTIVES:
        for mod in (dist, c10d):
            fn = getattr(mod, name, None)
            if fn is None:
                continue

            def wrapped(*a, _fn=fn, _name=name, **k):
                calls.append(_name)
                return _fn(*a, **k)
            saved.append((mod, name, fn))
            setattr(mod, name, wrapped)
    try:
        yield calls
    finally:
        for mod, name, fn in saved:
            setattr(mod, name, fn)


def _local(t):
    from torch.distributed.tensor import DTensor
    return t.to_local() if isinstance(t, DTensor) else t


def _full(t):
    from torch.distributed.tensor import DTensor
    return t.full_tensor() if isinstance(t, DTensor) else t


RTOL = {torch.float32: 2e-5, torch.bfloat16: 1.6e-2, torch.float64: 1e-12}


def check_clip(params, ref_grads, p, *, collectives, expect, pp_group=None, process_group=None, max_frac=0.5,
               dtensor_total=True, backend="auto"):
    """clip_grad_norm_ of ``params`` (this rank's) against torch's on ``ref_grads`` (the unsharded gradients of the
    whole model, on every rank). ``expect(i, clipped_refs)`` gives the value this rank's i-th gradient must hold
    afterwards, compared with ``_full(grad)``. Restores the gradients afterwards."""
    import gradclip_cuda as gc
    ref = [torch.nn.Parameter(torch.zeros_like(g)) for g in ref_grads]
    for r, g in zip(ref, ref_grads):
        r.grad = g.clone()
    ref_total = torch.nn.utils.get_total_norm([r.grad for r in ref], p)
    max_norm = float(ref_total) * max_frac if math.isfinite(float(ref_total)) and float(ref_total) > 0 else 1.0
    ref_total = torch.nn.utils.clip_grad_norm_(ref, max_norm, p)
    saved = [_local(q.grad).clone() for q in params]
    with counting() as calls:
        total = gc.clip_grad_norm_(params, max_norm, p, pp_group=pp_group, process_group=process_group,
                                   backend=backend)
    from torch.distributed.tensor import DTensor
    assert isinstance(total, DTensor) == dtensor_total, type(total)
    if dtensor_total:
        assert all(pl.is_replicate() for pl in total.placements), total.placements
    local = _local(total)
    assert len(calls) == collectives, f"p={p}: {len(calls)} collectives ({calls}), expected {collectives}"
    assert local.dtype == ref_total.dtype, (local.dtype, ref_total.dtype)
    rtol = RTOL[local.dtype]
    a, e = float(local), float(ref_total)
    assert (a == e) if not math.isfinite(e) or e == 0 else abs(a - e) <= rtol * abs(e), f"p={p}: total {a} vs {e}"
    # bitwise the same total on every rank
    everyone = [torch.zeros((), dtype=torch.float64) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, local.double().cpu())
    assert all(torch.equal(x, everyone[0]) for x in everyone), f"p={p}: totals differ across ranks: {everyone}"
    clipped = [r.grad for r in ref]
    for i, q in enumerate(params):
        got, want = _full(q.grad).double(), expect(i, clipped).double()
        gtol = max(RTOL[q.grad.dtype], 1e-6)
        assert got.shape == want.shape, (i, got.shape, want.shape)
        assert torch.allclose(got, want, rtol=gtol * 4, atol=gtol * 1e-3 * _amax(want)), \
            f"p={p}: gradient {i} differs by {(got - want).abs().max().item()}"
    for q, s in zip(params, saved):
        _local(q.grad).copy_(s)
    return local


def _amax(t):
    return float(t.abs().max()) if t.numel() else 0.0


def _mlp(seed, dtype=torch.float32, sizes=(16, 16, 5, 1)):
    torch.manual_seed(seed)
    layers = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [torch.nn.Linear(a, b), torch.nn.Tanh()]
    return torch.nn.Sequential(*layers).to(dtype)


def _backward(*models, dtype=torch.float32, seed=1):
    torch.manual_seed(seed)
    x = torch.randn(8, 16, dtype=dtype)
    for m in models:
        m(x).float().pow(2).sum().backward()


def _same_full(params):
    """(this rank's params, unsharded gradients, expect) for a model whose gradients are all whole on each rank."""
    return lambda i, refs: refs[i]


def _fsdp(mesh, model):
    from torch.distributed.fsdp import fully_shard
    for m in model:
        if isinstance(m, torch.nn.Linear):
            fully_shard(m, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


# ---- scenarios: 2 ranks ----

def s_fsdp(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh("cpu", (world,))
    ref = _mlp(0)
    model = _fsdp(mesh, copy.deepcopy(ref))
    _backward(model, ref)
    params = list(model.parameters())
    refs = [q.grad for q in ref.parameters()]
    # the last layer (1 x 5 weight, 1 bias) leaves empty shards on rank 1
    assert any(q.grad.to_local().numel() == 0 for q in params) == (rank == 1)
    for p in (2.0, 1.0, INF, -INF, 0.0, 3.0):
        check_clip(params, refs, p, collectives=1, expect=_same_full(params))


def s_fsdp_torch_backend(rank, world):
    """backend='torch' (and the gradients read through .grad in Python): the general reduction, not _C.LocalSet."""
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh("cpu", (world,))
    ref = _mlp(0, sizes=(16, 12, 7, 1))
    model = _fsdp(mesh, copy.deepcopy(ref))
    _backward(model, ref)
    params = list(model.parameters())
    refs = [q.grad for q in ref.parameters()]
    for p in (2.0, 3.0, INF):
        check_clip(params, refs, p, collectives=1, expect=_same_full(params), backend="torch")


def s_fsdp_bf16(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh("cpu", (world,))
    ref = _mlp(0, torch.bfloat16)
    model = _fsdp(mesh, copy.deepcopy(ref))
    _backward(model, ref, dtype=torch.bfloat16)
    params = list(model.parameters())
    assert params[0].grad.dtype == torch.bfloat16
    refs = [q.grad for q in ref.parameters()]
    for p in (2.0, INF):
        check_clip(params, refs, p, collectives=1, expect=_same_full(params))
    # The total the coefficient is computed from (float32 for bfloat16 gradients) comes from the kernels' float64
    # partials: to about float32 precision, where per-shard norms rounded to bfloat16 are off by up to 2**-9 each.
    from gradclip_cuda import distributed as gdist
    for p in (2.0, 1.0, 3.0):
        _, acc, _, _ = gdist.total_norm([q.grad for q in params], p, None, "auto", writes=False)
        exact = float(torch.linalg.vector_norm(torch.cat([g.double().flatten() for g in refs]), p))
        assert acc.dtype == torch.float32 and abs(float(acc) - exact) <= 2e-6 * exact, (p, float(acc), exact)


class _TwoLayer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.w1 = torch.nn.Linear(16, 12)
        self.w2 = torch.nn.Linear(12, 16)

    def forward(self, x):
        return self.w2(torch.tanh(self.w1(x)))


def s_tp(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
    mesh = init_device_mesh("cpu", (world,))
    ref = _TwoLayer()
    model = parallelize_module(copy.deepcopy(ref), mesh, {"w1": ColwiseParallel(), "w2": RowwiseParallel()})
    _backward(model, ref)
    params = list(model.parameters())
    placements = [q.grad.placements[0] for q in params]
    assert any(pl.is_shard() for pl in placements) and any(pl.is_replicate() for pl in placements), placements
    for p in (2.0, INF, 0.0, -INF):
        check_clip(params, [q.grad for q in ref.parameters()], p, collectives=1, expect=_same_full(params))


def s_mixed_plain(rank, world):
    """FSDP DTensors and plain (replicated) tensors in one call."""
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh("cpu", (world,))
    ref = _mlp(0)
    model = _fsdp(mesh, copy.deepcopy(ref))
    _backward(model, ref)
    torch.manual_seed(5)
    extra = [torch.nn.Parameter(torch.zeros(7)), torch.nn.Parameter(torch.zeros(3, 2))]
    for e in extra:
        e.grad = torch.randn(e.shape)
    params = list(model.parameters()) + extra
    refs = [q.grad for q in ref.parameters()] + [e.grad.clone() for e in extra]
    for p in (2.0, -INF, 0.0, 1.0):
        check_clip(params, refs, p, collectives=1, expect=_same_full(params))


def s_zero(rank, world):
    """Hand-sharded plain tensors (process_group), uneven with an empty shard, beside FSDP DTensors: the group and
    the mesh's have the same ranks, so one collective."""
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh("cpu", (world,))
    ref = _mlp(0)
    model = _fsdp(mesh, copy.deepcopy(ref))
    _backward(model, ref)
    torch.manual_seed(6)
    flat_a, flat_b = torch.randn(7), torch.randn(3)
    cuts_a, cuts_b = [(0, 5), (5, 7)], [(0, 3), (3, 3)]  # rank 1 holds nothing of flat_b
    shards = []
    for flat, cuts in ((flat_a, cuts_a), (flat_b, cuts_b)):
        a, b = cuts[rank]
        q = torch.nn.Parameter(torch.zeros(b - a))
        q.grad = flat[a:b].clone()
        shards.append((q, a, b))
    n = len(list(model.parameters()))
    params = list(model.parameters()) + [q for q, _, _ in shards]
    refs = [q.grad for q in ref.parameters()] + [flat_a.clone(), flat_b.clone()]

    def expect(i, clipped):
        if i < n:
            return clipped[i]
        _, a, b = shards[i - n]
        return clipped[i][a:b]
    for p in (2.0, INF, -INF, 3.0):
        check_clip(params, refs, p, collectives=1, expect=expect, process_group=dist.group.WORLD)


def s_pp_plain(rank, world):
    """Each rank a pipeline stage of plain tensors: the total is combined over pp_group."""
    ref = _mlp(0, sizes=(16, 16, 8, 8, 1))
    _backward(ref)
    refs = [q.grad for q in ref.parameters()]
    n = len(refs)
    mine = list(range(rank * n // world, (rank + 1) * n // world))
    params = []
    for i in mine:
        q = torch.nn.Parameter(torch.zeros_like(refs[i]))
        q.grad = refs[i].clone()
        params.append(q)
    for p in (2.0, 0.0, INF, 1.0):
        check_clip(params, refs, p, collectives=1, expect=lambda i, c: c[mine[i]], pp_group=dist.group.WORLD,
                   dtensor_total=False)
    # a stage without gradients still joins the stages' all-reduce
    import gradclip_cuda as gc
    with counting() as calls:
        total = gc.get_total_norm([q.grad for q in params] if rank == 0 else [], 2.0, pp_group=dist.group.WORLD)
    assert len(calls) == 1, calls
    want = torch.nn.utils.get_total_norm([refs[i] for i in range(n // world)], 2.0)
    assert abs(float(total) - float(want)) <= 2e-5 * float(want), (total, want)


def s_local_ops(rank, world):
    """clip_grad_value_ and clip_grads_with_norm_ on DTensors: local, no collective; get_total_norm matches."""
    import gradclip_cuda as gc
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor
    mesh = init_device_mesh("cpu", (world,))
    ref = _mlp(0)
    model = _fsdp(mesh, copy.deepcopy(ref))
    _backward(model, ref)
    params = list(model.parameters())
    refp = list(ref.parameters())
    with counting() as calls:
        total = gc.get_total_norm([q.grad for q in params], 2.0)
    assert len(calls) == 1, calls
    want = torch.nn.utils.get_total_norm([q.grad for q in refp], 2.0)
    assert abs(float(total.to_local()) - float(want)) <= 2e-5 * float(want)
    with counting() as calls:
        gc.clip_grads_with_norm_(params, 0.25 * float(want), total)
        gc.clip_grad_value_(params, 0.01)
    assert calls == [], calls
    torch.nn.utils.clip_grads_with_norm_(refp, 0.25 * float(want), want)
    torch.nn.utils.clip_grad_value_(refp, 0.01)
    for q, r in zip(params, refp):
        assert torch.allclose(q.grad.full_tensor(), r.grad, rtol=1e-5, atol=1e-7)
    # a NaN in one rank's shard: every rank holds the NaN total, so every rank raises, and nothing is written
    if rank == 0:
        params[0].grad.to_local().view(-1)[0] = float("nan")
    before = [q.grad.to_local().clone() for q in params]
    with pytest.raises(RuntimeError, match="non-finite"):
        gc.clip_grad_norm_(params, 1e-3, error_if_nonfinite=True)
    assert all(torch.equal(q.grad.to_local(), b) for q, b in zip(params, before) if not b.isnan().any())
    # DTensor parameters without gradients: torch's tensor(0.) for every norm type, no collective
    for q in params:
        q.grad = None
    for p in (2.0, INF, -INF, 0.0):
        with counting() as calls:
            total = gc.clip_grad_norm_(params, 1.0, p)
        assert calls == [] and not isinstance(total, DTensor) and torch.equal(total, torch.tensor(0.0)), (p, total)


def s_amp(rank, world):
    """The optimizer keywords (gradclip_cuda/amp.py) with DTensor gradients: the total is reduced, the coefficient
    applied to the local shards; same gradients and total as the plain call."""
    import gradclip_cuda as gc
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh("cpu", (world,))
    ref = _mlp(0)
    model = _fsdp(mesh, copy.deepcopy(ref))
    _backward(model, ref)
    params = list(model.parameters())
    saved = [q.grad.to_local().clone() for q in params]
    plain = gc.clip_grad_norm_(params, 0.5)
    want = [q.grad.to_local().clone() for q in params]
    for q, s in zip(params, saved):
        q.grad.to_local().copy_(s)
    opt = torch.optim.SGD(params, lr=0.1)
    with counting() as calls:
        total = gc.clip_grad_norm_(params, 0.5, optimizer=opt)
    assert len(calls) == 1, calls
    assert torch.equal(total.to_local(), plain.to_local()), (total, plain)
    for q, w in zip(params, want):
        assert torch.allclose(q.grad.to_local(), w, rtol=1e-6, atol=0)


def s_amp_scaler(rank, world):
    """scaler= (a GradScaler on the CPU) and defer= (a fused Adam) with FSDP2 gradients: after the step the
    parameters match torch's unscale_ + clip_grad_norm_ + step on the unsharded model; one collective per clip."""
    import gradclip_cuda as gc
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh("cpu", (world,))
    for recipe in ("scaler", "defer", "scaler+defer"):
        ref = _mlp(0)
        model = _fsdp(mesh, copy.deepcopy(ref))
        fused = "defer" in recipe  # a fused Adam (torch has no DTensor strategy for the fused SGD kernel)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2, fused=fused)
        opt_ref = torch.optim.Adam(ref.parameters(), lr=1e-2)
        with_scaler = "scaler" in recipe
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, enabled=with_scaler)
        scaler_ref = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, enabled=with_scaler)
        for step in range(3):
            torch.manual_seed(10 + step)
            x = torch.randn(8, 16)
            scaler.scale(model(x).pow(2).sum()).backward()
            scaler_ref.scale(ref(x).pow(2).sum()).backward()
            scaler_ref.unscale_(opt_ref)
            want = torch.nn.utils.clip_grad_norm_(list(ref.parameters()), 0.05)
            params = list(model.parameters())
            before = [q.grad.to_local().clone() for q in params]
            with counting() as calls:
                total = gc.clip_grad_norm_(params, 0.05, scaler=scaler if with_scaler else None, optimizer=opt,
                                           defer=fused)
            assert len(calls) == 1, (recipe, calls)
            if fused:  # handed to the step: nothing written yet
                assert all(torch.equal(q.grad.to_local(), b) for q, b in zip(params, before)), recipe
            assert abs(float(total.full_tensor()) - float(want)) <= 2e-5 * float(want), (recipe, total, want)
            scaler.step(opt)
            scaler.update()
            scaler_ref.step(opt_ref)
            scaler_ref.update()
            opt.zero_grad()
            opt_ref.zero_grad()
            for q, r in zip(params, ref.parameters()):
                assert torch.allclose(q.full_tensor(), r, rtol=1e-5, atol=1e-6), (recipe, step)


def s_errors(rank, world):
    """A group this rank is not in, and a Partial gradient: clear errors, nothing written, no hang."""
    import gradclip_cuda as gc
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial
    mesh = init_device_mesh("cpu", (world,))
    only0 = dist.new_group([0])  # collective on every rank; rank 1 gets GroupMember.NON_GROUP_MEMBER
    q = torch.nn.Parameter(torch.zeros(4))
    q.grad = torch.full((4,), 3.0)
    if rank != 0:
        with pytest.raises(ValueError, match="process_group"):
            gc.clip_grad_norm_([q], 1.0, process_group=only0)
        with pytest.raises(ValueError, match="pp_group"):
            gc.clip_grad_norm_([q], 1.0, pp_group=[dist.group.WORLD, only0])
        assert torch.equal(q.grad, torch.full((4,), 3.0))
    d = torch.nn.Parameter(DTensor.from_local(torch.zeros(4), mesh, [Partial()], run_check=False))
    d.grad = DTensor.from_local(torch.full((4,), 2.0), mesh, [Partial()], run_check=False)
    with pytest.raises(NotImplementedError, match="Partial"):
        gc.clip_grad_norm_([q, d], 1.0)
    assert torch.equal(q.grad, torch.full((4,), 3.0)) and torch.equal(d.grad.to_local(), torch.full((4,), 2.0))
    dist.barrier()


# ---- scenarios: 4 ranks ----

def s_hsdp(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    ref = _mlp(0)
    model = _fsdp(mesh, copy.deepcopy(ref))
    _backward(model, ref)
    params = list(model.parameters())
    assert params[0].grad.placements[0].is_replicate() and params[0].grad.placements[1].is_shard()
    for p in (2.0, 1.0, INF, 0.0):
        check_clip(params, [q.grad for q in ref.parameters()], p, collectives=1, expect=_same_full(params))


def s_two_meshes(rank, world):
    """Dense layers FSDP-sharded on a 4-rank mesh, experts on their own 2x2 mesh (ep x edp), sharded on both
    dimensions or replicated on one: three distinct groups, three collectives."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    mesh = init_device_mesh("cpu", (world,))
    emesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("ep", "edp"))
    ref = _mlp(0)
    model = _fsdp(mesh, copy.deepcopy(ref))
    _backward(model, ref)
    torch.manual_seed(7)
    e_full = [torch.randn(4, 6, 3), torch.randn(4, 5)]
    experts = []
    for full, pl in zip(e_full, ([Shard(0), Shard(1)], [Shard(0), Replicate()])):
        q = torch.nn.Parameter(distribute_tensor(torch.zeros_like(full), emesh, pl))
        q.grad = distribute_tensor(full.clone(), emesh, pl)
        experts.append(q)
    params = list(model.parameters()) + experts
    refs = [q.grad for q in ref.parameters()] + [f.clone() for f in e_full]
    for p in (2.0, INF, -INF, 3.0, 0.0):
        check_clip(params, refs, p, collectives=3, expect=_same_full(params))


def s_pp_fsdp(rank, world):
    """A 2-stage pipeline of FSDP stages: mesh pp x dp; the stage's layers sharded over dp; pp_group its pp group."""
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("pp", "dp"))
    stage = mesh.get_local_rank("pp")
    refs_all, mine = [], None
    for s in range(2):
        ref = _mlp(10 + s)
        if s == stage:
            model = _fsdp(mesh["dp"], copy.deepcopy(ref))
            _backward(model, ref)
            mine = (len(refs_all), list(model.parameters()))
        else:
            _backward(ref)
        refs_all += [q.grad for q in ref.parameters()]
    offset, params = mine
    for p in (2.0, 0.0, INF):
        check_clip(params, refs_all, p, collectives=2, expect=lambda i, c: c[offset + i],
                   pp_group=mesh.get_group("pp"))


def s_pp_list(rank, world):
    """Four stages of plain tensors; pp_group a list of two groups (pairs, then the other pairs)."""
    rows = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    cols = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    groups = [rows[rank // 2], cols[rank % 2]]
    ref = _mlp(0, sizes=(16, 16, 8, 8, 4, 1))
    _backward(ref)
    refs = [q.grad for q in ref.parameters()]
    n = len(refs)
    mine = list(range(rank * n // world, (rank + 1) * n // world))
    params = []
    for i in mine:
        q = torch.nn.Parameter(torch.zeros_like(refs[i]))
        q.grad = refs[i].clone()
        params.append(q)
    for p in (2.0, 1.0, -INF):
        check_clip(params, refs, p, collectives=2, expect=lambda i, c: c[mine[i]], pp_group=groups,
                   dtensor_total=False)


def s_fsdp_tp(rank, world):
    """2-D: TP on one mesh dimension, FSDP on the other (strided shards): two groups."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    ref = _TwoLayer()
    model = parallelize_module(copy.deepcopy(ref), mesh["tp"], {"w1": ColwiseParallel(), "w2": RowwiseParallel()})
    fully_shard(model.w1, mesh=mesh["dp"])
    fully_shard(model.w2, mesh=mesh["dp"])
    fully_shard(model, mesh=mesh["dp"])
    _backward(model, ref)
    params = list(model.parameters())
    for p in (2.0, INF):
        check_clip(params, [q.grad for q in ref.parameters()], p, collectives=2, expect=_same_full(params))


SCENARIOS = {
    2: ["fsdp", "fsdp_torch_backend", "fsdp_bf16", "tp", "mixed_plain", "zero", "pp_plain", "local_ops", "amp", "amp_scaler", "errors"],
    4: ["hsdp", "two_meshes", "pp_fsdp", "pp_list", "fsdp_tp"],
}


# ---- the launcher ----

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, names, q):
    code = 0
    try:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT))
        for name in names:
            try:
                globals()["s_" + name](rank, world)
                q.put((rank, name, None))
            except BaseException:
                q.put((rank, name, traceback.format_exc()))
                code = 1
                break  # collectives may now be unmatched: stop this rank; the launcher ends the others
        if code == 0:
            dist.destroy_process_group()
    except BaseException:
        q.put((rank, "<setup>", traceback.format_exc()))
        code = 1
    _exit(q, code)


def _exit(q, code):
    q.close()
    q.join_thread()  # flush what this rank reported before the hard exit
    os._exit(code)


def run_world(world: int, names, timeout: float, target=_worker, args=()) -> dict:
    """Runs ``names`` on ``world`` spawned ranks; name -> None (passed on every rank) or an error text."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=target, args=(r, world, port, names, q) + args, daemon=True) for r in range(world)]
    for pr in procs:
        pr.start()
    outcome: dict = {}
    deadline = time.monotonic() + timeout
    failed_at = None
    while time.monotonic() < deadline:
        try:
            rank, name, err = q.get(timeout=0.5)
            outcome.setdefault(name, {})[rank] = err
            if err is not None and failed_at is None:
                failed_at = time.monotonic()
        except queue_mod.Empty:
            pass
        if all(not pr.is_alive() for pr in procs):
            break
        if failed_at is not None and time.monotonic() - failed_at > 10:
            break  # a rank failed: give the others a moment to report, then end them
    for pr in procs:
        if pr.is_alive():
            pr.kill()
        pr.join(5)
    while True:  # anything reported after the loop
        try:
            rank, name, err = q.get_nowait()
            outcome.setdefault(name, {})[rank] = err
        except (queue_mod.Empty, OSError, EOFError):
            break
    result = {}
    for name in names + ["<setup>"]:
        per_rank = outcome.get(name, {})
        errors = {r: e for r, e in per_rank.items() if e is not None}
        if errors:
            result[name] = "\n".join(f"rank {r}:\n{e}" for r, e in sorted(errors.items()))
        elif len(per_rank) < world and name != "<setup>":
            result[name] = (f"not completed on ranks {sorted(set(range(world)) - set(per_rank))} "
                            f"(an earlier scenario failed, or the run passed its {timeout} s bound)")
        else:
            result[name] = None
    setup = result.pop("<setup>")
    if setup:
        for name in names:
            result[name] = result[name] or setup
    return result


@pytest.fixture(scope="module")
def outcomes():
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    cache = {}

    def get(world):
        if world not in cache:
            cache[world] = run_world(world, SCENARIOS[world], RUN_TIMEOUT[world])
        return cache[world]
    return get


@pytest.mark.parametrize("world,name", [(w, n) for w, ns in SCENARIOS.items() for n in ns])
def test_scenario(outcomes, world, name):
    err = outcomes(world)[name]
    assert err is None, err


def _hang_worker(rank, world, port, names, q):
    """Rank 1 never joins rank 0's all-reduce."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT))
    if rank == 1:
        time.sleep(600)
    q.put((rank, names[0], None))
    _exit(q, 0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("p", [2.0, 1.0, 3.0, -1.5, INF, -INF, 0.0])
def test_each_partial_is_the_float64_partial_of_each_tensor(p, dtype):
    # What the distributed total reduces across ranks: each tensor's un-finalised partial (sum |x|^p; max, min |x|;
    # the nonzero count), from the compiled kernels' float64 accumulators, and from per-tensor norms elsewhere.
    from gradclip_cuda import _ops, api
    gen = torch.Generator().manual_seed(3)
    shapes = [(37,), (5, 9), (70_000,), (1,), (300, 7)]
    xs = [(torch.randn(s, generator=gen) * 0.1).to(dtype) for s in shapes]
    xs[1][2] = 0  # a partly-zero tensor for p = 0
    ref = []
    for x in xs:
        a = x.double().abs().flatten()
        ref.append(a.max() if p == INF else a.min() if p == -INF else (a != 0).sum().double() if p == 0
                   else a.pow(p).sum())
    ref = torch.stack(ref)
    impls = [api._TORCH] + ([api._OPS] if _ops.C is not None else [])
    for impl in impls:
        if impl is api._TORCH and p <= 0 and dtype in (torch.float16, torch.bfloat16):
            continue  # per-tensor norms rounded to the dtype: counts above 65,504 and p < 0 norms overflow it
        got = api.each_partial(impl, xs, p, "auto")
        assert got.dtype == torch.float64 and got.shape == (len(xs),)
        # the compiled kernels keep float32 lanes inside a chunk and float64 across chunks and for the output; the
        # torch fallback raises per-tensor norms, rounded to the gradients' dtype (bfloat16: 2**-9), to p
        exact = impl is api._OPS or dtype == torch.float64
        rtol = 1e-12 if dtype == torch.float64 else 2e-5 if exact else {torch.bfloat16: 2e-2, torch.float16: 3e-3,
                                                                        torch.float32: 1e-4}[dtype]
        assert torch.allclose(got, ref, rtol=rtol * max(1.0, abs(p) if math.isfinite(p) else 1.0), atol=0), \
            (impl, (got - ref).abs().max())


def test_launcher_bounds_a_hung_rank():
    """The launcher ends a run whose rank hangs and reports it: a hung test fails, it does not hang CI."""
    result = run_world(2, ["hang"], timeout=15, target=_hang_worker)
    assert result["hang"] is not None and "not completed on ranks [1]" in result["hang"]
