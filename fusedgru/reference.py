"""The GRU written for reading: the specification every fused backend is checked against.

Dimension legend (used in every shape comment of this package):
    T  sequence length (timesteps)
    B  batch size
    I  input features
    H  hidden units
    G  = 3 gates, stacked in the order r (reset), z (update), n (new / candidate)

Three things live here (see docs/SPEC.md sections 1 and 4):

1. ``gru_scratch``: the textbook from-scratch GRU (Cho et al. 2014, reset applied *before*
   the recurrent matmul), with per-gate matrices of shape (inputs, hiddens) and the classic
   ``(inputs, state, params)`` call signature.  ``scratch_params_from_torch`` maps
   torch.nn.GRU's stacked weights onto its nine parameters.
2. ``gru_layer_forward``: one layer, one direction, both formulations, vectorised: the input
   projection of all T steps is ONE matmul before the time loop; each step does the
   recurrent product(s) and the elementwise update.  It returns the outputs and the 4H
   values per row per step that the backward needs (r, z, n and W_hn-product + b_hn).
3. ``gru_layer_backward``: the hand-written backward of (2), SPEC section 4.  Only the
   product with W_hh^T is inside the reverse-time loop; dx, dW_ih, dW_hh and both biases are
   each ONE matmul (or sum) over all T*B rows afterwards.  Every fused backend's backward
   follows this function line for line.

Sequence structure (both functions, and every backend's ops; docs/SPEC.md section 3):

- ``batch_sizes`` (packed rows, no padded work): an int64 CPU tensor (T,), each >= 1 and
  non-increasing, as a PackedSequence's.  x is then the packed data (N, I), N =
  sum(batch_sizes): step t's rows are the ``batch_sizes[t]`` rows starting at
  ``first(t) = batch_sizes[:t].sum()``, the first rows of the length-sorted batch, and
  B = batch_sizes[0].  y, ws, grad_y and dx are laid out like x.  Only active rows are
  computed: a row active at step t >= 1 was active at step t-1 at the same position, so
  the state entering it is y[first(t-1) + b].
- ``resets`` (dense x only): bool (T, B).  resets[t, b] makes the state entering step t of
  row b zeros instead of h_{t-1} (or h0 at t = 0); no gradient flows across it.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

__all__ = [
    "gru_scratch",
    "init_gru_state",
    "scratch_params_from_torch",
    "gru_layer_forward",
    "gru_layer_backward",
    "step_rows",
]


# ----------------------------------------------------------------------------------------
# 1. The textbook GRU
# ----------------------------------------------------------------------------------------


def init_gru_state(batch_size: int, num_hiddens: int, device=None, dtype=None) -> Tuple[Tensor]:
    """The textbook's initial state: a one-element tuple holding zeros of shape (B, H)."""
    return (torch.zeros((batch_size, num_hiddens), device=device, dtype=dtype),)


def scratch_params_from_torch(
    w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor], b_hh: Optional[Tensor]
) -> List[Tensor]:
    """torch.nn.GRU's stacked layer weights -> the textbook's nine per-gate parameters.

    w_ih: (3H, I), w_hh: (3H, H), b_ih / b_hh: (3H,) or None; rows stacked r, z, n.
    Returns [W_xz, W_hz, b_z, W_xr, W_hr, b_r, W_xh, W_hh, b_h], matrices (inputs, H).
    The textbook form is reset_after=False, where b_hn sits outside the reset product, so
    the input and hidden biases of each gate merge into one.
    """
    H = w_hh.shape[1]
    w_ir, w_iz, w_in = w_ih.split(H, dim=0)
    w_hr, w_hz, w_hn = w_hh.split(H, dim=0)
    if b_ih is None:
        b_ih = w_ih.new_zeros(3 * H)
    if b_hh is None:
        b_hh = w_hh.new_zeros(3 * H)
    b_r, b_z, b_h = (b_ih + b_hh).split(H)
    return [w_iz.T, w_hz.T, b_z, w_ir.T, w_hr.T, b_r, w_in.T, w_hn.T, b_h]


def gru_scratch(inputs, state: Tuple[Tensor], params: Sequence[Tensor]):
    """The from-scratch GRU of the textbooks.

    inputs: (T, B, I) tensor, or any iterable of (B, I) tensors, one per timestep
    state:  (H_0,) with H_0 of shape (B, H)
    params: [W_xz, W_hz, b_z, W_xr, W_hr, b_r, W_xh, W_hh, b_h]
    Returns (outputs (T, B, H), (H_T,)).  The output layer (Y = H @ W_hq + b_q) of the
    textbook's language model is not part of the GRU and is left to the caller.
    """
    W_xz, W_hz, b_z, W_xr, W_hr, b_r, W_xh, W_hh, b_h = params
    (H,) = state
    outputs = []
    for X in inputs:
        Z = torch.sigmoid(X @ W_xz + H @ W_hz + b_z)
        R = torch.sigmoid(X @ W_xr + H @ W_hr + b_r)
        H_tilde = torch.tanh(X @ W_xh + (R * H) @ W_hh + b_h)
        H = Z * H + (1 - Z) * H_tilde
        outputs.append(H)
    return torch.stack(outputs), (H,)


