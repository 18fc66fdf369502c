"""The Triton kernels: per-chunk norm partials with a last-program finish (one launch), scale, clamp.

They walk a chunk table (gradclip_cuda/triton/__init__.py): one int64 row of three per chunk, holding the chunk's
first element's address, its size, and a code (bits 0-1: dtype, 0 fp32 / 1 fp16 / 2 bf16 / 3 fp64; bit 2: skip
writes, a repeat of an earlier gradient). One program handles one chunk. The per-element arithmetic follows
csrc/common/arith.h: fp32 accumulation (fp64 for fp64), NaN propagating through the max/min norms, and torch's
coefficient clamp(max_norm / (total + 1e-6), max=1) with an IEEE division.

Float arguments that need float64 precision (p, max_norm, clip_value) travel as their 64-bit patterns: Triton
passes Python floats as float32.
"""
import triton
import triton.language as tl

L2, L1, INF, NEG_INF, L0, GENERAL = 0, 1, 2, 3, 4, 5


@triton.jit
def _f64(bits):
    """The float64 whose bit pattern is `bits` (Triton passes an int that fits 32 bits as int32)."""
    return bits.to(tl.int64).to(tl.float64, bitcast=True)


@triton.jit
def _identity(KIND: tl.constexpr):
    if KIND == 3:
        return float("inf")
    else:
        return 0.0


@triton.jit
def _contrib(x, mask, p, KIND: tl.constexpr):
    ax = tl.abs(x)
    if KIND == 0:
        c = x * x
    elif KIND == 1:
        c = ax
    elif KIND == 4:
        c = (x != 0).to(x.dtype)
    elif KIND == 5:
        c = tl.exp2(p * tl.log2(ax))
    else:
        c = ax
    return tl.where(mask, c, _identity(KIND))


@triton.jit
def _combine(a, b, KIND: tl.constexpr):
    if KIND == 2:
        r = tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)
    elif KIND == 3:
        r = tl.minimum(a, b, propagate_nan=tl.PropagateNan.ALL)
    else:
        r = a + b
    return r


@triton.jit
def _reduce(v, KIND: tl.constexpr):
    if KIND == 2:
        r = tl.where(tl.max((v != v).to(tl.int32), 0) > 0, float("nan"), tl.max(v, 0))
    elif KIND == 3:
        r = tl.where(tl.max((v != v).to(tl.int32), 0) > 0, float("nan"), tl.min(v, 0))
    else:
        r = tl.sum(v, 0)
    return r


@triton.jit
def _finalize(acc, p, KIND: tl.constexpr):
    if KIND == 0:
        r = tl.sqrt(acc)
    elif KIND == 5:
        r = tl.exp2(tl.log2(acc) / p)
    else:
        r = acc
    return r


@triton.jit
def _store_as(ptr, v):
    """Stores a float64 value in ptr's dtype (through float32 for the narrower ones, as the CUDA kernels do)."""
    if ptr.dtype.element_ty == tl.float64:
        tl.store(ptr, v)
    else:
        tl.store(ptr, v.to(tl.float32).to(ptr.dtype.element_ty))


@triton.jit
def _chunk_partial(addr, size, p, ELEM: tl.constexpr, ACC: tl.constexpr, KIND: tl.constexpr, BLOCK: tl.constexpr):
    ptr = addr.to(tl.pointer_type(ELEM), bitcast=True)
    offs = tl.arange(0, BLOCK)
    acc = tl.full([BLOCK], _identity(KIND), ACC)
    pa = p.to(ACC)
    for start in range(0, size, BLOCK):
        m = start + offs < size
        x = tl.load(ptr + start + offs, mask=m, other=0.0).to(ACC)
        acc = _combine(acc, _contrib(x, m, pa, KIND), KIND)
    return _reduce(acc, KIND).to(tl.float64)


@triton.jit
def _coefficient(total, max_norm, F64: tl.constexpr):
    if F64:
        t = total.to(tl.float64)
        c = (1.0 / (t + 1e-6)) * max_norm  # float64 division is IEEE
    else:
        t = total.to(tl.float32)
        c = tl.math.div_rn(tl.zeros_like(t) + 1.0, t + 1e-6) * max_norm.to(tl.float32)  # tensors, as div_rn takes
    return tl.where((c < 1.0) | (c != c), c, 1.0).to(tl.float64)


@triton.jit
def _map_chunk(addr, size, a, b, ELEM: tl.constexpr, ACC: tl.constexpr, CLAMP: tl.constexpr, BLOCK: tl.constexpr):
    """x * a, or (CLAMP) x clamped to [a, b] (clamp_min then clamp_max, NaN kept), in ACC, stored back as ELEM."""
    ptr = addr.to(tl.pointer_type(ELEM), bitcast=True)
    offs = tl.arange(0, BLOCK)
    aa = a.to(ACC)
    bb = b.to(ACC)
    for start in range(0, size, BLOCK):
        m = start + offs < size
        x = tl.load(ptr + start + offs, mask=m, other=0.0).to(ACC)
        if CLAMP:
            y = tl.where(x < aa, aa, x)
            y = tl.where(y > bb, bb, y)
        else:
            y = x * aa
        tl.store(ptr + start + offs, y.to(ELEM), mask=m)


