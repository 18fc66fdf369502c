"""The ops in Triton: multi-tensor norm (one launch), scale (one launch, no writes when the coefficient is 1),
clip (norm + scale: two launches) and clip-by-value, registered with torch.library.triton_op so torch.compile traces
into their kernels (wrap_triton). Same semantics as the ops of gradclip_cuda/_ops.py; selected with
backend="triton".

The chunk table (kernels.py) is a device tensor built once per set of tensors and cached per device, for the last
CACHE_SIZE sets (least recently used first out). Its key (addresses, sizes, dtypes, device) is computed in C++ when
the compiled library is present (``_C.tensor_key``, which also runs the plan's argument checks), else in Python. A
call whose tensors have a table copies nothing to the device; a new table is copied from pinned memory without
blocking the host. The table also records, once, which tensors an in-place pass skips (``_ops.write_skips``: one
contained in another, the same gradient twice, ``base[:50]`` beside ``base``) and whether tensors overlap partly, on
which the in-place ops raise before writing (the norm does not).

Decisions:
- CUDA graphs: a table used under capture is pinned in the cache for the life of the process (the captured launches
  hold its address); building one under capture is refused (it needs a host-to-device copy), as are gradients with
  gaps in their memory (their contiguous copies would be new tensors with new addresses): call once eagerly with the
  same gradients before capturing, as torch asks of every captured workload.
- Each call has scratch memory of its own (torch's allocator), ticket counter included, zeroed by a torch op (so a
  captured one under capture); a table read on a stream other than the default one is recorded on it, and a stream
  other than the one that copied it waits for the copy (an event).
- Eager calls with no autograd to record and no dispatch mode run the op's body directly (``_direct``); the
  registered op (``.op``) is what torch.compile and dispatch modes (fake, functional, proxy) see. For 5,000 tensors
  the dispatcher's conversions of the list and its custom-op checks cost about 4x the body's host time. What remains
  per call on a cached table: the key (C++), a contiguity check, the version bumps of written tensors, and O(1).
- Every op runs under a device guard of its tensors' device (Triton launches on the current device).
- Dense tensors (transposed, channels-last) are processed in place (the kernels are elementwise, in memory order);
  tensors with gaps go through contiguous copies written back afterwards.
- Pointers passed to the kernels are 16-byte aligned whatever the numbers of chunks and tensors (padded offsets in
  the table and the scratch memory), so alignment never adds a compiled variant; ALIGNED (every tensor's start
  16-byte aligned) is a compile-time flag: at most two variants per kernel and norm kind.

Under torch.compile the ops are opaque (see _op): torch.compile calls them, it does not trace into their kernels.

Runs on CUDA tensors, and on CPU tensors under TRITON_INTERPRET=1 (slow, exact: how CI tests it).
"""
from __future__ import annotations

import collections
import contextlib
import functools
import inspect
import math
import struct

import torch
import torch.utils._python_dispatch
import triton
from torch._subclasses.functional_tensor import FunctionalTensorMode
from torch.library import triton_op, wrap_triton

from .. import _ops
from . import kernels as K

CHUNK = 65536   # elements per program, as the CUDA kernels' chunk
BLOCK = 2048    # elements per tile of a program
RBLOCK = 1024   # partials per tile of the finishing program
TBLOCK, CBLOCK = 128, 16  # tensors x chunk partials per tile of the finishing program's per-tensor reduction
CACHE_SIZE = 8  # chunk tables kept per device (besides those pinned by a CUDA graph capture)
SKIP = 4        # bit of a row's code: skip writes
_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}

CAPTURE_ERROR = ("gradclip_cuda: the Triton backend cannot {} while a CUDA graph is being captured; call it once "
                 "eagerly with the same (contiguous or dense) gradients before capturing")


def _bits(v: float) -> int:
    return struct.unpack("q", struct.pack("d", float(v)))[0]


def _kind(p: float) -> int:
    if p == 2:
        return K.L2
    if p == 1:
        return K.L1
    if math.isinf(p):
        return K.INF if p > 0 else K.NEG_INF
    return K.L0 if p == 0 else K.GENERAL


def _even(n: int) -> int:
    """n rounded up to a multiple of 2 (8-byte elements: 16 bytes)."""
    return n + (n & 1)


