"""The command line: `fusedgru bench ARGS` (fusedgru/cli.py hands it its arguments) and
`python -m fusedgru.bench ARGS`."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

from .. import ops
from .cells import RunOptions, run_cell
from .compare import format_comparison
from .env import environment
from .grids import ALL, DTYPE_ALIASES, DTYPES, GRIDS, MODES, grid_cases
from .providers import discover_providers
from .report import (format_memory_table, format_noise_warning, format_peer_table, format_table,
                     write_plot)
from .results import SCHEMA, _blank_row, _write_json, load_results
from .sequences import PACKINGS
from .timing import NOISY_SPREAD, TimingOptions


def _csv(s: str) -> List[str]:
    return [p.strip() for p in s.split(",") if p.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fusedgru bench",
        description="Time every available fusedgru backend against torch.nn.GRU on the "
                    "grids of docs/SPEC.md section 6 (each provider is checked against float64 "
                    "first; a wrong one is reported, not timed).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="grids: " + "; ".join(f"{k}: {v.summary}" for k, v in GRIDS.items())
               + "; all: " + ",".join(ALL))
    p.add_argument("--grid", default=None,
                   help="comma-separated grid names or 'all' (default: cpu without a GPU, "
                        "stream with one; 'all' is SPEC's sequence grids, not calls, cells, "
                        "cell-loop, packed, rollout or tiny)")
    p.add_argument("--quick", action="store_true", help="a subset (about a minute)")
    p.add_argument("--rounds", type=int, default=3,
                   help="interleaved timing rounds per cell: each round times every provider "
                        "once, in turn, with 1/rounds of the time budget; the figure is the "
                        "median of the rounds' medians (default 3; 1: one timing each)")
    p.add_argument("--backends", default=None,
                   help="comma-separated providers to time besides nn.GRU: fusedgru backend "
                        "names, ref+compile, flashrnn, onnxruntime, torchrl (rollout cells: "
                        "torchrl-pad, torchrl-scan, torchrl-py, or torchrl for the three; "
                        "nn.GRUCell, nn.GRU-pack and nn.GRU-pad always come with rollout cells) "
                        "(default: the fast paths available here)")
    p.add_argument("--packing", default=None,
                   help="packed cells: sorted, unsorted or sorted,unsorted (default: "
                        "unsorted: pack_padded_sequence(enforce_sorted=False))")
    p.add_argument("--dtype", default=None, help="only these dtypes (float32,bfloat16,...)")
    p.add_argument("--mode", default=None,
                   help="only these modes (inference,train; train-frozen-input: training "
                        "with an input that needs no gradient, on the grids with train cells)")
    p.add_argument("--device", default=None, choices=["cpu", "cuda"],
                   help="default: cuda when a GPU is present")
    p.add_argument("--out", default="bench-out", help="folder for results.json and "
                   "speedup.png (default: ./bench-out)")
    p.add_argument("--compare", default=None, metavar="OLD.json",
                   help="print how much faster or slower each cell is than in a saved "
                        "results.json")
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
    if mode == "torch-default":  # what nn.GRU and both GPU backends follow (issue 18)
        return ops.rnn_tf32_allowed()
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
          f"spread = IQR / median of the repetitions (above {NOISY_SPREAD:.0%}: too noisy to "
          "trust); check = worst err/budget vs float64 (<= 1 passes)")
    print(format_table(rows, meta["device"]))
    if any(r.get("call") == "rollout" for r in rows):
        print("rollout cells: nn.GRU = its masked loop over steps (state *= 1 - reset); "
              "nn.GRUCell = the same loop through nn.GRUCell; nn.GRU-pack / nn.GRU-pad = the episodes as rows of one packed / padded "
              "nn.GRU call; torchrl-* = TorchRL's GRUModule (is_init = resets)")
    noisy = format_noise_warning(rows)
    if noisy:
        print(noisy)
    peers = format_peer_table(rows)
    if peers:
        print("\n" + peers)
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
        print("\n" + format_comparison(load_results(compare), results))


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
        results = load_results(args.from_file)
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
    packings = _csv(args.packing) if args.packing else None
    for pk in packings or []:
        if pk not in PACKINGS:
            print(f"fusedgru bench: unknown packing {pk!r}; expected {PACKINGS}",
                  file=sys.stderr)
            return 2
    cases = [c for g in grids for c in grid_cases(g, quick=args.quick, dtypes=dtypes,
                                                   modes=modes, packings=packings)]
    try:
        providers, left_out = discover_providers(
            device, _csv(args.backends) if args.backends else None, quick=args.quick,
            calls=sorted({c.call for c in cases}))
    except ValueError as exc:
        print(f"fusedgru bench: {exc}", file=sys.stderr)
        return 2
    if args.list:
        print(f"device: {device}; {len(cases)} cells x {len(providers)} providers")
        for p in providers:
            print(f"  provider {p.name:12} {p.note}")
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
    if args.rounds < 1:
        print(f"fusedgru bench: --rounds must be >= 1, got {args.rounds}", file=sys.stderr)
        return 2
    opts = RunOptions(check_steps=args.check_steps,
                      timing=TimingOptions(quick=args.quick, rounds=args.rounds), tf32=tf32)
    meta = environment(device)
    if any(c.call == "rollout" for c in cases):
        from .rollout import torchrl_version

        meta["torchrl"] = torchrl_version()
    meta.update(argv=list(sys.argv[:1]) + list(argv if argv is not None else sys.argv[1:]),
                grids=grids, quick=args.quick, check_steps=args.check_steps, tf32_run=tf32,
                timing_rounds=args.rounds,
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
