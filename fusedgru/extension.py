"""The C++/CUDA extension fusedgru._C behind the "cpu" and "cuda" rows of the backend table.

fusedgru._C (csrc/) registers the dispatcher ops

    fusedgru::gru_fwd(x, h0?, w_ih, w_hh, b_ih?, b_hh?, reset_after, batch_sizes?, resets?)
                      -> (y, ws)
    fusedgru::gru_bwd(grad_y, x, h0?, w_ih, w_hh, y, ws, reset_after, batch_sizes?, resets?,
                      need_dx = True, need_dw = True)
                      -> 6 gradients (those not needed: empty, not computed)
    fusedgru::gru_infer(x, h0?, w_ih, w_hh, b_ih?, b_hh?, reset_after, batch_sizes?, resets?)
                      -> y
                      (no gradient needed: no (T, B, 4H) ws is kept)

with a CPU kernel (always) and a CUDA kernel (when built with nvcc); shapes as in
fusedgru/reference.py.  This module loads the library, gives the ops their fake kernels
(fusedgru.ops.fake_forward / fake_backward) so torch.compile can trace them, and exposes the
two backend objects ``cpu_backend`` and ``cuda_backend``.  A failed load leaves both
backends unavailable, with the reason; ``jit_build()`` compiles the same sources on demand.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import platform
import threading
from typing import Optional

import torch

from . import ops

__all__ = ["cpu_backend", "cuda_backend", "jit_build", "load_error", "has_cuda_kernels"]

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_CSRC = os.path.join(_ROOT, "csrc")

_state = {"loaded": False, "error": None, "fakes": False}


def _cpu_lacks_avx2() -> Optional[str]:
    # The x86 build is compiled for AVX2 + FMA (csrc/build_config.py): refuse to load it on a
    # CPU without them (torch then reports capability DEFAULT) rather than die of SIGILL.
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    if os.environ.get("FUSEDGRU_NO_AVX2") == "1":
        return None
    cap = torch.backends.cpu.get_cpu_capability()
    if cap == "DEFAULT":
        return "this CPU lacks AVX2, which the x86 build of fusedgru._C needs " \
               "(rebuild with FUSEDGRU_NO_AVX2=1)"
    return None


def _register_fakes() -> None:
    if _state["fakes"]:
        return
    torch.library.register_fake("fusedgru::gru_fwd")(ops.fake_forward)
    torch.library.register_fake("fusedgru::gru_bwd")(ops.fake_backward)
    torch.library.register_fake("fusedgru::gru_infer")(ops.fake_inference)
    _state["fakes"] = True


def _load() -> None:
    why = _cpu_lacks_avx2()
    if why is not None:
        _state["error"] = why
        return
    try:
        from . import _C  # noqa: F401  (importing runs the op registrations)
    except ImportError as exc:
        _state["error"] = (f"fusedgru._C is not built ({exc}); build it with `pip install "
                           "--no-build-isolation -e .` or call fusedgru.extension.jit_build()")
        return
    _register_fakes()
    _state["loaded"] = True
    _state["error"] = None


def load_error() -> Optional[str]:
    """None when the extension's ops are registered, else why not."""
    return None if _state["loaded"] else _state["error"]


def has_cuda_kernels() -> bool:
    """Whether the loaded library registered CUDA kernels (built with nvcc)."""
    return _state["loaded"] and torch._C._dispatch_has_kernel_for_dispatch_key(
        "fusedgru::gru_fwd", "CUDA")


@functools.lru_cache(maxsize=None)
def jit_build(verbose: bool = False, with_cuda: Optional[bool] = None) -> None:
    """Compiles csrc/ with torch.utils.cpp_extension.load (ninja; cached under
    TORCH_EXTENSIONS_DIR, so a second call, or a second process, reuses the build) and
    loads it.  For a package installed without building; needs the source tree (csrc/)."""
    if _state["loaded"]:
        return
    why = _cpu_lacks_avx2()
    if why is not None:
        raise RuntimeError(why)
    from torch.utils import cpp_extension

    spec = importlib.util.spec_from_file_location(
        "fusedgru_build_config", os.path.join(_CSRC, "build_config.py"))
    if spec is None or not os.path.isdir(_CSRC):
        raise RuntimeError(f"jit_build needs the fusedgru source tree; {_CSRC} is missing")
    cfg = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cfg)
    if with_cuda is None:
        with_cuda = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if with_cuda:
        cfg.default_arch_list()
    args = cfg.compile_args(with_cuda)
    cpp_extension.load(
        name="fusedgru_jit" + ("_cuda" if with_cuda else "_cpu"),
        sources=cfg.sources(with_cuda),
        extra_cflags=args["cxx"],
        extra_cuda_cflags=args.get("nvcc"),
        extra_ldflags=cfg.link_args(),
        extra_include_paths=[_CSRC],
        is_python_module=False,
        verbose=verbose,
    )
    _register_fakes()
    _state["loaded"] = True
    _state["error"] = None


