"""Build of fusedgru: the Python package, the Triton kernels (kernels/ installed as
fusedgru.kernels) and, where a compiler is found, the C++/CUDA extension fusedgru._C.

The extension:
- CUDAExtension (csrc/*.cpp + csrc/*.cu) when torch has CUDA and nvcc is found (no GPU
  needed; TORCH_CUDA_ARCH_LIST defaults to "8.0;9.0" when unset and no GPU is visible);
- CppExtension (csrc/*.cpp) when torch is CPU-only or nvcc is missing;
- nothing when FUSEDGRU_NO_EXT=1 (the package still works: reference and Triton backends).
Flags live in csrc/build_config.py, shared with fusedgru.extension.jit_build().
"""

import importlib.util
import os
import re
import shutil

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def read_version() -> str:
    with open(os.path.join(HERE, "fusedgru", "version.py")) as f:
        return re.search(r'__version__ = "([^"]+)"', f.read()).group(1)


def load_build_config():
    spec = importlib.util.spec_from_file_location(
        "fusedgru_build_config", os.path.join(HERE, "csrc", "build_config.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def extension_modules():
    """([extension], cmdclass) for this machine, or ([], {}) when none is to be built."""
    if os.environ.get("FUSEDGRU_NO_EXT") == "1":
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        print("fusedgru: torch is not importable, building without the extension")
        return [], {}
    cfg = load_build_config()
    cuda_home = cpp_extension.CUDA_HOME
    nvcc = os.path.join(cuda_home, "bin", "nvcc") if cuda_home else None
    with_cuda = (torch.version.cuda is not None and nvcc is not None
                 and (os.path.exists(nvcc) or shutil.which("nvcc") is not None))
    if with_cuda:
        cfg.default_arch_list()
    srcs = [os.path.relpath(p, HERE) for p in cfg.sources(with_cuda)]
    kind = cpp_extension.CUDAExtension if with_cuda else cpp_extension.CppExtension
    ext = kind(
        "fusedgru._C",
        srcs,
        include_dirs=[os.path.join(HERE, "csrc")],
        extra_compile_args=cfg.compile_args(with_cuda),
        extra_link_args=cfg.link_args(),
    )
    print(f"fusedgru: building fusedgru._C as a {kind.__name__} from {len(srcs)} sources")
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extension_modules()

setup(
    name="fusedgru",
    version=read_version(),
    description="A drop-in torch.nn.GRU whose recurrence runs in fused Triton and CUDA kernels",
    packages=["fusedgru", "fusedgru.bench", "fusedgru.kernels"],
    # kernels/ is also a PyPI package's name: install it under fusedgru, never top level.
    package_dir={"fusedgru": "fusedgru", "fusedgru.kernels": "kernels"},
    package_data={"fusedgru": ["data/*.txt"]},
    python_requires=">=3.10",
    install_requires=["torch>=2.11", "numpy"],
    # onnx, onnxruntime and onnxscript: the ONNX export tests (the default exporter needs
    # onnxscript) and the ONNX Runtime comparison; torchrl: its GRUModule's is_init resets
    # checked equal to fusedgru's, and its rollout backends in the benchmark (issue 19).
    extras_require={"test": ["pytest", "pytest-benchmark", "onnx", "onnxruntime", "onnxscript",
                             "torchrl"],
                    "bench": ["tqdm", "matplotlib"]},
    entry_points={"console_scripts": ["fusedgru = fusedgru.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
