"""The single autograd boundary: one layer-direction through a backend's registered ops.

Everything above it (layers, directions, packing, dropout, autocast) is plain differentiable
PyTorch in fusedgru/functional.py; below it is the chosen backend's forward op, whose
autograd formula (registered on the op, fusedgru/ops.py) calls the same backend's backward
op.  So a GRU layer is exactly one dispatcher call forward and one backward, and
torch.compile / torch.export see one opaque node for each.

backend="auto" never takes a model down for a kernel that cannot launch at some shape (a
cooperative grid the driver refuses, more shared memory than a block gets:
backends.is_launch_failure): the layer runs on the chosen row's per-step path, then on the
next rows of the table (backends.auto_fallbacks), with one BackendFallbackWarning,
and later calls of that shape go straight to the path that worked.  This is eager-mode
work (a compiled graph or a trace raises as before); an explicitly named backend raises
BackendLaunchError.
"""

from __future__ import annotations

import threading
import warnings
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

from . import backends, ops

__all__ = ["gru_layer", "check_determinism"]


def check_determinism(name: str, impl) -> None:
    """Raises (or warns, in warn-only mode) as PyTorch's own nondeterministic ops do when
    ``torch.use_deterministic_algorithms(True)`` is set and the backend cannot guarantee
    bitwise-reproducible results (its ``deterministic`` attribute, fusedgru/backends.py)."""
    if getattr(impl, "deterministic", True) or not torch.are_deterministic_algorithms_enabled():
        return
    msg = (f"fusedgru backend {name!r} does not have a deterministic implementation, but you "
           "set 'torch.use_deterministic_algorithms(True)'. Choose a deterministic backend "
           "(FusedGRU(..., backend='reference') or another with deterministic=True), or turn "
           "this check off with torch.use_deterministic_algorithms(True, warn_only=True).")
    # torch.compile cannot trace the warn_only query: a compiled graph always raises.
    if not torch.compiler.is_compiling() and torch.is_deterministic_algorithms_warn_only_enabled():
        warnings.warn(msg)
    else:
        raise RuntimeError(msg)


def gru_layer(
    x: Tensor,  # (T, B, I), contiguous
    h0: Optional[Tensor],  # (B, H) or None (zeros)
    w_ih: Tensor,  # (3H, I)
    w_hh: Tensor,  # (3H, H)
    b_ih: Optional[Tensor],  # (3H,) or None
    b_hh: Optional[Tensor],  # (3H,) or None
    reset_after: bool,
    backend: str,  # a name already resolved by backends.resolve_backend
    batch_sizes: Optional[Tensor] = None,  # (T,) int64 CPU: x is packed (N, I) rows
    resets: Optional[Tensor] = None,  # (T, B) bool on x's device
    auto: bool = False,  # backend is what "auto" chose: a launch failure falls back
) -> Tensor:
    """y (T, B, H) = one GRU layer in one direction over x (see fusedgru/reference.py;
    (N, H) when x is packed rows with batch_sizes).

    Autograd saves x, h0, the weights, y and the backend's ws (T, B, 4H) for the backward:
    4H values per row per step beyond the output, as SPEC section 4 asks.
    """
    impl = backends._loaded[backend]
    check_determinism(backend, impl)
    args = (x, h0, w_ih, w_hh, b_ih, b_hh, reset_after, batch_sizes, resets)
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return _run(impl, *args)
    key = (backend, x.device, x.dtype, ops.layout_batch(x, batch_sizes), w_hh.shape[1],
           reset_after)
    route = _routes.get(key)
    if route is not None:  # this shape fell back before: straight to what worked
        return _run_route(route, *args)
    try:
        return _run(impl, *args)
    except Exception as exc:  # noqa: BLE001 - only launch failures are handled
        if not backends.is_launch_failure(exc):
            raise
        if not auto:
            raise backends.BackendLaunchError(
                f"fusedgru backend {backend!r} could not launch its kernel for B="
                f"{x.shape[1]}, H={w_hh.shape[1]}, {x.dtype} on {x.device}: {exc}. "
                f"backend='auto' would fall back to a slower path instead") from exc
        return _fall_back(key, backend, exc, args)


# (backend, device, dtype, B, H, reset_after) -> the route that ran that shape after its
# first choice could not launch: (row name, on its per-step path?).
_routes: Dict[tuple, Tuple[str, bool]] = {}
_routes_lock = threading.Lock()


