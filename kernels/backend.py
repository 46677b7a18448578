"""The "triton" row of the backend table: kernels/gru.py behind registered ops.

Shapes as in fusedgru/reference.py (T, B, I, H; G = 3 gates r, z, n):

    forward(x (T,B,I), h0 (B,H)?, w_ih (3H,I), w_hh (3H,H), b_ih (3H)?, b_hh (3H)?,
            reset_after) -> (y (T,B,H), ws (T,B,4H))
    backward(grad_y (T,B,H), x, h0?, w_ih, w_hh, y, ws, reset_after)
            -> (dx (T,B,I), dh0 (B,H), dw_ih (3H,I), dw_hh (3H,H), db_ih (3H), db_hh (3H))

Both take the optional sequence structure last (fusedgru/reference.py's docstring):
batch_sizes (packed rows: x, y, ws, grad_y and dx are (N, .), only the rows of each step
computed) or resets ((T, B) bool: the state entering a marked step is zeros); the kernels
take them through the SEQ flag (kernels/gru.py).

Around the Triton recurrence, the work over all rows at once (T*B, or the N packed rows)
is torch (cuBLAS): the input projection before the forward loop; dx, dW_ih, dW_hh and the
two bias gradients after the backward loop, each one matmul or one sum (deterministic).

Devices and dtypes: CUDA tensors in float32, float16 and bfloat16 (fp32 accumulation and
fp32 state).  float32's recurrence follows the flag torch.nn.GRU follows
(fusedgru.ops.rnn_tf32_allowed: torch.backends.cudnn.rnn.fp32_precision, "tf32" by
default; torch.backends.cudnn.allow_tf32 in older torch): TF32 tensor cores when it allows
TF32, else strict float32 through split-precision (3xTF32) tensor-core products
(kernels/gru.py, dot_precision).  The products around the recurrence (the input
projection, dx, dW_ih, dW_hh) are torch matmuls: they follow torch.backends.cuda.matmul
(strict float32 by default; cuDNN runs nn.GRU's under the RNN flag).  CPU tensors in
float32 only under TRITON_INTERPRET=1 (how CI runs the kernels; every dot in fp32 there).
float64 is refused: the kernels keep an fp32 state (use backend "reference" or "cpu").
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from fusedgru import ops, reference

from . import gru

__all__ = ["backend", "triton_forward", "triton_backward"]

_CUDA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INTERPRETER_DTYPES = (torch.float32,)


def _device_guard(t: Tensor):
    # Triton launches on the current device: make it the tensors' one.
    return torch.cuda.device(t.device) if t.device.type == "cuda" else _NullGuard()


class _NullGuard:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _check_sequence(x: Tensor, batch_sizes: Optional[Tensor], resets: Optional[Tensor]):
    """The sequence structure's own rules (the shapes of the rest are the caller's)."""
    if batch_sizes is None:
        return
    if resets is not None:
        raise ValueError("fusedgru triton backend: batch_sizes and resets cannot be combined")
    if (batch_sizes.dim() != 1 or batch_sizes.dtype != torch.int64
            or batch_sizes.device.type != "cpu"):
        raise ValueError(f"fusedgru triton backend: batch_sizes must be a 1-D int64 CPU tensor, "
                         f"got {tuple(batch_sizes.shape)} {batch_sizes.dtype} on "
                         f"{batch_sizes.device}")
    if x.dim() != 2:
        raise ValueError(f"fusedgru triton backend: with batch_sizes, x must be the packed "
                         f"(N, I) data, got {x.dim()} dimensions")
    if int(batch_sizes.sum()) != x.shape[0]:
        raise ValueError(f"fusedgru triton backend: x has {x.shape[0]} rows, but batch_sizes "
                         f"sums to {int(batch_sizes.sum())}")


def _prev_rows(batch_sizes: Tensor, device) -> Tensor:
    """Packed: for rows B..N-1 (steps t >= 1), the row of step t - 1 whose output is the
    state entering them (first(t-1) + b = row - batch_sizes[t-1])."""
    bs = batch_sizes
    shift = torch.repeat_interleave(bs[:-1], bs[1:])
    idx = torch.arange(int(bs[0]), int(bs.sum()), dtype=torch.int64) - shift
    return idx if torch.device(device).type == "cpu" else idx.to(device, non_blocking=True)


def _forward(x, h0, w_ih, w_hh, b_ih, b_hh, reset_after: bool, keep_ws: bool,
             batch_sizes=None, resets=None):
    _check_sequence(x, batch_sizes, resets)
    H = w_hh.shape[1]
    rows = x.shape[:-1]  # (T, B) dense, (N,) packed
    x2 = x.reshape(math.prod(rows), x.shape[-1])  # (not -1: I may be 0)
    # One matmul for the input projection of all rows: gi (T, B, 3H) or (N, 3H).
    gi = (torch.addmm(b_ih, x2, w_ih.T) if b_ih is not None else x2 @ w_ih.T).view(*rows, 3 * H)
    b_hh = b_hh.contiguous() if b_hh is not None else w_hh.new_zeros(3 * H)
    y = x.new_empty(*rows, H)
    ws = x.new_empty(*rows, 4 * H) if keep_ws else None
    with _device_guard(x):
        gru.launch_forward(gi, None if h0 is None else h0.contiguous(), w_hh.contiguous(),
                           b_hh, y, ws, reset_after, batch_sizes=batch_sizes, resets=resets)
    return y, ws


def triton_forward(
    x: Tensor,  # (T, B, I)
    h0: Optional[Tensor],  # (B, H) or None (zeros)
    w_ih: Tensor,  # (3H, I)
    w_hh: Tensor,  # (3H, H)
    b_ih: Optional[Tensor],  # (3H,) or None
    b_hh: Optional[Tensor],  # (3H,) or None
    reset_after: bool,
    batch_sizes: Optional[Tensor] = None,
    resets: Optional[Tensor] = None,
):
    """(y (T, B, H), ws (T, B, 4H)): the forward that keeps ws for the backward."""
    return _forward(x, h0, w_ih, w_hh, b_ih, b_hh, reset_after, True, batch_sizes, resets)


def triton_inference(x, h0, w_ih, w_hh, b_ih, b_hh, reset_after: bool, batch_sizes=None,
                     resets=None) -> Tensor:
    """y (T, B, H) alone, when nothing needs a gradient: no (T, B, 4H) ws is written."""
    return _forward(x, h0, w_ih, w_hh, b_ih, b_hh, reset_after, False, batch_sizes, resets)[0]


def triton_backward(
    grad_y: Tensor,  # (T, B, H); packed: (N, H)
    x: Tensor,  # (T, B, I); packed: (N, I)
    h0: Optional[Tensor],  # (B, H) or None
    w_ih: Tensor,  # (3H, I)
    w_hh: Tensor,  # (3H, H)
    y: Tensor,  # (T, B, H); packed: (N, H)
    ws: Tensor,  # (T, B, 4H); packed: (N, 4H)
    reset_after: bool,
    batch_sizes: Optional[Tensor] = None,  # (T,) int64 CPU
    resets: Optional[Tensor] = None,  # (T, B) bool
    need_dx: bool = True,  # False: dx not computed, an empty (0,) tensor (fusedgru/ops.py)
    need_dw: bool = True,  # False: likewise the four weight and bias gradients
):
    _check_sequence(x, batch_sizes, resets)
    I = x.shape[-1]
    H = w_hh.shape[1]
    rows = x.shape[:-1]  # (T, B) dense, (N,) packed
    N = math.prod(rows)
    if batch_sizes is None:
        B = x.shape[1]
    else:
        B = int(batch_sizes[0]) if batch_sizes.numel() else 0
    h0 = None if h0 is None else h0.contiguous()
    # The kernels index y and ws as dense arrays of rows: a strided view (a vmap slice,
    # a direct call of the op) must not be read as one.
    y, ws = y.contiguous(), ws.contiguous()
    dgi = x.new_empty(*rows, 3 * H)
    dgh = x.new_empty(*rows, 3 * H)
    dh0 = x.new_empty(B, H)
    with _device_guard(x):
        gru.launch_backward(grad_y.contiguous(), h0, w_hh.contiguous(), y, ws, dgi, dgh, dh0,
                            reset_after, batch_sizes=batch_sizes, resets=resets)

    # After the loop: each gradient is one product (or sum) over all rows (T*B, or N packed).
    dgi2 = dgi.view(N, 3 * H)
    dgh2 = dgh.view(N, 3 * H)
    dx = (dgi2 @ w_ih).view(x.shape) if need_dx else x.new_empty(0)
    if not need_dw:
        return (dx, dh0, *reference.skipped_weight_grads(w_hh))
    dw_ih = dgi2.T @ x.reshape(N, I)
    # The state entering each row (reference._states_before), split as the rows of step 0
    # (h0, or none: zeros) and the later rows (N - B of them), for dW_hh.
    y2 = y.view(N, H)
    if batch_sizes is None:
        h_later = y2[: N - B]  # y[:-1]: no copy
        if resets is not None:  # a reset row's state entered as zeros
            h_later = h_later.masked_fill(resets[1:].reshape(N - B, 1), False)
    elif N > B:  # the same rows of the step before: one gather
        h_later = y2.index_select(0, _prev_rows(batch_sizes, y.device))
    else:
        h_later = y2[:0]
    h_first = h0
    if h_first is not None and resets is not None:
        h_first = h_first.masked_fill(resets[0].unsqueeze(1), False)
    if reset_after:
        # dW_hh = sum_t dgh[t]^T h_{t-1}: the later rows, plus h0 at t = 0 by addmm.
        dw_hh = dgh2[B:].T @ h_later
        if h_first is not None:
            dw_hh.addmm_(dgh2[:B].T, h_first)
    else:
        h_prev = torch.cat([h_first if h_first is not None else y.new_zeros(B, H), h_later])
        rh = ws.view(N, 4 * H)[:, :H] * h_prev
        # Rows r, z multiply h; rows n multiply r * h: one batched product over the gates.
        rhs = torch.stack([h_prev, h_prev, rh])  # (3, N, H)
        dw_hh = torch.bmm(dgh2.view(N, 3, H).permute(1, 2, 0), rhs).reshape(3 * H, H)
    db_ih = dgi2.sum(0)
    db_hh = dgh2.sum(0)
    return dx, dh0, dw_ih, dw_hh, db_ih, db_hh


_fwd_op, _bwd_op = ops.register_backend_ops("triton", triton_forward, triton_backward)
_infer_op = ops.register_inference_op("triton", triton_inference)


class _TritonBackend:
    name = "triton"
    forward = staticmethod(_fwd_op)
    backward = staticmethod(_bwd_op)
    inference = staticmethod(_infer_op)

    @staticmethod
    def per_step_path(batch: int):
        """Within it, every launch uses the split kernels one unit per launch ("step"):
        no cooperative launch and no W_hh held on chip, whatever H is (what backend="auto"
        falls back to when a resident or persistent launch fails, fusedgru/function.py)."""
        return gru.force_step_path()

    @staticmethod
    def unavailable_reason() -> Optional[str]:
        if gru.INTERPRET_ERROR is not None:
            return gru.INTERPRET_ERROR
        if gru.INTERPRET or torch.cuda.is_available():
            return None
        return ("no CUDA device, and the Triton interpreter is off (set TRITON_INTERPRET=1 "
                "before fusedgru's kernels are imported to run them on CPU tensors)")

    @staticmethod
    def unsupported_reason(device_type: str, dtype: torch.dtype) -> Optional[str]:
        if dtype == torch.float64:
            return ("float64 is not supported: the Triton kernels keep an fp32 state; "
                    "use backend 'reference' (or 'cpu') for float64")
        if device_type == "cuda":
            if dtype not in _CUDA_DTYPES:
                return f"expected float32, float16 or bfloat16 on cuda, got {dtype}"
            return None
        if device_type == "cpu":
            if not gru.INTERPRET:
                return "CPU tensors run only under the Triton interpreter (TRITON_INTERPRET=1)"
            if dtype not in _INTERPRETER_DTYPES:
                return (f"the Triton interpreter runs float32 only (it computes 16-bit dots "
                        f"wrongly); got {dtype}: test 16-bit dtypes on a GPU")
            return None
        return f"Triton kernels run on cuda (or cpu under TRITON_INTERPRET=1), not {device_type}"


backend = _TritonBackend()
