"""The backend table: every way fusedgru can run one GRU layer-direction, as rows.

A row names the object that implements it, ``module:attribute``; the module is imported on
first use.  The object (a module-level instance, see fusedgru/_reference_backend.py) has:

    forward(x, h0, w_ih, w_hh, b_ih, b_hh, reset_after) -> (y, ws)        (fusedgru/ops.py)
    backward(grad_y, x, h0, w_ih, w_hh, y, ws, reset_after, batch_sizes=None, resets=None,
             need_dx=True, need_dw=True) -> 6 grads (those not needed: empty tensors)
    unavailable_reason() -> str | None      why this backend cannot run on this machine
    unsupported_reason(device_type: str, dtype) -> str | None
                                            why it cannot run on that device / dtype
    inference(x, h0, w_ih, w_hh, b_ih, b_hh, reset_after) -> y
                          (optional) the forward when nothing needs a gradient: y alone,
                          without writing the (T, B, 4H) ws the backward would read
    deterministic: bool   (optional; True when absent) whether two runs on the same inputs
                          give bitwise-identical outputs and gradients.  A backend whose
                          kernels cannot promise it (atomics, split reductions) sets False:
                          under torch.use_deterministic_algorithms(True) it then raises, as
                          PyTorch's own nondeterministic ops do (checked in one place,
                          fusedgru.function.check_determinism).

    per_step_path(batch: int) -> context manager
                          (optional) within it, the backend launches only kernels that
                          need no cooperative launch and no W_hh on chip (its per-step
                          path) for a batch of that many rows: what "auto" falls back to
                          first when a fused kernel cannot launch (fusedgru/function.py)

forward and backward are registered dispatcher ops (fusedgru/ops.py: fake implementations
for torch.compile / torch.export, and autograd formulas registered on the ops).

Choosing a backend is a lookup in this table, never an if/else elsewhere in the package.
"auto" takes the first row of AUTO_ORDER[device type] that is available and supports the
dtype; the rows after it that do too are its fallbacks (auto_fallbacks): if a fused GPU
kernel cannot be launched for a shape (is_launch_failure), the call runs on the chosen
row's per-step path, then on those rows, with one BackendFallbackWarning.  An explicitly
named backend never falls back: it raises BackendLaunchError.  A resolved name is always a
plain str (torch.compile takes it as a constant); whether it came from "auto" travels
beside it (fusedgru/function.py gru_layer's ``auto``).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

__all__ = [
    "auto_fallbacks",
    "BackendFallbackWarning",
    "BackendLaunchError",
    "is_launch_failure",
    "Backend",
    "BACKENDS",
    "AUTO_ORDER",
    "BACKEND_NAMES",
    "available_backends",
    "backend_status",
    "get_backend",
    "resolve_backend",
    "BackendUnavailableError",
]


class BackendUnavailableError(RuntimeError):
    """A backend was asked for that cannot run here (what is missing is in the message)."""


class BackendLaunchError(RuntimeError):
    """An explicitly chosen backend could not launch its kernel for this shape on this
    device (the driver's or compiler's reason is in the message and in __cause__)."""


class BackendFallbackWarning(RuntimeWarning):
    """backend="auto" ran a layer on a slower path than its first choice, because the
    first choice's fused kernel could not be launched for that shape."""


# What a kernel launch raises when the kernel cannot run at this size on this device, as
# opposed to a wrong input or a fault inside a kernel (never caught: an illegal address is
# sticky, and an out-of-memory error would recur on the next row):
#   "too many blocks in cooperative launch"     cudaErrorCooperativeLaunchTooLarge (CUDA
#                                               extension and Triton's cooperative launch)
#   "too many resources requested for launch"   cudaErrorLaunchOutOfResources
#   "out of resource"                           triton.runtime.errors.OutOfResources (shared
#                                               memory or registers over the device limit)
#   "co-resident"                               kernels/gru.py refusing a persistent grid
#                                               larger than the SMs (_check_persistent)
#   "exceed shared memory"                      the CUDA plan's accumulator tiles (make_plan)
_LAUNCH_FAILURES = ("too many blocks in cooperative launch",
                    "too many resources requested for launch", "out of resource",
                    "co-resident", "exceed shared memory")


def is_launch_failure(exc: BaseException) -> bool:
    """Whether ``exc`` says a kernel could not be launched at this size (see above)."""
    if isinstance(exc, torch.OutOfMemoryError):
        return False
    if type(exc).__name__ == "OutOfResources":  # triton.runtime.errors, without importing it
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(m in text for m in _LAUNCH_FAILURES)


@dataclass(frozen=True)
class Backend:
    name: str
    target: str  # "module:attribute", imported lazily
    summary: str
    how_to_get: str  # printed when it is missing


