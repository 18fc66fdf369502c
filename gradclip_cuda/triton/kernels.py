"""The Triton kernels: per-chunk norm partials with a last-program finish (one launch), scale, clamp, and AGC.

They walk a chunk table (gradclip_cuda/triton/__init__.py): one int64 row of three per chunk, holding the chunk's
first element's address, its size, and a code (bits 0-1: dtype, 0 fp32 / 1 fp16 / 2 bf16 / 3 fp64; bit 2: skip
writes, a gradient contained in another one of the call, _ops.write_skips; bits 8..: the tensor's index in the
list). One program handles one chunk. The per-element arithmetic follows csrc/common/arith.h: fp32 accumulation
(fp64 for fp64), NaN propagating through the max/min norms, and torch's coefficient
clamp(max_norm / (total + eps), max=1) with an IEEE division. AGC (agc_kernel) walks a table of its own, one
program per unit.

Decisions:
- A chunk is read in full tiles without a mask, then one masked tail tile. ALIGNED (constexpr, set on the host when
  every chunk address is 16-byte aligned, i.e. every tensor's start) tells the compiler so, which gives 16-byte
  vector loads and stores; without it the loads stay scalar, which views at odd offsets need.
- The general p-norm (KIND 5) is computed in float64 whatever the dtype: |x|^p with float32 exp2/log2 lowers to
  ex2.approx.ftz, which flushes values under 2^-126 to 0 (tiny gradients with p = 3 gave a zero norm); float64
  exp2/log2 lower to libdevice's precise functions. Slower, and only for p not in {0, 1, 2, inf, -inf}.
- The last program's per-tensor reduction (per-tensor norms, and p = 0) runs over blocks of TBLOCK tensors at
  once, each tensor's chunk partials read CBLOCK at a time from its first-chunk index: a tensor's partials always
  combine in the same order, so the results are bitwise the same from run to run.
- The ticket counter is a slot of the call's scratch memory, zeroed by the host before each launch (a captured op
  under CUDA graph capture): overlapping launches on different streams, and graph replays, never share one.

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
def _contrib(x, p, KIND: tl.constexpr):
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
    return c


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
def _reduce(v, AXIS: tl.constexpr, KIND: tl.constexpr):
    if KIND == 2:
        r = tl.where(tl.max((v != v).to(tl.int32), AXIS) > 0, float("nan"), tl.max(v, AXIS))
    elif KIND == 3:
        r = tl.where(tl.max((v != v).to(tl.int32), AXIS) > 0, float("nan"), tl.min(v, AXIS))
    else:
        r = tl.sum(v, AXIS)
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
def _store_as(ptr, v, mask):
    """Stores float64 values in ptr's dtype (through float32 for the narrower ones, as the CUDA kernels do)."""
    if ptr.dtype.element_ty == tl.float64:
        tl.store(ptr, v, mask=mask)
    else:
        tl.store(ptr, v.to(tl.float32).to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _pointer(addr, ELEM: tl.constexpr, ALIGNED: tl.constexpr):
    ptr = addr.to(tl.pointer_type(ELEM), bitcast=True)
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)  # on the pointer: the hint does not cross the int-to-pointer cast
    return ptr


@triton.jit
def _chunk_partial(addr, size, p, ELEM: tl.constexpr, ACC: tl.constexpr, KIND: tl.constexpr, ALIGNED: tl.constexpr,
                   BLOCK: tl.constexpr):
    ptr = _pointer(addr, ELEM, ALIGNED)
    offs = tl.arange(0, BLOCK)
    acc = tl.full([BLOCK], _identity(KIND), ACC)
    pa = p.to(ACC)
    full = size // BLOCK * BLOCK
    for start in range(0, full, BLOCK):
        s = tl.multiple_of(start, BLOCK)
        acc = _combine(acc, _contrib(tl.load(ptr + s + offs).to(ACC), pa, KIND), KIND)
    if full < size:
        m = full + offs < size
        x = tl.load(ptr + full + offs, mask=m, other=0.0).to(ACC)
        acc = _combine(acc, tl.where(m, _contrib(x, pa, KIND), _identity(KIND)), KIND)
    return _reduce(acc, 0, KIND).to(tl.float64)


