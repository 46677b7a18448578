"""Sequence structure inside the kernels (docs/SPEC.md section 3): packed batches computed
on their active rows only, and state resets inside a sequence.

Every backend that runs here (reference and cpu in float64, triton in the interpreter in
float32; cuda when a GPU is present) is checked

- at the op level, with batch_sizes / resets, on poisoned outputs, against the float64
  reference within SPEC's budget (fusedgru.testing.check_layer);
- end to end: a PackedSequence against torch.nn.GRU and against each sequence run alone;
  resets against a Python loop over nn.GRUCell (or the textbook cell for
  reset_after=False) that zeroes the state where a reset is set, outputs, h_n and every
  gradient;
- with gradcheck in float64 where the backend takes float64.
"""

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

import fusedgru
from fusedgru import FusedGRU, backends
from fusedgru.errors import DTypeError, NotATensorError, ShapeError
from fusedgru.functional import gru
from fusedgru.testing import BAND, OpLog, check_layer, make_layer_case, rel_err

HAS_CUDA = torch.cuda.is_available()

F64 = torch.float64


def _backend_cases():
    """(backend, device, dtype) for every backend that runs here, most precise dtype."""
    out = []
    for name in backends.available_backends():
        impl = backends.get_backend(name)
        for device in (["cpu"] + (["cuda"] if HAS_CUDA else [])):
            dtype = next((d for d in (F64, torch.float32)
                          if impl.unsupported_reason(device, d) is None), None)
            if dtype is not None:
                out.append(pytest.param(name, device, dtype, id=f"{name}-{device}-"
                                        f"{str(dtype).replace('torch.', '')}"))
    return out


BACKENDS = _backend_cases()


def _tol(dtype):
    """A relative tolerance for whole-model comparisons against float64 torch: the float32
    band of SPEC, widened for the depth of these models (2 layers, both directions)."""
    return 1e-10 if dtype == F64 else 1e-4


@pytest.fixture
def poisoned():
    """The extension's ops fill their outputs with NaN before computing (an unwritten
    element fails every comparison); a no-op without the extension."""
    try:
        prev = torch.ops.fusedgru._set_poison(True)
    except (AttributeError, RuntimeError):
        yield
        return
    yield
    torch.ops.fusedgru._set_poison(prev)


# ----------------------------------------------------------------------------------------
# The ops
# ----------------------------------------------------------------------------------------

LENGTHS = {
    "skewed": [9, 2, 2, 1, 1],  # one long sequence, short ones, ties, length 1
    "equal": [4, 4, 4],  # packed but dense
    "one": [6],  # a single sequence
}


@pytest.mark.parametrize("reset_after", [True, False])
@pytest.mark.parametrize("lengths", list(LENGTHS), ids=list(LENGTHS))
@pytest.mark.parametrize("backend, device, dtype", BACKENDS)
def test_ops_packed_match_the_reference(backend, device, dtype, lengths, reset_after, gen,
                                        poisoned):
    lengths = LENGTHS[lengths]
    case = make_layer_case(lengths[0], len(lengths), 5, 17, reset_after=reset_after,
                           generator=gen, lengths=lengths)
    report = check_layer(backend, case, device=device, dtype=dtype)
    assert report.ok, report.failures


def _random_resets(T, B, gen, p=0.3):
    r = torch.rand(T, B, generator=gen) < p
    r[0, 0] = True  # a reset at t = 0: hx never enters that row
    r[T - 1, B - 1] = True  # at the last step
    r[:, 1 % B] = True  # every step of one row restarts
    return r


@pytest.mark.parametrize("reset_after", [True, False])
@pytest.mark.parametrize("with_h0", [True, False])
@pytest.mark.parametrize("backend, device, dtype", BACKENDS)
def test_ops_resets_match_the_reference(backend, device, dtype, with_h0, reset_after, gen,
                                        poisoned):
    T, B = 7, 3
    case = make_layer_case(T, B, 5, 17, reset_after=reset_after, with_h0=with_h0,
                           generator=gen, resets=_random_resets(T, B, gen))
    report = check_layer(backend, case, device=device, dtype=dtype)
    assert report.ok, report.failures


