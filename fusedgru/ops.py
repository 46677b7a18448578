"""Registered dispatcher ops: the one boundary each backend's kernels sit behind.

Every backend exposes the same two ops for one layer in one direction (shapes in
fusedgru/reference.py; T, B, I, H as there):

    <name>_fwd(x (T,B,I), h0 (B,H)?, w_ih (3H,I), w_hh (3H,H), b_ih (3H)?, b_hh (3H)?,
               reset_after: bool, batch_sizes (T)? = None, resets (T,B)? = None)
               -> (y (T,B,H), ws (T,B,4H))
    <name>_bwd(grad_y (T,B,H), x, h0?, w_ih, w_hh, y, ws, reset_after: bool,
               batch_sizes? = None, resets? = None, need_dx: bool = True,
               need_dw: bool = True)
               -> (dx (T,B,I), dh0 (B,H), dw_ih (3H,I), dw_hh (3H,H), db_ih (3H), db_hh (3H))

need_dx / need_dw: whether dx / the four weight and bias gradients are wanted.  One not
wanted is not computed and comes back as an empty (0,) tensor, as nn.GRU's backward skips
them when the input / the parameters need no gradient (the first layer on raw features,
frozen weights): dx is one (N, 3H) x (3H, I) product, the weight gradients two more.

batch_sizes / resets are the sequence structure (fusedgru/reference.py's docstring): with
batch_sizes, x, y, ws, grad_y and dx are packed (N, .) rows, no padding; resets zero the
state entering a step.  Neither is differentiable.

They are registered (``torch.library.custom_op`` here for the Python backends, TORCH_LIBRARY
in csrc/ for the extension) with the fake implementations below, so that torch.compile
traces them as opaque nodes without graph breaks and torch.export can serialise them.

Autograd is registered on the ops themselves (``torch.library.register_autograd``), and it
is the ONE autograd boundary on the hot path: the forward op's formula
calls the same backend's backward op.  Registering it on the op rather than wrapping the op
in a torch.autograd.Function is what lets ``torch.library.opcheck`` pass with
requires_grad inputs, and lets a traced graph (torch.export) carry the op with its
gradient.  Two rare paths run in plain PyTorch, because no kernel computes them:

- a gradient arriving for ``ws`` (only when a caller uses ws, which fusedgru never does,
  or during a double backward): the VJP of the reference forward;
- double backward (create_graph=True through the backward op, e.g. a gradient penalty):
  the VJP of ``reference.gru_layer_backward`` (written without in-place writes, so that
  autograd can differentiate it).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Optional, Set, Tuple

import torch
from torch import Tensor

from . import reference

__all__ = ["fake_forward", "fake_backward", "register_backend_ops", "register_autograd",
           "register_extension_autograd", "fake_inference", "register_inference_op",
           "tf32_matmul_allowed", "rnn_tf32_allowed", "autocast_enabled", "autocast_off",
           "register_vmap_rules", "functorch_forward", "wanted_grads", "unwanted_to_none"]


_AUTOCAST_AVAILABLE = {}


@torch.compiler.assume_constant_result
def _autocast_available(device_type: str) -> bool:
    # A constant per device type: torch.compile evaluates it once while tracing.  (Dynamo
    # of torch 2.11 cannot trace torch._C._is_autocast_available, which this calls; without
    # the decorator a fullgraph compile of FusedGRU fails there.)  Kept per device type:
    # every eager call of FusedGRU asks.
    known = _AUTOCAST_AVAILABLE.get(device_type)
    if known is None:
        known = _AUTOCAST_AVAILABLE[device_type] = torch.amp.is_autocast_available(device_type)
    return known


def tf32_matmul_allowed() -> bool:
    """Whether float32 matmuls on CUDA may use TF32, as torch decides it for its own matmuls.

    Read through the fp32_precision settings (torch >= 2.9): once a user has set those,
    torch's legacy ``torch.backends.cuda.matmul.allow_tf32`` getter raises ("mix of the
    legacy and new APIs"), and setting the legacy flag sets the new one too.  "none" on the
    matmul inherits the global ``torch.backends.fp32_precision``."""
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", None)
    if precision is None:  # torch without the fp32_precision API
        return bool(matmul.allow_tf32)
    if precision == "none":
        precision = getattr(torch.backends, "fp32_precision", "none")
    return precision == "tf32"


def rnn_tf32_allowed() -> bool:
    """Whether a float32 GRU on CUDA may run its products on TF32 tensor cores: the setting
    torch.nn.GRU follows there (cuDNN's RNN, ATen's ``allowTF32CuDNN(Float32Op::RNN)``), so
    that a default float32 FusedGRU computes in the precision a default float32 nn.GRU does.

    torch >= 2.9: ``torch.backends.cudnn.rnn.fp32_precision`` ("tf32" by default; "none"
    inherits ``torch.backends.cudnn.fp32_precision``, then ``torch.backends.fp32_precision``).
    Older torch: ``torch.backends.cudnn.allow_tf32`` (True by default).  Strict float32
    ("ieee") takes the kernels' split-precision path instead (3xTF32 on the tensor cores)."""
    cudnn = torch.backends.cudnn
    rnn = getattr(cudnn, "rnn", None)
    precision = getattr(rnn, "fp32_precision", None)
    if precision is None:  # torch without the fp32_precision API
        return bool(cudnn.allow_tf32)
    if precision == "none":
        precision = getattr(cudnn, "fp32_precision", "none")
    if precision == "none":
        precision = getattr(torch.backends, "fp32_precision", "none")
    return precision == "tf32"


