"""Triton kernels of one GRU layer-direction, their launchers and the dispatcher.

Dimension legend (as in fusedgru/reference.py):
    T   timesteps            B   batch rows          I   input features
    H   hidden units         G   = 3 gates, stacked r (reset), z (update), n (new)
    BB  batch rows per program                                   (BLOCK_B)
    HP  H padded to a power of two >= 16, resident kernels       (BLOCK_H)
    BN  hidden columns per program, BK reduction chunk, split kernels (BLOCK_N, BLOCK_K)
Every tensor is contiguous and time-major; "[t]" below is the (B, .) slice of step t.
ws holds, per row and step, [r, z, n, hn] (4H) with hn = W_hn h + b_hn (reset_after=True)
or W_hn (r * h) + b_hn (reset_after=False): the backward needs nothing else.

Four kernels, one per job (constexpr flags pick the formulation, where h_{t-1} comes from,
the tanh, the dot precision and the strategy; no near-copies):

    _fwd_resident_kernel   forward, ONE launch for all T steps; a program owns BB rows and
                           all H columns; W_hh is loaded once, before the time loop, and
                           stays on chip with the fp32 state h.          grid (cdiv(B, BB),)
    _bwd_resident_kernel   the reverse-time loop of the backward, same scheme; dh is carried
                           in registers through W_hh^T.                 grid (cdiv(B, BB),)
    _fwd_split_kernel      large H: H split across programs, BN columns each; either one
                           unit (a step, or half a step for reset_after=False) per launch,
                           or (PERSIST) all steps after the first in one launch with a grid
                           barrier between units.        grid (cdiv(B, BB), cdiv(H, BN))
    _bwd_split_kernel      large H: the backward's units (a stage of a step), likewise.

The input projection (x W_ih^T + b_ih for all T*B rows) is one torch matmul before the
forward loop; dx, dW_ih, dW_hh and the biases are torch matmuls / sums over all T*B rows
after the backward loop (deterministic: no atomics on data; the only atomic is the
persistent launches' barrier counter).

Precision (DOT_PREC, chosen per launcher call by dot_precision): float32 on a GPU follows
the flag torch.nn.GRU follows (torch.backends.cudnn.rnn.fp32_precision; cudnn.allow_tf32 in
older torch): "tf32" when TF32 is allowed (torch's default), else strict float32 as
"tf32x3", three TF32 tensor-core products of split operands (the fp32 FMA path "ieee" stays
selectable for timing: force_strict_fp32 / FUSEDGRU_TRITON_STRICT_FP32).  16-bit weights
take the tensor cores in their own type; the state and every accumulation are fp32.

Offsets: row indices are int64 before they are multiplied by H, 3H or 4H, so tensors with
more than 2^31 elements are addressed correctly; t is widened to int64 before t * B.

Sequence structure (fusedgru/reference.py's docstring), the constexpr SEQ of every kernel:
    0  dense: the code above, nothing more (seq_ptr and rs_ptr are unused dummies).
    1  packed rows (batch_sizes): x, gi, y, ws, grad_y, dgi, dgh are (N, .) rows; step t's
       rows are [first(t), first(t) + rows(t)), read from a (T + 1 + B,) int64 table made
       once per call on the host (_seq_table: first(0..T), then each batch position's
       number of steps).  Masks b < rows(t) keep the loads and stores of rows past a
       sequence's end off; the state entering row b of step t is y[first(t-1) + b].  The
       resident kernels loop only over their block's steps (the table's step count of its
       first row); a launch per unit has cdiv(rows(t), BB) row blocks; the persistent
       launches keep all blocks (the barrier needs them) and a block past step t's rows
       skips that unit.  dh of rows not yet active (going back in time) is zero.
    2  resets (dense): a (T, B) uint8 mask; rows with resets[t] load h_{t-1} as zeros
       (masked loads: the forward's operand, the backward's h for da_z / da_r) and the dh
       sent from step t to step t-1 is zeroed there.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

import triton
import triton.language as tl
from triton.language.extra import libdevice

from fusedgru.ops import rnn_tf32_allowed

__all__ = [
    "INTERPRET",
    "INTERPRET_ERROR",
    "Config",
    "choose_config",
    "force_config",
    "force_step_path",
    "max_coresident_programs",
    "LARGE_H_STRATEGY",
    "resident_max",
    "dot_precision",
    "gpu_dot_precision",
    "STRICT_FP32_PRECISIONS",
    "strict_fp32_precision",
    "force_strict_fp32",
    "launch_forward",
    "launch_backward",
]


def _interpreter_error() -> Optional[str]:
    """Why TRITON_INTERPRET=1 cannot work in this process, or None.  Triton picks the
    interpreter when each @triton.jit function is defined; its own library functions
    (tl.sigmoid, ...) are defined when triton is first imported, which torch may do long
    before fusedgru's kernels load.  Set too late, the kernels below are interpreted but
    call compiled-only library functions ("Cannot call @triton.jit'd outside of the scope of
    a kernel")."""
    try:
        import triton.language.standard as std
        from triton.runtime.jit import JITFunction
    except Exception:  # noqa: BLE001 - a triton without these modules: nothing to check
        return None
    if any(type(v) is JITFunction for v in vars(std).values()):
        return ("TRITON_INTERPRET=1 was set after triton had been imported (torch imports it); "
                "set it in the environment before Python starts")
    return None


# The interpreter is chosen when the @triton.jit functions below are defined (import time).
_INTERPRET_ASKED = os.environ.get("TRITON_INTERPRET", "0") == "1"
INTERPRET_ERROR = _interpreter_error() if _INTERPRET_ASKED else None
INTERPRET = _INTERPRET_ASKED and INTERPRET_ERROR is None


def _interpreter_index_fix() -> bool:
    """Under the interpreter a scalar kernel argument (T, B, H) is a tl.tensor over a
    1-element numpy array.  triton 3.6's interpreter gives it ``__index__ = int(data)``,
    which numpy >= 2.5 refuses for a 1-d array, so ``for t in range(T)`` fails ("only
    0-dimensional arrays can be converted to Python scalars"); triton 3.8 squeezes first.
    Where this triton's patch has the problem (tried on a probe, not read from a version),
    wrap it to squeeze as 3.8 does.  Returns whether the wrap was installed."""
    try:
        import numpy as np
        from triton.runtime import interpreter as interp

        patch = interp._patch_lang_tensor
    except (ImportError, AttributeError):  # another interpreter layout: nothing to fix
        return False

    class _Scope:
        def set_attr(self, obj, name, value):
            setattr(obj, name, value)

    class _Probe:
        pass

    try:
        patch(_Probe, _Scope())
        probe = _Probe.__new__(_Probe)
        probe.handle = type("H", (), {"data": np.array([3], dtype=np.int32)})()
        if int(_Probe.__index__(probe)) == 3:
            return False  # works as it is
    except TypeError:
        pass
    except Exception:  # noqa: BLE001 - not the failure this fixes: leave triton alone
        return False

    def index(self):
        return int(self.handle.data.squeeze())

    class _FixingScope:
        """Passes triton's patches through, with the squeezing __index__ in place of its
        own: the broken one is never installed, not even for a moment (3.6 re-patches on
        every nested jit call, and tests/test_triton_concurrent.py runs programs in
        threads that could see it)."""

        def __init__(self, scope):
            self.scope = scope

        def set_attr(self, obj, name, value):
            self.scope.set_attr(obj, name, index if name == "__index__" else value)

    def _patch_lang_tensor(tensor, scope):
        patch(tensor, _FixingScope(scope))
        if getattr(tensor, "__index__", None) is not index:
            scope.set_attr(tensor, "__index__", index)

    interp._patch_lang_tensor = _patch_lang_tensor
    return True


INTERPRET_INDEX_FIX = _interpreter_index_fix() if INTERPRET else False


# ----------------------------------------------------------------------------------------
# Elementwise helpers
# ----------------------------------------------------------------------------------------


@triton.jit
def _tanh(x, LIBDEVICE_TANH: tl.constexpr):
    # The interpreter has no libdevice.  There: an odd Taylor polynomial for |x| < 1/8 and
    # (1 - e) / (1 + e), e = exp(-2|x|), above; both within a few fp32 ulps *relative*
    # (2 sigmoid(2x) - 1 is only absolutely accurate and lost relative accuracy near 0).
    if LIBDEVICE_TANH:
        out = libdevice.tanh(x)
    else:
        ax = tl.abs(x)
        e = tl.exp(-2.0 * ax)
        x2 = x * x
        small = ax * (1.0 + x2 * (-0.3333333333333333 + x2 * (0.13333333333333333
                                                          + x2 * -0.05396825396825397)))
        t = tl.where(ax < 0.125, small, (1.0 - e) / (1.0 + e))
        out = tl.where(x < 0.0, -t, t)
    return out


# ----------------------------------------------------------------------------------------
# Resident kernels: one launch for all T steps, W_hh in registers
# ----------------------------------------------------------------------------------------


# T changes between calls: do not specialise on it (no recompiles for T = 1 or 16k).
@triton.jit(do_not_specialize=["T"])
def _fwd_resident_kernel(
    gi_ptr,  # (T, B, 3H)  x W_ih^T + b_ih, precomputed
    h0_ptr,  # (B, H)      initial state, read only when HAS_H0
    w_ptr,  # (3H, H)     W_hh, rows r, z, n
    b_ptr,  # (3H,)       b_hh (zeros when the layer has no bias)
    y_ptr,  # (T, B, H)   out: h_t
    ws_ptr,  # (T, B, 4H)  out: r, z, n, hn; not touched when not STORE_WS
    seq_ptr,  # SEQ 1: (T + 1 + B,) int64, see _seq_table; else unused (any pointer)
    rs_ptr,  # SEQ 2: (T, B) uint8 resets; else unused (any pointer)
    T,
    B,
    H,
    RESET_AFTER: tl.constexpr,
    HAS_H0: tl.constexpr,
    SEQ: tl.constexpr,  # 0: dense; 1: packed rows (seq_ptr); 2: dense with resets (rs_ptr)
    STORE_WS: tl.constexpr,  # False: inference, nothing will need ws (y only)
    LIBDEVICE_TANH: tl.constexpr,
    DOT_PREC: tl.constexpr,  # "tf32", "tf32x3" (strict fp32, split) or "ieee" (FMA, also the
    #                          interpreter's); ignored for 16-bit weights (dot_precision)
    BLOCK_B: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    pid = tl.program_id(0)
    o_b = pid.to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)  # (BB,) batch rows
    o_h = tl.arange(0, BLOCK_H)  # (HP,) hidden columns
    m_b = o_b < B
    m_h = o_h < H
    m_bh = m_b[:, None] & m_h[None, :]
    m_hh = m_h[:, None] & m_h[None, :]
    wdt = w_ptr.dtype.element_ty

    # W_g^T as (K=HP, N=HP) tiles, element [k, j] = W[g*H + j, k]; loaded once.
    p_wt = w_ptr + o_h[None, :] * H + o_h[:, None]
    b_wr = tl.load(p_wt, mask=m_hh, other=0.0)
    b_wz = tl.load(p_wt + H * H, mask=m_hh, other=0.0)
    b_wn = tl.load(p_wt + 2 * H * H, mask=m_hh, other=0.0)
    b_br = tl.load(b_ptr + o_h, mask=m_h, other=0.0).to(tl.float32)[None, :]
    b_bz = tl.load(b_ptr + H + o_h, mask=m_h, other=0.0).to(tl.float32)[None, :]
    b_bn = tl.load(b_ptr + 2 * H + o_h, mask=m_h, other=0.0).to(tl.float32)[None, :]

    if HAS_H0:
        h = tl.load(h0_ptr + o_b[:, None] * H + o_h[None, :], mask=m_bh, other=0.0)
        h = h.to(tl.float32)  # (BB, HP) fp32 state
    else:
        h = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)

    n_steps = T
    if SEQ == 1:  # the steps of this block's first (longest) row: later ones have no row here
        n_steps = tl.load(seq_ptr + T + 1 + pid * BLOCK_B).to(tl.int32)
    for t in range(n_steps):
        m_t = m_bh  # (BB, HP) the rows of step t
        if SEQ == 1:  # step t's rows: [first, first + rows) of the packed rows
            first = tl.load(seq_ptr + t)
            m_t = (o_b < tl.load(seq_ptr + t + 1) - first)[:, None] & m_h[None, :]
            row = (o_b + first)[:, None]  # (BB, 1) int64
        else:
            row = (o_b + tl.cast(t, tl.int64) * B)[:, None]  # (BB, 1) int64 row of the T*B rows
        if SEQ == 2:  # a new sequence starts at step t: its state enters as zeros
            rs = tl.load(rs_ptr + tl.cast(t, tl.int64) * B + o_b, mask=m_b, other=0)
            h = tl.where((rs != 0)[:, None], 0.0, h)
        p_gi = gi_ptr + row * (3 * H) + o_h[None, :]
        i_r = tl.load(p_gi, mask=m_t, other=0.0).to(tl.float32)
        i_z = tl.load(p_gi + H, mask=m_t, other=0.0).to(tl.float32)
        i_n = tl.load(p_gi + 2 * H, mask=m_t, other=0.0).to(tl.float32)
        hc = h.to(wdt)
        r = tl.sigmoid(i_r + tl.dot(hc, b_wr, input_precision=DOT_PREC) + b_br)
        z = tl.sigmoid(i_z + tl.dot(hc, b_wz, input_precision=DOT_PREC) + b_bz)
        if RESET_AFTER:
            hn = tl.dot(hc, b_wn, input_precision=DOT_PREC) + b_bn
            n = _tanh(i_n + r * hn, LIBDEVICE_TANH)
        else:
            hn = tl.dot((r * h).to(wdt), b_wn, input_precision=DOT_PREC) + b_bn
            n = _tanh(i_n + hn, LIBDEVICE_TANH)
        h = tl.where(m_t, n + z * (h - n), 0.0)  # (1 - z) n + z h; padding stays 0

        tl.store(y_ptr + row * H + o_h[None, :], h.to(y_ptr.dtype.element_ty), mask=m_t)
        if STORE_WS:
            p_ws = ws_ptr + row * (4 * H) + o_h[None, :]
            wsdt = ws_ptr.dtype.element_ty
            tl.store(p_ws, r.to(wsdt), mask=m_t)
            tl.store(p_ws + H, z.to(wsdt), mask=m_t)
            tl.store(p_ws + 2 * H, n.to(wsdt), mask=m_t)
            tl.store(p_ws + 3 * H, hn.to(wsdt), mask=m_t)