@pytest.mark.parametrize("backend, device, dtype", BACKENDS)
def test_inference_ops_equal_the_forward(backend, device, dtype, gen, poisoned):
    """The inference entry (no ws) with batch_sizes or resets computes the forward's y."""
    impl = backends.get_backend(backend)
    if getattr(impl, "inference", None) is None:
        pytest.skip(f"backend {backend!r} has no inference entry (its forward serves)")
    for kw in ({"lengths": [6, 3, 3, 1]}, {"resets": _random_resets(6, 4, gen)}):
        case = make_layer_case(6, 4, 3, 9, generator=gen, **kw)
        args = case.args(device, dtype)
        seq = case.seq_args(device)
        y, _ = impl.forward(*args, True, *seq)
        assert torch.equal(impl.inference(*args, True, *seq), y)


def test_ops_reject_a_bad_sequence_structure(gen):
    """The extension's ops check batch_sizes and resets themselves (a direct call)."""
    if "cpu" not in backends.available_backends():
        pytest.skip("the cpu extension is not built here")
    case = make_layer_case(4, 3, 2, 5, generator=gen, lengths=[4, 2, 1])
    x, h0, w_ih, w_hh, b_ih, b_hh = case.args()
    op = torch.ops.fusedgru.gru_fwd
    bad = {
        "non-increasing": torch.tensor([1, 2, 2, 2]),
        "wrong sum": torch.tensor([3, 2, 2, 1]),
        "zero": torch.tensor([3, 2, 2, 0]),
    }
    for what, bs in bad.items():
        with pytest.raises(RuntimeError, match="batch_sizes"):
            op(x, h0, w_ih, w_hh, b_ih, b_hh, True, bs)
    with pytest.raises(RuntimeError, match="batch_sizes must be a 1-D int64"):
        op(x, h0, w_ih, w_hh, b_ih, b_hh, True, case.batch_sizes.int())
    dense = make_layer_case(4, 3, 2, 5, generator=gen)
    xd, h0d, *w = dense.args()
    with pytest.raises(RuntimeError, match="resets must be bool"):
        op(xd, h0d, *w, True, None, torch.zeros(4, 3))
    with pytest.raises(RuntimeError, match="resets must have shape"):
        op(xd, h0d, *w, True, None, torch.zeros(3, 4, dtype=torch.bool))


# ----------------------------------------------------------------------------------------
# PackedSequence through the module
# ----------------------------------------------------------------------------------------


def _model_pair(backend, device, dtype, *, num_layers=2, bidirectional=True,
                reset_after=True, I=4, H=6):
    torch.manual_seed(0)
    fused = FusedGRU(I, H, num_layers=num_layers, bidirectional=bidirectional,
                     reset_after=reset_after, backend=backend, device=device, dtype=dtype)
    ref = FusedGRU(I, H, num_layers=num_layers, bidirectional=bidirectional,
                   reset_after=reset_after, backend="reference", dtype=F64)
    ref.load_state_dict({k: v.to("cpu", F64) for k, v in fused.state_dict().items()})
    return fused, ref


def _grads(model, inputs):
    return [t.grad for t in inputs] + [p.grad for p in model.parameters()]


@pytest.mark.parametrize("enforce_sorted", [True, False], ids=["sorted", "unsorted"])
@pytest.mark.parametrize("backend, device, dtype", BACKENDS)
def test_packed_matches_nn_gru(backend, device, dtype, enforce_sorted, gen):
    """A PackedSequence (2 layers, bidirectional, with hx) gives nn.GRU's packed output,
    h_n and gradients of the input, hx and every parameter."""
    fused, _ = _model_pair(backend, device, dtype)
    ref = fused.to_torch().to("cpu", F64)
    lengths = [7, 3, 7, 1, 4] if not enforce_sorted else [7, 7, 4, 3, 1]
    x = torch.randn(7, 5, 4, dtype=F64, generator=gen)
    hx = torch.randn(4, 5, 6, dtype=F64, generator=gen)
    outs = {}
    for name, model, dev, dt in (("fused", fused, device, dtype), ("nn", ref, "cpu", F64)):
        xi = x.to(dev, dt).requires_grad_()
        hi = hx.to(dev, dt).requires_grad_()
        packed = pack_padded_sequence(xi, torch.tensor(lengths), enforce_sorted=enforce_sorted)
        out, h_n = model(packed, hi)
        assert isinstance(out, PackedSequence)
        (out.data.sin().sum() + h_n.cos().sum()).backward()
        outs[name] = [out.data, h_n] + _grads(model, [xi, hi])
    tol = _tol(dtype)
    for got, want in zip(outs["fused"], outs["nn"]):
        assert rel_err(got, want) < tol


