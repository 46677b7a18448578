"""FusedGRU / FusedGRUCell module semantics against torch.nn.GRU / nn.GRUCell (float64),
for every CPU backend available here, plus state dicts, from_torch/to_torch and edge cases."""

import itertools

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import fusedgru
from fusedgru import FusedGRU, FusedGRUCell, reference
from fusedgru.testing import rel_err

F64 = torch.float64
# CPU backends this machine has (the Triton one runs through its interpreter: slow, so its
# module-level parity lives in tests/test_triton.py on smaller cases).
CPU_BACKENDS = [b for b in fusedgru.available_backends() if b in ("reference", "cpu")]

CONFIGS = [  # (num_layers, bidirectional, batch_first, bias)
    (1, False, False, True),
    (1, True, True, False),
    (2, False, True, True),
    (2, True, False, True),
    (3, True, True, True),
    (3, False, False, False),
]


def _pair(backend, I, H, num_layers=1, bidirectional=False, batch_first=False, bias=True,
          dropout=0.0, dtype=F64):
    g = torch.nn.GRU(I, H, num_layers, bias, batch_first, dropout, bidirectional, dtype=dtype)
    return g, FusedGRU.from_torch(g, backend=backend)


def _grads(module, out, h_n, gy, gh, inputs):
    """Backward of a random linear functional of both outputs: grads of params + inputs."""
    params = list(module.parameters()) + inputs
    return torch.autograd.grad((out * gy).sum() + (h_n * gh).sum(), params)


def _assert_close(a, b, what, tol=1e-12):
    err = rel_err(a, b)
    assert err < tol, f"{what}: rel err {err:.3g}"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("num_layers,bidirectional,batch_first,bias", CONFIGS)
