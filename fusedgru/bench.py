"""fusedgru bench: every available backend against torch.nn.GRU on the grids of
../shared/SPEC.md section 6 (the project's main job).

    fusedgru bench                          the CPU grid without a GPU, "stream" with one
    fusedgru bench --quick                  about a minute: a subset of the grid
    fusedgru bench --grid batch,deep --dtype bfloat16 --mode train --out DIR
    fusedgru bench --compare OLD.json       the change against a saved run
    fusedgru bench --from results.json      reprint / replot a saved run, timing nothing

Per cell (one shape, dtype and mode) every provider is run on the SAME weights and inputs:

    nn.GRU       torch.nn.GRU (cuDNN on a GPU, oneDNN/ATen on the CPU): the baseline
    <backend>    each fusedgru backend of the table usable on the device
                 (FusedGRU.from_torch(gru, backend=...))
    ref+compile  the reference's maths with its per-step cell under torch.compile
    flashrnn     the flashrnn package's GRU, where it is installed (GPU)

Before a provider is timed it is checked against the float64 oracle (nn.GRU run in
float64 on the same device, on the first --check-steps steps of the same inputs): outputs,
h_n and, in training mode, dx, dh0 and every weight gradient must fall within SPEC
section 5's budget, 2 * err(nn.GRU in the same dtype) + band.  A provider that fails is
reported as "WRONG" and not timed.

Timing: triton.testing.do_bench (median, after warm-up, L2 flushed) on a GPU, with
torch.utils.benchmark as the fallback; torch.utils.benchmark.Timer.blocked_autorange
(median) on the CPU.  Inference runs under no_grad; training is forward + backward
(dx, dh0 and every weight gradient).  Memory: on a GPU the peak allocated during one call
beyond what was allocated before it; in training on any device also the bytes the autograd
graph saves for the backward (parameters and inputs not counted).

results.json holds one row per (cell, provider) with the machine, versions, commit and
TF32 setting; speedup.png plots speed-up vs batch size, one line per hidden size and
backend.
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from . import ops

__all__ = ["main", "Case", "GRIDS", "grid_cases", "Provider", "discover_providers",
           "check_provider", "run_cell", "environment", "SCHEMA"]

SCHEMA = 1
BASELINE = "nn.GRU"
COMPILE = "ref+compile"
FLASHRNN = "flashrnn"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64}
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "fp64": "float64"}
MODES = ("inference", "train")


# ----------------------------------------------------------------------------------------
# Grids (SPEC section 6)
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One cell of a grid: a GRU shape, a dtype and a mode."""

    grid: str
    B: int
    H: int
    T: int
    I: int
    layers: int = 1
    bidirectional: bool = False
    dtype: str = "float32"
    mode: str = "inference"

    @property
    def D(self) -> int:
        return 2 if self.bidirectional else 1

    def key(self) -> tuple:
        """What identifies a cell across runs (the grid's name is not part of it)."""
        return (self.B, self.H, self.T, self.I, self.layers, self.bidirectional, self.dtype,
                self.mode)

    @property
    def label(self) -> str:
        return (f"{self.grid} {self.mode} {self.dtype} B={self.B} H={self.H} T={self.T}"
                + (f" I={self.I}" if self.I != self.H else "")
                + (f" L={self.layers}" if self.layers != 1 else "")
                + (" bidir" if self.bidirectional else ""))


@dataclass(frozen=True)
class GridSpec:
    B: Tuple[int, ...]
    H: Tuple[int, ...]
    T: Tuple[int, ...]
    dtypes: Tuple[str, ...]
    modes: Tuple[str, ...]
    I: Optional[int] = None  # None: I = H
    layers: int = 1
    bidirectional: bool = False
    summary: str = ""


_BOTH = ("inference", "train")
GRIDS: Dict[str, GridSpec] = {
    "stream": GridSpec((1, 8, 16, 64), (256, 512, 1024), (1024,), ("float32", "bfloat16"),
                       _BOTH, summary="GPU: small batches, long sequences"),
    "batch": GridSpec((128, 256), (512, 1024, 2048), (256,), ("float32", "bfloat16"), _BOTH,
                      summary="GPU: large batches and hidden sizes"),
    "deep": GridSpec((32,), (512,), (512,), ("float32", "bfloat16"), ("train",), layers=2,
                     bidirectional=True, summary="GPU: 2 layers, bidirectional"),
    "d2l": GridSpec((32,), (256,), (35,), ("float32",), ("train",), I=28,
                    summary="the textbook character model (I = 28 one-hot characters)"),
    "cpu": GridSpec((1, 32), (64, 256), (35, 128), ("float32",), _BOTH,
                    summary="what a machine without a GPU measures"),
    # Not in SPEC: seconds on any machine, for the smoke tests and CI.
    "tiny": GridSpec((1, 3), (8, 17), (5,), ("float32",), _BOTH, I=6,
                     summary="smoke test: tiny odd sizes"),
}
# --quick: a subset of each grid (about a minute on the device it is meant for).
QUICK: Dict[str, dict] = {
    "stream": {"B": (1, 64), "H": (256, 1024)},
    "batch": {"B": (128,), "H": (512, 2048)},
    "deep": {"T": (128,)},
    "d2l": {},
    "cpu": {"T": (35,)},
    "tiny": {},
}
ALL = ("stream", "batch", "deep", "d2l", "cpu")  # --grid all: every grid of SPEC section 6


