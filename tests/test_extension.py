"""The C++ extension's "cpu" backend (csrc/gru_cpu.cpp) against the float64 reference:
parity on odd sizes with poisoned outputs, gradcheck, module parity with torch.nn.GRU,
bad input to the raw ops, and torch.library.opcheck on both registered ops."""

import copy

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import fusedgru
from fusedgru import backends, testing
from fusedgru.testing import check_layer, make_layer_case

try:
    from fusedgru import extension
    EXT_ERROR = extension.load_error()
except Exception as exc:  # noqa: BLE001
    EXT_ERROR = f"fusedgru.extension does not import: {exc}"

pytestmark = pytest.mark.skipif(EXT_ERROR is not None, reason=f"extension not built: {EXT_ERROR}")


@pytest.fixture
def poisoned():
    """Every output of the ops is filled with NaN before the kernels write it."""
    prev = torch.ops.fusedgru._set_poison(True)
    yield
    torch.ops.fusedgru._set_poison(prev)


SHAPES = [  # (T, B, I, H): H in {1, 3, 17, 63, 100}, B in {1, 3, 5}, T in {1, 2, 7}, I != H
    (1, 1, 2, 1),
    (2, 3, 5, 3),
    (7, 5, 9, 17),
    (7, 3, 40, 63),
    (2, 5, 33, 100),
    (7, 1, 4, 100),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("reset_after", [True, False], ids=["after", "before"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T%dB%dI%dH%d" % s)
@pytest.mark.parametrize("with_h0,bias", [(True, True), (False, True), (True, False)],
                         ids=["h0-bias", "noh0", "nobias"])
def test_cpu_matches_reference(shape, reset_after, dtype, with_h0, bias, gen, poisoned):
    case = testing.make_layer_case(*shape, reset_after=reset_after, with_h0=with_h0,
                                   bias=bias, generator=gen)
    report = testing.check_layer("cpu", case, dtype=dtype)
    assert report.ok, report.failures


@pytest.fixture(params=[0, 1 << 20], ids=["gemm", "inline"])
def small_batch(request):
    """Every row count on one path: ATen's GEMM (0) or the inline small-batch products."""
    prev = torch.ops.fusedgru._set_cpu_small_batch(request.param)
    yield request.param
    torch.ops.fusedgru._set_cpu_small_batch(prev)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("reset_after", [True, False], ids=["after", "before"])
@pytest.mark.parametrize("shape", [(1, 1, 2, 1), (7, 5, 9, 17), (2, 8, 33, 100), (1, 6, 40, 63)],
                         ids=lambda s: "T%dB%dI%dH%d" % s)
def test_both_product_paths_match_reference(shape, reset_after, dtype, small_batch, gen,
                                            poisoned):
    """The inline small-batch products (forward, input projection of a few rows, backward)
    and ATen's GEMM, each forced for every batch size, both within SPEC's budget."""
    case = testing.make_layer_case(*shape, reset_after=reset_after, generator=gen)
    report = testing.check_layer("cpu", case, dtype=dtype)
    assert report.ok, report.failures


def test_small_batch_switch_rejects_negative_counts():
    with pytest.raises(RuntimeError, match="rows must be >= 0"):
        torch.ops.fusedgru._set_cpu_small_batch(-1)


@pytest.mark.parametrize("step_rows,wgrad_rows", [(0, 1 << 20), (1 << 20, 0), (-1, -1)],
                         ids=["step-gemm-wgrad-inline", "step-inline-wgrad-gemm", "follow"])
@pytest.mark.parametrize("reset_after", [True, False], ids=["after", "before"])
@pytest.mark.parametrize("shape", [(1, 8, 33, 100), (7, 5, 9, 17)], ids=lambda s: "T%dB%dI%dH%d" % s)
def test_backward_small_switches_match_reference(shape, reset_after, step_rows, wgrad_rows,
                                                 gen, poisoned):
    """The backward's own thresholds (_set_cpu_small_bwd_step: the per-step dh product,
    _set_cpu_small_wgrad: the weight gradients), each path forced apart from the other and
    from the forward's, within SPEC's budget in float64; the switches return the previous
    value, -1 (follow _set_cpu_small_batch) is the default, and below -1 is refused."""
    ops = torch.ops.fusedgru
    prev = (ops._set_cpu_small_bwd_step(step_rows), ops._set_cpu_small_wgrad(wgrad_rows))
    try:
        assert prev == (-1, -1), "the defaults must follow _set_cpu_small_batch"
        case = testing.make_layer_case(*shape, reset_after=reset_after, generator=gen)
        report = testing.check_layer("cpu", case, dtype=torch.float64)
        assert report.ok, report.failures
        for set_ in (ops._set_cpu_small_bwd_step, ops._set_cpu_small_wgrad):
            with pytest.raises(RuntimeError, match="rows must be >= -1"):
                set_(-2)
    finally:
        assert ops._set_cpu_small_bwd_step(prev[0]) == step_rows
        assert ops._set_cpu_small_wgrad(prev[1]) == wgrad_rows


def test_backward_small_switches_take_effect(gen):
    """Each backward switch changes the path it names, seen in the ATen products the
    backward calls (the profiler): the step's dh product on ATen's GEMM (addmm_) or inline,
    the weight gradients on ATen's GEMM (mm, sum) or inline.  The gradient a switch governs
    stays within rounding of the other path's (the two may or may not agree bitwise,
    depending on the BLAS and the CPU: MKL on an AVX-512 Xeon sums these in the inline
    order), and the other gradient keeps its bits."""
    from collections import Counter

    from fusedgru import FusedGRU

    ops = torch.ops.fusedgru
    m = FusedGRU(33, 100, backend="cpu", dtype=torch.float64)
    x = torch.randn(1, 8, 33, dtype=torch.float64, generator=gen, requires_grad=True)
    h0 = torch.randn(1, 8, 100, dtype=torch.float64, generator=gen, requires_grad=True)
    gy = torch.randn(1, 8, 100, dtype=torch.float64, generator=gen)

    def grads(step_rows, wgrad_rows):
        prev = (ops._set_cpu_small_bwd_step(step_rows), ops._set_cpu_small_wgrad(wgrad_rows))
        try:
            for t in (x, h0, *m.parameters()):
                t.grad = None
            y = m(x, h0)[0]
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                y.backward(gy)
            aten = Counter(e.name for e in prof.events()
                           if e.name in ("aten::mm", "aten::addmm_", "aten::sum"))
            return h0.grad.clone(), m.weight_hh_l0.grad.clone(), aten
        finally:
            ops._set_cpu_small_bwd_step(prev[0])
            ops._set_cpu_small_wgrad(prev[1])

    dh_in, dw_in, aten_in = grads(1 << 20, 1 << 20)
    dh_step, dw_step, aten_step = grads(0, 1 << 20)   # the dh product on ATen's GEMM
    dh_w, dw_w, aten_w = grads(1 << 20, 0)            # the weight gradients on ATen's GEMM
    assert aten_in == Counter(), aten_in  # everything inline
    assert aten_step == Counter({"aten::addmm_": 1}), aten_step  # one step: one product
    assert aten_w == Counter({"aten::mm": 3, "aten::sum": 2}), aten_w  # dx, dW_ih, dW_hh
    assert torch.allclose(dh_in, dh_step, rtol=1e-12) and torch.equal(dw_in, dw_step)
    assert torch.allclose(dw_in, dw_w, rtol=1e-12) and torch.equal(dh_in, dh_w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("reset_after", [True, False], ids=["after", "before"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T%dB%dI%dH%d" % s)
@pytest.mark.parametrize("with_h0,bias", [(True, True), (False, False)], ids=["full", "bare"])
def test_infer_op_matches_reference_and_forward(shape, reset_after, dtype, with_h0, bias, gen,
                                                 poisoned):
    """gru_infer (no ws kept: one step's scratch reused) gives the float64 reference's y
    within SPEC's budget, and exactly the y of gru_fwd (the same loop and arithmetic)."""
    case = testing.make_layer_case(*shape, reset_after=reset_after, with_h0=with_h0,
                                   bias=bias, generator=gen)
    args = case.args(dtype=dtype)
    y = torch.ops.fusedgru.gru_infer(*args, reset_after)
    ref = case.args(dtype=torch.float64)
    want, _ = fusedgru.reference.gru_layer_forward(*ref, reset_after)
    base, _ = fusedgru.reference.gru_layer_forward(*args, reset_after)
    err = testing.rel_err(y, want)
    assert err <= testing.budget(dtype, testing.rel_err(base, want)), err
    y_fwd, _ = torch.ops.fusedgru.gru_fwd(*args, reset_after)
    assert torch.equal(y, y_fwd)


def test_module_runs_infer_op_only_when_no_gradient_is_needed(gen):
    """FusedGRU(backend="cpu") takes gru_infer under no_grad / inference_mode / inputs and
    weights without requires_grad, and gru_fwd (which keeps ws) whenever autograd records:
    the two give the same output."""
    f = fusedgru.FusedGRU(3, 5, num_layers=2, bidirectional=True, backend="cpu")
    x = torch.randn(4, 2, 3, generator=gen)
    calls = {}
    for name, ctx in [("no_grad", torch.no_grad), ("inference_mode", torch.inference_mode)]:
        with ctx(), testing.OpLog() as log:
            calls[name] = f(x)[0]
        assert log.names.count("fusedgru.gru_infer.default") == 4, log.names
        assert "fusedgru.gru_fwd.default" not in log.names
    with testing.OpLog() as log:
        y_train = f(x)[0]
    assert log.names.count("fusedgru.gru_fwd.default") == 4, log.names
    assert y_train.requires_grad
    assert torch.equal(calls["no_grad"], y_train.detach())
    assert torch.equal(calls["inference_mode"], y_train.detach())
    f.requires_grad_(False)
    with testing.OpLog() as log:
        f(x)
    assert "fusedgru.gru_fwd.default" not in log.names
    with testing.OpLog() as log:
        f(x.requires_grad_())
    assert log.names.count("fusedgru.gru_fwd.default") == 4, log.names


def test_infer_op_compiles_under_no_grad(gen):
    """torch.compile(fullgraph=True) of an inference call traces gru_infer (its fake kernel)
    and matches eager."""
    torch._dynamo.reset()
    f = fusedgru.FusedGRU(3, 5, backend="cpu").eval()
    x = torch.randn(6, 2, 3, generator=gen)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        assert torch.equal(compiled(x)[0], f(x)[0])


def test_poison_switch_fills_outputs_with_nan():
    """The switch really poisons: an op output the kernel would not write stays NaN.
    (B = 0 rows: nothing is computed, so the empty outputs are simply returned.)"""
    prev = torch.ops.fusedgru._set_poison(True)
    try:
        assert torch.ops.fusedgru._set_poison(True) is True
        x = torch.randn(3, 2, 4)
        w_ih, w_hh = torch.randn(6, 4), torch.randn(6, 2)
        # T = 3 with every input finite: outputs must be finite, i.e. fully overwritten.
        y, ws = torch.ops.fusedgru.gru_fwd(x, None, w_ih, w_hh, None, None, True)
        assert torch.isfinite(y).all() and torch.isfinite(ws).all()
    finally:
        torch.ops.fusedgru._set_poison(prev)


def test_large_hidden_parallel_path(gen, poisoned):
    """Enough rows x units that at::parallel_for splits the loop (> 16K elements per step)."""
    case = testing.make_layer_case(3, 70, 24, 257, generator=gen)
    assert testing.check_layer("cpu", case, dtype=torch.float32).ok
    case = testing.make_layer_case(3, 70, 24, 257, reset_after=False, generator=gen)
    assert testing.check_layer("cpu", case, dtype=torch.float32).ok


def test_sequence_of_length_zero():
    x = torch.randn(0, 3, 4)
    y, ws = torch.ops.fusedgru.gru_fwd(x, None, torch.randn(15, 4), torch.randn(15, 5),
                                       None, None, True)
    assert y.shape == (0, 3, 5) and ws.shape == (0, 3, 20)


@pytest.mark.parametrize("reset_after", [True, False], ids=["after", "before"])
@pytest.mark.parametrize("T,B,I,H", [(1, 2, 3, 3), (4, 3, 2, 5), (5, 2, 4, 8)])
def test_gradcheck_float64(T, B, I, H, reset_after, gen):
    torch.manual_seed(T * 100 + H)
    gru = fusedgru.FusedGRU(I, H, dtype=torch.float64, reset_after=reset_after, backend="cpu")
    assert gru.backend_in_use == "cpu"
    x = torch.randn(T, B, I, dtype=torch.float64, generator=gen, requires_grad=True)
    h0 = torch.randn(1, B, H, dtype=torch.float64, generator=gen, requires_grad=True)
    params = list(gru.parameters())

    def f(x, h0, *ps):
        with torch.nn.utils.stateless._reparametrize_module(
                gru, dict(zip([n for n, _ in gru.named_parameters()], ps))):
            out, hn = gru(x, h0)
        return out, hn

    assert torch.autograd.gradcheck(f, (x, h0, *params))


def _parity(ref, fused, x, h0, atol):
    out_r, hn_r = ref(x, h0)
    out_f, hn_f = fused(x, h0)
    if isinstance(out_r, torch.nn.utils.rnn.PackedSequence):
        out_r, _ = pad_packed_sequence(out_r)
        out_f, _ = pad_packed_sequence(out_f)
    torch.testing.assert_close(out_f, out_r, atol=atol, rtol=0)
    torch.testing.assert_close(hn_f, hn_r, atol=atol, rtol=0)
    (out_r.square().sum() + hn_r.sin().sum()).backward()
    (out_f.square().sum() + hn_f.sin().sum()).backward()
    for (n, p_r), p_f in zip(ref.named_parameters(), fused.parameters()):
        torch.testing.assert_close(p_f.grad, p_r.grad, atol=atol, rtol=0, msg=n)


@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-10), (torch.float32, 2e-5)],
                         ids=["fp64", "fp32"])
@pytest.mark.parametrize("layers,bidir,batch_first", [(1, False, False), (2, True, False),
                                                      (3, True, True)])
def test_module_parity_with_nn_gru(layers, bidir, batch_first, dtype, atol, gen):
    torch.manual_seed(layers)
    ref = torch.nn.GRU(6, 17, num_layers=layers, bidirectional=bidir, batch_first=batch_first,
                       dtype=dtype)
    fused = fusedgru.FusedGRU(6, 17, num_layers=layers, bidirectional=bidir,
                              batch_first=batch_first, dtype=dtype, backend="cpu")
    fused.load_state_dict(ref.state_dict())
    shape = (3, 7, 6) if batch_first else (7, 3, 6)
    x = torch.randn(*shape, dtype=dtype, generator=gen)
    h0 = torch.randn(layers * (2 if bidir else 1), 3, 17, dtype=dtype, generator=gen)
    _parity(ref, fused, x, h0, atol)


def test_module_parity_packed(gen):
    ref = torch.nn.GRU(5, 9, num_layers=2, bidirectional=True, dtype=torch.float64)
    fused = fusedgru.FusedGRU(5, 9, num_layers=2, bidirectional=True, dtype=torch.float64,
                              backend="cpu")
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(6, 4, 5, dtype=torch.float64, generator=gen)
    packed = pack_padded_sequence(x, torch.tensor([6, 4, 3, 1]), enforce_sorted=False)
    _parity(ref, fused, packed, None, 1e-10)


# ---------------------------------------------------------------------------------------
# Bad input to the raw ops: clear RuntimeErrors, never a crash
# ---------------------------------------------------------------------------------------


def _good(T=3, B=2, I=4, H=5, dtype=torch.float32):
    return dict(x=torch.randn(T, B, I, dtype=dtype), h0=torch.randn(B, H, dtype=dtype),
                w_ih=torch.randn(3 * H, I, dtype=dtype), w_hh=torch.randn(3 * H, H, dtype=dtype),
                b_ih=torch.randn(3 * H, dtype=dtype), b_hh=torch.randn(3 * H, dtype=dtype))


def _fwd(a, reset_after=True):
    return torch.ops.fusedgru.gru_fwd(a["x"], a["h0"], a["w_ih"], a["w_hh"], a["b_ih"],
                                      a["b_hh"], reset_after)


BAD_FWD = [
    ("x", torch.randn(3, 4), "x must be \\(T, B, I\\)"),
    ("x", torch.randn(3, 2, 7), "w_ih must have shape"),
    ("x", torch.randint(0, 3, (3, 2, 4)), "x must be floating point"),
    ("h0", torch.randn(2, 6), "h0 must have shape"),
    ("h0", torch.randn(2, 5, dtype=torch.float64), "h0 must have the dtype of x"),
    ("w_hh", torch.randn(15, 4), "w_hh must be \\(3H, H\\)"),
    ("w_hh", torch.randn(0, 0), "w_hh must be \\(3H, H\\) with H >= 1"),
    ("w_ih", torch.randn(15, 3), "w_ih must have shape"),
    ("b_ih", torch.randn(14), "b_ih must have shape"),
    ("b_hh", None, "b_ih and b_hh must both be given"),
    ("b_hh", torch.randn(15, dtype=torch.float64), "b_hh must have the dtype of x"),
]


@pytest.mark.parametrize("name,value,match", BAD_FWD,
                         ids=[f"{n}-{m[:20]}" for n, _, m in BAD_FWD])
def test_forward_rejects_bad_input(name, value, match):
    a = _good()
    a[name] = value
    with pytest.raises(RuntimeError, match=match):
        _fwd(a)


def test_rejects_unsupported_dtype():
    with pytest.raises(RuntimeError, match="supports float32 and float64"):
        _fwd(_good(dtype=torch.float16))


def test_backward_rejects_bad_input():
    a = _good()
    y, ws = _fwd(a)
    gy = torch.randn_like(y)
    bwd = torch.ops.fusedgru.gru_bwd
    with pytest.raises(RuntimeError, match="grad_y must have shape"):
        bwd(gy[:2], a["x"], a["h0"], a["w_ih"], a["w_hh"], y, ws, True)
    with pytest.raises(RuntimeError, match="ws must have shape"):
        bwd(gy, a["x"], a["h0"], a["w_ih"], a["w_hh"], y, ws[..., :-1], True)
    with pytest.raises(RuntimeError, match="y must have the dtype"):
        bwd(gy, a["x"], a["h0"], a["w_ih"], a["w_hh"], y.double(), ws, True)
    with pytest.raises(RuntimeError, match="h0 must have shape"):
        bwd(gy, a["x"], a["h0"].t(), a["w_ih"], a["w_hh"], y, ws, True)


def test_non_contiguous_inputs_are_accepted(gen):
    a = _good()
    ref = _fwd(a)
    a2 = dict(a, x=a["x"].transpose(0, 1).contiguous().transpose(0, 1),
              w_hh=a["w_hh"].t().contiguous().t())
    assert not a2["x"].is_contiguous()
    for r, o in zip(ref, _fwd(a2)):
        torch.testing.assert_close(o, r)


# ---------------------------------------------------------------------------------------
# Registration: opcheck, backend table
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("reset_after", [True, False], ids=["after", "before"])
@pytest.mark.parametrize("with_h0,bias", [(True, True), (False, False)], ids=["full", "bare"])
def test_opcheck(reset_after, with_h0, bias, gen):
    case = testing.make_layer_case(3, 2, 4, 5, reset_after=reset_after, with_h0=with_h0,
                                   bias=bias, generator=gen)
    x, h0, w_ih, w_hh, b_ih, b_hh = case.args(dtype=torch.float32)
    torch.library.opcheck(torch.ops.fusedgru.gru_fwd.default,
                          (x, h0, w_ih, w_hh, b_ih, b_hh, reset_after))
    y, ws = torch.ops.fusedgru.gru_fwd(x, h0, w_ih, w_hh, b_ih, b_hh, reset_after)
    gy = case.grad_y.float()
    torch.library.opcheck(torch.ops.fusedgru.gru_bwd.default,
                          (gy, x, h0, w_ih, w_hh, y, ws, reset_after))
    torch.library.opcheck(torch.ops.fusedgru.gru_infer.default,
                          (x, h0, w_ih, w_hh, b_ih, b_hh, reset_after))


def test_both_rows_take_the_infer_op():
    """The "cpu" and "cuda" rows both have the inference entry (fusedgru.function.gru_layer
    uses it when nothing needs a gradient), and a CUDA build registers a CUDA gru_infer
    kernel beside gru_fwd / gru_bwd (checked here without a GPU: registration only)."""
    from fusedgru import extension

    args = testing.make_layer_case(3, 2, 4, 5).args(dtype=torch.float32)
    for impl in (extension.cpu_backend, extension.cuda_backend):
        with testing.OpLog() as log:
            impl.inference(*args, True)  # CPU tensors: the CPU kernel of the same op
        assert log.names == ["fusedgru.gru_infer.default"], (impl, log.names)
    if extension.has_cuda_kernels():
        for op in ("gru_fwd", "gru_infer", "gru_bwd"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fusedgru::{op}", "CUDA"), op


def test_backend_rows():
    from fusedgru import extension

    assert backends.get_backend("cpu") is extension.cpu_backend
    assert extension.cpu_backend.unsupported_reason("cpu", torch.float32) is None
    assert "float32" in extension.cpu_backend.unsupported_reason("cpu", torch.bfloat16)
    assert extension.cpu_backend.unsupported_reason("cuda", torch.float32) is not None
    assert backends.resolve_backend("auto", torch.device("cpu"), torch.float32) == "cpu"
    if not torch.cuda.is_available():
        assert extension.cuda_backend.unavailable_reason() is not None


def test_cell_loop_gradient_stays_within_budget_at_large_h(gen):
    """32 FusedGRUCell calls at B=1, H=1024 with backward: the state's gradient passes
    through 32 backward products of 3H = 3072 terms each.  Summed in one running
    accumulator they went over SPEC's float32 budget (err 1.65e-6 > 1.59e-6, found by
    `fusedgru bench --grid cell-loop`); the inline products sum in blocks."""
    torch.manual_seed(0)
    H, T = 1024, 32
    ref64 = torch.nn.GRUCell(H, H, dtype=torch.float64)
    x = torch.randn(T, 1, H, dtype=torch.float64, generator=gen)
    h0 = torch.randn(1, H, dtype=torch.float64, generator=gen) * 0.5
    gy = torch.randn(T, 1, H, dtype=torch.float64, generator=gen)

    def dh0_of(cell, dtype):
        xs, h = x.to(dtype), h0.to(dtype).detach().clone().requires_grad_()
        s, out = h, []
        for t in range(T):
            s = cell(xs[t], s)
            out.append(s)
        torch.autograd.backward(torch.stack(out), gy.to(dtype))
        return h.grad

    oracle = dh0_of(ref64, torch.float64)
    base = dh0_of(copy.deepcopy(ref64).float(), torch.float32)
    fused = fusedgru.FusedGRUCell.from_torch(copy.deepcopy(ref64).float(), backend="cpu")
    err = testing.rel_err(dh0_of(fused, torch.float32), oracle)
    assert err <= testing.budget(torch.float32, testing.rel_err(base, oracle)), err


@pytest.mark.parametrize("rows", [64, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("reset_after", [True, False], ids=["after", "before"])
def test_cpu_panel_products_match_reference(rows, dtype, reset_after, gen, poisoned):
    """The register-tiled panel products (fusedgru::_set_cpu_panel_rows; off by default,
    measured in benchmarks/NOTES-cpu-cuda.md) compute what the reference does: odd sizes
    (H not a multiple of the panel width, rows not of the tile height), dense, packed and
    with resets; rows=3 mixes them with the other paths within one call."""
    prev = torch.ops.fusedgru._set_cpu_panel_rows(rows)
    try:
        for T, B, I, H in [(3, 1, 5, 17), (4, 5, 3, 33), (2, 13, 7, 40), (3, 9, 6, 130)]:
            for kw in ({}, {"lengths": sorted([T] + [1 + k % T for k in range(B - 1)],
                                              reverse=True)},
                       {"resets": torch.rand(T, B, generator=gen) < 0.3}):
                case = make_layer_case(T, B, I, H, reset_after=reset_after, generator=gen, **kw)
                report = check_layer("cpu", case, dtype=dtype)
                assert report.ok, (T, B, I, H, kw, report.failures)
    finally:
        torch.ops.fusedgru._set_cpu_panel_rows(prev)


@pytest.fixture(params=[True, False], ids=["fast-act", "sleef-act"])
def activations(request):
    """The forward's float32 activations: the fast routines (default) or ATen's SLEEF ones."""
    prev = torch.ops.fusedgru._set_cpu_fast_activations(request.param)
    yield request.param
    torch.ops.fusedgru._set_cpu_fast_activations(prev)


def _ulps(got, want64):
    """|got - want| in units of float32's spacing at want (float64 want)."""
    w = want64.float()
    spacing = (torch.nextafter(w.abs(), torch.tensor(float("inf"))) - w.abs()).double()
    return (got.double() - want64).abs() / spacing


def test_cpu_activations_stay_within_3_ulp(activations):
    """sigmoid and tanh as the cpu forward computes them, on every float32 of a dense sweep
    of [-100, 100] and of 1e-40..10 (both signs): at most 3 ulp from float64 (SLEEF's own
    sigmoid = 1 / (1 + exp(-x)) reaches 2.5 ulp); sigmoid's tail below -80, where the result
    is subnormal or 0, within 1e-38; exact values at the special points."""
    x = torch.cat([torch.linspace(-100, 100, 1_000_001), torch.logspace(-40, 1, 50_001),
                   -torch.logspace(-40, 1, 50_001), torch.randn(100_000) * 4]).float()
    sig, tanh = torch.ops.fusedgru._cpu_activations(x)
    x64 = x.double()
    normal = x > -80
    assert _ulps(sig, torch.sigmoid(x64))[normal].max() <= 3.0
    assert (sig.double() - torch.sigmoid(x64))[~normal].abs().max() <= 1e-38
    assert _ulps(tanh, torch.tanh(x64)).max() <= 3.0
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e-45])
    sig, tanh = torch.ops.fusedgru._cpu_activations(special)
    assert sig[:3].tolist() == [0.5, 0.5, 1.0] and 0.0 <= sig[3].item() <= 1e-38
    assert tanh[:4].tolist() == [0.0, 0.0, 1.0, -1.0]
    assert torch.signbit(tanh[1]) and not torch.signbit(tanh[0])
    assert sig[4].isnan() and tanh[4].isnan()
    assert tanh[5].item() == special[5].item()  # the smallest subnormal: tanh(x) = x


def test_cpu_activations_hook_rejects_other_dtypes():
    with pytest.raises(RuntimeError, match="x must be a float32 CPU tensor"):
        torch.ops.fusedgru._cpu_activations(torch.zeros(3, dtype=torch.float64))


@pytest.mark.parametrize("reset_after", [True, False], ids=["after", "before"])
@pytest.mark.parametrize("shape", [(7, 5, 9, 17), (7, 3, 40, 63), (3, 33, 20, 100)],
                         ids=lambda s: "T%dB%dI%dH%d" % s)
def test_both_activation_paths_match_reference(shape, reset_after, activations, gen, poisoned):
    """float32 layers with either activation routine (forward, inference, backward) are within
    SPEC's budget against the float64 reference; the inputs reach the gates' saturated range
    (pre-activations up to ~10) as well as the small-|x| range of tanh's series."""
    case = testing.make_layer_case(*shape, reset_after=reset_after, generator=gen)
    case.x.mul_(4.0)
    report = testing.check_layer("cpu", case, dtype=torch.float32)
    assert report.ok, report.failures


def test_pointwise_loops_split_over_threads_match_reference(gen, poisoned):
    """The per-step pointwise loops split into one task per (row, 64-unit chunk)
    (fusedgru::_set_cpu_inline_elems(1); by default they split only above 16K units) over
    2 threads: forward, inference and backward within SPEC's budget, dense, packed and with
    resets."""
    prev = torch.ops.fusedgru._set_cpu_inline_elems(1)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for T, B, I, H in [(3, 5, 7, 130), (4, 9, 3, 64)]:
            for kw in ({}, {"lengths": sorted([T] + [1 + k % T for k in range(B - 1)],
                                              reverse=True)},
                       {"resets": torch.rand(T, B, generator=gen) < 0.3}):
                for reset_after in (True, False):
                    case = make_layer_case(T, B, I, H, reset_after=reset_after, generator=gen,
                                           **kw)
                    report = check_layer("cpu", case, dtype=torch.float32)
                    assert report.ok, (T, B, I, H, kw, report.failures)
    finally:
        torch.ops.fusedgru._set_cpu_inline_elems(prev)
        torch.set_num_threads(threads)
    with pytest.raises(RuntimeError, match="n must be >= 1"):
        torch.ops.fusedgru._set_cpu_inline_elems(0)


@pytest.mark.parametrize("reset_after", [True, False], ids=["after", "before"])
def test_cpu_automatic_panel_rule(reset_after, gen, poisoned):
    """The default panel rule (fusedgru::_set_cpu_panel_rows(-1)): the forward's per-step
    products of 8..32 rows (9..32 when H > 512; no upper bound where the panels are the
    AVX-512 ones) in a call of at least 8 steps take the panels (their rounding differs
    from ATen's GEMM and the inline products: the outputs are not bitwise equal to the
    panels switched off), other calls do not (bitwise equal); every case within SPEC's
    budget, dense, packed (rows per step vary across the rule's bounds) and with resets."""
    def y_of(case, rows):
        prev = torch.ops.fusedgru._set_cpu_panel_rows(rows)
        try:
            return torch.ops.fusedgru.gru_infer(*case.args(dtype=torch.float32), reset_after,
                                                *case.seq_args())
        finally:
            torch.ops.fusedgru._set_cpu_panel_rows(prev)

    assert torch.ops.fusedgru._set_cpu_panel_rows(-1) == -1  # the default
    small_b = torch.ops.fusedgru._set_cpu_small_batch(8)
    torch.ops.fusedgru._set_cpu_small_batch(small_b)
    wide = torch.ops.fusedgru._set_cpu_small_avx512(False)  # the AVX-512 panels: no bound
    torch.ops.fusedgru._set_cpu_small_avx512(wide)
    hi = float("inf") if wide else 32
    # H > 128: the panels sum in blocks of 128 terms, an order ATen's GEMM does not use;
    # H > 512: from small_b + 1 rows (9), else from 8
    for T, B, H in [(9, 20, 130), (8, 32, 150), (7, 20, 130), (9, 33, 130), (9, 8, 130),
                    (9, 7, 130), (8, 9, 520), (8, 8, 520), (8, 70, 130), (7, 70, 130)]:
        for kw in ({}, {"lengths": sorted([T] + [1 + k % T for k in range(B - 1)],
                                          reverse=True)},
                   {"resets": torch.rand(T, B, generator=gen) < 0.3}):
            case = make_layer_case(T, B, 6, H, reset_after=reset_after, generator=gen, **kw)
            report = check_layer("cpu", case, dtype=torch.float32)
            assert report.ok, (T, B, H, kw, report.failures)
            rows = case.batch_sizes.tolist() if case.batch_sizes is not None else [B] * T
            lo = small_b if H > 512 else min(7, small_b)
            panels = T >= 8 and any(lo < r <= hi for r in rows)
            assert torch.equal(y_of(case, -1), y_of(case, 0)) != panels, (T, B, H, kw)


AVX512 = EXT_ERROR is None and torch.ops.fusedgru._cpu_has_avx512()
NO_AVX512 = "this CPU lacks AVX-512F (or ATEN_CPU_CAPABILITY names another level)"


def _small_product_outputs(case):
    """gru_infer, gru_fwd's y and gru_bwd's gradients of a layer case in float32."""
    args = case.args(dtype=torch.float32)
    y, ws = torch.ops.fusedgru.gru_fwd(*args, True)
    grads = torch.ops.fusedgru.gru_bwd(case.grad_y.float(), args[0], args[1], args[2], args[3],
                                       y, ws, True)
    return (torch.ops.fusedgru.gru_infer(*args, True), y) + tuple(grads)


@pytest.mark.parametrize("avx512", [False, pytest.param(
    True, marks=pytest.mark.skipif(not AVX512, reason=NO_AVX512))])
def test_inline_products_pairs_and_thread_split_are_bitwise_equal(gen, poisoned, avx512):
    """small_nt's two batch rows at a time (fusedgru::_set_cpu_small_pairs) and its split of
    weight rows over 2 threads (_set_cpu_small_split; a task gets >= 128K multiply-adds, so
    H=600 with 5 rows splits) keep every output's sum in the same order: forward,
    inference and backward bitwise equal across the four settings, odd batch sizes
    included, and within SPEC's budget; in the AVX2 loops and in the AVX-512 ones
    (_set_cpu_small_avx512, whose tiles take 4 batch rows at a time)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    pairs = torch.ops.fusedgru._set_cpu_small_pairs(True)
    split = torch.ops.fusedgru._set_cpu_small_split(True)
    wide = torch.ops.fusedgru._set_cpu_small_avx512(avx512)
    try:
        for T, B, I, H in [(1, 5, 700, 600), (2, 8, 33, 600), (3, 7, 9, 17)]:
            case = make_layer_case(T, B, I, H, generator=gen)
            outs = []
            for p, s in [(False, False), (True, False), (False, True), (True, True)]:
                torch.ops.fusedgru._set_cpu_small_pairs(p)
                torch.ops.fusedgru._set_cpu_small_split(s)
                outs.append(_small_product_outputs(case))
                report = check_layer("cpu", case, dtype=torch.float32)
                assert report.ok, (T, B, I, H, p, s, report.failures)
            for other in outs[1:]:
                for a, b in zip(outs[0], other):
                    assert torch.equal(a, b), (T, B, I, H)
    finally:
        torch.ops.fusedgru._set_cpu_small_pairs(pairs)
        torch.ops.fusedgru._set_cpu_small_split(split)
        torch.ops.fusedgru._set_cpu_small_avx512(wide)
        torch.set_num_threads(threads)


@pytest.mark.skipif(not AVX512, reason=NO_AVX512)
def test_inline_products_prefetch_modes_are_bitwise_equal(gen, poisoned):
    """small_nt's AVX-512 tiles prefetch the next group of weight rows during a group's last
    batch tile (fusedgru::_set_cpu_small_prefetch: 0 off, 1 L1, 2 L2, the default) when
    the weight matrix is over 1 MB: a hint only, so forward, inference and backward are
    bitwise equal in every mode and within SPEC's budget; batch sizes with and without a
    remainder tile (1, 3, 4, 5, 8), weight rows not a multiple of 4, weights under and over
    1 MB, 1 and 2 threads.  A mode outside 0..2 is refused."""
    threads = torch.get_num_threads()
    mode = torch.ops.fusedgru._set_cpu_small_prefetch(2)
    wide = torch.ops.fusedgru._set_cpu_small_avx512(True)
    try:
        assert mode == 2  # the default
        with pytest.raises(RuntimeError, match="_set_cpu_small_prefetch: mode must be"):
            torch.ops.fusedgru._set_cpu_small_prefetch(3)
        for n_threads in (1, 2):
            torch.set_num_threads(n_threads)
            for T, B, I, H in [(1, 1, 70, 33), (2, 5, 9, 17), (1, 1, 520, 519),
                               (1, 3, 40, 522), (2, 4, 700, 600), (1, 5, 520, 521),
                               (1, 8, 513, 520)]:
                case = make_layer_case(T, B, I, H, generator=gen)
                outs = []
                for m in (0, 1, 2):
                    torch.ops.fusedgru._set_cpu_small_prefetch(m)
                    outs.append(_small_product_outputs(case))
                    report = check_layer("cpu", case, dtype=torch.float32)
                    assert report.ok, (T, B, I, H, m, report.failures)
                for other in outs[1:]:
                    for a, b in zip(outs[0], other):
                        assert torch.equal(a, b), (T, B, I, H, n_threads)
    finally:
        torch.ops.fusedgru._set_cpu_small_prefetch(mode)
        torch.ops.fusedgru._set_cpu_small_avx512(wide)
        torch.set_num_threads(threads)


def _within_budget_in_every_structure(shapes, gen, resets_p, biases=(True,)):
    """Each (T, B, I, H) in float32 against the float64 reference: dense, packed (lengths
    T, then 1 + k % T) and with random resets (probability resets_p), both formulations,
    with and without biases as `biases` says."""
    for T, B, I, H in shapes:
        lengths = sorted([T] + [1 + k % T for k in range(B - 1)], reverse=True)
        for kw in ({}, {"lengths": lengths},
                   {"resets": torch.rand(T, B, generator=gen) < resets_p}):
            for reset_after in (True, False):
                for bias in biases:
                    case = make_layer_case(T, B, I, H, reset_after=reset_after, bias=bias,
                                           generator=gen, **kw)
                    report = check_layer("cpu", case, dtype=torch.float32)
                    assert report.ok, (T, B, I, H, kw, reset_after, bias, report.failures)


@pytest.mark.skipif(not AVX512, reason=NO_AVX512)
def test_inline_products_avx512_within_budget(gen, poisoned):
    """The AVX-512 small products (the default where the CPU has them) against the float64
    reference, both formulations, dense, packed and with resets, at sizes that reach every
    tile: batch rows 1..9 (tiles of 4 rows, then 3, 2 or 1), weight rows 3H with 3H mod 4 =
    0..3 (the last rows one by one), and every k tail (K = 1, 6, 15, 16, 17, 31, 600: a
    masked step alone, after whole steps, or none).  And they are taken: their bits differ
    from the AVX2 loops' (16-lane partial sums instead of 8), within float32 rounding."""
    assert torch.ops.fusedgru._set_cpu_small_avx512(True) is True  # the default here
    try:
        _within_budget_in_every_structure(
            [(3, 1, 1, 5), (2, 2, 15, 7), (2, 3, 16, 9), (2, 4, 17, 33), (2, 5, 31, 16),
             (1, 7, 600, 130), (2, 8, 64, 255), (2, 9, 7, 6)], gen, 0.4)
        case = make_layer_case(2, 5, 600, 130, generator=gen)
        wide = _small_product_outputs(case)
        torch.ops.fusedgru._set_cpu_small_avx512(False)
        narrow = _small_product_outputs(case)
        assert not torch.equal(wide[0], narrow[0])
        for a, b in zip(wide, narrow):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    finally:
        torch.ops.fusedgru._set_cpu_small_avx512(True)


@pytest.mark.skipif(not AVX512, reason=NO_AVX512)
@pytest.mark.parametrize("reset_after", [True, False], ids=["after", "before"])
@pytest.mark.parametrize("switch", ["_set_cpu_outer_avx512", "_set_cpu_nn_avx512"],
                         ids=["outer", "nn"])
def test_backward_products_avx512_bitwise_equal_avx2(gen, poisoned, reset_after, switch):
    """The backward's few-row products in AVX-512 give the AVX2 loops' bits (each output's
    sum in the same order): the weight gradients (fusedgru::_set_cpu_outer_avx512; rows
    r = 1..8, 9 falls back) and the dh / dx products (_set_cpu_nn_avx512; 4 batch rows at
    a time, then one by one).  Every row count 1..9, odd output row counts, column tails
    (K = 1, 15, 16, 17, 600; 64-column slabs, then 16, then masked) and, at H = 600, a dW_hh
    of 4.3 MB (non-temporal stores, rows not all 64-byte aligned); 1 and 2 threads.  Both
    within SPEC's budget."""
    threads = torch.get_num_threads()
    set_avx512 = getattr(torch.ops.fusedgru, switch)
    prev = set_avx512(True)
    shapes = [(1, 1, 1, 5), (1, 2, 15, 7), (1, 3, 16, 9), (2, 2, 17, 33), (5, 1, 600, 16),
              (3, 2, 7, 6), (1, 7, 17, 600), (1, 8, 33, 130), (1, 9, 5, 11)]
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            for T, B, I, H in shapes:
                case = make_layer_case(T, B, I, H, reset_after=reset_after, generator=gen)
                args = case.args(dtype=torch.float32)
                y, ws = torch.ops.fusedgru.gru_fwd(*args, reset_after)
                gy = case.grad_y.float()

                def grads(on):
                    set_avx512(on)
                    return torch.ops.fusedgru.gru_bwd(gy, args[0], args[1], args[2], args[3],
                                                      y, ws, reset_after)

                wide, narrow = grads(True), grads(False)
                for a, b in zip(wide, narrow):
                    assert torch.equal(a, b), (n, T, B, I, H)
                set_avx512(True)
                report = check_layer("cpu", case, dtype=torch.float32)
                assert report.ok, (T, B, I, H, report.failures)
    finally:
        set_avx512(prev)
        torch.set_num_threads(threads)


def test_small_task_macs_switch():
    """fusedgru::_set_cpu_small_task_macs (the multiply-adds a parallel task of the inline
    products gets at least) returns the previous value, refuses a value below 1 naming
    the switch, and a split at any task size gives the same bits at 2 threads (each
    output is summed by one task, in order)."""
    ops = torch.ops.fusedgru
    prev = ops._set_cpu_small_task_macs(1 << 17)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert prev == 1 << 17  # the default (every test restores what it sets)
        with pytest.raises(RuntimeError, match="_set_cpu_small_task_macs"):
            ops._set_cpu_small_task_macs(0)
        case = make_layer_case(2, 1, 256, 256, generator=torch.Generator().manual_seed(5))
        outs = []
        for macs in (1 << 30, 1 << 17, 1 << 12):
            ops._set_cpu_small_task_macs(macs)
            outs.append(_small_product_outputs(case))
        for other in outs[1:]:
            for a, b in zip(outs[0], other):
                assert torch.equal(a, b)
    finally:
        ops._set_cpu_small_task_macs(prev)
        torch.set_num_threads(threads)


def test_small_avx512_switch_follows_the_cpu_capability():
    """ATEN_CPU_CAPABILITY=avx2 (torch's own way to cap the instruction set) turns the
    AVX-512 products off, and asking for them then is refused with a message naming the
    switch; results stay within budget on the AVX2 loops."""
    import os
    import subprocess
    import sys
    code = (
        "import torch, fusedgru.extension as e; e._load()\n"
        "from fusedgru.testing import check_layer, make_layer_case\n"
        "assert torch.ops.fusedgru._cpu_has_avx512() is False\n"
        "assert torch.ops.fusedgru._set_cpu_small_avx512(False) is False\n"
        "try:\n"
        "    torch.ops.fusedgru._set_cpu_small_avx512(True)\n"
        "    raise SystemExit('not refused')\n"
        "except RuntimeError as err:\n"
        "    assert '_set_cpu_small_avx512' in str(err), err\n"
        "case = make_layer_case(2, 5, 17, 33, generator=torch.Generator().manual_seed(3))\n"
        "assert check_layer('cpu', case, dtype=torch.float32).ok\n")
    env = dict(os.environ, ATEN_CPU_CAPABILITY="avx2")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]



@pytest.mark.skipif(not AVX512, reason=NO_AVX512)
def test_small_wide_rows_take_the_avx512_products(gen, poisoned):
    """Where small_nt runs in AVX-512, the forward's float32 products of up to
    _set_cpu_small_wide rows (64 by default) take it instead of ATen's GEMM: within SPEC's
    budget at 9..64 rows (dense, packed, resets, both formulations, training included), and
    the switch changes exactly what it says: float32 calls of <= 64 rows, not 65 rows, not
    float64, not when _set_cpu_small_batch(0) puts every product on ATen's GEMM.  Products
    whose K is below _set_cpu_small_wide_min_k (512 where MKL runs AVX-512 too, else 0)
    take the wide rows up to 48 only."""
    ops = torch.ops.fusedgru
    assert ops._set_cpu_small_wide(64) == 64  # the default
    assert ops._set_cpu_small_wide_min_k(-1) == -1  # the default
    try:
        _within_budget_in_every_structure(
            [(1, 9, 20, 33), (1, 64, 7, 130), (2, 30, 9, 17), (3, 21, 5, 40)], gen, 0.3)

        def y_of(case, dtype, wide, small_b=8, min_k=0):
            prev = (ops._set_cpu_small_wide(wide), ops._set_cpu_small_batch(small_b),
                    ops._set_cpu_small_wide_min_k(min_k))
            try:
                return ops.gru_infer(*case.args(dtype=dtype), True)
            finally:
                ops._set_cpu_small_wide(prev[0])
                ops._set_cpu_small_batch(prev[1])
                ops._set_cpu_small_wide_min_k(prev[2])

        # I = 50, H = 70: both products' K; min_k 512 caps them at 48 rows, 32 does not
        for B, dtype, small_b, min_k, moves in [(40, torch.float32, 8, 0, True),
                                                (64, torch.float32, 8, 0, True),
                                                (65, torch.float32, 8, 0, False),
                                                (40, torch.float64, 8, 0, False),
                                                (40, torch.float32, 0, 0, False),
                                                (48, torch.float32, 8, 512, True),
                                                (49, torch.float32, 8, 512, False),
                                                (64, torch.float32, 8, 512, False),
                                                (64, torch.float32, 8, 32, True)]:
            case = make_layer_case(1, B, 50, 70, generator=gen)
            same = torch.equal(y_of(case, dtype, 64, small_b, min_k),
                               y_of(case, dtype, 0, small_b, min_k))
            assert same != moves, (B, dtype, small_b, min_k)
        with pytest.raises(RuntimeError, match="rows must be >= 0"):
            ops._set_cpu_small_wide(-1)
        with pytest.raises(RuntimeError, match="k must be >= -1"):
            ops._set_cpu_small_wide_min_k(-2)
    finally:
        ops._set_cpu_small_wide(64)
        ops._set_cpu_small_wide_min_k(-1)


@pytest.mark.skipif(not AVX512, reason=NO_AVX512)
def test_mkl_capped_below_avx512_keeps_the_wide_rows_at_short_k():
    """With MKL_ENABLE_INSTRUCTIONS naming a level below AVX-512, ATen's GEMM is not the
    AVX-512 one, so the cap for short K (_set_cpu_small_wide_min_k) does not apply by
    default: 64 rows with K = 50 and 70 take small_nt (outputs differ from the wide rows
    off), as the explicit min_k 0 says; MKL_CBWR=AUTO leaves the rule to the CPU."""
    import os
    import subprocess
    import sys
    code = (
        "import sys, torch, fusedgru.extension as e; e._load()\n"
        "from fusedgru.testing import make_layer_case\n"
        "ops = torch.ops.fusedgru\n"
        "args = make_layer_case(1, 64, 50, 70, generator=torch.Generator().manual_seed(3))"
        ".args(dtype=torch.float32)\n"
        "def y(wide, min_k):\n"
        "    prev = (ops._set_cpu_small_wide(wide), ops._set_cpu_small_wide_min_k(min_k))\n"
        "    out = ops.gru_infer(*args, True)\n"
        "    ops._set_cpu_small_wide(prev[0]); ops._set_cpu_small_wide_min_k(prev[1])\n"
        "    return out\n"
        "assert torch.equal(y(64, -1), y(64, 0)), 'the cap applied'\n"
        "assert not torch.equal(y(64, -1), y(0, -1)), 'the wide rows did not apply'\n")
    env = dict(os.environ, MKL_ENABLE_INSTRUCTIONS="AVX2", MKL_CBWR="AUTO")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.skipif(not AVX512, reason=NO_AVX512)
@pytest.mark.parametrize("threads", [1, 2])
def test_avx512_element_phase_is_bitwise_the_avx2_loop(gen, poisoned, threads):
    """The forward's float32 element phase in AVX-512 (_set_cpu_pointwise_avx512: 16 units
    per instruction, the gate activations' operations in ATen's AVX2 order) gives the AVX2
    loop's bits: y, ws and gru_infer's y, both formulations, H below, at and across 16
    (the AVX2 loop takes the units past the last whole 16), saturating gates (inputs x 8),
    a NaN input (propagated the same way), 1 and 2 threads (the element phase split into
    chunks of units)."""
    ops = torch.ops.fusedgru
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for T, B, I, H in [(3, 5, 7, 37), (2, 1, 3, 1), (4, 9, 5, 16), (9, 3, 5, 17),
                           (3, 33, 20, 130), (2, 4, 6, 600)]:
            for reset_after in (True, False):
                case = make_layer_case(T, B, I, H, reset_after=reset_after, generator=gen)
                x, h0, w_ih, w_hh, b_ih, b_hh = case.args(dtype=torch.float32)
                x = x * 8
                x[0, 0, 0] = float("nan")
                outs = []
                for on in (True, False):
                    prev = ops._set_cpu_pointwise_avx512(on)
                    try:
                        outs.append(ops.gru_fwd(x, h0, w_ih, w_hh, b_ih, b_hh, reset_after) +
                                    (ops.gru_infer(x, h0, w_ih, w_hh, b_ih, b_hh, reset_after),))
                    finally:
                        ops._set_cpu_pointwise_avx512(prev)
                for a, b in zip(*outs):
                    assert torch.equal(a.isnan(), b.isnan()), (T, B, I, H, reset_after)
                    assert torch.equal(a.nan_to_num(0.5), b.nan_to_num(0.5)), \
                        (T, B, I, H, reset_after)
                y = outs[0][0]  # the NaN reaches row 0 only: rows are independent
                assert y[:, 0].isnan().any() and not y[:, 1:].isnan().any()
        assert ops._set_cpu_pointwise_avx512(True) is True  # the default
    finally:
        torch.set_num_threads(prev_threads)


@pytest.mark.skipif(not AVX512, reason=NO_AVX512)
def test_avx512_panels_are_bitwise_the_avx2_panels(gen, poisoned):
    """The forward's per-step panel products in AVX-512 (8 rows x 32 columns) sum every
    output in the AVX2 micro-kernel's order (blocks of 128 terms, each from zero, added into
    out): bitwise the same y, h_n and ws, in both formulations, at row tails (9..31 rows: 8-row
    tiles, then 1..7), column tails (3H = 27, 390: panels of 32 not full) and k tails
    (H = 130: a block of 128 then 2).  Dense calls of T >= 8 (the panels' rule) with the
    AVX-512 input projection off, so that nothing else differs."""
    ops = torch.ops.fusedgru
    prev = ops._set_cpu_wide_gi(False)
    try:
        for T, B, I, H in [(8, 9, 5, 9), (9, 20, 7, 130), (8, 31, 3, 64), (10, 16, 40, 17)]:
            for reset_after in (True, False):
                case = make_layer_case(T, B, I, H, reset_after=reset_after, generator=gen)
                args = case.args(dtype=torch.float32)
                outs = []
                for on in (True, False):
                    ops._set_cpu_small_avx512(on)
                    outs.append(ops.gru_fwd(*args, reset_after) +
                                (ops.gru_infer(*args, reset_after),))
                ops._set_cpu_small_avx512(True)
                for a, b in zip(*outs):
                    assert torch.equal(a, b), (T, B, I, H, reset_after)
                assert check_layer("cpu", case, dtype=torch.float32).ok
    finally:
        ops._set_cpu_small_avx512(True)
        ops._set_cpu_wide_gi(prev)


@pytest.mark.skipif(not AVX512, reason=NO_AVX512)
def test_avx512_input_projection_within_budget(gen, poisoned):
    """gi = x W_ih^T + b_ih of more than 64 rows on the AVX-512 panels (_set_cpu_wide_gi, off
    by default) instead of ATen's GEMM: within SPEC's budget, dense, packed and with resets,
    both formulations, with and without biases, at odd sizes (3H = 21, 390; I = 1, 130: k
    tails of the 128-term blocks; rows 65..300: 128-row tasks and 8-row tiles with tails);
    and taken: y differs from the GEMM's bits, within float32 rounding."""
    ops = torch.ops.fusedgru
    assert ops._set_cpu_wide_gi(True) is False  # off by default (not faster than MKL here)
    try:
        _within_budget_in_every_structure(
            [(5, 13, 130, 7), (3, 33, 1, 130), (10, 30, 33, 20)], gen, 0.3, biases=(True, False))
        case = make_layer_case(5, 13, 130, 7, generator=gen)
        wide = ops.gru_infer(*case.args(dtype=torch.float32), True)
    finally:
        ops._set_cpu_wide_gi(False)
    gemm = ops.gru_infer(*case.args(dtype=torch.float32), True)
    assert not torch.equal(wide, gemm)
    torch.testing.assert_close(wide, gemm, rtol=1e-4, atol=1e-5)


def test_weight_gradients_streamed_are_bitwise_the_same(gen, poisoned):
    """small_outer's non-temporal stores (_set_cpu_outer_nt, on by default, for a weight
    gradient of >= 4 MB: 3H x I floats with H = 600, I = 700 is 5 MB, where the two dW
    exceed half the last-level cache: _set_cpu_llc_bytes(0), an unknown cache, makes them
    stream here whatever this host's L3) change where the values go, not the values: dW_ih
    and dW_hh bitwise equal with them off, aligned rows (I = 704) and unaligned ones
    (I = 700, H = 600: rows of 2800 and 2400 bytes, a mix).  The cache switch returns the
    previous setting and refuses a value below -1 (-1: what sysconf reports)."""
    ops = torch.ops.fusedgru
    assert ops._set_cpu_outer_nt(True) is True  # the default
    assert ops._set_cpu_llc_bytes(0) == -1  # the default: sysconf's
    with pytest.raises(RuntimeError, match="_set_cpu_llc_bytes"):
        ops._set_cpu_llc_bytes(-2)
    try:
        for T, B, I, H in [(1, 2, 700, 600), (1, 1, 704, 608)]:
            case = make_layer_case(T, B, I, H, generator=gen)
            args = case.args(dtype=torch.float32)
            outs = []
            for on in (True, False):
                ops._set_cpu_outer_nt(on)
                y, ws = ops.gru_fwd(*args, True)
                outs.append(ops.gru_bwd(case.grad_y.float(), args[0], args[1], args[2], args[3],
                                        y, ws, True))
            for a, b in zip(*outs):
                if a is not None:
                    assert torch.equal(a, b), (T, B, I, H)
            ops._set_cpu_outer_nt(True)
            assert check_layer("cpu", case, dtype=torch.float32).ok
    finally:
        ops._set_cpu_outer_nt(True)
        ops._set_cpu_llc_bytes(-1)


def test_a_build_without_the_gradient_mask_is_unavailable(monkeypatch):
    """A fusedgru._C built before gru_bwd took need_dx / need_dw (a stale in-place build)
    would fail every backward: the backend says so, naming the fix, instead of running."""
    from fusedgru import extension

    assert extension._bwd_takes_grad_mask()  # this build has them
    assert extension.cpu_backend.unavailable_reason() is None
    monkeypatch.setattr(extension, "_bwd_takes_grad_mask", lambda: False)
    why = extension.cpu_backend.unavailable_reason()
    assert why is not None and "need_dx" in why and "rebuild" in why


def test_b_ih_folded_into_the_element_phase_within_budget(gen, poisoned):
    """gi without b_ih, b_ih added in the element phase (fusedgru::_set_cpu_fold_bias_ih,
    the default) and b_ih in gi (the switch off): both against the float64 reference on
    every path gi takes (the inline products: 1 row; the panels: a sequence of 40 rows;
    ATen's GEMM: 96 rows at T=1), both formulations, with and without biases, dense, packed
    and with resets.  And the switch is taken: the bits differ with biases, not without."""
    ops = torch.ops.fusedgru
    assert ops._set_cpu_fold_bias_ih(True) is True  # the default
    shapes = [(3, 1, 5, 7), (10, 4, 6, 40), (1, 96, 9, 33)]
    try:
        for fold in (True, False):
            ops._set_cpu_fold_bias_ih(fold)
            _within_budget_in_every_structure(shapes, gen, 0.3, biases=(True, False))
        for T, B, I, H in shapes:
            for bias in (True, False):
                case = make_layer_case(T, B, I, H, bias=bias, generator=gen)
                ops._set_cpu_fold_bias_ih(True)
                folded = _small_product_outputs(case)
                ops._set_cpu_fold_bias_ih(False)
                in_gi = _small_product_outputs(case)
                assert torch.equal(folded[0], in_gi[0]) != bias, (T, B, I, H, bias)
                for a, b in zip(folded, in_gi):
                    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    finally:
        ops._set_cpu_fold_bias_ih(True)
