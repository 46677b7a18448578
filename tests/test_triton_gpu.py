"""The "triton" backend on a CUDA device: float32 (exact and TF32), float16, bfloat16,
larger sizes (the per-step split-H kernels), module parity with torch.nn.GRU (cuDNN),
64-bit offsets, no host synchronisation, the current stream.

Every test is marked gpu and skipped without a CUDA device; run by the repository's GPU
script (pytest -m gpu).  Budgets are SPEC section 5's, via fusedgru.testing.
"""

import contextlib

import pytest
import torch

import fusedgru
from fusedgru import reference, testing

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (GPU script only)"),
]

if torch.cuda.is_available():
    from fusedgru.kernels import gru
    from fusedgru.kernels.backend import backend as triton_backend


@contextlib.contextmanager
def tf32(allowed: bool):
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = allowed
    torch.backends.cudnn.allow_tf32 = allowed
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


# (name, dtype, tf32 allowed)
PRECISIONS = [("fp32", torch.float32, False), ("tf32", torch.float32, True),
              ("fp16", torch.float16, False), ("bf16", torch.bfloat16, False)]

# (T, B, I, H): resident sizes (H <= 64) and step sizes (H > 64: H split across programs).
SIZES = [(7, 1, 3, 1), (7, 5, 17, 17), (33, 3, 20, 63), (9, 17, 40, 64), (17, 5, 50, 100),
         (9, 64, 256, 256), (5, 3, 512, 1024)]


@pytest.mark.parametrize("reset_after", [True, False], ids=["reset_after", "reset_before"])
@pytest.mark.parametrize("T,B,I,H", SIZES)
@pytest.mark.parametrize("prec", PRECISIONS, ids=[p[0] for p in PRECISIONS])
def test_layer_vs_reference(prec, T, B, I, H, reset_after, gen):
    _, dtype, allow = prec
    case = testing.make_layer_case(T, B, I, H, reset_after=reset_after, with_h0=(H % 2 == 1),
                                   bias=(B != 3), generator=gen)
    with tf32(allow):
        report = testing.check_layer("triton", case, device="cuda", dtype=dtype)
    assert report.ok, report.failures


@pytest.mark.parametrize("strategy", ["step", "persistent"])  # gru.LARGE_H_STRATEGIES
@pytest.mark.parametrize("reset_after", [True, False], ids=["reset_after", "reset_before"])
@pytest.mark.parametrize("T,B,I,H", [(33, 5, 50, 200), (9, 33, 64, 300), (4, 2, 16, 1024)])
@pytest.mark.parametrize("prec", PRECISIONS, ids=[p[0] for p in PRECISIONS])
def test_large_h_strategies_vs_reference(prec, T, B, I, H, reset_after, strategy, gen):
    """Both large-H strategies (a launch per unit; one persistent launch with a grid
    barrier), whichever is the default, in every precision."""
    _, dtype, allow = prec
    case = testing.make_layer_case(T, B, I, H, reset_after=reset_after, with_h0=(B % 2 == 1),
                                   generator=gen)
    cfg = gru.strategy_config(strategy, B, H, dtype, torch.device("cuda"))
    with tf32(allow), gru.force_config(cfg):
        report = testing.check_layer("triton", case, device="cuda", dtype=dtype)
    assert report.ok, report.failures


@pytest.mark.parametrize("strategy", ["step", "persistent"])  # gru.LARGE_H_STRATEGIES
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_large_h_long_sequence_keeps_an_fp32_state(dtype, strategy, gen):
    """T = 1024 in 16 bits: the split kernels carry h in fp32 between steps (not re-read
    from the 16-bit y), so the error stays within the budget set by a reference that
    rounds like nn.GRU; the backward too."""
    T, B, I, H = 1024, 4, 32, 256
    case = testing.make_layer_case(T, B, I, H, reset_after=True, with_h0=True, generator=gen)
    cfg = gru.strategy_config(strategy, B, H, dtype, torch.device("cuda"))
    with gru.force_config(cfg):
        report = testing.check_layer("triton", case, device="cuda", dtype=dtype)
    assert report.ok, report.failures


