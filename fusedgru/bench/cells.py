"""One cell: its inputs, the check of a provider against float64, the timed call, and
run_cell, which checks, times and measures every provider on the cell, one row each.

Every provider of a cell runs on the SAME weights and inputs.  Before a provider is timed
it is checked against the float64 oracle (nn.GRU run in float64 on the same device, on the
first --check-steps steps of the same inputs): outputs, h_n and, in training mode, dx, dh0
and every weight gradient must fall within docs/SPEC.md section 5's budget,
2 * err(nn.GRU in the same dtype) + band.  A provider that fails is reported as "WRONG" and
not timed.  Inference runs under no_grad; training is forward + backward (dx, dh0 and every
weight gradient).

Packed cells: x is packed (outside the timed call, as a data loader does) and every
provider gets the same PackedSequence; y, dx and gy are its data, in packed order; the
oracle is nn.GRU in float64 on the same packing (the check's first --check-steps steps:
lengths clipped there).  Rollout cells: every provider is called m(x, hx, resets=resets)
(batch-first tensors for providers whose layout is "batch", turned back before the
comparison); the oracle is nn.GRU's masked loop in float64 (rollout.MaskedLoopGRU) and
the budget's baseline that loop in the cell's dtype.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn

from . import sequences
from .grids import DTYPES, Case, input_needs_grad, is_train
from .providers import CellLoop, Provider
from .results import _blank_row, _relative_to_baseline
from .timing import TimingOptions, peak_memory, saved_activation_bytes, spread, time_rounds


@dataclass
class CellData:
    gru64: nn.GRU  # float64 oracle on the device; every provider copies its weights
    x: Tensor  # (T, B, I) float64
    h0: Tensor  # (L*D, B, H) float64
    gy: Tensor  # (T, B, D*H) float64: the gradient fed to the output
    ghn: Tensor  # (L*D, B, H) float64: the gradient fed to h_n
    lengths: Optional[Tensor] = None  # packed cells: (B,) int64 on the CPU, in row order
    resets: Optional[Tensor] = None  # rollout cells: (T, B) bool
    seq: Optional[dict] = None  # what results.json records of the sequence structure


def make_cell_data(case: Case, device: torch.device, seed: int = 0) -> CellData:
    """Random weights (nn.GRU's initialisation) and inputs, never zeros or ones; the
    lengths or resets of packed and rollout cells (fixed: sequences.SEQ_SEED)."""
    torch.manual_seed(seed)
    gru64 = nn.GRU(case.I, case.H, case.layers, bidirectional=case.bidirectional,
                   device=device, dtype=torch.float64)
    g = torch.Generator(device=device)
    g.manual_seed(seed + 1)
    LD = case.layers * case.D

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, device=device, dtype=torch.float64) * scale

    data = CellData(gru64, rnd(case.T, case.B, case.I), rnd(LD, case.B, case.H, scale=0.5),
                    rnd(case.T, case.B, case.D * case.H), rnd(LD, case.B, case.H))
    if case.call == "packed":
        lengths = sequences.draw_lengths(case.lengths, case.B, case.T,
                                         sort=case.packing == "sorted")
        data.lengths = torch.tensor(lengths, dtype=torch.int64)
        data.seq = sequences.describe(lengths=lengths)
    elif case.call == "rollout":
        data.resets = sequences.draw_resets(case.lengths, case.T, case.B).to(device)
        data.seq = sequences.describe(resets=data.resets.cpu())
    return data


@dataclass
class CallIO:
    """One call's inputs and output gradients in a dtype, as a provider takes them."""

    args: tuple  # (input, h0): input a tensor or a PackedSequence
    kwargs: dict  # rollout cells: {"resets": ...}
    x: Tensor  # the tensor dx is taken of (packed cells: the PackedSequence's data)
    h0: Tensor
    gy: Tensor  # fed to the output tensor (packed cells: the output's data)
    ghn: Tensor
    batch_first: bool = False  # rollout cells of a "batch" layout provider
    x_grad: bool = True  # training: whether x takes a gradient (mode "train-frozen-input")

    def call(self, module: nn.Module):
        """(y, h_n) of module on these inputs; y is a tensor (packed: the data)."""
        y, hn = module(*self.args, **self.kwargs)
        return (y.data if isinstance(y, nn.utils.rnn.PackedSequence) else y), hn

    def time_major(self, t: Tensor) -> Tensor:
        """y or dx as the time-major cells compare them."""
        return t.transpose(0, 1) if self.batch_first else t


def make_io(case: Case, data: CellData, dtype: torch.dtype, *, steps: Optional[int] = None,
            grad: bool = False, layout: str = "time") -> CallIO:
    """The cell's inputs cast to dtype (fresh tensors: the cell's data is never touched),
    over its first ``steps`` steps (None: all); ``grad``: h0 requires grad, and x unless the
    mode freezes the input."""
    Tc = case.T if steps is None else min(case.T, steps)
    x, gy = data.x[:Tc].detach().to(dtype), data.gy[:Tc].detach().to(dtype)
    h0, ghn = data.h0.detach().to(dtype), data.ghn.detach().to(dtype)
    kwargs: dict = {}
    batch_first = False
    packed = None
    if case.call == "packed":
        lengths = data.lengths.clamp(max=Tc)
        sorted_ = case.packing == "sorted"
        packed = sequences.pack(x, lengths, sorted_)
        x = packed.data.detach().clone()
        gy = sequences.pack(gy, lengths, sorted_).data.detach().clone()
    elif case.call == "rollout":
        resets = data.resets[:Tc]
        if layout == "batch":
            batch_first = True
            x, gy = x.transpose(0, 1).contiguous(), gy.transpose(0, 1).contiguous()
            resets = resets.t().contiguous()
        kwargs["resets"] = resets
    x, h0 = x.clone(), h0.clone()  # never the cell's own tensors (.to(float64) is a no-op)
    x_grad = input_needs_grad(case.mode)
    if grad:
        x.requires_grad_(x_grad)
        h0.requires_grad_(True)
    inp = sequences.with_data(packed, x) if packed is not None else x
    return CallIO((inp, h0), kwargs, x, h0, gy, ghn, batch_first, x_grad)


def _grad_name(name: str) -> str:
    """A module's parameter name as nn.GRU's ("cell.weight_ih" -> "weight_ih_l0",
    "module.gru.weight_hh_l0" -> "weight_hh_l0")."""
    return CellLoop.GRU_NAMES.get(name, name.rsplit(".", 1)[-1])


def _cast_gru(gru64: nn.GRU, dtype: torch.dtype) -> nn.GRU:
    m = copy.deepcopy(gru64).to(dtype)
    m.flatten_parameters()
    return m


def _run(module: nn.Module, io: CallIO, train: bool) -> Dict[str, Tensor]:
    """Outputs (and gradients in training) of one call; keys are shared by providers,
    tensors time-major."""
    module.train(train)
    if not train:
        with torch.no_grad():
            y, hn = io.call(module)
        return {"y": io.time_major(y), "h_n": hn}
    io.x.requires_grad_(io.x_grad)
    io.h0.requires_grad_(True)
    io.x.grad = io.h0.grad = None
    for p in module.parameters():
        p.grad = None
    y, hn = io.call(module)
    torch.autograd.backward((y, hn), (io.gy, io.ghn))
    out = {"y": io.time_major(y.detach()), "h_n": hn.detach()}
    if io.x_grad:  # a frozen input has no dx to compare
        out["dx"] = None if io.x.grad is None else io.time_major(io.x.grad)
    out["dh0"] = io.h0.grad
    out.update({"d." + _grad_name(n): p.grad for n, p in module.named_parameters()})
    return out


def _baseline_module(case: Case, gru: nn.GRU) -> nn.Module:
    """What the budget's baseline (and, in float64, the oracle) runs: nn.GRU itself, or
    for rollout cells nn.GRU's masked loop."""
    if case.call == "rollout":
        from .rollout import MaskedLoopGRU

        return MaskedLoopGRU.from_gru(gru)
    return gru


def check_provider(provider: Provider, case: Case, data: CellData, steps: int):
    """SPEC section 5 at module level: the provider, built from the cell's weights cast to
    the case's dtype, against nn.GRU in float64 on the first ``steps`` steps of the cell's
    inputs; budget 2 * err(nn.GRU in the same dtype) + band.  Returns a LayerReport."""
    from ..testing import LayerReport, budget, rel_err

    dtype = DTYPES[case.dtype]
    train = is_train(case.mode)

    def io(dt, layout="time"):
        return make_io(case, data, dt, steps=steps, layout=layout)

    # The oracle avoids cuDNN: ATen's own GRU in float64, code independent of the baseline.
    with torch.backends.cudnn.flags(enabled=False):
        oracle = _run(_baseline_module(case, _cast_gru(data.gru64, torch.float64)),
                      io(torch.float64), train)
    try:
        baseline = _run(_baseline_module(case, _cast_gru(data.gru64, dtype)), io(dtype), train)
    except RuntimeError:
        if provider.kind == "baseline":
            raise
        # nn.GRU cannot run this dtype here: SPEC's other baseline, the reference
        from ..modules import FusedGRU

        baseline = _run(FusedGRU.from_torch(_cast_gru(data.gru64, dtype), backend="reference"),
                        io(dtype), train)
    got = (baseline if provider.kind == "baseline" and case.call != "cell"
           else _run(provider.module_for(case, _cast_gru(data.gru64, dtype)),
                     io(dtype, provider.layout), train))
    report = LayerReport()
    for k, ref in oracle.items():
        if k not in got or got[k] is None:
            report.errors[k], report.budgets[k] = float("inf"), 0.0  # a gradient is missing
            continue
        report.errors[k] = rel_err(got[k], ref)
        report.budgets[k] = budget(dtype, rel_err(baseline[k], ref))
    return report


def _callable(module: nn.Module, case: Case, data: CellData,
              layout: str = "time") -> Callable[[], None]:
    """The timed call: inference under no_grad, or forward + backward into dx, dh0 and
    every weight (gradients reset to None each call, the same for every provider)."""
    dtype = DTYPES[case.dtype]
    if case.mode == "inference":
        io = make_io(case, data, dtype, layout=layout)
        module.eval()

        def infer():
            with torch.no_grad():
                module(*io.args, **io.kwargs)

        return infer
    io = make_io(case, data, dtype, grad=True, layout=layout)
    module.train()
    leaves = [io.x, io.h0, *module.parameters()]

    def train():
        for t in leaves:
            t.grad = None
        y, hn = io.call(module)
        torch.autograd.backward((y, hn), (io.gy, io.ghn))

    return train


@dataclass
class RunOptions:
    check_steps: int = 64
    timing: TimingOptions = field(default_factory=TimingOptions)
    tf32: Optional[bool] = False  # None: leave torch's settings as they are
    seed: int = 0



def run_cell(case: Case, providers: Sequence[Provider], device: torch.device,
             opts: RunOptions, on_provider: Callable[[str], None] = lambda name: None
             ) -> List[dict]:
    """Checks every provider on one cell, then times those that passed in interleaved
    rounds (opts.timing.rounds; fusedgru.bench.timing.time_rounds), then measures their
    memory; one row per provider."""
    data = make_cell_data(case, device, opts.seed)
    rows = []
    timed = []  # (row, provider, module, fn) of the providers that passed their check

    def fail(row, exc):
        row.update(status="error", reason=f"{type(exc).__name__}: {exc}"[:500])

    for p in providers:
        on_provider(p.name)
        row = _blank_row(case, p, opts.tf32 if device.type == "cuda" else None)
        row["seq"] = data.seq
        rows.append(row)
        why = p.why_not(case, device)
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
            module = p.module_for(case, _cast_gru(data.gru64, DTYPES[case.dtype]))
            timed.append((row, p, module, _callable(module, case, data, p.layout)))
        except Exception as exc:  # noqa: BLE001 - one failing provider must not stop a run
            fail(row, exc)
    results = time_rounds([fn for _, _, _, fn in timed], device, opts.timing,
                          on_error=lambda i, exc: fail(timed[i][0], exc))
    for (row, p, module, fn), res in zip(timed, results):
        if res is None:
            continue
        ms, timing = res
        row.update(median_ms=ms, us_per_step=ms * 1e3 / case.T, timing=timing,
                   spread=spread(ms, timing.get("iqr_ms")))
        try:
            row["peak_mem_bytes"] = peak_memory(fn, device)
            if is_train(case.mode):
                row["saved_bytes"] = saved_activation_bytes(module, case, data, p.layout)
        except Exception as exc:  # noqa: BLE001
            fail(row, exc)
    del timed
    if device.type == "cuda":
        torch.cuda.empty_cache()
    _relative_to_baseline(rows)
    return rows