def grid_cases(name: str, *, quick: bool = False, dtypes: Optional[Sequence[str]] = None,
               modes: Optional[Sequence[str]] = None) -> List[Case]:
    spec = GRIDS[name]
    sub = QUICK.get(name, {}) if quick else {}
    cases = []
    for dtype in spec.dtypes:
        if dtypes and dtype not in dtypes:
            continue
        for mode in spec.modes:
            if modes and mode not in modes:
                continue
            for H in sub.get("H", spec.H):
                for B in sub.get("B", spec.B):
                    for T in sub.get("T", spec.T):
                        cases.append(Case(name, B, H, T, spec.I or H, spec.layers,
                                          spec.bidirectional, dtype, mode))
    return cases


# ----------------------------------------------------------------------------------------
# Providers: everything that is timed, each built from the same nn.GRU
# ----------------------------------------------------------------------------------------


def _gru_step(gi: Tensor, h: Tensor, w_hh: Tensor, b_hh: Tensor) -> Tensor:
    """One reset_after=True step (SPEC section 1): gi (B, 3H), h (B, H) -> h' (B, H)."""
    gh = torch.addmm(b_hh, h, w_hh.t())
    i_r, i_z, i_n = gi.chunk(3, 1)
    h_r, h_z, h_n = gh.chunk(3, 1)
    r = torch.sigmoid(i_r + h_r)
    z = torch.sigmoid(i_z + h_z)
    n = torch.tanh(i_n + r * h_n)
    return n + z * (h - n)


_COMPILED_STEP: Optional[Callable] = None


class CompiledReferenceGRU(nn.Module):
    """The reference's maths (fusedgru/reference.py: one input-projection GEMM over all
    steps, then a per-step cell) with the cell under torch.compile.

    The cell, not the whole time loop, is compiled: an unrolled T = 1024 loop takes minutes
    to compile, the cell seconds, and dynamic=True keeps one compiled graph across batch and
    hidden sizes.  Parameters carry nn.GRU's names, so gradients compare name by name.
    """

    def __init__(self, gru: nn.GRU):
        super().__init__()
        if not gru.bias:
            raise ValueError("ref+compile: bias=False is not benchmarked")
        self.num_layers, self.D = gru.num_layers, 2 if gru.bidirectional else 1
        for name, p in gru.named_parameters():
            self.register_parameter(name, nn.Parameter(p.detach().clone()))

    def forward(self, x: Tensor, h0: Tensor) -> Tuple[Tensor, Tensor]:
        global _COMPILED_STEP
        if _COMPILED_STEP is None:
            _COMPILED_STEP = torch.compile(_gru_step, dynamic=True)
        inp, h_n = x, []
        for layer in range(self.num_layers):
            outs = []
            for d in range(self.D):
                sfx = f"_l{layer}" + ("_reverse" if d else "")
                gi = nn.functional.linear(inp, getattr(self, "weight_ih" + sfx),
                                          getattr(self, "bias_ih" + sfx))  # (T, B, 3H)
                if d:
                    gi = gi.flip(0)
                h = h0[layer * self.D + d]
                w_hh, b_hh = getattr(self, "weight_hh" + sfx), getattr(self, "bias_hh" + sfx)
                ys = []
                # Each (grad mode, dtype, stride pattern) of the grid is one more graph of
                # the same cell; torch's default limit of 8 would leave later cells eager.
                with torch._dynamo.config.patch(recompile_limit=64):
                    for t in range(gi.shape[0]):
                        h = _COMPILED_STEP(gi[t], h, w_hh, b_hh)
                        ys.append(h)
                y = torch.stack(ys)
                h_n.append(h)
                outs.append(y.flip(0) if d else y)
            inp = outs[0] if self.D == 1 else torch.cat(outs, 2)
        return inp, torch.stack(h_n)


class FlashRNNGRU(nn.Module):
    """The flashrnn package's fused CUDA GRU behind nn.GRU's parameters (1 layer, one
    direction).  NEVER RUN: written against flashrnn 1.0's documented call
    flashrnn(Wx (B,T,G,NH,D), R (G,NH,D,D), b (G+1,NH,D), states, function="gru"); the gate
    order and transposes are assumptions that the correctness check confirms or refutes
    (a mismatch is reported as WRONG, never timed)."""

    def __init__(self, gru: nn.GRU):
        super().__init__()
        if gru.num_layers != 1 or gru.bidirectional or not gru.bias:
            raise ValueError("flashrnn adapter: 1 layer, one direction, with bias only")
        from flashrnn.flashrnn import flashrnn  # noqa: F401  (import check)

        for name, p in gru.named_parameters():
            self.register_parameter(name, nn.Parameter(p.detach().clone()))

    def forward(self, x: Tensor, h0: Tensor) -> Tuple[Tensor, Tensor]:
        from flashrnn.flashrnn import flashrnn

        T, B, _ = x.shape
        H = self.weight_hh_l0.shape[1]
        wx = nn.functional.linear(x, self.weight_ih_l0)  # (T, B, 3H)
        wx = wx.view(T, B, 3, 1, H).transpose(0, 1)  # (B, T, G, NH, D)
        R = self.weight_hh_l0.view(3, H, H).transpose(1, 2).unsqueeze(1)  # (G, NH, D, D)
        bi, bh = self.bias_ih_l0.view(3, H), self.bias_hh_l0.view(3, H)
        b = torch.stack([bi[0] + bh[0], bi[1] + bh[1], bi[2], bh[2]]).unsqueeze(1)
        states = h0.view(1, 1, B, 1, H)
        dt = {torch.float32: "float32", torch.bfloat16: "bfloat16",
              torch.float16: "float16"}[x.dtype]
        y, last = flashrnn(wx, R, b, states=states, function="gru", backend="cuda_fused",
                           dtype=dt)
        y = y.reshape(B, T, H).transpose(0, 1)
        return y, last.reshape(1, B, H)


