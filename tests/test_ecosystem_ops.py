"""The registered ops of every backend available here: torch.library.opcheck (schema, fake
implementation, autograd registration, AOTDispatcher with static and dynamic shapes), with
and without requires_grad inputs, both formulations, h0 and biases present and absent; and
the autograd formulas registered on the ops (fusedgru/ops.py) checked by gradcheck and
gradgradcheck in float64."""


import pytest
import torch

from fusedgru import FusedGRU, backends, ops, testing
from fusedgru.function import gru_layer

F64 = torch.float64


# (backend, op prefix, dtype) for every backend that runs CPU tensors here.  The
# extension's "cpu" row serves fusedgru::gru_*, every Python row fusedgru::<name>_*.
CPU_BACKENDS = [pytest.param(name, "gru" if name in ("cpu", "cuda") else name, dtype, id=name)
                for name, dtype in testing.cpu_backend_dtypes()]
FORMS = [pytest.param(True, id="after"), pytest.param(False, id="before")]


def _op_args(prefix, dtype, reset_after, full, requires_grad, gen):
    ops.register_extension_autograd()
    case = testing.make_layer_case(3, 2, 4, 5, reset_after=reset_after, with_h0=full,
                                   bias=full, generator=gen)
    fw = case.args(dtype=dtype)
    y, ws = getattr(torch.ops.fusedgru, f"{prefix}_fwd")(*fw, reset_after)
    bw = [case.grad_y.to(dtype), *fw[:4], y, ws]
    if requires_grad:
        for t in fw + bw:
            if t is not None:
                t.requires_grad_()
    return tuple(fw) + (reset_after,), tuple(bw) + (reset_after,)


@pytest.mark.parametrize("backend,prefix,dtype", CPU_BACKENDS)
@pytest.mark.parametrize("reset_after", FORMS)
@pytest.mark.parametrize("full", [True, False], ids=["h0+bias", "bare"])
def test_opcheck(backend, prefix, dtype, reset_after, full, gen):
    fw, bw = _op_args(prefix, dtype, reset_after, full, False, gen)
    torch.library.opcheck(getattr(torch.ops.fusedgru, f"{prefix}_fwd").default, fw)
    torch.library.opcheck(getattr(torch.ops.fusedgru, f"{prefix}_bwd").default, bw)


# With requires_grad, opcheck traces forward + backward through AOTDispatcher (~8 s an op on
# 2 loaded cores): each backend covers both formulations and both h0/bias cases between
# its two ops' checks, and every case runs on some backend.
_RG_CASES = [(True, True), (False, False), (False, True), (True, False)]


@pytest.mark.parametrize("backend,prefix,dtype", CPU_BACKENDS)
@pytest.mark.parametrize("which", ["fwd", "bwd"])
def test_opcheck_requires_grad(backend, prefix, dtype, which, gen):
    k = [p.values[0] for p in CPU_BACKENDS].index(backend)
    reset_after, full = _RG_CASES[(2 * k + (which == "bwd")) % len(_RG_CASES)]
    fw, bw = _op_args(prefix, dtype, reset_after, full, True, gen)
    torch.library.opcheck(getattr(torch.ops.fusedgru, f"{prefix}_{which}").default,
                          fw if which == "fwd" else bw)


def _strided(t):
    """The same values in a non-contiguous layout (every other element of a wider buffer)."""
    if t is None or t.dim() == 0:
        return t
    wide = t.new_full((*t.shape[:-1], 2 * t.shape[-1]), float("nan"))
    out = wide[..., ::2]
    out.copy_(t)
    assert not out.is_contiguous()
    return out


@pytest.mark.parametrize("backend,prefix,dtype", CPU_BACKENDS)
@pytest.mark.parametrize("reset_after", FORMS)
def test_ops_read_strided_tensors_as_their_values(backend, prefix, dtype, reset_after, gen):
    """Every op takes any layout (vmap's per-instance slices, direct calls): the same
    results from strided views as from dense tensors."""
    fw, bw = _op_args(prefix, dtype, reset_after, True, False, gen)
    for which, args in (("fwd", fw), ("bwd", bw)):
        op = getattr(torch.ops.fusedgru, f"{prefix}_{which}")
        dense = op(*args)
        strided = op(*[_strided(a) if isinstance(a, torch.Tensor) else a for a in args])
        # BLAS may take another path for a strided operand: rounding, not more.
        tol = dict(rtol=1e-12, atol=1e-14) if dtype == F64 else dict(rtol=1e-5, atol=1e-6)
        for d, s in zip(dense, strided):
            torch.testing.assert_close(s, d, **tol)