def autocast_enabled(device_type: str) -> bool:
    """Whether torch.autocast is on for ``device_type`` (False for types it does not know,
    such as meta, where asking would raise)."""
    return _autocast_available(device_type) and torch.is_autocast_enabled(device_type)


def autocast_off(device_type: str):
    """A context that turns torch.autocast off for ``device_type`` while a kernel runs (its
    inputs are already in the computation dtype; autocast would recast its inner ops, e.g.
    sum to float32 on CUDA); a no-op context when autocast is off."""
    if autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def fake_forward(x, h0, w_ih, w_hh, b_ih, b_hh, reset_after, batch_sizes=None, resets=None):
    rows = x.shape[:-1]  # (T, B) dense, (N,) packed
    H = w_hh.shape[1]
    return x.new_empty(*rows, H), x.new_empty(*rows, 4 * H)


def fake_inference(x, h0, w_ih, w_hh, b_ih, b_hh, reset_after, batch_sizes=None, resets=None):
    return fake_forward(x, h0, w_ih, w_hh, b_ih, b_hh, reset_after)[0]


def _batch_size(x, h0, batch_sizes):
    if h0 is not None:
        return h0.shape[0]
    if batch_sizes is None:
        return x.shape[1]
    # packed without h0: B = batch_sizes[0], a value the fake tensors cannot read
    return torch.library.get_ctx().new_dynamic_size(min=1)


def fake_backward(grad_y, x, h0, w_ih, w_hh, y, ws, reset_after, batch_sizes=None, resets=None,
                  need_dx=True, need_dw=True):
    B = _batch_size(x, h0, batch_sizes)
    H = w_hh.shape[1]
    dw = ((torch.empty_like(w_ih), torch.empty_like(w_hh), w_hh.new_empty(3 * H),
           w_hh.new_empty(3 * H)) if need_dw else reference.skipped_weight_grads(w_hh))
    return (torch.empty_like(x) if need_dx else x.new_empty(0), x.new_empty(B, H), *dw)


def wanted_grads(needs_input_grad) -> Tuple[bool, bool]:
    """(need_dx, need_dw) for a backward op from a forward's needs_input_grad (x, h0,
    w_ih, w_hh, b_ih, b_hh first, as the forward ops take them)."""
    return bool(needs_input_grad[0]), any(needs_input_grad[2:6])


def unwanted_to_none(grads, need_dx: bool, need_dw: bool) -> tuple:
    """A backward op's six outputs with the skipped ones (empty tensors) as None."""
    dx, dh0, *dw = grads
    return (dx if need_dx else None, dh0, *(dw if need_dw else (None,) * 4))


# ----------------------------------------------------------------------------------------
# Autograd formulas (shared by every backend's op pair)
# ----------------------------------------------------------------------------------------


def _zeros_if_none(grads, like):
    return tuple(torch.zeros_like(o) if g is None else g for g, o in zip(grads, like))


def _seq_args(inputs, n):
    """(batch_sizes, resets) from an op's inputs: the two after its n fixed ones (a direct
    call may leave them out)."""
    rest = tuple(inputs[n:]) + (None, None)
    return rest[0], rest[1]


