"""ONNX export: FusedGRU becomes ONNX's standard ``GRU`` operator, one node per layer.

torch.onnx.export of a model holding FusedGRU (the default exporter, ``dynamo=True``, and
the TorchScript-based one, ``dynamo=False``) sees the layer loop below instead of the
kernels: each layer is one ``GRU`` node (both directions in it), with
``linear_before_reset=1`` for reset_after=True (what nn.GRU, cuDNN and ONNX Runtime's
default GRU compute) and 0 for reset_after=False, so any ONNX runtime runs the model with
its own GRU kernel.  The weights go in ONNX's layout: gates in the order z, r, n (torch
stacks them r, z, n), W and R stacked over directions, B = [Wb, Rb].

``gru_onnx_reference`` computes the ONNX operator's definition in PyTorch: it is the
eager value of the node while exporting, and the tests compare it with FusedGRU.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["exporting", "gru_onnx_reference", "gru_layers"]


# The exporters' own flags, read directly: torch.onnx.is_in_onnx_export imports them on
# every call, a cost every FusedGRU call would pay.  Where they moved (another torch), the
# public query answers instead.
try:
    from torch.onnx._internal.exporter import _flags as _dynamo_flags
    from torch.onnx._internal.torchscript_exporter._globals import GLOBALS as _ts_globals
    _dynamo_flags._is_onnx_exporting, _ts_globals.in_onnx_export  # noqa: B018
except (ImportError, AttributeError):
    _dynamo_flags = _ts_globals = None


def exporting_flags() -> Optional[str]:
    """exporting() outside a compiled region (where torch.compiler.is_compiling() is False):
    the exporters' own flags only (the lean call's check, after its is_compiling)."""
    if _dynamo_flags is not None:
        if _dynamo_flags._is_onnx_exporting:
            return "dynamo"
        return "torchscript" if _ts_globals.in_onnx_export else None
    return "torchscript" if torch.onnx.is_in_onnx_export() else None


def exporting() -> Optional[str]:
    """"dynamo" or "torchscript" while torch.onnx.export runs, else None."""
    if torch.compiler.is_compiling():  # Dynamo knows the public query, not the flags
        if not torch.onnx.is_in_onnx_export():
            return None
        return "dynamo" if _dynamo_flags is None or _dynamo_flags._is_onnx_exporting else "torchscript"
    return exporting_flags()


def _zrn(t: Tensor, H: int) -> Tensor:
    """torch's gate order (r, z, n) -> ONNX's (z, r, n), along dim 0."""
    return torch.cat([t[H:2 * H], t[:H], t[2 * H:]], dim=0)


def _onnx_weights(layer_weights, H: int):
    """[(w_ih, w_hh, b_ih, b_hh)] per direction -> W (D, 3H, I), R (D, 3H, H), B (D, 6H)."""
    W = torch.stack([_zrn(w_ih, H) for w_ih, _, _, _ in layer_weights])
    R = torch.stack([_zrn(w_hh, H) for _, w_hh, _, _ in layer_weights])
    if layer_weights[0][2] is None:
        return W, R, None
    B = torch.stack([torch.cat([_zrn(b_ih, H), _zrn(b_hh, H)]) for _, _, b_ih, b_hh in layer_weights])
    return W, R, B


def gru_onnx_reference(X: Tensor, W: Tensor, R: Tensor, B: Optional[Tensor],
                       initial_h: Optional[Tensor], linear_before_reset: int) -> Tuple[Tensor, Tensor]:
    """ONNX's GRU (opset 14 definition, default activations, no sequence_lens) in PyTorch.

    X (T, N, I), W (D, 3H, I), R (D, 3H, H), B (D, 6H) or None, initial_h (D, N, H) or
    None.  Returns Y (T, D, N, H) and Y_h (D, N, H)."""
    D, G, _ = W.shape
    H = G // 3
    T, N, _ = X.shape
    ys, hs = [], []
    for d in range(D):
        wb, rb = (B[d, :G], B[d, G:]) if B is not None else (X.new_zeros(G), X.new_zeros(G))
        h = initial_h[d] if initial_h is not None else X.new_zeros(N, H)
        out = [None] * T
        steps = range(T) if d == 0 else range(T - 1, -1, -1)
        for t in steps:
            xw = X[t] @ W[d].T + wb
            z = torch.sigmoid(xw[:, :H] + h @ R[d, :H].T + rb[:H])
            r = torch.sigmoid(xw[:, H:2 * H] + h @ R[d, H:2 * H].T + rb[H:2 * H])
            if linear_before_reset:
                n = torch.tanh(xw[:, 2 * H:] + r * (h @ R[d, 2 * H:].T + rb[2 * H:]))
            else:
                n = torch.tanh(xw[:, 2 * H:] + (r * h) @ R[d, 2 * H:].T + rb[2 * H:])
            h = (1 - z) * n + z * h
            out[t] = h
        ys.append(torch.stack(out))
        hs.append(h)
    return torch.stack(ys, 1), torch.stack(hs)


def _unused(g):
    """An absent optional input of a TorchScript-exporter node."""
    n = g.op("prim::Constant")
    n.setType(torch._C.OptionalType.ofTensor())
    return n


class _TorchScriptGRU(torch.autograd.Function):
    """One ONNX GRU node for the TorchScript-based exporter (its ``symbolic``); the
    forward is the operator's value, which that exporter's trace runs."""

    @staticmethod
    def forward(ctx, X, W, R, B, initial_h, linear_before_reset: int):
        return gru_onnx_reference(X, W, R, B, initial_h, linear_before_reset)

    @staticmethod
    def symbolic(g, X, W, R, B, initial_h, linear_before_reset: int):
        D = W.type().sizes()[0] if W.type().sizes() else None
        H = R.type().sizes()[2]
        absent = lambda v: v is None or v.node().mustBeNone()  # noqa: E731
        return g.op("GRU", X, W, R, _unused(g) if absent(B) else B, _unused(g),
                    _unused(g) if absent(initial_h) else initial_h,
                    hidden_size_i=H, direction_s="bidirectional" if D == 2 else "forward",
                    linear_before_reset_i=linear_before_reset, outputs=2)


def _gru_node(how: str, X, W, R, B, initial_h, linear_before_reset: int):
    if how == "torchscript":
        return _TorchScriptGRU.apply(X, W, R, B, initial_h, linear_before_reset)
    D, H = W.shape[0], R.shape[2]
    T, N = X.shape[0], X.shape[1]
    Y, Y_h = torch.onnx.ops.symbolic_multi_out(
        "GRU", [X, W, R, B, None, initial_h],
        {"hidden_size": int(H), "direction": "bidirectional" if D == 2 else "forward",
         "linear_before_reset": linear_before_reset},
        dtypes=(X.dtype, X.dtype), shapes=([T, D, N, H], [D, N, H]), version=14)
    return Y, Y_h


def gru_layers(how: str, x: Tensor, hx: Optional[Tensor], layers: Sequence, num_layers: int,
               D: int, H: int, dropout: float, training: bool, reset_after: bool):
    """The multi-layer GRU as ONNX GRU nodes: x (T, B, I), hx (L*D, B, H) or None ->
    (output (T, B, D*H), h_n (L*D, B, H)); ``layers`` as functional._layer_weights gives."""
    lbr = 1 if reset_after else 0
    layer_input = x
    h_n: List[Tensor] = []
    for layer in range(num_layers):
        W, R, Bias = _onnx_weights(layers[layer * D:(layer + 1) * D], H)
        h0 = hx[layer * D:(layer + 1) * D] if hx is not None else None
        Y, Y_h = _gru_node(how, layer_input, W, R, Bias, h0, lbr)
        T, N = Y.shape[0], Y.shape[2]
        layer_input = Y.transpose(1, 2).reshape(T, N, D * H)  # (T, D, N, H) -> (T, N, D*H)
        h_n.append(Y_h)
        if dropout > 0 and training and layer < num_layers - 1:
            layer_input = F.dropout(layer_input, p=dropout, training=True)
    return layer_input, torch.cat(h_n, 0)
