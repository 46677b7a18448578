"""The ecosystem checks on a CUDA device, for the GPU backends ("cuda", "triton") and the
reference: opcheck on CUDA tensors, torch.compile (default and "reduce-overhead", i.e. CUDA
graphs) forward and backward, torch.export, autocast float16 / bfloat16 against nn.GRU, and
bitwise determinism.  Run by the GPU script (pytest -m gpu); skipped without a device."""

import os

# cuBLAS is deterministic only with a fixed workspace (PyTorch refuses mm otherwise under
# torch.use_deterministic_algorithms(True)); read when its handle is created.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import pytest  # noqa: E402
import torch  # noqa: E402

import fusedgru  # noqa: E402
from fusedgru import FusedGRU, backends, ops, testing  # noqa: E402
from fusedgru.testing import budget, rel_err  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device (GPU script only)")]


def _gpu_backends():
    if not HAS_CUDA:
        return []
    return [b for b in ("cuda", "triton", "reference") if b in fusedgru.available_backends()
            and backends.get_backend(b).unsupported_reason("cuda", torch.float32) is None]


GPU_BACKENDS = _gpu_backends()
PREFIX = {"cuda": "gru", "triton": "triton", "reference": "reference"}
F32, F16, BF16, F64 = torch.float32, torch.float16, torch.bfloat16, torch.float64


@pytest.fixture(autouse=True)
def _no_tf32():
    """Strict float32 for the parity checks: nn.GRU's flag (cudnn.rnn), which fusedgru's GPU
    backends follow, and torch's matmuls (tests/test_triton_gpu.py, fp32_precision)."""
    if not HAS_CUDA:
        yield
        return
    from test_triton_gpu import fp32_precision

    with fp32_precision("ieee"):
        yield


class Tagger(torch.nn.Module):
    """Linear -> FusedGRU (2 layers, bidirectional, batch_first) -> Linear."""

    def __init__(self, backend, dtype=F32, I=24, H=40):
        super().__init__()
        self.embed = torch.nn.Linear(I, 32, device="cuda", dtype=dtype)
        self.gru = FusedGRU(32, H, num_layers=2, batch_first=True, bidirectional=True,
                            device="cuda", dtype=dtype, backend=backend)
        self.head = torch.nn.Linear(2 * H, 5, device="cuda", dtype=dtype)

    def forward(self, x, h0=None):
        y, h_n = self.gru(torch.tanh(self.embed(x)), h0)
        return self.head(y), h_n


def _step(model, x, h0):
    model.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    h0 = h0.detach().requires_grad_()
    out, h_n = model(x, h0)
    loss = (out.float() * out.detach().float().sin()).sum() + h_n.float().sum()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in getattr(model, "_orig_mod", model).named_parameters()}
    grads.update(input=x.grad.clone(), h0=h0.grad.clone())
    return out.detach().clone(), h_n.detach().clone(), grads


def _assert_same(a, b, tol):
    (oa, ha, ga), (ob, hb, gb) = a, b
    assert rel_err(oa, ob) < tol, "output"
    assert rel_err(ha, hb) < tol, "h_n"
    for k in gb:
        assert rel_err(ga[k], gb[k]) < tol, f"grad {k}"


def _inputs(B, T, gen, dtype=F32, I=24, H=40):
    return (torch.randn(B, T, I, generator=gen).to("cuda", dtype),
            (torch.randn(4, B, H, generator=gen) * 0.5).to("cuda", dtype))


# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("reset_after", [True, False], ids=["after", "before"])
@pytest.mark.parametrize("requires_grad", [False, True], ids=["no_grad", "grad"])
def test_opcheck_cuda(backend, reset_after, requires_grad, gen):
    ops.register_extension_autograd()
    case = testing.make_layer_case(5, 3, 8, 12, reset_after=reset_after, generator=gen)
    fw = case.args("cuda", F32)
    fwd = getattr(torch.ops.fusedgru, f"{PREFIX[backend]}_fwd")
    bwd = getattr(torch.ops.fusedgru, f"{PREFIX[backend]}_bwd")
    y, ws = fwd(*fw, reset_after)
    bw = [case.grad_y.to("cuda", F32), *fw[:4], y, ws]
    if requires_grad:
        for t in fw + bw:
            t.requires_grad_()
    torch.library.opcheck(fwd.default, (*fw, reset_after))
    torch.library.opcheck(bwd.default, (*bw, reset_after))


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compile_cuda_matches_eager(backend, mode, gen):
    torch._dynamo.reset()
    model = Tagger(backend)
    compiled = torch.compile(model, fullgraph=True, mode=mode)
    for B, T in [(8, 33), (8, 33), (8, 33)]:  # reduce-overhead records, then replays
        x, h0 = _inputs(B, T, gen)
        _assert_same(_step(compiled, x, h0), _step(model, x, h0), 1e-5)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_export_cuda(backend, gen):
    model = Tagger(backend).eval()
    x, h0 = _inputs(4, 9, gen)
    B, T = torch.export.Dim("B", min=2, max=512), torch.export.Dim("T", min=2, max=8192)
    ep = torch.export.export(model, (x, h0), dynamic_shapes=({0: B, 1: T}, {1: B}))
    for B_, T_ in [(4, 9), (16, 100)]:
        x, h0 = _inputs(B_, T_, gen)
        for a, b in zip(ep.module()(x, h0), model(x, h0)):
            assert rel_err(a, b) < 1e-6