# ----------------------------------------------------------------------------------------
# 2. One layer-direction, vectorised
# ----------------------------------------------------------------------------------------


def _input_projection(x: Tensor, w_ih: Tensor, b_ih: Optional[Tensor]) -> Tensor:
    """gi = x W_ih^T + b_ih for all rows at once.  x: (T, B, I) -> (T, B, 3H); packed
    (N, I) -> (N, 3H)."""
    x2 = x.reshape(math.prod(x.shape[:-1]), x.shape[-1])  # (not -1: I or H may be 0)
    gi = torch.addmm(b_ih, x2, w_ih.T) if b_ih is not None else x2 @ w_ih.T
    return gi.view(*x.shape[:-1], w_ih.shape[0])


def step_rows(x: Tensor, batch_sizes: Optional[Tensor]) -> Tuple[int, List[Tuple[int, int]]]:
    """(B, [(first row, rows) of each step]) of x's rows (see the module docstring): rows of
    the (T*B, .) view when dense, of the packed data when batch_sizes is given."""
    if batch_sizes is None:
        T, B = x.shape[0], x.shape[1]
        return B, [(t * B, B) for t in range(T)]
    sizes = [int(n) for n in batch_sizes.tolist()]
    firsts = [0]
    for n in sizes[:-1]:
        firsts.append(firsts[-1] + n)
    return (sizes[0] if sizes else 0), list(zip(firsts, sizes))


def _states_before(h0: Tensor, y2: Tensor, steps, resets: Optional[Tensor]) -> Tensor:
    """The state entering each row's step, laid out like y2 (N, H): h0's rows at step 0,
    else the same rows of the step before; zeros where a reset restarts the sequence."""
    parts = []
    prev = h0
    for t, (first, rows) in enumerate(steps):
        hp = prev[:rows]
        if resets is not None:
            hp = hp.masked_fill(resets[t, :rows].unsqueeze(1), 0)
        parts.append(hp)
        prev = y2[first:first + rows]
    return torch.cat(parts, 0)


