"""The CUDA path's host-side decisions and the built kernels' machine code, checked without a GPU.

- the launchers' policies (csrc/common/policy.h), with the capture status, driver version and device injected;
- the chunk-visiting index arithmetic the kernels run (chunk_parts / visit_parts in csrc/common/launch.h), swept on
  the host for every misalignment of 2-, 4- and 8-byte elements;
- the PTX and SASS of the built library, read with cuobjdump (skipped when the library was built without CUDA or no
  cuobjdump is found): ticket order, rounding of the coefficient and of 16-bit stores, 16-byte loads, registers,
  spills and parameter bytes;
- the build switches of setup.py.
"""
import os
import re
import shutil
import subprocess
import sys
from functools import lru_cache

import numpy as np
import pytest

from gradclip_cuda import _ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_lib = pytest.mark.skipif(_ops.C is None, reason="needs the compiled library")


# ---- policies ----

@needs_lib
@pytest.mark.parametrize("driver", [11080, 12000, 12009])
def test_drivers_before_12_1_get_the_small_table_only(driver):
    C = _ops.C
    small, large = C.TABLE_SLOTS
    assert C.LARGE_PARAMS_DRIVER == 12010
    for n in (1, small, small + 1, 2_000, 10_000):
        assert C.table_capacity(n, driver, False) == small


@needs_lib
@pytest.mark.parametrize("driver", [12010, 12080, 13000])
def test_drivers_from_12_1_get_the_large_table_for_large_sets(driver):
    C = _ops.C
    small, large = C.TABLE_SLOTS
    assert C.table_capacity(1, driver, False) == small
    assert C.table_capacity(small, driver, False) == small
    assert C.table_capacity(small + 1, driver, False) == large
    assert C.table_capacity(10_000, driver, False) == large
    assert C.table_capacity(10_000, driver, True) == small  # forced (GRADCLIP_CUDA_SMALL_TABLES=1)


@needs_lib
def test_fused_threshold_is_half_of_l2_unless_the_environment_says():
    C = _ops.C
    assert C.fused_max_bytes(50 * 2**20) == 25 * 2**20
    assert C.fused_max_bytes(60 * 2**20, "123") == 123
    assert C.fused_max_bytes(60 * 2**20, "0") == 0


FUSABLE = dict(capturing=False, eager_fused_ok=False, one_table=True, bytes=1 << 20, max_bytes=25 << 20, l0=False,
               cooperative=True)


@needs_lib
def test_fused_path_taken_eagerly_when_everything_allows_it():
    assert _ops.C.take_fused(**FUSABLE)


@needs_lib
@pytest.mark.parametrize("change", [dict(one_table=False), dict(bytes=(25 << 20) + 1), dict(bytes=0),
                                    dict(max_bytes=0), dict(l0=True), dict(cooperative=False)])
def test_fused_path_refused_when_one_condition_fails(change):
    assert not _ops.C.take_fused(**{**FUSABLE, **change})
    assert not _ops.C.take_fused(**{**FUSABLE, **change, "capturing": True, "eager_fused_ok": True})


@needs_lib
def test_under_capture_fused_only_after_an_eager_fused_launch_succeeded():
    C = _ops.C
    assert not C.take_fused(**{**FUSABLE, "capturing": True, "eager_fused_ok": False})
    assert C.take_fused(**{**FUSABLE, "capturing": True, "eager_fused_ok": True})
    assert C.take_fused(**{**FUSABLE, "capturing": False, "eager_fused_ok": True})


@needs_lib
def test_sets_needing_several_parameter_tables_take_device_tables():
    C = _ops.C
    assert not C.use_device_table(1, False, True)  # one parameter table: it travels in the launch
    assert C.use_device_table(2, False, True) and C.use_device_table(157, False, True)
    assert not C.use_device_table(3, True, True)  # GRADCLIP_CUDA_SMALL_TABLES=1 keeps parameter tables
    assert not C.use_device_table(3, False, False)  # gradients through copies: new addresses each call


@needs_lib
def test_device_tables_read_under_capture_only_once_the_upload_is_done():
    C = _ops.C
    assert C.read_device_table(False, False) and C.read_device_table(False, True)  # eagerly: waits on the copy
    assert not C.read_device_table(True, False)  # a capture cannot wait on the uncaptured copy
    assert C.read_device_table(True, True)


# ---- chunk visiting (the kernels' index arithmetic, run on the host) ----