def _autocast_run(module, x, h0, dtype):
    x = x.detach().requires_grad_()
    h0 = h0.detach().requires_grad_()
    with torch.autocast("cuda", dtype=dtype, enabled=dtype is not None):
        y, h_n = module(x, h0)
    gy = torch.linspace(-1, 1, y.numel(), device="cuda", dtype=F64).view(y.shape)
    ((y.double() * gy).sum() + h_n.double().sum()).backward()
    grads = [p.grad.clone() for p in module.parameters()] + [x.grad, h0.grad]
    module.zero_grad(set_to_none=True)
    return [y, h_n] + grads


@pytest.mark.parametrize("backend", [b for b in GPU_BACKENDS if b != "reference"] or ["auto"])
@pytest.mark.parametrize("dtype", [F16, BF16], ids=["fp16", "bf16"])
def test_autocast_cuda(backend, dtype, gen):
    """FusedGRU computes in the autocast dtype and returns it (nn.GRU's cuDNN path returns
    float16 under float16 autocast; under bfloat16 autocast ATen's cuDNN wrapper may still
    pick float16, so only the float16 dtype is compared), values within SPEC's budget of
    nn.GRU's autocast run against the float64 oracle; float32 parameters get float32
    gradients."""
    T, B, I, H = 50, 16, 64, 128
    g = torch.nn.GRU(I, H, num_layers=2, bidirectional=True, device="cuda")
    fused = FusedGRU.from_torch(g, backend=backend)
    g64 = torch.nn.GRU(I, H, num_layers=2, bidirectional=True, device="cuda", dtype=F64)
    g64.load_state_dict(g.state_dict())
    x = torch.randn(T, B, I, generator=gen).cuda()
    h0 = (torch.randn(4, B, H, generator=gen) * 0.5).cuda()
    got = _autocast_run(fused, x, h0, dtype)
    theirs = _autocast_run(g, x, h0, dtype)
    oracle = _autocast_run(g64, x.double(), h0.double(), None)
    assert got[0].dtype == dtype and got[1].dtype == dtype
    if dtype == F16:
        assert got[0].dtype == theirs[0].dtype and got[1].dtype == theirs[1].dtype
    assert all(t.dtype == F32 for t in got[2:])
    names = ["output", "h_n"] + [n for n, _ in g.named_parameters()] + ["input", "h0"]
    for name, a, b, c in zip(names, got, theirs, oracle):
        err, allowed = rel_err(a, c), budget(dtype, rel_err(b, c))
        assert err <= allowed, f"{name}: err {err:.3g} > budget {allowed:.3g}"


@pytest.mark.parametrize("backend", [b for b in GPU_BACKENDS if b != "reference"])
def test_compile_under_autocast(backend, gen):
    """The compiled model under bfloat16 autocast returns bfloat16 and is as close to the
    float32 result as the eager autocast run is (SPEC's budget)."""
    torch._dynamo.reset()
    model = Tagger(backend)
    compiled = torch.compile(model, fullgraph=True)
    x, h0 = _inputs(8, 20, gen)
    with torch.autocast("cuda", dtype=BF16):
        got = _step(compiled, x, h0)
        eager = _step(model, x, h0)
    exact = _step(model, x, h0)
    assert got[0].dtype == BF16 and got[1].dtype == BF16
    pairs = [("output", got[0], eager[0], exact[0]), ("h_n", got[1], eager[1], exact[1])]
    pairs += [(f"grad {k}", got[2][k], eager[2][k], exact[2][k]) for k in exact[2]]
    for name, a, b, c in pairs:
        err, allowed = rel_err(a, c), budget(BF16, rel_err(b, c))
        assert err <= allowed, f"{name}: err {err:.3g} > budget {allowed:.3g}"


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
def test_deterministic_cuda(backend, dtype, gen):
    if backends.get_backend(backend).unsupported_reason("cuda", dtype) is not None:
        pytest.skip(f"{backend} does not run {dtype}")
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        x, h0 = _inputs(16, 70, gen, dtype=dtype)
        runs = []
        for _ in range(2):
            torch.manual_seed(0)
            runs.append(_step(Tagger(backend, dtype), x, h0))
    finally:
        torch.use_deterministic_algorithms(before)
    (oa, ha, ga), (ob, hb, gb) = runs
    assert torch.equal(oa, ob) and torch.equal(ha, hb)
    for k in ga:
        assert torch.equal(ga[k], gb[k]), k


