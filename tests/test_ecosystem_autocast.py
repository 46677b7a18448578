"""FusedGRU under torch.autocast on the CPU returns what torch.nn.GRU returns under the same
autocast: the same dtypes, values within SPEC section 5's budget against the float64 oracle,
float32 gradients for float32 parameters.  The CUDA dtypes (float16, bfloat16) are in
tests/test_ecosystem_gpu.py; the lower-precision path they take is also checked here on the
CPU, through the reference backend."""

import pytest
import torch

import fusedgru
from fusedgru import FusedGRU, backends, functional
from fusedgru.testing import BAND, budget, rel_err

F64, BF16 = torch.float64, torch.bfloat16
CPU_FP32_BACKENDS = [b for b in fusedgru.available_backends()
                     if backends.get_backend(b).unsupported_reason("cpu", torch.float32) is None]


def _run(module, x, h0, autocast):
    """Output, h_n and the gradients of a fixed functional (params, then x, then h0)."""
    x = x.detach().requires_grad_()
    h0 = h0.detach().requires_grad_()
    with torch.autocast("cpu", dtype=BF16, enabled=autocast):
        y, h_n = module(x, h0)
    gy = torch.linspace(-1, 1, y.numel(), dtype=F64).view(y.shape)
    ((y.double() * gy).sum() + h_n.double().sum()).backward()
    grads = [p.grad for p in module.parameters()] + [x.grad, h0.grad]
    module.zero_grad(set_to_none=True)
    return y, h_n, grads


def _setup(gen, T=7, B=3, I=5, H=17):
    g = torch.nn.GRU(I, H, num_layers=2, bidirectional=True)
    x = torch.randn(T, B, I, generator=gen)
    h0 = torch.randn(4, B, H, generator=gen) * 0.5
    g64 = torch.nn.GRU(I, H, num_layers=2, bidirectional=True, dtype=F64)
    g64.load_state_dict(g.state_dict())
    return g, g64, x, h0


def _check_against_nn_gru(fused, g, g64, x, h0, x_dtype):
    """fused and g under CPU autocast; g64 (no autocast, float64) is the oracle."""
    y_t, h_t, gr_t = _run(g, x.to(x_dtype), h0, True)
    y_f, h_f, gr_f = _run(fused, x.to(x_dtype), h0, True)
    y_o, h_o, gr_o = _run(g64, x.to(x_dtype).double(), h0.double(), False)
    for p in fused.parameters():
        assert p.dtype == torch.float32
    assert gr_f[-2].dtype == x_dtype and gr_f[-1].dtype == torch.float32
    assert all(a.dtype == b.dtype for a, b in zip(gr_f, gr_t))
    for name, got, theirs, oracle in [("output", y_f, y_t, y_o), ("h_n", h_f, h_t, h_o)] + [
            (f"grad {i}", a, b, c) for i, (a, b, c) in enumerate(zip(gr_f, gr_t, gr_o))]:
        assert got.dtype == theirs.dtype, name
        err, allowed = rel_err(got, oracle), budget(BF16, rel_err(theirs, oracle))
        assert err <= allowed, f"{name}: err {err:.3g} > budget {allowed:.3g}"
    return y_f


@pytest.mark.parametrize("backend", CPU_FP32_BACKENDS)
@pytest.mark.parametrize("x_dtype", [torch.float32, BF16], ids=["x_fp32", "x_bf16"])
def test_cpu_autocast_matches_nn_gru(backend, x_dtype, gen):
    """A float32 model under CPU autocast: nn.GRU returns float32 (its matmuls run in
    bfloat16, its state in float32), from float32 or bfloat16 input (an autocast Linear
    before it gives bfloat16)."""
    g, g64, x, h0 = _setup(gen, T=3 if backend == "triton" else 7)
    fused = FusedGRU.from_torch(g, backend=backend)
    y = _check_against_nn_gru(fused, g, g64, x, h0, x_dtype)
    assert y.dtype == torch.float32


def test_lower_precision_policy_on_cpu(monkeypatch, gen):
    """The path CUDA autocast takes (compute in the autocast dtype), run on the CPU by the
    reference backend: output and h_n in bfloat16, float32 gradients for the float32
    parameters, values within the bfloat16 budget of nn.GRU's autocast run."""
    monkeypatch.setattr(functional, "_AUTOCAST_FLOAT32_DEVICES", ())
    g, g64, x, h0 = _setup(gen)
    fused = FusedGRU.from_torch(g, backend="reference")
    y_f, h_f, gr_f = _run(fused, x, h0, True)
    assert y_f.dtype == BF16 and h_f.dtype == BF16
    assert [t.dtype for t in gr_f] == [torch.float32] * len(gr_f)
    y_t, h_t, gr_t = _run(g, x, h0, True)
    y_o, h_o, gr_o = _run(g64, x.double(), h0.double(), False)
    for name, got, theirs, oracle in [("output", y_f, y_t, y_o), ("h_n", h_f, h_t, h_o)] + [
            (f"grad {i}", a, b, c) for i, (a, b, c) in enumerate(zip(gr_f, gr_t, gr_o))]:
        err, allowed = rel_err(got, oracle), budget(BF16, rel_err(theirs, oracle))
        assert err <= allowed, f"{name}: err {err:.3g} > budget {allowed:.3g}"
    # The computation really ran in bfloat16: far from the float32 result, unlike nn.GRU's
    # (whose state stays float32), but within the band.
    y32, _, _ = _run(fused, x, h0, False)
    assert 1e-4 < rel_err(y_f, y32) < BAND[BF16]


def test_float64_untouched_by_autocast(gen):
    """Autocast leaves float64 alone, for nn.GRU and for FusedGRU: bitwise the same result."""
    fused = FusedGRU(4, 6, dtype=F64)
    x = torch.randn(5, 2, 4, dtype=F64, generator=gen)
    h0 = torch.randn(1, 2, 6, dtype=F64, generator=gen)
    y0, h0_, g0 = _run(fused, x, h0, False)
    y1, h1, g1 = _run(fused, x, h0, True)
    assert y1.dtype == F64 and torch.equal(y0, y1) and torch.equal(h0_, h1)
    assert all(torch.equal(a, b) for a, b in zip(g0, g1))