@pytest.mark.parametrize("backend,prefix,dtype", [p for p in CPU_BACKENDS if p.values[2] == F64])
@pytest.mark.parametrize("reset_after", FORMS)
def test_forward_op_gradients(backend, prefix, dtype, reset_after, gen):
    """The forward op's registered formula: the hot path (only y used: the backend's backward
    op) and the path where ws is used too (the reference forward's VJP), by gradcheck."""
    fw, _ = _op_args(prefix, F64, reset_after, True, True, gen)
    op = getattr(torch.ops.fusedgru, f"{prefix}_fwd")
    tensors = fw[:6]

    def y_only(*a):
        return op(*a, reset_after)[0]

    def y_and_ws(*a):
        return op(*a, reset_after)

    assert torch.autograd.gradcheck(y_only, tensors)
    assert torch.autograd.gradcheck(y_and_ws, tensors)


@pytest.mark.parametrize("backend,prefix,dtype", [p for p in CPU_BACKENDS if p.values[2] == F64])
@pytest.mark.parametrize("reset_after", FORMS)
def test_double_backward(backend, prefix, dtype, reset_after, gen):
    """create_graph=True through FusedGRU (gradient penalties) is differentiable: the
    backward op's formula is the VJP of reference.gru_layer_backward."""
    f = FusedGRU(3, 4, dtype=F64, reset_after=reset_after, backend=backend)
    names = [n for n, _ in f.named_parameters()]
    x = torch.randn(2, 2, 3, dtype=F64, generator=gen, requires_grad=True)
    h = torch.randn(1, 2, 4, dtype=F64, generator=gen, requires_grad=True)

    def fn(x, h, *params):
        with torch.nn.utils.stateless._reparametrize_module(f, dict(zip(names, params))):
            return f(x, h)

    assert torch.autograd.gradgradcheck(fn, (x, h, *f.parameters()))


def test_one_registered_boundary():
    """A GRU layer is one call of the backend's forward op, and its autograd node is that
    op's registered formula, directly on the leaves: no autograd.Function around it."""
    backends.get_backend("reference")
    x = torch.randn(3, 2, 4, requires_grad=True)
    w_ih = torch.randn(15, 4, requires_grad=True)
    w_hh = torch.randn(15, 5, requires_grad=True)
    y = gru_layer(x, None, w_ih, w_hh, None, None, True, "reference")
    assert "fusedgru_reference_fwd" in y.grad_fn.name()
    assert all(type(n).__name__ == "AccumulateGrad" for n, _ in y.grad_fn.next_functions)


@pytest.mark.parametrize("backend,prefix,dtype", CPU_BACKENDS)
def test_backward_runs_the_backends_backward_op(backend, prefix, dtype, gen):
    """The hot path: a module's backward is one call of the backend's backward op per
    layer-direction, never the reference fallback (taken only when ws gets a gradient)."""
    f = FusedGRU(3, 4, num_layers=2, bidirectional=True, dtype=dtype, backend=backend)
    x = torch.randn(2, 3, 3, dtype=dtype, generator=gen, requires_grad=True)
    y, h_n = f(x)
    loss = y.sum() + h_n.sum()
    with testing.OpLog() as log:
        loss.backward()
    assert log.names.count(f"fusedgru.{prefix}_bwd.default") == 4, log.names
    assert not any(n.startswith(("aten.sigmoid", "aten.tanh")) for n in log.names), log.names


# ----------------------------------------------------------------------------------------
# Only the gradients something needs (need_dx / need_dw), as nn.GRU's backward
# ----------------------------------------------------------------------------------------

_NEEDS = [(False, True), (True, False), (False, False)]


@pytest.mark.parametrize("backend,prefix,dtype", CPU_BACKENDS)
@pytest.mark.parametrize("reset_after", FORMS)
def test_backward_op_skips_what_is_not_needed(backend, prefix, dtype, reset_after, gen):
    """need_dx / need_dw False: dx / the four weight and bias gradients come back as empty
    tensors, and every other output is bitwise what the op returns when it computes all
    six; on a call of few rows (the CPU kernel's inline weight gradients, at most 8) and of
    many.  opcheck checks the fake implementation's empty outputs against the kernel's."""
    fwd = getattr(torch.ops.fusedgru, f"{prefix}_fwd")
    bwd = getattr(torch.ops.fusedgru, f"{prefix}_bwd")
    for T, B in [(1, 2), (5, 7)]:
        case = testing.make_layer_case(T, B, 4, 5, reset_after=reset_after, generator=gen)
        fw = case.args(dtype=dtype)
        y, ws = fwd(*fw, reset_after)
        args = (case.grad_y.to(dtype), *fw[:4], y, ws, reset_after)
        full = bwd(*args)
        assert full[0].shape == fw[0].shape and full[2].shape == fw[2].shape
        for need_dx, need_dw in _NEEDS:
            got = bwd(*args, None, None, need_dx, need_dw)
            for k, (g, f) in enumerate(zip(got, full)):
                if (k == 0 and not need_dx) or (k >= 2 and not need_dw):
                    assert g.shape == (0,) and g.dtype == f.dtype, (k, need_dx, need_dw)
                else:
                    assert torch.equal(g, f), (k, need_dx, need_dw)
        torch.library.opcheck(bwd.default, args + (None, None, False, False))
        torch.library.opcheck(bwd.default, args + (None, None, False, True))