def _setup_forward(ctx, inputs, output):
    x, h0, w_ih, w_hh, b_ih, b_hh, reset_after = inputs[:7]
    y, ws = output
    ctx.save_for_backward(x, h0, w_ih, w_hh, b_ih, b_hh, y, ws)
    ctx.reset_after = reset_after
    ctx.seq = _seq_args(inputs, 7)
    # None (not zeros) for an unused output's gradient: how the formula tells that ws
    # received no gradient, the usual case, without looking at tensor values.
    ctx.set_materialize_grads(False)


def _make_forward_formula(bwd_op):
    def backward(ctx, grad_y: Optional[Tensor], grad_ws: Optional[Tensor]):
        x, h0, w_ih, w_hh, b_ih, b_hh, y, ws = ctx.saved_tensors
        ra = ctx.reset_after
        batch_sizes, resets = ctx.seq
        if grad_ws is None:  # the hot path: the backend's own backward kernel
            gy = torch.zeros_like(y) if grad_y is None else grad_y.contiguous()
            need = wanted_grads(ctx.needs_input_grad)
            with autocast_off(x.device.type):
                grads = unwanted_to_none(
                    bwd_op(gy, x, h0, w_ih, w_hh, y, ws, ra, batch_sizes, resets, *need), *need)
        else:  # ws is used downstream: differentiate the reference forward instead
            h0_ = (h0 if h0 is not None
                   else x.new_zeros(layout_batch(y, batch_sizes), w_hh.shape[1]))
            b_ih_ = b_ih if b_ih is not None else w_hh.new_zeros(w_hh.shape[0])
            b_hh_ = b_hh if b_hh is not None else w_hh.new_zeros(w_hh.shape[0])
            out, vjp = torch.func.vjp(
                lambda *a: reference.gru_layer_forward(*a, ra, batch_sizes, resets),
                x, h0_, w_ih, w_hh, b_ih_, b_hh_)
            grads = vjp(_zeros_if_none((grad_y, grad_ws), out))
        dx, dh0, dw_ih, dw_hh, db_ih, db_hh = grads
        return (dx, dh0 if h0 is not None else None, dw_ih, dw_hh,
                db_ih if b_ih is not None else None, db_hh if b_hh is not None else None,
                None, None, None)

    return backward


def layout_batch(t: Tensor, batch_sizes: Optional[Tensor]) -> int:
    """B for a tensor laid out as the ops' rows (x, y, ...): dense (T, B, .), or packed rows
    whose B is batch_sizes[0]."""
    return t.shape[1] if batch_sizes is None else int(batch_sizes[0])


def _setup_backward(ctx, inputs, output):
    grad_y, x, h0, w_ih, w_hh, y, ws, reset_after = inputs[:8]
    ctx.save_for_backward(grad_y, x, h0, w_ih, w_hh, y, ws)
    ctx.reset_after = reset_after
    ctx.seq = _seq_args(inputs, 8)
    rest = tuple(inputs[10:]) + (True, True)  # need_dx, need_dw (a direct call may omit them)
    ctx.need = (bool(rest[0]), bool(rest[1]))
    ctx.set_materialize_grads(False)


def _backward_formula(ctx, *grads):
    grad_y, x, h0, w_ih, w_hh, y, ws = ctx.saved_tensors
    ra = ctx.reset_after
    batch_sizes, resets = ctx.seq
    h0_ = h0 if h0 is not None else x.new_zeros(layout_batch(y, batch_sizes), w_hh.shape[1])
    out, vjp = torch.func.vjp(
        lambda *a: reference.gru_layer_backward(*a, ra, batch_sizes, resets),
        grad_y, x, h0_, w_ih, w_hh, y, ws)
    # An output the op skipped (need_dx / need_dw False) is an empty tensor: nothing of it
    # depends on the inputs.
    grads = unwanted_to_none(grads, *ctx.need)
    d_grad_y, dx, dh0, dw_ih, dw_hh, dy, dws = vjp(_zeros_if_none(grads, out))
    return (d_grad_y, dx, dh0 if h0 is not None else None, dw_ih, dw_hh, dy, dws, None,
            None, None, None, None)


# ----------------------------------------------------------------------------------------
# torch.func: batching rules, and the same formulas as an autograd.Function
# ----------------------------------------------------------------------------------------
#
# vmap: a batching rule per op.  When the weights are shared by the vmapped instances (the
# usual case: vmap over inputs or states), the vmapped dimension folds into the GRU's own
# batch, which the kernels handle in one call.  When the weights are vmapped too (model
# ensembles), and always for the backward op (whose weight gradients are per instance),
# the rule calls the op once per instance.
#
# grad / vjp / jacrev: the autograd that torch.library registers on an op is an
# autograd.Function without setup_context, which functorch refuses.  Under a torch.func
# transform, function.gru_layer therefore calls the backend's ops through the
# autograd.Functions below instead: the same setup and formulas as the registered autograd,
# with generate_vmap_rule so that vmap composes with them through the ops' batching rules.


