"""Distributed gradients: DTensors (FSDP2, TP, HSDP, expert parallel, any mix of meshes), plain tensors sharded by
hand over a group (``process_group``: ZeRO-style flat shards), and pipeline stages (``pp_group``).

Local shards in, one collective per distinct process group, a replicated total out:

1. Each gradient is read as its local shard (a DTensor's ``_local_tensor``; never a per-parameter DTensor op) and
   given a *reduction key*: the process groups over which its shards must be summed. For a DTensor these are the
   groups of the mesh dimensions where its placement splits the data (``Shard``, and ``_StridedShard``, which FSDP
   over TP produces and which is not a ``Shard`` in every torch version); on a ``Replicate``
   dimension every rank holds the same values, so that dimension is left out and the copy is counted once. A plain
   tensor's key is ``(process_group,)`` when that keyword is given, else empty (a replica, as torch treats it).
   Groups of one rank are dropped (nothing to reduce); two groups with the same ranks are one group.
2. One launch of our norm kernel per device over all local shards (shards ordered by key), giving each shard's
   *un-finalised* partial in float64 (sum of |x|^p; the compiled kernels' own float64 accumulators, so bfloat16
   shards lose nothing to a rounded per-tensor norm; other backends: the per-tensor norms, raised to p), then each
   key's partial: the sum of its shards' (finite p), their max (inf), their min (-inf), or for p = 0 the vector of
   per-tensor nonzero counts (torch's total for p = 0 counts the tensors that
   hold a nonzero element, so the per-tensor counts are reduced before they are counted). Local shards with no
   element are left out of the launch for inf, -inf and p < 0 (their identity); a rank whose shards are all empty
   still joins every collective with that identity.
3. The groups are visited in order of first appearance in the gradient list (the same on every rank of a group
   when the ranks pass the same gradients in the same order, which DTensor code requires anyway); for each group,
   one ``all_reduce`` (SUM; MAX for inf; MIN for -inf) of a float64 vector holding the partial of every key that
   contains that group. A key over two groups (a 2-D mesh with ``Shard`` on both dimensions) is reduced over each
   in turn, so a call issues exactly one collective per distinct group.
4. Keys are combined (sum; max; min; for p = 0 the count of nonzero entries), then the total is further reduced
   over each ``pp_group`` (one collective each), and finalised (``S ** (1/p)``). Every rank thus holds bitwise the
   same float64 total; the clip coefficient is computed from it on the device by our scale op, one launch per
   device over the local shards.

``Partial`` placements (unreduced gradients: unusual after backward) are refused with a clear error: the norm of a
sum of partial values is not a function of the partials' norms, so they would have to be reduced first, which is
the caller's data-sized collective to choose (``redistribute`` to ``Replicate``/``Shard``).

No host sync: collectives are issued as torch.distributed issues them; the coefficient stays on the device.
"""
from __future__ import annotations

import math
import sys

import torch
import torch.distributed as dist

from . import _ops

__all__ = ["has_dtensor", "local", "total_norm", "wrap", "check_groups"]


def _dtensor_class():
    """torch's DTensor class, or None while torch.distributed.tensor is not imported (then no DTensor exists).
    Importing it ourselves would add most of a second to ``import gradclip_cuda``."""
    mod = sys.modules.get("torch.distributed.tensor")
    return getattr(mod, "DTensor", None) if mod is not None else None


def has_dtensor(ts) -> bool:
    DTensor = _dtensor_class()
    if DTensor is None:
        return False
    if _ops.C is not None and isinstance(ts, (list, tuple)) and not torch.compiler.is_compiling():
        return _ops.C.any_instance(ts, DTensor)  # a C loop: thousands of gradients on every non-fast call
    return any(isinstance(t, DTensor) for t in ts)


