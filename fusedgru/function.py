"""The single autograd boundary: one torch.autograd.Function per GRU layer-direction.

Everything above it (layers, directions, packing, dropout) is plain differentiable PyTorch in
fusedgru/functional.py; everything below it is a registered forward op and a registered
backward op of the chosen backend (fusedgru/ops.py, fusedgru/backends.py).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import backends


class GRULayerFunction(torch.autograd.Function):
    """y = GRU layer (one direction) over x; see fusedgru/reference.py for the shapes.

    Saves x, h0, the weights, y and the backend's ws (T, B, 4H) for the backward: 4H values
    per row per step beyond the output, as SPEC section 4 asks.
    """

    @staticmethod
    def forward(
        ctx,
        x: Tensor,  # (T, B, I), contiguous
        h0: Optional[Tensor],  # (B, H) or None (zeros)
        w_ih: Tensor,  # (3H, I)
        w_hh: Tensor,  # (3H, H)
        b_ih: Optional[Tensor],  # (3H,) or None
        b_hh: Optional[Tensor],  # (3H,) or None
        reset_after: bool,
        backend: str,  # a name already resolved by backends.resolve_backend
    ) -> Tensor:
        impl = backends._loaded[backend]
        y, ws = impl.forward(x, h0, w_ih, w_hh, b_ih, b_hh, reset_after)
        ctx.save_for_backward(x, h0, w_ih, w_hh, y, ws)
        ctx.reset_after = reset_after
        ctx.backend = backend
        ctx.has_bias = b_ih is not None
        ctx.has_h0 = h0 is not None
        return y

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        x, h0, w_ih, w_hh, y, ws = ctx.saved_tensors
        impl = backends._loaded[ctx.backend]
        dx, dh0, dw_ih, dw_hh, db_ih, db_hh = impl.backward(
            grad_y.contiguous(), x, h0, w_ih, w_hh, y, ws, ctx.reset_after
        )
        if not ctx.has_bias:
            db_ih = db_hh = None
        if not ctx.has_h0:
            dh0 = None
        return dx, dh0, dw_ih, dw_hh, db_ih, db_hh, None, None
