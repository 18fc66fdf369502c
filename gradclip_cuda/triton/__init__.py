"""The ops in Triton: multi-tensor norm (one launch), scale (one launch, no writes when the coefficient is 1),
clip (norm + scale: two launches) and clip-by-value, registered with torch.library.triton_op so torch.compile traces
into their kernels (wrap_triton). Same semantics as the ops of gradclip_cuda/_ops.py; selected with
backend="triton".

The chunk table (kernels.py) is a device tensor built once per set of tensors and cached per device: an eager call
whose tensors (addresses, sizes, dtypes) are those of the last call on that device copies nothing to the device, so
CUDA graphs can capture it (after one warm-up call, as torch asks of every captured workload). Its key is computed
in C++ when the compiled library is present (``_C.tensor_key``, which also runs the plan's argument checks), else in
Python. Tensors that are not contiguous are processed through contiguous copies written back afterwards.

Under torch.compile the ops are opaque (see _op): torch.compile calls them, it does not trace into their kernels.

Runs on CUDA tensors, and on CPU tensors under TRITON_INTERPRET=1 (slow, exact: how CI tests it).
"""
from __future__ import annotations

import inspect
import math
import struct

import torch
import triton
from torch._subclasses.functional_tensor import FunctionalTensorMode
from torch.library import triton_op, wrap_triton

from .. import _ops
from . import kernels as K

CHUNK = 65536   # elements per program, as the CUDA kernels' chunk
BLOCK = 2048    # elements per tile of a program
RBLOCK = 1024   # partials per tile of the finishing program
_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}


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


def _build_table(xs) -> torch.Tensor:
    """The chunk table of xs on their device: int64 [3 * n_chunks rows | n + 1 first-chunk indices | counter]."""
    n = len(xs)
    ptrs = torch.tensor([x.data_ptr() for x in xs], dtype=torch.int64)
    numel = torch.tensor([x.numel() for x in xs], dtype=torch.int64)
    dtype = torch.tensor([_CODES[x.dtype] for x in xs], dtype=torch.int64)
    size = torch.tensor([x.element_size() for x in xs], dtype=torch.int64)
    # a gradient listed again (same start) is written once: every repeat after the first gets the skip bit
    order = torch.argsort(ptrs, stable=True)
    repeat = torch.zeros(n, dtype=torch.bool)
    repeat[order[1:]] = (ptrs[order[1:]] == ptrs[order[:-1]]) & (numel[order[1:]] > 0)
    chunks = (numel + CHUNK - 1) // CHUNK
    first = torch.zeros(n + 1, dtype=torch.int64)
    first[1:] = torch.cumsum(chunks, 0)
    tensor = torch.repeat_interleave(torch.arange(n), chunks)
    begin = (torch.arange(int(first[-1])) - first[:-1][tensor]) * CHUNK
    rows = torch.stack([ptrs[tensor] + begin * size[tensor], torch.clamp(numel[tensor] - begin, max=CHUNK),
                        dtype[tensor] | (repeat[tensor].to(torch.int64) << 2)], 1)
    return torch.cat([rows.reshape(-1), first, torch.zeros(1, dtype=torch.int64)]).to(xs[0].device)


_tables: dict = {}  # device -> (key, table, result dtype)


def _key(xs, p):
    if _ops.C is not None:
        return _ops.C.tensor_key(xs, p is not None, 2.0 if p is None else p)
    if p is not None:
        _ops.check_tensors(xs, p)
    return tuple((x.data_ptr(), x.numel(), x.dtype, x.device) for x in xs)


def _chunk_table(xs, p=None):
    """(table, result dtype) of xs, cached: built and copied to the device only when the tensors are not those of
    the last call on this device. Runs the argument checks of a norm of order p first."""
    key = _key(xs, p)
    cached = _tables.get(xs[0].device)
    if cached is not None and cached[0] == key:
        return cached[1:]
    for x in xs:
        if x.dtype not in _CODES:
            raise RuntimeError(f"gradclip_cuda: gradients of dtype {x.dtype} are not supported by the Triton kernels "
                               "(float32, float16, bfloat16 and float64 are); use backend=\"torch\"")
    table = _build_table(xs), _ops.result_dtype(xs)
    _tables[xs[0].device] = (key, *table)
    return table


class _Table:
    """Views of a chunk table, and what derives from the tensors' sizes and dtypes."""

    def __init__(self, xs, p=None):
        self.n_tensors = len(xs)
        table, self.result_dtype = _chunk_table(xs, p)
        self.n_chunks = (table.numel() - self.n_tensors - 2) // 3
        self.rows = table
        self.first = table[3 * self.n_chunks:]
        self.counter = table[-1:]
        self.any_f64 = self.result_dtype == torch.float64