@pytest.mark.parametrize("reset_after", [True, False])
@pytest.mark.parametrize("backend, device, dtype", BACKENDS)
def test_packed_equals_each_sequence_alone(backend, device, dtype, reset_after, gen):
    """An oracle that knows nothing of packing: every sequence run alone (B = 1, dense) by
    the float64 reference; outputs (padded back) and h_n, both formulations."""
    fused, ref = _model_pair(backend, device, dtype, reset_after=reset_after)
    lengths = [5, 1, 3, 5]
    x = torch.randn(5, 4, 4, dtype=F64, generator=gen)
    hx = torch.randn(4, 4, 6, dtype=F64, generator=gen)
    packed = pack_padded_sequence(x.to(device, dtype), torch.tensor(lengths),
                                  enforce_sorted=False)
    with torch.no_grad():
        out, h_n = fused(packed, hx.to(device, dtype))
        padded, _ = pad_packed_sequence(out)
        for b, n in enumerate(lengths):
            y_b, h_b = ref(x[:n, b:b + 1], hx[:, b:b + 1])
            assert rel_err(padded[:n, b:b + 1], y_b) < _tol(dtype)
            assert rel_err(h_n[:, b:b + 1], h_b) < _tol(dtype)


def test_packed_runs_on_the_packed_rows():
    """No padded work: the layer ops receive the N packed rows and the batch_sizes (the
    skewed case of issue 19 would be 25x the rows padded), and no padding op runs."""
    if "cpu" not in backends.available_backends():
        pytest.skip("the cpu extension is not built here")
    model = FusedGRU(3, 4, bidirectional=True, backend="cpu")
    lengths = torch.tensor([40] + [2] * 7)
    packed = pack_padded_sequence(torch.randn(40, 8, 3), lengths)
    seen = []

    class Shapes(OpLog):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if "fusedgru" in str(func):
                seen.append((str(func), tuple(args[0].shape)))
            return super().__torch_dispatch__(func, types, args, kwargs)

    with Shapes():
        model(packed)
    layer_calls = [shape for name, shape in seen if "gru_" in name]
    assert layer_calls == [(54, 3), (54, 3)], seen  # 40 + 7 * 2 rows, both directions
    assert not any("padded" in name for name, _ in seen), seen


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_packed_gradcheck(backend, gen):
    if backend not in backends.available_backends():
        pytest.skip(f"backend {backend!r} is not available here")
    model = FusedGRU(2, 3, bidirectional=True, backend=backend, dtype=F64)
    params = list(model.parameters())
    names = [n for n, _ in model.named_parameters()]
    lengths = torch.tensor([4, 2, 1])
    x = torch.randn(4, 3, 2, dtype=F64, generator=gen, requires_grad=True)
    hx = torch.randn(2, 3, 3, dtype=F64, generator=gen, requires_grad=True)

    def f(x, hx, *ps):
        out, h_n = torch.func.functional_call(model, dict(zip(names, ps)),
                                              (pack_padded_sequence(x, lengths), hx))
        return out.data, h_n

    assert torch.autograd.gradcheck(f, (x, hx, *params))


# ----------------------------------------------------------------------------------------
# resets through the module
# ----------------------------------------------------------------------------------------


def _textbook_cell(x, h, w_ih, w_hh, b_ih, b_hh):
    """reset_after=False: n = tanh(W_in x + b_in + W_hn (r * h) + b_hn)."""
    H = h.shape[-1]
    gi = x @ w_ih.T + b_ih
    r = torch.sigmoid(gi[:, :H] + h @ w_hh[:H].T + b_hh[:H])
    z = torch.sigmoid(gi[:, H:2 * H] + h @ w_hh[H:2 * H].T + b_hh[H:2 * H])
    n = torch.tanh(gi[:, 2 * H:] + (r * h) @ w_hh[2 * H:].T + b_hh[2 * H:])
    return (1 - z) * n + z * h