def _sizes(per_vec, threads):
    group = 4 * threads * per_vec  # elements of one round of vector groups (kCudaUnroll = 4)
    small = list(range(0, 3 * per_vec + 2))
    edges = [group - per_vec - 1, group - 1, group, group + 1, group + per_vec + 3, 2 * group + 7,
             threads * per_vec + 5, 65_536]
    return small + edges


@needs_lib
@pytest.mark.parametrize("threads", ["block", "warp"])  # a chunk of a larger tensor, a pack member
@pytest.mark.parametrize("elem_size", [2, 4, 8])
def test_every_element_visited_once_with_aligned_vectors_for_every_misalignment(elem_size, threads):
    C = _ops.C
    per_vec = 16 // elem_size
    threads = C.CUDA_THREADS if threads == "block" else 32
    base = 1 << 20
    for mis in range(0, 16, elem_size):  # every element-aligned offset from a 16-byte boundary
        addr = base + mis
        for n in _sizes(per_vec, threads):
            v = C.chunk_visits(addr, n, elem_size, threads)
            assert v["per_vec"] == per_vec
            assert 0 <= v["head"] < per_vec and 0 <= v["tail"] < per_vec
            scalars = np.array(v["scalars"], dtype=np.int64)
            firsts = np.array(v["vectors"], dtype=np.int64)
            assert ((addr + firsts * elem_size) % 16 == 0).all(), (mis, n)  # vector accesses 16-byte aligned
            assert ((scalars >= 0) & (scalars < n)).all(), (mis, n)  # nothing outside [0, n)
            assert ((firsts >= 0) & (firsts + per_vec <= n)).all(), (mis, n)
            counts = np.zeros(n, dtype=np.int64)
            np.add.at(counts, scalars, 1)
            np.add.at(counts, (firsts[:, None] + np.arange(per_vec)).ravel(), 1)
            assert (counts == 1).all(), (mis, n, np.flatnonzero(counts != 1)[:10])  # every element exactly once
            if n >= per_vec + (16 - mis) % 16 // elem_size:  # room for a vector after the head: one is used
                assert v["vecs"] >= 1


# ---- the built library's machine code ----

def _cuobjdump():
    found = shutil.which("cuobjdump")
    if found:
        return found
    home = os.environ.get("CUDA_HOME")
    if home and os.access(os.path.join(home, "bin", "cuobjdump"), os.X_OK):
        return os.path.join(home, "bin", "cuobjdump")
    try:
        import triton
    except Exception:
        return None
    p = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return p if os.access(p, os.X_OK) else None


def _library():
    if _ops.C is None or not _ops.BUILD.get("cuda"):
        return None
    return _ops.C.__file__


needs_cuda_build = pytest.mark.skipif(_library() is None or _cuobjdump() is None,
                                      reason="needs the library built with CUDA and cuobjdump")


@lru_cache(maxsize=None)
def _dump(flag):
    return subprocess.run([_cuobjdump(), flag, _library()], check=True, capture_output=True, text=True).stdout


@lru_cache(maxsize=None)
def _ptx_functions():
    """{mangled name: PTX} of every .entry and .func of the library's PTX: from its header to the next one."""
    text = _dump("-ptx")
    heads = list(re.finditer(r"^(?:\.visible\s+|\.weak\s+)?\.(?:entry|func)\s+(?:\([^)]*\)\s*)?(\w+)", text, re.M))
    funcs = {}
    for i, m in enumerate(heads):
        end = heads[i + 1].start() if i + 1 < len(heads) else len(text)
        funcs[m.group(1)] = text[m.start():end]  # a later definition replaces an earlier prototype
    return funcs


GENERAL = "NormKindE5E"  # NormKind::General as a template argument in a mangled name


def _kernels(*names):
    out = {k: v for k, v in _ptx_functions().items()
           if any(n in k for n in names) and v.lstrip().startswith((".entry", ".visible .entry"))}
    assert out, f"no {names} in the PTX"
    return out


def _lines(body):
    return [l.strip() for l in body.splitlines()]


FENCES = ("membar.gl", "fence.sc.gpu", "fence.acq_rel.gpu")