BACKENDS: Dict[str, Backend] = {
    b.name: b
    for b in [
        Backend(
            "cuda",
            "fusedgru.extension:cuda_backend",
            "C++/CUDA extension: persistent kernel with W_hh on chip (GPU)",
            "a CUDA device, and the extension built with nvcc against a CUDA build of torch "
            "(no GPU needed to build): CUDA_HOME=/usr/local/cuda TORCH_CUDA_ARCH_LIST=9.0 "
            "pip install --no-build-isolation -e . (or fusedgru.extension.jit_build())",
        ),
        Backend(
            "triton",
            "fusedgru.kernels.backend:backend",
            "Triton fused time-loop kernels (GPU; CPU tensors under TRITON_INTERPRET=1)",
            "pip install triton (it comes with CUDA builds of torch) and run on a CUDA "
            "device, or set TRITON_INTERPRET=1 before importing fusedgru for CPU tensors",
        ),
        Backend(
            "cpu",
            "fusedgru.extension:cpu_backend",
            "C++ extension: fused, vectorised CPU loop (at::vec, at::parallel_for)",
            "build the extension: pip install --no-build-isolation -e . "
            "(or call fusedgru.extension.jit_build() for a cached JIT build)",
        ),
        Backend(
            "reference",
            "fusedgru._reference_backend:backend",
            "pure PyTorch, written for reading; any device and dtype",
            "always available",
        ),
    ]
}

BACKEND_NAMES = tuple(BACKENDS)

# "auto": fastest first, for each device type.
AUTO_ORDER: Dict[str, List[str]] = {
    "cuda": ["cuda", "triton", "reference"],
    "cpu": ["cpu", "reference"],
}

_loaded: Dict[str, object] = {}
_import_errors: Dict[str, str] = {}


def _load(name: str):
    """The backend's implementation object, or None (the reason kept) if it cannot load."""
    if name in _loaded:
        return _loaded[name]
    if name in _import_errors:
        return None
    module, attr = BACKENDS[name].target.split(":")
    try:
        impl = getattr(importlib.import_module(module), attr)
    except Exception as exc:  # noqa: BLE001 - any import failure means "not available"
        _import_errors[name] = f"cannot import {module} ({type(exc).__name__}: {exc})"
        return None
    _loaded[name] = impl
    return impl


def _why_unavailable(name: str) -> Optional[str]:
    impl = _load(name)
    return _import_errors[name] if impl is None else impl.unavailable_reason()


def backend_status() -> Dict[str, Optional[str]]:
    """{name: None if usable here, else the reason it is not}."""
    return {name: _why_unavailable(name) for name in BACKENDS}


def available_backends() -> List[str]:
    """The backend names usable on this machine (for some device and dtype)."""
    return [name for name, why in backend_status().items() if why is None]


def get_backend(name: str):
    """The implementation of an available backend; BackendUnavailableError says what is missing."""
    if name not in BACKENDS:
        raise ValueError(
            f"backend: unknown backend {name!r}; expected 'auto' or one of {list(BACKENDS)}"
        )
    why = _why_unavailable(name)
    if why is not None:
        raise BackendUnavailableError(
            f"backend {name!r} is not available: {why}. To get it: {BACKENDS[name].how_to_get}"
        )
    return _loaded[name]


def check_backend_name(name) -> str:
    if not isinstance(name, str) or (name != "auto" and name not in BACKENDS):
        raise ValueError(
            f"backend: unknown backend {name!r}; expected 'auto' or one of {list(BACKENDS)}"
        )
    return name


def _auto_rows(device_type: str, dtype: torch.dtype) -> Tuple[List[str], List[str]]:
    """The rows of AUTO_ORDER[device_type] that run ``dtype`` here, in order, and why each
    other row cannot."""
    reasons, usable = [], []
    for candidate in AUTO_ORDER.get(device_type, ["reference"]):
        why = _why_unavailable(candidate)
        if why is None:
            why = _loaded[candidate].unsupported_reason(device_type, dtype)
        if why is None:
            usable.append(candidate)
        else:
            reasons.append(f"{candidate}: {why}")
    return usable, reasons


def auto_fallbacks(name: str, device: torch.device, dtype: torch.dtype) -> Tuple[str, ...]:
    """The rows "auto" falls back to after ``name`` for this device and dtype: the later
    rows of AUTO_ORDER that run them here, in order."""
    usable, _ = _auto_rows(torch.device(device).type, dtype)
    return tuple(usable[usable.index(name) + 1:]) if name in usable else tuple(usable)


def resolve_backend(name: str, device: torch.device, dtype: torch.dtype) -> str:
    """The concrete backend (a plain str) that runs tensors of this device and dtype for
    ``name``."""
    check_backend_name(name)
    device_type = torch.device(device).type
    if name == "auto":
        usable, reasons = _auto_rows(device_type, dtype)
        if usable:
            return usable[0]
        raise BackendUnavailableError(
            f"no backend runs {dtype} on {device_type}: " + "; ".join(reasons)
        )
    mod = get_backend(name)
    why = mod.unsupported_reason(device_type, dtype)
    if why is not None:
        raise BackendUnavailableError(
            f"backend {name!r} cannot run {dtype} tensors on {device_type}: {why}"
        )
    return name