@triton.jit
def _row_partial(addr, size, dt, p, ACC32: tl.constexpr, KIND: tl.constexpr, ALIGNED: tl.constexpr,
                 BLOCK: tl.constexpr):
    """The partial of one chunk of dtype code dt; ACC32 is the accumulator of the dtypes narrower than float64."""
    if dt == 0:
        part = _chunk_partial(addr, size, p, tl.float32, ACC32, KIND, ALIGNED, BLOCK)
    elif dt == 1:
        part = _chunk_partial(addr, size, p, tl.float16, ACC32, KIND, ALIGNED, BLOCK)
    elif dt == 2:
        part = _chunk_partial(addr, size, p, tl.bfloat16, ACC32, KIND, ALIGNED, BLOCK)
    else:
        part = _chunk_partial(addr, size, p, tl.float64, tl.float64, KIND, ALIGNED, BLOCK)
    return part


@triton.jit
def _coefficient(total, max_norm, eps, F64: tl.constexpr):
    if F64:
        t = total.to(tl.float64)
        c = (1.0 / (t + eps)) * max_norm  # float64 division is IEEE
    else:
        t = total.to(tl.float32)
        c = tl.math.div_rn(tl.zeros_like(t) + 1.0, t + eps.to(tl.float32)) * max_norm.to(tl.float32)  # tensors,
    return tl.where((c < 1.0) | (c != c), c, 1.0).to(tl.float64)  # as div_rn takes


@triton.jit
def _map_tile(ptr, offs, a, b, ACC: tl.constexpr, CLAMP: tl.constexpr):
    x = tl.load(ptr + offs).to(ACC)
    if CLAMP:
        y = tl.where(x < a, a, x)
        y = tl.where(y > b, b, y)
    else:
        y = x * a
    tl.store(ptr + offs, y.to(ptr.dtype.element_ty))


@triton.jit
def _map_chunk(addr, size, a, b, ELEM: tl.constexpr, ACC: tl.constexpr, CLAMP: tl.constexpr, ALIGNED: tl.constexpr,
               BLOCK: tl.constexpr):
    """x * a, or (CLAMP) x clamped to [a, b] (clamp_min then clamp_max, NaN kept), in ACC, stored back as ELEM."""
    ptr = _pointer(addr, ELEM, ALIGNED)
    offs = tl.arange(0, BLOCK)
    aa = a.to(ACC)
    bb = b.to(ACC)
    full = size // BLOCK * BLOCK
    for start in range(0, full, BLOCK):
        _map_tile(ptr + tl.multiple_of(start, BLOCK), offs, aa, bb, ACC, CLAMP)
    if full < size:
        m = full + offs < size
        x = tl.load(ptr + full + offs, mask=m, other=0.0).to(ACC)
        if CLAMP:
            y = tl.where(x < aa, aa, x)
            y = tl.where(y > bb, bb, y)
        else:
            y = x * aa
        tl.store(ptr + full + offs, y.to(ELEM), mask=m)


