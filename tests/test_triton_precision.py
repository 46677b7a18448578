"""float32 precision of the Triton backend on a GPU (issue 18), checked without one.

1. The numerics strict float32 relies on.  On a GPU, strict float32 ("ieee" in the flag
   nn.GRU follows) runs every recurrent product as tl.dot(..., input_precision="tf32x3"):
   Triton's F32DotTC pass splits each operand into a_hi = a rounded to TF32 (cvt.rna: 10
   mantissa bits, nearest, ties away) and a_lo = a - a_hi, and sums three TF32 tensor-core
   products with fp32 accumulation, a_lo b_hi + a_hi b_lo + a_hi b_hi (a_lo b_lo dropped).
   The interpreter computes every tl.dot in numpy float32 whatever input_precision says,
   so the split cannot run here; a torch emulation of it (the tensor core reads an fp32
   register as TF32 by dropping its 13 low bits) shows that its error on GRU-sized
   products, and on a whole GRU layer (forward and every gradient) whose products all run
   through it, is within SPEC's float32 budget, while plain TF32's is not.
2. The flag plumbing: which DOT_PREC the launchers pass (the flag nn.GRU follows, the
   private switch to the FMA path) and which blocks float32 gets, on the CPU.
"""

import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fusedgru import ops, reference, testing

aten = torch.ops.aten

# ----------------------------------------------------------------------------------------
# The emulation
# ----------------------------------------------------------------------------------------

_LOW13 = 0x1FFF


def tf32_round(x: torch.Tensor) -> torch.Tensor:
    """x (float32) rounded to TF32 as cvt.rna.tf32.f32 does: to 10 explicit mantissa bits,
    to nearest, ties away from zero (add half an ulp to the magnitude, drop 13 bits)."""
    bits = x.contiguous().view(torch.int32)
    return ((bits + 0x1000) & ~_LOW13).view(torch.float32)


def tf32_truncate(x: torch.Tensor) -> torch.Tensor:
    """How a TF32 tensor-core product reads an fp32 register: its 13 low bits dropped."""
    return (x.contiguous().view(torch.int32) & ~_LOW13).view(torch.float32)


def mm_tf32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """tl.dot(a, b, input_precision="tf32"): TF32 operands (exact products), fp32 sums."""
    return tf32_truncate(a) @ tf32_truncate(b)


def split_tf32(a: torch.Tensor):
    hi = tf32_round(a)
    return hi, tf32_truncate(a - hi)  # a - hi is exact in fp32