@pytest.mark.parametrize("backend", [b for b in GPU_BACKENDS if b != "reference"])
def test_float32_under_the_fp32_precision_api(backend, gen):
    """A user who sets the precision through torch's fp32_precision API (where torch's legacy
    allow_tf32 getters raise) still runs float32, in the mode nn.GRU's flag says: TF32 when
    cudnn.rnn.fp32_precision is "tf32", strict (3xTF32) when "ieee"; the matmul flag alone
    does not decide."""
    rnn = torch.backends.cudnn.rnn
    x = torch.randn(6, 5, 24, device="cuda")
    torch.manual_seed(0)
    model = Tagger(backend)
    before = rnn.fp32_precision
    try:
        outs = {}
        for precision in ("tf32", "ieee"):
            rnn.fp32_precision = precision
            assert ops.rnn_tf32_allowed() is (precision == "tf32")
            y, h_n = model(x)
            (y.sum() + h_n.sum()).backward()
            outs[precision] = y.detach()
        assert torch.isfinite(outs["tf32"]).all()
        assert rel_err(outs["tf32"], outs["ieee"].double()) < 1e-2
    finally:
        rnn.fp32_precision = before


@pytest.mark.parametrize("backend", [b for b in GPU_BACKENDS if b != "reference"])
def test_default_float32_computes_as_nn_gru_does(backend, gen):
    """issue 18: a default float32 FusedGRU (torch's flags untouched: TF32 for nn.GRU) runs
    in nn.GRU's mode (both errors against the float64 oracle at TF32's level), and under
    cudnn.rnn.fp32_precision = "ieee" both are strict, FusedGRU within SPEC's float32 budget
    of nn.GRU's error (outputs, h_n and every gradient)."""
    from test_triton_gpu import fp32_precision

    T, B, I, H = 12, 6, 24, 96
    torch.manual_seed(7)
    g64 = torch.nn.GRU(I, H, num_layers=2, dtype=F64)
    x64 = torch.randn(T, B, I, dtype=F64, generator=gen)
    h064 = torch.randn(2, B, H, dtype=F64, generator=gen) * 0.5

    def run(mod, device, dtype):
        mod = mod.to(device=device, dtype=dtype)
        x = x64.to(device, dtype).detach().clone().requires_grad_()
        h0 = h064.to(device, dtype).detach().clone().requires_grad_()
        y, h_n = mod(x, h0)
        gy = torch.linspace(-1, 1, y.numel(), device=device, dtype=F64).view(y.shape)
        ((y.double() * gy).sum() + h_n.double().sum()).backward()
        return [y, h_n, x.grad, h0.grad] + [p.grad for p in mod.parameters()]

    def pair():  # (FusedGRU, nn.GRU) in float32 on CUDA, g64's weights
        return (run(FusedGRU.from_torch(_gru_like(g64), backend=backend), "cuda", F32),
                run(_gru_like(g64), "cuda", F32))

    want = run(g64, "cpu", F64)
    # This file's fixture sets strict float32: torch's defaults again for the default mode
    # (nn.GRU's flag "tf32", the matmul flag "none": strict), restored after.
    with fp32_precision("tf32"):
        torch.backends.cuda.matmul.fp32_precision = "none"
        default = pair()
    with fp32_precision("ieee"):
        strict = pair()
    for mode, (fused, cudnn) in (("default", default), ("ieee", strict)):
        for i, (a, b, c) in enumerate(zip(fused, cudnn, want)):
            e_fused, e_cudnn = rel_err(a, c), rel_err(b, c)
            if i < 2:  # outputs and h_n: the mode is visible in the error's size
                tf32_level = (e_fused > 1e-5, e_cudnn > 1e-5)
                assert tf32_level == ((True, True) if mode == "default" else (False, False)), \
                    (mode, i, e_fused, e_cudnn)
            assert e_fused <= budget(F32, e_cudnn), (mode, i, e_fused, e_cudnn)


def _gru_like(g64):
    g = torch.nn.GRU(g64.input_size, g64.hidden_size, num_layers=g64.num_layers)
    g.load_state_dict(g64.state_dict())
    return g


@pytest.mark.parametrize("backend", [b for b in GPU_BACKENDS if b != "reference"])
@pytest.mark.parametrize("B,H", [(1, 64), (8, 256)])
def test_cell_step_loop_in_a_cuda_graph(backend, B, H, gen):
    """A FusedGRUCell step loop (streaming inference) captured once in a CUDA graph and
    replayed on new inputs gives what the eager loop gives: the per-call Python cost gone,
    as a serving loop runs it."""
    T = 16
    cell = fusedgru.FusedGRUCell(32, H, device="cuda", backend=backend).eval()
    xs = torch.empty(T, B, 32, device="cuda")
    h0 = torch.empty(B, H, device="cuda")

    def loop():
        h = h0
        for t in range(T):
            h = cell(xs[t], h)
        return h

    xs.copy_(torch.randn(T, B, 32, generator=gen))
    h0.copy_(torch.randn(B, H, generator=gen))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), torch.cuda.stream(side):
        for _ in range(2):  # warm-up outside the capture (compiles, plans, caches)
            loop()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        out = loop()
    for _ in range(2):  # replays on fresh inputs
        xs.copy_(torch.randn(T, B, 32, generator=gen))
        h0.copy_(torch.randn(B, H, generator=gen))
        graph.replay()
        with torch.no_grad():
            want = loop()
        torch.cuda.synchronize()
        assert rel_err(out, want) < 1e-6