@triton.jit
def _map_row(rows, pid, a, b, CLAMP: tl.constexpr, BLOCK: tl.constexpr):
    addr = tl.load(rows + 3 * pid)
    size = tl.load(rows + 3 * pid + 1)
    code = tl.load(rows + 3 * pid + 2)
    if (code & 4) == 0:
        dt = code & 3
        if dt == 0:
            _map_chunk(addr, size, a, b, tl.float32, tl.float32, CLAMP, BLOCK)
        elif dt == 1:
            _map_chunk(addr, size, a, b, tl.float16, tl.float32, CLAMP, BLOCK)
        elif dt == 2:
            _map_chunk(addr, size, a, b, tl.bfloat16, tl.float32, CLAMP, BLOCK)
        else:
            _map_chunk(addr, size, a, b, tl.float64, tl.float64, CLAMP, BLOCK)


@triton.jit(do_not_specialize=["n_chunks", "n_tensors", "p_bits"])
def norm_kernel(rows, first, n_chunks, n_tensors, partials, tensor_partials, total_acc, total_out, each_out, counter,
                p_bits, KIND: tl.constexpr, TENSOR_VALUES: tl.constexpr, PER_TENSOR: tl.constexpr,
                BLOCK: tl.constexpr, RBLOCK: tl.constexpr):
    """Program k reduces chunk k to partials[k]; the last program to finish (atomic ticket on `counter`, which it
    resets) combines the partials in a fixed order: per tensor when asked (or for p = 0), then the total."""
    pid = tl.program_id(0)
    p = _f64(p_bits)
    if pid < n_chunks:
        addr = tl.load(rows + 3 * pid)
        size = tl.load(rows + 3 * pid + 1)
        dt = tl.load(rows + 3 * pid + 2) & 3
        if dt == 0:
            part = _chunk_partial(addr, size, p, tl.float32, tl.float32, KIND, BLOCK)
        elif dt == 1:
            part = _chunk_partial(addr, size, p, tl.float16, tl.float32, KIND, BLOCK)
        elif dt == 2:
            part = _chunk_partial(addr, size, p, tl.bfloat16, tl.float32, KIND, BLOCK)
        else:
            part = _chunk_partial(addr, size, p, tl.float64, tl.float64, KIND, BLOCK)
        tl.store(partials + pid, part)
    tl.debug_barrier()
    ticket = tl.atomic_add(counter, 1, sem="acq_rel")
    if ticket == tl.num_programs(0) - 1:
        tl.atomic_xchg(counter, 0)
        roffs = tl.arange(0, RBLOCK)
        if TENSOR_VALUES:
            for t in range(0, n_tensors):
                c0 = tl.load(first + t)
                c1 = tl.load(first + t + 1)
                acc = tl.full([RBLOCK], _identity(KIND), tl.float64)
                for s in range(c0, c1, RBLOCK):
                    v = tl.load(partials + s + roffs, mask=s + roffs < c1, other=_identity(KIND), cache_modifier=".cg")
                    acc = _combine(acc, v, KIND)
                tp = _reduce(acc, KIND)
                tl.store(tensor_partials + t, tp)
                if PER_TENSOR:
                    _store_as(each_out + t, _finalize(tp, p, KIND))
            tl.debug_barrier()
        acc = tl.full([RBLOCK], _identity(KIND), tl.float64)
        if KIND == 4:
            for s in range(0, n_tensors, RBLOCK):
                v = tl.load(tensor_partials + s + roffs, mask=s + roffs < n_tensors, other=0.0, cache_modifier=".cg")
                acc += (v != 0).to(tl.float64)
        else:
            for s in range(0, n_chunks, RBLOCK):
                v = tl.load(partials + s + roffs, mask=s + roffs < n_chunks, other=_identity(KIND),
                            cache_modifier=".cg")
                acc = _combine(acc, v, KIND)
        total = _finalize(_reduce(acc, KIND), p, KIND)
        tl.store(total_acc, total)
        _store_as(total_out, total)


@triton.jit(do_not_specialize=["max_norm_bits"])
def scale_kernel(rows, total, max_norm_bits, F64: tl.constexpr, BLOCK: tl.constexpr):
    """Multiplies chunk k by the coefficient computed from the device total; writes nothing when it is 1."""
    pid = tl.program_id(0)
    coef = _coefficient(tl.load(total), _f64(max_norm_bits), F64)
    if coef != 1.0:
        _map_row(rows, pid, coef, coef, False, BLOCK)


@triton.jit(do_not_specialize=["v_bits"])
def clamp_kernel(rows, v_bits, BLOCK: tl.constexpr):
    v = _f64(v_bits)
    _map_row(rows, tl.program_id(0), -v, v, True, BLOCK)