class _ExtensionBackend:
    """One row of the backend table (fusedgru/backends.py) served by fusedgru._C."""

    def __init__(self, name: str, device_type: str, dtypes) -> None:
        self.name = name
        self.device_type = device_type
        self.dtypes = tuple(dtypes)

    @staticmethod
    def forward(x, h0, w_ih, w_hh, b_ih, b_hh, reset_after, batch_sizes=None, resets=None):
        return torch.ops.fusedgru.gru_fwd(x, h0, w_ih, w_hh, b_ih, b_hh, reset_after,
                                          batch_sizes, resets)

    @staticmethod
    def backward(grad_y, x, h0, w_ih, w_hh, y, ws, reset_after, batch_sizes=None, resets=None,
                 need_dx=True, need_dw=True):
        return torch.ops.fusedgru.gru_bwd(grad_y, x, h0, w_ih, w_hh, y, ws, reset_after,
                                          batch_sizes, resets, need_dx, need_dw)

    @staticmethod
    def inference(x, h0, w_ih, w_hh, b_ih, b_hh, reset_after, batch_sizes=None, resets=None):
        # The forward when nothing needs a gradient (fusedgru.function.gru_layer): y alone.
        # CPU: one step's scratch instead of ws; CUDA: the same kernels skip the ws stores.
        return torch.ops.fusedgru.gru_infer(x, h0, w_ih, w_hh, b_ih, b_hh, reset_after,
                                            batch_sizes, resets)

    def __repr__(self) -> str:
        return f"<fusedgru extension backend {self.name!r}>"

    @property
    def per_step_path(self):
        """cuda only: a context (batch -> context manager) within which the CUDA kernels
        take their per-step path (fusedgru::_set_cuda_path(2): a launch per step and phase,
        W_hh read from L2, no cooperative launch); what backend="auto" falls back to first
        when a persistent launch fails (fusedgru/function.py).  None for the cpu row."""
        return _cuda_per_step_path if self.device_type == "cuda" else None

    def unavailable_reason(self) -> Optional[str]:
        if not _state["loaded"]:
            return _state["error"]
        if not _bwd_takes_grad_mask():
            # backward() passes need_dx / need_dw: every backward would fail
            return ("fusedgru._C was built from older sources (gru_bwd without need_dx / "
                    "need_dw): rebuild it")
        if self.device_type == "cuda":
            if not has_cuda_kernels():
                return "fusedgru._C was built without CUDA (no nvcc or a CPU-only torch)"
            if not torch._C._dispatch_has_kernel_for_dispatch_key("fusedgru::gru_infer", "CUDA"):
                # inference() above would fail on every no-grad call: say so up front
                return ("fusedgru._C was built from older sources (no CUDA kernel for "
                        "gru_infer): rebuild it")
            if not torch.cuda.is_available():
                return "no CUDA device is visible"
        return None

    def unsupported_reason(self, device_type: str, dtype: torch.dtype) -> Optional[str]:
        if device_type != self.device_type:
            return f"runs {self.device_type} tensors only, got {device_type}"
        if dtype not in self.dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in self.dtypes)
            return f"supports {names}, got {dtype}"
        return None


def _bwd_takes_grad_mask() -> bool:
    """Whether the loaded fusedgru::gru_bwd has the need_dx / need_dw arguments (read once:
    unavailable_reason runs at every backend resolution)."""
    if _state.get("grad_mask") is None:
        names = [a.name for a in torch.ops.fusedgru.gru_bwd.default._schema.arguments]
        _state["grad_mask"] = "need_dx" in names and "need_dw" in names
    return _state["grad_mask"]


_cuda_path_lock = threading.Lock()


@contextlib.contextmanager
def _cuda_per_step_path(batch: int):
    # The path is a process-wide switch in fusedgru._C: held under a lock for the call, so
    # two threads falling back at once cannot restore each other's setting early (a thread
    # running meanwhile on its usual path may take the per-step kernels: same results).
    with _cuda_path_lock:
        prev = torch.ops.fusedgru._set_cuda_path(2)
        try:
            yield
        finally:
            torch.ops.fusedgru._set_cuda_path(prev)


_load()

cpu_backend = _ExtensionBackend("cpu", "cpu", (torch.float32, torch.float64))
cuda_backend = _ExtensionBackend(
    "cuda", "cuda", (torch.float32, torch.float64, torch.float16, torch.bfloat16))