@needs_cuda_build
def test_norm_ticket_order_partial_fence_atomic_then_l2_reads():
    for name, body in _kernels("11norm_kernel").items():
        lines = _lines(body)
        atom = [i for i, l in enumerate(lines) if l.startswith("atom.")]
        assert len(atom) == 1, (name, [lines[i] for i in atom])
        a = atom[0]
        # the call's own counter, advanced with wrap (atomicInc): no static slot, nothing to reset by hand
        assert re.match(r"atom(\.\w+)*\.global(\.\w+)*\.inc\.u32", lines[a]), (name, lines[a])
        store = [i for i, l in enumerate(lines[:a]) if l.startswith("st.global.f64")]
        fence = [i for i, l in enumerate(lines[:a]) if l.startswith(FENCES)]
        assert store and fence and store[-1] < fence[-1] < a, name  # partial stored, fenced, then the ticket
        after = lines[a + 1:]
        fence_after = [i for i, l in enumerate(after) if l.startswith(FENCES)]
        loads = [i for i, l in enumerate(after) if l.startswith("ld.global.cg.f64")]
        assert fence_after and loads and fence_after[0] < loads[0], name  # the last block reads partials from L2
        assert not any(re.match(r"ld\.global\.(?!cg)\S*f64", l) for l in after), name


@needs_cuda_build
def test_no_static_ticket_array():
    assert "g_tickets" not in _dump("-ptx")
    ours = [l for l in _dump("-ptx").splitlines() if l.startswith(".global") and "gradclip" in l]
    assert not ours, ours  # a device global of ours would be shared by every call, stream and graph


@needs_cuda_build
def test_coefficient_divides_with_round_to_nearest():
    # 1 / (total + 1e-6) in float and in double: div.rn, or rcp.rn (the correctly rounded reciprocal, the same value)
    for name, body in _kernels("scale_kernel", "fused_clip_kernel", "agc_kernel").items():
        assert re.search(r"(div|rcp)\.rn\.f32", body) and re.search(r"(div|rcp)\.rn\.f64", body), name
    for name, body in _ptx_functions().items():
        assert "div.approx" not in body and "div.full" not in body, name


@needs_cuda_build
def test_16_bit_stores_round_to_nearest():
    for name, body in _kernels("scale_kernel", "clamp_kernel", "fused_clip_kernel", "agc_kernel").items():
        assert "cvt.rn.bf16.f32" in body and "cvt.rn.f16.f32" in body, name
        assert not re.search(r"cvt\.r[zmp]\w*\.b?f16\.f32", body), name


@needs_cuda_build
def test_norm_and_scale_kernels_use_16_byte_loads():
    for name, body in _kernels("11norm_kernel", "scale_kernel", "clamp_kernel", "fused_clip_kernel",
                               "agc_kernel").items():
        assert re.search(r"ld\.global(\.nc)?\.v4\.(u|b|f)32", body), name
    for name, body in _kernels("scale_kernel", "clamp_kernel", "fused_clip_kernel", "agc_kernel").items():
        assert re.search(r"st\.global\.v4\.(u|b|f)32", body), name
    sass = _dump("-sass")
    assert "LDG.E.128" in sass and "STG.E.128" in sass


@needs_cuda_build
def test_no_approximate_arithmetic_outside_general_p():
    # Only pow (general p: its accurate sequence seeds with rcp.approx and refines) may hold an approximate
    # instruction; every other kernel is exact arithmetic, sqrt.rn and rcp.rn.
    for name, body in _ptx_functions().items():
        if GENERAL in name or "pow" in name:
            continue
        assert not re.search(r"\b(ex2|lg2|rcp|sqrt|div|sin|cos|rsqrt|tanh)\.approx", body), name
    for name, body in _kernels("11norm_kernel", "fused_clip_kernel").items():
        if "NormKindE0E" in name:
            assert "sqrt.rn.f64" in body, name  # the L2 total


# The decision on __launch_bounds__ (clip_cuda.cu): registers within what the minimum blocks per SM allow, no spills
# (no stack frame) outside the kernels that call a subroutine, parameters within 32,764 bytes (CUDA 12.1+) and, for
# the small table, 4 KB.


def _limits(fn):
    """(max registers, max stack bytes) of a kernel: a minimum of 2 blocks of 512 threads per SM (64 registers;
    AGC: 3 blocks of 256, 85, allocated by 8: 80), and no stack frame, so no spill, except for general p, whose pow
    is a call (measured: 16-24 bytes)."""
    regs = 80 if "agc_kernel" in fn else 64
    if GENERAL in fn:
        return regs, 32
    if "fused_clip_kernel" in fn and "DeviceTable" in fn:
        # measured on sm_90 (2026-11-29): the device-table fused kernels keep one 32-bit value on the stack, stored
        # once at entry and loaded once after the grid barrier (one STL, one LDL in the SASS): the cost of telling
        # the compiler the gradients are global memory (device.cuh, visit_chunk) at 64 registers
        return regs, 8
    return regs, 0


