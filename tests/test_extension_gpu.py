"""The "cuda" backend (csrc/gru_cuda.cu) on a GPU: parity with the float64 reference in every
dtype, on both CUDA paths (persistent cooperative kernels and the per-step fallback), with
poisoned outputs; gradcheck in float64; determinism; the dispatcher's capacity plan.

Run by the repository's GPU script (`pytest -m gpu`); skipped without a CUDA device.
"""

import pytest
import torch

import fusedgru
from fusedgru import testing

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


@pytest.fixture(params=[False, True], ids=["fp32-strict", "tf32"])
def tf32(request):
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = request.param
    yield request.param
    torch.backends.cuda.matmul.allow_tf32 = prev


SHAPES = [(1, 1, 2, 1), (2, 3, 5, 3), (7, 5, 9, 17), (7, 3, 40, 63), (2, 5, 33, 100),
          (5, 17, 24, 130), (3, 130, 16, 40)]  # B = 130: two 128-row passes per step
DTYPES = [torch.float64, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("reset_after", [True, False], ids=["after", "before"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T%dB%dI%dH%d" % s)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_matches_reference(shape, dtype, reset_after, gen, poisoned, cuda_path):
    _ext_ready()
    case = testing.make_layer_case(*shape, reset_after=reset_after, generator=gen)
    report = testing.check_layer("cuda", case, device="cuda", dtype=dtype)
    assert report.ok, report.failures


@pytest.mark.parametrize("reset_after", [True, False], ids=["after", "before"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T%dB%dI%dH%d" % s)
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