def _masked_loop(model, x, hx, resets):
    """The nn.GRU way: a Python loop over steps with nn.GRUCell's kernel (torch.gru_cell;
    the textbook cell for reset_after=False), zeroing the state where a reset is set.
    x (T, B, I), hx (L*D, B, H), resets (T, B); every layer and both directions."""
    T = x.shape[0]
    D = 2 if model.bidirectional else 1
    keep = (~resets).to(x.dtype).unsqueeze(-1)  # (T, B, 1)
    cell = torch.gru_cell if model.reset_after else _textbook_cell
    inp, h_n = x, []
    for layer in range(model.num_layers):
        outs = []
        for d in range(D):
            sfx = f"_l{layer}" + ("_reverse" if d else "")
            w = [getattr(model, n + sfx) for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
            h = hx[layer * D + d]
            ys = [None] * T
            for t in (range(T - 1, -1, -1) if d else range(T)):
                if not d:
                    h = h * keep[t]
                elif t < T - 1:  # reversed: restart where the next step starts a segment
                    h = h * keep[t + 1]
                h = cell(inp[t], h, *w)
                ys[t] = h
            outs.append(torch.stack(ys))
            h_n.append(h)
        inp = torch.cat(outs, dim=2)
    return inp, torch.stack(h_n)


@pytest.mark.parametrize("reset_after", [True, False])
@pytest.mark.parametrize("backend, device, dtype", BACKENDS)
def test_resets_match_a_masked_cell_loop(backend, device, dtype, reset_after, gen):
    """2 layers, bidirectional, with hx: outputs, h_n and the gradients of the input, hx
    and every parameter equal the masked loop's (float64 torch)."""
    fused, ref = _model_pair(backend, device, dtype, reset_after=reset_after)
    T, B = 8, 4
    x = torch.randn(T, B, 4, dtype=F64, generator=gen)
    hx = torch.randn(4, B, 6, dtype=F64, generator=gen)
    resets = _random_resets(T, B, gen)
    outs = {}
    for name, model, dev, dt in (("fused", fused, device, dtype), ("loop", ref, "cpu", F64)):
        xi = x.to(dev, dt).requires_grad_()
        hi = hx.to(dev, dt).requires_grad_()
        if name == "fused":
            out, h_n = model(xi, hi, resets=resets.to(dev))
        else:
            out, h_n = _masked_loop(model, xi, hi, resets)
        (out.sin().sum() + h_n.cos().sum()).backward()
        outs[name] = [out, h_n] + _grads(model, [xi, hi])
    for k, (got, want) in enumerate(zip(outs["fused"], outs["loop"])):
        assert rel_err(got, want) < _tol(dtype), k


@pytest.mark.parametrize("layout", ["batch_first", "unbatched"])
def test_resets_follow_the_input_layout(layout, gen):
    """resets is shaped like the input's leading dimensions: (B, T) with batch_first, (T,)
    unbatched; the result equals the time-major call."""
    model = FusedGRU(3, 5, num_layers=2, bidirectional=True, dtype=F64)
    T, B = 6, 3
    x = torch.randn(T, B, 3, dtype=F64, generator=gen)
    resets = _random_resets(T, B, gen)
    want, want_h = model(x, resets=resets)
    if layout == "batch_first":
        model.batch_first = True
        got, got_h = model(x.transpose(0, 1), resets=resets.T)
        got = got.transpose(0, 1)
    else:
        got, got_h = model(x[:, 1], resets=resets[:, 1])
        want, want_h = want[:, 1], want_h[:, 1]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-14)
    torch.testing.assert_close(got_h, want_h, rtol=0, atol=1e-14)


@pytest.mark.parametrize("backend, device, dtype", BACKENDS)
def test_no_gradient_crosses_a_reset(backend, device, dtype, gen):
    """Outputs from a reset on do not depend on anything before it: their gradient with
    respect to earlier inputs and to hx is exactly zero (one direction)."""
    model = FusedGRU(3, 5, num_layers=2, backend=backend, device=device, dtype=dtype)
    T, B = 6, 2
    x = torch.randn(T, B, 3, device=device, dtype=dtype, generator=None).requires_grad_()
    hx = torch.randn(2, B, 5, device=device, dtype=dtype).requires_grad_()
    resets = torch.zeros(T, B, dtype=torch.bool, device=device)
    resets[3, 0] = True
    out, _ = model(x, hx, resets=resets)
    out[3:, 0].sum().backward()
    assert torch.count_nonzero(x.grad[:3, 0]) == 0
    assert torch.count_nonzero(hx.grad[:, 0]) == 0
    assert torch.count_nonzero(x.grad[3:, 0]) > 0
    assert torch.count_nonzero(x.grad[:, 1]) == 0  # row 1 never reaches row 0's outputs