@pytest.mark.parametrize("backend,prefix,dtype", CPU_BACKENDS)
@pytest.mark.parametrize("frozen", ["input", "weights", "all-but-h0"])
def test_module_backward_computes_only_what_is_needed(backend, prefix, dtype, frozen, gen):
    """As nn.GRU: a layer's backward op is asked for dx only when its input needs a
    gradient (the first layer on an input without requires_grad: not) and for the weight
    gradients only when its parameters need them; the gradients it returns are bitwise
    those of a backward that computes everything."""
    f = FusedGRU(3, 4, num_layers=2, dtype=dtype, backend=backend)
    x = torch.randn(5, 3, 3, dtype=dtype, generator=gen)
    h0 = torch.randn(2, 3, 4, dtype=dtype, generator=gen)
    gy = torch.randn(5, 3, 4, dtype=dtype, generator=gen)
    params = list(f.parameters())

    def grads_of(wanted):
        y, h_n = f(x, h0)
        with testing.OpLog() as log:
            got = torch.autograd.grad((y * gy).sum() + h_n.square().sum(), wanted)
        return got, log.backward_needs(f"fusedgru.{prefix}_bwd.default")

    for t in [x, h0, *params]:
        t.requires_grad_(True)
    everything, needs = grads_of([x, h0, *params])
    assert needs == [(True, True), (True, True)]
    x.requires_grad_(frozen == "weights")
    for p in params:
        p.requires_grad_(frozen == "input")
    wanted = [t for t in [x, h0, *params] if t.requires_grad]
    got, needs = grads_of(wanted)
    # The backward runs layer 1, then layer 0; layer 1's input (layer 0's output) always
    # needs a gradient here: h0 does.
    expect = {"input": [(True, True), (False, True)], "weights": [(True, False), (True, False)],
              "all-but-h0": [(True, False), (False, False)]}[frozen]
    assert needs == expect
    full = dict(zip(map(id, [x, h0, *params]), everything))
    for t, g in zip(wanted, got):
        assert torch.equal(g, full[id(t)])


@pytest.mark.parametrize("backend,prefix,dtype", [p for p in CPU_BACKENDS if p.values[2] == F64])
def test_double_backward_with_a_frozen_input(backend, prefix, dtype, gen):
    """A gradient penalty on the weights of a layer whose input needs no gradient: the
    first backward skips dx, and the second differentiates the rest (gradgradcheck)."""
    f = FusedGRU(3, 4, dtype=F64, backend=backend)
    names = [n for n, _ in f.named_parameters()]
    x = torch.randn(2, 2, 3, dtype=F64, generator=gen)

    def fn(*params):
        with torch.nn.utils.stateless._reparametrize_module(f, dict(zip(names, params))):
            return f(x)[0]

    assert torch.autograd.gradgradcheck(fn, tuple(f.parameters()))


def test_compiled_backward_graph_holds_the_backward_op(gen):
    """Under torch.compile the traced backward graph calls the backward op (AOTAutograd
    passes no gradient for ws either), not a recomputation."""
    from torch._dynamo.testing import AotEagerAndRecordGraphs

    torch._dynamo.reset()
    rec = AotEagerAndRecordGraphs()
    f = FusedGRU(3, 4, dtype=F64, backend="reference")
    compiled = torch.compile(f, backend=rec, fullgraph=True)
    x = torch.randn(2, 3, 3, dtype=F64, generator=gen, requires_grad=True)
    y, _ = compiled(x)
    y.sum().backward()
    (bw,) = rec.bw_graphs
    code = bw.code
    assert "fusedgru.reference_bwd" in code and "sigmoid" not in code, code


def test_compiled_backward_skips_dx_of_a_frozen_input(gen):
    """Under torch.compile (fullgraph) the traced backward asks the backward op for no dx
    when the input needs no gradient, and the weight gradients equal eager's."""
    from torch._dynamo.testing import AotEagerAndRecordGraphs

    torch._dynamo.reset()
    rec = AotEagerAndRecordGraphs()
    f = FusedGRU(3, 4, dtype=F64, backend="reference")
    compiled = torch.compile(f, backend=rec, fullgraph=True)
    x = torch.randn(2, 3, 3, dtype=F64, generator=gen)
    compiled(x)[0].square().sum().backward()
    got = [p.grad.clone() for p in f.parameters()]
    (bw,) = rec.bw_graphs
    calls = [n for n in bw.graph.nodes if "reference_bwd" in str(n.target)]
    assert len(calls) == 1, bw.code
    need = list(calls[0].args[10:12]) + [True, True]  # trailing defaults may be left out
    assert (need[0], need[1]) == (False, True), calls[0].args
    f.zero_grad()
    f(x)[0].square().sum().backward()
    for g, p in zip(got, f.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=0, atol=1e-12)


