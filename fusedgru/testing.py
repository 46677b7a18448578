"""The correctness policy of docs/SPEC.md section 5, as code shared by the tests,
`fusedgru check` and the benchmarks (which check a provider before timing it).

    err(y)  = ||y - y64|| / ||y64||           (Frobenius, against the float64 oracle)
    budget  = 2 * err(baseline in the same dtype on the same inputs) + band(dtype)

The baseline is the reference backend run in the kernel's dtype on the kernel's device,
and for float32 on a GPU in the kernels' precision: TF32 when the flag torch.nn.GRU follows
allows it (torch's default), strict float32 otherwise (_baseline_precision).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence

import torch
import torch.utils._python_dispatch
from torch import Tensor

from . import backends, ops, reference

__all__ = ["BAND", "cpu_backend_dtypes", "rel_err", "budget", "LayerCase", "make_layer_case", "check_layer", "LayerReport",
           "OpLog"]

BAND: Dict[torch.dtype, float] = {
    torch.float64: 1e-12,
    torch.float32: 1e-6,
    torch.float16: 1e-3,
    torch.bfloat16: 1e-2,
}

GRAD_NAMES = ("dx", "dh0", "dw_ih", "dw_hh", "db_ih", "db_hh")


def cpu_backend_dtypes():
    """[(name, dtype)]: every backend available here that runs CPU tensors, with the most
    precise dtype it takes (float64 where it can, so comparisons are tight)."""
    out = []
    for name in backends.available_backends():
        impl = backends.get_backend(name)
        dtype = next((d for d in (torch.float64, torch.float32)
                      if impl.unsupported_reason("cpu", d) is None), None)
        if dtype is not None:
            out.append((name, dtype))
    return out


def rel_err(y: Tensor, y64: Tensor) -> float:
    """||y - y64|| / ||y64|| in float64 on the CPU; inf if y has a NaN or Inf the oracle has
    not (an unwritten, poisoned element always fails)."""
    a = y.detach().to("cpu", torch.float64)
    b = y64.detach().to("cpu", torch.float64)
    if a.shape != b.shape:
        raise AssertionError(f"shape {tuple(a.shape)} != oracle shape {tuple(b.shape)}")
    if not torch.equal(torch.isfinite(a), torch.isfinite(b)):
        return float("inf")
    a = torch.where(torch.isfinite(b), a, 0)
    b = torch.where(torch.isfinite(b), b, 0)
    denom = b.norm().item()
    num = (a - b).norm().item()
    return num / denom if denom > 0 else num


def budget(dtype: torch.dtype, baseline_err: float) -> float:
    return 2.0 * baseline_err + BAND[dtype]


@dataclass
class LayerCase:
    """Random inputs of one layer-direction (never zeros or ones), on the CPU in float64.
    With batch_sizes, x and grad_y are packed rows (N, .); resets (T, B) is bool (the
    sequence structure of fusedgru/reference.py)."""

    x: Tensor  # (T, B, I), or (N, I) packed
    h0: Optional[Tensor]  # (B, H)
    w_ih: Tensor  # (3H, I)
    w_hh: Tensor  # (3H, H)
    b_ih: Optional[Tensor]  # (3H,)
    b_hh: Optional[Tensor]  # (3H,)
    grad_y: Tensor  # (T, B, H), or (N, H) packed
    reset_after: bool
    batch_sizes: Optional[Tensor] = None  # (T,) int64 on the CPU
    resets: Optional[Tensor] = None  # (T, B) bool

    def args(self, device=None, dtype=None):
        def cv(t):
            return None if t is None else t.to(device=device, dtype=dtype).contiguous()

        return [cv(t) for t in (self.x, self.h0, self.w_ih, self.w_hh, self.b_ih, self.b_hh)]

    def seq_args(self, device=None):
        """(batch_sizes, resets) as the ops take them: batch_sizes stays on the CPU."""
        resets = None if self.resets is None else self.resets.to(device)
        return self.batch_sizes, resets


def make_layer_case(T: int, B: int, I: int, H: int, *, reset_after: bool = True,
                    with_h0: bool = True, bias: bool = True,
                    generator: Optional[torch.Generator] = None,
                    lengths: Optional[Sequence[int]] = None,
                    resets: Optional[Tensor] = None) -> LayerCase:
    """lengths (B non-increasing values, the first T): a packed case of those sequences;
    resets: a (T, B) bool tensor for a dense case with state resets."""
    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, dtype=torch.float64, generator=generator) * scale

    batch_sizes = None
    rows: tuple = (T, B)
    if lengths is not None:
        lengths = [int(n) for n in lengths]
        if len(lengths) != B or lengths[0] != T or sorted(lengths, reverse=True) != lengths:
            raise ValueError(f"lengths: expected {B} non-increasing lengths starting at T={T}, "
                             f"got {lengths}")
        batch_sizes = torch.tensor([sum(n > t for n in lengths) for t in range(T)])
        rows = (int(batch_sizes.sum()),)
    if resets is not None and tuple(resets.shape) != (T, B):
        raise ValueError(f"resets: expected shape {(T, B)}, got {tuple(resets.shape)}")
    k = 1.0 / H ** 0.5  # nn.GRU's initialisation scale
    return LayerCase(
        x=rnd(*rows, I),
        h0=rnd(B, H, scale=0.5) if with_h0 else None,
        w_ih=(torch.rand(3 * H, I, dtype=torch.float64, generator=generator) * 2 - 1) * k,
        w_hh=(torch.rand(3 * H, H, dtype=torch.float64, generator=generator) * 2 - 1) * k,
        b_ih=rnd(3 * H, scale=k) if bias else None,
        b_hh=rnd(3 * H, scale=k) if bias else None,
        grad_y=rnd(*rows, H),
        reset_after=reset_after,
        batch_sizes=batch_sizes,
        resets=None if resets is None else resets.to(torch.bool),
    )


@dataclass
class LayerReport:
    errors: Dict[str, float] = field(default_factory=dict)
    budgets: Dict[str, float] = field(default_factory=dict)

    @property
    def failures(self) -> Dict[str, str]:
        return {k: f"err {self.errors[k]:.3g} > budget {self.budgets[k]:.3g}"
                for k in self.errors if not self.errors[k] <= self.budgets[k]}

    @property
    def ok(self) -> bool:
        return not self.failures

    @property
    def worst(self) -> float:
        """The largest err/budget ratio (<= 1 passes)."""
        return max(self.errors[k] / self.budgets[k] for k in self.errors)


def _run(impl, case: LayerCase, device, dtype, backward: bool):
    x, h0, w_ih, w_hh, b_ih, b_hh = case.args(device, dtype)
    seq = case.seq_args(device)
    y, ws = impl.forward(x, h0, w_ih, w_hh, b_ih, b_hh, case.reset_after, *seq)
    out = {"y": y}
    if backward:
        gy = case.grad_y.to(device=device, dtype=dtype)
        grads = impl.backward(gy, x, h0, w_ih, w_hh, y, ws, case.reset_after, *seq)
        out.update(zip(GRAD_NAMES, grads))
        if h0 is None:
            del out["dh0"]
        if b_ih is None:
            del out["db_ih"], out["db_hh"]
    return out


@contextlib.contextmanager
def _baseline_precision(device, dtype):
    """The baseline in the precision the GPU kernels use for float32: TF32 when the flag
    nn.GRU follows allows it (ops.rnn_tf32_allowed; torch's default), strict otherwise.
    The reference's matmuls follow torch.backends.cuda.matmul, strict by default, which
    would hold a TF32 kernel to a strict float32 budget."""
    matmul = torch.backends.cuda.matmul
    if (torch.device(device).type != "cuda" or dtype != torch.float32
            or getattr(matmul, "fp32_precision", None) is None):
        yield
        return
    before = matmul.fp32_precision
    matmul.fp32_precision = "tf32" if ops.rnn_tf32_allowed() else "ieee"
    try:
        yield
    finally:
        matmul.fp32_precision = before


def check_layer(backend: str, case: LayerCase, *, device="cpu", dtype=torch.float32,
                backward: bool = True) -> LayerReport:
    """Runs ``backend`` on ``case`` and measures every output and gradient against the
    float64 reference, with SPEC's budget from the reference run in the same dtype."""
    impl = backends.get_backend(backend)
    oracle = _run(backends.get_backend("reference"), case, "cpu", torch.float64, backward)
    with _baseline_precision(device, dtype):
        baseline = _run(backends.get_backend("reference"), case, device, dtype, backward)
    got = _run(impl, case, device, dtype, backward)
    report = LayerReport()
    for k, ref in oracle.items():
        report.errors[k] = rel_err(got[k], ref)
        report.budgets[k] = budget(dtype, rel_err(baseline[k], ref))
    return report


class OpLog(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the name of every dispatcher op run inside it (``"fusedgru.gru_fwd.default"``,
    ``"aten.mm.default"`` ...): which kernels a call really took; ``calls``: (name, args,
    kwargs) of each, as the dispatcher passed them (arguments equal to their defaults at
    the end may be left out)."""

    def __init__(self):
        super().__init__()
        self.names = []
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        self.calls.append((str(func), args, kwargs or {}))
        return func(*args, **(kwargs or {}))

    def backward_needs(self, op_name: str) -> list:
        """(need_dx, need_dw) of each call of the backward op ``op_name``
        (``"fusedgru.gru_bwd.default"``), in call order."""
        out = []
        for name, args, kwargs in self.calls:
            if name == op_name:
                rest = list(args[10:12]) + [True, True]
                out.append((bool(kwargs.get("need_dx", rest[0])),
                            bool(kwargs.get("need_dw", rest[1]))))
        return out