@triton.jit(do_not_specialize=["T"])
def _bwd_resident_kernel(
    gy_ptr,  # (T, B, H)   dL/dy (dL/dh_n already added into [T-1])
    h0_ptr,  # (B, H)      initial state, read only when HAS_H0
    w_ptr,  # (3H, H)     W_hh
    y_ptr,  # (T, B, H)   forward outputs (h_{t-1} = y[t-1])
    ws_ptr,  # (T, B, 4H)  forward's saved r, z, n, hn
    dgi_ptr,  # (T, B, 3H)  out: gradient of the pre-activations fed by W_ih x + b_ih
    dgh_ptr,  # (T, B, 3H)  out: gradient of the pre-activations fed by W_hh (.) + b_hh
    dh0_ptr,  # (B, H)      out: dL/dh0
    seq_ptr,  # SEQ 1: (T + 1 + B,) int64, see _seq_table
    rs_ptr,  # SEQ 2: (T, B) uint8 resets
    T,
    B,
    H,
    RESET_AFTER: tl.constexpr,
    HAS_H0: tl.constexpr,
    SEQ: tl.constexpr,  # as in _fwd_resident_kernel
    DOT_PREC: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    pid = tl.program_id(0)
    o_b = pid.to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)  # (BB,)
    o_h = tl.arange(0, BLOCK_H)  # (HP,)
    m_b = o_b < B
    m_h = o_h < H
    m_bh = m_b[:, None] & m_h[None, :]
    m_hh = m_h[:, None] & m_h[None, :]
    wdt = w_ptr.dtype.element_ty

    # W_g as (K=HP, N=HP) tiles, element [j, k] = W[g*H + j, k]: dh += da_g W_g.
    p_w = w_ptr + o_h[:, None] * H + o_h[None, :]
    b_wr = tl.load(p_w, mask=m_hh, other=0.0)
    b_wz = tl.load(p_w + H * H, mask=m_hh, other=0.0)
    b_wn = tl.load(p_w + 2 * H * H, mask=m_hh, other=0.0)

    dh = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)  # what step t+1 sends to step t
    n_steps = T
    if SEQ == 1:  # steps past this block's longest row: no row here, dh stays zero
        n_steps = tl.load(seq_ptr + T + 1 + pid * BLOCK_B).to(tl.int32)
    for tt in range(n_steps):
        t = n_steps - 1 - tt
        m_t = m_bh  # (BB, HP) the rows of step t
        m_hp = m_bh  # rows whose h_{t-1} entered step t
        if SEQ == 1:
            first = tl.load(seq_ptr + t)
            m_t = (o_b < tl.load(seq_ptr + t + 1) - first)[:, None] & m_h[None, :]
            m_hp = m_t
            row = (o_b + first)[:, None]  # (BB, 1) int64
            # the rows of step t - 1 (t = 0: masked off, index kept in range)
            row_p = (o_b + tl.load(seq_ptr + tl.maximum(t - 1, 0)))[:, None]
        else:
            row = (o_b + tl.cast(t, tl.int64) * B)[:, None]  # (BB, 1) int64
            row_p = row - B
        if SEQ == 2:  # reset rows: h_{t-1} did not enter step t
            rs = tl.load(rs_ptr + tl.cast(t, tl.int64) * B + o_b, mask=m_b, other=0)
            m_hp = m_t & (rs == 0)[:, None]
        g = tl.load(gy_ptr + row * H + o_h[None, :], mask=m_t, other=0.0).to(tl.float32) + dh
        p_ws = ws_ptr + row * (4 * H) + o_h[None, :]
        r = tl.load(p_ws, mask=m_t, other=0.0).to(tl.float32)
        z = tl.load(p_ws + H, mask=m_t, other=0.0).to(tl.float32)
        n = tl.load(p_ws + 2 * H, mask=m_t, other=0.0).to(tl.float32)
        hn = tl.load(p_ws + 3 * H, mask=m_t, other=0.0).to(tl.float32)
        # h_{t-1}: y[t-1] for t > 0, else h0 (or zeros); masks keep t = 0 off y[-1].
        h = tl.load(y_ptr + row_p * H + o_h[None, :], mask=m_hp & (t > 0), other=0.0)
        h = h.to(tl.float32)
        if HAS_H0:
            h += tl.load(h0_ptr + o_b[:, None] * H + o_h[None, :], mask=m_hp & (t == 0),
                         other=0.0).to(tl.float32)

        da_n = g * (1.0 - z) * (1.0 - n * n)
        da_z = g * (h - n) * z * (1.0 - z)
        if RESET_AFTER:
            da_r = da_n * hn * r * (1.0 - r)
            dgh_n = da_n * r
            dh = g * z + tl.dot(dgh_n.to(wdt), b_wn, input_precision=DOT_PREC)
        else:
            d_rh = tl.dot(da_n.to(wdt), b_wn, input_precision=DOT_PREC)  # W_hn^T da_n
            da_r = d_rh * h * r * (1.0 - r)
            dgh_n = da_n
            dh = g * z + d_rh * r
        dh += tl.dot(da_r.to(wdt), b_wr, input_precision=DOT_PREC)
        dh += tl.dot(da_z.to(wdt), b_wz, input_precision=DOT_PREC)
        dh = tl.where(m_hp, dh, 0.0)  # resets: no gradient reaches h_{t-1}

        gdt = dgi_ptr.dtype.element_ty
        p_dgi = dgi_ptr + row * (3 * H) + o_h[None, :]
        p_dgh = dgh_ptr + row * (3 * H) + o_h[None, :]
        tl.store(p_dgi, da_r.to(gdt), mask=m_t)
        tl.store(p_dgi + H, da_z.to(gdt), mask=m_t)
        tl.store(p_dgi + 2 * H, da_n.to(gdt), mask=m_t)
        tl.store(p_dgh, da_r.to(gdt), mask=m_t)
        tl.store(p_dgh + H, da_z.to(gdt), mask=m_t)
        tl.store(p_dgh + 2 * H, dgh_n.to(gdt), mask=m_t)

    tl.store(dh0_ptr + o_b[:, None] * H + o_h[None, :], dh.to(dh0_ptr.dtype.element_ty),
             mask=m_bh)