@pytest.mark.parametrize("with_h0", [True, False])
def test_matches_nn_gru(backend, num_layers, bidirectional, batch_first, bias, with_h0, gen):
    T, B, I, H = 5, 3, 4, 7
    g, f = _pair(backend, I, H, num_layers, bidirectional, batch_first, bias)
    D = 2 if bidirectional else 1
    x = torch.randn((B, T, I) if batch_first else (T, B, I), dtype=F64, generator=gen)
    h0 = torch.randn(num_layers * D, B, H, dtype=F64, generator=gen) if with_h0 else None
    xs = [x.clone().requires_grad_() for _ in range(2)]
    hs = [h0.clone().requires_grad_() if with_h0 else None for _ in range(2)]
    (yo, ho), (yf, hf) = g(xs[0], hs[0]), f(xs[1], hs[1])
    _assert_close(yf, yo, "output")
    _assert_close(hf, ho, "h_n")
    gy, gh = torch.randn_like(yo), torch.randn_like(ho)
    ga = _grads(g, yo, ho, gy, gh, [xs[0]] + ([hs[0]] if with_h0 else []))
    gb = _grads(f, yf, hf, gy, gh, [xs[1]] + ([hs[1]] if with_h0 else []))
    names = [n for n, _ in g.named_parameters()] + ["input", "h0"]
    for name, a, b in zip(names, ga, gb):
        _assert_close(b, a, f"grad {name}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("enforce_sorted", [True, False])
def test_packed_sequence(backend, bidirectional, enforce_sorted, gen):
    T, I, H, L = 6, 3, 5, 2
    lengths = torch.tensor([6, 4, 4, 1, 3])
    if enforce_sorted:
        lengths = lengths.sort(descending=True).values
    B = len(lengths)
    g, f = _pair(backend, I, H, L, bidirectional, batch_first=True)
    x = torch.randn(B, T, I, dtype=F64, generator=gen)
    h0 = torch.randn(L * (2 if bidirectional else 1), B, H, dtype=F64, generator=gen)
    xs = [x.clone().requires_grad_() for _ in range(2)]
    outs = []
    for module, xi in zip((g, f), xs):
        packed = pack_padded_sequence(xi, lengths, batch_first=True, enforce_sorted=enforce_sorted)
        out, h_n = module(packed, h0)
        assert isinstance(out, torch.nn.utils.rnn.PackedSequence)
        outs.append((out, h_n))
    (po, ho), (pf, hf) = outs
    assert torch.equal(pf.batch_sizes, po.batch_sizes)
    for a, b in ((pf.sorted_indices, po.sorted_indices), (pf.unsorted_indices, po.unsorted_indices)):
        assert (a is None and b is None) or torch.equal(a, b)
    _assert_close(pf.data, po.data, "packed output")
    _assert_close(hf, ho, "h_n")
    yf, lf = pad_packed_sequence(pf, batch_first=True)
    assert torch.equal(lf, lengths)
    gy = torch.randn(po.data.shape, dtype=F64, generator=gen)
    gh = torch.randn(ho.shape, dtype=F64, generator=gen)
    for (p, h), xi in zip(outs, xs):
        ((p.data * gy).sum() + (h * gh).sum()).backward()
    _assert_close(xs[1].grad, xs[0].grad, "grad input")
    for (n, a), b in zip(g.named_parameters(), f.parameters()):
        _assert_close(b.grad, a.grad, f"grad {n}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("with_h0", [True, False])
def test_unbatched(backend, with_h0, gen):
    g, f = _pair(backend, 3, 4, 2, bidirectional=True)
    x = torch.randn(5, 3, dtype=F64, generator=gen)
    h0 = torch.randn(4, 4, dtype=F64, generator=gen) if with_h0 else None
    (yo, ho), (yf, hf) = g(x, h0), f(x, h0)
    assert yf.shape == yo.shape == (5, 8) and hf.shape == ho.shape == (4, 4)
    _assert_close(yf, yo, "output")
    _assert_close(hf, ho, "h_n")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_dropout_train_and_eval(backend, gen):
    g, f = _pair(backend, 4, 6, 3, dropout=0.5)
    x = torch.randn(7, 2, 4, dtype=F64, generator=gen)
    # Eval: dropout off, exactly nn.GRU.
    g.eval(), f.eval()
    _assert_close(f(x)[0], g(x)[0], "eval output")
    # Train: dropout is applied (outputs change) and draws the very masks nn.GRU draws on
    # the CPU (F.dropout on each layer's output in the same order).
    g.train(), f.train()
    torch.manual_seed(123)
    yo = g(x)[0]
    torch.manual_seed(123)
    yf = f(x)[0]
    _assert_close(yf, yo, "train output with the same seed")
    f.eval()
    assert rel_err(f(x)[0], yf) > 1e-3, "dropout had no effect in training mode"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("reset_after", [True, False])
def test_gradcheck(backend, reset_after, gen):
    for (T, B, I, H, L, bidi) in [(3, 2, 3, 4, 1, False), (2, 3, 2, 3, 2, True)]:
        f = FusedGRU(I, H, L, bidirectional=bidi, dtype=F64, reset_after=reset_after,
                     backend=backend)
        D = 2 if bidi else 1
        x = torch.randn(T, B, I, dtype=F64, generator=gen, requires_grad=True)
        h0 = torch.randn(L * D, B, H, dtype=F64, generator=gen, requires_grad=True)
        params = list(f.parameters())

        def fn(x, h0, *ps):
            out, h_n = torch.func.functional_call(
                f, dict(zip([n for n, _ in f.named_parameters()], ps)), (x, h0))
            return out, h_n

        assert torch.autograd.gradcheck(fn, (x, h0, *params))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_reset_before_matches_textbook_scratch(backend, gen):
    T, B, I, H = 6, 3, 5, 7
    f = FusedGRU(I, H, dtype=F64, reset_after=False, backend=backend)
    x = torch.randn(T, B, I, dtype=F64, generator=gen)
    h0 = torch.randn(1, B, H, dtype=F64, generator=gen)
    params = reference.scratch_params_from_torch(f.weight_ih_l0, f.weight_hh_l0, f.bias_ih_l0,
                                                 f.bias_hh_l0)
    ys, (h_T,) = reference.gru_scratch(x, (h0[0],), params)
    y, h_n = f(x, h0)
    _assert_close(y, ys, "output")
    _assert_close(h_n[0], h_T, "h_n")
    g_fused = torch.autograd.grad(y.sum(), list(f.parameters()))
    g_scratch = torch.autograd.grad(ys.sum(), [f.weight_ih_l0, f.weight_hh_l0])
    _assert_close(g_fused[0], g_scratch[0], "grad weight_ih")
    _assert_close(g_fused[1], g_scratch[1], "grad weight_hh")


def test_parameters_match_nn_gru():
    for L, bidi, bias in itertools.product([1, 3], [False, True], [False, True]):
        g = torch.nn.GRU(5, 6, L, bias=bias, bidirectional=bidi)
        f = FusedGRU(5, 6, L, bias=bias, bidirectional=bidi)
        assert [(n, p.shape) for n, p in g.named_parameters()] == \
            [(n, p.shape) for n, p in f.named_parameters()]
        bound = 1 / 6 ** 0.5
        assert all(p.abs().max() <= bound and p.std() > bound / 4 for p in f.parameters())


def test_state_dict_both_ways(gen):
    g = torch.nn.GRU(3, 4, 2, bidirectional=True, dtype=F64)
    f = FusedGRU(3, 4, 2, bidirectional=True, dtype=F64, backend="reference")
    f.load_state_dict(g.state_dict())
    x = torch.randn(5, 2, 3, dtype=F64, generator=gen)
    _assert_close(f(x)[0], g(x)[0], "after nn.GRU -> FusedGRU")
    f.reset_parameters()
    g.load_state_dict(f.state_dict())
    _assert_close(g(x)[0], f(x)[0], "after FusedGRU -> nn.GRU")
    # reset_after=False keeps nn.GRU's layout too (only where r is applied differs).
    f2 = FusedGRU(3, 4, 2, bidirectional=True, dtype=F64, reset_after=False)
    f2.load_state_dict(g.state_dict())
    g.load_state_dict(f2.state_dict())


def test_from_torch_to_torch(gen):
    g = torch.nn.GRU(3, 4, 2, batch_first=True, dropout=0.25, dtype=F64).eval()
    f = FusedGRU.from_torch(g, backend="reference")
    assert (f.num_layers, f.batch_first, f.dropout, f.training) == (2, True, 0.25, False)
    assert f.weight_hh_l1.dtype == F64
    back = f.to_torch()
    assert isinstance(back, torch.nn.GRU) and back.batch_first and back.dropout == 0.25
    x = torch.randn(2, 5, 3, dtype=F64, generator=gen)
    _assert_close(back(x)[0], g(x)[0], "round trip")
    with pytest.raises(ValueError, match="reset_after"):
        FusedGRU(3, 4, reset_after=False).to_torch()
    with pytest.raises(TypeError, match="gru: expected a torch.nn.GRU"):
        FusedGRU.from_torch(torch.nn.LSTM(3, 4))


def test_repr_names_formulation_and_backend():
    r = repr(FusedGRU(3, 4, 2, reset_after=False, backend="reference"))
    assert "reset_after=False" in r and "backend=reference" in r
    r = repr(FusedGRU(3, 4))
    assert "reset_after=True" in r and "backend=auto -> " in r


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("reset_after", [True, False])
def test_cell(backend, reset_after, gen):
    c = FusedGRUCell(5, 4, dtype=F64, reset_after=reset_after, backend=backend)
    x = torch.randn(3, 5, dtype=F64, generator=gen)
    h = torch.randn(3, 4, dtype=F64, generator=gen)
    # One cell step is a one-step GRU layer.
    y_ref, _ = reference.gru_layer_forward(x[None], h, c.weight_ih, c.weight_hh, c.bias_ih,
                                           c.bias_hh, reset_after=reset_after)
    _assert_close(c(x, h), y_ref[0], "cell step")
    _assert_close(c(x[1], h[1]), y_ref[0, 1], "unbatched cell step")
    if reset_after:
        tc = torch.nn.GRUCell(5, 4, dtype=F64)
        tc.load_state_dict(c.state_dict())
        _assert_close(c(x, h), tc(x, h), "vs nn.GRUCell")
        _assert_close(c(x), tc(x), "vs nn.GRUCell, no hx")
        _assert_close(c(x[0]), tc(x[0]), "vs nn.GRUCell, unbatched, no hx")
        gx = torch.autograd.grad(c(x, h).sum(), [c.weight_hh])[0]
        _assert_close(gx, torch.autograd.grad(tc(x, h).sum(), [tc.weight_hh])[0], "cell grad")


def test_cell_state_dict_matches_nn_grucell():
    tc = torch.nn.GRUCell(5, 4, bias=False)
    c = FusedGRUCell(5, 4, bias=False)
    assert [(n, p.shape) for n, p in tc.named_parameters()] == \
        [(n, p.shape) for n, p in c.named_parameters()]
    c.load_state_dict(tc.state_dict())


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_empty_batch(backend):
    g, f = _pair(backend, 3, 4, 2, bidirectional=True)
    x = torch.randn(5, 0, 3, dtype=F64)
    (yo, ho), (yf, hf) = g(x), f(x)
    assert yf.shape == yo.shape and hf.shape == ho.shape


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_nan_propagates_like_nn_gru(backend, gen):
    g, f = _pair(backend, 3, 4, 2)
    x = torch.randn(6, 3, 3, dtype=F64, generator=gen)
    x[2, 1, 0] = float("nan")
    (yo, ho), (yf, hf) = g(x), f(x)
    assert torch.equal(yf.isnan(), yo.isnan()) and torch.equal(hf.isnan(), ho.isnan())
    assert yf[2:, 1].isnan().all() and not yf[:, 0].isnan().any()
    _assert_close(yf, yo, "finite part")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_non_contiguous_input(backend, gen):
    g, f = _pair(backend, 3, 4, 2, batch_first=True)
    x = torch.randn(5, 3, 6, dtype=F64, generator=gen)[:, :, ::2].transpose(0, 1)
    h0 = torch.randn(3, 2, 4, dtype=F64, generator=gen).transpose(0, 1)
    assert not x.is_contiguous() and not h0.is_contiguous()
    _assert_close(f(x, h0)[0], g(x, h0)[0], "non-contiguous")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("reset_after", [True, False])
def test_float32_within_spec_budget(backend, reset_after, gen):
    """float32 against the float64 oracle, budget 2 x the reference's own float32 error."""
    T, B, I, H = 7, 5, 6, 17
    f64 = FusedGRU(I, H, 2, bidirectional=True, dtype=F64, reset_after=reset_after,
                   backend="reference")
    f32 = FusedGRU(I, H, 2, bidirectional=True, reset_after=reset_after, backend=backend)
    r32 = FusedGRU(I, H, 2, bidirectional=True, reset_after=reset_after, backend="reference")
    f32.load_state_dict(f64.state_dict())
    r32.load_state_dict(f64.state_dict())
    x = torch.randn(T, B, I, dtype=F64, generator=gen)
    y64 = f64(x)[0]
    g64 = torch.autograd.grad(y64.sum(), list(f64.parameters()))
    for what, got, base in [("output", f32(x.float())[0], r32(x.float())[0])]:
        assert rel_err(got, y64) <= 2 * rel_err(base, y64) + 1e-6, what
    gf = torch.autograd.grad(f32(x.float())[0].sum(), list(f32.parameters()))
    gr = torch.autograd.grad(r32(x.float())[0].sum(), list(r32.parameters()))
    for k, (a, b, c) in enumerate(zip(gf, gr, g64)):
        assert rel_err(a, c) <= 2 * rel_err(b, c) + 1e-6, f"grad {k}"


@pytest.mark.parametrize("enforce_sorted", [False, True], ids=["unsorted", "sorted"])
def test_packing_ops_match_torch_and_are_each_others_gradient(enforce_sorted, gen):
    """fusedgru.packing (the compile-friendly pad/pack pair) against torch.nn.utils.rnn, and
    gradcheck of both directions in float64."""
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

    from fusedgru import packing

    lengths = torch.tensor([5, 3, 3, 1] if enforce_sorted else [3, 5, 1, 3])
    x = torch.randn(5, 4, 2, dtype=torch.float64, generator=gen)
    packed = pack_padded_sequence(x, lengths, enforce_sorted=enforce_sorted)
    padded, got_lengths = packing.to_padded(packed)
    want, want_lengths = pad_packed_sequence(packed)
    assert torch.equal(padded, want) and torch.equal(got_lengths, want_lengths)
    repacked = packing.to_packed(padded, like=packed)
    assert torch.equal(repacked.data, packed.data)
    assert repacked.sorted_indices is packed.sorted_indices
    data = packed.data.detach().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda d: packing.to_padded(packed._replace(data=d))[0], (data,))
    padded = padded.detach().requires_grad_()
    assert torch.autograd.gradcheck(lambda p: packing.to_packed(p, like=packed).data, (padded,))
