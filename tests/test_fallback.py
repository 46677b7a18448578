"""backend="auto" never takes a model down for a kernel that cannot launch at some shape
(fusedgru/function.py): with the failure injected on the CPU, a layer falls back to the
chosen row's per-step path, then to the next row of the table, with one warning, and later
calls go straight to what worked; an explicitly named backend raises BackendLaunchError;
other errors pass through untouched.  The GPU rows' per-step paths are checked here too
(the Triton one under the interpreter)."""

import contextlib
import warnings

import pytest
import torch

import fusedgru
from fusedgru import backends, function, testing
from fusedgru._reference_backend import backend as reference

COOP = "CUDA error: too many blocks in cooperative launch"


class Flaky:
    """A backend row whose fused kernels fail to launch (message as CUDA's) while its
    per-step path runs the reference; counts what ran."""

    name = "flaky"

    def __init__(self, fused_error=COOP, per_step_error=None):
        self.fused_error, self.per_step_error = fused_error, per_step_error
        self.stepping = False
        self.calls = []

    def _call(self, what, op, *args):
        error = self.per_step_error if self.stepping else self.fused_error
        self.calls.append((what, self.stepping))
        if error is not None:
            raise RuntimeError(error) if isinstance(error, str) else error
        return op(*args)

    def forward(self, *a):
        return self._call("forward", reference.forward, *a)

    def backward(self, *a):
        return self._call("backward", reference.backward, *a)

    @contextlib.contextmanager
    def per_step_path(self, batch):
        self.stepping = True
        try:
            yield
        finally:
            self.stepping = False

    @staticmethod
    def unavailable_reason():
        return None

    @staticmethod
    def unsupported_reason(device_type, dtype):
        return None


@pytest.fixture
def flaky(monkeypatch, install_backend):
    """Installs a fresh Flaky as row "flaky", first in auto's CPU order."""
    def install(**kw):
        impl = Flaky(**kw)
        install_backend("flaky", impl, "injected launch failures", ["flaky", "reference"])
        monkeypatch.setattr(function, "_routes", {})
        monkeypatch.setattr(function, "_per_step", {})
        return impl
    return install


def _model(backend):
    torch.manual_seed(0)
    return fusedgru.FusedGRU(5, 7, num_layers=2, bidirectional=True, backend=backend,
                             dtype=torch.float64)


def _run(model, x):
    x = x.detach().requires_grad_()
    y, h_n = model(x)
    (y.sum() + h_n.sum()).backward()
    return y.detach(), x.grad


def test_auto_falls_back_to_the_per_step_path(flaky):
    impl = flaky()
    x = torch.randn(6, 3, 5, dtype=torch.float64)
    want_y, want_dx = _run(_model("reference"), x)
    with pytest.warns(backends.BackendFallbackWarning, match="per-step kernels") as rec:
        got_y, got_dx = _run(_model("auto"), x)
    # one warning for the shape (all four layer-directions share B and H)
    assert len([w for w in rec if issubclass(w.category, backends.BackendFallbackWarning)]) == 1
    assert torch.equal(got_y, want_y) and torch.equal(got_dx, want_dx)
    # the backward ran on the per-step path too, and nothing ran fused after the failure
    assert impl.calls[0] == ("forward", False)
    assert ("backward", True) in impl.calls and ("backward", False) not in impl.calls
    impl.calls.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second call: no warning, straight to per-step
        again_y, _ = _run(_model("auto"), x)
    assert torch.equal(again_y, want_y)
    assert all(stepping for _, stepping in impl.calls)


def test_auto_falls_back_to_the_next_row(flaky):
    impl = flaky(per_step_error="out of resource: shared memory, Required: 300000, "
                                "Hardware limit: 232448")
    x = torch.randn(4, 2, 5, dtype=torch.float64)
    with pytest.warns(backends.BackendFallbackWarning, match="'reference'"):
        got = _run(_model("auto"), x)
    want = _run(_model("reference"), x)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert impl.calls == [("forward", False), ("forward", True)]


def test_no_grad_and_functional_calls_fall_back_too(flaky):
    flaky()
    x = torch.randn(3, 2, 5, dtype=torch.float64)
    with torch.no_grad(), pytest.warns(backends.BackendFallbackWarning):
        y, _ = _model("auto")(x)
    assert torch.equal(y, _model("reference")(x)[0].detach())


