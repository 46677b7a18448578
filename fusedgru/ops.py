"""Registered dispatcher ops: the one boundary each backend's kernels sit behind.

Every backend exposes the same two ops for one layer in one direction (shapes in
fusedgru/reference.py; T, B, I, H as there):

    <name>_fwd(x (T,B,I), h0 (B,H)?, w_ih (3H,I), w_hh (3H,H), b_ih (3H)?, b_hh (3H)?,
               reset_after: bool) -> (y (T,B,H), ws (T,B,4H))
    <name>_bwd(grad_y (T,B,H), x, h0?, w_ih, w_hh, y, ws, reset_after: bool)
               -> (dx (T,B,I), dh0 (B,H), dw_ih (3H,I), dw_hh (3H,H), db_ih (3H), db_hh (3H))

They are registered (``torch.library.custom_op`` here for the Python backends, TORCH_LIBRARY
in csrc/ for the extension) with the fake implementations below, so that torch.compile
traces them as opaque nodes without graph breaks and torch.export can serialise them.
Autograd is NOT registered on the ops: the single autograd boundary is
fusedgru.function.GRULayerFunction, which calls the forward op and, in its backward, the
backward op (one registered boundary on the hot path, see ../shared/STYLE.md).
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
from torch import Tensor

from . import reference

__all__ = ["fake_forward", "fake_backward", "register_backend_ops"]


def fake_forward(x, h0, w_ih, w_hh, b_ih, b_hh, reset_after):
    T, B, _ = x.shape
    H = w_hh.shape[1]
    return x.new_empty(T, B, H), x.new_empty(T, B, 4 * H)


def fake_backward(grad_y, x, h0, w_ih, w_hh, y, ws, reset_after):
    T, B, _ = x.shape
    H = w_hh.shape[1]
    return (
        torch.empty_like(x),
        x.new_empty(B, H),
        torch.empty_like(w_ih),
        torch.empty_like(w_hh),
        w_hh.new_empty(3 * H),
        w_hh.new_empty(3 * H),
    )


def register_backend_ops(
    name: str, forward_impl: Callable, backward_impl: Callable
) -> Tuple[Callable, Callable]:
    """Registers ``fusedgru::<name>_fwd`` and ``fusedgru::<name>_bwd`` with the shared schema
    and fake implementations; returns the two ops (``torch.ops.fusedgru.<name>_fwd`` ...)."""

    @torch.library.custom_op(f"fusedgru::{name}_fwd", mutates_args=())
    def fwd(
        x: Tensor,
        h0: Optional[Tensor],
        w_ih: Tensor,
        w_hh: Tensor,
        b_ih: Optional[Tensor],
        b_hh: Optional[Tensor],
        reset_after: bool,
    ) -> Tuple[Tensor, Tensor]:
        return forward_impl(x, h0, w_ih, w_hh, b_ih, b_hh, reset_after)

    @torch.library.custom_op(f"fusedgru::{name}_bwd", mutates_args=())
    def bwd(
        grad_y: Tensor,
        x: Tensor,
        h0: Optional[Tensor],
        w_ih: Tensor,
        w_hh: Tensor,
        y: Tensor,
        ws: Tensor,
        reset_after: bool,
    ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        return backward_impl(grad_y, x, h0, w_ih, w_hh, y, ws, reset_after)

    fwd.register_fake(fake_forward)
    bwd.register_fake(fake_backward)
    return getattr(torch.ops.fusedgru, f"{name}_fwd"), getattr(torch.ops.fusedgru, f"{name}_bwd")


# The reference backend: the float64-checkable Python implementation, on any device and dtype.
reference_fwd, reference_bwd = register_backend_ops(
    "reference", reference.gru_layer_forward, reference.gru_layer_backward
)