def gru_layer_forward(
    x: Tensor,
    h0: Optional[Tensor],
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Optional[Tensor],
    b_hh: Optional[Tensor],
    reset_after: bool = True,
    batch_sizes: Optional[Tensor] = None,
    resets: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """Forward of one layer in one direction.

    x:    (T, B, I)   inputs, time-major
    h0:   (B, H)      initial state, or None for zeros
    w_ih: (3H, I)     rows r, z, n
    w_hh: (3H, H)     rows r, z, n
    b_ih, b_hh: (3H,) or None
    batch_sizes, resets: the sequence structure (module docstring); x is then (N, I)
    Returns
      y:  (T, B, H)   h_t for every step (y[-1] is h_n); (N, H) packed
      ws: (T, B, 4H)  saved for backward: [r, z, n, hn] where hn = W_hn h + b_hn
                      (reset_after=True) or W_hn (r * h) + b_hn (reset_after=False)
    """
    B, steps = step_rows(x, batch_sizes)
    H = w_hh.shape[1]
    N = math.prod(x.shape[:-1])
    gi = _input_projection(x, w_ih, b_ih).reshape(N, 3 * H)
    h = h0 if h0 is not None else x.new_zeros(B, H)
    y = x.new_empty(gi.shape[0], H)
    ws = x.new_empty(gi.shape[0], 4 * H)
    if not reset_after:
        w_hrz, w_hn = w_hh[: 2 * H], w_hh[2 * H :]
        b_hrz = b_hh[: 2 * H] if b_hh is not None else None
        b_hn = b_hh[2 * H :] if b_hh is not None else None
    for t, (first, rows) in enumerate(steps):
        h = h[:rows]
        if resets is not None:  # a new sequence starts here: its state enters as zeros
            h = h.masked_fill(resets[t, :rows].unsqueeze(1), 0)
        i_r, i_z, i_n = gi[first:first + rows].split([H, H, H], dim=1)
        if reset_after:
            gh = torch.addmm(b_hh, h, w_hh.T) if b_hh is not None else h @ w_hh.T
            h_r, h_z, hn = gh.split([H, H, H], dim=1)
            r = torch.sigmoid(i_r + h_r)
            z = torch.sigmoid(i_z + h_z)
            n = torch.tanh(i_n + r * hn)
        else:
            grz = torch.addmm(b_hrz, h, w_hrz.T) if b_hrz is not None else h @ w_hrz.T
            h_r, h_z = grz.split([H, H], dim=1)
            r = torch.sigmoid(i_r + h_r)
            z = torch.sigmoid(i_z + h_z)
            hn = torch.addmm(b_hn, r * h, w_hn.T) if b_hn is not None else (r * h) @ w_hn.T
            n = torch.tanh(i_n + hn)
        h = n + z * (h - n)  # = (1 - z) n + z h
        y[first:first + rows] = h
        ws[first:first + rows] = torch.cat([r, z, n, hn], dim=1)
    return y.view(*x.shape[:-1], H), ws.view(*x.shape[:-1], 4 * H)


# ----------------------------------------------------------------------------------------
# 3. The hand-written backward
# ----------------------------------------------------------------------------------------


def skipped_weight_grads(like: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """What a backward returns for dW_ih, dW_hh, db_ih, db_hh with need_dw=False: four
    distinct empty (0,) tensors of like's dtype and device (a registered op's outputs must
    not alias each other)."""
    return tuple(like.new_empty(0) for _ in range(4))


def gru_layer_backward(
    grad_y: Tensor,
    x: Tensor,
    h0: Optional[Tensor],
    w_ih: Tensor,
    w_hh: Tensor,
    y: Tensor,
    ws: Tensor,
    reset_after: bool = True,
    batch_sizes: Optional[Tensor] = None,
    resets: Optional[Tensor] = None,
    need_dx: bool = True,
    need_dw: bool = True,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Backward of ``gru_layer_forward`` (SPEC section 4).

    grad_y: (T, B, H)   dL/dy (the gradient of h_n already added into grad_y[-1])
    x, h0, w_ih, w_hh:  as in the forward (h0 may be None: zeros)
    y, ws:              the forward's outputs
    batch_sizes, resets: as in the forward (dense (T, B, .) or packed (N, .) layouts)
    Returns (dx (T,B,I), dh0 (B,H), dw_ih (3H,I), dw_hh (3H,H), db_ih (3H,), db_hh (3H,)).
    The bias gradients are returned even when the layer has no bias (the caller drops them).
    need_dx / need_dw False: dx / the four weight and bias gradients are not computed and
    come back as empty (0,) tensors (fusedgru/ops.py).
    """
    B, steps = step_rows(x, batch_sizes)
    I = x.shape[-1]
    H = w_hh.shape[1]
    N = math.prod(x.shape[:-1])
    y2, ws2, gy2 = y.reshape(N, H), ws.reshape(N, 4 * H), grad_y.reshape(N, H)
    h_prev = _states_before(h0 if h0 is not None else y.new_zeros(B, H), y2, steps, resets)
    dgi = []  # per step, reverse time: gradient of the pre-activations fed by W_ih x + b_ih
    dgh = []  # per step, reverse time: gradient of the pre-activations fed by W_hh (.) + b_hh
    dh = y.new_zeros(B, H)  # what step t+1 sends back to step t (rows past the step: zeros)
    w_hrz, w_hn = w_hh[: 2 * H], w_hh[2 * H :]
    for t in range(len(steps) - 1, -1, -1):
        first, rows = steps[t]
        g = gy2[first:first + rows] + dh[:rows]
        r, z, n, hn = ws2[first:first + rows].split([H, H, H, H], dim=1)
        h = h_prev[first:first + rows]
        da_n = g * (1 - z) * (1 - n * n)
        da_z = g * (h - n) * z * (1 - z)
        if reset_after:
            da_r = da_n * hn * r * (1 - r)
            dgh_t = torch.cat([da_r, da_z, da_n * r], dim=1)
            dh_rows = g * z + dgh_t @ w_hh
        else:
            d_rh = da_n @ w_hn
            da_r = d_rh * h * r * (1 - r)
            dgh_t = torch.cat([da_r, da_z, da_n], dim=1)
            dh_rows = g * z + d_rh * r + dgh_t[:, : 2 * H] @ w_hrz
        if resets is not None:  # h_{t-1} did not enter this step: no gradient reaches it
            dh_rows = dh_rows.masked_fill(resets[t, :rows].unsqueeze(1), 0)
        dh = dh_rows if rows == B else torch.cat([dh_rows, dh[rows:]], 0)
        dgi.append(torch.cat([da_r, da_z, da_n], dim=1))
        dgh.append(dgh_t)

    # After the loop: each gradient is one product over all rows.  (No in-place writes
    # anywhere, so autograd can differentiate this function: the double backward.)
    dgi2 = torch.cat(dgi[::-1])
    dgh2 = torch.cat(dgh[::-1])
    dx = (dgi2 @ w_ih).view(x.shape) if need_dx else x.new_empty(0)
    if not need_dw:
        return (dx, dh, *skipped_weight_grads(w_hh))
    dw_ih = dgi2.T @ x.reshape(N, I)
    if reset_after:
        dw_hh = dgh2.T @ h_prev
    else:
        # Rows r, z multiply h; rows n multiply r * h: one batched product over the gates.
        r_all = ws2[:, :H]
        rhs = torch.stack([h_prev, h_prev, r_all * h_prev])  # (3, N, H)
        dw_hh = torch.bmm(dgh2.view(N, 3, H).permute(1, 2, 0), rhs).reshape(3 * H, H)
    db_ih = dgi2.sum(0)
    db_hh = dgh2.sum(0)
    return dx, dh, dw_ih, dw_hh, db_ih, db_hh