# ----------------------------------------------------------------------------------------
# Split kernels (large H): H split across programs
# ----------------------------------------------------------------------------------------
# A unit of work is one phase of a forward step (reset_after=False has two: r and z, then
# n and h_t) or one stage of a backward step.  Every program must finish a unit before any
# starts the next, because the next one reads all H columns of what it wrote.  The two
# strategies differ only in how they get that barrier:
#     "step"        one launch per unit (PERSIST=False): stream order is the barrier
#     "persistent"  one launch for the remaining units (PERSIST=True): a grid-wide barrier
#                   in the kernel (an atomic counter); every program must be co-resident,
#                   so the launcher allows at most one program per SM and launches the
#                   grid as a cooperative one (COOPERATIVE_LAUNCH): the driver then either
#                   runs all programs at once, whatever else is running on other streams,
#                   or refuses the launch with an error, never a hang
# The per-unit code is shared (_fwd_unit, _bwd_unit).  What other programs wrote in the
# launch (h_{t-1}, r, dgh) is read with plain loads after the barrier: its acquire (by one
# thread, then __syncthreads) orders them, and on sm_90 it invalidates L1 (CCTL.IVALL in
# the SASS, checked by tests/test_triton_aot.py), so no stale line is read.


@triton.jit
def _grid_barrier(bar_ptr, target):
    """Adds this program's arrival to the int32 counter at bar_ptr (zero at launch) and
    waits until it reaches ``target``.  All threads' earlier stores are ordered before the
    arrival (__syncthreads, then a release add) and the other programs' stores before any
    later load (acquire loads, then __syncthreads).  Triton issues a scalar atomic from one
    thread and broadcasts its result through shared memory."""
    tl.debug_barrier()
    tl.atomic_add(bar_ptr, 1, sem="release", scope="gpu")
    seen = tl.atomic_add(bar_ptr, 0, sem="acquire", scope="gpu")
    while seen < target:
        seen = tl.atomic_add(bar_ptr, 0, sem="acquire", scope="gpu")
    tl.debug_barrier()


@triton.jit
def _fwd_unit(
    gi_ptr,  # (T, B, 3H)
    h0_ptr,  # (B, H)      read when PREV == 1
    w_ptr,  # (3H, H)
    b_ptr,  # (3H,)       b_hh (zeros when the layer has no bias)
    y_ptr,  # (T, B, H)   out: y[t]; y[t-1] read when PREV == 2 and not STATE_BUF
    ws_ptr,  # (T, B, 4H)  out: ws[ws_t]; PHASE 2 reads r, z written by PHASE 1
    hs_ptr,  # (2, B, H) fp32  STATE_BUF: h_t into [t % 2], h_{t-1} from [(t - 1) % 2]
    seq_ptr,  # SEQ 1: (T + 1 + B,) int64, see _seq_table
    rs_ptr,  # SEQ 2: (T, B) uint8 resets
    t,  # the step
    ws_t,  # the step's ws row block: t, or 0 when ws is one step's (1, B, 4H) scratch
    B,
    H,
    PHASE: tl.constexpr,  # 0: the whole step (reset_after=True); reset_after=False:
    #                        1: r and z, 2: hn = W_hn (r*h) + b_hn, n and h_t
    PREV: tl.constexpr,  # h_{t-1} is 0: zeros, 1: h0, 2: the previous step's output
    STATE_BUF: tl.constexpr,  # 16-bit y: the state is carried in fp32 through hs
    SEQ: tl.constexpr,  # 0: dense; 1: packed rows; 2: dense with resets
    LIBDEVICE_TANH: tl.constexpr,
    DOT_PREC: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_n = tl.program_id(1)
    o_b = pid_b.to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)  # (BB,) rows
    o_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,) output columns
    if SEQ == 1:  # step t's rows: [first, first + rows) of the packed rows
        first = tl.load(seq_ptr + t)
        m_b = o_b < tl.load(seq_ptr + t + 1) - first
        row = (o_b + first)[:, None]  # (BB, 1) int64 rows of step t
        # ws: step t's rows, or the scratch's (ws_t is 0 then, and at t = 0 first is 0)
        row_ws = (o_b + tl.where(ws_t > 0, first, 0))[:, None]
    else:
        m_b = o_b < B
        row = (o_b + tl.cast(t, tl.int64) * B)[:, None]  # (BB, 1) int64 rows of step t
        row_ws = (o_b + tl.cast(ws_t, tl.int64) * B)[:, None]  # (BB, 1) int64 rows of ws
    m_n = o_n < H
    m_bn = m_b[:, None] & m_n[None, :]
    m_hp = m_b  # (BB,) rows whose h_{t-1} enters step t
    if SEQ == 2:  # a new sequence starts at step t: its state enters as zeros (masked off)
        rs = tl.load(rs_ptr + tl.cast(t, tl.int64) * B + o_b, mask=m_b, other=0)
        m_hp = m_b & (rs == 0)
    wdt = w_ptr.dtype.element_ty
    if PREV == 2:
        if STATE_BUF:
            p_hp = hs_ptr + (o_b + ((t - 1) % 2) * B)[:, None] * H  # (BB, 1) row starts
        elif SEQ == 1:  # the same rows of step t - 1
            p_hp = y_ptr + (o_b + tl.load(seq_ptr + t - 1))[:, None] * H
        else:
            p_hp = y_ptr + (row - B) * H
    else:
        p_hp = h0_ptr + o_b[:, None] * H

    acc_r = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
    acc_z = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
    acc_n = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
    if PREV != 0:  # with h_{t-1} = 0 every product is 0
        for k0 in range(0, H, BLOCK_K):
            o_k = k0 + tl.arange(0, BLOCK_K)  # (BK,)
            m_k = o_k < H
            a = tl.load(p_hp + o_k[None, :], mask=m_hp[:, None] & m_k[None, :], other=0.0)
            if PHASE == 2:  # the operand is r * h_{t-1}
                r_k = tl.load(ws_ptr + row_ws * (4 * H) + o_k[None, :],
                              mask=m_b[:, None] & m_k[None, :], other=0.0)
                a = a.to(tl.float32) * r_k.to(tl.float32)
            a = a.to(wdt)  # (BB, BK)
            m_kn = m_k[:, None] & m_n[None, :]
            # W_g^T tile (BK, BN), element [k, j] = W[g*H + j, k]
            if PHASE == 2:
                b_w = tl.load(w_ptr + (2 * H + o_n[None, :]) * H + o_k[:, None], mask=m_kn,
                              other=0.0)
                acc_n += tl.dot(a, b_w, input_precision=DOT_PREC)
            else:
                b_w = tl.load(w_ptr + o_n[None, :] * H + o_k[:, None], mask=m_kn, other=0.0)
                acc_r += tl.dot(a, b_w, input_precision=DOT_PREC)
                b_w = tl.load(w_ptr + (H + o_n[None, :]) * H + o_k[:, None], mask=m_kn,
                              other=0.0)
                acc_z += tl.dot(a, b_w, input_precision=DOT_PREC)
                if PHASE == 0:
                    b_w = tl.load(w_ptr + (2 * H + o_n[None, :]) * H + o_k[:, None],
                                  mask=m_kn, other=0.0)
                    acc_n += tl.dot(a, b_w, input_precision=DOT_PREC)

    p_gi = gi_ptr + row * (3 * H) + o_n[None, :]
    p_ws = ws_ptr + row_ws * (4 * H) + o_n[None, :]
    wsdt = ws_ptr.dtype.element_ty
    if PHASE == 1:
        i_r = tl.load(p_gi, mask=m_bn, other=0.0).to(tl.float32)
        i_z = tl.load(p_gi + H, mask=m_bn, other=0.0).to(tl.float32)
        b_r = tl.load(b_ptr + o_n, mask=m_n, other=0.0).to(tl.float32)[None, :]
        b_z = tl.load(b_ptr + H + o_n, mask=m_n, other=0.0).to(tl.float32)[None, :]
        tl.store(p_ws, tl.sigmoid(i_r + acc_r + b_r).to(wsdt), mask=m_bn)
        tl.store(p_ws + H, tl.sigmoid(i_z + acc_z + b_z).to(wsdt), mask=m_bn)
    else:
        if PREV != 0:
            h = tl.load(p_hp + o_n[None, :], mask=m_hp[:, None] & m_n[None, :],
                        other=0.0).to(tl.float32)
        else:
            h = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
        i_n = tl.load(p_gi + 2 * H, mask=m_bn, other=0.0).to(tl.float32)
        hn = acc_n + tl.load(b_ptr + 2 * H + o_n, mask=m_n, other=0.0).to(tl.float32)[None, :]
        if PHASE == 0:
            i_r = tl.load(p_gi, mask=m_bn, other=0.0).to(tl.float32)
            i_z = tl.load(p_gi + H, mask=m_bn, other=0.0).to(tl.float32)
            b_r = tl.load(b_ptr + o_n, mask=m_n, other=0.0).to(tl.float32)[None, :]
            b_z = tl.load(b_ptr + H + o_n, mask=m_n, other=0.0).to(tl.float32)[None, :]
            r = tl.sigmoid(i_r + acc_r + b_r)
            z = tl.sigmoid(i_z + acc_z + b_z)
            n = _tanh(i_n + r * hn, LIBDEVICE_TANH)
            tl.store(p_ws, r.to(wsdt), mask=m_bn)
            tl.store(p_ws + H, z.to(wsdt), mask=m_bn)
        else:
            z = tl.load(p_ws + H, mask=m_bn, other=0.0).to(tl.float32)
            n = _tanh(i_n + hn, LIBDEVICE_TANH)
        h = n + z * (h - n)
        tl.store(y_ptr + row * H + o_n[None, :], h.to(y_ptr.dtype.element_ty), mask=m_bn)
        if STATE_BUF:
            tl.store(hs_ptr + (o_b + (t % 2) * B)[:, None] * H + o_n[None, :], h, mask=m_bn)
        tl.store(p_ws + 2 * H, n.to(wsdt), mask=m_bn)
        tl.store(p_ws + 3 * H, hn.to(wsdt), mask=m_bn)


