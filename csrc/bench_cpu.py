"""CPU grid of SPEC section 6: FusedGRU(backend="cpu") against torch.nn.GRU on the CPU, in
the same process, with torch.utils.benchmark (medians).  Results: benchmarks/NOTES-cpu-cuda.md.

    python csrc/bench_cpu.py [--repeat N]
"""

import argparse
import itertools
import math
import os
import subprocess

import torch
import torch.utils.benchmark as tb

from fusedgru import FusedGRU


def cell(B, H, T, mode, min_run_time):
    torch.manual_seed(0)
    ref = torch.nn.GRU(H, H)
    fused = FusedGRU(H, H, backend="cpu")
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(T, B, H)
    if mode == "inference":
        stmt = "with torch.no_grad(): m(x)"
    else:
        stmt = "m(x)[0].sum().backward()"
    out = {}
    for name, m in (("nn.GRU", ref), ("fusedgru", fused)):
        t = tb.Timer(stmt, globals={"m": m, "x": x, "torch": torch})
        out[name] = t.blocked_autorange(min_run_time=min_run_time).median
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--min-run-time", type=float, default=0.5)
    a = p.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=os.path.dirname(__file__)).stdout.strip()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"capability {torch.backends.cpu.get_cpu_capability()}, commit {commit}")
    print("| mode | B | H | T | nn.GRU ms | fusedgru ms | us/step | speed-up |")
    print("|---|---|---|---|---|---|---|---|")
    ratios = {"inference": [], "train": []}
    for mode, B, H, T in itertools.product(("inference", "train"), (1, 32), (64, 256), (35, 128)):
        r = cell(B, H, T, mode, a.min_run_time)
        s = r["nn.GRU"] / r["fusedgru"]
        ratios[mode].append(s)
        print(f"| {mode} | {B} | {H} | {T} | {r['nn.GRU']*1e3:.3f} | {r['fusedgru']*1e3:.3f} "
              f"| {r['fusedgru']*1e6/T:.1f} | {s:.2f}x |", flush=True)
    for mode, rs in ratios.items():
        g = math.exp(sum(map(math.log, rs)) / len(rs))
        print(f"{mode}: geomean {g:.2f}x, min {min(rs):.2f}x")


if __name__ == "__main__":
    main()
