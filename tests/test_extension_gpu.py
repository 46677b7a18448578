"""The "cuda" backend (csrc/gru_cuda.cu) on a GPU: parity with the float64 reference in every
dtype, on both CUDA paths (persistent cooperative kernels and the per-step fallback), with
poisoned outputs; gradcheck in float64; determinism; the dispatcher's capacity plan; the
inference op gru_infer (y bitwise gru_fwd's, no (T, B, 4H) ws allocated, opcheck).

Run by the repository's GPU script (`pytest -m gpu`); skipped without a CUDA device.  The
default shapes are the first-contact subset (B = H = 1, odd H below and above 128, two
128-row passes); the others (mark "exhaustive") run with --gpu-exhaustive.
"""

import contextlib

import pytest
import torch

import fusedgru
from fusedgru import reference, testing

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (GPU script)"),
]


def _ext_ready():
    from fusedgru import extension

    why = extension.cuda_backend.unavailable_reason()
    if why is not None:
        pytest.fail(f"a GPU is present but the cuda backend is unavailable: {why}")


@pytest.fixture
def poisoned():
    prev = torch.ops.fusedgru._set_poison(True)
    yield
    torch.ops.fusedgru._set_poison(prev)


@pytest.fixture(params=[0, 2], ids=["auto-path", "per-step-path"])
def cuda_path(request):
    prev = torch.ops.fusedgru._set_cuda_path(request.param)
    yield request.param
    torch.ops.fusedgru._set_cuda_path(prev)


@contextlib.contextmanager
def fp32_precision(tf32: bool, fp32_path: int = 0):
    """float32 as TF32 (True) or strict (False) for the kernels AND the baseline: the cuda
    backend follows cuDNN's RNN setting (torch.backends.cudnn.rnn.fp32_precision, as nn.GRU
    does); the reference it is measured against runs cuBLAS matmuls, which follow
    torch.backends.cuda.matmul.  Strict float32 runs 3xTF32 (fp32_path 0) or the FMA path
    (1: fusedgru::_set_cuda_fp32_path).  Everything restored afterwards."""
    rnn, mm = torch.backends.cudnn.rnn, torch.backends.cuda.matmul
    prev = (rnn.fp32_precision, mm.fp32_precision)
    prev_path = torch.ops.fusedgru._set_cuda_fp32_path(fp32_path)
    rnn.fp32_precision = mm.fp32_precision = "tf32" if tf32 else "ieee"
    try:
        yield
    finally:
        rnn.fp32_precision, mm.fp32_precision = prev
        torch.ops.fusedgru._set_cuda_fp32_path(prev_path)


_TORCH_DEFAULTS = {"test_cuda_float32_follows_cudnn_rnn_precision"}


@pytest.fixture(autouse=True)
def _strict_float32(request):
    """Every test here runs float32 strict (kernels and baseline) unless it sets otherwise
    (the tf32 fixture, fp32_precision) or is in _TORCH_DEFAULTS (it checks what torch's own
    defaults select)."""
    if request.node.originalname in _TORCH_DEFAULTS:
        yield
        return
    with fp32_precision(False):
        yield


@pytest.fixture(params=[(False, 0), (False, 1), (True, 0)],
                ids=["fp32-strict-3xtf32", "fp32-strict-fma", "tf32"])
def tf32(request):
    with fp32_precision(*request.param):
        yield request.param[0]


EXH = pytest.mark.exhaustive  # the rest of the sweep (tests/conftest.py: --gpu-exhaustive)
SHAPES = [(1, 1, 2, 1), pytest.param((2, 3, 5, 3), marks=EXH),
          pytest.param((7, 5, 9, 17), marks=EXH), (7, 3, 40, 63),
          pytest.param((2, 5, 33, 100), marks=EXH), (5, 17, 24, 130),
          (3, 130, 16, 40)]  # B = 130: two 128-row passes per step
def _shape_id(shape):
    return "T%dB%dI%dH%d" % shape