@dataclass
class Provider:
    name: str
    kind: str  # "baseline", "fusedgru", "compile", "flashrnn"
    build: Callable[[nn.GRU], nn.Module]
    note: str = ""
    # why it cannot run a case (None: it can)
    unsupported: Callable[[Case, torch.device], Optional[str]] = lambda case, dev: None


def _build_baseline(gru: nn.GRU) -> nn.Module:
    m = copy.deepcopy(gru)
    m.flatten_parameters()
    return m


def _fusedgru_provider(name: str) -> Provider:
    from . import backends
    from .modules import FusedGRU

    impl = backends.get_backend(name)

    def unsupported(case: Case, device: torch.device) -> Optional[str]:
        return impl.unsupported_reason(device.type, DTYPES[case.dtype])

    return Provider(name, "fusedgru", lambda gru: FusedGRU.from_torch(gru, backend=name),
                    note=backends.BACKENDS[name].summary, unsupported=unsupported)


def _flashrnn_reason(device: torch.device) -> Optional[str]:
    if device.type != "cuda":
        return "flashrnn runs on CUDA devices only"
    try:
        import flashrnn  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        return f"flashrnn is not installed ({type(exc).__name__})"
    return None


def discover_providers(device: torch.device, requested: Optional[Sequence[str]] = None,
                       quick: bool = False) -> Tuple[List[Provider], Dict[str, str]]:
    """(providers to time, {name: why it is left out}).  nn.GRU always comes first: every
    speed-up is against it.  Without ``requested``: every fusedgru backend that is a fast
    path on the device (not the Triton interpreter on the CPU, not the reference on a GPU),
    ref+compile (not with --quick: compiling takes longer than the quick grid) and flashrnn
    where installed."""
    from . import backends

    status = backends.backend_status()
    explicit = requested is not None
    wanted = list(requested) if explicit else None
    known = set(backends.BACKENDS) | {BASELINE, COMPILE, FLASHRNN}
    if explicit:
        unknown = [n for n in wanted if n not in known]
        if unknown:
            raise ValueError(f"--backends: unknown {unknown}; expected names from "
                             f"{sorted(known)}")
    providers = [Provider(BASELINE, "baseline", _build_baseline,
                          note="torch.nn.GRU" + (" (cuDNN)" if device.type == "cuda" else ""))]
    left_out: Dict[str, str] = {}
    for name in backends.BACKENDS:  # the table's order, never a hard-coded list
        if explicit and name not in wanted:
            continue
        why = status[name]
        if why is None and not explicit:
            if name == "triton" and device.type == "cpu":
                why = ("runs under the Triton interpreter on the CPU: a correctness tool, "
                       "not timed unless asked for (--backends triton)")
            elif name == "reference" and device.type == "cuda":
                why = "the reference is a correctness tool on a GPU (--backends reference)"
        if why is not None:
            left_out[name] = why
            continue
        providers.append(_fusedgru_provider(name))
    if (explicit and COMPILE in wanted) or (not explicit and not quick):
        providers.append(Provider(
            COMPILE, "compile", CompiledReferenceGRU,
            note="reference cell under torch.compile(dynamic=True)",
            unsupported=lambda case, dev: None))
    elif not explicit:
        left_out[COMPILE] = "left out of --quick (compiling takes ~30 s; --backends ref+compile)"
    if not explicit or FLASHRNN in wanted:
        why = _flashrnn_reason(device)
        if why is None:
            providers.append(Provider(
                FLASHRNN, "flashrnn", FlashRNNGRU, note="flashrnn cuda_fused GRU",
                unsupported=lambda case, dev: (
                    "1 layer, one direction only" if case.layers != 1 or case.bidirectional
                    else None)))
        else:
            left_out[FLASHRNN] = why
    return providers, left_out


# ----------------------------------------------------------------------------------------
# Inputs, the correctness check, timing and memory
# ----------------------------------------------------------------------------------------


@dataclass
class CellData:
    gru64: nn.GRU  # float64 oracle on the device; every provider copies its weights
    x: Tensor  # (T, B, I) float64
    h0: Tensor  # (L*D, B, H) float64
    gy: Tensor  # (T, B, D*H) float64: the gradient fed to the output
    ghn: Tensor  # (L*D, B, H) float64: the gradient fed to h_n


def make_cell_data(case: Case, device: torch.device, seed: int = 0) -> CellData:
    """Random weights (nn.GRU's initialisation) and inputs, never zeros or ones."""
    torch.manual_seed(seed)
    gru64 = nn.GRU(case.I, case.H, case.layers, bidirectional=case.bidirectional,
                   device=device, dtype=torch.float64)
    g = torch.Generator(device=device)
    g.manual_seed(seed + 1)
    LD = case.layers * case.D

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, device=device, dtype=torch.float64) * scale

    return CellData(gru64, rnd(case.T, case.B, case.I), rnd(LD, case.B, case.H, scale=0.5),
                    rnd(case.T, case.B, case.D * case.H), rnd(LD, case.B, case.H))


def _cast_gru(gru64: nn.GRU, dtype: torch.dtype) -> nn.GRU:
    m = copy.deepcopy(gru64).to(dtype)
    m.flatten_parameters()
    return m


def _run(module: nn.Module, x, h0, gy, ghn, train: bool) -> Dict[str, Tensor]:
    """Outputs (and gradients in training) of one call; keys are shared by providers."""
    module.train(train)
    if not train:
        with torch.no_grad():
            y, hn = module(x, h0)
        return {"y": y, "h_n": hn}
    x = x.detach().requires_grad_(True)
    h0 = h0.detach().requires_grad_(True)
    for p in module.parameters():
        p.grad = None
    y, hn = module(x, h0)
    torch.autograd.backward((y, hn), (gy, ghn))
    out = {"y": y.detach(), "h_n": hn.detach(), "dx": x.grad, "dh0": h0.grad}
    out.update({"d." + n: p.grad for n, p in module.named_parameters()})
    return out