def _res_usage():
    """[(arch, function, {field: value})] from cuobjdump -res-usage (the function line, then its usage line)."""
    rows, arch, fn = [], None, None
    for line in _dump("-res-usage").splitlines():
        m = re.search(r"arch = (sm_\d+)", line)
        if m:
            arch = m.group(1)
        m = re.match(r"\s*Function (\w+):", line)
        if m:
            fn = m.group(1)
            continue
        if fn and "REG:" in line:
            rows.append((arch, fn, {k: int(v) for k, v in re.findall(r"(\w+(?:\[\d+\])?):(\d+)", line)}))
            fn = None
    return rows


def _param_sizes():
    """[(arch, function, parameter bytes)] from the EIATTR_CBANK_PARAM_SIZE of each kernel's .nv.info section."""
    rows, arch, fn = [], None, None
    for line in _dump("-elf").splitlines():
        m = re.match(r"arch = (sm_\d+)", line)
        if m:
            arch = m.group(1)
        m = re.match(r"\.nv\.info\.(\w+)", line)
        if m:
            fn, want = m.group(1), False
            continue
        if fn and "EIATTR_CBANK_PARAM_SIZE" in line:
            want = True
        elif fn and want and line.strip().startswith("Value:"):
            rows.append((arch, fn, int(line.split()[1], 16)))
            fn = None
    return rows


@needs_cuda_build
def test_registers_and_spills_within_limits():
    rows = [r for r in _res_usage() if "gradclip" in r[1]]
    assert len(rows) >= 26, rows  # every kernel of every architecture built
    for arch, fn, res in rows:
        regs, stack = _limits(fn)
        assert res["REG"] <= regs, (arch, fn, res)
        assert res["STACK"] <= stack and res["LOCAL"] == 0, (arch, fn, res)


@needs_cuda_build
def test_parameter_bytes_within_what_the_driver_takes():
    rows = [r for r in _param_sizes() if "gradclip" in r[1]]
    assert len(rows) >= 26, rows
    for arch, fn, size in rows:
        assert 0 < size <= (4096 if "Li64E" in fn else 32764), (arch, fn, size)
        if "Li2016E" in fn:
            assert size > 32_000, (arch, fn, size)  # the large table travels whole
        if "Li560E" in fn:
            assert size > 31_000, (arch, fn, size)  # AGC's large table too
        if "DeviceTable" in fn:
            assert size <= 4096, (arch, fn, size)  # header and slot pointer: any driver takes it
    assert any("DeviceTable" in fn for _, fn, _ in rows), "no device-table kernels built"


@needs_cuda_build
def test_no_large_device_globals():
    for line in _dump("-res-usage").splitlines():
        m = re.search(r"GLOBAL:(\d+)", line)
        if m:
            assert int(m.group(1)) < 1024, line  # a 4,096-slot ticket array took 16 KB


# ---- build switches ----

def test_nvcc_warnings_are_errors_only_when_asked():
    probe = (
        "import os, sys, setuptools\n"
        "got = {}\n"
        "setuptools.setup = lambda **kw: got.update(kw)\n"
        "sys.argv = ['setup.py']\n"
        "exec(compile(open('setup.py').read(), 'setup.py', 'exec'), {'__name__': '__main__'})\n"
        "args = got['ext_modules'][0].extra_compile_args\n"
        "print(isinstance(args, dict) and '--Werror' in args['nvcc'])\n"
    )
    for value, expected in ((None, "False"), ("1", "True")):
        env = {k: v for k, v in os.environ.items() if k != "GRADCLIP_WERROR"}
        if value:
            env["GRADCLIP_WERROR"] = value
        env["CUDA_HOME"] = env.get("CUDA_HOME", "/usr/local/cuda-13.0")
        out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True,
                             check=True).stdout.strip().splitlines()[-1]
        if value and out == "False" and not _ops.BUILD.get("cuda"):
            pytest.skip("setup.py builds no CUDA sources here")
        assert out == expected, (value, out)
