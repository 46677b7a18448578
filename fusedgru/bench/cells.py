"""One cell: its inputs, the check of a provider against float64, the timed call, and
run_cell, which checks, times and measures every provider on the cell, one row each.

Every provider of a cell runs on the SAME weights and inputs.  Before a provider is timed
it is checked against the float64 oracle (nn.GRU run in float64 on the same device, on the
first --check-steps steps of the same inputs): outputs, h_n and, in training mode, dx, dh0
and every weight gradient must fall within docs/SPEC.md section 5's budget,
2 * err(nn.GRU in the same dtype) + band.  A provider that fails is reported as "WRONG" and
not timed.  Inference runs under no_grad; training is forward + backward (dx, dh0 and every
weight gradient).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn

from .grids import DTYPES, Case
from .providers import CellLoop, Provider
from .results import _blank_row, _relative_to_baseline
from .timing import TimingOptions, peak_memory, saved_activation_bytes, spread, time_call


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
    out.update({"d." + CellLoop.GRU_NAMES.get(n, n): p.grad for n, p in module.named_parameters()})
    return out


def check_provider(provider: Provider, case: Case, data: CellData, steps: int):
    """SPEC section 5 at module level: the provider, built from the cell's weights cast to
    the case's dtype, against nn.GRU in float64 on the first ``steps`` steps of the cell's
    inputs; budget 2 * err(nn.GRU in the same dtype) + band.  Returns a LayerReport."""
    from ..testing import LayerReport, budget, rel_err

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
        from ..modules import FusedGRU

        baseline = _run(FusedGRU.from_torch(_cast_gru(data.gru64, dtype), backend="reference"),
                        *lo, train)
    got = (baseline if provider.kind == "baseline" and case.call == "seq"
           else _run(provider.module_for(case, _cast_gru(data.gru64, dtype)), *lo, train))
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
class RunOptions:
    check_steps: int = 64
    timing: TimingOptions = field(default_factory=TimingOptions)
    tf32: Optional[bool] = False  # None: leave torch's settings as they are
    seed: int = 0



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
            fn = _callable(module, case, data)
            ms, timing = time_call(fn, device, opts.timing)
            row.update(median_ms=ms, us_per_step=ms * 1e3 / case.T, timing=timing,
                       spread=spread(ms, timing.get("iqr_ms")))
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