def local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (no DTensor dispatch, no autograd node); a plain tensor itself."""
    DTensor = _dtensor_class()
    return t._local_tensor if DTensor is not None and isinstance(t, DTensor) else t


def _ranks(pg, what: str) -> tuple:
    if pg is None or pg is dist.GroupMember.NON_GROUP_MEMBER:
        raise ValueError(f"gradclip_cuda: {what} is not a process group this rank belongs to "
                         "(dist.new_group returns GroupMember.NON_GROUP_MEMBER on ranks outside the group)")
    try:
        ranks = tuple(sorted(dist.get_process_group_ranks(pg)))
    except (ValueError, RuntimeError, KeyError) as e:
        raise ValueError(f"gradclip_cuda: {what} is not a usable process group ({e})") from None
    if dist.get_rank() not in ranks:
        raise ValueError(f"gradclip_cuda: this rank ({dist.get_rank()}) is not in {what} (ranks {list(ranks)})")
    return ranks


def _pp_list(pp_group) -> list:
    if pp_group is None:
        return []
    return list(pp_group) if isinstance(pp_group, (list, tuple)) else [pp_group]


def check_groups(process_group, pp_group) -> None:
    """Errors for group keywords, before anything else happens."""
    if (process_group is not None or pp_group is not None) and not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("gradclip_cuda: process_group / pp_group need torch.distributed to be initialized")
    if process_group is not None:
        _ranks(process_group, "process_group")
    for i, g in enumerate(_pp_list(pp_group)):
        _ranks(g, f"pp_group[{i}]" if isinstance(pp_group, (list, tuple)) else "pp_group")


class _Plan:
    """Reduction keys of the gradients and the groups to all-reduce over, in order of first appearance."""

    def __init__(self):
        self.groups: list = []        # process groups, in order of first appearance
        self._by_ranks: dict = {}     # ranks tuple -> index in groups
        self.keys: list = []          # keys (sorted tuples of group indices), in order of first appearance
        self._key_index: dict = {}
        self.mesh = None              # the first DTensor's mesh
        self.mesh_device = None

    def group(self, pg, what: str):
        ranks = _ranks(pg, what)
        if len(ranks) == 1:
            return None
        i = self._by_ranks.get(ranks)
        if i is None:
            i = self._by_ranks[ranks] = len(self.groups)
            self.groups.append(pg)
        return i

    def key(self, gidx: tuple) -> int:
        k = tuple(sorted(set(gidx)))
        i = self._key_index.get(k)
        if i is None:
            i = self._key_index[k] = len(self.keys)
            self.keys.append(k)
        return i


def _dtensor_key(plan: _Plan, mesh, placements) -> int:
    """The reduction key of DTensors on ``mesh`` with ``placements`` (registering their groups in ``plan``). Raises
    on a mesh of another device type than the plan's and on Partial placements."""
    if plan.mesh is None:
        plan.mesh, plan.mesh_device = mesh, mesh.device_type
    elif mesh.device_type != plan.mesh_device:
        raise ValueError(f"gradclip_cuda: gradients on meshes of different device types "
                         f"('{plan.mesh_device}' and '{mesh.device_type}'): one call cannot reduce them "
                         "together; nothing was written")
    for d, pl in enumerate(placements):
        if pl.is_partial():
            raise NotImplementedError(
                f"gradclip_cuda: a gradient with a Partial placement ({pl} on mesh dimension {d}) holds "
                "unreduced values whose norm the partials do not determine; redistribute it to Shard or "
                "Replicate first. Nothing was written")
    # every placement that is neither Replicate nor Partial splits the data: Shard, and _StridedShard (FSDP over
    # TP), which some torch versions do not make a Shard
    dims = [plan.group(mesh.get_group(d), f"mesh dimension {d}")
            for d, pl in enumerate(placements) if not pl.is_replicate()]
    return plan.key(tuple(i for i in dims if i is not None))


def _plain_key(plan: _Plan, process_group) -> int:
    gi = plan.group(process_group, "process_group") if process_group is not None else None
    return plan.key(() if gi is None else (gi,))


def _plan(grads, process_group):
    """(plan, key index of each gradient, local shard of each gradient). Raises on meshes of different device types
    and on Partial placements."""
    DTensor = _dtensor_class()
    plan = _Plan()
    cache: dict = {}
    plain_key = None
    out, locals_ = [], []
    for g in grads:
        if DTensor is not None and (type(g) is DTensor or isinstance(g, DTensor)):
            locals_.append(g._local_tensor)
            spec = g._spec
            k = cache.get((id(spec.mesh), spec.placements))
            if k is None:
                k = cache[(id(spec.mesh), spec.placements)] = _dtensor_key(plan, spec.mesh, spec.placements)
            out.append(k)
        else:
            locals_.append(g)
            if plain_key is None:
                plain_key = _plain_key(plan, process_group)
            out.append(plain_key)
    if process_group is not None and plain_key is None:  # no plain tensors here: still join process_group's reduce
        _plain_key(plan, process_group)
    return plan, out, locals_