class _Entry:
    """A cached chunk table: int64 [3 * n_chunks rows | pad | n + 1 first-chunk indices] on the device, and what
    derives from the tensors: result dtype, whether every chunk address is 16-byte aligned, whether some tensors
    overlap partly (in-place ops refuse them), and whether a CUDA graph capture uses it (then it is never evicted)."""
    __slots__ = ("table", "rows", "first", "n_chunks", "n_tensors", "result_dtype", "aligned", "overlap", "pinned",
                 "copied_on", "copied")

    def __init__(self, xs, device):
        n = len(xs)
        ptrs = torch.tensor([x.data_ptr() for x in xs], dtype=torch.int64)
        numel = torch.tensor([x.numel() for x in xs], dtype=torch.int64)
        dtype = torch.tensor([_CODES[x.dtype] for x in xs], dtype=torch.int64)
        size = torch.tensor([x.element_size() for x in xs], dtype=torch.int64)
        try:
            skip = torch.tensor(_ops.write_skips(xs), dtype=torch.bool)
            self.overlap = False
        except RuntimeError:
            skip, self.overlap = torch.zeros(n, dtype=torch.bool), True
        chunks = (numel + CHUNK - 1) // CHUNK
        first = torch.zeros(n + 1, dtype=torch.int64)
        first[1:] = torch.cumsum(chunks, 0)
        self.n_chunks, self.n_tensors = int(first[-1]), n
        tensor = torch.repeat_interleave(torch.arange(n), chunks)
        begin = (torch.arange(self.n_chunks) - first[:-1][tensor]) * CHUNK
        rows = torch.stack([ptrs[tensor] + begin * size[tensor], torch.clamp(numel[tensor] - begin, max=CHUNK),
                            dtype[tensor] | (skip[tensor].to(torch.int64) * SKIP) | (tensor << 8)], 1)
        pad = torch.zeros(_even(3 * self.n_chunks) - 3 * self.n_chunks, dtype=torch.int64)
        host = torch.cat([rows.reshape(-1), pad, first])
        self.copied_on = self.copied = None
        if device.type == "cuda":  # pinned, so the copy does not block the host (torch keeps it alive until done)
            self.table = host.pin_memory().to(device, non_blocking=True)
            self.copied_on = torch.cuda.current_stream(device)
            self.copied = torch.cuda.Event()
            self.copied.record(self.copied_on)
        else:
            self.table = host.to(device)
        self.rows = self.table
        self.first = self.table[_even(3 * self.n_chunks):]
        self.result_dtype = _ops.result_dtype(xs)
        self.aligned = bool((ptrs[numel > 0] % 16 == 0).all())
        self.pinned = False


_tables: dict = {}  # device -> OrderedDict(key -> _Entry), least recently used first


class _Key(bytes):
    """_C.tensor_key's bytes. Their first 8 bytes are a hash of the rest: a cache lookup hashes those instead of the
    whole key (17 bytes a tensor: tens of microseconds for thousands of tensors); equal keys compare as bytes."""
    __slots__ = ()

    def __hash__(self):
        return int.from_bytes(self[:8], "little", signed=True)


def _key(xs, p):
    if _ops.C is not None:
        return _Key(_ops.C.tensor_key(xs, p is not None, 2.0 if p is None else p))
    if p is not None:
        _ops.check_tensors(xs, p)
    return tuple((x.data_ptr(), x.numel(), x.dtype) for x in xs) + (xs[0].device,)


