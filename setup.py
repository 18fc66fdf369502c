"""Builds gradclip_cuda._C from csrc/ with torch's cpp_extension (ninja).

Switches (environment): GRADCLIP_CPU_ONLY=1 skips the CUDA sources; TORCH_CUDA_ARCH_LIST picks the GPU
architectures (default "8.0;9.0+PTX": A100, H100, and PTX that later GPUs compile at load); MAX_JOBS bounds
parallel compile jobs (read by torch); CUDA_HOME names the CUDA toolkit (found from nvcc when unset);
GRADCLIP_WERROR=1 makes every nvcc warning an error (CI sets it). The CUDA sources are compiled when torch was built
with CUDA and a usable toolkit (12.1 or newer, with its headers) is found, whether or not a GPU is visible;
otherwise the CPU kernels are built and one line says why, which gradclip_cuda.build_info() repeats
(gradclip_cuda/_build_config.py, written here).
"""
import glob
import os
import re
import shutil
import subprocess

import torch
from setuptools import find_packages, setup


def find_cuda_toolkit():
    """(toolkit folder, None), or (None, why no CUDA kernels are built). torch guesses CUDA_HOME from `which nvcc`,
    which is wrong where nvcc is a wrapper script: ask nvcc where its toolkit is instead."""
    if os.environ.get("GRADCLIP_CPU_ONLY") == "1":
        return None, "GRADCLIP_CPU_ONLY=1"
    if torch.version.cuda is None:
        return None, f"torch {torch.__version__} was built without CUDA"
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if not home and shutil.which("nvcc"):
        out = subprocess.run(["nvcc", "--dryrun", "-c", "-x", "cu", os.devnull], capture_output=True, text=True)
        top = re.search(r"^#\$ TOP=(.+)$", out.stdout + out.stderr, re.M)
        home = os.path.realpath(top.group(1).strip()) if top else None
    if not home and os.path.isdir("/usr/local/cuda"):
        home = "/usr/local/cuda"
    if not home:
        return None, "no CUDA toolkit found (no CUDA_HOME, no nvcc on PATH, no /usr/local/cuda)"
    header = os.path.join(home, "include", "cuda_runtime_api.h")
    if not os.path.isfile(header):
        return None, f"the CUDA toolkit at {home} has no include/cuda_runtime_api.h (set CUDA_HOME)"
    version = re.search(r"#define CUDART_VERSION\s+(\d+)", open(header).read())
    if not version or int(version.group(1)) < 12010:
        return None, f"the CUDA toolkit at {home} is older than 12.1 (the kernels need 32 KB of kernel parameters)"
    return home, None


sources = sorted(glob.glob("csrc/common/*.cpp") + glob.glob("csrc/cpu/*.cpp")) + ["csrc/bindings.cpp"]
cuda_sources = sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
cuda_home, why_no_cuda = find_cuda_toolkit() if cuda_sources else (None, "no CUDA sources")
if cuda_home:
    os.environ["CUDA_HOME"] = cuda_home  # read by cpp_extension when it is imported, below
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
else:
    print(f"gradclip_cuda: building the CPU kernels only: {why_no_cuda}")
from torch.utils import cpp_extension as cpp  # noqa: E402

with_cuda = cuda_home is not None
# torch picks the C++ standard. -fopenmp: at::parallel_for runs its OpenMP loop inline, so without it the CPU
# kernels would run on one thread.
# Warnings are errors only where asked (GRADCLIP_WERROR=1, set by CI): a user's build against another nvcc/torch pair
# must not fail on a warning in a header neither of us controls.
werror = ["--Werror", "all-warnings"] if os.environ.get("GRADCLIP_WERROR") == "1" else []
flags = {"cxx": ["-O3", "-fopenmp"], "nvcc": ["-O3"] + werror}
Extension = cpp.CUDAExtension if with_cuda else cpp.CppExtension
ext = Extension(
    "gradclip_cuda._C",
    sources + (cuda_sources if with_cuda else []),
    include_dirs=[os.path.abspath("csrc")],
    define_macros=[("GRADCLIP_WITH_CUDA", None)] if with_cuda else [],
    extra_compile_args=flags if with_cuda else flags["cxx"],
    extra_link_args=["-fopenmp"],
)

class BuildExt(cpp.BuildExtension):
    """torch's build_ext, which also writes gradclip_cuda/_build_config.py beside the library it builds."""

    def run(self):
        folder = "gradclip_cuda" if self.inplace else os.path.join(self.build_lib, "gradclip_cuda")
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "_build_config.py"), "w") as f:
            f.write("# Written by setup.py: what the compiled library was built with.\n"
                    f"CUDA_ARCHS = {os.environ['TORCH_CUDA_ARCH_LIST'] if with_cuda else None!r}\n"
                    f"WHY_NO_CUDA = {why_no_cuda!r}\n")
        super().run()


setup(
    packages=find_packages(include=["gradclip_cuda", "gradclip_cuda.*"]),
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExt.with_options(use_ninja=True)},
)