def _batch_first(t: Optional[Tensor], dim: Optional[int], n: int) -> Optional[Tensor]:
    if t is None:
        return None
    return t.expand(n, *t.shape) if dim is None else t.movedim(dim, 0)


def _instance(t, dim: Optional[int], k: int):
    return t.select(dim, k).contiguous() if isinstance(t, Tensor) and dim is not None else t


def _per_instance(op, info, in_dims, args):
    """The op once per vmapped instance; outputs stacked along dim 0."""
    outs = [op(*(_instance(a, d, k) for a, d in zip(args, in_dims)))
            for k in range(info.batch_size)]
    if isinstance(outs[0], Tensor):
        return torch.stack(outs), 0
    stacked = tuple(torch.stack(parts) for parts in zip(*outs))
    return stacked, (0,) * len(stacked)


def _all_dims(in_dims, args) -> tuple:
    """in_dims for every argument (a call that left out batch_sizes / resets has fewer)."""
    return tuple(in_dims) + (None,) * (len(args) - len(in_dims))


def _vmap_forward_rule(op):
    def rule(info, in_dims, x, h0, w_ih, w_hh, b_ih, b_hh, reset_after, batch_sizes=None,
             resets=None):
        args = (x, h0, w_ih, w_hh, b_ih, b_hh, reset_after, batch_sizes, resets)
        in_dims = _all_dims(in_dims, args)
        # Weights per instance, or a sequence structure (packed rows cannot fold into the
        # batch): the op once per instance.
        if (any(d is not None for d in in_dims[2:6]) or batch_sizes is not None
                or resets is not None):
            return _per_instance(op, info, in_dims, args)
        n = info.batch_size
        xb = _batch_first(x, in_dims[0], n)  # (N, T, B, I) -> (T, N*B, I)
        N, T, B = xb.shape[:3]
        xf = xb.transpose(0, 1).reshape(T, N * B, xb.shape[3]).contiguous()
        hb = _batch_first(h0, in_dims[1], n)
        hf = None if hb is None else hb.reshape(N * B, hb.shape[2]).contiguous()
        out = op(xf, hf, w_ih, w_hh, b_ih, b_hh, reset_after)
        if isinstance(out, Tensor):  # the inference op: y
            return out.view(T, N, B, out.shape[2]), 1
        return tuple(o.view(T, N, B, o.shape[2]) for o in out), (1,) * len(out)

    return rule


def _vmap_backward_rule(op):
    def rule(info, in_dims, *args):
        return _per_instance(op, info, _all_dims(in_dims, args), args)

    return rule


def register_vmap_rules(prefix: str) -> None:
    """Batching rules for ``fusedgru::<prefix>_fwd`` / ``_bwd`` / ``_infer`` (those that exist)."""
    for suffix, make in (("fwd", _vmap_forward_rule), ("infer", _vmap_forward_rule),
                         ("bwd", _vmap_backward_rule)):
        if hasattr(torch.ops.fusedgru, f"{prefix}_{suffix}"):
            op = getattr(torch.ops.fusedgru, f"{prefix}_{suffix}").default
            torch.library.register_vmap(f"fusedgru::{prefix}_{suffix}", make(op))


_functorch_functions = {}


def functorch_forward(impl) -> Callable:
    """``apply`` of an autograd.Function running ``impl``'s forward and backward ops with
    the registered formulas, for use under torch.func transforms (see above)."""
    key = impl.forward
    if key not in _functorch_functions:
        fwd_op, bwd_op = impl.forward, impl.backward

        class GRULayerBackward(torch.autograd.Function):
            generate_vmap_rule = True

            @staticmethod
            def forward(grad_y, x, h0, w_ih, w_hh, y, ws, reset_after, batch_sizes=None,
                        resets=None, need_dx=True, need_dw=True):
                return bwd_op(grad_y, x, h0, w_ih, w_hh, y, ws, reset_after, batch_sizes, resets,
                              need_dx, need_dw)

            setup_context = staticmethod(_setup_backward)
            backward = staticmethod(_backward_formula)

        class GRULayer(torch.autograd.Function):
            generate_vmap_rule = True

            @staticmethod
            def forward(x, h0, w_ih, w_hh, b_ih, b_hh, reset_after, batch_sizes=None,
                        resets=None):
                return fwd_op(x, h0, w_ih, w_hh, b_ih, b_hh, reset_after, batch_sizes, resets)

            setup_context = staticmethod(_setup_forward)
            backward = staticmethod(_make_forward_formula(GRULayerBackward.apply))

        _functorch_functions[key] = GRULayer.apply
    return _functorch_functions[key]