def first_is_dtensor(params) -> bool:
    """Whether the first of ``params`` is a DTensor (FSDP2 and TP parameters all are): the API then reads their
    gradients with the distributed path's own pass (total_norm's ``from_params``) instead of a pass of its own."""
    DTensor = _dtensor_class()
    return DTensor is not None and isinstance(params, (list, tuple)) and len(params) > 0 and \
        isinstance(params[0], DTensor)


def _fast_plan(seq, process_group, from_params: bool):
    """What _plan gives, from one C++ pass over the gradients, or over the parameters' ``.grad`` when
    ``from_params`` (_C.dtensor_locals), or None where it does not apply: (plan, runs [(key, count)] of the local
    shards in their new order, local shards grouped by (mesh, placements), their one device, torch's dtype of their
    total). Applies when every local shard is a plain tensor the compiled kernels take, on one device."""
    DTensor = _dtensor_class()
    if _ops.C is None or DTensor is None or torch.compiler.is_compiling():
        return None
    read = _ops.C.dtensor_locals(seq, DTensor, from_params)
    if read is None:
        return None
    locals_, runs, uniques, device, dtype, _ = read
    if device is None:
        return None
    plan, keys = _cached_keys(uniques, process_group)
    return plan, [(keys[u], count) for u, count in runs], locals_, device, dtype


_key_cache: dict = {}  # (meshes and placements, process_group) -> (meshes, plan, keys); the last few layouts


def _cached_keys(uniques, process_group):
    """(plan, reduction key of each (mesh, placements) of ``uniques``), cached: a model's gradients keep their
    meshes and placements from step to step, and resolving the groups costs tens of microseconds a mesh. An entry
    holds its meshes (so their ids stay theirs) and is used only for the same mesh objects and group."""
    ck = (tuple((id(m), pl) for m, pl in uniques), id(process_group))
    hit = _key_cache.get(ck)
    if hit is not None and all(a is m for a, (m, _) in zip(hit[0], uniques)) and hit[3] is process_group:
        return hit[1], hit[2]
    plan = _Plan()
    keys = [(_plain_key(plan, process_group) if mesh is None else _dtensor_key(plan, mesh, placements))
            for mesh, placements in uniques]
    if process_group is not None and all(mesh is not None for mesh, _ in uniques):
        _plain_key(plan, process_group)  # no plain tensors here: still join process_group's reduce
    if len(_key_cache) >= 8:
        _key_cache.pop(next(iter(_key_cache)))
    _key_cache[ck] = ([m for m, _ in uniques], plan, keys, process_group)
    return plan, keys


def _op(p: float):
    if p == math.inf:
        return dist.ReduceOp.MAX
    if p == -math.inf:
        return dist.ReduceOp.MIN
    return dist.ReduceOp.SUM


def _identity(p: float, dev) -> torch.Tensor:
    return torch.full((), math.inf if p == -math.inf else 0.0, dtype=torch.float64, device=dev)


def _comm_device(plan, locals_, pgs) -> torch.device:
    dev_type = plan.mesh_device
    if dev_type is None:
        if locals_:
            return locals_[0].device
        dev_type = "cuda" if pgs and dist.get_backend(pgs[0]) == "nccl" else "cpu"
    if dev_type == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(dev_type)


