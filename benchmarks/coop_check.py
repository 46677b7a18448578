"""The first-minute check of benchmarks/gpu_run.sh, Triton's half (benchmarks/coop_check.cu
is the CUDA runtime's): a cooperative launch (launch_cooperative_grid, as kernels/gru.py's
persistent split kernels use it) of more programs than the GPU can hold at once must fail
with an error, not run.  The kernel has no barrier, so even a driver that runs it cannot
hang; gpu_run.sh runs this under `timeout` all the same.  Then a grid that fits (one
program per SM, as max_coresident_programs allows) must run.

    python benchmarks/coop_check.py        exit 0: refused, and the fitting grid ran
"""

import sys

import torch
import triton
import triton.language as tl


@triton.jit
def _count(out_ptr):
    tl.atomic_add(out_ptr, 1)


def main() -> int:
    if not torch.cuda.is_available():
        print("coop_check.py: needs a CUDA device")
        return 2
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    out = torch.zeros(1, dtype=torch.int32, device="cuda")
    too_many = 64 * sms  # 64 programs of 1024 threads per SM: 32 times what an SM holds
    refused = False
    try:
        _count[(too_many,)](out, num_warps=32, launch_cooperative_grid=True)
        torch.cuda.synchronize()
        print(f"coop_check.py: {too_many} programs of 32 warps on {sms} SMs: RAN "
              f"({int(out.item())} counted)")
    except Exception as exc:  # noqa: BLE001 - the error is what is checked
        refused = True
        print(f"coop_check.py: {too_many} programs of 32 warps on {sms} SMs refused: "
              f"{type(exc).__name__}: {exc}")
    out.zero_()
    _count[(sms,)](out, num_warps=4, launch_cooperative_grid=True)
    torch.cuda.synchronize()
    fit = int(out.item()) == sms
    print(f"coop_check.py: {sms} programs (one per SM): {int(out.item())} counted")
    ok = refused and fit
    print("coop_check.py: " + ("OK" if ok else "FAIL: " + (
        "an oversized cooperative grid was not refused" if not refused
        else "the fitting cooperative grid did not run")))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