def check_provider(provider: Provider, case: Case, data: CellData, steps: int):
    """SPEC section 5 at module level: the provider, built from the cell's weights cast to
    the case's dtype, against nn.GRU in float64 on the first ``steps`` steps of the cell's
    inputs; budget 2 * err(nn.GRU in the same dtype) + band.  Returns a LayerReport."""
    from .testing import LayerReport, budget, rel_err

    dtype = DTYPES[case.dtype]
    train = case.mode == "train"
    Tc = min(case.T, steps)
    x, gy = data.x[:Tc], data.gy[:Tc]
    # The oracle avoids cuDNN: ATen's own GRU in float64, code independent of the baseline.
    with torch.backends.cudnn.flags(enabled=False):
        oracle = _run(data.gru64, x, data.h0, gy, data.ghn, train)
    lo = [t.to(dtype) for t in (x, data.h0, gy, data.ghn)]
    try:
        baseline = _run(_cast_gru(data.gru64, dtype), *lo, train)
    except RuntimeError:
        if provider.kind == "baseline":
            raise
        # nn.GRU cannot run this dtype here: SPEC's other baseline, the reference
        from .modules import FusedGRU

        baseline = _run(FusedGRU.from_torch(_cast_gru(data.gru64, dtype), backend="reference"),
                        *lo, train)
    got = (baseline if provider.kind == "baseline"
           else _run(provider.build(_cast_gru(data.gru64, dtype)), *lo, train))
    report = LayerReport()
    for k, ref in oracle.items():
        if k not in got or got[k] is None:
            report.errors[k], report.budgets[k] = float("inf"), 0.0  # a gradient is missing
            continue
        report.errors[k] = rel_err(got[k], ref)
        report.budgets[k] = budget(dtype, rel_err(baseline[k], ref))
    return report


def _callable(module: nn.Module, case: Case, data: CellData) -> Callable[[], None]:
    """The timed call: inference under no_grad, or forward + backward into dx, dh0 and
    every weight (gradients reset to None each call, the same for every provider)."""
    dtype = DTYPES[case.dtype]
    x, h0, gy, ghn = (t.to(dtype) for t in (data.x, data.h0, data.gy, data.ghn))
    if case.mode == "inference":
        module.eval()

        def infer():
            with torch.no_grad():
                module(x, h0)

        return infer
    module.train()
    x.requires_grad_(True)
    h0.requires_grad_(True)
    leaves = [x, h0, *module.parameters()]

    def train():
        for t in leaves:
            t.grad = None
        y, hn = module(x, h0)
        torch.autograd.backward((y, hn), (gy, ghn))

    return train


@dataclass
class TimingOptions:
    quick: bool = False

    @property
    def cpu_min_run_time(self) -> float:
        return 0.1 if self.quick else 0.5

    @property
    def gpu_warmup_ms(self) -> int:
        return 10 if self.quick else 25

    @property
    def gpu_rep_ms(self) -> int:
        return 40 if self.quick else 100


def time_call(fn: Callable[[], None], device: torch.device, opts: TimingOptions):
    """(median ms, details).  No hand-written timing loop: do_bench on a GPU (median, its
    own warm-up and L2 flush), torch.utils.benchmark on the CPU (and as the GPU fallback,
    which synchronises the device around each block)."""
    import torch.utils.benchmark as tbench

    fn()  # first call: lazy initialisation, autotuning, compilation
    if device.type == "cuda":
        torch.cuda.synchronize()
        try:
            from triton.testing import do_bench
        except Exception:  # noqa: BLE001 - triton missing: torch.utils.benchmark instead
            do_bench = None
        if do_bench is not None:
            ms = do_bench(fn, warmup=opts.gpu_warmup_ms, rep=opts.gpu_rep_ms,
                          return_mode="median")
            return float(ms), {"method": "triton.testing.do_bench(median)",
                               "warmup_ms": opts.gpu_warmup_ms, "rep_ms": opts.gpu_rep_ms}
    else:
        fn()
    m = tbench.Timer(stmt="fn()", globals={"fn": fn},
                     num_threads=torch.get_num_threads()).blocked_autorange(
        min_run_time=opts.cpu_min_run_time if device.type == "cpu" else opts.gpu_rep_ms / 1e3)
    return m.median * 1e3, {"method": "torch.utils.benchmark.blocked_autorange(median)",
                            "runs": len(m.times), "iqr_ms": m.iqr * 1e3,
                            "threads": torch.get_num_threads()}


