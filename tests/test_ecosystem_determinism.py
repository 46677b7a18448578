"""torch.use_deterministic_algorithms(True): every backend available here gives
bitwise-identical outputs and gradients run to run, and a backend that declares itself
nondeterministic (``deterministic = False``, fusedgru/backends.py) raises as PyTorch's own
nondeterministic ops do (or warns in warn_only mode)."""

import pytest
import torch

from fusedgru import FusedGRU, backends
from fusedgru.testing import cpu_backend_dtypes

CPU_BACKENDS = [pytest.param(name, dtype, id=name) for name, dtype in cpu_backend_dtypes()]


@pytest.fixture
def deterministic():
    before = (torch.are_deterministic_algorithms_enabled(),
              torch.is_deterministic_algorithms_warn_only_enabled())
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before[0], warn_only=before[1])


def _train_step(backend, dtype, reset_after, gen_seed):
    """Outputs and every gradient of a 2-layer bidirectional model, from fixed seeds."""
    torch.manual_seed(0)
    m = FusedGRU(5, 9, num_layers=2, bidirectional=True, dtype=dtype, reset_after=reset_after,
                 backend=backend)
    g = torch.Generator().manual_seed(gen_seed)
    x = torch.randn(6, 4, 5, dtype=dtype, generator=g, requires_grad=True)
    h0 = torch.randn(4, 4, 9, dtype=dtype, generator=g, requires_grad=True)
    y, h_n = m(x, h0)
    (y.sin().sum() + h_n.cos().sum()).backward()
    return [y, h_n, x.grad, h0.grad] + [p.grad for p in m.parameters()]


@pytest.mark.parametrize("backend,dtype", CPU_BACKENDS)
@pytest.mark.parametrize("reset_after", [True, False], ids=["after", "before"])
def test_bitwise_reproducible(backend, dtype, reset_after, deterministic):
    a = _train_step(backend, dtype, reset_after, 1)
    b = _train_step(backend, dtype, reset_after, 1)
    assert all(torch.equal(u, v) for u, v in zip(a, b))


class _Nondeterministic:
    """A backend row whose kernels cannot promise reproducibility (the reference's ops,
    declared nondeterministic)."""

    deterministic = False

    def __init__(self):
        ref = backends.get_backend("reference")
        self.forward, self.backward = ref.forward, ref.backward

    @staticmethod
    def unavailable_reason():
        return None

    @staticmethod
    def unsupported_reason(device_type, dtype):
        return None


@pytest.fixture
def nondeterministic_backend(install_backend):
    return install_backend("nondet", _Nondeterministic(),
                           "a test backend declared nondeterministic")


def test_nondeterministic_backend_raises(nondeterministic_backend, deterministic):
    m = FusedGRU(3, 4, backend=nondeterministic_backend)
    with pytest.raises(RuntimeError, match="does not have a deterministic implementation"):
        m(torch.randn(2, 1, 3))


def test_nondeterministic_backend_warns_in_warn_only_mode(nondeterministic_backend):
    m = FusedGRU(3, 4, backend=nondeterministic_backend)
    x = torch.randn(2, 1, 3)
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        with pytest.warns(UserWarning, match="does not have a deterministic implementation"):
            y, _ = m(x)
    finally:
        torch.use_deterministic_algorithms(before)
    assert y.shape == (2, 1, 4)


def test_nondeterministic_backend_runs_when_not_asked(nondeterministic_backend):
    """Outside deterministic mode a nondeterministic backend runs, silently."""
    assert not torch.are_deterministic_algorithms_enabled()
    y, _ = FusedGRU(3, 4, backend=nondeterministic_backend)(torch.randn(2, 1, 3))
    assert y.shape == (2, 1, 4)


def test_check_survives_torch_compile(nondeterministic_backend):
    """Under torch.compile the check is traced with a guard on the mode: the same compiled
    module runs outside deterministic mode and raises inside it, warn_only or not (the
    warn_only query cannot be traced).  Dynamo only, backend="eager": the check is Python
    above the ops."""
    torch._dynamo.reset()
    m = torch.compile(FusedGRU(3, 4, backend=nondeterministic_backend), backend="eager",
                      fullgraph=True)
    x = torch.randn(2, 1, 3)
    assert m(x)[0].shape == (2, 1, 4)
    torch.use_deterministic_algorithms(True)
    try:
        with pytest.raises(RuntimeError, match="does not have a deterministic implementation"):
            m(x)
    finally:
        torch.use_deterministic_algorithms(False)
