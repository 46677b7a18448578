"""Triton kernels of one GRU layer-direction, their launchers and the dispatcher.

Dimension legend (as in fusedgru/reference.py):
    T   timesteps            B   batch rows          I   input features
    H   hidden units         G   = 3 gates, stacked r (reset), z (update), n (new)
    BB  batch rows per program                                   (BLOCK_B)
    HP  H padded to a power of two >= 16, resident kernels       (BLOCK_H)
    BN  hidden columns per program, BK reduction chunk, step kernels (BLOCK_N, BLOCK_K)
Every tensor is contiguous and time-major; "[t]" below is the (B, .) slice of step t.
ws holds, per row and step, [r, z, n, hn] (4H) with hn = W_hn h + b_hn (reset_after=True)
or W_hn (r * h) + b_hn (reset_after=False): the backward needs nothing else.

Four kernels, one per job (constexpr flags pick the formulation, where h_{t-1} comes from,
the tanh and the dot precision; no near-copies):

    _fwd_resident_kernel   forward, ONE launch for all T steps; a program owns BB rows and
                           all H columns; W_hh is loaded once, before the time loop, and
                           stays in registers with the fp32 state h.   grid (cdiv(B, BB),)
    _bwd_resident_kernel   the reverse-time loop of the backward, same scheme; dh is carried
                           in registers through W_hh^T.                 grid (cdiv(B, BB),)
    _fwd_step_kernel       large H: one step (or half a step for reset_after=False), H split
                           across programs, h_{t-1} read from y[t-1].  grid (cdiv(B, BB), cdiv(H, BN))
    _bwd_step_kernel       large H: one stage of one backward step, H split likewise.

The input projection (x W_ih^T + b_ih for all T*B rows) is one torch matmul before the
forward loop; dx, dW_ih, dW_hh and the biases are torch matmuls / sums over all T*B rows
after the backward loop (deterministic: no atomics anywhere).

Offsets: row indices are int64 before they are multiplied by H, 3H or 4H, so tensors with
more than 2^31 elements are addressed correctly (T*B itself must stay below 2^31).
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

from fusedgru.ops import tf32_matmul_allowed

__all__ = [
    "INTERPRET",
    "INTERPRET_ERROR",
    "Config",
    "choose_config",
    "force_config",
    "resident_max",
    "dot_precision",
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

    def _patch_lang_tensor(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

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
    T,
    B,
    H,
    RESET_AFTER: tl.constexpr,
    HAS_H0: tl.constexpr,
    STORE_WS: tl.constexpr,  # False: inference, nothing will need ws (y only)
    LIBDEVICE_TANH: tl.constexpr,
    DOT_PREC: tl.constexpr,  # "ieee" (exact fp32) or "tf32"; ignored for 16-bit weights
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

    for t in range(T):
        row = (o_b + t * B)[:, None]  # (BB, 1) int64 row of the (T*B) rows
        p_gi = gi_ptr + row * (3 * H) + o_h[None, :]
        i_r = tl.load(p_gi, mask=m_bh, other=0.0).to(tl.float32)
        i_z = tl.load(p_gi + H, mask=m_bh, other=0.0).to(tl.float32)
        i_n = tl.load(p_gi + 2 * H, mask=m_bh, other=0.0).to(tl.float32)
        hc = h.to(wdt)
        r = tl.sigmoid(i_r + tl.dot(hc, b_wr, input_precision=DOT_PREC) + b_br)
        z = tl.sigmoid(i_z + tl.dot(hc, b_wz, input_precision=DOT_PREC) + b_bz)
        if RESET_AFTER:
            hn = tl.dot(hc, b_wn, input_precision=DOT_PREC) + b_bn
            n = _tanh(i_n + r * hn, LIBDEVICE_TANH)
        else:
            hn = tl.dot((r * h).to(wdt), b_wn, input_precision=DOT_PREC) + b_bn
            n = _tanh(i_n + hn, LIBDEVICE_TANH)
        h = tl.where(m_bh, n + z * (h - n), 0.0)  # (1 - z) n + z h; padding stays 0

        tl.store(y_ptr + row * H + o_h[None, :], h.to(y_ptr.dtype.element_ty), mask=m_bh)
        if STORE_WS:
            p_ws = ws_ptr + row * (4 * H) + o_h[None, :]
            wsdt = ws_ptr.dtype.element_ty
            tl.store(p_ws, r.to(wsdt), mask=m_bh)
            tl.store(p_ws + H, z.to(wsdt), mask=m_bh)
            tl.store(p_ws + 2 * H, n.to(wsdt), mask=m_bh)
            tl.store(p_ws + 3 * H, hn.to(wsdt), mask=m_bh)


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
    T,
    B,
    H,
    RESET_AFTER: tl.constexpr,
    HAS_H0: tl.constexpr,
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
    for tt in range(T):
        t = T - 1 - tt
        row = (o_b + t * B)[:, None]  # (BB, 1) int64
        g = tl.load(gy_ptr + row * H + o_h[None, :], mask=m_bh, other=0.0).to(tl.float32) + dh
        p_ws = ws_ptr + row * (4 * H) + o_h[None, :]
        r = tl.load(p_ws, mask=m_bh, other=0.0).to(tl.float32)
        z = tl.load(p_ws + H, mask=m_bh, other=0.0).to(tl.float32)
        n = tl.load(p_ws + 2 * H, mask=m_bh, other=0.0).to(tl.float32)
        hn = tl.load(p_ws + 3 * H, mask=m_bh, other=0.0).to(tl.float32)
        # h_{t-1}: y[t-1] for t > 0, else h0 (or zeros); masks keep t = 0 off y[-1].
        h = tl.load(y_ptr + (row - B) * H + o_h[None, :], mask=m_bh & (t > 0), other=0.0)
        h = h.to(tl.float32)
        if HAS_H0:
            h += tl.load(h0_ptr + o_b[:, None] * H + o_h[None, :], mask=m_bh & (t == 0),
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
        dh = tl.where(m_bh, dh, 0.0)

        gdt = dgi_ptr.dtype.element_ty
        p_dgi = dgi_ptr + row * (3 * H) + o_h[None, :]
        p_dgh = dgh_ptr + row * (3 * H) + o_h[None, :]
        tl.store(p_dgi, da_r.to(gdt), mask=m_bh)
        tl.store(p_dgi + H, da_z.to(gdt), mask=m_bh)
        tl.store(p_dgi + 2 * H, da_n.to(gdt), mask=m_bh)
        tl.store(p_dgh, da_r.to(gdt), mask=m_bh)
        tl.store(p_dgh + H, da_z.to(gdt), mask=m_bh)
        tl.store(p_dgh + 2 * H, dgh_n.to(gdt), mask=m_bh)

    tl.store(dh0_ptr + o_b[:, None] * H + o_h[None, :], dh.to(dh0_ptr.dtype.element_ty),
             mask=m_bh)


# ----------------------------------------------------------------------------------------
# Step kernels: H split across programs, one launch per step (or per stage of a step)
# ----------------------------------------------------------------------------------------


# t (and ws_t) change every launch: do not specialise on them.
@triton.jit(do_not_specialize=["t", "ws_t"])
def _fwd_step_kernel(
    gi_ptr,  # (T, B, 3H)
    h0_ptr,  # (B, H)      read when PREV == 1
    w_ptr,  # (3H, H)
    b_ptr,  # (3H,)       b_hh (zeros when the layer has no bias)
    y_ptr,  # (T, B, H)   out: y[t]; y[t-1] read when PREV == 2
    ws_ptr,  # (T, B, 4H)  out: ws[ws_t]; PHASE 2 reads r, z written by PHASE 1
    t,  # the step
    ws_t,  # the step's ws row block: t, or 0 when ws is one step's (1, B, 4H) scratch
    B,
    H,
    PHASE: tl.constexpr,  # 0: the whole step (reset_after=True); reset_after=False:
    #                        1: r and z, 2: hn = W_hn (r*h) + b_hn, n and h_t
    PREV: tl.constexpr,  # h_{t-1} is 0: zeros, 1: h0, 2: y[t-1]
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
    m_b = o_b < B
    m_n = o_n < H
    m_bn = m_b[:, None] & m_n[None, :]
    row = (o_b + t * B)[:, None]  # (BB, 1) int64 rows of step t
    row_ws = (o_b + ws_t * B)[:, None]  # (BB, 1) int64 rows of ws
    wdt = w_ptr.dtype.element_ty
    if PREV == 2:
        p_hp = y_ptr + (row - B) * H  # (BB, 1) row starts of h_{t-1}
    else:
        p_hp = h0_ptr + o_b[:, None] * H

    acc_r = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
    acc_z = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
    acc_n = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
    if PREV != 0:  # with h_{t-1} = 0 every product is 0
        for k0 in range(0, H, BLOCK_K):
            o_k = k0 + tl.arange(0, BLOCK_K)  # (BK,)
            m_k = o_k < H
            a = tl.load(p_hp + o_k[None, :], mask=m_b[:, None] & m_k[None, :], other=0.0)
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
            h = tl.load(p_hp + o_n[None, :], mask=m_bn, other=0.0).to(tl.float32)
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
        tl.store(p_ws + 2 * H, n.to(wsdt), mask=m_bn)
        tl.store(p_ws + 3 * H, hn.to(wsdt), mask=m_bn)


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


@triton.jit(do_not_specialize=["t"])
def _bwd_step_kernel(
    gy_ptr,  # (T, B, H)
    h0_ptr,  # (B, H)      read when HAS_H0
    w_ptr,  # (3H, H)
    y_ptr,  # (T, B, H)
    ws_ptr,  # (T, B, 4H)
    dgi_ptr,  # (T, B, 3H)  out (its [t] slice)
    dgh_ptr,  # (T, B, 3H)  out (its [t] slice); [t+1] read by STAGE 0
    g_in_ptr,  # (B, H) fp32  g of the step after (STAGE 0) or of this step (STAGE 1)
    g_out_ptr,  # (B, H) fp32  out (STAGE 0): g = dL/dh_t of this step
    p_ptr,  # (B, H) fp32  reset_after=False: g z + d_rh r of a step (out in STAGE 1)
    dh0_ptr,  # (B, H)      out when not HAS_CUR
    t,  # the step (-1 for the last launch, which only writes dh0)
    B,
    H,
    STAGE: tl.constexpr,  # 0: dh_t from step t+1 (if HAS_NEXT), then step t's pointwise
    #                        gradients (if HAS_CUR); 1 (reset_after=False): d_rh = W_hn^T da_n
    #                        of step t, da_r, and g z + d_rh r for the step before
    RESET_AFTER: tl.constexpr,
    HAS_NEXT: tl.constexpr,
    HAS_CUR: tl.constexpr,
    HAS_H0: tl.constexpr,
    DOT_PREC: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_n = tl.program_id(1)
    o_b = pid_b.to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)  # (BB,)
    o_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,) columns of h
    m_b = o_b < B
    m_n = o_n < H
    m_bn = m_b[:, None] & m_n[None, :]
    row = (o_b + t * B)[:, None]  # (BB, 1) int64 rows of step t
    o_bn = o_b[:, None] * H + o_n[None, :]  # (BB, BN) offsets into (B, H) buffers
    wdt = w_ptr.dtype.element_ty
    gdt = dgi_ptr.dtype.element_ty

    # The product with W_hh^T over gates [G0, G1): of dgh[t+1] in STAGE 0, of dgh[t] in 1.
    if STAGE == 0:
        acc = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
        if HAS_NEXT:
            if RESET_AFTER:  # all three gates
                acc = _dgh_times_w(dgh_ptr, w_ptr, row + B, m_b, o_n, m_n, H, 0, 3, DOT_PREC,
                                   BLOCK_B, BLOCK_N, BLOCK_K)
            else:  # r and z; the n gate went through STAGE 1 of step t+1
                acc = _dgh_times_w(dgh_ptr, w_ptr, row + B, m_b, o_n, m_n, H, 0, 2, DOT_PREC,
                                   BLOCK_B, BLOCK_N, BLOCK_K)
    else:
        acc = _dgh_times_w(dgh_ptr, w_ptr, row, m_b, o_n, m_n, H, 2, 3, DOT_PREC, BLOCK_B,
                           BLOCK_N, BLOCK_K)

    if STAGE == 0:
        dh = acc
        if HAS_NEXT:
            if RESET_AFTER:  # + g_{t+1} z_{t+1}
                z1 = tl.load(ws_ptr + (row + B) * (4 * H) + H + o_n[None, :], mask=m_bn, other=0.0)
                dh += tl.load(g_in_ptr + o_bn, mask=m_bn, other=0.0) * z1.to(tl.float32)
            else:  # + g_{t+1} z_{t+1} + d_rh r_{t+1}, made by STAGE 1 of step t+1
                dh += tl.load(p_ptr + o_bn, mask=m_bn, other=0.0)
        if HAS_CUR:
            g = tl.load(gy_ptr + row * H + o_n[None, :], mask=m_bn, other=0.0).to(tl.float32)
            g += dh
            p_ws = ws_ptr + row * (4 * H) + o_n[None, :]
            z = tl.load(p_ws + H, mask=m_bn, other=0.0).to(tl.float32)
            n = tl.load(p_ws + 2 * H, mask=m_bn, other=0.0).to(tl.float32)
            h = tl.load(y_ptr + (row - B) * H + o_n[None, :], mask=m_bn & (t > 0), other=0.0)
            h = h.to(tl.float32)
            if HAS_H0:
                h += tl.load(h0_ptr + o_bn, mask=m_bn & (t == 0), other=0.0).to(tl.float32)
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
            tl.store(g_out_ptr + o_bn, g, mask=m_bn)
        else:
            tl.store(dh0_ptr + o_bn, dh.to(dh0_ptr.dtype.element_ty), mask=m_bn)
    else:
        d_rh = acc  # W_hn^T da_n of step t
        p_ws = ws_ptr + row * (4 * H) + o_n[None, :]
        r = tl.load(p_ws, mask=m_bn, other=0.0).to(tl.float32)
        z = tl.load(p_ws + H, mask=m_bn, other=0.0).to(tl.float32)
        h = tl.load(y_ptr + (row - B) * H + o_n[None, :], mask=m_bn & (t > 0), other=0.0)
        h = h.to(tl.float32)
        if HAS_H0:
            h += tl.load(h0_ptr + o_bn, mask=m_bn & (t == 0), other=0.0).to(tl.float32)
        da_r = d_rh * h * r * (1.0 - r)
        tl.store(dgi_ptr + row * (3 * H) + o_n[None, :], da_r.to(gdt), mask=m_bn)
        tl.store(dgh_ptr + row * (3 * H) + o_n[None, :], da_r.to(gdt), mask=m_bn)
        g = tl.load(g_in_ptr + o_bn, mask=m_bn, other=0.0)
        tl.store(p_ptr + o_bn, g * z + d_rh * r, mask=m_bn)


# ----------------------------------------------------------------------------------------
# Dispatcher
# ----------------------------------------------------------------------------------------

# Largest padded H for which the resident kernels keep W_hh (3 x HP x HP) on chip.  From
# the ahead-of-time compile for sm_90 (python -m fusedgru.kernels.aot; table in
# benchmarks/NOTES-triton.md): Triton stages the loop-invariant W_hh tiles in shared memory.
# HP = 128 takes 100 KB (16-bit, fwd and bwd, 215 registers, no spill) but 200 KB (fwd)
# and 328 KB (bwd, over the 227 KB limit) in fp32, so fp32 stops at 64 (52 / 116 KB).
# Whether resident beats the step kernels at the boundary is still to be timed on a GPU.
RESIDENT_MAX = {torch.float32: 64, torch.float16: 128, torch.bfloat16: 128}


@dataclass(frozen=True)
class Config:
    """How one layer-direction is launched.

    strategy "resident": one launch per pass, block_h = HP >= H (BLOCK_H).
    strategy "step":     one launch per step (two for reset_after=False), block_h = BN
                         columns per program, block_k = BK reduction chunk.
    """

    strategy: str
    block_b: int
    block_h: int
    block_k: int = 0
    num_warps: int = 4


def resident_max(dtype: torch.dtype) -> int:
    return RESIDENT_MAX.get(dtype, 64)


_forced: Optional[Config] = None


@contextlib.contextmanager
def force_config(config: Optional[Config]):
    """Within the block, every launch uses ``config`` (tests drive the step kernels with
    small blocks through the registered ops this way)."""
    global _forced
    saved, _forced = _forced, config
    try:
        yield
    finally:
        _forced = saved


def choose_config(B: int, H: int, dtype: torch.dtype) -> Config:
    """The configuration the backend launches for a batch of B rows and H hidden units.

    Every value this returns is compiled ahead of time by tests/test_triton_aot.py.
    """
    if _forced is not None:
        return _forced
    hp = max(16, triton.next_power_of_2(H))
    if hp <= resident_max(dtype):
        return Config("resident", block_b=16, block_h=hp, num_warps=4 if hp <= 32 else 8)
    # Many programs per step matter more than tile efficiency at small B (latency bound):
    # BN = 32 gives H / 32 programs per 16 rows.
    return Config("step", block_b=16 if B <= 16 else 32, block_h=32, block_k=64, num_warps=4)


def dot_precision(dtype: torch.dtype, device_type: str) -> str:
    """"tf32" for float32 on a GPU when torch allows TF32 float32 matmuls, else "ieee"."""
    if dtype == torch.float32 and device_type == "cuda" and not INTERPRET:
        return "tf32" if tf32_matmul_allowed() else "ieee"
    return "ieee"


def _libdevice_tanh() -> bool:
    return not INTERPRET


def _dummy(t: Optional[Tensor], like: Tensor) -> Tensor:
    return t if t is not None else like


# ----------------------------------------------------------------------------------------
# Launchers: outputs are arguments, so tests can hand in NaN-filled buffers
# ----------------------------------------------------------------------------------------


def launch_forward(
    gi: Tensor,  # (T, B, 3H)  x W_ih^T + b_ih
    h0: Optional[Tensor],  # (B, H) or None
    w_hh: Tensor,  # (3H, H)
    b_hh: Tensor,  # (3H,)   zeros when the layer has no bias
    y: Tensor,  # (T, B, H)   out
    ws: Optional[Tensor],  # (T, B, 4H)  out; None: inference, y only
    reset_after: bool,
    config: Optional[Config] = None,
) -> None:
    """Runs the forward recurrence into y and ws (every element is written).  With ws None
    nothing of r, z, n, hn reaches memory beyond one step's scratch (the step kernels pass
    r and z between their two launches through it)."""
    T, B, _ = gi.shape
    H = w_hh.shape[1]
    if T == 0 or B == 0:
        return
    cfg = config or choose_config(B, H, w_hh.dtype)
    prec = dot_precision(w_hh.dtype, gi.device.type)
    h0_arg = _dummy(h0, y)
    nb = triton.cdiv(B, cfg.block_b)
    if cfg.strategy == "resident":
        _fwd_resident_kernel[(nb,)](
            gi, h0_arg, w_hh, b_hh, y, y if ws is None else ws, T, B, H,
            RESET_AFTER=reset_after, HAS_H0=h0 is not None, STORE_WS=ws is not None,
            LIBDEVICE_TANH=_libdevice_tanh(),
            DOT_PREC=prec, BLOCK_B=cfg.block_b, BLOCK_H=cfg.block_h, num_warps=cfg.num_warps,
        )
        return
    # Per-step launches on the current stream: stream order is the barrier between steps.
    grid = (nb, triton.cdiv(H, cfg.block_h))
    keep = ws is not None
    if not keep:
        ws = y.new_empty(1, B, 4 * H)  # one step's r, z, n, hn, reused by every step
    phases = (0,) if reset_after else (1, 2)
    for t in range(T):
        prev = 2 if t > 0 else (1 if h0 is not None else 0)
        for phase in phases:
            _fwd_step_kernel[grid](
                gi, h0_arg, w_hh, b_hh, y, ws, t, t if keep else 0, B, H,
                PHASE=phase, PREV=prev, LIBDEVICE_TANH=_libdevice_tanh(), DOT_PREC=prec,
                BLOCK_B=cfg.block_b, BLOCK_N=cfg.block_h, BLOCK_K=cfg.block_k,
                num_warps=cfg.num_warps,
            )


def launch_backward(
    grad_y: Tensor,  # (T, B, H)
    h0: Optional[Tensor],  # (B, H) or None
    w_hh: Tensor,  # (3H, H)
    y: Tensor,  # (T, B, H)
    ws: Tensor,  # (T, B, 4H)
    dgi: Tensor,  # (T, B, 3H)  out
    dgh: Tensor,  # (T, B, 3H)  out
    dh0: Tensor,  # (B, H)      out
    reset_after: bool,
    config: Optional[Config] = None,
) -> None:
    """Runs the reverse-time loop into dgi, dgh and dh0 (every element is written)."""
    T, B, H = grad_y.shape
    if B == 0:
        return
    if T == 0:
        dh0.zero_()
        return
    cfg = config or choose_config(B, H, w_hh.dtype)
    prec = dot_precision(w_hh.dtype, grad_y.device.type)
    h0_arg = _dummy(h0, dh0)
    nb = triton.cdiv(B, cfg.block_b)
    if cfg.strategy == "resident":
        _bwd_resident_kernel[(nb,)](
            grad_y, h0_arg, w_hh, y, ws, dgi, dgh, dh0, T, B, H,
            RESET_AFTER=reset_after, HAS_H0=h0 is not None, DOT_PREC=prec,
            BLOCK_B=cfg.block_b, BLOCK_H=cfg.block_h, num_warps=cfg.num_warps,
        )
        return
    grid = (nb, triton.cdiv(H, cfg.block_h))
    # g of consecutive steps ping-pongs between two fp32 buffers (a launch reads one and
    # writes the other); p carries g z + d_rh r (reset_after=False) to the step before.
    gbuf = torch.empty(2, B, H, device=grad_y.device, dtype=torch.float32)
    pbuf = torch.empty(B, H, device=grad_y.device, dtype=torch.float32) if not reset_after \
        else gbuf[0]

    def stage(t, stage_id, g_in, g_out, has_next, has_cur):
        _bwd_step_kernel[grid](
            grad_y, h0_arg, w_hh, y, ws, dgi, dgh, g_in, g_out, pbuf, dh0, t, B, H,
            STAGE=stage_id, RESET_AFTER=reset_after, HAS_NEXT=has_next, HAS_CUR=has_cur,
            HAS_H0=h0 is not None, DOT_PREC=prec, BLOCK_B=cfg.block_b, BLOCK_N=cfg.block_h,
            BLOCK_K=cfg.block_k, num_warps=cfg.num_warps,
        )

    for t in range(T - 1, -1, -1):
        g_in, g_out = gbuf[(t + 1) % 2], gbuf[t % 2]
        stage(t, 0, g_in, g_out, t < T - 1, True)
        if not reset_after:
            stage(t, 1, g_out, g_out, False, True)
    stage(-1, 0, gbuf[0], gbuf[1], True, False)