def test_an_explicit_backend_raises(flaky):
    flaky()
    x = torch.randn(3, 2, 5, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(backends.BackendLaunchError,
                           match=r"'flaky' could not launch.*B=2, H=7.*cooperative launch") as e:
            _model("flaky")(x)
    assert "cooperative launch" in str(e.value.__cause__)


@pytest.mark.parametrize("error", [RuntimeError("CUDA error: an illegal memory access was "
                                                "encountered"), ValueError("bad input"),
                                   torch.OutOfMemoryError("CUDA out of memory")],
                         ids=["illegal-address", "value-error", "oom"])
def test_other_errors_are_not_launch_failures(flaky, error):
    flaky(fused_error=error)
    with pytest.raises(type(error), match=str(error)[:10]):
        _model("auto")(torch.randn(3, 2, 5, dtype=torch.float64))


def test_no_route_left_raises_with_every_reason(flaky, monkeypatch):
    flaky(per_step_error=COOP)
    monkeypatch.setitem(backends.AUTO_ORDER, "cpu", ["flaky"])
    with pytest.raises(backends.BackendLaunchError, match="no backend of 'auto'.*flaky per-step"):
        _model("auto")(torch.randn(3, 2, 5, dtype=torch.float64))


def test_launch_failure_classification():
    from triton.runtime.errors import OutOfResources

    yes = [RuntimeError(COOP), OutOfResources(300000, 232448, "shared memory"),
           RuntimeError("CUDA error: too many resources requested for launch"),
           RuntimeError("persistent Triton launch of 140 programs (B=16, H=4480, block_b=16, "
                        "block_h=32) but at most 132 can be co-resident on cuda:0"),
           RuntimeError("fusedgru: accumulator tiles (300000 bytes) exceed shared memory")]
    no = [RuntimeError("CUDA error: an illegal memory access was encountered"),
          torch.OutOfMemoryError("too many blocks in cooperative launch"), ValueError(COOP)]
    assert all(backends.is_launch_failure(e) for e in yes)
    assert not any(backends.is_launch_failure(e) for e in no)


def test_resolved_names_are_plain_strings_and_auto_knows_its_fallbacks():
    """A resolved name is a plain str, so torch.compile (torch 2.11's Dynamo included) takes
    it as a constant; the rows "auto" falls back to come from the table for the device and
    dtype, after the chosen one."""
    for name in ("auto", "reference"):
        pick = backends.resolve_backend(name, torch.device("cpu"), torch.float32)
        assert type(pick) is str and pick in backends.BACKENDS
    pick = backends.resolve_backend("auto", torch.device("cpu"), torch.float32)
    later = backends.auto_fallbacks(pick, torch.device("cpu"), torch.float32)
    order = backends.AUTO_ORDER["cpu"]
    assert pick not in later and later[-1] == "reference"
    assert list(later) == [n for n in order[order.index(pick) + 1:] if n in later]
    assert backends.auto_fallbacks("reference", torch.device("cpu"), torch.float32) == ()


def test_triton_per_step_path_runs_the_split_kernels(gen):
    """The triton row's per-step path at a resident H: the split kernels launched one unit
    at a time, within SPEC's budget (interpreter, float32)."""
    if backends.backend_status()["triton"] is not None:
        pytest.skip(backends.backend_status()["triton"])
    from fusedgru.kernels import gru
    from fusedgru.kernels.backend import backend as triton

    seen = []
    real = gru.launch_forward

    def spy(*a, **kw):
        seen.append(gru.choose_config(a[0].shape[1], a[2].shape[1], a[2].dtype))
        return real(*a, **kw)

    case = testing.make_layer_case(3, 2, 4, 17, reset_after=False, generator=gen)
    with pytest.MonkeyPatch.context() as mp, triton.per_step_path(2):
        mp.setattr(gru, "launch_forward", spy)
        report = testing.check_layer("triton", case)
    assert report.ok, report.failures
    assert seen and all(c.strategy == "step" for c in seen), seen


def test_cuda_row_has_a_per_step_path_and_cpu_none():
    from fusedgru import extension

    assert extension.cpu_backend.per_step_path is None
    assert callable(extension.cuda_backend.per_step_path)