def peak_memory(fn: Callable[[], None], device: torch.device) -> Optional[int]:
    """Peak bytes allocated on the GPU during one call, beyond what was allocated before."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize()
    return int(torch.cuda.max_memory_allocated(device) - before)


def saved_activation_bytes(module: nn.Module, case: Case, data: CellData) -> int:
    """Bytes the autograd graph of one training forward keeps for the backward (storages
    counted once; parameters and the inputs x, h0 not counted).  Device-independent: on the
    CPU, where no allocator statistics exist, this is the training-memory comparison."""
    dtype = DTYPES[case.dtype]
    x = data.x.to(dtype).requires_grad_(True)
    h0 = data.h0.to(dtype).requires_grad_(True)
    module.train()
    skip = {t.untyped_storage().data_ptr() for t in [x, h0, *module.parameters()]}
    seen: Dict[int, int] = {}

    def pack(t: Tensor):
        try:
            s = t.untyped_storage()
        except Exception:  # noqa: BLE001 - e.g. a tensor subclass without storage
            return t
        if s.data_ptr() not in skip:
            seen[s.data_ptr()] = max(seen.get(s.data_ptr(), 0), s.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y, hn = module(x, h0)
    torch.autograd.backward((y, hn), (data.gy.to(dtype), data.ghn.to(dtype)))
    for p in module.parameters():
        p.grad = None
    return int(sum(seen.values()))


# ----------------------------------------------------------------------------------------
# One cell
# ----------------------------------------------------------------------------------------


@dataclass
class RunOptions:
    check_steps: int = 64
    timing: TimingOptions = field(default_factory=TimingOptions)
    tf32: Optional[bool] = False  # None: leave torch's settings as they are
    seed: int = 0


def _case_fields(case: Case) -> dict:
    return {k: v for k, v in asdict(case).items()}


def _blank_row(case: Case, p: Provider, tf32: Optional[bool], status: str = "ok",
               reason: Optional[str] = None) -> dict:
    return {**_case_fields(case), "provider": p.name, "kind": p.kind, "status": status,
            "reason": reason, "median_ms": None, "us_per_step": None,
            "speedup_vs_nn_gru": None, "peak_mem_bytes": None, "saved_bytes": None,
            "mem_vs_nn_gru": None, "check": None, "timing": None, "tf32": tf32}


def run_cell(case: Case, providers: Sequence[Provider], device: torch.device,
             opts: RunOptions, on_provider: Callable[[str], None] = lambda name: None
             ) -> List[dict]:
    """Checks, times and measures every provider on one cell; one row per provider."""
    data = make_cell_data(case, device, opts.seed)
    rows = []
    for p in providers:
        on_provider(p.name)
        row = _blank_row(case, p, opts.tf32 if device.type == "cuda" else None)
        rows.append(row)
        why = p.unsupported(case, device)
        if why is not None:
            row.update(status="skipped", reason=why)
            continue
        try:
            report = check_provider(p, case, data, opts.check_steps)
            row["check"] = {"ok": report.ok, "worst_ratio": report.worst,
                            "steps": min(case.T, opts.check_steps),
                            "errors": report.errors, "budgets": report.budgets}
            if not report.ok:
                row.update(status="WRONG", reason="; ".join(
                    f"{k}: {v}" for k, v in report.failures.items()))
                continue
            module = (p.build(_cast_gru(data.gru64, DTYPES[case.dtype])))
            fn = _callable(module, case, data)
            ms, timing = time_call(fn, device, opts.timing)
            row.update(median_ms=ms, us_per_step=ms * 1e3 / case.T, timing=timing)
            row["peak_mem_bytes"] = peak_memory(fn, device)
            if case.mode == "train":
                row["saved_bytes"] = saved_activation_bytes(module, case, data)
            del module, fn
        except Exception as exc:  # noqa: BLE001 - one failing provider must not stop a run
            row.update(status="error", reason=f"{type(exc).__name__}: {exc}"[:500])
        if device.type == "cuda":
            torch.cuda.empty_cache()
    _relative_to_baseline(rows)
    return rows


def _mem(row: dict) -> Optional[int]:
    return row["peak_mem_bytes"] if row["peak_mem_bytes"] is not None else row["saved_bytes"]


def _relative_to_baseline(rows: List[dict]) -> None:
    base = next((r for r in rows if r["provider"] == BASELINE and r["status"] == "ok"), None)
    if base is None:
        return
    for r in rows:
        if r["status"] != "ok":
            continue
        if r["median_ms"]:
            r["speedup_vs_nn_gru"] = base["median_ms"] / r["median_ms"]
        if _mem(r) is not None and _mem(base):
            r["mem_vs_nn_gru"] = _mem(r) / _mem(base)


# ----------------------------------------------------------------------------------------
# The machine, versions and commit
# ----------------------------------------------------------------------------------------


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _commit() -> Tuple[str, Optional[bool]]:
    """(commit, dirty) of the checkout fusedgru runs from; FUSEDGRU_COMMIT overrides it
    (a copy of the tree without .git, as on the device machine)."""
    if os.environ.get("FUSEDGRU_COMMIT"):
        return os.environ["FUSEDGRU_COMMIT"], None
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain",
                                "--untracked-files=no"], capture_output=True, text=True,
                               timeout=10).stdout.strip() != ""
        return sha, dirty
    except Exception:  # noqa: BLE001 - no git, not a checkout
        return "unknown", None


def _slug(s: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", s.lower()).strip("-")[:40]


def environment(device: torch.device) -> dict:
    from . import backends
    from .version import __version__

    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # noqa: BLE001
        triton_version = None
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        cap = "sm_%d%d" % torch.cuda.get_device_capability(device)
    else:
        name, cap = f"CPU {_cpu_name()} ({os.cpu_count()} cores)", None
    sha, dirty = _commit()
    now = _dt.datetime.now(_dt.timezone.utc)
    return {
        "device": device.type, "device_name": name, "capability": cap,
        "torch": torch.__version__, "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "triton": triton_version, "python": platform.python_version(),
        "fusedgru": __version__, "commit": sha, "dirty": dirty,
        "date": now.isoformat(timespec="seconds"),
        "threads": torch.get_num_threads(),
        "tf32": {"cudnn.allow_tf32": torch.backends.cudnn.allow_tf32,
                 "cuda.matmul.allow_tf32": ops.tf32_matmul_allowed()},
        "triton_interpret": os.environ.get("TRITON_INTERPRET"),
        "backends": backends.backend_status(),
        "suggested_name": f"{now:%Y-%m-%d}_{_slug(name)}_{sha[:7]}",
    }


# ----------------------------------------------------------------------------------------
# Output: table, JSON, plot, comparison
# ----------------------------------------------------------------------------------------


def _fmt(v, spec: str, none: str = "-") -> str:
    return none if v is None else format(v, spec)


def _mib(b) -> Optional[float]:
    return None if b is None else b / 2 ** 20


def format_table(rows: Sequence[dict], device_type: str = "cuda") -> str:
    mem_head = "peak MiB" if device_type == "cuda" else "saved MiB"
    head = (f"{'grid':6} {'mode':9} {'dtype':8} {'B':>4} {'H':>5} {'T':>5} {'LxD':>4} "
            f"{'provider':11} {'median ms':>10} {'us/step':>9} {'vs nn.GRU':>9} "
            f"{mem_head:>9} {'mem/nn':>6}  check")
    lines = [head, "-" * len(head)]
    for r in rows:
        if r["status"] == "skipped":
            continue
        if r["status"] == "ok":
            chk = f"ok {r['check']['worst_ratio']:.2f}" if r.get("check") else "ok"
        else:
            chk = f"{r['status']}: {r['reason']}"[:70]
        speed = _fmt(r["speedup_vs_nn_gru"], ".2f")
        lines.append(
            f"{r['grid']:6} {r['mode']:9} {r['dtype']:8} {r['B']:>4} {r['H']:>5} {r['T']:>5} "
            f"{str(r['layers']) + 'x' + ('2' if r['bidirectional'] else '1'):>4} "
            f"{r['provider']:11} {_fmt(r['median_ms'], '.3f'):>10} "
            f"{_fmt(r['us_per_step'], '.1f'):>9} {speed + ('x' if speed != '-' else ''):>9} "
            f"{_fmt(_mib(_mem(r)), '.1f'):>9} {_fmt(r['mem_vs_nn_gru'], '.2f'):>6}  {chk}")
    return "\n".join(lines)


def format_memory_table(rows: Sequence[dict]) -> str:
    """Training memory of each provider beside nn.GRU on the same cell."""
    train = [r for r in rows if r["mode"] == "train" and r["status"] == "ok"]
    if not train:
        return ""
    base = {tuple(r[k] for k in _KEY): r for r in train if r["provider"] == BASELINE}
    head = (f"{'grid':6} {'dtype':8} {'B':>4} {'H':>5} {'T':>5} {'provider':11} "
            f"{'peak MiB':>9} {'nn.GRU':>9} {'saved MiB':>9} {'nn.GRU':>9}")
    lines = ["training memory vs nn.GRU (peak: GPU allocator during one forward+backward; "
             "saved: activations kept for the backward)", head, "-" * len(head)]
    for r in train:
        if r["provider"] == BASELINE:
            continue
        b = base.get(tuple(r[k] for k in _KEY))
        lines.append(
            f"{r['grid']:6} {r['dtype']:8} {r['B']:>4} {r['H']:>5} {r['T']:>5} "
            f"{r['provider']:11} {_fmt(_mib(r['peak_mem_bytes']), '.1f'):>9} "
            f"{_fmt(_mib(b and b['peak_mem_bytes']), '.1f'):>9} "
            f"{_fmt(_mib(r['saved_bytes']), '.2f'):>9} "
            f"{_fmt(_mib(b and b['saved_bytes']), '.2f'):>9}")
    return "\n".join(lines)


_KEY = ("B", "H", "T", "I", "layers", "bidirectional", "dtype", "mode")


def _row_key(r: dict) -> tuple:
    return tuple(r[k] for k in _KEY) + (r["provider"],)


def format_comparison(old: dict, new: dict) -> str:
    """new vs old, cell by cell: change = old ms / new ms (above 1: faster now)."""
    om, nm = old.get("meta", {}), new.get("meta", {})
    lines = [f"compare: old {om.get('device_name')} {str(om.get('commit'))[:10]} "
             f"{om.get('date')}  ->  new {nm.get('device_name')} "
             f"{str(nm.get('commit'))[:10]} {nm.get('date')}"]
    if om.get("device_name") != nm.get("device_name"):
        lines.append("warning: different devices: the change mixes machines")
    old_rows = {_row_key(r): r for r in old.get("rows", []) if r.get("status") == "ok"}
    head = (f"{'case':44} {'provider':11} {'old ms':>9} {'new ms':>9} {'change':>8} "
            f"{'old vs nn':>9} {'new vs nn':>9}")
    lines += [head, "-" * len(head)]
    n = 0
    for r in new.get("rows", []):
        o = old_rows.get(_row_key(r))
        if o is None or r.get("status") != "ok":
            continue
        n += 1
        case = (f"{r['mode']} {r['dtype']} B={r['B']} H={r['H']} T={r['T']}"
                + (f" L={r['layers']}" if r["layers"] != 1 else "")
                + (" bi" if r["bidirectional"] else ""))
        lines.append(
            f"{case:44} {r['provider']:11} {o['median_ms']:9.3f} {r['median_ms']:9.3f} "
            f"{o['median_ms'] / r['median_ms']:7.2f}x "
            f"{_fmt(o.get('speedup_vs_nn_gru'), '.2f'):>9} "
            f"{_fmt(r.get('speedup_vs_nn_gru'), '.2f'):>9}")
    if n == 0:
        lines.append("(no cell in common)")
    return "\n".join(lines)


def write_plot(rows: Sequence[dict], meta: dict, path: Path) -> Optional[str]:
    """speed-up vs batch size, one line per (backend, hidden size), one panel per
    (grid, mode, dtype).  Returns why no plot was written, or None."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as exc:  # noqa: BLE001
        return f"matplotlib is not installed ({type(exc).__name__}): no PNG"
    ok = [r for r in rows if r["status"] == "ok" and r["provider"] != BASELINE
          and r["speedup_vs_nn_gru"] is not None]
    if not ok:
        return "nothing to plot (no provider besides nn.GRU was timed)"
    panels = sorted({(r["grid"], r["mode"], r["dtype"]) for r in ok})
    ncol = min(3, len(panels))
    nrow = math.ceil(len(panels) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(5.2 * ncol, 3.8 * nrow), squeeze=False)
    for ax, (grid, mode, dtype) in zip(axes.flat, panels):
        sel = [r for r in ok if (r["grid"], r["mode"], r["dtype"]) == (grid, mode, dtype)]
        for prov, H in sorted({(r["provider"], r["H"]) for r in sel}):
            # several T in one grid (cpu): the largest T is plotted, the table has the rest
            by_b: Dict[int, float] = {}
            for r in sorted(sel, key=lambda r: r["T"]):
                if (r["provider"], r["H"]) == (prov, H):
                    by_b[r["B"]] = r["speedup_vs_nn_gru"]
            pts = sorted(by_b.items())
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                    label=f"{prov} H={H}")
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_xscale("log", base=2)
        ys = [r["speedup_vs_nn_gru"] for r in sel]
        if max(ys) / min(ys) > 20:  # speed-ups over orders of magnitude
            ax.set_yscale("log")
        ax.set_xlabel("batch size B")
        ax.set_ylabel("speed-up vs nn.GRU")
        Ts = sorted({r["T"] for r in sel})
        ax.set_title(f"{grid} {mode} {dtype} T={Ts[-1]}", fontsize=9)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(f"fusedgru vs nn.GRU on {meta.get('device_name')} "
                 f"(torch {meta.get('torch')}, {str(meta.get('commit'))[:7]}, "
                 f"{str(meta.get('date'))[:10]})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str, allow_nan=True))
    tmp.replace(path)


# ----------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------


def _csv(s: str) -> List[str]:
    return [p.strip() for p in s.split(",") if p.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fusedgru bench",
        description="Time every available fusedgru backend against torch.nn.GRU on the "
                    "grids of SPEC section 6 (each provider is checked against float64 "
                    "first; a wrong one is reported, not timed).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="grids: " + "; ".join(f"{k}: {v.summary}" for k, v in GRIDS.items())
               + "; all: " + ",".join(ALL))
    p.add_argument("--grid", default=None,
                   help="comma-separated grid names or 'all' (default: cpu without a GPU, "
                        "stream with one)")
    p.add_argument("--quick", action="store_true", help="a subset (about a minute)")
    p.add_argument("--backends", default=None,
                   help="comma-separated providers to time besides nn.GRU: fusedgru backend "
                        "names, ref+compile, flashrnn (default: the fast paths available here)")
    p.add_argument("--dtype", default=None, help="only these dtypes (float32,bfloat16,...)")
    p.add_argument("--mode", default=None, help="only these modes (inference,train)")
    p.add_argument("--device", default=None, choices=["cpu", "cuda"],
                   help="default: cuda when a GPU is present")
    p.add_argument("--out", default="bench-out", help="folder for results.json and "
                   "speedup.png (default: ./bench-out)")
    p.add_argument("--compare", default=None, metavar="OLD.json",
                   help="print the change against a saved results.json")
    p.add_argument("--from", dest="from_file", default=None, metavar="RESULTS.json",
                   help="time nothing: print, plot and compare a saved run")
    p.add_argument("--check-steps", type=int, default=64,
                   help="steps of each cell checked against float64 (default 64)")
    p.add_argument("--tf32", choices=["off", "on", "torch-default"], default="off",
                   help="TF32 for cuDNN and matmuls during the run (default off: fp32 "
                        "cells compare exact fp32 with exact fp32)")
    p.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                   help="start no new cell after this many seconds (the rest are recorded "
                        "as skipped)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's own choice; on a loaded machine "
                        "--threads 1 avoids OpenMP oversubscription, which can slow small "
                        "cells a hundredfold)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--list", action="store_true",
                   help="print the cells and providers that would run, and exit")
    return p