def total_norm(grads, p: float, foreach, backend: str, *, writes: bool, process_group=None, pp_group=None,
               complex_ok: bool = True, from_params: bool = False, keep_set: bool = False):
    """The total p-norm of distributed ``grads`` (DTensors and plain tensors), reduced over every group they need;
    ``from_params``: ``grads`` are parameters, whose defined ``.grad`` are the gradients.

    Returns (total in torch's result dtype on the first gradient's device, total in float32 (float64 for float64
    gradients) for the coefficient, the device groups of local shards as api._groups makes them, the first
    DTensor's mesh). With ``keep_set``, the third may instead be the _C.LocalSet the norm ran on (scale it with
    ``scale``). Every rank of the groups involved must call it with gradients on the same meshes, in the same
    order."""
    from . import api
    pps = _pp_list(pp_group)
    skip_empty = math.isinf(p) or p < 0
    fast = None if skip_empty else _fast_plan(grads, process_group, from_params)
    if fast is not None:
        plan, runs, locals_, device, dtype = fast
        groups = api._one_group(device, locals_, foreach, backend)
        if p > 0 and groups[(device, False)][0] is api._OPS and \
                api._fast(backend) & (api._CPU if device.type == "cpu" else api._CUDA):
            # the compiled kernels over one list held from the norm to the scale (_C.LocalSet)
            local_set = _ops.C.LocalSet(locals_, device, writes)
            vals = local_set.partials(p, runs, len(plan.keys)).to(_comm_device(plan, locals_, plan.groups + pps))
            combined = _reduce_keys(plan, vals, p, pps)
            total, acc = local_set.finish(combined, p, dtype)
            return total, acc, local_set if keep_set else groups, plan.mesh
        return _reduce(plan, locals_, groups, p, pps, runs=runs, backend=backend, dtype=dtype)
    if from_params:
        grads = api._grads(grads)
        if not grads and process_group is None and not pps:  # nothing to reduce or join: torch's zero
            zero = torch.tensor(0.0)
            return zero, zero, {}, None
    plan, kidx, locals_ = _plan(grads, process_group)
    if not writes:  # torch's dtype errors (on the local shards: no DTensor dispatch); _groups checks them to write
        _ops.check_tensors(locals_, 2.0)
    if skip_empty:
        # torch's error for an empty tensor where p has no identity, on the global shapes (a DTensor's numel is
        # global); a plain shard over process_group may be empty on this rank (its tensor is not): not an error
        DTensor = _dtensor_class()
        _ops._check_nonempty([g for g in grads if process_group is None or
                              (DTensor is not None and isinstance(g, DTensor))], p)
    if writes:
        # the errors of an in-place pass, for the whole list before anything is read: they depend on the dtype and
        # layout only, so one tensor of each (dtype, layout) is checked
        _ops.check_writable(list({(t.dtype, t.layout): t for t in locals_}.values()), complex_ok)
    groups = api._groups(locals_, foreach, backend) if locals_ else {}
    if writes and len(groups) > 1:  # overlapping gradients across device groups, before the first op writes
        for _, ts in groups.values():
            _ops.check_overlaps(ts)
    return _reduce(plan, locals_, groups, p, pps, kidx=kidx, backend=backend)


def scale(groups, total: torch.Tensor, max_norm: float, eps: float, backend: str) -> None:
    """Scales the local shards total_norm returned (its device groups, or its _C.LocalSet) by the coefficient of
    ``total``."""
    from . import api
    if isinstance(groups, dict):
        api._scale(groups, total, max_norm, eps, backend)
    else:
        groups.scale(total, max_norm, eps)


def _runs(ks):
    """[(key, count)] of consecutive equal keys."""
    out = []
    for k in ks:
        if out and out[-1][0] == k:
            out[-1][1] += 1
        else:
            out.append([k, 1])
    return out


def _reduce_keys(plan, vals: torch.Tensor, p: float, pps) -> torch.Tensor:
    """One all-reduce per distinct group of ``plan`` over the partials of the keys that contain it (``vals``:
    float64, one un-finalised partial per key, for p != 0; reduced in place), then the keys combined and the result
    reduced over each pipeline group: the combined partial, one value."""
    op = _op(p)
    n = len(plan.keys)
    for gi, pg in enumerate(plan.groups):
        members = [k for k, key in enumerate(plan.keys) if gi in key]
        if len(members) == n:
            dist.all_reduce(vals, op=op, group=pg)
        else:
            buf = torch.cat([vals[k:k + 1] for k in members])
            dist.all_reduce(buf, op=op, group=pg)
            for i, k in enumerate(members):
                vals[k] = buf[i]
    if n == 1:
        combined = vals
    elif n == 0:
        combined = (_identity(p, vals.device) if p == -math.inf else vals.new_zeros(())).reshape(1)
    else:
        combined = (vals.amax(0, keepdim=True) if p == math.inf else vals.amin(0, keepdim=True)
                    if p == -math.inf else vals.sum(0, keepdim=True))
    for pg in pps:
        if len(_ranks(pg, "pp_group")) > 1:
            dist.all_reduce(combined, op=op, group=pg)
    return combined