def mm_tf32x3(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """tl.dot(a, b, input_precision="tf32x3"): the two small products into the accumulator,
    then the big one (the order of Triton's F32DotTC pass)."""
    a_hi, a_lo = split_tf32(a)
    b_hi, b_lo = split_tf32(b)
    return (a_lo @ b_hi + a_hi @ b_lo) + a_hi @ b_hi


class EmulatedProducts(TorchDispatchMode):
    """Every float32 matrix product (mm, addmm, bmm: all the reference layer has) computed
    by ``mm`` instead; any other product op raises, so none slips through unemulated."""

    _OTHER = {aten.addmm_.default, aten.baddbmm.default, aten.addbmm.default, aten.mv.default,
              aten.dot.default, aten.addmv.default, aten.matmul.default}

    def __init__(self, mm):
        super().__init__()
        self.mm = mm

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        f32 = all(t.dtype == torch.float32 for t in args if isinstance(t, torch.Tensor))
        if func is aten.mm.default and f32:
            return self.mm(*args)
        if func is aten.addmm.default and f32:
            assert kwargs.get("beta", 1) == 1 and kwargs.get("alpha", 1) == 1, kwargs
            bias, a, b = args
            return bias + self.mm(a, b)
        if func is aten.bmm.default and f32:
            a, b = args
            return torch.stack([self.mm(a[i], b[i]) for i in range(a.shape[0])])
        if func in self._OTHER and f32:
            raise AssertionError(f"unemulated product {func}")
        return func(*args, **kwargs)


def _product_case(B, H, gen):
    """A GRU's recurrent product: the state h (|h| < 1) times W_hh^T (nn.GRU's init)."""
    k = H ** -0.5
    h = torch.tanh(torch.randn(B, H, dtype=torch.float64, generator=gen))
    w = (torch.rand(3 * H, H, dtype=torch.float64, generator=gen) * 2 - 1) * k
    return h, w.T.contiguous()


def test_emulation_rounds_and_splits_as_the_hardware():
    x = torch.tensor([1.0, -1.0, 1 + 2 ** -11, 1 + 3 * 2 ** -11, -(1 + 2 ** -11), 1 + 2 ** -12,
                      3.0e-3, 7.25e5])
    hi = tf32_round(x)
    assert torch.equal(hi[:2], x[:2])
    assert hi[2].item() == 1 + 2 ** -10  # a tie: away from zero
    assert hi[3].item() == 1 + 2 ** -9
    assert hi[4].item() == -(1 + 2 ** -10)
    assert hi[5].item() == 1.0
    assert torch.equal(tf32_truncate(torch.tensor([1 + 2 ** -11])), torch.tensor([1.0]))
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(1000, generator=gen, dtype=torch.float32) * 10
    a_hi, a_lo = split_tf32(a)
    for t in (a_hi, a_lo):  # both are TF32 values
        assert torch.equal(t.view(torch.int32) & _LOW13, torch.zeros_like(a, dtype=torch.int32))
    assert ((a - a_hi).abs() <= a.abs() * 2.0 ** -11).all()
    assert ((a - a_hi - a_lo).abs() <= a.abs() * 2.0 ** -21).all()
    # TF32 operands: the split is exact (a_lo = 0) and 3xTF32 is the plain fp32 product.
    m, n = tf32_round(torch.randn(8, 16, generator=gen)), tf32_round(torch.randn(16, 4, generator=gen))
    assert torch.equal(mm_tf32x3(m, n), m @ n)


@pytest.mark.parametrize("B,H", [(16, 768), (64, 1024), (5, 100), (1, 17)])
def test_3xtf32_products_within_the_float32_budget_and_tf32_not(B, H):
    """GRU-sized products h W^T: the 3xTF32 error against float64 is within SPEC's float32
    budget (2 x the fp32 product's error + 1e-6); plain TF32's is two orders above it."""
    gen = torch.Generator().manual_seed(B * 1000 + H)
    h64, wt64 = _product_case(B, H, gen)
    want = h64 @ wt64
    h, wt = h64.float(), wt64.float()
    e32 = testing.rel_err(h @ wt, want)
    e3x = testing.rel_err(mm_tf32x3(h, wt), want)
    etf = testing.rel_err(mm_tf32(h, wt), want)
    lim = testing.budget(torch.float32, e32)
    assert e3x <= lim, f"3xTF32 err {e3x:.3g} > budget {lim:.3g} (fp32 {e32:.3g})"
    assert e3x < 1e-6
    assert etf > 100 * lim, f"TF32 err {etf:.3g} unexpectedly within {lim:.3g}"


def _layer(case, mm=None):
    """The reference layer in float32 (forward and every gradient), its products by ``mm``
    (None: plain fp32), as {name: tensor}."""
    args = [None if t is None else t.float() for t in
            (case.x, case.h0, case.w_ih, case.w_hh, case.b_ih, case.b_hh)]
    with EmulatedProducts(mm) if mm is not None else contextlib.nullcontext():
        y, ws = reference.gru_layer_forward(*args, case.reset_after)
        grads = reference.gru_layer_backward(case.grad_y.float(), *args[:4], y, ws,
                                             case.reset_after)
    return {"y": y, **dict(zip(testing.GRAD_NAMES, grads))}


@pytest.mark.parametrize("reset_after", [True, False], ids=["reset_after", "reset_before"])
@pytest.mark.parametrize("T,B,I,H", [(24, 16, 40, 256), (8, 5, 17, 100)])
def test_gru_layer_with_3xtf32_products_within_the_float32_budget(T, B, I, H, reset_after):
    """A whole layer, forward and the 6 gradients, every product (the recurrent ones the
    kernels run as tf32x3, and for good measure the ones torch runs around them) through the
    3xTF32 emulation, against the float64 reference: within SPEC's float32 budget set by the
    plain fp32 layer.  With TF32 products the same layer misses it (what "tf32" costs)."""
    gen = torch.Generator().manual_seed(T * 7 + H)
    case = testing.make_layer_case(T, B, I, H, reset_after=reset_after, generator=gen)
    args64 = (case.x, case.h0, case.w_ih, case.w_hh, case.b_ih, case.b_hh)
    y64, ws64 = reference.gru_layer_forward(*args64, reset_after)
    g64 = reference.gru_layer_backward(case.grad_y, *args64[:4], y64, ws64, reset_after)
    want = {"y": y64, **dict(zip(testing.GRAD_NAMES, g64))}
    base, split, tf32 = _layer(case), _layer(case, mm_tf32x3), _layer(case, mm_tf32)
    tf32_misses = 0
    for k, w in want.items():
        lim = testing.budget(torch.float32, testing.rel_err(base[k], w))
        err = testing.rel_err(split[k], w)
        assert err <= lim, f"3xTF32 {k}: err {err:.3g} > budget {lim:.3g}"
        tf32_misses += testing.rel_err(tf32[k], w) > lim
    assert tf32_misses == len(want), "TF32 products should miss the float32 budget everywhere"


# ----------------------------------------------------------------------------------------
# The flag plumbing (CPU: the launchers' choices, not the GPU's arithmetic)
# ----------------------------------------------------------------------------------------

gru = pytest.importorskip("fusedgru.kernels.gru")


@contextlib.contextmanager
def rnn_precision(precision: str):
    """torch.backends.cudnn.rnn.fp32_precision (the flag nn.GRU follows) set, all of torch's
    fp32_precision settings restored after."""
    cudnn = torch.backends.cudnn
    owners = [torch.backends, cudnn, cudnn.conv, cudnn.rnn, torch.backends.cuda.matmul]
    saved = [o.fp32_precision for o in owners]
    cudnn.rnn.fp32_precision = precision
    try:
        yield
    finally:
        for o, v in zip(owners, saved):
            o.fp32_precision = v


needs_fp32_precision_api = pytest.mark.skipif(
    getattr(getattr(torch.backends.cudnn, "rnn", None), "fp32_precision", None) is None,
    reason="torch without the fp32_precision API")


@needs_fp32_precision_api
def test_gpu_dot_precision_follows_the_rnn_flag(monkeypatch):
    monkeypatch.delenv("FUSEDGRU_TRITON_STRICT_FP32", raising=False)
    matmul = torch.backends.cuda.matmul
    with rnn_precision("tf32"):
        assert ops.rnn_tf32_allowed()
        assert gru.gpu_dot_precision(torch.float32) == "tf32"
        saved, matmul.fp32_precision = matmul.fp32_precision, "ieee"
        try:  # the matmul flag no longer decides
            assert gru.gpu_dot_precision(torch.float32) == "tf32"
        finally:
            matmul.fp32_precision = saved
    with rnn_precision("ieee"):
        saved, matmul.fp32_precision = matmul.fp32_precision, "tf32"
        try:
            assert gru.gpu_dot_precision(torch.float32) == "tf32x3"
        finally:
            matmul.fp32_precision = saved
        with gru.force_strict_fp32("ieee"):
            assert gru.gpu_dot_precision(torch.float32) == "ieee"
            with gru.force_strict_fp32(None):
                assert gru.gpu_dot_precision(torch.float32) == "tf32x3"
        monkeypatch.setenv("FUSEDGRU_TRITON_STRICT_FP32", "ieee")  # read at every call
        assert gru.gpu_dot_precision(torch.float32) == "ieee"
        with gru.force_strict_fp32("tf32x3"):
            assert gru.gpu_dot_precision(torch.float32) == "tf32x3"
        monkeypatch.setenv("FUSEDGRU_TRITON_STRICT_FP32", "fast")
        with pytest.raises(ValueError, match="FUSEDGRU_TRITON_STRICT_FP32"):
            gru.gpu_dot_precision(torch.float32)
    with pytest.raises(ValueError, match="precision must be one of"):
        with gru.force_strict_fp32("tf32"):
            pass
    for dtype in (torch.float16, torch.bfloat16):  # their own tensor-core type
        assert gru.gpu_dot_precision(dtype) == "ieee"


@needs_fp32_precision_api
def test_legacy_cudnn_flag_decides_too(monkeypatch):
    """cudnn.allow_tf32 = False (the legacy API, which also sets the RNN flag) means strict."""
    monkeypatch.delenv("FUSEDGRU_TRITON_STRICT_FP32", raising=False)
    with rnn_precision(torch.backends.cudnn.rnn.fp32_precision):  # restores all after
        torch.backends.cudnn.allow_tf32 = False
        assert gru.gpu_dot_precision(torch.float32) == "tf32x3"
        torch.backends.cudnn.allow_tf32 = True
        assert gru.gpu_dot_precision(torch.float32) == "tf32"


def test_interpreter_and_cpu_tensors_compute_in_float32():
    assert gru.dot_precision(torch.float32, "cpu") == "ieee"
    if gru.INTERPRET:
        assert gru.dot_precision(torch.float32, "cuda") == "ieee"


class _Recorder:
    """Stands in for a jitted kernel: records DOT_PREC and the blocks of each launch."""

    def __init__(self, kernel, seen):
        self.kernel, self.seen = kernel, seen

    def __getitem__(self, grid):
        def launch(*args, **kw):
            self.seen.append((kw["DOT_PREC"], kw.get("BLOCK_B"), kw.get("BLOCK_K"),
                              kw["num_warps"]))
            return self.kernel[grid](*args, **kw)
        return launch


@pytest.mark.skipif(not gru.INTERPRET, reason="launches on CPU tensors: Triton's interpreter")
@needs_fp32_precision_api
@pytest.mark.parametrize("H", [17, 100], ids=["resident", "split"])
def test_launchers_pass_the_flags_precision(H, monkeypatch, gen):
    """Through the registered ops, with the launchers' device question answered as on a GPU
    (dot_precision -> gpu_dot_precision): every launch gets "tf32" under the RNN flag's
    "tf32", "tf32x3" under "ieee", "ieee" with the FMA path forced, and float32's blocks
    (split: 16 rows, BK = 32, 8 warps).  The interpreter accepts each precision (it
    computes fp32 whatever it says), so the results stay within SPEC's float32 budget."""
    monkeypatch.delenv("FUSEDGRU_TRITON_STRICT_FP32", raising=False)
    seen = []
    for name in ("_fwd_resident_kernel", "_bwd_resident_kernel", "_fwd_split_kernel",
                 "_bwd_split_kernel"):
        monkeypatch.setattr(gru, name, _Recorder(getattr(gru, name), seen))
    monkeypatch.setattr(gru, "dot_precision", lambda dtype, device_type:
                        gru.gpu_dot_precision(dtype))
    case = testing.make_layer_case(3, 5, 4, H, with_h0=True, generator=gen)
    for flag, strict, want in (("tf32", None, "tf32"), ("ieee", None, "tf32x3"),
                               ("ieee", "ieee", "ieee")):
        seen.clear()
        with rnn_precision(flag), gru.force_strict_fp32(strict):
            report = testing.check_layer("triton", case)
        assert report.ok, report.failures
        assert seen and {s[0] for s in seen} == {want}, (flag, strict, seen)
        if H > 64:
            assert {s[1:] for s in seen} == {(16, 32, 8)}, seen


def test_float32_split_blocks_and_16bit_unchanged():
    """float32 split kernels: 16 rows, BK = 32, 8 warps at every batch (no spill in any
    precision, sm_90 AOT); 16-bit: 16 or 32 rows, BK = 64, 4 warps."""
    for B in (1, 16, 17, 64, 256):
        assert gru.choose_config(B, 1024, torch.float32) == \
            gru.Config("step", block_b=16, block_h=32, block_k=32, num_warps=8)
    assert gru.choose_config(64, 1024, torch.bfloat16) == \
        gru.Config("step", block_b=32, block_h=32, block_k=64, num_warps=4)
    # B = 64, H = 1024 float32 persistent: 4 x 32 = 128 programs fit an H100 / H200.
    cfg = gru.choose_config(64, 1024, torch.float32, 132, "persistent")
    assert cfg.strategy == "persistent" and cfg.programs(64, 1024) == 128
    with gru.force_step_path():  # the backend's per_step_path, at a resident H too
        assert gru.choose_config(3, 17, torch.float32).strategy == "step"
        assert gru.choose_config(3, 17, torch.bfloat16) == \
            gru.Config("step", block_b=16, block_h=32, block_k=64, num_warps=4)