def _progress(total: int, disable: bool):
    if disable:
        return None
    try:
        from tqdm import tqdm
    except Exception:  # noqa: BLE001
        print("(tqdm is not installed: no progress bar)", file=sys.stderr)
        return None
    return tqdm(total=total, unit="run", file=sys.stderr, dynamic_ncols=True, leave=False)


def _set_tf32(mode: str) -> Optional[bool]:
    if mode == "torch-default":
        return torch.backends.cudnn.allow_tf32 or ops.tf32_matmul_allowed()
    on = mode == "on"
    torch.backends.cudnn.allow_tf32 = on
    torch.backends.cuda.matmul.allow_tf32 = on
    return on


def _report(results: dict, out: Optional[Path], compare: Optional[str]) -> None:
    rows, meta = results["rows"], results["meta"]
    print(f"\nfusedgru bench on {meta['device_name']}: torch {meta['torch']}, CUDA "
          f"{meta['cuda']}, cuDNN {meta['cudnn']}, triton {meta['triton']}, commit "
          f"{str(meta['commit'])[:10]}{' (dirty)' if meta.get('dirty') else ''}, "
          f"{meta['date']}" + (f", TF32 {'on' if meta.get('tf32_run') else 'off'}"
                               if meta["device"] == "cuda" else
                               f", {meta['threads']} threads"))
    print("speed-up = nn.GRU median / provider median (above 1: fusedgru is faster); "
          "check = worst err/budget vs float64 (<= 1 passes)")
    print(format_table(rows, meta["device"]))
    mem = format_memory_table(rows)
    if mem:
        print("\n" + mem)
    skipped = [r for r in rows if r["status"] == "skipped"]
    if skipped:
        reasons = sorted({f"{r['provider']}: {r['reason']}" for r in skipped})
        print(f"\n{len(skipped)} skipped runs: " + "; ".join(reasons))
    for name, why in meta.get("left_out", {}).items():
        print(f"not timed: {name}: {why}")
    bad = [r for r in rows if r["status"] in ("WRONG", "error")]
    if bad:
        print(f"\n{len(bad)} provider runs were WRONG or failed (see 'check' column / "
              "results.json)")
    if out is not None:
        why = write_plot(rows, meta, out / "speedup.png")
        print(f"\nwrote {out / 'results.json'}" + (f" and {out / 'speedup.png'}" if why is None
                                                     else f" ({why})"))
        print(f"to keep it: benchmarks/results/{meta['suggested_name']}.json (.png)")
    if compare:
        print("\n" + format_comparison(json.loads(Path(compare).read_text()), results))


