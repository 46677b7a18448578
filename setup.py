"""Build of fusedgru: the Python package, the Triton kernels (kernels/ installed as
fusedgru.kernels) and, where a compiler is found, the C++/CUDA extension fusedgru._C."""

import os
import re

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def read_version() -> str:
    with open(os.path.join(HERE, "fusedgru", "version.py")) as f:
        return re.search(r'__version__ = "([^"]+)"', f.read()).group(1)


setup(
    name="fusedgru",
    version=read_version(),
    description="A drop-in torch.nn.GRU whose recurrence runs in fused Triton and CUDA kernels",
    packages=["fusedgru", "fusedgru.kernels"],
    # kernels/ is also a PyPI package's name: install it under fusedgru, never top level.
    package_dir={"fusedgru": "fusedgru", "fusedgru.kernels": "kernels"},
    package_data={"fusedgru": ["data/*.txt"]},
    python_requires=">=3.10",
    install_requires=["torch>=2.11", "numpy"],
    extras_require={"test": ["pytest", "pytest-benchmark"], "bench": ["tqdm", "matplotlib"]},
    entry_points={"console_scripts": ["fusedgru = fusedgru.cli:main"]},
)
