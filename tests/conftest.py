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

# The GPU tests' parametrisation is cut to what a first contact with a GPU needs (every
# code path and precision once, odd sizes: benchmarks/NOTES-gpu-run.md); the rest of the
# sweep carries the mark "exhaustive" and runs only with --gpu-exhaustive.


def pytest_addoption(parser):
    parser.addoption("--gpu-exhaustive", action="store_true", default=False,
                     help="run the GPU tests' whole parametrisation (default: the subset "
                          "benchmarks/gpu_run.sh runs in its first minutes)")


def pytest_configure(config):
    config.addinivalue_line("markers", "exhaustive: part of the full GPU sweep, run only "
                                       "with --gpu-exhaustive")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--gpu-exhaustive", default=False):
        return
    skip = pytest.mark.skip(reason="exhaustive GPU sweep: run with --gpu-exhaustive")
    for item in items:
        if "exhaustive" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def gen():
    """A seeded generator per test: inputs differ between tests, repeat between runs."""
    g = torch.Generator()
    g.manual_seed(zlib.crc32(os.environ.get("PYTEST_CURRENT_TEST", "").encode()))
    return g


def _poisoned_run(case, config, device, dtype=torch.float32, keep_ws=True):
    """Runs the Triton launchers (kernels/gru.py) of ``case`` with ``config`` on NaN-filled
    output buffers: (y, ws, dgi, dgh, dh0).  keep_ws=False: the inference forward only
    (ws=None, no backward), the other four None."""
    from fusedgru import reference
    from fusedgru.kernels import gru

    x, h0, w_ih, w_hh, b_ih, b_hh = case.args(device, dtype)
    T, B, _ = x.shape
    H = w_hh.shape[1]
    gi = reference._input_projection(x, w_ih, b_ih).contiguous()
    b = b_hh if b_hh is not None else w_hh.new_zeros(3 * H)

    def poisoned(*shape):
        return torch.full(shape, float("nan"), device=device, dtype=dtype)

    y = poisoned(T, B, H)
    ws = poisoned(T, B, 4 * H) if keep_ws else None
    gru.launch_forward(gi, h0, w_hh, b, y, ws, case.reset_after, config)
    if not keep_ws:
        return y, None, None, None, None
    dgi, dgh, dh0 = poisoned(T, B, 3 * H), poisoned(T, B, 3 * H), poisoned(B, H)
    gy = case.grad_y.to(device, dtype)
    gru.launch_backward(gy, h0, w_hh, y, ws, dgi, dgh, dh0, case.reset_after, config)
    return y, ws, dgi, dgh, dh0


@pytest.fixture
def poisoned_run():
    """The Triton launchers on NaN-poisoned outputs (see _poisoned_run)."""
    return _poisoned_run


@pytest.fixture
def install_backend(monkeypatch):
    """install(name, impl, summary, cpu_auto_order=None): a test-only row of the backend
    table (fusedgru/backends.py), optionally as auto's CPU order; undone after the test."""
    from fusedgru import backends

    def install(name, impl, summary, cpu_auto_order=None):
        monkeypatch.setitem(backends.BACKENDS, name,
                            backends.Backend(name, "tests:" + name, summary, "tests only"))
        monkeypatch.setitem(backends._loaded, name, impl)
        if cpu_auto_order is not None:
            monkeypatch.setitem(backends.AUTO_ORDER, "cpu", cpu_auto_order)
        return name

    return install