def main(argv: Optional[List[str]] = None) -> int:
    """`fusedgru bench ARGS` (fusedgru/cli.py passes sys.argv[2:]); returns the exit status."""
    threads = torch.get_num_threads()
    tf32 = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    try:
        return _main(argv)
    finally:  # a caller (a test, a notebook) gets its settings back
        torch.set_num_threads(threads)
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32


def _main(argv: Optional[List[str]]) -> int:
    if argv and argv[0] == "--":  # `fusedgru bench -- ARGS` through an argparse REMAINDER
        argv = argv[1:]
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    if args.from_file:
        results = json.loads(Path(args.from_file).read_text())
        out.mkdir(parents=True, exist_ok=True)
        _report(results, out, args.compare)
        return 0

    has_cuda = torch.cuda.is_available()
    device = torch.device(args.device or ("cuda" if has_cuda else "cpu"))
    if device.type == "cuda" and not has_cuda:
        print("fusedgru bench: --device cuda but no CUDA device is visible", file=sys.stderr)
        return 2

    grid_arg = args.grid or ("stream" if device.type == "cuda" else "cpu")
    grids = list(ALL) if grid_arg == "all" else _csv(grid_arg)
    unknown = [g for g in grids if g not in GRIDS]
    if unknown:
        print(f"fusedgru bench: unknown grid {unknown}; expected {list(GRIDS)} or all",
              file=sys.stderr)
        return 2
    dtypes = [DTYPE_ALIASES.get(d, d) for d in _csv(args.dtype)] if args.dtype else None
    modes = _csv(args.mode) if args.mode else None
    for d in dtypes or []:
        if d not in DTYPES:
            print(f"fusedgru bench: unknown dtype {d!r}", file=sys.stderr)
            return 2
    for m in modes or []:
        if m not in MODES:
            print(f"fusedgru bench: unknown mode {m!r}; expected {MODES}", file=sys.stderr)
            return 2
    cases = [c for g in grids for c in grid_cases(g, quick=args.quick, dtypes=dtypes,
                                                   modes=modes)]
    try:
        providers, left_out = discover_providers(
            device, _csv(args.backends) if args.backends else None, quick=args.quick)
    except ValueError as exc:
        print(f"fusedgru bench: {exc}", file=sys.stderr)
        return 2
    if args.list:
        print(f"device: {device}; {len(cases)} cells x {len(providers)} providers")
        for p in providers:
            print(f"  provider {p.name:11} {p.note}")
        for name, why in left_out.items():
            print(f"  not timed {name}: {why}")
        for c in cases:
            print("  " + c.label)
        return 0
    if not cases:
        print("fusedgru bench: no cell matches --grid/--dtype/--mode", file=sys.stderr)
        return 2

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    tf32 = _set_tf32(args.tf32) if device.type == "cuda" else None
    opts = RunOptions(check_steps=args.check_steps, timing=TimingOptions(quick=args.quick),
                      tf32=tf32)
    meta = environment(device)
    meta.update(argv=list(sys.argv[:1]) + list(argv if argv is not None else sys.argv[1:]),
                grids=grids, quick=args.quick, check_steps=args.check_steps, tf32_run=tf32,
                providers=[p.name for p in providers], left_out=left_out, schema=SCHEMA)
    out.mkdir(parents=True, exist_ok=True)
    results = {"schema": SCHEMA, "meta": meta, "rows": []}
    start = time.monotonic()
    bar = _progress(len(cases) * len(providers), args.no_progress)
    if args.time_budget is not None:
        # Under a time budget the --quick subset of every grid runs first, so that a run
        # cut short still covers each grid; rows are put back in grid order at the end.
        quick = set(c for g in grids for c in grid_cases(g, quick=True))
        order = sorted(range(len(cases)), key=lambda i: (cases[i] not in quick, i))
    else:
        order = list(range(len(cases)))
    per_case: Dict[int, List[dict]] = {}
    for i in order:
        case = cases[i]
        if args.time_budget is not None and time.monotonic() - start > args.time_budget:
            per_case[i] = [_blank_row(case, p, tf32, "skipped", "time budget")
                           for p in providers]
            if bar is not None:
                bar.update(len(providers))
            continue

        def on_provider(name: str, case=case) -> None:
            if bar is not None:
                bar.set_description(f"{case.label} {name}", refresh=False)
                bar.update(0)

        per_case[i] = run_cell(case, providers, device, opts, on_provider)
        results["rows"] = [r for j in sorted(per_case) for r in per_case[j]]
        if bar is not None:
            bar.update(len(providers))
        results["meta"]["elapsed_s"] = round(time.monotonic() - start, 1)
        _write_json(out / "results.json", results)  # a killed run keeps what it measured
    if bar is not None:
        bar.close()
    results["rows"] = [r for j in sorted(per_case) for r in per_case[j]]
    results["meta"]["elapsed_s"] = round(time.monotonic() - start, 1)
    _write_json(out / "results.json", results)
    _report(results, out, args.compare)
    return 0


if __name__ == "__main__":
    sys.exit(main())
