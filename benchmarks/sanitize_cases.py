"""Small cases for compute-sanitizer (memcheck, racecheck): every GPU backend, forward and
backward, and its inference entry (the no-grad forward without ws) where it has one, both
formulations, odd tiny sizes.  benchmarks/gpu_run.sh runs it as

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck \\
        python benchmarks/sanitize_cases.py

(without the caching allocator each tensor is its own allocation, so an out-of-bounds
access is caught at its tensor's edge instead of landing inside a cached block).

Every run is also checked against the float64 reference with SPEC section 5's budget, so a
kernel that reads uninitialised or neighbouring memory without crashing still fails here.
Exit status: 0 when every case ran and passed, 1 otherwise.

    python benchmarks/sanitize_cases.py --list          the cases, running nothing
    python benchmarks/sanitize_cases.py --device cpu    the same driver on CPU backends
                                                        (a dry run of the GPU script)
    python benchmarks/sanitize_cases.py --first-contact two small cases per backend: what
                                                        gpu_run.sh runs under the sanitizer
"""

from __future__ import annotations

import argparse
import sys
import time
import zlib

import torch

# Without a GPU (the dry run) the Triton kernels need TRITON_INTERPRET=1 in the environment
# before Python starts (gpu_run.sh --dry-run sets it); set here it would come too late.
from fusedgru import backends, reference, testing  # noqa: E402
from fusedgru.modules import FusedGRU  # noqa: E402

# (T, B, I, H): H not a multiple of any block size, I != H, B = 1 and odd
LAYER_SHAPES = [(3, 2, 5, 17), (2, 1, 3, 33), (4, 5, 7, 63)]
# Triton above its resident limit (H split across programs), once per large-H strategy:
# a launch per unit ("step") and the persistent launch with its grid barrier.
SPLIT_SHAPE = (3, 2, 5, 130)
DTYPES = [torch.float32, torch.bfloat16]


def gpu_backends(device_type: str, requested=None):
    names = []
    for name in backends.BACKENDS:  # the table, never a hard-coded list
        if requested and name not in requested:
            continue
        if backends.backend_status()[name] is not None:
            continue
        impl = backends.get_backend(name)
        if impl.unsupported_reason(device_type, torch.float32) is not None:
            continue
        # the reference is torch's own ops: nothing of ours to sanitise
        if name == "reference" and not requested:
            continue
        names.append(name)
    return names


def cases(device_type: str, requested=None):
    for name in gpu_backends(device_type, requested):
        impl = backends.get_backend(name)
        for dtype in DTYPES:
            if impl.unsupported_reason(device_type, dtype) is not None:
                continue
            for reset_after in (True, False):
                for shape in LAYER_SHAPES:
                    yield ("layer", name, dtype, reset_after, shape)
                if name == "triton":
                    for strategy in _split_strategies(device_type, dtype):
                        yield (f"layer-{strategy}", name, dtype, reset_after, SPLIT_SHAPE)
                yield ("module", name, dtype, reset_after, (4, 3, 6, 17))


# The first contact (gpu_run.sh): two small cases per GPU backend.  The cuda row: its
# persistent cooperative kernels (float32, reset_after=True) and its per-step kernels forced
# (bfloat16, reset_after=False, H = 130: 9 blocks).  The triton row: the resident kernels
# (float32, reset_after=True) and the persistent split kernels with their grid barrier
# (bfloat16, reset_after=False: two barrier phases per step).
FIRST_CONTACT = {
    "cuda": [("layer", torch.float32, True, LAYER_SHAPES[0]),
             ("layer-per-step", torch.bfloat16, False, SPLIT_SHAPE)],
    "triton": [("layer", torch.float32, True, LAYER_SHAPES[0]),
               ("layer-persistent", torch.bfloat16, False, SPLIT_SHAPE)],
}


def first_contact_cases(name: str):
    """gpu_run.sh's two cases of backend ``name`` (kind, name, dtype, reset_after, shape)."""
    return [(kind, name, dtype, ra, shape) for kind, dtype, ra, shape in FIRST_CONTACT.get(name, [])]


def _split_strategies(device_type: str, dtype):
    """The large-H strategies SPLIT_SHAPE can run with here (the interpreter of the dry run
    runs one program at a time, so no persistent grid of several programs there)."""
    from fusedgru.kernels import gru

    T, B, I, H = SPLIT_SHAPE
    for strategy in gru.LARGE_H_STRATEGIES:
        try:
            gru.strategy_config(strategy, B, H, dtype, torch.device(device_type))
        except ValueError:
            if strategy == "step":  # always applies above the resident limit
                raise
            continue
        yield strategy