@triton.jit
def _map_row(rows, pid, a, b, CLAMP: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    addr = tl.load(rows + 3 * pid)
    size = tl.load(rows + 3 * pid + 1)
    code = tl.load(rows + 3 * pid + 2)
    if (code & 4) == 0:
        dt = code & 3
        if dt == 0:
            _map_chunk(addr, size, a, b, tl.float32, tl.float32, CLAMP, ALIGNED, BLOCK)
        elif dt == 1:
            _map_chunk(addr, size, a, b, tl.float16, tl.float32, CLAMP, ALIGNED, BLOCK)
        elif dt == 2:
            _map_chunk(addr, size, a, b, tl.bfloat16, tl.float32, CLAMP, ALIGNED, BLOCK)
        else:
            _map_chunk(addr, size, a, b, tl.float64, tl.float64, CLAMP, ALIGNED, BLOCK)


@triton.jit(do_not_specialize=["n_chunks", "n_tensors", "p_bits"])
def norm_kernel(rows, first, n_chunks, n_tensors, partials, tensor_partials, total_acc, total_out, each_out, counter,
                p_bits, KIND: tl.constexpr, TENSOR_VALUES: tl.constexpr, PER_TENSOR: tl.constexpr,
                ALIGNED: tl.constexpr, BLOCK: tl.constexpr, RBLOCK: tl.constexpr, TBLOCK: tl.constexpr,
                CBLOCK: tl.constexpr):
    """Program k reduces chunk k to partials[k]; the last program to finish (atomic ticket on `counter`, zero at
    launch) combines the partials in a fixed order: per tensor when asked (or for p = 0), then the total."""
    pid = tl.program_id(0)
    p = _f64(p_bits)
    if pid < n_chunks:
        addr = tl.load(rows + 3 * pid)
        size = tl.load(rows + 3 * pid + 1)
        dt = tl.load(rows + 3 * pid + 2) & 3
        if KIND == 5:
            part = _row_partial(addr, size, dt, p, tl.float64, KIND, ALIGNED, BLOCK)
        else:
            part = _row_partial(addr, size, dt, p, tl.float32, KIND, ALIGNED, BLOCK)
        tl.store(partials + pid, part)
    tl.debug_barrier()
    ticket = tl.atomic_add(counter, 1, sem="acq_rel")
    if ticket == tl.num_programs(0) - 1:
        if TENSOR_VALUES:
            toffs = tl.arange(0, TBLOCK)
            coffs = tl.arange(0, CBLOCK)
            for t0 in range(0, n_tensors, TBLOCK):
                tm = t0 + toffs < n_tensors
                c0 = tl.load(first + t0 + toffs, mask=tm, other=0)
                c1 = tl.load(first + t0 + toffs + 1, mask=tm, other=0)
                acc = tl.full([TBLOCK, CBLOCK], _identity(KIND), tl.float64)
                for j in range(0, tl.max(c1 - c0, 0), CBLOCK):
                    idx = c0[:, None] + j + coffs[None, :]
                    v = tl.load(partials + idx, mask=idx < c1[:, None], other=_identity(KIND), cache_modifier=".cg")
                    acc = _combine(acc, v, KIND)
                tp = _reduce(acc, 1, KIND)
                tl.store(tensor_partials + t0 + toffs, tp, mask=tm)
                if PER_TENSOR:
                    _store_as(each_out + t0 + toffs, _finalize(tp, p, KIND), tm)
            tl.debug_barrier()
        roffs = tl.arange(0, RBLOCK)
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
        total = _finalize(_reduce(acc, 0, KIND), p, KIND)
        tl.store(total_acc, total)
        _store_as(total_out, total, None)


@triton.jit(do_not_specialize=["max_norm_bits", "eps_bits"])
def scale_kernel(rows, total, max_norm_bits, eps_bits, F64: tl.constexpr, PER_TENSOR: tl.constexpr,
                 DIRECT: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    """Multiplies chunk k by its tensor's coefficient: computed from the device total (one, or one per tensor:
    PER_TENSOR, the tensor's index in bits 8.. of the row's code) or, DIRECT, read as it is; writes nothing when it
    is 1."""
    pid = tl.program_id(0)
    if PER_TENSOR:
        idx = tl.load(rows + 3 * pid + 2) >> 8
    else:
        idx = 0
    if DIRECT:
        coef = tl.load(total + idx).to(tl.float64)
    else:
        coef = _coefficient(tl.load(total + idx), _f64(max_norm_bits), _f64(eps_bits), F64)
    if coef != 1.0:
        _map_row(rows, pid, coef, coef, False, ALIGNED, BLOCK)


@triton.jit
def _unit_partial(addr, outer, step, inner, dt, p, KIND: tl.constexpr, BLOCK: tl.constexpr):
    """The partial of norm kind KIND of one AGC unit: `outer` segments of `inner` elements of dtype code dt, the
    first at byte address addr, each `step` bytes after the previous one, combined in order."""
    if KIND == 5:
        acc = _row_partial(addr, inner, dt, p, tl.float64, KIND, False, BLOCK)
    else:
        acc = _row_partial(addr, inner, dt, p, tl.float32, KIND, False, BLOCK)
    for o in range(1, outer):
        if KIND == 5:
            part = _row_partial(addr + o * step, inner, dt, p, tl.float64, KIND, False, BLOCK)
        else:
            part = _row_partial(addr + o * step, inner, dt, p, tl.float32, KIND, False, BLOCK)
        acc = _combine(acc, part, KIND)
    return _finalize(acc, p, KIND)


@triton.jit
def _agc_coef(pn, gn, factor, eps, A: tl.constexpr):
    """AGC's coefficient of a unit in the gradient's accumulation type A (csrc/common/arith.h, agc_coef): 1 under
    the limit max(pn, eps) * factor, else limit / max(gn, 1e-6), an IEEE division; returned as float64."""
    e = eps.to(A)
    p = pn.to(A)
    g = gn.to(A)
    limit = tl.where(p < e, e, p) * factor.to(A)
    tiny = tl.zeros_like(g) + 1e-6
    den = tl.where(g < tiny, tiny, g)
    if A == tl.float64:
        q = limit / den  # float64 division is IEEE
    else:
        q = tl.math.div_rn(limit, den)
    return tl.where(g < limit, 1.0, q).to(tl.float64)


@triton.jit(do_not_specialize=["n_units", "p_bits", "factor_bits", "eps_bits"])
def agc_kernel(tensors, unit_tensor, n_units, p_bits, factor_bits, eps_bits, KIND: tl.constexpr,
               BLOCK: tl.constexpr):
    """AGC, program k for unit k of the list (unit_tensor[k]: its tensor). tensors: int64 rows of 8 per tensor:
    grad address, param address, outer, units, inner, dtype codes (grad | param << 2), first unit, element sizes
    (grad | param << 8). Both norms of the unit, then its coefficient (gradient's accumulation type), then the scale
    of the gradient unit where that is not 1."""
    pid = tl.program_id(0)
    if pid < n_units:
        t = tl.load(unit_tensor + pid)
        row = tensors + 8 * t
        gaddr = tl.load(row)
        paddr = tl.load(row + 1)
        outer = tl.load(row + 2)
        units = tl.load(row + 3)
        inner = tl.load(row + 4)
        codes = tl.load(row + 5)
        u = pid - tl.load(row + 6)
        sizes = tl.load(row + 7)
        gsize = sizes & 255
        psize = sizes >> 8
        gdt = codes & 3
        pdt = (codes >> 2) & 3
        p = _f64(p_bits)
        pn = _unit_partial(paddr + u * inner * psize, outer, units * inner * psize, inner, pdt, p, KIND, BLOCK)
        gn = _unit_partial(gaddr + u * inner * gsize, outer, units * inner * gsize, inner, gdt, p, KIND, BLOCK)
        factor = _f64(factor_bits)
        eps = _f64(eps_bits)
        if gdt == 3:
            coef = _agc_coef(pn, gn, factor, eps, tl.float64)
        else:
            coef = _agc_coef(pn, gn, factor, eps, tl.float32)
        if coef != 1.0:
            for o in range(0, outer):
                addr = gaddr + (o * units + u) * inner * gsize
                if gdt == 0:
                    _map_chunk(addr, inner, coef, coef, tl.float32, tl.float32, False, False, BLOCK)
                elif gdt == 1:
                    _map_chunk(addr, inner, coef, coef, tl.float16, tl.float32, False, False, BLOCK)
                elif gdt == 2:
                    _map_chunk(addr, inner, coef, coef, tl.bfloat16, tl.float32, False, False, BLOCK)
                else:
                    _map_chunk(addr, inner, coef, coef, tl.float64, tl.float64, False, False, BLOCK)


@triton.jit(do_not_specialize=["v_bits"])
def clamp_kernel(rows, v_bits, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    v = _f64(v_bits)
    _map_row(rows, tl.program_id(0), -v, v, True, ALIGNED, BLOCK)
