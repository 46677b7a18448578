"""The single autograd boundary: one layer-direction through a backend's registered ops.

Everything above it (layers, directions, packing, dropout, autocast) is plain differentiable
PyTorch in fusedgru/functional.py; below it is the chosen backend's forward op, whose
autograd formula (registered on the op, fusedgru/ops.py) calls the same backend's backward
op.  So a GRU layer is exactly one dispatcher call forward and one backward, and
torch.compile / torch.export see one opaque node for each.
"""

from __future__ import annotations

import warnings
from typing import Optional

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
) -> Tensor:
    """y (T, B, H) = one GRU layer in one direction over x (see fusedgru/reference.py).

    Autograd saves x, h0, the weights, y and the backend's ws (T, B, 4H) for the backward:
    4H values per row per step beyond the output, as SPEC section 4 asks.
    """
    impl = backends._loaded[backend]
    check_determinism(backend, impl)
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
        if inference is not None and not needs_grad and not torch.jit.is_tracing():
            return inference(x, h0, w_ih, w_hh, b_ih, b_hh, reset_after)  # no ws stored
        if under_func:
            # The same ops and formulas, through an autograd.Function functorch accepts.
            y, _ = ops.functorch_forward(impl)(x, h0, w_ih, w_hh, b_ih, b_hh, reset_after)
            return y
        y, _ = impl.forward(x, h0, w_ih, w_hh, b_ih, b_hh, reset_after)
    return y


def _under_torch_func() -> bool:
    """Whether a torch.func transform (grad, vjp, jacrev, vmap, ...) is active."""
    if torch.compiler.is_compiling():
        return False
    return torch._C._functorch.peek_interpreter_stack() is not None
