"""Compiler flags of the fusedgru._C extension, in one place.

Read by setup.py (the normal build) and by fusedgru.extension.jit_build() (the cached JIT
build), so the two builds cannot drift apart.  Plain Python without imports of fusedgru.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import tempfile
from typing import Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))


def sources(with_cuda: bool) -> List[str]:
    """Absolute paths of the C++ (and CUDA) sources, sorted."""
    names = sorted(os.listdir(HERE))
    exts = (".cpp", ".cu") if with_cuda else (".cpp",)
    return [os.path.join(HERE, n) for n in names if n.endswith(exts)]


def _compiler_accepts(flag: str) -> bool:
    cxx = os.environ.get("CXX", "c++")
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "t.cpp")
        with open(src, "w") as f:
            f.write("int main() { return 0; }\n")
        try:
            r = subprocess.run([cxx, flag, src, "-o", os.path.join(d, "t")],
                               capture_output=True, timeout=60)
        except (OSError, subprocess.SubprocessError):
            return False
        return r.returncode == 0


def openmp_flags() -> List[str]:
    # at::parallel_for is an inline OpenMP region in ATen's headers: without -fopenmp in
    # the extension it silently runs on one thread.
    if sys.platform.startswith("linux") and _compiler_accepts("-fopenmp"):
        return ["-fopenmp"]
    return []


def simd_flags() -> List[str]:
    # at::vec picks its implementation at compile time.  ATen compiles its kernels once per
    # CPU capability; the extension compiles once, for AVX2+FMA on x86-64 (every GPU host
    # and CI runner of the last decade).  fusedgru.extension refuses to load the library on
    # an x86 CPU without AVX2 (torch reports capability DEFAULT there) instead of crashing.
    # FUSEDGRU_NO_AVX2=1 builds the portable (slower, at::vec DEFAULT) variant.
    if os.environ.get("FUSEDGRU_NO_AVX2") == "1":
        return []
    if platform.machine().lower() in ("x86_64", "amd64"):
        return ["-mavx2", "-mfma", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2",
                "-DFUSEDGRU_AVX2=1"]
    return []


def compile_args(with_cuda: bool) -> Dict[str, List[str]]:
    cxx = ["-O3"] + openmp_flags() + simd_flags()
    args = {"cxx": cxx}
    if with_cuda:
        # -Xptxas=-v: registers, shared memory, spills and stack of every kernel in the
        # build log; tests/test_extension_ptxas.py reads the same report.
        args["nvcc"] = ["-O3", "-Xptxas=-v", "-lineinfo", "--expt-relaxed-constexpr",
                        "-DFUSEDGRU_WITH_CUDA=1"]
        args["cxx"] = cxx + ["-DFUSEDGRU_WITH_CUDA=1"]
    return args


def link_args() -> List[str]:
    return openmp_flags()


def default_arch_list() -> None:
    """torch refuses to build CUDA code without a visible GPU unless the architectures are
    named: default to A100 + H100 so a plain `pip install` works on a CPU-only builder."""
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return
    try:
        import torch

        if torch.cuda.is_available():
            return
    except Exception:  # noqa: BLE001
        pass
    os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
