"""Which large-H strategy the Triton backend should use: measured, against nn.GRU.

Above the resident limit (kernels/gru.py, RESIDENT_MAX) the Triton kernels split H across
programs and need every program to finish a unit of work (a step, or half of one) before
any starts the next.  Issue 3 asks to choose by measurement between

    triton-step          a launch per unit, stream order as the barrier (the default today)
    triton-step+graph    the same launches captured once in a CUDA graph and replayed
                         (the best case for a graph: the capture is not timed; a user gets
                         it through torch.compile(mode="reduce-overhead") or
                         torch.cuda.make_graphed_callables)
    triton-persistent    one launch for all steps after the first, a grid barrier in the
                         kernel (atomic counter); only where the grid fits one program/SM

with nn.GRU (cuDNN), and nn.GRU replayed from a CUDA graph, timed in the same run.

    python benchmarks/large_h.py [--out FILE.json] [--time-budget S] [--quick] [--tf32 on]

Timing is fusedgru.bench.time_call (triton.testing.do_bench, median).  Each cell also
records the largest relative difference of y from nn.GRU's in the same dtype (a sanity
figure; the budgeted correctness checks are tests/test_triton_gpu.py).  Needs a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import sys
import time
from typing import Callable, List, Optional

import torch
from torch import nn

from fusedgru import bench
from fusedgru.modules import FusedGRU

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
PROVIDERS = ["nn.GRU", "nn.GRU+graph", "triton-step", "triton-step+graph",
             "triton-persistent"]


def _grid(quick: bool):
    # Most telling cells first (the targets are B <= 16, H <= 512): a time budget
    # that cuts the run short cuts the least telling ones.
    Bs = (16, 1, 64) if not quick else (16,)
    Hs = (512, 1024, 256) if not quick else (512,)
    for B, H, dtype, mode in itertools.product(Bs, Hs, DTYPES, ("inference", "train")):
        yield dict(dtype=dtype, B=B, H=H, T=256, I=256, mode=mode)


def _module(name: str, gru: nn.GRU) -> nn.Module:
    if name.startswith("nn.GRU"):
        return gru
    return FusedGRU.from_torch(gru, backend="triton")


def _train_step(call: Callable, module: nn.Module, x, h0, gy) -> Callable[[], torch.Tensor]:
    """forward through ``call`` (the module or its graphed twin) + backward, gradients
    reset to None each time."""
    leaves = [x, *module.parameters()]

    def step():
        for t in leaves:
            t.grad = None
        y, _ = call(x, h0)
        y.backward(gy)
        return y
    return step


def _plain_call(module: nn.Module, x, h0, gy, train: bool) -> Callable[[], torch.Tensor]:
    if train:
        return _train_step(module, module, x, h0, gy)

    def infer():
        with torch.no_grad():
            return module(x, h0)[0]
    return infer


def _graphed_call(module: nn.Module, x, h0, gy, train: bool) -> Callable[[], torch.Tensor]:
    """The same call, captured once in a CUDA graph (capture not timed)."""
    if not train:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.no_grad():
            for _ in range(2):  # warm-up outside the capture (compiles, allocator)
                module(x, h0)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), torch.no_grad():
            out = module(x, h0)[0]

        def replay():
            graph.replay()
            return out
        return replay
    return _train_step(torch.cuda.make_graphed_callables(module, (x, h0)), module, x, h0, gy)


def run_cell(cell: dict, opts: bench.TimingOptions) -> List[dict]:
    from fusedgru.kernels import gru as kgru

    dtype = DTYPES[cell["dtype"]]
    B, H, T, I = cell["B"], cell["H"], cell["T"], cell["I"]
    train = cell["mode"] == "train"
    torch.manual_seed(0)
    base = nn.GRU(I, H).to("cuda", dtype)
    x = torch.randn(T, B, I, device="cuda", dtype=dtype, requires_grad=train)
    h0 = torch.randn(1, B, H, device="cuda", dtype=dtype) * 0.5
    gy = torch.randn(T, B, H, device="cuda", dtype=dtype)
    rows, y_base = [], None
    for name in PROVIDERS:
        row = dict(cell, provider=name, ms=None, status="ok")
        cfg = None
        if name.startswith("triton"):
            strategy = "persistent" if name.startswith("triton-persistent") else "step"
            try:
                cfg = kgru.strategy_config(strategy, B, H, dtype, torch.device("cuda"))
            except ValueError as exc:  # resident H, or a grid that is not co-resident
                rows.append(dict(row, status=f"n/a: {exc}"))
                continue
            row["config"] = dict(strategy=cfg.strategy, block_b=cfg.block_b,
                                 block_h=cfg.block_h, programs=cfg.programs(B, H))
        try:
            with kgru.force_config(cfg) if cfg is not None else contextlib.nullcontext():
                module = _module(name, base)
                make = _graphed_call if name.endswith("+graph") else _plain_call
                fn = make(module, x, h0, gy, train)
                y = fn().detach().float().clone()
                ms, how = bench.time_call(fn, torch.device("cuda"), opts)
        except Exception as exc:  # noqa: BLE001 - recorded per provider, the run goes on
            rows.append(dict(row, status=f"error: {type(exc).__name__}: {exc}"[:400]))
            continue
        if y_base is None:
            y_base = y
        row.update(ms=ms, us_per_step=ms * 1e3 / T, timing=how["method"],
                   max_rel_diff_vs_nn_gru=float((y - y_base).abs().max()
                                                / y_base.abs().max().clamp_min(1e-30)))
        rows.append(row)
    ref = next((r["ms"] for r in rows if r["provider"] == "nn.GRU" and r["ms"]), None)
    for r in rows:
        r["speedup_vs_nn_gru"] = (ref / r["ms"]) if (ref and r["ms"]) else None
    return rows


def _table(rows: List[dict]) -> str:
    lines = [f"{'dtype':5} {'mode':9} {'B':>3} {'H':>5} " + " ".join(f"{p:>18}" for p in PROVIDERS)]
    key = lambda r: (r["dtype"], r["mode"], r["B"], r["H"])  # noqa: E731
    for k, group in itertools.groupby(sorted(rows, key=key), key=key):
        by = {r["provider"]: r for r in group}
        cells = []
        for p in PROVIDERS:
            r = by.get(p)
            if r is None or r["ms"] is None:
                cells.append(f"{'-':>18}")
            else:
                cells.append(f"{r['us_per_step']:8.1f}us {r['speedup_vs_nn_gru']:6.2f}x")
        lines.append(f"{k[0]:5} {k[1]:9} {k[2]:>3} {k[3]:>5} " + " ".join(cells))
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="write the rows and the environment as JSON here")
    ap.add_argument("--time-budget", type=float, default=0,
                    help="seconds; start no new cell after this (0: no limit)")
    ap.add_argument("--quick", action="store_true", help="one cell per dtype and mode")
    ap.add_argument("--tf32", choices=["off", "on"], default="off",
                    help="float32 matmuls in TF32, for cuDNN and fusedgru alike (SPEC: "
                         "compare like with like; default off, as fusedgru bench)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("large_h: needs a CUDA device", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    tf32 = bench._set_tf32(args.tf32)
    opts = bench.TimingOptions(quick=True)
    t0, rows, skipped = time.monotonic(), [], 0
    cells = list(_grid(args.quick))
    for cell in cells:
        if args.time_budget and time.monotonic() - t0 > args.time_budget:
            skipped += 1
            continue
        got = run_cell(cell, opts)
        rows.extend(got)
        print(_table(got).splitlines()[-1], flush=True)
    print(_table(rows))
    if args.out:
        meta = bench.environment(device)
        meta.update(tf32_run=tf32, cells=len(cells), cells_skipped_for_time=skipped,
                    seconds=round(time.monotonic() - t0, 1))
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "providers": PROVIDERS, "rows": rows}, f, indent=1)
    bad = [r for r in rows if r["status"].startswith("error")]
    for r in bad:
        print(f"ERROR {r['provider']} {r['dtype']} {r['mode']} B={r['B']} H={r['H']}: "
              f"{r['status']}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