def test_no_resets_and_all_false_resets_agree(gen):
    model = FusedGRU(3, 5, num_layers=2, bidirectional=True, dtype=F64)
    x = torch.randn(5, 2, 3, dtype=F64, generator=gen)
    hx = torch.randn(4, 2, 5, dtype=F64, generator=gen)
    want = model(x, hx)
    got = model(x, hx, resets=torch.zeros(5, 2, dtype=torch.bool))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-14)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("reset_after", [True, False])
def test_resets_gradcheck(backend, reset_after, gen):
    if backend not in backends.available_backends():
        pytest.skip(f"backend {backend!r} is not available here")
    model = FusedGRU(2, 3, bidirectional=True, reset_after=reset_after, backend=backend,
                     dtype=F64)
    params = list(model.parameters())
    names = [n for n, _ in model.named_parameters()]
    T, B = 5, 2
    resets = _random_resets(T, B, gen)
    x = torch.randn(T, B, 2, dtype=F64, generator=gen, requires_grad=True)
    hx = torch.randn(2, B, 3, dtype=F64, generator=gen, requires_grad=True)

    def f(x, hx, *ps):
        return torch.func.functional_call(model, dict(zip(names, ps)), (x, hx),
                                          {"resets": resets})

    assert torch.autograd.gradcheck(f, (x, hx, *params))


def test_resets_under_torch_compile_and_func(gen):
    """fullgraph torch.compile and torch.func.grad take resets like eager."""
    model = FusedGRU(3, 4, num_layers=2, dtype=F64)
    x = torch.randn(6, 2, 3, dtype=F64, generator=gen)
    resets = _random_resets(6, 2, gen)
    want = model(x, resets=resets)[0]
    torch._dynamo.reset()
    got = torch.compile(model, fullgraph=True)(x, resets=resets)[0]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-13)

    def loss(x):
        return model(x, resets=resets)[0].square().sum()

    g = torch.func.grad(loss)(x)
    xr = x.clone().requires_grad_()
    loss(xr).backward()
    torch.testing.assert_close(g, xr.grad, rtol=0, atol=1e-13)


def test_bad_resets_are_refused_clearly():
    model = FusedGRU(3, 4)
    x = torch.randn(5, 2, 3)
    cases = [
        ([[True]], NotATensorError, "resets: expected a bool Tensor"),
        (torch.zeros(5, 2), DTypeError, r"resets: expected a bool tensor .* got torch.float32"),
        (torch.zeros(2, 5, dtype=torch.bool), ShapeError, r"resets: expected shape \(5, 2\)"),
        (torch.zeros(5, dtype=torch.bool), ShapeError, "resets: expected shape"),
    ]
    for resets, cls, msg in cases:
        with pytest.raises(cls, match=msg):
            model(x, resets=resets)
    # The same exception classes code written against nn.GRU catches for a bad argument.
    assert issubclass(DTypeError, TypeError) and issubclass(ShapeError, ValueError)
    packed = pack_padded_sequence(x, torch.tensor([5, 3]))
    with pytest.raises(ValueError, match="resets: not supported with a PackedSequence"):
        model(packed, resets=torch.zeros(5, 2, dtype=torch.bool))
    if HAS_CUDA:
        with pytest.raises(RuntimeError, match="resets: expected a tensor on"):
            model(x, resets=torch.zeros(5, 2, dtype=torch.bool, device="cuda"))


def test_functional_gru_takes_resets(gen):
    model = FusedGRU(3, 4, dtype=F64)
    x = torch.randn(5, 2, 3, dtype=F64, generator=gen)
    resets = _random_resets(5, 2, gen)
    want = model(x, resets=resets)
    got = gru(x, model._flat_weights, resets=resets)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