def _capturing(device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _guard(device):
    """The device guard of an op: Triton launches on the current device."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _prepare(xs, p=None, capturing=False):
    """(tensors the kernels take, pairs (original, copy) to write back, their key). With the compiled library the key
    (one C++ pass, which runs the argument checks too) says whether every tensor is dense: then nothing else looks at
    the tensors one by one in Python; otherwise _dense sorts them out and the key is that of the dense list."""
    if _ops.C is not None:
        key = _key(xs, p)
        if key[-1]:  # every tensor dense (the last byte of _C.tensor_key)
            return xs, [], key
    dense, back = _dense(xs, capturing)
    return dense, back, _key(dense, p)


def _entry(xs, p=None, writes=False, capturing=False, key=None) -> _Entry:
    """The chunk table of xs, cached: built and copied to the device only when no table of these tensors is cached.
    Runs the argument checks of a norm of order p first; for an in-place pass (``writes``) refuses partly overlapping
    tensors before anything is written."""
    device = xs[0].device
    key = _key(xs, p) if key is None else key
    cache = _tables.setdefault(device, collections.OrderedDict())
    entry = cache.get(key)
    if entry is not None:
        cache.move_to_end(key)
    else:
        if capturing:
            raise RuntimeError(CAPTURE_ERROR.format("build the chunk table of a new set of gradients"))
        for x in xs:
            if x.dtype not in _CODES:
                raise RuntimeError(f"gradclip_cuda: gradients of dtype {x.dtype} are not supported by the Triton "
                                   "kernels (float32, float16, bfloat16 and float64 are); use backend=\"torch\"")
        entry = cache[key] = _Entry(xs, device)
        unpinned = [k for k, e in cache.items() if not e.pinned]
        for k in unpinned[:max(0, len(unpinned) - CACHE_SIZE)]:
            del cache[k]
    if writes and entry.overlap:
        raise RuntimeError(_ops.OVERLAP_ERROR)
    if capturing:
        entry.pinned = True  # the graph's launches read this table on every replay
    elif device.type == "cuda":
        stream = torch.cuda.current_stream(device)
        if stream != entry.copied_on:  # read on another stream than the one that copied it: after the copy
            stream.wait_event(entry.copied)
        if stream != torch.cuda.default_stream(device):
            entry.table.record_stream(stream)
    return entry


def _grid(n):
    return (max(1, n),)


def _scratch(t: _Entry, device):
    """Per-call float64 scratch: [partials | tensor partials | total | ticket counter], every part 16-byte aligned;
    the counter (an int64 view) zeroed."""
    c, n = _even(t.n_chunks), _even(t.n_tensors)
    scratch = torch.empty(c + n + 4, dtype=torch.float64, device=device)
    counter = scratch.view(torch.int64)[c + n + 2:c + n + 3]
    counter.zero_()
    return scratch[:c], scratch[c:c + n], scratch[c + n:c + n + 1], counter


def _norm(xs, p, per_tensor, writes=False, capturing=False, key=None):
    t = _entry(xs, p, writes, capturing, key)
    kind = _kind(p)
    device = xs[0].device
    partials, tensor_partials, acc, counter = _scratch(t, device)
    total = torch.empty((), dtype=t.result_dtype, device=device)
    each = torch.empty(t.n_tensors if per_tensor else 0, dtype=t.result_dtype, device=device)
    wrap_triton(K.norm_kernel)[_grid(t.n_chunks)](
        t.rows, t.first, t.n_chunks, t.n_tensors, partials, tensor_partials, acc, total,
        each if per_tensor else partials, counter, _bits(p), KIND=kind, TENSOR_VALUES=per_tensor or kind == K.L0,
        PER_TENSOR=per_tensor, ALIGNED=t.aligned, BLOCK=BLOCK, RBLOCK=RBLOCK, TBLOCK=TBLOCK, CBLOCK=CBLOCK)
    return t, total, each, acc


def _scale(t: _Entry, total, f64: bool, max_norm: float, eps: float = 1e-6, per_tensor: bool = False,
           direct: bool = False):
    if t.n_chunks:
        wrap_triton(K.scale_kernel)[_grid(t.n_chunks)](t.rows, total, _bits(max_norm), _bits(eps), F64=f64,
                                                       PER_TENSOR=per_tensor, DIRECT=direct, ALIGNED=t.aligned,
                                                       BLOCK=BLOCK)


_is_contiguous = torch.Tensor.is_contiguous


def _dense(xs, capturing=False):
    """(tensors the kernels can take, pairs (original, copy) to write back). The chunk table addresses elements in
    memory order, which elementwise kernels may: dense tensors (any order of dimensions) are taken as they are,
    tensors with gaps go through a contiguous copy (refused under CUDA graph capture)."""
    if all(map(_is_contiguous, xs)):  # the one per-tensor Python loop of a cached call (map: ~30% faster)
        return xs, []
    out, back = [], []
    for x in xs:
        if _ops._dense(x):
            out.append(x)
        else:
            if capturing:
                raise RuntimeError(CAPTURE_ERROR.format("take gradients with gaps in their memory (they go through "
                                                        "contiguous copies, new tensors at every call)"))
            c = x.contiguous()
            out.append(c)
            back.append((x, c))
    return out, back


def _write_back(back):
    for original, copy in back:
        original.copy_(copy)


_SCHEMA_OK = "schema" in inspect.signature(triton_op).parameters  # torch >= 2.7


def _keep_opaque(mode, op, types, args, kwargs):
    return mode.__torch_dispatch__(op, types, args, kwargs)


_in_dispatch_mode = getattr(torch.utils._python_dispatch, "is_in_torch_dispatch_mode", None)
_any_requires_grad = getattr(torch._C, "_any_requires_grad", None)
_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _direct(xs) -> bool:
    """Whether a call may run the op's body itself, without the dispatcher: eager, no dispatch mode (fake, proxy,
    functional or a user's), plain tensors, no autograd to record. The dispatcher's conversions of a list of tensors
    and custom-op checks cost about 4x the body's host time for thousands of tensors (README, "Triton details")."""
    return (not torch.compiler.is_compiling() and _in_dispatch_mode is not None and not _in_dispatch_mode()
            and len(xs) > 0 and type(xs[0]) in _PLAIN
            and not (torch.is_grad_enabled() and (_any_requires_grad is None or _any_requires_grad(xs))))


def _bump_versions(xs):
    """Tells autograd the tensors changed, as the dispatcher does after a mutating custom op."""
    if _ops.C is not None and isinstance(xs, (list, tuple)):
        _ops.C.bump_versions(xs)  # borrowed references: a third of torch's own list call for thousands of tensors
        return
    try:
        torch._C._increment_version(xs)  # a list in one call (torch >= 2.7)
    except TypeError:
        for x in xs:
            torch.autograd.graph.increment_version(x)


def _op(name: str, fake, mutates=()):
    """Registers fn as the triton op gradclip_cuda::triton_<name>, with the schema of op <name> (_ops.SCHEMAS), and
    returns a function that calls fn directly where _direct allows (versions of mutated tensors bumped as the
    dispatcher would), else the op (its `.op`).

    Decision: under torch.compile these ops stay opaque (fake: the op's shape-only fake kernel; no functional
    decomposition). Their kernels read and write the gradients through the chunk table's pointers, which
    functionalization cannot see: traced into, the scale kernel's writes to the gradients vanish from the graph
    (seen on a traced clip: only the norm kernel remained) and nothing orders the reads after other writes."""
    def register(fn):
        kwargs = {"schema": _ops.SCHEMAS[name]} if _SCHEMA_OK else {}
        op = triton_op(f"{_ops.NAMESPACE}::triton_{name}", fn, mutates_args=mutates, **kwargs)
        op.register_fake(fake)
        op.register_torch_dispatch(FunctionalTensorMode, _keep_opaque)

        @functools.wraps(fn)
        def call(*args, **kwargs):
            xs = args[0] if args else next(iter(kwargs.values()))
            if not _direct(xs):
                return call.op(*args, **kwargs)
            out = fn(*args, **kwargs)
            if mutates:
                _bump_versions(xs)
            return out
        call.op = op
        return call
    return register


@_op("multi_tensor_norm", _ops.FAKES["multi_tensor_norm"])
def multi_tensor_norm(xs: list[torch.Tensor], p: float, per_tensor: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    device = xs[0].device
    with _guard(device):
        capturing = _capturing(device)
        dense, _, key = _prepare(xs, p, capturing)
        _, total, each, _ = _norm(dense, p, per_tensor, capturing=capturing, key=key)
    return total, each


def _scale_by(xs, values: torch.Tensor, what: str, max_norm: float, eps: float, direct: bool) -> None:
    """The body of multi_tensor_scale_ (values: totals) and multi_tensor_mul_ (direct: coefficients): one value, or
    one per tensor, on the device in a dtype the kernels read; one scale launch."""
    _ops.check_coefficients(xs, values, what)
    device = xs[0].device
    with _guard(device):
        v = values.to(device).reshape(-1)
        v = v if v.dtype in _CODES else v.double()
        capturing = _capturing(device)
        dense, back, key = _prepare(xs, None, capturing)
        t = _entry(dense, writes=True, capturing=capturing, key=key)
        _scale(t, v, v.dtype == torch.float64 and not direct, max_norm, eps, per_tensor=v.numel() > 1,
               direct=direct)
        _write_back(back)


@_op("multi_tensor_scale_", _ops.FAKES["multi_tensor_scale_"], mutates=("xs",))
def multi_tensor_scale_(xs: list[torch.Tensor], total: torch.Tensor, max_norm: float, eps: float = 1e-6) -> None:
    _scale_by(xs, total, "total_norm", max_norm, eps, direct=False)


@_op("multi_tensor_mul_", _ops.FAKES["multi_tensor_mul_"], mutates=("xs",))
def multi_tensor_mul_(xs: list[torch.Tensor], coef: torch.Tensor) -> None:
    _scale_by(xs, coef, "coef", 1.0, 1e-6, direct=True)


@_op("clip_grad_norm_", _ops.FAKES["clip_grad_norm_"], mutates=("xs",))
def clip_grad_norm_(xs: list[torch.Tensor], max_norm: float, p: float, eps: float = 1e-6) -> torch.Tensor:
    device = xs[0].device
    with _guard(device):
        capturing = _capturing(device)
        dense, back, key = _prepare(xs, p, capturing)
        t, total, _, acc = _norm(dense, p, False, writes=True, capturing=capturing, key=key)
        _scale(t, acc, t.result_dtype == torch.float64, max_norm, eps)
        _write_back(back)
    return total


_agc_tables: collections.OrderedDict = collections.OrderedDict()  # key -> [tensors, unit_tensor, n_units, pinned]


def _agc_table(grads, params, unit_axis: int, device):
    """AGC's table (kernels.agc_kernel), cached for the last CACHE_SIZE sets like the chunk tables, with their rules:
    a table used under CUDA graph capture is pinned for the life of the process (the graph's launches read it);
    one read on a stream other than the default one is recorded on it."""
    key = (tuple((g.data_ptr(), w.data_ptr(), tuple(g.shape), g.dtype, w.dtype) for g, w in zip(grads, params)),
           unit_axis, device)
    capturing = _capturing(device)
    entry = _agc_tables.get(key)
    if entry is not None:
        _agc_tables.move_to_end(key)
    else:
        if capturing:
            raise RuntimeError(CAPTURE_ERROR.format("build the AGC table of a new set of gradients"))
        rows, counts, base = [], [], 0
        for g, w in zip(grads, params):
            outer, units, inner = _ops.unit_shape(tuple(g.shape), unit_axis)
            rows.append([g.data_ptr(), w.data_ptr(), outer, units, inner, _CODES[g.dtype] | (_CODES[w.dtype] << 2),
                         base, g.element_size() | (w.element_size() << 8)])
            counts.append(units)
            base += units
        tensors = torch.tensor(rows, dtype=torch.int64).reshape(-1)
        unit_tensor = torch.repeat_interleave(torch.arange(len(rows)), torch.tensor(counts))
        if device.type == "cuda":  # pinned: the copy does not block the host; on the current stream, as the launch
            tensors, unit_tensor = (t.pin_memory().to(device, non_blocking=True) for t in (tensors, unit_tensor))
        else:
            tensors, unit_tensor = tensors.to(device), unit_tensor.to(device)
        entry = _agc_tables[key] = [tensors, unit_tensor, base, False]
        unpinned = [k for k, e in _agc_tables.items() if not e[3]]
        for k in unpinned[:max(0, len(unpinned) - CACHE_SIZE)]:
            del _agc_tables[k]
    if capturing:
        entry[3] = True
    elif device.type == "cuda" and torch.cuda.current_stream(device) != torch.cuda.default_stream(device):
        for t in entry[:2]:
            t.record_stream(torch.cuda.current_stream(device))
    return entry[0], entry[1], entry[2]


@_op("adaptive_clip_grad_", _ops.FAKES["adaptive_clip_grad_"], mutates=("grads",))
def adaptive_clip_grad_(grads: list[torch.Tensor], params: list[torch.Tensor], clip_factor: float, eps: float, p: float,
                        unit_axis: int = 0) -> None:
    _ops.check_agc(grads, params, unit_axis)
    device = grads[0].device
    with _guard(device):
        pairs = [(g, w) for g, w in zip(grads, params) if g.numel() > 0]
        if not pairs:
            return
        gs = [g if g.is_contiguous() else g.contiguous() for g, _ in pairs]
        ws = [w.detach() if w.is_contiguous() else w.detach().contiguous() for _, w in pairs]
        tensors, unit_tensor, n_units = _agc_table(gs, ws, unit_axis, device)
        wrap_triton(K.agc_kernel)[_grid(n_units)](tensors, unit_tensor, n_units, _bits(p), _bits(clip_factor),
                                                  _bits(eps), KIND=_kind(p), BLOCK=BLOCK)
        for (g, _), c in zip(pairs, gs):
            if c is not g:
                g.copy_(c)


@_op("clip_grad_value_", _ops.FAKES["clip_grad_value_"], mutates=("xs",))
def clip_grad_value_(xs: list[torch.Tensor], clip_value: float) -> None:
    device = xs[0].device
    with _guard(device):
        capturing = _capturing(device)
        dense, back, key = _prepare(xs, None, capturing)
        t = _entry(dense, writes=True, capturing=capturing, key=key)
        if t.n_chunks:
            wrap_triton(K.clamp_kernel)[_grid(t.n_chunks)](t.rows, _bits(clip_value), ALIGNED=t.aligned, BLOCK=BLOCK)
        _write_back(back)