@pytest.mark.parametrize("strategy", ["resident", "step", "persistent"])
@pytest.mark.parametrize("reset_after", [True, False], ids=["reset_after", "reset_before"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_every_output_element_written(strategy, reset_after, dtype, gen, poisoned_run):
    T, B, I, H = 5, 37, 6, 45
    case = testing.make_layer_case(T, B, I, H, reset_after=reset_after, generator=gen)
    config = gru.Config("resident", 16, 64, 0, 8) if strategy == "resident" else \
        gru.Config(strategy, 16, 32, 64, 4)
    outs = poisoned_run(case, config, "cuda", dtype)
    for name, t in zip(("y", "ws", "dgi", "dgh", "dh0"), outs):
        assert torch.isfinite(t).all(), f"{name}: unwritten elements"


@pytest.mark.parametrize("prec", PRECISIONS[:3], ids=[p[0] for p in PRECISIONS[:3]])
@pytest.mark.parametrize("H", [17, 100])
def test_module_parity_with_cudnn(prec, H, gen):
    """FusedGRU(backend="triton") and torch.nn.GRU (cuDNN) in the same dtype, both against
    the float64 oracle: err(triton) <= 2 err(nn.GRU) + band on outputs, h_n and grads."""
    _, dtype, allow = prec
    T, B, I, L = 11, 5, 13, 2
    kw = dict(num_layers=L, bidirectional=True, batch_first=True)
    torch.manual_seed(1234 + H)
    oracle = torch.nn.GRU(I, H, dtype=torch.float64, **kw)
    sd = oracle.state_dict()
    x64 = torch.randn(B, T, I, dtype=torch.float64, generator=gen)
    h064 = torch.randn(2 * L, B, H, dtype=torch.float64, generator=gen) * 0.5
    gout = torch.randn(B, T, 2 * H, dtype=torch.float64, generator=gen)
    ghn = torch.randn(2 * L, B, H, dtype=torch.float64, generator=gen)

    def run(mod, device, dt):
        mod = mod.to(device=device, dtype=dt)
        x = x64.to(device, dt).detach().clone().requires_grad_()
        h0 = h064.to(device, dt).detach().clone().requires_grad_()
        out, hn = mod(x, h0)
        ((out * gout.to(device, dt)).sum() + (hn * ghn.to(device, dt)).sum()).backward()
        res = {"out": out, "h_n": hn, "dx": x.grad, "dh0": h0.grad}
        res.update({"d" + k: p.grad for k, p in mod.named_parameters()})
        return res

    want = run(oracle, "cpu", torch.float64)
    kernel = fusedgru.FusedGRU(I, H, backend="triton", **kw)
    kernel.load_state_dict(sd)
    cudnn = torch.nn.GRU(I, H, **kw)
    cudnn.load_state_dict(sd)
    with tf32(allow):
        got = run(kernel, "cuda", dtype)
        base = run(cudnn, "cuda", dtype)
    for k in want:
        err = testing.rel_err(got[k], want[k])
        lim = testing.budget(dtype, testing.rel_err(base[k], want[k]))
        assert err <= lim, f"{k}: err {err:.3g} > budget {lim:.3g}"


@pytest.mark.parametrize("H", [17, 200])
def test_no_host_sync_and_current_stream(H, gen):
    case = testing.make_layer_case(6, 3, 5, H, generator=gen)
    x, h0, w_ih, w_hh, b_ih, b_hh = case.args("cuda", torch.float32)
    gy = case.grad_y.to("cuda", torch.float32)
    y_ref, ws_ref = triton_backend.forward(x, h0, w_ih, w_hh, b_ih, b_hh, True)
    g_ref = triton_backend.backward(gy, x, h0, w_ih, w_hh, y_ref, ws_ref, True)
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.cuda.stream(side):
            torch.cuda._sleep(10_000_000)  # work ahead of ours on the side stream
            y, ws = triton_backend.forward(x, h0, w_ih, w_hh, b_ih, b_hh, True)
            grads = triton_backend.backward(gy, x, h0, w_ih, w_hh, y, ws, True)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    side.synchronize()
    assert torch.equal(y, y_ref)
    for a, b in zip(grads, g_ref):
        assert torch.equal(a, b)


@pytest.mark.slow
def test_64bit_offsets(gen):
    """T*B*4H >= 2^31 elements: the last rows of the last steps are still right (rows of a
    GRU are independent, so the reference runs on those rows only)."""
    H, I = 64, 8
    B, T = 4096, 2100  # T*B*4H = 2.2e9 > 2^31
    dtype = torch.bfloat16
    w_case = testing.make_layer_case(1, 1, I, H, generator=gen)
    w_ih, w_hh, b_ih, b_hh = (t.to("cuda", dtype) for t in
                              (w_case.w_ih, w_case.w_hh, w_case.b_ih, w_case.b_hh))
    x = torch.randn(T, B, I, device="cuda", dtype=dtype)
    assert T * B * 4 * H >= 2 ** 31
    y, ws = triton_backend.forward(x, None, w_ih, w_hh, b_ih, b_hh, True)
    rows = slice(B - 3, B)
    args64 = [t.double() for t in (x[:, rows], w_ih, w_hh, b_ih, b_hh)]
    y64, ws64 = reference.gru_layer_forward(args64[0], None, *args64[1:])
    y_bl, ws_bl = reference.gru_layer_forward(x[:, rows], None, w_ih, w_hh, b_ih, b_hh)
    for got, want, base in [(y[:, rows], y64, y_bl), (ws[:, rows], ws64, ws_bl)]:
        err = testing.rel_err(got, want)
        lim = testing.budget(dtype, testing.rel_err(base, want))
        assert err <= lim, f"err {err:.3g} > budget {lim:.3g}"


def test_torch_compile_traces_the_op(gen):
    mod = fusedgru.FusedGRU(7, 33, num_layers=1, backend="triton").cuda()
    x = torch.randn(5, 3, 7, device="cuda")
    eager, _ = mod(x)
    compiled = torch.compile(mod, fullgraph=True)
    out, _ = compiled(x)
    assert torch.equal(out, eager)
