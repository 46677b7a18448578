"""The cuda backend's step variants, timed side by side in one process against nn.GRU.

Issue 18 part 2 keeps each rework of the persistent step behind a run-time switch,
``torch.ops.fusedgru._set_cuda_step_variant(mode)`` (csrc/gru_cuda.cu), so that one GPU run
can time the old and the new step together:

    0   the step before issue 18 part 2 (the default until this script has been run)
    1   the MMA's A operand staged in shared memory once per pass (where it fits)
    2   the persistent kernels' split-barrier step (B <= 64): the carried state in
        registers, the next step's operands loaded between the grid barrier's arrive and wait
    3   1 and 2 together
    4   the K split balanced over the warps (a different summation order)
    7   all three
    8   the batch tiles split over groups of blocks (B > 16: twice the blocks at H=1024 on an
        H200; the K split re-planned for a group's tiles, so at H >= 128 another summation
        order)
    15  all four
    16  the forward as ONE thread block cluster (sm_90: h_t exchanged through distributed
        shared memory, a cluster barrier per step; where the W slices fit in 16 blocks:
        bf16 H <= 576, TF32 H <= 384 at B = 16; elsewhere the grid kernels).  At H >= 128
        another K split, so another summation order
    20  16 and the balanced K split
    31  16 with all four (the backward takes 1, 2, 4, 8; the cluster forward 4)

The predictions these figures are to confirm or refute: benchmarks/NOTES-cuda-latency.md.
Cells: B=16 H=768 and B=64 H=1024 (the issue's targets) and B=16 H=512 (where the cluster
forward fits in bf16), bf16 and float32 (at nn.GRU's default precision: TF32 where cuDNN's
RNN may use it), inference (all shapes first) and training, T=256.
Per cell the variants and nn.GRU are timed in interleaved rounds (fusedgru.bench.time_call:
triton.testing.do_bench's median on a GPU); every variant's outputs (y, and in training
the gradients) are checked bitwise equal to variant 0's first (variants with bit 4 or 8,
which may sum in another order: their largest relative difference is recorded), and each row
records the plan the launch took (``_cuda_plan``: whether the variant applied or fell back).

    python benchmarks/step_variants.py [--out FILE.json] [--quick] [--time-budget S]
    python benchmarks/step_variants.py --dry-run     no GPU: the switch and the cells only
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from typing import Dict, List, Optional

import torch
from torch import nn

VARIANTS = (0, 1, 2, 3, 4, 7, 8, 15, 16, 20, 31)
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
T = 256


def cells(quick: bool):
    """Most telling first (the bf16 forward at B=16 H=768 is where gains are predicted;
    B=16 H=512 is where the cluster forward applies); inference before training."""
    shapes = ((16, 768), (16, 512), (64, 1024))
    modes = ("inference",) if quick else ("inference", "train")
    for mode, (B, H), dtype in itertools.product(modes, shapes, DTYPES):
        yield dict(B=B, H=H, T=T, I=H, dtype=dtype, mode=mode)


def _set_variant(mode: int) -> int:
    return torch.ops.fusedgru._set_cuda_step_variant(mode)


def _call(module: nn.Module, x, h0, gy, train: bool):
    """The timed call, and what it returns for the bitwise check."""
    params = list(module.parameters())

    def run():
        if not train:
            with torch.no_grad():
                return [module(x, h0)[0]]
        for p in params:
            p.grad = None
        x.grad = None
        y, _ = module(x, h0)
        y.backward(gy)
        return [y, x.grad] + [p.grad for p in params]
    return run


def run_cell(cell: dict, rounds: int, opts) -> List[dict]:
    from fusedgru import bench
    from fusedgru.modules import FusedGRU

    dtype = DTYPES[cell["dtype"]]
    B, H, I = cell["B"], cell["H"], cell["I"]
    train = cell["mode"] == "train"
    dev = torch.device("cuda")
    torch.manual_seed(0)
    base = nn.GRU(I, H).to(dev, dtype)
    fused = FusedGRU.from_torch(base, backend="cuda")
    x = torch.randn(T, B, I, device=dev, dtype=dtype, requires_grad=train)
    h0 = torch.randn(1, B, H, device=dev, dtype=dtype) * 0.5
    gy = torch.randn(T, B, H, device=dev, dtype=dtype)
    fns = {"nn.GRU": _call(base, x, h0, gy, train)}
    rows: Dict[str, dict] = {}
    prev = _set_variant(0)
    try:
        want = None
        for v in VARIANTS:
            name = f"variant {v}"
            _set_variant(v)
            row = dict(cell, provider=name, variant=v, status="ok")
            row["plan"] = {"forward": torch.ops.fusedgru._cuda_plan(
                x.detach(), base.weight_hh_l0.detach(), True, False)}
            if train:
                row["plan"]["backward"] = torch.ops.fusedgru._cuda_plan(
                    x.detach(), base.weight_hh_l0.detach(), True, True)
            fn = _call(fused, x, h0, gy, train)
            got = [t.detach().clone() for t in fn()]
            if want is None:
                want = got
            row["bitwise_equal_to_variant_0"] = all(torch.equal(a, b) for a, b in zip(want, got))
            row["max_rel_diff_vs_variant_0"] = max(
                float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30))
                for a, b in zip(got, want))
            if not row["bitwise_equal_to_variant_0"] and not v & 28:
                row["status"] = "error: outputs differ from variant 0's (bitwise)"
            rows[name] = row
            fns[name] = fn
        rows["nn.GRU"] = dict(cell, provider="nn.GRU", variant=None, status="ok")
        times: Dict[str, List[float]] = {k: [] for k in fns}
        for _ in range(rounds):  # interleaved: every provider once per round
            for name, fn in fns.items():
                if name != "nn.GRU":
                    _set_variant(rows[name]["variant"])
                ms, _ = bench.time_call(fn, dev, opts)
                times[name].append(ms)
    finally:
        _set_variant(prev)
    ref = statistics.median(times["nn.GRU"])
    v0 = statistics.median(times["variant 0"])
    out = []
    for name, row in rows.items():
        med = statistics.median(times[name])
        row.update(ms=med, us_per_step=med * 1e3 / T, rounds_ms=times[name],
                   spread=(max(times[name]) - min(times[name])) / med,
                   speedup_vs_nn_gru=ref / med, speedup_vs_variant_0=v0 / med)
        out.append(row)
    return out


def table(rows: List[dict]) -> str:
    names = [f"variant {v}" for v in VARIANTS] + ["nn.GRU"]
    lines = [f"{'dtype':5} {'mode':9} {'B':>3} {'H':>5} " + " ".join(f"{n:>22}" for n in names)]
    key = lambda r: (r["dtype"], r["mode"], r["B"], r["H"])  # noqa: E731
    for k, group in itertools.groupby(sorted(rows, key=key), key=key):
        by = {r["provider"]: r for r in group}
        cols = []
        for n in names:
            r = by.get(n)
            if r is None or r.get("ms") is None:
                cols.append(f"{'-':>22}")
            else:
                cols.append(f"{r['us_per_step']:7.2f}us {r['speedup_vs_nn_gru']:5.2f}x "
                            f"+-{100 * r['spread']:3.0f}%")
        lines.append(f"{k[0]:5} {k[1]:9} {k[2]:>3} {k[3]:>5} " + " ".join(cols))
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="write the rows as JSON here")
    ap.add_argument("--quick", action="store_true", help="inference only, 2 rounds")
    ap.add_argument("--time-budget", type=float, default=0,
                    help="seconds; no new cell starts after it (0: no limit)")
    ap.add_argument("--dry-run", action="store_true",
                    help="no GPU: check the switch and list the cells")
    args = ap.parse_args(argv)
    import fusedgru.extension as ext
    from fusedgru import bench

    ext._load()
    todo = list(cells(args.quick))
    if args.dry_run or not torch.cuda.is_available():
        prev = _set_variant(0)
        seen = [_set_variant(v) for v in VARIANTS[1:] + (prev,)]
        assert seen == list(VARIANTS), seen
        for bad in (-1, 32):
            try:
                _set_variant(bad)
            except RuntimeError:
                continue
            raise AssertionError(f"_set_cuda_step_variant accepted {bad}")
        print(f"dry run (no GPU): the switch takes {VARIANTS}; {len(todo)} cells:")
        for c in todo:
            print("  ", c)
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"dry_run": True, "cells": todo, "rows": []}, f, indent=1)
        return 0
    opts = bench.TimingOptions(quick=True)
    rounds = 2 if args.quick else 3
    start, rows = time.monotonic(), []
    for c in todo:
        if args.time_budget and time.monotonic() - start > args.time_budget:
            rows.append(dict(c, provider=None, status="skipped: time budget"))
            continue
        try:
            rows += run_cell(c, rounds, opts)
        except Exception as exc:  # noqa: BLE001 - recorded per cell, the run goes on
            rows.append(dict(c, provider=None, status=f"error: {type(exc).__name__}: {exc}"[:400]))
        print(table([r for r in rows if r.get("ms") is not None]), flush=True)
    bad = [r for r in rows if r["status"] != "ok"]
    for r in bad:
        print("NOT OK:", {k: r.get(k) for k in ("dtype", "mode", "B", "H", "provider", "status")})
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"T": T, "rows": rows}, f, indent=1, default=str)
    return 1 if any(r["status"].startswith("error") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