# t_begin, t_end and ws_keep change between launches: do not specialise on them.
@triton.jit(do_not_specialize=["t_begin", "t_end", "ws_keep"])
def _fwd_split_kernel(
    gi_ptr,  # (T, B, 3H)
    h0_ptr,  # (B, H)
    w_ptr,  # (3H, H)
    b_ptr,  # (3H,)
    y_ptr,  # (T, B, H)   out
    ws_ptr,  # (T, B, 4H) out, or (1, B, 4H) scratch when ws_keep == 0
    hs_ptr,  # (2, B, H) fp32  state ping-pong (STATE_BUF)
    bar_ptr,  # (1,) int32  barrier counter, zero at launch (PERSIST)
    seq_ptr,  # SEQ 1: (T + 1 + B,) int64, see _seq_table; else unused (any pointer)
    rs_ptr,  # SEQ 2: (T, B) uint8 resets; else unused (any pointer)
    t_begin,  # PERSIST: steps [t_begin, t_end), t_begin >= 1; else the one step t_begin
    t_end,
    ws_keep,  # 1: ws keeps every step; 0: one step's scratch
    B,
    H,
    RESET_AFTER: tl.constexpr,
    PHASE: tl.constexpr,  # not PERSIST: the unit (see _fwd_unit); PERSIST: unused
    PREV: tl.constexpr,  # not PERSIST: where h_{t-1} comes from; PERSIST: always 2
    STATE_BUF: tl.constexpr,
    SEQ: tl.constexpr,  # 0: dense; 1: packed rows (seq_ptr); 2: dense with resets (rs_ptr)
    PERSIST: tl.constexpr,
    LIBDEVICE_TANH: tl.constexpr,
    DOT_PREC: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    if PERSIST:
        nprog = tl.num_programs(0) * tl.num_programs(1)
        UNITS: tl.constexpr = 1 if RESET_AFTER else 2
        for t in range(t_begin, t_end):
            k = t - t_begin  # steps done in this launch
            for u in tl.static_range(UNITS):
                # PHASE 0 is the whole step (reset_after=True), else phases 1 and 2.
                if SEQ == 1:  # a block past step t's rows skips the unit (not the barrier)
                    rows = tl.load(seq_ptr + t + 1) - tl.load(seq_ptr + t)
                    if tl.program_id(0) * BLOCK_B < rows:
                        _fwd_unit(gi_ptr, h0_ptr, w_ptr, b_ptr, y_ptr, ws_ptr, hs_ptr, seq_ptr,
                                  rs_ptr, t, t * ws_keep, B, H, u + UNITS - 1, 2, STATE_BUF,
                                  SEQ, LIBDEVICE_TANH, DOT_PREC, BLOCK_B, BLOCK_N, BLOCK_K)
                else:
                    _fwd_unit(gi_ptr, h0_ptr, w_ptr, b_ptr, y_ptr, ws_ptr, hs_ptr, seq_ptr,
                              rs_ptr, t, t * ws_keep, B, H, u + UNITS - 1, 2, STATE_BUF, SEQ,
                              LIBDEVICE_TANH, DOT_PREC, BLOCK_B, BLOCK_N, BLOCK_K)
                # Nothing in this launch reads what the last unit of the last step wrote.
                if (t + 1 < t_end) or (u + 1 < UNITS):
                    _grid_barrier(bar_ptr, (UNITS * k + u + 1) * nprog)
    else:
        # (packed: the launcher's grid covers step t_begin's rows only)
        _fwd_unit(gi_ptr, h0_ptr, w_ptr, b_ptr, y_ptr, ws_ptr, hs_ptr, seq_ptr, rs_ptr, t_begin,
                  t_begin * ws_keep, B, H, PHASE, PREV, STATE_BUF, SEQ, LIBDEVICE_TANH,
                  DOT_PREC, BLOCK_B, BLOCK_N, BLOCK_K)


@triton.jit
def _dgh_times_w(
    dgh_ptr,  # (T, B, 3H)
    w_ptr,  # (3H, H)
    s_row,  # (BB, 1) int64 rows of the step whose dgh is read
    m_b,  # (BB,) row mask
    o_n,  # (BN,) int64 columns of h produced
    m_n,  # (BN,) column mask
    H,
    G0: tl.constexpr,
    G1: tl.constexpr,
    DOT_PREC: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """(BB, BN) fp32: sum over gates g in [G0, G1) of dgh[s][:, gH:(g+1)H] @ W_g[:, o_n]."""
    wdt = w_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
    for gate in tl.static_range(G0, G1):
        for k0 in range(0, H, BLOCK_K):
            o_k = k0 + tl.arange(0, BLOCK_K)  # (BK,) rows of gate `gate` of W_hh
            m_k = o_k < H
            a = tl.load(dgh_ptr + s_row * (3 * H) + gate * H + o_k[None, :],
                        mask=m_b[:, None] & m_k[None, :], other=0.0)
            b_w = tl.load(w_ptr + (gate * H + o_k[:, None]).to(tl.int64) * H + o_n[None, :],
                          mask=m_k[:, None] & m_n[None, :], other=0.0)
            acc += tl.dot(a.to(wdt), b_w, input_precision=DOT_PREC)
    return acc


@triton.jit
def _bwd_unit(
    gy_ptr,  # (T, B, H)
    h0_ptr,  # (B, H)      read when HAS_H0
    w_ptr,  # (3H, H)
    y_ptr,  # (T, B, H)
    ws_ptr,  # (T, B, 4H)
    dgi_ptr,  # (T, B, 3H)  out (its [t] slice)
    dgh_ptr,  # (T, B, 3H)  out (its [t] slice); [t+1] read by STAGE 0
    g_ptr,  # (2, B, H) fp32  g = dL/dh_t of step t in [t % 2] (STAGE 0 writes it and
    #                          reads the step after's from [(t + 1) % 2]; STAGE 1 reads it)
    p_ptr,  # (B, H) fp32  reset_after=False: g z + d_rh r of a step (out in STAGE 1)
    dh0_ptr,  # (B, H)      out when not HAS_CUR
    seq_ptr,  # SEQ 1: (T + 1 + B,) int64, see _seq_table
    rs_ptr,  # SEQ 2: (T, B) uint8 resets
    t,  # the step (-1 for the unit that only writes dh0)
    B,
    H,
    STAGE: tl.constexpr,  # 0: dh_t from step t+1 (if HAS_NEXT), then step t's pointwise
    #                        gradients (if HAS_CUR); 1 (reset_after=False): d_rh = W_hn^T da_n
    #                        of step t, da_r, and g z + d_rh r for the step before
    RESET_AFTER: tl.constexpr,
    HAS_NEXT: tl.constexpr,
    HAS_CUR: tl.constexpr,
    HAS_H0: tl.constexpr,
    SEQ: tl.constexpr,  # 0: dense; 1: packed rows; 2: dense with resets
    DOT_PREC: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_n = tl.program_id(1)
    o_b = pid_b.to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)  # (BB,)
    o_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,) columns of h
    m_n = o_n < H
    if SEQ == 1:
        # Step t's rows (t = -1, the dh0 unit: step 0's, all B), those of step t + 1 (read
        # when HAS_NEXT) and the first row of step t - 1 (read when t > 0); indices kept
        # inside the table where the value is not used.
        tc = tl.maximum(t, 0)
        first = tl.load(seq_ptr + tc)
        m_b = o_b < tl.load(seq_ptr + tc + 1) - first
        row = (o_b + first)[:, None]  # (BB, 1) int64 rows of step t
        row_p = (o_b + tl.load(seq_ptr + tl.maximum(t - 1, 0)))[:, None]
        if HAS_NEXT:
            first_n = tl.load(seq_ptr + t + 1)
            m_b_next = o_b < tl.load(seq_ptr + t + 2) - first_n
            row_n = (o_b + first_n)[:, None]
        else:
            m_b_next = m_b
            row_n = row
    else:
        m_b = o_b < B
        m_b_next = m_b
        row = (o_b + tl.cast(t, tl.int64) * B)[:, None]  # (BB, 1) int64 rows of step t
        row_p = row - B
        row_n = row + B
    m_bn = m_b[:, None] & m_n[None, :]
    m_bn_next = m_b_next[:, None] & m_n[None, :]  # rows of step t + 1 (within step t's)
    m_hp = m_bn  # rows whose h_{t-1} entered step t
    if SEQ == 2:
        if HAS_CUR or STAGE == 1:
            rs = tl.load(rs_ptr + tl.cast(t, tl.int64) * B + o_b, mask=m_b, other=0)
            m_hp = m_bn & (rs == 0)[:, None]
    o_bn = o_b[:, None] * H + o_n[None, :]  # (BB, BN) offsets into (B, H) buffers
    # g of step t and of the step after: offsets into the (2, B, H) ping-pong
    o_g_cur = (o_b + ((t + 2) % 2) * B)[:, None] * H + o_n[None, :]
    o_g_next = (o_b + ((t + 1) % 2) * B)[:, None] * H + o_n[None, :]
    gdt = dgi_ptr.dtype.element_ty

    # The product with W_hh^T over gates [G0, G1): of dgh[t+1] in STAGE 0, of dgh[t] in 1.
    if STAGE == 0:
        acc = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
        if HAS_NEXT:
            if RESET_AFTER:  # all three gates
                acc = _dgh_times_w(dgh_ptr, w_ptr, row_n, m_b_next, o_n, m_n, H, 0, 3,
                                   DOT_PREC, BLOCK_B, BLOCK_N, BLOCK_K)
            else:  # r and z; the n gate went through STAGE 1 of step t+1
                acc = _dgh_times_w(dgh_ptr, w_ptr, row_n, m_b_next, o_n, m_n, H, 0, 2,
                                   DOT_PREC, BLOCK_B, BLOCK_N, BLOCK_K)
    else:
        acc = _dgh_times_w(dgh_ptr, w_ptr, row, m_b, o_n, m_n, H, 2, 3, DOT_PREC, BLOCK_B,
                           BLOCK_N, BLOCK_K)

    if STAGE == 0:
        dh = acc
        if HAS_NEXT:
            if RESET_AFTER:  # + g_{t+1} z_{t+1}
                z1 = tl.load(ws_ptr + row_n * (4 * H) + H + o_n[None, :], mask=m_bn_next,
                             other=0.0)
                dh += tl.load(g_ptr + o_g_next, mask=m_bn_next, other=0.0) * z1.to(tl.float32)
            else:  # + g_{t+1} z_{t+1} + d_rh r_{t+1}, made by STAGE 1 of step t+1
                dh += tl.load(p_ptr + o_bn, mask=m_bn_next, other=0.0)
            if SEQ == 2:  # a reset at step t+1: no gradient reaches h_t through it
                rs_n = tl.load(rs_ptr + tl.cast(t + 1, tl.int64) * B + o_b, mask=m_b, other=0)
                dh = tl.where((rs_n != 0)[:, None], 0.0, dh)
        if HAS_CUR:
            g = tl.load(gy_ptr + row * H + o_n[None, :], mask=m_bn, other=0.0).to(tl.float32)
            g += dh
            p_ws = ws_ptr + row * (4 * H) + o_n[None, :]
            z = tl.load(p_ws + H, mask=m_bn, other=0.0).to(tl.float32)
            n = tl.load(p_ws + 2 * H, mask=m_bn, other=0.0).to(tl.float32)
            h = tl.load(y_ptr + row_p * H + o_n[None, :], mask=m_hp & (t > 0), other=0.0)
            h = h.to(tl.float32)
            if HAS_H0:
                h += tl.load(h0_ptr + o_bn, mask=m_hp & (t == 0), other=0.0).to(tl.float32)
            da_n = g * (1.0 - z) * (1.0 - n * n)
            da_z = g * (h - n) * z * (1.0 - z)
            p_dgi = dgi_ptr + row * (3 * H) + o_n[None, :]
            p_dgh = dgh_ptr + row * (3 * H) + o_n[None, :]
            if RESET_AFTER:
                r = tl.load(p_ws, mask=m_bn, other=0.0).to(tl.float32)
                hn = tl.load(p_ws + 3 * H, mask=m_bn, other=0.0).to(tl.float32)
                da_r = da_n * hn * r * (1.0 - r)
                tl.store(p_dgi, da_r.to(gdt), mask=m_bn)
                tl.store(p_dgh, da_r.to(gdt), mask=m_bn)
                tl.store(p_dgh + 2 * H, (da_n * r).to(gdt), mask=m_bn)
            else:
                tl.store(p_dgh + 2 * H, da_n.to(gdt), mask=m_bn)
            tl.store(p_dgi + H, da_z.to(gdt), mask=m_bn)
            tl.store(p_dgi + 2 * H, da_n.to(gdt), mask=m_bn)
            tl.store(p_dgh + H, da_z.to(gdt), mask=m_bn)
            tl.store(g_ptr + o_g_cur, g, mask=m_bn)
        else:
            tl.store(dh0_ptr + o_bn, dh.to(dh0_ptr.dtype.element_ty), mask=m_bn)
    else:
        d_rh = acc  # W_hn^T da_n of step t
        p_ws = ws_ptr + row * (4 * H) + o_n[None, :]
        r = tl.load(p_ws, mask=m_bn, other=0.0).to(tl.float32)
        z = tl.load(p_ws + H, mask=m_bn, other=0.0).to(tl.float32)
        h = tl.load(y_ptr + row_p * H + o_n[None, :], mask=m_hp & (t > 0), other=0.0)
        h = h.to(tl.float32)
        if HAS_H0:
            h += tl.load(h0_ptr + o_bn, mask=m_hp & (t == 0), other=0.0).to(tl.float32)
        da_r = d_rh * h * r * (1.0 - r)
        tl.store(dgi_ptr + row * (3 * H) + o_n[None, :], da_r.to(gdt), mask=m_bn)
        tl.store(dgh_ptr + row * (3 * H) + o_n[None, :], da_r.to(gdt), mask=m_bn)
        g = tl.load(g_ptr + o_g_cur, mask=m_bn, other=0.0)
        tl.store(p_ptr + o_bn, g * z + d_rh * r, mask=m_bn)


# t_hi and n_steps change between launches: do not specialise on them.
@triton.jit(do_not_specialize=["t_hi", "n_steps"])
def _bwd_split_kernel(
    gy_ptr,  # (T, B, H)
    h0_ptr,  # (B, H)
    w_ptr,  # (3H, H)
    y_ptr,  # (T, B, H)
    ws_ptr,  # (T, B, 4H)
    dgi_ptr,  # (T, B, 3H)  out
    dgh_ptr,  # (T, B, 3H)  out
    g_ptr,  # (2, B, H) fp32  scratch (see _bwd_unit)
    p_ptr,  # (B, H) fp32     scratch (reset_after=False)
    dh0_ptr,  # (B, H)      out
    bar_ptr,  # (1,) int32  barrier counter, zero at launch (PERSIST)
    seq_ptr,  # SEQ 1: (T + 1 + B,) int64, see _seq_table; else unused (any pointer)
    rs_ptr,  # SEQ 2: (T, B) uint8 resets; else unused (any pointer)
    t_hi,  # not PERSIST: the unit's step; PERSIST: the first (highest) step of the launch
    n_steps,  # PERSIST: steps t_hi, t_hi - 1, ..., t_hi - n_steps + 1 = 0, then dh0
    B,
    H,
    STAGE: tl.constexpr,  # not PERSIST: the unit (see _bwd_unit)
    RESET_AFTER: tl.constexpr,
    HAS_NEXT: tl.constexpr,  # not PERSIST (PERSIST: every step has one)
    HAS_CUR: tl.constexpr,  # not PERSIST
    HAS_H0: tl.constexpr,
    SEQ: tl.constexpr,  # 0: dense; 1: packed rows (seq_ptr); 2: dense with resets (rs_ptr)
    PERSIST: tl.constexpr,
    DOT_PREC: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    if PERSIST:
        nprog = tl.num_programs(0) * tl.num_programs(1)
        UNITS: tl.constexpr = 1 if RESET_AFTER else 2
        for i in range(n_steps):
            t = t_hi - i
            for u in tl.static_range(UNITS):
                if SEQ == 1:  # a block past step t's rows (so past t+1's) skips the unit
                    rows = tl.load(seq_ptr + t + 1) - tl.load(seq_ptr + t)
                    if tl.program_id(0) * BLOCK_B < rows:
                        _bwd_unit(gy_ptr, h0_ptr, w_ptr, y_ptr, ws_ptr, dgi_ptr, dgh_ptr, g_ptr,
                                  p_ptr, dh0_ptr, seq_ptr, rs_ptr, t, B, H, u, RESET_AFTER, True,
                                  True, HAS_H0, SEQ, DOT_PREC, BLOCK_B, BLOCK_N, BLOCK_K)
                else:
                    _bwd_unit(gy_ptr, h0_ptr, w_ptr, y_ptr, ws_ptr, dgi_ptr, dgh_ptr, g_ptr,
                              p_ptr, dh0_ptr, seq_ptr, rs_ptr, t, B, H, u, RESET_AFTER, True,
                              True, HAS_H0, SEQ, DOT_PREC, BLOCK_B, BLOCK_N, BLOCK_K)
                _grid_barrier(bar_ptr, (UNITS * i + u + 1) * nprog)
        # dh0 = what step 0 sends back (t = -1: only its HAS_NEXT part runs)
        _bwd_unit(gy_ptr, h0_ptr, w_ptr, y_ptr, ws_ptr, dgi_ptr, dgh_ptr, g_ptr, p_ptr,
                  dh0_ptr, seq_ptr, rs_ptr, t_hi - n_steps, B, H, 0, RESET_AFTER, True, False,
                  HAS_H0, SEQ, DOT_PREC, BLOCK_B, BLOCK_N, BLOCK_K)
    else:
        # (packed: the launcher's grid covers step t_hi's rows only, all B for dh0)
        _bwd_unit(gy_ptr, h0_ptr, w_ptr, y_ptr, ws_ptr, dgi_ptr, dgh_ptr, g_ptr, p_ptr,
                  dh0_ptr, seq_ptr, rs_ptr, t_hi, B, H, STAGE, RESET_AFTER, HAS_NEXT, HAS_CUR,
                  HAS_H0, SEQ, DOT_PREC, BLOCK_B, BLOCK_N, BLOCK_K)


# ----------------------------------------------------------------------------------------
# Dispatcher
# ----------------------------------------------------------------------------------------

# Largest padded H for which the resident kernels keep W_hh (3 x HP x HP) on chip.  From
# the ahead-of-time compile for sm_90 (python -m fusedgru.kernels.aot; table in
# benchmarks/NOTES-triton.md): Triton stages the loop-invariant W_hh tiles in shared memory.
# HP = 128 takes 100 KB (16-bit, fwd and bwd, 215 registers, no spill) but 200 KB (fwd)
# and 328 KB (bwd, over the 227 KB limit) in fp32, so fp32 stops at 64 (52 / 116 KB).
# Whether resident beats the split kernels at the boundary is still to be timed on a GPU.
RESIDENT_MAX = {torch.float32: 64, torch.float16: 128, torch.bfloat16: 128}

# Above RESIDENT_MAX: "step" (a launch per unit) or "persistent" (one launch, a grid
# barrier in the kernel) where the grid fits one program per SM.  The choice is to be made
# by measurement on a GPU (benchmarks/large_h.py); until then the launch-per-unit path,
# which needs no co-residency, is the default.  FUSEDGRU_TRITON_LARGE_H overrides it.
LARGE_H_STRATEGIES = ("step", "persistent")
LARGE_H_STRATEGY = os.environ.get("FUSEDGRU_TRITON_LARGE_H", "step")
if LARGE_H_STRATEGY not in LARGE_H_STRATEGIES:
    raise ValueError(f"FUSEDGRU_TRITON_LARGE_H must be one of {LARGE_H_STRATEGIES}, "
                     f"got {LARGE_H_STRATEGY!r}")

# The barrier counter is an int32 that counts every program's arrival at every barrier.
_BARRIER_COUNT_MAX = 2**31 - 1


@dataclass(frozen=True)
class Config:
    """How one layer-direction is launched.

    strategy "resident":   one launch per pass, block_h = HP >= H (BLOCK_H).
    strategy "step":       split kernels, one launch per unit (per step, two per step for
                           reset_after=False); block_h = BN columns per program, block_k =
                           BK reduction chunk.
    strategy "persistent": split kernels, the first step as "step", all later steps in one
                           launch with a grid barrier between units; same blocks.
    """

    strategy: str
    block_b: int
    block_h: int
    block_k: int = 0
    num_warps: int = 4

    def __post_init__(self):
        if self.strategy not in ("resident", "step", "persistent"):
            raise ValueError(f"Config.strategy must be 'resident', 'step' or 'persistent', "
                             f"got {self.strategy!r}")

    def programs(self, B: int, H: int) -> int:
        """Programs per launch of the split kernels for a batch of B rows."""
        return triton.cdiv(B, self.block_b) * triton.cdiv(H, self.block_h)


def resident_max(dtype: torch.dtype) -> int:
    return RESIDENT_MAX.get(dtype, 64)


_forced: Optional[Config] = None


@contextlib.contextmanager
def force_config(config: Optional[Config]):
    """Within the block, every launch uses ``config`` (tests drive the split kernels with
    small blocks through the registered ops this way)."""
    global _forced
    saved, _forced = _forced, config
    try:
        yield
    finally:
        _forced = saved


def _split_blocks(B: int, dtype: torch.dtype = torch.float32) -> dict:
    """The split kernels' blocks.  Many programs per step matter more than tile efficiency
    at small B (latency bound): BN = 32 gives H / 32 programs per row block.

    float32 (every precision: tf32, tf32x3, ieee): 16 rows, BK = 32, 8 warps, the largest
    blocks at which no split kernel spills (sm_90 AOT, ptxas' stack frame: at 32 rows, BK =
    64 and 4 warps every float32 unit spilled, up to 2 KB in the persistent backward, and
    tf32x3's second operand split needs more registers still).  16-bit: 16 or 32 rows,
    BK = 64, 4 warps."""
    if dtype == torch.float32:
        return dict(block_b=16, block_h=32, block_k=32, num_warps=8)
    return dict(block_b=16 if B <= 16 else 32, block_h=32, block_k=64, num_warps=4)


_forced_step = False


@contextlib.contextmanager
def force_step_path():
    """Within the block, every launch uses the split kernels one unit per launch ("step")
    with the blocks choose_config gives that batch and dtype, whatever H is (the backend's
    per_step_path: no cooperative launch, no W_hh held on chip)."""
    global _forced_step
    saved, _forced_step = _forced_step, True
    try:
        yield
    finally:
        _forced_step = saved


def choose_config(B: int, H: int, dtype: torch.dtype, max_programs: int = 0,
                  large_h: Optional[str] = None) -> Config:
    """The configuration the backend launches for a batch of B rows and H hidden units.

    max_programs: how many programs can be co-resident (one per SM; 0: unknown), which
    "persistent" needs.  large_h: the strategy above RESIDENT_MAX (default
    LARGE_H_STRATEGY).  Every value this returns is compiled ahead of time by
    tests/test_triton_aot.py.
    """
    if _forced is not None:
        return _forced
    blocks = _split_blocks(B, dtype)
    if _forced_step:
        return Config("step", **blocks)
    hp = max(16, triton.next_power_of_2(H))
    if hp <= resident_max(dtype):
        return Config("resident", block_b=16, block_h=hp, num_warps=4 if hp <= 32 else 8)
    if (large_h or LARGE_H_STRATEGY) == "persistent":
        cfg = Config("persistent", **blocks)
        if 0 < cfg.programs(B, H) <= max_programs:
            return cfg
    return Config("step", **blocks)


def max_coresident_programs(device: torch.device) -> int:
    """Programs of a persistent launch that are sure to run at the same time on ``device``:
    one per SM (every configuration fits one SM, checked by the AOT compile), 1 under the
    interpreter (it runs programs one after another)."""
    if INTERPRET or device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def strategy_config(strategy: str, B: int, H: int, dtype: torch.dtype,
                    device: torch.device) -> Config:
    """The split configuration of large-H ``strategy`` at (B, H) on ``device``, whatever
    LARGE_H_STRATEGY is: what tests and benchmarks force to run one strategy.  ValueError,
    saying why, where the strategy does not apply: H fits the resident kernels, or a
    persistent grid has more programs than can be co-resident."""
    if strategy not in LARGE_H_STRATEGIES:
        raise ValueError(f"strategy must be one of {LARGE_H_STRATEGIES}, got {strategy!r}")
    cap = max_coresident_programs(device)
    cfg = choose_config(B, H, dtype, cap, strategy)
    if cfg.strategy == strategy:
        return cfg
    if cfg.strategy == "resident":
        why = f"H={H} is resident for {dtype}"
    else:
        why = (f"{Config(strategy, **_split_blocks(B, dtype)).programs(B, H)} programs > "
               f"{cap} co-resident")
    raise ValueError(f"no {strategy!r} configuration at B={B}, H={H} on {device}: {why}")


# Launch option of the persistent split launches (a field of triton's CUDAOptions since
# triton 3.3, present in 3.6 and 3.8; the interpreter ignores it): cuLaunchKernelEx with
# CU_LAUNCH_ATTRIBUTE_COOPERATIVE, which guarantees the co-residency the grid barrier needs.
COOPERATIVE_LAUNCH = "launch_cooperative_grid"


def _check_persistent(cfg: Config, B: int, H: int, units: int, device: torch.device) -> None:
    """A persistent launch whose programs cannot all be resident would never return."""
    n = cfg.programs(B, H)
    cap = max_coresident_programs(device)
    if n > cap:
        raise RuntimeError(
            f"persistent Triton launch of {n} programs (B={B}, H={H}, block_b={cfg.block_b}, "
            f"block_h={cfg.block_h}) but at most {cap} can be co-resident on {device}"
            + (" (the interpreter runs one program at a time)" if INTERPRET else ""))
    if units * n > _BARRIER_COUNT_MAX:
        raise RuntimeError(f"persistent Triton launch of {units} barrier phases x {n} programs "
                           f"overflows the int32 barrier counter; use strategy 'step'")


# Strict float32 on a GPU (the flag nn.GRU follows says "ieee"): tl.dot's input precision.
#     "tf32x3"  split precision on the tensor cores (the 3xTF32 trick, Triton's F32DotTC
#               pass): a = a_hi + a_lo with a_hi = a rounded to TF32, the same for b, and
#               a b ~ a_hi b_hi + a_hi b_lo + a_lo b_hi in three TF32 MMAs with fp32
#               accumulation (a_lo b_lo, ~2^-22 relative, dropped).  The default.
#     "ieee"    the fp32 FMA path (no tensor cores): kept, private, so that one GPU run can
#               time both; FUSEDGRU_TRITON_STRICT_FP32=ieee or force_strict_fp32("ieee").
STRICT_FP32_PRECISIONS = ("tf32x3", "ieee")
_STRICT_ENV = "FUSEDGRU_TRITON_STRICT_FP32"
_strict_forced: Optional[str] = None


def strict_fp32_precision() -> str:
    """The input precision of strict float32 dots on a GPU: force_strict_fp32's, else
    $FUSEDGRU_TRITON_STRICT_FP32's (read at every launcher call), else "tf32x3"."""
    prec = _strict_forced or os.environ.get(_STRICT_ENV) or "tf32x3"
    if prec not in STRICT_FP32_PRECISIONS:
        raise ValueError(f"{_STRICT_ENV} must be one of {STRICT_FP32_PRECISIONS}, got {prec!r}")
    return prec


@contextlib.contextmanager
def force_strict_fp32(precision: Optional[str]):
    """Within the block, strict float32 dots on a GPU use ``precision`` ("tf32x3" or "ieee";
    None: the default).  Private: for the benchmarks and tests that compare the two."""
    global _strict_forced
    if precision is not None and precision not in STRICT_FP32_PRECISIONS:
        raise ValueError(f"precision must be one of {STRICT_FP32_PRECISIONS}, got {precision!r}")
    saved, _strict_forced = _strict_forced, precision
    try:
        yield
    finally:
        _strict_forced = saved


def gpu_dot_precision(dtype: torch.dtype) -> str:
    """tl.dot's input_precision on a GPU for weights of ``dtype``.

    float32 follows the flag torch.nn.GRU follows there (ops.rnn_tf32_allowed:
    torch.backends.cudnn.rnn.fp32_precision, "tf32" by default; cudnn.allow_tf32 in older
    torch), so that a default float32 FusedGRU computes what a default float32 nn.GRU does:
    "tf32" when it allows TF32, else strict float32 (strict_fp32_precision: "tf32x3").
    16-bit weights: "ieee" (ignored: their dots take the tensor cores in their own type)."""
    if dtype == torch.float32:
        return "tf32" if rnn_tf32_allowed() else strict_fp32_precision()
    return "ieee"


def dot_precision(dtype: torch.dtype, device_type: str) -> str:
    """The launchers' DOT_PREC: gpu_dot_precision on a GPU; under the interpreter (CPU
    tensors), which computes every dot in numpy's float32, "ieee"."""
    if device_type == "cuda" and not INTERPRET:
        return gpu_dot_precision(dtype)
    return "ieee"


def _libdevice_tanh() -> bool:
    return not INTERPRET


# Tests set this to run the fp32 state ping-pong (STATE_BUF) with float32 y too: the
# interpreter computes in fp32 only, so 16-bit y (where it is on) cannot run there.
_FORCE_STATE_BUF = False


def _dummy(t: Optional[Tensor], like: Tensor) -> Tensor:
    return t if t is not None else like


def _config_for(B: int, H: int, dtype: torch.dtype, device: torch.device) -> Config:
    return choose_config(B, H, dtype, max_coresident_programs(device))


@dataclass
class _Seq:
    """The sequence structure of one launcher call, as the kernels take it."""

    flag: int  # the kernels' SEQ: 0 dense, 1 packed, 2 resets
    T: int
    B: int
    sizes: Optional[list]  # packed: rows of each step (host ints); else None
    table: Optional[Tensor]  # packed: _seq_table on the device
    resets: Optional[Tensor]  # resets: (T, B) uint8 on the device

    def rows(self, t: int) -> int:
        return self.B if self.sizes is None else self.sizes[t]

    def args(self, dummy: Tensor):
        """(seq_ptr, rs_ptr): the unused one is ``dummy`` (any tensor of the call, so a
        dense call allocates nothing and keeps its pointer types)."""
        return (self.table if self.table is not None else dummy,
                self.resets if self.resets is not None else dummy)


def _seq_table(sizes: list, device: torch.device) -> Tensor:
    """(T + 1 + B,) int64 on ``device``, built on the host once per call: first(t) for
    t = 0..T (first(T) = N), then for each batch position b its number of steps (the steps
    t with rows(t) > b; the resident kernels read their block's first row's to stop)."""
    T, B = len(sizes), sizes[0]
    firsts = [0] * (T + 1)
    for t, n in enumerate(sizes):
        firsts[t + 1] = firsts[t] + n
    steps = [0] * B
    t = T
    for b in range(B):  # sizes is non-increasing: walk the steps down as b grows
        while t > 0 and sizes[t - 1] <= b:
            t -= 1
        steps[b] = t
    table = torch.tensor(firsts + steps, dtype=torch.int64)
    return table if device.type == "cpu" else table.to(device, non_blocking=True)


def _sequence(batch_sizes: Optional[Tensor], resets: Optional[Tensor], dense_tb,
              device: torch.device) -> _Seq:
    """The launchers' view of batch_sizes / resets (fusedgru/reference.py's docstring);
    dense_tb: (T, B) of a dense call."""
    if batch_sizes is not None:
        if resets is not None:
            raise ValueError("batch_sizes and resets cannot be combined (packed rows start "
                             "from h0; split the sequences at their resets before packing)")
        sizes = [int(n) for n in batch_sizes.tolist()]
        if any(n < 1 for n in sizes) or any(a < b for a, b in zip(sizes, sizes[1:])):
            raise ValueError(f"batch_sizes must be >= 1 and non-increasing, got {sizes}")
        if not sizes:
            return _Seq(1, 0, 0, sizes, None, None)
        return _Seq(1, len(sizes), sizes[0], sizes, _seq_table(sizes, device), None)
    T, B = dense_tb
    if resets is not None:
        if tuple(resets.shape) != (T, B) or resets.dtype != torch.bool \
                or resets.device != device:
            raise ValueError(f"resets must be a bool (T, B) = {(T, B)} tensor on {device}, "
                             f"got {resets.dtype} {tuple(resets.shape)} on {resets.device}")
        return _Seq(2, T, B, None, None, resets.contiguous().view(torch.uint8))
    return _Seq(0, T, B, None, None, None)


# ----------------------------------------------------------------------------------------
# Launchers: outputs are arguments, so tests can hand in NaN-filled buffers
# ----------------------------------------------------------------------------------------


def launch_forward(
    gi: Tensor,  # (T, B, 3H)  x W_ih^T + b_ih; packed: (N, 3H)
    h0: Optional[Tensor],  # (B, H) or None
    w_hh: Tensor,  # (3H, H)
    b_hh: Tensor,  # (3H,)   zeros when the layer has no bias
    y: Tensor,  # (T, B, H)   out; packed: (N, H)
    ws: Optional[Tensor],  # (T, B, 4H)  out; None: inference, y only; packed: (N, 4H)
    reset_after: bool,
    config: Optional[Config] = None,
    batch_sizes: Optional[Tensor] = None,  # (T,) int64 CPU: the rows are packed
    resets: Optional[Tensor] = None,  # (T, B) bool on gi's device (dense only)
) -> None:
    """Runs the forward recurrence into y and ws (every element is written; packed: every
    row of the packed layout, no other).  With ws None nothing of r, z, n, hn reaches memory
    beyond one step's scratch (the split kernels pass r and z between a step's two units
    through it)."""
    seq = _sequence(batch_sizes, resets, gi.shape[:2], gi.device)
    T, B = seq.T, seq.B
    H = w_hh.shape[1]
    if T == 0 or B == 0:
        return
    cfg = config or _config_for(B, H, w_hh.dtype, gi.device)
    prec = dot_precision(w_hh.dtype, gi.device.type)
    h0_arg = _dummy(h0, y)
    seq_arg, rs_arg = seq.args(y)
    nb = triton.cdiv(B, cfg.block_b)
    if cfg.strategy == "resident":
        _fwd_resident_kernel[(nb,)](
            gi, h0_arg, w_hh, b_hh, y, y if ws is None else ws, seq_arg, rs_arg, T, B, H,
            RESET_AFTER=reset_after, HAS_H0=h0 is not None, SEQ=seq.flag,
            STORE_WS=ws is not None, LIBDEVICE_TANH=_libdevice_tanh(),
            DOT_PREC=prec, BLOCK_B=cfg.block_b, BLOCK_H=cfg.block_h, num_warps=cfg.num_warps,
        )
        return
    nn = triton.cdiv(H, cfg.block_h)
    keep = ws is not None
    if not keep:
        ws = y.new_empty(1, B, 4 * H)  # one step's r, z, n, hn, reused by every step
    # 16-bit y: carry the state in fp32 (two (B, H) buffers, step t writes [t % 2]).
    state_buf = y.dtype != torch.float32 or _FORCE_STATE_BUF
    hs = torch.empty(2, B, H, device=y.device, dtype=torch.float32) if state_buf else y
    persist = cfg.strategy == "persistent" and T > 1
    units = 1 if reset_after else 2
    if persist:
        _check_persistent(cfg, B, H, units * (T - 1), y.device)
        bar = torch.zeros(1, device=y.device, dtype=torch.int32)
    else:
        bar = torch.empty(1, device=y.device, dtype=torch.int32)  # unused; int32 as AOT-checked

    def launch(t_begin, t_end, phase, prev, persistent):
        # A launch per unit covers the unit's step's rows (packed: fewer as t grows); the
        # persistent launch all B (its blocks past a step's rows skip that step).
        rows = B if persistent else seq.rows(t_begin)
        _fwd_split_kernel[(triton.cdiv(rows, cfg.block_b), nn)](
            gi, h0_arg, w_hh, b_hh, y, ws, hs, bar, seq_arg, rs_arg, t_begin, t_end, int(keep),
            B, H, RESET_AFTER=reset_after, PHASE=phase, PREV=prev, STATE_BUF=state_buf,
            SEQ=seq.flag, PERSIST=persistent, LIBDEVICE_TANH=_libdevice_tanh(), DOT_PREC=prec,
            BLOCK_B=cfg.block_b, BLOCK_N=cfg.block_h, BLOCK_K=cfg.block_k,
            num_warps=cfg.num_warps, **{COOPERATIVE_LAUNCH: persistent},
        )

    # Step 0 takes h_{t-1} from h0 or zeros: launches of its own (PREV is a constexpr).
    phases = (0,) if reset_after else (1, 2)
    for phase in phases:
        launch(0, 1, phase, 1 if h0 is not None else 0, False)
    if persist:
        launch(1, T, 0, 2, True)
        return
    for t in range(1, T):
        for phase in phases:
            launch(t, t + 1, phase, 2, False)


def launch_backward(
    grad_y: Tensor,  # (T, B, H); packed: (N, H)
    h0: Optional[Tensor],  # (B, H) or None
    w_hh: Tensor,  # (3H, H)
    y: Tensor,  # (T, B, H); packed: (N, H)
    ws: Tensor,  # (T, B, 4H); packed: (N, 4H)
    dgi: Tensor,  # (T, B, 3H)  out; packed: (N, 3H)
    dgh: Tensor,  # (T, B, 3H)  out; packed: (N, 3H)
    dh0: Tensor,  # (B, H)      out
    reset_after: bool,
    config: Optional[Config] = None,
    batch_sizes: Optional[Tensor] = None,  # (T,) int64 CPU: the rows are packed
    resets: Optional[Tensor] = None,  # (T, B) bool on grad_y's device (dense only)
) -> None:
    """Runs the reverse-time loop into dgi, dgh and dh0 (every element is written)."""
    seq = _sequence(batch_sizes, resets, grad_y.shape[:2], grad_y.device)
    T, B, H = seq.T, seq.B, w_hh.shape[1]
    if B == 0:
        return
    if T == 0:
        dh0.zero_()
        return
    cfg = config or _config_for(B, H, w_hh.dtype, grad_y.device)
    prec = dot_precision(w_hh.dtype, grad_y.device.type)
    h0_arg = _dummy(h0, dh0)
    seq_arg, rs_arg = seq.args(dh0)
    nb = triton.cdiv(B, cfg.block_b)
    if cfg.strategy == "resident":
        _bwd_resident_kernel[(nb,)](
            grad_y, h0_arg, w_hh, y, ws, dgi, dgh, dh0, seq_arg, rs_arg, T, B, H,
            RESET_AFTER=reset_after, HAS_H0=h0 is not None, SEQ=seq.flag, DOT_PREC=prec,
            BLOCK_B=cfg.block_b, BLOCK_H=cfg.block_h, num_warps=cfg.num_warps,
        )
        return
    nn = triton.cdiv(H, cfg.block_h)
    # g of consecutive steps ping-pongs between two fp32 (B, H) buffers (a unit reads one
    # and writes the other); p carries g z + d_rh r (reset_after=False) to the step before.
    gbuf = torch.empty(2, B, H, device=grad_y.device, dtype=torch.float32)
    pbuf = torch.empty(B, H, device=grad_y.device, dtype=torch.float32) if not reset_after \
        else gbuf
    persist = cfg.strategy == "persistent"
    units = 1 if reset_after else 2
    if persist:
        _check_persistent(cfg, B, H, units * (T - 1), grad_y.device)
        bar = torch.zeros(1, device=grad_y.device, dtype=torch.int32)
    else:
        bar = torch.empty(1, device=grad_y.device, dtype=torch.int32)  # unused

    def launch(t, n_steps, stage, has_next, has_cur, persistent):
        # A launch per unit covers step t's rows (the dh0 unit, t = -1: all B).
        rows = B if persistent or t < 0 else seq.rows(t)
        _bwd_split_kernel[(triton.cdiv(rows, cfg.block_b), nn)](
            grad_y, h0_arg, w_hh, y, ws, dgi, dgh, gbuf, pbuf, dh0, bar, seq_arg, rs_arg, t,
            n_steps, B, H, STAGE=stage, RESET_AFTER=reset_after, HAS_NEXT=has_next,
            HAS_CUR=has_cur, HAS_H0=h0 is not None, SEQ=seq.flag, PERSIST=persistent,
            DOT_PREC=prec, BLOCK_B=cfg.block_b, BLOCK_N=cfg.block_h, BLOCK_K=cfg.block_k,
            num_warps=cfg.num_warps, **{COOPERATIVE_LAUNCH: persistent},
        )

    stages = (0,) if reset_after else (0, 1)
    # The last step has no step after it: launches of its own (HAS_NEXT is a constexpr).
    for stage in stages:
        launch(T - 1, 1, stage, False, True, False)
    if persist:
        launch(T - 2, T - 1, 0, True, True, True)  # steps T-2 .. 0, then dh0
        return
    for t in range(T - 2, -1, -1):
        for stage in stages:
            launch(t, 1, stage, True, True, False)
    launch(-1, 1, 0, True, False, False)  # dh0
