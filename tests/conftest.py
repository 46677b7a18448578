"""Test set-up shared by every test file.

Without a CUDA device the Triton kernels run on CPU tensors through Triton's interpreter,
which must be switched on before any @triton.jit function is defined, so before fusedgru's
kernels are imported: that is done here, first.
"""

import os
import zlib

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device (GPU script only)")


@pytest.fixture
def gen():
    """A seeded generator per test: inputs differ between tests, repeat between runs."""
    g = torch.Generator()
    g.manual_seed(zlib.crc32(os.environ.get("PYTEST_CURRENT_TEST", "").encode()))
    return g
