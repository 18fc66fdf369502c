"""Mutation check: injects realistic one-line bugs, one at a time, into a scratch clone of this checkout and runs the
tests that should catch each. Every mutation must make its tests fail; a survivor is a hole in the suite.

    python tools/mutation_check.py            # all mutations (CPU-only build in the clone: a few minutes on 2 cores)
    python tools/mutation_check.py -k arith   # those whose name contains "arith"

Not part of the test suite (it rebuilds the library for each C++ mutation). Prints one row per mutation and exits
non-zero when any survives or no longer applies (its text is gone from the source: update the list).
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORE = ["tests/test_api.py", "tests/test_edges.py", "tests/test_ops.py", "tests/test_amp.py"]
TRITON = ["tests/test_triton.py"]

# name, file, text, replacement, tests
MUTATIONS = [
    ("api: max_norm=0 refused", "gradclip_cuda/api.py",
     "if math.isnan(v) or (not allow_negative and v < 0):", "if math.isnan(v) or (not allow_negative and v <= 0):",
     CORE),
    ("api: error_if_nonfinite returns before scaling", "gradclip_cuda/api.py",
     "        if error_if_nonfinite:\n            _check_finite(total, p)\n        _scale(",
     "        if error_if_nonfinite:\n            _check_finite(total, p)\n            return total\n        _scale(", CORE),
    ("api: dtype checks per device group only (writes before the error)", "gradclip_cuda/api.py",
     "        _ops.check_writable(tensors, complex_ok)", "        pass", CORE),
    ("api: TypeError turned into ValueError", "gradclip_cuda/api.py",
     "    except TypeError:\n        raise TypeError(", "    except TypeError:\n        raise ValueError(", CORE),
    ("arith: min_nan ignores a NaN in its second argument", "csrc/common/arith.h",
     "GC_HD A min_nan(A a, A b) { return (a != a) ? a : ((b != b) ? b : (b < a ? b : a)); }",
     "GC_HD A min_nan(A a, A b) { return (a != a) ? a : (b < a ? b : a); }", CORE),
    ("arith: max_nan ignores a NaN in its second argument", "csrc/common/arith.h",
     "GC_HD A max_nan(A a, A b) { return (a != a) ? a : ((b != b) ? b : (b > a ? b : a)); }",
     "GC_HD A max_nan(A a, A b) { return (a != a) ? a : (b > a ? b : a); }", CORE),
    ("arith: p = 0 counts every element", "csrc/common/arith.h",
     "return acc + A(x != A(0));", "return acc + A(1);", CORE),
    ("arith: |x| keeps the sign of -0.0", "csrc/common/arith.h",
     "A ax = std::fabs(x);", "A ax = x < A(0) ? -x : x;", CORE),
    ("arith: coefficient without its clamp at 1", "csrc/common/arith.h",
     "return (c < A(1) || c != c) ? c : A(1);", "return c;", CORE),
    ("plan: write skips without their sort", "csrc/common/plan.cpp",
     "  std::sort(order.begin(), order.end(), before);\n", "", CORE),
    ("plan: repeats recognised by start address only", "csrc/common/plan.cpp",
     "if (end(i) <= end(c) && ts[i].dtype == ts[c].dtype && (begin(i) - begin(c)) % es == 0) {",
     "if (begin(i) == begin(c)) {", CORE),
    ("plan: partial overlaps not refused", "csrc/common/plan.cpp",
     "      w.overlap = true;\n", "", CORE),
    ("cpu: scale writes when the coefficient is 1", "csrc/cpu/clip_cpu.cpp",
     "  if (std::all_of(coefs.begin(), coefs.end(), [](double c) { return c == 1.0; })) return false;\n", "", CORE),
    ("cpu: bf16 stores truncate", "csrc/cpu/clip_cpu.cpp",
     "uint16_t((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16)", "uint16_t(u >> 16)", CORE),
    ("torch backend: overlapping views not refused", "gradclip_cuda/_ops.py",
     "            raise RuntimeError(OVERLAP_ERROR)", "            pass", CORE),
    ("triton: repeat flag in the wrong bit", "gradclip_cuda/triton/kernels.py",
     "    if (code & 4) == 0:\n", "    if (code & 8) == 0:\n", TRITON),
    ("triton: scale without its coef != 1 early exit", "gradclip_cuda/triton/kernels.py",
     "    if coef != 1.0:\n", "    if True:\n", TRITON),
]


def run(cmd, cwd, **kw):
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, **kw)


def build(clone):
    env = {**os.environ, "GRADCLIP_CPU_ONLY": "1", "MAX_JOBS": os.environ.get("MAX_JOBS", "2")}
    r = run([sys.executable, "setup.py", "--quiet", "build_ext", "--inplace"], clone, env=env)
    if r.returncode != 0:
        raise SystemExit(f"build failed:\n{r.stderr[-3000:]}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("-k", default="", help="only mutations whose name contains this")
    args = ap.parse_args()
    # Python mutations first; then each C++ one rebuilds (the restored source is rebuilt by the next one, or at the end)
    chosen = sorted((m for m in MUTATIONS if args.k in m[0]), key=lambda m: m[1].startswith("csrc/"))
    bad = 0
    with tempfile.TemporaryDirectory() as tmp:
        clone = os.path.join(tmp, "src")
        subprocess.run(["git", "clone", "-q", ROOT, clone], check=True)
        # the working tree's uncommitted changes too: the check is of what is here
        diff = run(["git", "diff", "HEAD"], ROOT).stdout
        if diff:
            subprocess.run(["git", "apply", "-"], cwd=clone, input=diff, text=True, check=True)
        build(clone)
        baseline = run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *CORE], clone)
        if baseline.returncode != 0:
            raise SystemExit("the unmutated suite fails:\n" + baseline.stdout[-2000:])
        print(f"{'mutation':62} result      seconds")
        for name, path, text, repl, tests in chosen:
            t0 = time.time()
            full = os.path.join(clone, path)
            original = open(full).read()
            if original.count(text) != 1:
                print(f"{name:62} NOT FOUND   -")
                bad += 1
                continue
            open(full, "w").write(original.replace(text, repl))
            try:
                if path.startswith("csrc/"):
                    build(clone)
                r = run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests], clone,
                        timeout=1200)
                caught = r.returncode != 0
            finally:
                open(full, "w").write(original)
            bad += not caught
            print(f"{name:62} {'caught' if caught else 'SURVIVED':11} {time.time() - t0:.0f}", flush=True)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