@pytest.fixture
def restore_fp32_precision():
    matmul = torch.backends.cuda.matmul
    before = (matmul.fp32_precision, torch.backends.fp32_precision)
    yield
    matmul.fp32_precision, torch.backends.fp32_precision = before


@pytest.fixture
def restore_rnn_precision():
    cudnn = torch.backends.cudnn
    before = (cudnn.rnn.fp32_precision, cudnn.fp32_precision, torch.backends.fp32_precision)
    yield
    cudnn.rnn.fp32_precision, cudnn.fp32_precision, torch.backends.fp32_precision = before


def test_rnn_tf32_query_follows_what_nn_gru_follows(restore_rnn_precision):
    """ops.rnn_tf32_allowed (the float32 precision of both GPU backends) reads the flag
    cuDNN's RNN reads, whichever API set it: TF32 by default, as a default nn.GRU."""
    cudnn = torch.backends.cudnn
    assert ops.rnn_tf32_allowed() is (cudnn.rnn.fp32_precision == "tf32")
    for legacy in (False, True):
        cudnn.allow_tf32 = legacy
        assert ops.rnn_tf32_allowed() is legacy
    cudnn.rnn.fp32_precision = "ieee"
    assert ops.rnn_tf32_allowed() is False
    cudnn.rnn.fp32_precision = "tf32"
    assert ops.rnn_tf32_allowed() is True
    cudnn.rnn.fp32_precision = "none"  # "none" inherits cuDNN's, then the global setting
    cudnn.fp32_precision = "ieee"
    assert ops.rnn_tf32_allowed() is False
    cudnn.fp32_precision = "none"
    torch.backends.fp32_precision = "tf32"
    assert ops.rnn_tf32_allowed() is True
    torch.backends.fp32_precision = "ieee"
    assert ops.rnn_tf32_allowed() is False
    # torch.backends.cuda.matmul (what torch's own matmuls follow) does not decide it
    torch.backends.fp32_precision = "none"
    cudnn.rnn.fp32_precision = "tf32"
    torch.backends.cuda.matmul.fp32_precision = "ieee"
    try:
        assert ops.rnn_tf32_allowed() is True
    finally:
        torch.backends.cuda.matmul.fp32_precision = "none"


def test_tf32_query_follows_both_torch_apis(restore_fp32_precision):
    """ops.tf32_matmul_allowed (what the CUDA and Triton kernels obey for float32) agrees
    with the legacy flag, and still answers once the fp32_precision API is in use, where
    torch's own legacy getter raises."""
    matmul = torch.backends.cuda.matmul
    for legacy in (True, False):
        matmul.allow_tf32 = legacy
        assert ops.tf32_matmul_allowed() is legacy
    matmul.fp32_precision = "tf32"
    with pytest.raises(RuntimeError, match="mix of the legacy and new APIs"):
        matmul.allow_tf32  # noqa: B018 - the getter this helper must not call
    assert ops.tf32_matmul_allowed() is True
    matmul.fp32_precision = "ieee"
    assert ops.tf32_matmul_allowed() is False
    matmul.fp32_precision = "none"  # inherits the global setting
    torch.backends.fp32_precision = "tf32"
    assert ops.tf32_matmul_allowed() is True
    torch.backends.fp32_precision = "ieee"
    assert ops.tf32_matmul_allowed() is False


def test_check_baseline_runs_in_the_kernels_precision(restore_rnn_precision,
                                                      restore_fp32_precision):
    """fusedgru check on a GPU: float32's baseline (the reference, whose matmuls follow the
    matmul flag) runs in the precision the kernels take from nn.GRU's flag, TF32 by
    default, so a TF32 kernel is not held to a strict budget; CPU and other dtypes untouched."""
    from fusedgru.testing import _baseline_precision

    matmul = torch.backends.cuda.matmul
    matmul.fp32_precision = "ieee"
    for rnn, want in (("tf32", "tf32"), ("ieee", "ieee")):
        torch.backends.cudnn.rnn.fp32_precision = rnn
        with _baseline_precision("cuda", torch.float32):
            assert matmul.fp32_precision == want
        assert matmul.fp32_precision == "ieee"
        for device, dtype in (("cpu", torch.float32), ("cuda", torch.bfloat16)):
            with _baseline_precision(device, dtype):
                assert matmul.fp32_precision == "ieee"