def _fall_back(key, backend: str, first: BaseException, args) -> Tensor:
    """Runs the layer on the first route after ``backend``'s fused kernels that launches:
    its per-step path (where it has one), then each later row of "auto" for this device and
    dtype (as chosen, then per-step)."""
    B = key[3]
    later = backends.auto_fallbacks(backend, key[1], key[2])
    routes = [(backend, True)] + [(n, p) for n in later for p in (False, True)]
    failures = [f"{backend}: {first}"]
    for name, per_step in routes:
        impl = backends._loaded.get(name) or backends.get_backend(name)
        if per_step and getattr(impl, "per_step_path", None) is None:
            continue
        try:
            y = _run_route((name, per_step), *args)
        except Exception as exc:  # noqa: BLE001
            if not backends.is_launch_failure(exc):
                raise
            failures.append(f"{name}{' per-step' if per_step else ''}: {exc}")
            continue
        with _routes_lock:
            _routes[key] = (name, per_step)
        warnings.warn(
            f"fusedgru: backend 'auto' chose {backend!r}, whose fused kernel could not "
            f"be launched for B={B}, H={key[4]}, {key[2]} on {key[1]} ({first}); this layer "
            f"runs on {name!r}{' (per-step kernels)' if per_step else ''} instead, now and "
            "for later calls of this shape", backends.BackendFallbackWarning, stacklevel=4)
        return y
    raise backends.BackendLaunchError(
        "fusedgru: no backend of 'auto' could launch this layer: " + "; ".join(failures)) from first


class _PerStep:
    """A backend row seen through its per-step path: forward, backward and inference each
    run inside impl.per_step_path(B), so a backward taken later runs the same path."""

    def __init__(self, impl):
        self.impl = impl
        self.deterministic = getattr(impl, "deterministic", True)
        # Stable function objects: ops.functorch_forward keys its autograd.Function on them.
        self.forward = self._wrap(impl.forward, 0)
        self.backward = self._wrap(impl.backward, 1)
        if getattr(impl, "inference", None) is not None:
            self.inference = self._wrap(impl.inference, 0)

    def _wrap(self, fn, x_index):
        # a: the op's arguments, all positional; batch_sizes follows reset_after (7 fixed
        # arguments forward, 8 backward, whose need_dx / need_dw come after resets)
        def call(*a):
            bs_index = x_index + 7
            batch_sizes = a[bs_index] if len(a) > bs_index else None
            with self.impl.per_step_path(ops.layout_batch(a[x_index], batch_sizes)):
                return fn(*a)
        return call


_per_step: Dict[str, _PerStep] = {}


def _run_route(route: Tuple[str, bool], x, h0, w_ih, w_hh, b_ih, b_hh, reset_after,
               batch_sizes=None, resets=None) -> Tensor:
    name, per_step = route
    impl = backends._loaded.get(name) or backends.get_backend(name)
    check_determinism(name, impl)
    if per_step:
        if name not in _per_step:
            _per_step[name] = _PerStep(impl)
        impl = _per_step[name]
    return _run(impl, x, h0, w_ih, w_hh, b_ih, b_hh, reset_after, batch_sizes, resets,
                wrapped=per_step)


def _run(impl, x, h0, w_ih, w_hh, b_ih, b_hh, reset_after, batch_sizes=None, resets=None,
         wrapped: bool = False) -> Tensor:
    """The layer on one backend row.  wrapped: impl's forward/backward are not the
    registered ops themselves (_PerStep), so gradients go through the autograd.Function
    with the same formulas (ops.functorch_forward), whose backward calls impl.backward."""
    # With nothing to differentiate, a backend's optional inference entry skips ws.
    inference = getattr(impl, "inference", None)
    # Under a torch.func transform, a wrapped tensor's requires_grad does not say whether
    # the tensor inside it does: with grad mode on, take the differentiable path.
    under_func = _under_torch_func()
    needs_grad = torch.is_grad_enabled() and (under_func or any(
        t is not None and t.requires_grad for t in (x, h0, w_ih, w_hh, b_ih, b_hh)))
    # The inputs are already in the computation dtype (functional._autocast); the kernels own
    # their accumulation precision, so autocast must not recast anything inside them.
    with ops.autocast_off(x.device.type):
        # torch.jit.trace re-traces to check its graph: one op whatever the grad mode.
        args = (x, h0, w_ih, w_hh, b_ih, b_hh, reset_after, batch_sizes, resets)
        if inference is not None and not needs_grad and not torch.jit.is_tracing():
            return inference(*args)  # no ws stored
        if under_func or wrapped:
            # The same ops and formulas, through an autograd.Function functorch accepts.
            y, _ = ops.functorch_forward(impl)(*args)
            return y
        y, _ = impl.forward(*args)
    return y


def _under_torch_func() -> bool:
    """Whether a torch.func transform (grad, vjp, jacrev, vmap, ...) is active."""
    if torch.compiler.is_compiling():
        return False
    return torch._C._functorch.peek_interpreter_stack() is not None