DTYPES = [torch.float64, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("reset_after", [True, False], ids=["after", "before"])
@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_matches_reference(shape, dtype, reset_after, gen, poisoned, cuda_path):
    _ext_ready()
    case = testing.make_layer_case(*shape, reset_after=reset_after, generator=gen)
    report = testing.check_layer("cuda", case, device="cuda", dtype=dtype)
    assert report.ok, report.failures


@pytest.mark.parametrize("reset_after", [True, False], ids=["after", "before"])
@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
def test_cuda_float32(shape, reset_after, gen, poisoned, cuda_path, tf32):
    _ext_ready()
    case = testing.make_layer_case(*shape, reset_after=reset_after, generator=gen)
    report = testing.check_layer("cuda", case, device="cuda", dtype=torch.float32)
    assert report.ok, report.failures


@pytest.mark.parametrize("with_h0,bias", [(False, True), (True, False)], ids=["noh0", "nobias"])
@pytest.mark.parametrize("reset_after", [True, False], ids=["after", "before"])
def test_cuda_optional_inputs(with_h0, bias, reset_after, gen, poisoned):
    _ext_ready()
    case = testing.make_layer_case(4, 3, 6, 33, reset_after=reset_after, with_h0=with_h0,
                                   bias=bias, generator=gen)
    for dtype in (torch.float32, torch.bfloat16):
        report = testing.check_layer("cuda", case, device="cuda", dtype=dtype)
        assert report.ok, (dtype, report.failures)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_cuda_large(dtype, gen):
    """A size of the benchmark grid (persistent path on an H100): 64 blocks, 2 passes."""
    _ext_ready()
    case = testing.make_layer_case(16, 16, 1024, 1024, generator=gen)
    report = testing.check_layer("cuda", case, device="cuda", dtype=dtype)
    assert report.ok, report.failures


@pytest.mark.parametrize("reset_after", [True, False], ids=["after", "before"])
def test_cuda_gradcheck_float64(reset_after, gen):
    _ext_ready()
    gru = fusedgru.FusedGRU(3, 5, dtype=torch.float64, device="cuda", reset_after=reset_after,
                            backend="cuda")
    x = torch.randn(4, 2, 3, dtype=torch.float64, device="cuda", requires_grad=True)
    h0 = torch.randn(1, 2, 5, dtype=torch.float64, device="cuda", requires_grad=True)
    names = [n for n, _ in gru.named_parameters()]

    def f(x, h0, *ps):
        with torch.nn.utils.stateless._reparametrize_module(gru, dict(zip(names, ps))):
            return gru(x, h0)

    assert torch.autograd.gradcheck(f, (x, h0, *gru.parameters()))


def test_cuda_backward_is_deterministic(gen):
    _ext_ready()
    case = testing.make_layer_case(9, 7, 20, 70, generator=gen)
    x, h0, w_ih, w_hh, b_ih, b_hh = case.args("cuda", torch.float32)
    y, ws = torch.ops.fusedgru.gru_fwd(x, h0, w_ih, w_hh, b_ih, b_hh, True)
    gy = case.grad_y.float().cuda()
    a = torch.ops.fusedgru.gru_bwd(gy, x, h0, w_ih, w_hh, y, ws, True)
    b = torch.ops.fusedgru.gru_bwd(gy, x, h0, w_ih, w_hh, y, ws, True)
    for u, v in zip(a, b):
        assert torch.equal(u, v)


def test_cuda_backward_skips_what_is_not_needed(gen):
    """need_dx / need_dw False (the input / the weights need no gradient): those outputs
    come back empty, the others bitwise the full backward's."""
    _ext_ready()
    case = testing.make_layer_case(9, 7, 20, 70, generator=gen)
    x, h0, w_ih, w_hh, b_ih, b_hh = case.args("cuda", torch.float32)
    y, ws = torch.ops.fusedgru.gru_fwd(x, h0, w_ih, w_hh, b_ih, b_hh, True)
    args = (case.grad_y.float().cuda(), x, h0, w_ih, w_hh, y, ws, True)
    full = torch.ops.fusedgru.gru_bwd(*args)
    for need_dx, need_dw in [(False, True), (True, False), (False, False)]:
        got = torch.ops.fusedgru.gru_bwd(*args, None, None, need_dx, need_dw)
        for k, (g, f) in enumerate(zip(got, full)):
            if (k == 0 and not need_dx) or (k >= 2 and not need_dw):
                assert g.numel() == 0, (k, need_dx, need_dw)
            else:
                assert torch.equal(g, f), (k, need_dx, need_dw)


def test_cuda_plan_knows_the_capacity_limit():
    _ext_ready()
    x = torch.empty(8, 4, 16, device="cuda", dtype=torch.bfloat16)
    small = torch.ops.fusedgru._cuda_plan(x, torch.empty(768, 256, device="cuda",
                                                         dtype=torch.bfloat16), True, False)
    assert small.startswith("persistent"), small
    huge = torch.ops.fusedgru._cuda_plan(x.float(), torch.empty(3 * 8192, 8192, device="cuda"),
                                         True, False)
    assert huge.startswith("per-step"), huge


def test_cuda_rejects_cpu_tensors_mixed():
    _ext_ready()
    x = torch.randn(2, 2, 3, device="cuda")
    with pytest.raises(RuntimeError, match="must be on the device of x"):
        torch.ops.fusedgru.gru_fwd(x, None, torch.randn(9, 3), torch.randn(9, 3, device="cuda"),
                                   None, None, True)


# ---------------------------------------------------------------------------------------
# gru_infer: the forward without ws (what FusedGRU runs when nothing needs a gradient)
# ---------------------------------------------------------------------------------------


@pytest.fixture(params=[1, 2], ids=["persistent-path", "per-step-path"])
def forced_path(request):
    """Each CUDA path forced (1 = persistent or an error), so both really run."""
    prev = torch.ops.fusedgru._set_cuda_path(request.param)
    yield request.param
    torch.ops.fusedgru._set_cuda_path(prev)


INFER_DTYPES = [(torch.float32, False), (torch.float32, True), (torch.float64, False),
                (torch.float16, False), (torch.bfloat16, False)]


@pytest.mark.parametrize("reset_after", [True, False], ids=["after", "before"])
@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
@pytest.mark.parametrize("dtype,allow_tf32", INFER_DTYPES,
                         ids=["fp32-strict", "tf32", "fp64", "fp16", "bf16"])
def test_cuda_infer_matches_forward_and_reference(shape, dtype, allow_tf32, reset_after, gen,
                                                  poisoned, forced_path):
    """gru_infer's y (poisoned beforehand) is bitwise gru_fwd's y (the same kernels, only
    the ws stores skipped) and within SPEC's budget of the float64 reference."""
    _ext_ready()
    with fp32_precision(allow_tf32):
        case = testing.make_layer_case(*shape, reset_after=reset_after, generator=gen)
        args = case.args("cuda", dtype)
        y = torch.ops.fusedgru.gru_infer(*args, reset_after)
        y_fwd, _ = torch.ops.fusedgru.gru_fwd(*args, reset_after)
        base, _ = reference.gru_layer_forward(*args, reset_after)
    want, _ = reference.gru_layer_forward(*case.args(dtype=torch.float64), reset_after)
    assert y.shape == y_fwd.shape and y.dtype == dtype
    assert torch.equal(y, y_fwd)
    err = testing.rel_err(y, want)
    assert err <= testing.budget(dtype, testing.rel_err(base, want)), err


@pytest.mark.parametrize("with_h0,bias", [(False, True), (True, False)], ids=["noh0", "nobias"])
@pytest.mark.parametrize("reset_after", [True, False], ids=["after", "before"])
def test_cuda_infer_optional_inputs(with_h0, bias, reset_after, gen, poisoned):
    _ext_ready()
    case = testing.make_layer_case(4, 3, 6, 33, reset_after=reset_after, with_h0=with_h0,
                                   bias=bias, generator=gen)
    for dtype in (torch.float32, torch.bfloat16):
        args = case.args("cuda", dtype)
        y = torch.ops.fusedgru.gru_infer(*args, reset_after)
        assert torch.equal(y, torch.ops.fusedgru.gru_fwd(*args, reset_after)[0]), dtype


@pytest.mark.parametrize("reset_after", [True, False], ids=["after", "before"])
def test_cuda_infer_allocates_no_ws(reset_after, gen):
    """The peak memory of gru_infer leaves no room for a (T, B, 4H) buffer; gru_fwd's, the
    same call keeping ws, is higher by exactly ws (so the measurement does see it)."""
    _ext_ready()
    T, B, I, H = 256, 32, 64, 64  # ws: 8 MiB in float32, far above the small buffers
    case = testing.make_layer_case(T, B, I, H, reset_after=reset_after, generator=gen)
    args = case.args("cuda", torch.float32)
    torch.ops.fusedgru.gru_fwd(*args, reset_after)  # warm-up: cuBLAS workspace, attributes

    def peak(op):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        op(*args, reset_after)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    e = 4
    ws_bytes, y_bytes, gi_bytes = T * B * 4 * H * e, T * B * H * e, T * B * 3 * H * e
    p_fwd = peak(torch.ops.fusedgru.gru_fwd)
    p_inf = peak(torch.ops.fusedgru.gru_infer)
    assert p_fwd >= y_bytes + gi_bytes + ws_bytes, (p_fwd, ws_bytes)
    assert p_inf < y_bytes + gi_bytes + ws_bytes // 2, (p_inf, ws_bytes)
    assert p_fwd - p_inf >= ws_bytes, (p_fwd, p_inf, ws_bytes)


@pytest.mark.parametrize("reset_after", [True, False], ids=["after", "before"])
@pytest.mark.parametrize("with_h0,bias", [(True, True), (False, False)], ids=["full", "bare"])
def test_cuda_infer_opcheck(reset_after, with_h0, bias, gen):
    _ext_ready()
    case = testing.make_layer_case(5, 3, 8, 12, reset_after=reset_after, with_h0=with_h0,
                                   bias=bias, generator=gen)
    torch.library.opcheck(torch.ops.fusedgru.gru_infer.default,
                          (*case.args("cuda", torch.float32), reset_after))


def test_cuda_module_takes_infer_op_without_grad(gen):
    """FusedGRU(backend="cuda") runs gru_infer (and never gru_fwd) under no_grad and
    inference_mode, with the output of the training-mode call bit for bit."""
    _ext_ready()
    f = fusedgru.FusedGRU(6, 17, num_layers=2, bidirectional=True, device="cuda",
                          backend="cuda")
    x = torch.randn(5, 3, 6, generator=gen).cuda()
    y_train = f(x)[0]
    for ctx in (torch.no_grad, torch.inference_mode):
        with ctx(), testing.OpLog() as log:
            y = f(x)[0]
        assert log.names.count("fusedgru.gru_infer.default") == 4, log.names
        assert "fusedgru.gru_fwd.default" not in log.names
        assert torch.equal(y, y_train.detach())


def test_cuda_infer_edge_cases():
    _ext_ready()
    y = torch.ops.fusedgru.gru_infer(torch.randn(0, 3, 4, device="cuda"), None,
                                     torch.randn(15, 4, device="cuda"),
                                     torch.randn(15, 5, device="cuda"), None, None, True)
    assert y.shape == (0, 3, 5)
    x = torch.randn(2, 2, 3, device="cuda")
    with pytest.raises(RuntimeError, match="gru_infer.*must be on the device of x"):
        torch.ops.fusedgru.gru_infer(x, None, torch.randn(9, 3),
                                     torch.randn(9, 3, device="cuda"), None, None, True)


# ---------------------------------------------------------------------------------------
# Sequence structure (issue 19): packed batches (batch_sizes) and resets in the kernels
# ---------------------------------------------------------------------------------------

# T, B, I, H, lengths (B non-increasing, the first = T)
SEQ_PACKED = {
    "skewed": (9, 5, 6, 33, [9, 2, 2, 1, 1]),  # one long sequence, ties, length 1
    # rows 19, 17, 8, 5, 3, 2: two batch tiles, then one
    "tiles": (6, 19, 5, 40, [6, 6, 5, 4, 4, 3, 3, 3] + [2] * 9 + [1, 1]),
    # rows 130, 129, 2: two 128-row passes per phase, then one
    "passes": (3, 130, 16, 40, [3, 3] + [2] * 127 + [1]),
    "k-split": (4, 3, 8, 130, [4, 3, 1]),  # 9 blocks, K split over warps
}


def _resets(kind: str, T: int, B: int, gen) -> torch.Tensor:
    if kind == "random":  # anywhere, at t = 0 and the last step among them
        m = torch.rand(T, B, generator=gen) < 0.3
        m[0, 0] = m[T - 1, B - 1] = True
        return m
    m = torch.zeros(T, B, dtype=torch.bool)
    if kind == "t0":  # h0 dropped for the even rows, dh0 zero there
        m[0, 0::2] = True
    elif kind == "end":  # the last step restarts every row: nothing carried back from it
        m[T - 1] = True
    elif kind == "one-row":  # row 1 restarts at every step
        m[:, 1] = True
    return m


SEQ_RESETS = ["random", "t0", "end", "one-row"]
# T, B, I, H of the resets cases: 3 blocks and 2 batch tiles; two 128-row passes
RESET_SHAPES = [(5, 17, 6, 33), pytest.param((3, 130, 16, 40), marks=EXH)]
SEQ_DTYPES = [pytest.param(torch.float64, False, id="fp64"),
              pytest.param(torch.float32, False, id="fp32-strict"),
              pytest.param(torch.float32, True, id="tf32"),
              pytest.param(torch.bfloat16, False, id="bf16", marks=EXH),
              pytest.param(torch.float16, False, id="fp16", marks=EXH)]


def _check_seq(case, dtype, allow_tf32, reset_after):
    """check_layer (gru_fwd + gru_bwd vs the float64 reference with the same batch_sizes /
    resets, on poisoned outputs), then gru_infer's y bitwise gru_fwd's."""
    with fp32_precision(allow_tf32):
        report = testing.check_layer("cuda", case, device="cuda", dtype=dtype)
        args, seq = case.args("cuda", dtype), case.seq_args("cuda")
        y = torch.ops.fusedgru.gru_infer(*args, reset_after, *seq)
        y_fwd, _ = torch.ops.fusedgru.gru_fwd(*args, reset_after, *seq)
    assert report.ok, report.failures
    assert torch.equal(y, y_fwd)


@pytest.mark.parametrize("reset_after", [True, False], ids=["after", "before"])
@pytest.mark.parametrize("name", list(SEQ_PACKED))
@pytest.mark.parametrize("dtype,allow_tf32", SEQ_DTYPES)
def test_cuda_packed_matches_reference(name, dtype, allow_tf32, reset_after, gen, poisoned,
                                       forced_path):
    _ext_ready()
    T, B, I, H, lengths = SEQ_PACKED[name]
    case = testing.make_layer_case(T, B, I, H, reset_after=reset_after, generator=gen,
                                   lengths=lengths)
    _check_seq(case, dtype, allow_tf32, reset_after)


@pytest.mark.parametrize("reset_after", [True, False], ids=["after", "before"])
@pytest.mark.parametrize("kind", SEQ_RESETS)
@pytest.mark.parametrize("shape", RESET_SHAPES, ids=lambda s: "T%dB%dI%dH%d" % s)
@pytest.mark.parametrize("dtype,allow_tf32", SEQ_DTYPES)
def test_cuda_resets_match_reference(shape, kind, dtype, allow_tf32, reset_after, gen,
                                     poisoned, forced_path):
    _ext_ready()
    T, B, I, H = shape
    case = testing.make_layer_case(T, B, I, H, reset_after=reset_after, generator=gen,
                                   resets=_resets(kind, T, B, gen))
    _check_seq(case, dtype, allow_tf32, reset_after)


@pytest.mark.parametrize("with_h0,bias", [(False, True), (True, False)], ids=["noh0", "nobias"])
@pytest.mark.parametrize("reset_after", [True, False], ids=["after", "before"])
def test_cuda_seq_optional_inputs(with_h0, bias, reset_after, gen, poisoned):
    _ext_ready()
    T, B, I, H, lengths = SEQ_PACKED["skewed"]
    for kw in (dict(lengths=lengths), dict(resets=_resets("random", T, B, gen))):
        case = testing.make_layer_case(T, B, I, H, reset_after=reset_after, with_h0=with_h0,
                                       bias=bias, generator=gen, **kw)
        for dtype in (torch.float64, torch.float32):
            _check_seq(case, dtype, False, reset_after)


@pytest.mark.parametrize("reset_after", [True, False], ids=["after", "before"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_seq_without_effect_is_bitwise_dense(dtype, reset_after, gen, forced_path):
    """Packed with every length T (the dense rows in the same order) and resets all False
    take the structure's code paths with nothing to do: every output bitwise the dense
    call's."""
    _ext_ready()
    T, B, I, H = 5, 17, 6, 33
    case = testing.make_layer_case(T, B, I, H, reset_after=reset_after, generator=gen)
    x, h0, w_ih, w_hh, b_ih, b_hh = case.args("cuda", dtype)
    gy = case.grad_y.to("cuda", dtype)
    ops = torch.ops.fusedgru

    def run(x, gy, seq):
        y, ws = ops.gru_fwd(x, h0, w_ih, w_hh, b_ih, b_hh, reset_after, *seq)
        grads = ops.gru_bwd(gy, x, h0, w_ih, w_hh, y, ws, reset_after, *seq)
        return [t.reshape(-1) for t in (y, ws, ops.gru_infer(x, h0, w_ih, w_hh, b_ih, b_hh,
                                                             reset_after, *seq), *grads)]

    dense = run(x, gy, (None, None))
    packed = run(x.reshape(T * B, I), gy.reshape(T * B, H), (torch.full((T,), B), None))
    no_resets = run(x, gy, (None, torch.zeros(T, B, dtype=torch.bool, device="cuda")))
    for a, b, c in zip(dense, packed, no_resets):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_cuda_packed_backward_is_deterministic(gen):
    _ext_ready()
    T, B, I, H, lengths = SEQ_PACKED["tiles"]
    case = testing.make_layer_case(T, B, I, H, generator=gen, lengths=lengths)
    args, seq = case.args("cuda", torch.float32), case.seq_args("cuda")
    y, ws = torch.ops.fusedgru.gru_fwd(*args, True, *seq)
    gy = case.grad_y.float().cuda()
    x, h0, w_ih, w_hh = args[:4]
    a = torch.ops.fusedgru.gru_bwd(gy, x, h0, w_ih, w_hh, y, ws, True, *seq)
    b = torch.ops.fusedgru.gru_bwd(gy, x, h0, w_ih, w_hh, y, ws, True, *seq)
    for u, v in zip(a, b):
        assert torch.equal(u, v)


# ---------------------------------------------------------------------------------------
# Issue 18: float32 follows the flag nn.GRU follows; strict float32 on 3xTF32 tensor cores
# ---------------------------------------------------------------------------------------

def _plan(dtype=torch.float32, H=256):
    x = torch.empty(8, 16, 32, device="cuda", dtype=dtype)
    return torch.ops.fusedgru._cuda_plan(x, torch.empty(3 * H, H, device="cuda", dtype=dtype),
                                         True, False)


def test_cuda_float32_follows_cudnn_rnn_precision():
    """The kernels' float32 precision is cuDNN's RNN setting (what nn.GRU follows), not the
    cuBLAS matmul setting: TF32 by default, 3xTF32 when strict, the FMA path only under
    _set_cuda_fp32_path(1); "none" inherits cudnn's, then the global setting; the choice
    always agrees with fusedgru.ops.rnn_tf32_allowed; other dtypes are unaffected."""
    _ext_ready()
    from fusedgru import ops

    rnn, cudnn, mm = torch.backends.cudnn.rnn, torch.backends.cudnn, torch.backends.cuda.matmul
    prev = (rnn.fp32_precision, cudnn.fp32_precision, mm.fp32_precision,
            torch.backends.fp32_precision)
    try:
        # torch's defaults (every other test restores what it changes): TF32, like nn.GRU,
        # while cuBLAS matmuls stay strict.
        assert rnn.fp32_precision == "tf32" and ops.rnn_tf32_allowed()
        assert _plan().endswith("tensor cores (TF32)"), _plan()
        cases = [  # (rnn, cudnn, matmul, global) -> TF32?
            (("ieee", "none", "tf32", "none"), False),
            (("tf32", "none", "ieee", "none"), True),
            (("none", "ieee", "tf32", "none"), False),
            (("none", "tf32", "ieee", "none"), True),
            (("none", "none", "ieee", "tf32"), True),
            (("none", "none", "tf32", "ieee"), False),
        ]
        for setting, tf32 in cases:
            rnn.fp32_precision, cudnn.fp32_precision = setting[0], setting[1]
            mm.fp32_precision, torch.backends.fp32_precision = setting[2], setting[3]
            assert ops.rnn_tf32_allowed() == tf32, setting
            want = "tensor cores (TF32)" if tf32 else "tensor cores (3xTF32)"
            assert _plan().endswith(want), (setting, _plan())
        rnn.fp32_precision = "ieee"
        prev_path = torch.ops.fusedgru._set_cuda_fp32_path(1)
        try:
            assert _plan().endswith("CUDA cores"), _plan()
            rnn.fp32_precision = "tf32"  # TF32 allowed: the switch does not apply
            assert _plan().endswith("tensor cores (TF32)"), _plan()
        finally:
            torch.ops.fusedgru._set_cuda_fp32_path(prev_path)
        for setting in ("tf32", "ieee"):
            rnn.fp32_precision = setting
            assert _plan(torch.float64, 64).endswith("CUDA cores")
            assert _plan(torch.bfloat16).endswith("tensor cores")
            assert _plan(torch.float16).endswith("tensor cores")
    finally:
        (rnn.fp32_precision, cudnn.fp32_precision, mm.fp32_precision,
         torch.backends.fp32_precision) = prev


def test_cuda_fp32_path_switch():
    """fusedgru::_set_cuda_fp32_path returns the previous mode and takes 0 (3xTF32) or 1
    (FMA) only."""
    _ext_ready()
    prev = torch.ops.fusedgru._set_cuda_fp32_path(1)
    try:
        assert torch.ops.fusedgru._set_cuda_fp32_path(0) == 1
        with pytest.raises(RuntimeError, match="mode must be 0"):
            torch.ops.fusedgru._set_cuda_fp32_path(2)
    finally:
        torch.ops.fusedgru._set_cuda_fp32_path(prev)


def _gru_pair(T, B, I, H, reset_after=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    ref = torch.nn.GRU(I, H).double()
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) / H ** 0.5)
    x = torch.randn(T, B, I, generator=g, dtype=torch.float64)
    h0 = torch.randn(1, B, H, generator=g, dtype=torch.float64)
    gy = torch.randn(T, B, H, generator=g, dtype=torch.float64)
    return ref, x, h0, gy


def _run(model, x, h0, gy, dtype):
    """y, h_n and the gradients of (x, h0, every parameter) in float64."""
    x = x.detach().to("cuda", dtype).clone().requires_grad_()
    h0 = h0.detach().to("cuda", dtype).clone().requires_grad_()
    y, hn = model(x, h0)
    y.backward(gy.to("cuda", dtype))
    outs = [y, hn, x.grad, h0.grad] + [p.grad for p in model.parameters()]
    return [o.detach().double().cpu() for o in outs]


@pytest.mark.parametrize("shape", [(16, 16, 64, 256), (8, 5, 24, 130)],
                         ids=lambda s: "T%dB%dI%dH%d" % s)
@pytest.mark.parametrize("fp32_path", [0, 1], ids=["3xtf32", "fma"])
def test_cuda_float32_like_nn_gru(shape, fp32_path):
    """FusedGRU(backend="cuda") in float32 against nn.GRU (cuDNN) in float32 under the same
    setting, both measured against float64: strict ("ieee": 3xTF32, or the FMA path) within
    SPEC's float32 budget (2 err(nn.GRU) + 1e-6) on y, h_n and every gradient; TF32 (torch's
    default) within 2 err(nn.GRU in TF32) + 1e-6, and above the strict budget (it is TF32)."""
    _ext_ready()
    ref64, x, h0, gy = _gru_pair(*shape)
    want = _run(ref64.cuda(), x, h0, gy, torch.float64)
    names = ["y", "h_n", "dx", "dh0"] + [n for n, _ in ref64.named_parameters()]
    errs = {}
    for tf32 in (False, True):
        with fp32_precision(tf32, fp32_path):
            ref = torch.nn.GRU(shape[2], shape[3]).cuda()
            ref.load_state_dict(ref64.state_dict())
            fused = fusedgru.FusedGRU.from_torch(ref, backend="cuda")
            got_ref = _run(ref.float(), x, h0, gy, torch.float32)
            got = _run(fused.float(), x, h0, gy, torch.float32)
        for n, a, b, w in zip(names, got, got_ref, want):
            errs[(tf32, n)] = (testing.rel_err(a, w), testing.rel_err(b, w))
    for n in names:
        e, e_ref = errs[(False, n)]
        assert e <= testing.budget(torch.float32, e_ref), ("strict", n, e, e_ref)
        e_tf, e_ref_tf = errs[(True, n)]
        assert e_tf <= testing.budget(torch.float32, e_ref_tf), ("tf32", n, e_tf, e_ref_tf)
    # TF32 is really TF32 here (and strict really is not): y's error is far above float32's.
    assert errs[(True, "y")][0] > testing.budget(torch.float32, errs[(False, "y")][1])


def test_cuda_fp32_paths_differ_and_agree():
    """The switch selects different arithmetic (3xTF32 and FMA give different bits) with
    errors of the same size: both within the float32 budget of the float64 reference, on
    both CUDA paths."""
    _ext_ready()
    case = testing.make_layer_case(6, 17, 12, 70, generator=torch.Generator().manual_seed(3))
    args = case.args("cuda", torch.float32)
    want, _ = reference.gru_layer_forward(*case.args(dtype=torch.float64), True)
    base, _ = reference.gru_layer_forward(*args, True)
    for path in (0, 2):
        prev = torch.ops.fusedgru._set_cuda_path(path)
        try:
            ys = []
            for fp32_path in (0, 1):
                with fp32_precision(False, fp32_path):
                    ys.append(torch.ops.fusedgru.gru_infer(*args, True))
        finally:
            torch.ops.fusedgru._set_cuda_path(prev)
        assert not torch.equal(ys[0], ys[1]), "3xTF32 and FMA gave the same bits"
        for y in ys:
            err = testing.rel_err(y, want)
            assert err <= testing.budget(torch.float32, testing.rel_err(base, want)), err


# ---------------------------------------------------------------------------------------
# Issue 18 part 2: the staged step (the MMA's A operand, h_{t-1} / dgh_{t+1}, copied into
# shared memory once per pass with cp.async) behind fusedgru::_set_cuda_step_variant
# (benchmarks/NOTES-cuda-latency.md).  Same values, same k order: bitwise the old step.
# ---------------------------------------------------------------------------------------

@contextlib.contextmanager
def step_variant(mode: int):
    prev = torch.ops.fusedgru._set_cuda_step_variant(mode)
    try:
        yield
    finally:
        torch.ops.fusedgru._set_cuda_step_variant(prev)


def test_cuda_step_variant_switch():
    """_set_cuda_step_variant returns the previous mode, takes 0 (old) or any sum of 1
    (staged), 2 (split-barrier step), 4 (balanced K split), 8 (batch groups of blocks) and
    16 (the cluster forward), and the default is the old step."""
    _ext_ready()
    prev = torch.ops.fusedgru._set_cuda_step_variant(1)
    try:
        assert prev == 0, "the default step variant must stay the old one until measured"
        assert torch.ops.fusedgru._set_cuda_step_variant(3) == 1
        assert torch.ops.fusedgru._set_cuda_step_variant(7) == 3
        assert torch.ops.fusedgru._set_cuda_step_variant(4) == 7
        assert torch.ops.fusedgru._set_cuda_step_variant(15) == 4
        assert torch.ops.fusedgru._set_cuda_step_variant(8) == 15
        assert torch.ops.fusedgru._set_cuda_step_variant(16) == 8
        assert torch.ops.fusedgru._set_cuda_step_variant(31) == 16
        assert torch.ops.fusedgru._set_cuda_step_variant(0) == 31
        for bad in (32, -1):
            with pytest.raises(RuntimeError, match="mode must be 0"):
                torch.ops.fusedgru._set_cuda_step_variant(bad)
    finally:
        torch.ops.fusedgru._set_cuda_step_variant(prev)


# (T, B, I, H, lengths, resets kind): 3 blocks x 2 tiles, the K split (H = 130), two
# 128-row passes, packed, resets.
STAGED_CASES = {
    "dense": (5, 17, 6, 33, None, None),
    "k-split": (3, 5, 8, 130, None, None),
    "passes": (3, 130, 16, 40, None, None),
    "packed": (6, 19, 5, 40, [6, 6, 5, 4, 4, 3, 3, 3] + [2] * 9 + [1, 1], None),
    "resets": (5, 17, 6, 33, None, "random"),
}
# dtype, TF32 allowed, fp32 path (0 3xTF32, 1 FMA)
STAGED_DTYPES = [pytest.param(torch.float64, False, 0, id="fp64"),
                 pytest.param(torch.float32, False, 0, id="fp32-3xtf32"),
                 pytest.param(torch.float32, False, 1, id="fp32-fma"),
                 pytest.param(torch.float32, True, 0, id="tf32"),
                 pytest.param(torch.bfloat16, False, 0, id="bf16"),
                 pytest.param(torch.float16, False, 0, id="fp16")]


def _all_outputs(case, dtype, reset_after):
    args, seq = case.args("cuda", dtype), case.seq_args("cuda")
    ops = torch.ops.fusedgru
    y, ws = ops.gru_fwd(*args, reset_after, *seq)
    y_inf = ops.gru_infer(*args, reset_after, *seq)
    x, h0, w_ih, w_hh = args[:4]
    grads = ops.gru_bwd(case.grad_y.to("cuda", dtype), x, h0, w_ih, w_hh, y, ws, reset_after,
                        *seq)
    return [y, ws, y_inf, *grads]


@pytest.mark.parametrize("reset_after", [True, False], ids=["after", "before"])
@pytest.mark.parametrize("name", list(STAGED_CASES))
@pytest.mark.parametrize("dtype,allow_tf32,fp32_path", STAGED_DTYPES)
def test_cuda_staged_step_is_the_old_step(name, dtype, allow_tf32, fp32_path, reset_after, gen,
                                          poisoned, forced_path):
    """Both step variants on both paths: the staged one within SPEC's budget against the
    float64 reference, and every output (y, ws, gru_infer's y, the six gradients) bitwise
    the old variant's."""
    _ext_ready()
    T, B, I, H, lengths, resets = STAGED_CASES[name]
    case = testing.make_layer_case(T, B, I, H, reset_after=reset_after, generator=gen,
                                   lengths=lengths,
                                   resets=_resets(resets, T, B, gen) if resets else None)
    with fp32_precision(allow_tf32, fp32_path):
        with step_variant(0):
            old = _all_outputs(case, dtype, reset_after)
        with step_variant(1):
            for bwd in (False, True):
                assert "A staged in shared memory" in torch.ops.fusedgru._cuda_plan(
                    torch.empty(T, B, I, device="cuda", dtype=dtype),
                    case.w_hh.to("cuda", dtype), reset_after, bwd)
            new = _all_outputs(case, dtype, reset_after)
            report = testing.check_layer("cuda", case, device="cuda", dtype=dtype)
    assert report.ok, report.failures
    for k, (a, b) in enumerate(zip(old, new)):
        assert torch.equal(a, b), f"output {k} differs between the step variants"


# The split-barrier step (variant bit 2) where it applies (the persistent kernels at
# B <= 64): dense with 2 batch tiles and 3 blocks, the K split, packed, resets, B = 64.
SPLIT_CASES = {k: STAGED_CASES[k] for k in ("dense", "k-split", "packed", "resets")}
SPLIT_CASES["b64"] = (3, 64, 8, 40, None, None)


@pytest.mark.parametrize("variant", [pytest.param(2, id="split", marks=EXH),
                                     pytest.param(3, id="split+staged")])
@pytest.mark.parametrize("reset_after", [True, False], ids=["after", "before"])
@pytest.mark.parametrize("name", list(SPLIT_CASES))
@pytest.mark.parametrize("dtype,allow_tf32,fp32_path", STAGED_DTYPES)
def test_cuda_split_step_is_the_old_step(name, dtype, allow_tf32, fp32_path, reset_after,
                                         variant, gen, poisoned):
    """The split-barrier step (with the staged A; alone in the exhaustive sweep) on the
    persistent path, where it applies (forward and backward): within SPEC's budget against
    the float64 reference, and every output bitwise the old step's."""
    _ext_ready()
    prev_path = torch.ops.fusedgru._set_cuda_path(1)  # persistent, or an error
    try:
        _split_step_case(name, dtype, allow_tf32, fp32_path, reset_after, variant, gen)
    finally:
        torch.ops.fusedgru._set_cuda_path(prev_path)


def _split_step_case(name, dtype, allow_tf32, fp32_path, reset_after, variant, gen):
    T, B, I, H, lengths, resets = SPLIT_CASES[name]
    case = testing.make_layer_case(T, B, I, H, reset_after=reset_after, generator=gen,
                                   lengths=lengths,
                                   resets=_resets(resets, T, B, gen) if resets else None)
    with fp32_precision(allow_tf32, fp32_path):
        with step_variant(0):
            old = _all_outputs(case, dtype, reset_after)
        with step_variant(variant):
            for bwd in (False, True):
                plan = torch.ops.fusedgru._cuda_plan(
                    torch.empty(T, B, I, device="cuda", dtype=dtype),
                    case.w_hh.to("cuda", dtype), reset_after, bwd)
                assert "step variant 2: the split-barrier step" in plan, plan
            new = _all_outputs(case, dtype, reset_after)
            report = testing.check_layer("cuda", case, device="cuda", dtype=dtype)
    assert report.ok, report.failures
    for k, (a, b) in enumerate(zip(old, new)):
        assert torch.equal(a, b), f"output {k} differs between the step variants"


def test_cuda_split_step_applies_or_falls_back():
    """Variant 2 takes the persistent forward and backward at B <= 64 and leaves larger
    batches and the per-step kernels on the old loop, saying so in the plan."""
    _ext_ready()
    with step_variant(2):
        for bwd in (False, True):
            assert "split-barrier step" in _plan_for(torch.bfloat16, 16, 768, bwd)
            assert "split-barrier step" in _plan_for(torch.bfloat16, 64, 1024, bwd)
            assert "2 -> old loop" in _plan_for(torch.bfloat16, 65, 256, bwd)
        prev = torch.ops.fusedgru._set_cuda_path(2)  # the per-step kernels
        try:
            assert "2 -> old loop" in _plan_for(torch.bfloat16, 16, 256, False)
        finally:
            torch.ops.fusedgru._set_cuda_path(prev)


@pytest.mark.parametrize("variant", [pytest.param(4, id="balanced", marks=EXH),
                                     pytest.param(7, id="all")])
@pytest.mark.parametrize("reset_after", [True, False], ids=["after", "before"])
@pytest.mark.parametrize("dtype,allow_tf32,fp32_path", STAGED_DTYPES)
def test_cuda_balanced_split_within_budget(dtype, allow_tf32, fp32_path, reset_after, variant,
                                           gen, poisoned, forced_path):
    """The balanced K split (variant bit 4; with the staged A and the split-barrier step in
    variant 7) at B = 33, H = 130 (forward split 1 -> 2, parts of 5 and 4 k-steps): within
    SPEC's budget against the float64 reference on both paths, the plan saying so."""
    _ext_ready()
    T, B, I, H = 4, 33, 7, 130
    case = testing.make_layer_case(T, B, I, H, reset_after=reset_after, generator=gen)
    with fp32_precision(allow_tf32, fp32_path), step_variant(variant):
        plan = torch.ops.fusedgru._cuda_plan(torch.empty(T, B, I, device="cuda", dtype=dtype),
                                             case.w_hh.to("cuda", dtype), reset_after, False)
        assert "step variant 4: K split 1 -> 2" in plan, plan
        report = testing.check_layer("cuda", case, device="cuda", dtype=dtype)
    assert report.ok, report.failures


@pytest.mark.parametrize("variant", [pytest.param(8, id="groups"),
                                     pytest.param(15, id="all", marks=EXH)])
@pytest.mark.parametrize("reset_after", [True, False], ids=["after", "before"])
@pytest.mark.parametrize("dtype,allow_tf32,fp32_path", STAGED_DTYPES)
def test_cuda_batch_groups_within_budget(dtype, allow_tf32, fp32_path, reset_after, variant,
                                         gen, poisoned, forced_path):
    """Batch groups of blocks (variant bit 8): at B = 33 (3 tiles) the plan splits them over
    groups (as many as the SMs left idle allow), within SPEC's budget on both paths, packed
    and with resets too; at H = 33 (the K split cannot change) bitwise the one-group
    launch's outputs; at H = 1024 B = 64 on an H100 / H200 (132 SMs), 2 groups."""
    _ext_ready()
    T, B, I = 4, 33, 7
    lengths = sorted([T] + [1 + k % T for k in range(B - 1)], reverse=True)
    for H in (33, 130):
        for kw in ({}, {"lengths": lengths},
                   {"resets": torch.rand(T, B, generator=gen) < 0.3}):
            case = testing.make_layer_case(T, B, I, H, reset_after=reset_after, generator=gen,
                                           **kw)
            with fp32_precision(allow_tf32, fp32_path), step_variant(variant):
                plan = _plan_for(dtype, B, H, False)
                assert "step variant 8: " in plan and "batch groups of" in plan, plan
                report = testing.check_layer("cuda", case, device="cuda", dtype=dtype)
                assert report.ok, (H, kw, report.failures)
                new = _all_outputs(case, dtype, reset_after) if H == 33 else None
            if new is not None and variant == 8:
                with fp32_precision(allow_tf32, fp32_path), step_variant(0):
                    old = _all_outputs(case, dtype, reset_after)
                for a, b in zip(old, new):
                    assert torch.equal(a, b), (H, kw)
    if torch.cuda.get_device_properties(0).multi_processor_count >= 128:
        with step_variant(variant):
            assert "step variant 8: 2 batch groups of 64 blocks" in _plan_for(
                torch.bfloat16, 64, 1024, False)


@pytest.mark.parametrize("variant", [pytest.param(16, id="cluster"),
                                     pytest.param(20, id="cluster-balanced", marks=EXH)])
@pytest.mark.parametrize("reset_after", [True, False], ids=["after", "before"])
@pytest.mark.parametrize("dtype,allow_tf32,fp32_path", STAGED_DTYPES)
def test_cuda_cluster_forward_within_budget(dtype, allow_tf32, fp32_path, reset_after, variant,
                                            gen, poisoned, forced_path):
    """The cluster forward (variant bit 16, sm_90+): at B = 17 the forward runs as one
    thread block cluster (the plan says so), within SPEC's budget in training and
    inference, dense, packed and with resets; at H = 33 (K split 1 in both) bitwise the grid
    kernels' outputs; at H = 130 (9 blocks) the budget; B = 130 does not fit (B x 16 >
    1024) and falls back to the grid kernels, bitwise.  On a
    GPU without clusters (sm_80) the plan says why and the outputs are the old step's."""
    _ext_ready()
    sm90 = torch.cuda.get_device_capability(0)[0] >= 9
    T, I = 4, 7
    for B, H in ((17, 33), (17, 130), (130, 33)):
        lengths = sorted([T] + [1 + k % T for k in range(B - 1)], reverse=True)
        for kw in ({}, {"lengths": lengths},
                   {"resets": torch.rand(T, B, generator=gen) < 0.3}):
            case = testing.make_layer_case(T, B, I, H, reset_after=reset_after, generator=gen,
                                           **kw)
            with fp32_precision(allow_tf32, fp32_path), step_variant(variant):
                plan = _plan_for(dtype, B, H, False, reset_after)
                if sm90 and B <= 64:
                    assert plan.startswith("cluster: 1 cluster of "), plan
                else:
                    assert "step variant 16 -> grid kernels" in plan, plan
                report = testing.check_layer("cuda", case, device="cuda", dtype=dtype)
                assert report.ok, (B, H, kw, report.failures)
                new = _all_outputs(case, dtype, reset_after) if H == 33 else None
            if new is not None and variant == 16:
                with fp32_precision(allow_tf32, fp32_path), step_variant(0):
                    old = _all_outputs(case, dtype, reset_after)
                for a, b in zip(old, new):
                    assert torch.equal(a, b), (B, H, kw)
    if sm90:
        with step_variant(variant):
            # the sizes of the prediction (benchmarks/NOTES-cuda-latency.md, "Thread block
            # cluster"): bf16 B=16 H=512 in 16 blocks of 2 unit blocks; H=768 does not fit
            assert _plan_for(torch.bfloat16, 16, 512, False).startswith(
                "cluster: 1 cluster of 16 blocks"), _plan_for(torch.bfloat16, 16, 512, False)
            assert "step variant 16 -> grid kernels" in _plan_for(torch.bfloat16, 16, 768, False)


def _plan_for(dtype, B, H, backward, reset_after=True):
    x = torch.empty(4, B, 8, device="cuda", dtype=dtype)
    return torch.ops.fusedgru._cuda_plan(x, torch.empty(3 * H, H, device="cuda", dtype=dtype),
                                         reset_after, backward)


def test_cuda_staged_step_fits_or_falls_back(gen):
    """The staged step only where its buffer fits next to the W slice (the fit table of
    NOTES-cuda-latency.md, tests/test_cuda_host.py test_staging_fits_or_falls_back): at
    B=16 H=768 bf16 it stages, at B=64 H=1024 it keeps the old step, and a call there runs
    (never fails) with the old step's bits."""
    _ext_ready()
    optin = torch.cuda.get_device_properties(0).shared_memory_per_block_optin
    with fp32_precision(False), step_variant(1):
        if optin >= 105472:
            assert "A staged in shared memory" in _plan_for(torch.bfloat16, 16, 768, False)
        for dt in (torch.bfloat16, torch.float32):
            for bwd in (False, True):
                assert "old step: staging A" in _plan_for(dt, 64, 1024, bwd), (dt, bwd)
        case = testing.make_layer_case(2, 64, 8, 1024, generator=gen)
        new = _all_outputs(case, torch.bfloat16, True)
    with step_variant(0):
        old = _all_outputs(case, torch.bfloat16, True)
    for a, b in zip(old, new):
        assert torch.equal(a, b)
