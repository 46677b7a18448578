"""The "triton" backend on a CUDA device: float32 (exact and TF32), float16, bfloat16,
larger sizes (the per-step split-H kernels), module parity with torch.nn.GRU (cuDNN),
64-bit offsets, no host synchronisation, the current stream.

Every test is marked gpu and skipped without a CUDA device; run by the repository's GPU
script (pytest -m gpu).  Budgets are SPEC section 5's, via fusedgru.testing.

The default parametrisation is the first-contact subset: every kernel, strategy,
precision and formulation once, at odd sizes and at sizes whose B and H are divisible by
16 (Triton compiles those separately), B = 1 included.  Parameters marked EXH (the rest of
the sweep) run with --gpu-exhaustive.  benchmarks/gpu_specs.py reads these lists to compile
every Triton specialisation the default set launches ahead of time.
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
def fp32_precision(precision: str):
    """float32 on CUDA in ``precision`` ("tf32" or "ieee") for nn.GRU (cuDNN's RNN flag),
    fusedgru's GPU backends (the same flag, fusedgru.ops.rnn_tf32_allowed) and torch's
    matmuls (the reference baseline, the triton row's input projection); torch's settings
    are restored after.  Through the fp32_precision API where torch has it (its legacy
    getters raise once it is in use), else the legacy allow_tf32 flags."""
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    rnn = getattr(cudnn, "rnn", None)
    if getattr(rnn, "fp32_precision", None) is not None:
        owners = [o for o in (torch.backends, cudnn, getattr(cudnn, "conv", None), rnn, matmul)
                  if getattr(o, "fp32_precision", None) is not None]
        saved = [o.fp32_precision for o in owners]
        rnn.fp32_precision = precision
        matmul.fp32_precision = precision
        try:
            yield
        finally:
            for o, v in zip(owners, saved):
                o.fp32_precision = v
    else:
        saved = (matmul.allow_tf32, cudnn.allow_tf32)
        matmul.allow_tf32 = cudnn.allow_tf32 = precision == "tf32"
        try:
            yield
        finally:
            matmul.allow_tf32, cudnn.allow_tf32 = saved


def tf32(allowed: bool):
    """TF32 allowed (torch's default for nn.GRU) or strict float32 ("fp32": tf32x3 in the
    kernels), for the kernels, nn.GRU and the reference baseline alike."""
    return fp32_precision("tf32" if allowed else "ieee")


EXH = pytest.mark.exhaustive  # the rest of the sweep (tests/conftest.py: --gpu-exhaustive)

# (name, dtype, tf32 allowed)
PRECISIONS = [("fp32", torch.float32, False), ("tf32", torch.float32, True),
              ("fp16", torch.float16, False), ("bf16", torch.bfloat16, False)]

# (T, B, I, H): resident sizes (H <= 64, 128 in 16 bits) and split sizes (H split across
# programs).  First contact: B = 1 with H = 1; odd B > 16 (two row blocks) with odd H; H =
# 100 (split in fp32, resident HP = 128 in 16 bits); B and H divisible by 16 (split, 32-row
# blocks).  The others repeat those paths at other sizes.
SIZES = [(7, 1, 3, 1), pytest.param(7, 5, 17, 17, marks=EXH), (9, 17, 40, 63),
         pytest.param(9, 17, 40, 64, marks=EXH), (17, 5, 50, 100), (9, 64, 256, 256),
         pytest.param(5, 3, 512, 1024, marks=EXH)]
# tf32 and fp16 take the fp32 and bf16 code with another dot precision or element type:
# one resident and one split size each.
_NARROW = {"tf32", "fp16"}
_NARROW_SIZES = {(9, 17, 40, 63), (17, 5, 50, 100)}


def _layer_params():
    out = []
    for prec in PRECISIONS:
        for size in SIZES:
            values = size.values if hasattr(size, "values") else size
            exh = hasattr(size, "values") or (prec[0] in _NARROW and values not in _NARROW_SIZES)
            out.append(pytest.param(prec, *values, marks=EXH if exh else (),
                                    id=f"{prec[0]}-T{values[0]}B{values[1]}I{values[2]}H{values[3]}"))
    return out


@pytest.mark.parametrize("reset_after", [True, False], ids=["reset_after", "reset_before"])
@pytest.mark.parametrize("prec,T,B,I,H", _layer_params())
def test_layer_vs_reference(prec, T, B, I, H, reset_after, gen):
    _, dtype, allow = prec
    case = testing.make_layer_case(T, B, I, H, reset_after=reset_after, with_h0=(H % 2 == 1),
                                   bias=(B != 3), generator=gen)
    with tf32(allow):
        report = testing.check_layer("triton", case, device="cuda", dtype=dtype)
    assert report.ok, report.failures


# First contact: fp32 and bf16 at one odd size; the other precisions and sizes with EXH.
LARGE_H_SIZES = [(33, 5, 50, 200), pytest.param(9, 33, 64, 300, marks=EXH),
                 pytest.param(4, 2, 16, 1024, marks=EXH)]
LARGE_H_PRECISIONS = [PRECISIONS[0], pytest.param(PRECISIONS[1], marks=EXH),
                      pytest.param(PRECISIONS[2], marks=EXH), PRECISIONS[3]]


@pytest.mark.parametrize("strategy", ["step", "persistent"])  # gru.LARGE_H_STRATEGIES
@pytest.mark.parametrize("reset_after", [True, False], ids=["reset_after", "reset_before"])
@pytest.mark.parametrize("T,B,I,H", LARGE_H_SIZES)
@pytest.mark.parametrize("prec", LARGE_H_PRECISIONS, ids=[p[0] for p in PRECISIONS])
def test_large_h_strategies_vs_reference(prec, T, B, I, H, reset_after, strategy, gen):
    """Both large-H strategies (a launch per unit; one persistent launch with a grid
    barrier), whichever is the default, in every precision (fp32 and bf16 by default)."""
    _, dtype, allow = prec
    case = testing.make_layer_case(T, B, I, H, reset_after=reset_after, with_h0=(B % 2 == 1),
                                   generator=gen)
    cfg = gru.strategy_config(strategy, B, H, dtype, torch.device("cuda"))
    with tf32(allow), gru.force_config(cfg):
        report = testing.check_layer("triton", case, device="cuda", dtype=dtype)
    assert report.ok, report.failures


@pytest.mark.parametrize("strategy", ["step", "persistent"])  # gru.LARGE_H_STRATEGIES
@pytest.mark.parametrize("dtype", [pytest.param(torch.float16, marks=EXH), torch.bfloat16],
                         ids=["fp16", "bf16"])
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
@pytest.mark.parametrize("reset_after,dtype", [
    (True, torch.float32), (False, torch.float32), (True, torch.bfloat16),
    pytest.param(False, torch.bfloat16, marks=EXH)],
    ids=["reset_after-fp32", "reset_before-fp32", "reset_after-bf16", "reset_before-bf16"])
def test_every_output_element_written(strategy, reset_after, dtype, gen, poisoned_run):
    T, B, I, H = 5, 37, 6, 45
    case = testing.make_layer_case(T, B, I, H, reset_after=reset_after, generator=gen)
    config = gru.Config("resident", 16, 64, 0, 8) if strategy == "resident" else \
        gru.Config(strategy, 16, 32, 64, 4)
    outs = poisoned_run(case, config, "cuda", dtype)
    for name, t in zip(("y", "ws", "dgi", "dgh", "dh0"), outs):
        assert torch.isfinite(t).all(), f"{name}: unwritten elements"


@pytest.mark.parametrize("prec,H", [
    (PRECISIONS[0], 17), pytest.param(PRECISIONS[0], 100, marks=EXH),
    pytest.param(PRECISIONS[1], 17, marks=EXH), (PRECISIONS[1], 100),
    (PRECISIONS[2], 17), pytest.param(PRECISIONS[2], 100, marks=EXH)],
    ids=["fp32-17", "fp32-100", "tf32-17", "tf32-100", "fp16-17", "fp16-100"])
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


# ----------------------------------------------------------------------------------------
# float32 precision (issue 18): the flag nn.GRU follows; strict float32 as 3xTF32
# ----------------------------------------------------------------------------------------

# The FMA path strict float32 can be forced to (gru.force_strict_fp32("ieee"), kept for
# timing): one resident and one split size, the persistent launch at the split size.
STRICT_FP32_PATH_SIZES = [(("fp32",), 9, 17, 40, 63), (("fp32",), 17, 5, 50, 100)]


@pytest.mark.parametrize("reset_after", [True, False], ids=["reset_after", "reset_before"])
@pytest.mark.parametrize("prec,T,B,I,H", STRICT_FP32_PATH_SIZES,
                         ids=[f"H{p[4]}" for p in STRICT_FP32_PATH_SIZES])
def test_strict_float32_fma_path_vs_reference(prec, T, B, I, H, reset_after, gen):
    """The fp32 FMA path (no tensor cores), still selectable for timing, within SPEC's float32
    budget; and the launches really took it (DOT_PREC "ieee" vs the default "tf32x3")."""
    case = testing.make_layer_case(T, B, I, H, reset_after=reset_after, with_h0=(H % 2 == 1),
                                   generator=gen)
    with tf32(False):
        assert gru.dot_precision(torch.float32, "cuda") == "tf32x3"
        with gru.force_strict_fp32("ieee"):
            assert gru.dot_precision(torch.float32, "cuda") == "ieee"
            report = testing.check_layer("triton", case, device="cuda", dtype=torch.float32)
    assert report.ok, report.failures


@pytest.mark.parametrize("strategy", ["step", "persistent"])
@pytest.mark.parametrize("reset_after", [True, False], ids=["reset_after", "reset_before"])
def test_strict_float32_split_strategies_vs_reference(strategy, reset_after, gen):
    """Strict float32 (tf32x3) through both large-H strategies at H = 1024 (K = 32 chunks of
    the split products: the error of the split accumulates over the longest reduction the
    tests have) within SPEC's float32 budget."""
    T, B, I, H = 6, 3, 64, 1024
    case = testing.make_layer_case(T, B, I, H, reset_after=reset_after, with_h0=True,
                                   generator=gen)
    cfg = gru.strategy_config(strategy, B, H, torch.float32, torch.device("cuda"))
    with tf32(False), gru.force_config(cfg):
        report = testing.check_layer("triton", case, device="cuda", dtype=torch.float32)
    assert report.ok, report.failures


# H: resident (48) and split (256) sizes.
PRECISION_MODE_H = [48, 256]


@pytest.mark.parametrize("H", PRECISION_MODE_H)
def test_float32_precision_mode_follows_nn_gru(H, gen):
    """FusedGRU(backend="triton") in float32 computes in the precision nn.GRU (cuDNN) does,
    under each setting of the flag nn.GRU follows: torch's default (TF32: both errors
    against the float64 oracle at TF32's level, 1e-5 or more, and fused within twice
    nn.GRU's + the band) and strict ("ieee": both far below, fused within SPEC's float32
    budget of nn.GRU's error, through tf32x3)."""
    T, B, I = 9, 8, 24
    torch.manual_seed(H)
    oracle = torch.nn.GRU(I, H, dtype=torch.float64)
    x64 = torch.randn(T, B, I, dtype=torch.float64, generator=gen)
    h064 = torch.randn(1, B, H, dtype=torch.float64, generator=gen) * 0.5
    gout = torch.randn(T, B, H, dtype=torch.float64, generator=gen)

    def run(mod, device, dt):
        mod = mod.to(device=device, dtype=dt)
        x = x64.to(device, dt).detach().clone().requires_grad_()
        h0 = h064.to(device, dt).detach().clone().requires_grad_()
        out, hn = mod(x, h0)
        ((out * gout.to(device, dt)).sum() + hn.sum()).backward()
        return {"out": out, "h_n": hn, "dx": x.grad, "dh0": h0.grad,
                **{"d" + k: p.grad for k, p in mod.named_parameters()}}

    want = run(oracle, "cpu", torch.float64)
    for mode in ("default", "ieee"):
        kernel = fusedgru.FusedGRU(I, H, backend="triton")
        kernel.load_state_dict(oracle.state_dict())
        cudnn = torch.nn.GRU(I, H)
        cudnn.load_state_dict(oracle.state_dict())
        ctx = contextlib.nullcontext() if mode == "default" else fp32_precision("ieee")
        with ctx:
            assert gru.dot_precision(torch.float32, "cuda") == \
                ("tf32" if mode == "default" else "tf32x3")
            got = run(kernel, "cuda", torch.float32)
            base = run(cudnn, "cuda", torch.float32)
        for k in ("out", "h_n"):
            e_fused, e_cudnn = testing.rel_err(got[k], want[k]), testing.rel_err(base[k], want[k])
            if mode == "default":  # both TF32
                assert e_fused > 1e-5 and e_cudnn > 1e-5, (mode, k, e_fused, e_cudnn)
            else:  # both strict
                assert e_fused < 1e-5 and e_cudnn < 1e-5, (mode, k, e_fused, e_cudnn)
        for k in want:
            err = testing.rel_err(got[k], want[k])
            lim = testing.budget(torch.float32, testing.rel_err(base[k], want[k]))
            assert err <= lim, f"{mode} {k}: err {err:.3g} > budget {lim:.3g}"
