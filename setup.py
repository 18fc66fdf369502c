"""Builds gradclip_cuda._C from csrc/ with torch's cpp_extension (ninja).

Switches (environment): GRADCLIP_CPU_ONLY=1 skips the CUDA sources; TORCH_CUDA_ARCH_LIST picks the GPU
architectures (default "8.0;9.0+PTX": A100, H100, and PTX that later GPUs compile at load); MAX_JOBS bounds
parallel compile jobs (read by torch); GRADCLIP_WERROR=1 makes every nvcc warning an error (CI sets it). CUDA
sources are compiled when torch was built with CUDA and a toolkit (12.1 or newer) is found (CUDA_HOME), whether or
not a GPU is visible.
"""
import glob
import os

from setuptools import find_packages, setup
from torch.utils import cpp_extension as cpp

sources = sorted(glob.glob("csrc/common/*.cpp") + glob.glob("csrc/cpu/*.cpp")) + ["csrc/bindings.cpp"]
cuda_sources = sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
import torch  # noqa: E402  (after the globs: torch's import is slow and they are not)

with_cuda = bool(cuda_sources) and os.environ.get("GRADCLIP_CPU_ONLY") != "1" \
    and torch.version.cuda is not None and cpp.CUDA_HOME is not None
# torch picks the C++ standard. -fopenmp: at::parallel_for runs its OpenMP loop inline, so without it the CPU
# kernels would run on one thread.
# Warnings are errors only where asked (GRADCLIP_WERROR=1, set by CI): a user's build against another nvcc/torch pair
# must not fail on a warning in a header neither of us controls.
werror = ["--Werror", "all-warnings"] if os.environ.get("GRADCLIP_WERROR") == "1" else []
flags = {"cxx": ["-O3", "-fopenmp"], "nvcc": ["-O3"] + werror}
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
Extension = cpp.CUDAExtension if with_cuda else cpp.CppExtension
ext = Extension(
    "gradclip_cuda._C",
    sources + (cuda_sources if with_cuda else []),
    include_dirs=[os.path.abspath("csrc")],
    define_macros=[("GRADCLIP_WITH_CUDA", None)] if with_cuda else [],
    extra_compile_args=flags if with_cuda else flags["cxx"],
    extra_link_args=["-fopenmp"],
)

setup(
    packages=find_packages(include=["gradclip_cuda", "gradclip_cuda.*"]),
    ext_modules=[ext],
    cmdclass={"build_ext": cpp.BuildExtension.with_options(use_ninja=True)},
)