def _reduce(plan, locals_, groups, p, pps, kidx=None, runs=None, backend="auto", dtype=None):
    """The rest of total_norm: one norm launch per device group of local shards (per-tensor norms), each key's
    un-finalised partial, one all-reduce per distinct group, the keys and pipeline stages combined. ``runs``: the
    (key, count) runs of the shards as ``groups`` holds them (one group); else ``kidx``, each shard's key. ``dtype``:
    torch's dtype of the total, when the caller has it."""
    from . import api
    skip_empty = math.isinf(p) or p < 0
    dev = _comm_device(plan, locals_, plan.groups + pps)
    single = len(plan.keys) == 1
    key_of = {} if single or runs is not None else {id(t): k for t, k in zip(locals_, kidx)}
    # One norm launch per device over that device's shards, ordered by key: each key's shards are one run.
    contributions: list = [[] for _ in plan.keys]
    for impl, ts in groups.values():
        if not single and runs is None:
            ts = sorted(ts, key=lambda t: key_of[id(t)])  # stable: list order within a key
        xs = [t for t in ts if t.numel()] if skip_empty else ts
        if not xs:
            continue
        each = api.each_partial(impl, xs, p, backend).to(dev)
        if runs is not None:
            segments = runs
        else:
            segments = [(0, len(xs))] if single else _runs([key_of[id(x)] for x in xs])
        start = 0
        for k, count in segments:
            seg = each[start:start + count]
            start += count
            if p == 0:
                c = seg
            elif p == math.inf:
                c = seg.max()
            elif p == -math.inf:
                c = seg.min()
            else:
                c = seg.sum()
            contributions[k].append(c)
    if p != 0:
        partials = [_identity(p, dev) if not cs else cs[0] if len(cs) == 1 else
                    (torch.stack(cs).max() if p == math.inf else torch.stack(cs).min() if p == -math.inf
                     else torch.stack(cs).sum()) for cs in contributions]
        vals = torch.stack(partials) if partials else torch.zeros(0, dtype=torch.float64, device=dev)
        combined = _reduce_keys(plan, vals, p, pps).reshape(())
    else:
        # p = 0: each key's partial is the vector of its tensors' nonzero counts (torch counts the tensors that hold
        # a nonzero element), reduced elementwise, then counted
        partials = [torch.cat(cs) if len(cs) > 1 else cs[0] if cs else torch.zeros(0, dtype=torch.float64,
                                                                                     device=dev)
                    for cs in contributions]
        for gi, pg in enumerate(plan.groups):
            members = [k for k, key in enumerate(plan.keys) if gi in key]
            flat = [partials[k] for k in members]
            buf = torch.cat(flat) if len(flat) > 1 else flat[0].clone()
            dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=pg)
            start = 0
            for k in members:
                n = partials[k].numel()
                partials[k] = buf[start:start + n]
                start += n
        combined = (torch.stack([(v != 0).sum().to(torch.float64) for v in partials]).sum() if partials
                    else torch.zeros((), dtype=torch.float64, device=dev))
        if pps:
            combined = combined.clone()
            for pg in pps:
                if len(_ranks(pg, "pp_group")) > 1:
                    dist.all_reduce(combined, op=dist.ReduceOp.SUM, group=pg)
    if p == 0 or math.isinf(p) or p == 1.0:
        total64 = combined
    elif p == 2.0:
        total64 = combined.sqrt()
    else:
        total64 = combined.pow(1.0 / p)
    if dtype is None:
        dtype = _ops.result_dtype(locals_) if locals_ else torch.float32
    out_dev = locals_[0].device if locals_ else dev
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    return total64.to(device=out_dev, dtype=dtype), total64.to(device=out_dev, dtype=acc), groups, plan.mesh


def wrap(total: torch.Tensor, mesh) -> torch.Tensor:
    """The total as torch returns it for DTensor gradients: a DTensor replicated on ``mesh`` (already reduced: no
    collective to read it); ``total`` itself without a mesh."""
    if mesh is None:
        return total
    from torch.distributed.tensor import DTensor, Replicate
    spec = _replicated_spec(mesh, total.dtype)
    if spec is not None and not total.requires_grad:
        try:  # DTensor's own constructor with a cached spec: from_local costs an autograd Function call per step
            return DTensor(total, spec, requires_grad=False)
        except TypeError:  # a torch whose constructor differs
            _specs[(id(mesh), total.dtype)] = None
    return DTensor.from_local(total, mesh, [Replicate()] * mesh.ndim, run_check=False)


_specs: dict = {}  # (id(mesh), dtype) -> the spec of a replicated 0-d total on that mesh (None: not available)


def _replicated_spec(mesh, dtype):
    key = (id(mesh), dtype)
    spec = _specs.get(key, False)
    if spec is False or (spec is not None and spec.mesh is not mesh):  # new, or a recycled id
        try:
            from torch.distributed.tensor import Replicate
            from torch.distributed.tensor._dtensor_spec import DTensorSpec, TensorMeta
            spec = DTensorSpec(mesh, (Replicate(),) * mesh.ndim,
                               tensor_meta=TensorMeta(torch.Size([]), (), dtype))
        except (ImportError, TypeError):
            spec = None
        _specs[key] = spec
    return spec