def run_case(kind, name, dtype, reset_after, shape, device) -> str:
    """'' when it passed, else what failed."""
    T, B, I, H = shape
    g = torch.Generator().manual_seed(zlib.crc32(repr((kind, name, dtype, reset_after, shape)).encode()))
    if kind == "layer-per-step":  # the cuda row's per-step kernels, forced
        prev = torch.ops.fusedgru._set_cuda_path(2)
        try:
            return run_case("layer", name, dtype, reset_after, shape, device)
        finally:
            torch.ops.fusedgru._set_cuda_path(prev)
    if kind.startswith("layer-"):  # a Triton large-H strategy, forced
        from fusedgru.kernels import gru

        cfg = gru.strategy_config(kind[len("layer-"):], B, H, dtype, torch.device(device))
        with gru.force_config(cfg):
            return run_case("layer", name, dtype, reset_after, shape, device)
    if kind == "layer":
        case = testing.make_layer_case(T, B, I, H, reset_after=reset_after,
                                       with_h0=shape[1] != 1, generator=g)
        report = testing.check_layer(name, case, device=device, dtype=dtype, backward=True)
        failures = dict(report.failures)
        inference = getattr(backends.get_backend(name), "inference", None)
        if inference is not None:  # what FusedGRU runs under no_grad: y only, no ws
            args = case.args(device, dtype)
            with torch.no_grad():
                y = inference(*args, reset_after)
            want, _ = reference.gru_layer_forward(*case.args(dtype=torch.float64), reset_after)
            base, _ = reference.gru_layer_forward(*args, reset_after)
            err = testing.rel_err(y, want)
            bound = testing.budget(dtype, testing.rel_err(base, want))
            if not err <= bound:
                failures["y (inference)"] = f"err {err:.3g} > budget {bound:.3g}"
        return "" if not failures else str(failures)
    # the module path: 2 layers, bidirectional (reversal, concatenation, h_n order)
    torch.manual_seed(g.initial_seed())
    m64 = FusedGRU(I, H, num_layers=2, bidirectional=True, reset_after=reset_after,
                   backend="reference", dtype=torch.float64)
    m = FusedGRU(I, H, num_layers=2, bidirectional=True, reset_after=reset_after,
                 backend=name, device=device, dtype=dtype)
    m.load_state_dict(m64.state_dict())
    x64 = torch.randn(T, B, I, dtype=torch.float64, generator=g, requires_grad=True)
    x = x64.detach().to(device, dtype).requires_grad_(True)
    y64, h64 = m64(x64)
    with torch.no_grad():  # the inference entry (no ws) where the backend has one
        y_inf, h_inf = m(x)
    y, h = m(x)
    gy = torch.randn(y64.shape, dtype=torch.float64, generator=g)
    (y64 * gy).sum().backward()
    (y * gy.to(device, dtype)).sum().backward()
    errs = {"y": testing.rel_err(y, y64), "h_n": testing.rel_err(h, h64),
            "y (no_grad)": testing.rel_err(y_inf, y64), "h_n (no_grad)": testing.rel_err(h_inf, h64),
            "dx": testing.rel_err(x.grad, x64.grad),
            "dw_hh_l1r": testing.rel_err(m.weight_hh_l1_reverse.grad,
                                         m64.weight_hh_l1_reverse.grad)}
    # a loose sanity bound here (the layer cases above hold the exact SPEC budget): this
    # case is about memory errors; 50x the dtype's band catches garbage, not rounding
    bound = {torch.float32: 1e-4, torch.bfloat16: 0.5}[dtype]
    bad = {k: v for k, v in errs.items() if not v <= bound}
    return "" if not bad else f"errors over {bound}: {bad}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backends", default=None, help="comma-separated backend names")
    p.add_argument("--list", action="store_true")
    p.add_argument("--first-contact", action="store_true",
                   help="two small cases per backend (FIRST_CONTACT), as gpu_run.sh runs them")
    args = p.parse_args(argv)
    requested = args.backends.split(",") if args.backends else None
    device = torch.device(args.device)
    if args.first_contact:
        todo = [c for name in gpu_backends(device.type, requested)
                for c in first_contact_cases(name)
                if not (c[0] == "layer-persistent" and device.type != "cuda")]
    else:
        todo = list(cases(device.type, requested))
    print(f"sanitize_cases: device {device}, backends "
          f"{gpu_backends(device.type, requested) or 'none'}, {len(todo)} cases")
    if not todo:
        print("sanitize_cases: no backend to run on this device "
              f"({backends.backend_status()})")
        return 1
    failed = 0
    for kind, name, dtype, reset_after, shape in todo:
        label = (f"{kind:16} {name:8} {str(dtype).replace('torch.', ''):8} "
                 f"reset_after={reset_after!s:5} T,B,I,H={shape}")
        if args.list:
            print(label)
            continue
        t0 = time.monotonic()
        try:
            why = run_case(kind, name, dtype, reset_after, shape, device)
            if device.type == "cuda":
                torch.cuda.synchronize()
        except Exception as exc:  # noqa: BLE001 - report and go on to the next case
            why = f"{type(exc).__name__}: {exc}"
        failed += bool(why)
        print(f"{'FAIL' if why else 'ok  '} {label} {time.monotonic() - t0:6.2f}s {why}",
              flush=True)
    if not args.list:
        print(f"sanitize_cases: {len(todo) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
