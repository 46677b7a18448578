"""torch.func over a model holding FusedGRU, for every backend that runs CPU tensors here:
grad, vjp and jacrev give what they give with nn.GRU; vmap (which nn.GRU does not support:
"Batching rule not implemented for aten::gru.input") gives what a loop over nn.GRU gives,
through fusedgru's own batching rules (vmap's slow fallback is switched off, so a missing
rule fails the test instead of warning); per-sample gradients (vmap of grad), model
ensembles (vmap over stacked parameters) and grad of grad too."""

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, jacrev, stack_module_state, vjp, vmap

from fusedgru import FusedGRU
from fusedgru.testing import cpu_backend_dtypes

BACKENDS = [pytest.param(name, dtype, id=name) for name, dtype in cpu_backend_dtypes()]
TOL = {torch.float64: dict(rtol=1e-9, atol=1e-10), torch.float32: dict(rtol=1e-4, atol=1e-5)}


@pytest.fixture(autouse=True)
def no_vmap_fallback():
    torch._C._functorch._set_vmap_fallback_enabled(False)
    yield
    torch._C._functorch._set_vmap_fallback_enabled(True)


def _pair(backend, dtype, seed=0, **kwargs):
    torch.manual_seed(seed)
    t = nn.GRU(4, 5, num_layers=2, dtype=dtype, **kwargs)
    f = FusedGRU(4, 5, num_layers=2, dtype=dtype, backend=backend, **kwargs)
    f.load_state_dict(t.state_dict())
    return t, f


def _close(got, want, dtype):
    if isinstance(want, dict):
        assert got.keys() == want.keys()
        for k in want:
            torch.testing.assert_close(got[k], want[k], **TOL[dtype], msg=k)
    else:
        torch.testing.assert_close(got, want, **TOL[dtype])


def _loss(module):
    return lambda p, x, h: functional_call(module, p, (x, h))[0].pow(2).sum()


@pytest.mark.parametrize("backend,dtype", BACKENDS)
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
def test_grad_vjp_jacrev_match_nn_gru(backend, dtype, bidirectional, gen):
    t, f = _pair(backend, dtype, bidirectional=bidirectional)
    D = 2 if bidirectional else 1
    x = torch.randn(3, 2, 4, dtype=dtype, generator=gen)
    h = torch.randn(2 * D, 2, 5, dtype=dtype, generator=gen)
    pt, pf = dict(t.named_parameters()), dict(f.named_parameters())
    _close(grad(_loss(f), argnums=(0, 1, 2))(pf, x, h),
           grad(_loss(t), argnums=(0, 1, 2))(pt, x, h), dtype)

    v = torch.randn(3, 2, 5 * D, dtype=dtype, generator=gen)
    _, vjp_t = vjp(lambda xx, hh: t(xx, hh)[0], x, h)
    _, vjp_f = vjp(lambda xx, hh: f(xx, hh)[0], x, h)
    _close(vjp_f(v), vjp_t(v), dtype)

    _close(jacrev(lambda xx: f(xx, h)[1])(x), jacrev(lambda xx: t(xx, h)[1])(x), dtype)


@pytest.mark.parametrize("backend,dtype", BACKENDS)
def test_vmap_over_inputs_states_and_parameters(backend, dtype, gen):
    t, f = _pair(backend, dtype, batch_first=True)
    xs = torch.randn(4, 2, 3, 4, dtype=dtype, generator=gen)   # 4 instances of (B, T, I)
    hs = torch.randn(4, 2, 2, 5, dtype=dtype, generator=gen)
    with torch.no_grad():  # the inference op's rule
        _close(vmap(lambda xx: f(xx)[0])(xs), torch.stack([t(xx)[0] for xx in xs]), dtype)
    # grad mode on: the differentiable path's rule; x and h vmapped, x alone, h alone
    _close(vmap(lambda xx, hh: f(xx, hh)[1])(xs, hs),
           torch.stack([t(xx, hh)[1] for xx, hh in zip(xs, hs)]), dtype)
    _close(vmap(lambda hh: f(xs[0], hh)[0])(hs), torch.stack([t(xs[0], hh)[0] for hh in hs]), dtype)
    # an ensemble: the weights vmapped too
    ts = [_pair(backend, dtype, seed=k, batch_first=True)[0] for k in range(3)]
    fs = [_pair(backend, dtype, seed=k, batch_first=True)[1] for k in range(3)]
    params, _ = stack_module_state(fs)
    _close(vmap(lambda p: functional_call(f, p, (xs[0],))[0])(params),
           torch.stack([m(xs[0])[0] for m in ts]), dtype)


@pytest.mark.parametrize("backend,dtype", BACKENDS)
def test_per_sample_gradients_and_grad_of_grad(backend, dtype, gen):
    t, f = _pair(backend, dtype)
    x = torch.randn(3, 4, 4, dtype=dtype, generator=gen)  # (T, B, I)
    pt, pf = dict(t.named_parameters()), dict(f.named_parameters())

    def sample_loss(module):
        return lambda p, xb: functional_call(module, p, (xb.unsqueeze(1),))[0].pow(2).sum()

    per_sample = vmap(grad(sample_loss(f)), in_dims=(None, 1))(pf, x)
    loop = [grad(sample_loss(t))(pt, x[:, b]) for b in range(x.shape[1])]
    _close(per_sample, {k: torch.stack([g[k] for g in loop]) for k in pt}, dtype)

    def input_grad_norm(module):
        def fn(p, xx):
            gx = grad(lambda xi: functional_call(module, p, (xi,))[0].pow(2).sum())(xx)
            return gx.pow(2).sum()
        return fn

    _close(grad(input_grad_norm(f))(pf, x), grad(input_grad_norm(t))(pt, x), dtype)


def test_vmap_results_flow_into_ordinary_autograd(gen):
    f = FusedGRU(4, 5, dtype=torch.float64, backend="reference")
    fs = [FusedGRU(4, 5, dtype=torch.float64, backend="reference") for _ in range(3)]
    params, _ = stack_module_state(fs)
    x = torch.randn(3, 2, 4, dtype=torch.float64, generator=gen)
    vmap(lambda p: functional_call(f, p, (x,))[0])(params).sum().backward()
    for k, m in enumerate(fs):
        m(x)[0].sum().backward()
        torch.testing.assert_close(params["weight_hh_l0"].grad[k], m.weight_hh_l0.grad)
