"""The `fusedgru` command (also `python -m fusedgru`).

    fusedgru info     versions, device, which backends are available and why not
    fusedgru check    every available backend against the float64 reference; non-zero exit
                      status on any failure
    fusedgru bench    every backend timed against torch.nn.GRU on the benchmark grids, and
                      compared with a saved run (fusedgru bench --help)
    fusedgru demo     the textbook character-level language model, trained with FusedGRU,
                      torch.nn.GRU and a from-scratch GRU side by side (fusedgru demo --help)
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import subprocess
import sys
from typing import List, Optional


def _versions() -> List[tuple]:
    import torch

    rows = [("fusedgru", _fusedgru_version()), ("python", platform.python_version()),
            ("torch", torch.__version__)]
    try:
        import triton

        rows.append(("triton", triton.__version__))
    except Exception as exc:  # noqa: BLE001
        rows.append(("triton", f"not importable ({type(exc).__name__})"))
    rows.append(("CUDA (torch build)", str(torch.version.cuda)))
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    rows.append(("cuDNN", str(cudnn)))
    if torch.cuda.is_available():
        rows.append(("device", f"{torch.cuda.get_device_name()} "
                               f"(sm_{''.join(map(str, torch.cuda.get_device_capability()))})"))
    else:
        rows.append(("device", f"cpu ({os.cpu_count()} cores), no CUDA device"))
    rows.append(("TRITON_INTERPRET", os.environ.get("TRITON_INTERPRET", "unset")))
    return rows


def _fusedgru_version() -> str:
    from .version import __version__

    return __version__


def cmd_info(args) -> int:
    import torch

    from . import backends

    for k, v in _versions():
        print(f"{k:20s} {v}")
    print("\nbackends:")
    for name, why in backends.backend_status().items():
        state = "available" if why is None else f"unavailable: {why}"
        print(f"  {name:10s} {state}")
        print(f"  {'':10s} {backends.BACKENDS[name].summary}")
    print("\nauto picks:")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for dev in devices:
        for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            try:
                pick = backends.resolve_backend("auto", torch.device(dev), dtype)
            except backends.BackendUnavailableError as exc:
                pick = f"none ({exc})"
            print(f"  {dev:5s} {str(dtype):15s} -> {pick}")
    return 0


# Sizes of `fusedgru check`: odd ones, I != H, h0 given and absent (SPEC section 5).
_CHECK_SHAPES = [  # (T, B, I, H, with_h0, bias)
    (7, 3, 5, 17, True, True),
    (2, 1, 4, 3, False, True),
    (5, 5, 11, 63, True, False),
]


def cmd_check(args) -> int:
    import torch

    from . import backends, testing

    device_types = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    names = args.backends or backends.available_backends()
    gen = torch.Generator().manual_seed(args.seed)
    rows, failed = [], 0
    for name in names:
        if backends.backend_status().get(name, "unknown backend") is not None:
            print(f"{name}: skipped ({backends.backend_status().get(name, 'unknown backend')})")
            continue
        impl = backends.get_backend(name)
        for dev in device_types:
            for dtype in (torch.float64, torch.float32, torch.bfloat16, torch.float16):
                if dev == "cpu" and dtype in (torch.float16, torch.bfloat16):
                    continue  # CPU half precision is not a fusedgru target
                if impl.unsupported_reason(dev, dtype) is not None:
                    continue
                for reset_after in (True, False):
                    worst, fails = 0.0, []
                    for T, B, I, H, with_h0, bias in _CHECK_SHAPES:
                        case = testing.make_layer_case(T, B, I, H, reset_after=reset_after,
                                                       with_h0=with_h0, bias=bias, generator=gen)
                        rep = testing.check_layer(name, case, device=dev, dtype=dtype)
                        worst = max(worst, rep.worst)
                        fails += [f"T{T}B{B}I{I}H{H}: {k} {v}" for k, v in rep.failures.items()]
                    failed += bool(fails)
                    rows.append((name, dev, str(dtype).replace("torch.", ""),
                                 f"reset_after={reset_after}", f"{worst:.3f}",
                                 "FAIL" if fails else "pass"))
                    for f in fails:
                        print(f"FAIL {name} {dev} {dtype} reset_after={reset_after}: {f}")
    header = ("backend", "device", "dtype", "formulation", "err/budget", "result")
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    for r in [header] + rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))
    print(f"\n{len(rows) - failed} passed, {failed} failed "
          "(forward and all gradients vs the float64 reference; budget = 2 x the "
          "reference's own error in that dtype + a band per dtype, docs/SPEC.md section 5)")
    return 1 if failed or not rows else 0


# Subcommands with their own argparse parser: everything after the name is theirs (argparse's
# REMAINDER would reject their leading options), so they are dispatched before parsing.
_DELEGATED = {"bench": ("fusedgru.bench", "benchmarks against torch.nn.GRU"),
              "demo": ("fusedgru.demo", "character-level language model demo")}


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in _DELEGATED:
        return importlib.import_module(_DELEGATED[argv[0]][0]).main(argv[1:])
    parser = argparse.ArgumentParser(prog="fusedgru", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, device and backends").set_defaults(func=cmd_info)
    p = sub.add_parser("check", help="every available backend against the float64 reference")
    from . import backends  # already imported with the package

    # choices: an unknown name is a usage error listing the valid ones (exit status 2)
    p.add_argument("--backends", nargs="+", metavar="NAME", choices=list(backends.BACKENDS),
                   help=f"only these backends (of {', '.join(backends.BACKENDS)})")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_check)
    for name, (_, text) in _DELEGATED.items():
        sub.add_parser(name, help=f"{text} (fusedgru {name} --help)")  # listed in --help only
    args = parser.parse_args(argv)
    if args.command == "check" and not os.environ.get("TRITON_INTERPRET"):
        import torch

        if not torch.cuda.is_available():
            # Without a GPU the Triton kernels can still be checked, on CPU tensors through
            # Triton's interpreter.  It must be on before triton is first imported (torch
            # has imported it by now), so the check runs in a fresh process.
            env = dict(os.environ, TRITON_INTERPRET="1")
            return subprocess.run([sys.executable, "-m", "fusedgru", *argv], env=env).returncode
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