def _grid(n):
    return (max(1, n),)


def _norm(xs, p, per_tensor):
    t = _Table(xs, p)
    kind = _kind(p)
    device = xs[0].device
    scratch = torch.empty(t.n_chunks + t.n_tensors + 1, dtype=torch.float64, device=device)
    total = torch.empty((), dtype=t.result_dtype, device=device)
    each = torch.empty(t.n_tensors if per_tensor else 0, dtype=t.result_dtype, device=device)
    wrap_triton(K.norm_kernel)[_grid(t.n_chunks)](
        t.rows, t.first, t.n_chunks, t.n_tensors, scratch, scratch[t.n_chunks:], scratch[-1:], total,
        each if per_tensor else scratch, t.counter, _bits(p), KIND=kind, TENSOR_VALUES=per_tensor or kind == K.L0,
        PER_TENSOR=per_tensor, BLOCK=BLOCK, RBLOCK=RBLOCK)
    return t, total, each, scratch[-1:]


def _scale(t: _Table, total, f64: bool, max_norm: float):
    if t.n_chunks:
        wrap_triton(K.scale_kernel)[_grid(t.n_chunks)](t.rows, total, _bits(max_norm), F64=f64, BLOCK=BLOCK)


def _dense(xs):
    """(tensors the kernels can take, pairs (original, copy) to write back). The chunk table addresses elements in
    memory order, so non-contiguous tensors (transposed ones included) go through a contiguous copy."""
    if all(x.is_contiguous() for x in xs):
        return xs, []
    out, back = [], []
    for x in xs:
        if x.is_contiguous():
            out.append(x)
        else:
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


def _op(name: str, fake, mutates=()):
    """Registers fn as the triton op gradclip_cuda::triton_<name>, with the schema of op <name> (_ops.SCHEMAS).

    Decision: under torch.compile these ops stay opaque (fake: the op's shape-only fake kernel; no functional
    decomposition). Their kernels read and write the gradients through the chunk table's pointers, which
    functionalization cannot see: traced into, the scale kernel's writes to the gradients vanish from the graph
    (seen on a traced clip: only the norm kernel remained) and nothing orders the reads after other writes."""
    def register(fn):
        kwargs = {"schema": _ops.SCHEMAS[name]} if _SCHEMA_OK else {}
        op = triton_op(f"{_ops.NAMESPACE}::triton_{name}", fn, mutates_args=mutates, **kwargs)
        op.register_fake(fake)
        op.register_torch_dispatch(FunctionalTensorMode, _keep_opaque)
        return op
    return register


@_op("multi_tensor_norm", _ops.FAKES["multi_tensor_norm"])
def multi_tensor_norm(xs: list[torch.Tensor], p: float, per_tensor: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    dense, _ = _dense(xs)
    _, total, each, _ = _norm(dense, p, per_tensor)
    return total, each


@_op("multi_tensor_scale_", _ops.FAKES["multi_tensor_scale_"], mutates=("xs",))
def multi_tensor_scale_(xs: list[torch.Tensor], total: torch.Tensor, max_norm: float) -> None:
    if total.numel() != 1:
        raise RuntimeError(f"gradclip_cuda: total_norm must hold one value, got {total.numel()}")
    dense, back = _dense(xs)
    t = _Table(dense)
    total = total.to(xs[0].device)
    if total.dtype not in _CODES:
        total = total.double()
    _scale(t, total, total.dtype == torch.float64, max_norm)
    _write_back(back)


@_op("clip_grad_norm_", _ops.FAKES["clip_grad_norm_"], mutates=("xs",))
def clip_grad_norm_(xs: list[torch.Tensor], max_norm: float, p: float) -> torch.Tensor:
    dense, back = _dense(xs)
    t, total, _, acc = _norm(dense, p, False)
    _scale(t, acc, t.any_f64, max_norm)
    _write_back(back)
    return total


@_op("clip_grad_value_", _ops.FAKES["clip_grad_value_"], mutates=("xs",))
def clip_grad_value_(xs: list[torch.Tensor], clip_value: float) -> None:
    dense, back = _dense(xs)
    t = _Table(dense)
    if t.n_chunks:
        wrap_triton(K.clamp_kernel)[_grid(t.n_chunks)](t.rows, _bits(clip_value), BLOCK=BLOCK)
    _write_back(back)