_with_autograd: Set[str] = set()


def register_autograd(prefix: str) -> None:
    """Registers the autograd formulas of ``fusedgru::<prefix>_fwd`` / ``_bwd`` (once)."""
    if prefix in _with_autograd:
        return
    bwd_op = getattr(torch.ops.fusedgru, f"{prefix}_bwd").default
    torch.library.register_autograd(f"fusedgru::{prefix}_fwd", _make_forward_formula(bwd_op),
                                    setup_context=_setup_forward)
    torch.library.register_autograd(f"fusedgru::{prefix}_bwd", _backward_formula,
                                    setup_context=_setup_backward)
    _with_autograd.add(prefix)


def register_extension_autograd() -> None:
    """The extension's ops (``fusedgru::gru_fwd`` / ``gru_bwd``, defined in C++ by
    fusedgru._C when it loads) get the same formulas; a no-op until they exist."""
    if "gru" not in _with_autograd and torch._C._dispatch_has_kernel("fusedgru::gru_fwd"):
        register_autograd("gru")
        register_vmap_rules("gru")


def register_inference_op(name: str, inference_impl: Callable) -> Callable:
    """Registers ``fusedgru::<name>_infer`` (the shared forward schema, returning y only,
    with a fake implementation).  No autograd: function.gru_layer calls it only when
    nothing needs a gradient."""

    @torch.library.custom_op(f"fusedgru::{name}_infer", mutates_args=())
    def infer(
        x: Tensor,
        h0: Optional[Tensor],
        w_ih: Tensor,
        w_hh: Tensor,
        b_ih: Optional[Tensor],
        b_hh: Optional[Tensor],
        reset_after: bool,
        batch_sizes: Optional[Tensor] = None,
        resets: Optional[Tensor] = None,
    ) -> Tensor:
        return inference_impl(x, h0, w_ih, w_hh, b_ih, b_hh, reset_after, batch_sizes, resets)

    infer.register_fake(fake_inference)
    torch.library.register_vmap(f"fusedgru::{name}_infer", _vmap_forward_rule(
        getattr(torch.ops.fusedgru, f"{name}_infer").default))
    return getattr(torch.ops.fusedgru, f"{name}_infer")


def register_backend_ops(
    name: str, forward_impl: Callable, backward_impl: Callable
) -> Tuple[Callable, Callable]:
    """Registers ``fusedgru::<name>_fwd`` and ``fusedgru::<name>_bwd`` with the shared schema,
    fake implementations and autograd formulas; returns the two ops
    (``torch.ops.fusedgru.<name>_fwd`` ...)."""

    @torch.library.custom_op(f"fusedgru::{name}_fwd", mutates_args=())
    def fwd(
        x: Tensor,
        h0: Optional[Tensor],
        w_ih: Tensor,
        w_hh: Tensor,
        b_ih: Optional[Tensor],
        b_hh: Optional[Tensor],
        reset_after: bool,
        batch_sizes: Optional[Tensor] = None,
        resets: Optional[Tensor] = None,
    ) -> Tuple[Tensor, Tensor]:
        return forward_impl(x, h0, w_ih, w_hh, b_ih, b_hh, reset_after, batch_sizes, resets)

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
        batch_sizes: Optional[Tensor] = None,
        resets: Optional[Tensor] = None,
        need_dx: bool = True,
        need_dw: bool = True,
    ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        return backward_impl(grad_y, x, h0, w_ih, w_hh, y, ws, reset_after, batch_sizes, resets,
                             need_dx, need_dw)

    fwd.register_fake(fake_forward)
    bwd.register_fake(fake_backward)
    register_autograd(name)
    register_vmap_rules(name)
    return getattr(torch.ops.fusedgru, f"{name}_fwd"), getattr(torch.ops.fusedgru, f"{name}_bwd")


# The reference backend: the float64-checkable Python implementation, on any device and dtype.
reference_fwd, reference_bwd = register_backend_ops(
    "reference", reference.gru_layer_forward, reference.gru_layer_backward
)
