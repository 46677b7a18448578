"""fusedgru.functional: the functional form of FusedGRU and FusedGRUCell.

Layers, directions, packed sequences and dropout live here, as differentiable PyTorch
around the one autograd boundary (fusedgru.function.gru_layer).  Input checking is
here too, so that every backend receives contiguous, time-major, validated tensors.

Packed (variable-length) input runs on the packed rows themselves, as nn.GRU does: the
kernels take the PackedSequence's batch_sizes and compute at step t only the rows still
active (no padded work, forward and backward).  h_n is read at each sequence's own last
row.  The reverse direction permutes the packed rows so that each sequence is reversed
within its own length (packing.packed_indices), so it too starts at its own last step.
hx and h_n are in the caller's batch order, the kernels' rows in length-sorted order.

resets (state resets inside a sequence): the kernels take the (T, B) mask and zero the
state entering each marked step, in every layer.  The reverse direction of a
bidirectional GRU processes each segment on its own: reversed, its state restarts where the
forward direction's next step starts a segment (resets[t + 1]).

Under torch.onnx.export the layers become ONNX GRU nodes instead (fusedgru/onnx.py).
"""

from __future__ import annotations

import numbers
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence

from . import backends
from . import ops, packing
from . import onnx as fused_onnx
from .errors import ArgumentTypeError, DTypeError, NotATensorError, ShapeError
from .function import gru_layer

__all__ = ["gru", "gru_cell", "check_module_args"]


# ----------------------------------------------------------------------------------------
# Argument checks (shared by the modules and the functional form)
# ----------------------------------------------------------------------------------------


def _check_positive_int(name: str, value) -> int:
    # bool is an int to nn.GRU too (GRU(4, True) has hidden_size 1): accepted alike.
    if not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected a positive int, got {type(value).__name__} {value!r}")
    if value <= 0:
        raise ValueError(f"{name}: expected a positive int, got {value}")
    return int(value)


def _check_size(name: str, value) -> int:
    """A GRUCell size: nn.GRUCell accepts 0 (an empty dimension) and fails on a negative one
    with RuntimeError while allocating."""
    if not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected a non-negative int, got {type(value).__name__} {value!r}")
    if value < 0:
        raise ShapeError(f"{name}: expected a non-negative int, got {value}")
    return int(value)


def _check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected a bool, got {type(value).__name__} {value!r}")
    return value


def _check_dropout(value) -> float:
    # nn.GRU raises ValueError for anything that is not a number in [0, 1], bools included.
    if isinstance(value, bool) or not isinstance(value, numbers.Number):
        raise ArgumentTypeError(f"dropout: expected a float in [0, 1], got {type(value).__name__}")
    # NaN fails both comparisons; no math.isnan, which torch.compile cannot trace when it
    # makes the module's float attributes symbolic (dynamic=True).
    if not (0 <= value <= 1):
        raise ValueError(f"dropout: expected a float in [0, 1], got {value}")
    return float(value)


def check_module_args(input_size, hidden_size, num_layers, bias, batch_first, dropout,
                      bidirectional, reset_after, backend, *, cell: bool = False):
    """Validates FusedGRU / FusedGRUCell constructor arguments; returns them normalised.

    As nn.GRU: bias and batch_first must be bools, bidirectional is read for its truth
    value; as nn.GRUCell (``cell``): sizes may be 0."""
    size = _check_size if cell else _check_positive_int
    return (
        size("input_size", input_size),
        size("hidden_size", hidden_size),
        _check_positive_int("num_layers", num_layers),
        _check_bool("bias", bias),
        _check_bool("batch_first", batch_first),
        _check_dropout(dropout),
        bool(bidirectional),
        _check_bool("reset_after", reset_after),
        backends.check_backend_name(backend),
    )


def _check_tensor_like(name: str, t: Tensor, ref: Tensor, ref_name: str) -> None:
    if not isinstance(t, Tensor):
        raise NotATensorError(f"{name}: expected a Tensor, got {type(t).__name__}")
    if t.dtype != ref.dtype:
        raise DTypeError(
            f"{name}: expected dtype {ref.dtype} (the dtype of {ref_name}), got {t.dtype}"
        )
    if t.device != ref.device:
        raise RuntimeError(
            f"{name}: expected a tensor on {ref.device} (the device of {ref_name}), "
            f"got one on {t.device}"
        )


@torch.compiler.assume_constant_result
def _resolve(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    # The table lookup is a constant for a given (name, device, dtype): torch.compile
    # evaluates it once while tracing instead of tracing through the table.
    name = backends.resolve_backend(backend, device, dtype)
    # The extension's ops are defined in C++ when fusedgru._C loads; they get their autograd
    # formulas (fusedgru/ops.py) on first use (a no-op afterwards, and for other backends).
    ops.register_extension_autograd()
    return name


# The computation dtype under torch.autocast, by device type, so that FusedGRU returns what
# nn.GRU returns.  CUDA (and other devices): the autocast dtype, as cuDNN's RNN runs in the
# lower precision under autocast (ATen's autocast wrapper of _cudnn_rnn).  CPU: nn.GRU there
# is composite: autocast runs its gate matmuls in bfloat16 but its state and its output stay
# float32.  FusedGRU returns the same float32, computed in float32 throughout: the fused CPU
# kernel has no bfloat16 path (the reference's would be slower than float32) and the result
# is at least as accurate (tests/test_ecosystem_autocast.py).
_AUTOCAST_FLOAT32_DEVICES = ("cpu",)


def _autocast(x: Tensor, hx: Optional[Tensor], layers):
    """Under torch.autocast for x's device type, casts the input, hx and the weights the way
    autocast casts nn.GRU's: floating-point tensors other than float64 go to the computation
    dtype (float64 is left alone, as autocast leaves it).  The casts are differentiable, so
    float32 parameters receive float32 gradients."""
    device_type = x.device.type
    if not ops.autocast_enabled(device_type):
        return x, hx, layers
    if device_type in _AUTOCAST_FLOAT32_DEVICES:
        dtype = torch.float32
    else:
        dtype = torch.get_autocast_dtype(device_type)

    def cast(t):
        eligible = (isinstance(t, Tensor) and t.is_floating_point() and t.dtype != torch.float64
                    and t.device.type == device_type)
        return t.to(dtype) if eligible else t

    return cast(x), cast(hx), [tuple(cast(t) for t in layer) for layer in layers]


def _layer_weights(weights: Sequence[Tensor], num_layers: int, num_directions: int):
    n = len(weights)
    per = n // (num_layers * num_directions) if num_layers * num_directions else 0
    if per not in (2, 4) or per * num_layers * num_directions != n:
        raise ValueError(
            f"weights: expected {2 * num_layers * num_directions} (no bias) or "
            f"{4 * num_layers * num_directions} tensors for num_layers={num_layers}, "
            f"bidirectional={num_directions == 2}, got {n}"
        )
    groups = [list(weights[k * per:(k + 1) * per]) for k in range(num_layers * num_directions)]
    return [(g[0], g[1], g[2] if per == 4 else None, g[3] if per == 4 else None) for g in groups]


def checked_layers(weights: Sequence[Tensor], num_layers: int, num_directions: int):
    """(layers, H): the flat weights grouped per layer-direction (_layer_weights) and
    checked (check_weights).  The modules keep it per set of Parameter objects
    (modules._checked_weights), so that a call checks only its input."""
    layers = _layer_weights(weights, num_layers, num_directions)
    return layers, check_weights(layers, num_directions)


def check_weights(layers, num_directions: int) -> int:
    """Shapes, dtypes and devices of every layer-direction's weights; returns H."""
    w_ih0, w_hh0 = layers[0][0], layers[0][1]
    if w_hh0.dim() != 2 or w_hh0.shape[0] != 3 * w_hh0.shape[1]:
        raise ShapeError(f"weight_hh_l0: expected shape (3*H, H), got {tuple(w_hh0.shape)}")
    H = w_hh0.shape[1]
    for k, (w_ih, w_hh, b_ih, b_hh) in enumerate(layers):
        layer, direction = divmod(k, num_directions)
        sfx = f"_l{layer}" + ("_reverse" if direction else "")
        in_size = w_ih0.shape[1] if layer == 0 else num_directions * H
        for name, t, shape in [
            ("weight_ih" + sfx, w_ih, (3 * H, in_size)),
            ("weight_hh" + sfx, w_hh, (3 * H, H)),
            ("bias_ih" + sfx, b_ih, (3 * H,)),
            ("bias_hh" + sfx, b_hh, (3 * H,)),
        ]:
            if t is None:
                continue
            if tuple(t.shape) != shape:
                raise ShapeError(f"{name}: expected shape {shape}, got {tuple(t.shape)}")
            if not t.dtype.is_floating_point:
                raise DTypeError(f"{name}: expected a floating-point dtype, got {t.dtype}")
            _check_tensor_like(name, t, w_ih0, "weight_ih_l0")
    return H


def _check_input(x: Tensor, input_size_seen: int, w_ih0: Tensor) -> None:
    if input_size_seen != w_ih0.shape[1]:
        raise ShapeError(
            f"input: expected input.size(-1) == input_size = {w_ih0.shape[1]}, "
            f"got {input_size_seen}"
        )
    if not x.dtype.is_floating_point:
        raise DTypeError(f"input: expected a floating-point dtype, got {x.dtype}")
    _check_tensor_like("input", x, w_ih0, "the weights")


def _layer_backend(backend: str, x: Tensor, B: int, H: int, I: int) -> str:
    """The backend that runs x's layers.  An empty batch, state or input (nn.GRUCell
    accepts sizes of 0) has nothing for a kernel to do: the reference handles it exactly."""
    if B == 0 or H == 0 or I == 0:
        return _resolve("reference", x.device, x.dtype)
    return _resolve(backend, x.device, x.dtype)


def layer_backend_name(backend: str, weight: Tensor) -> Optional[str]:
    """The backend that runs ``weight``'s device and dtype for ``backend``, or None."""
    try:
        return _resolve(backend, weight.device, weight.dtype)
    except backends.BackendUnavailableError:
        return None


# ----------------------------------------------------------------------------------------
# The functional GRU
# ----------------------------------------------------------------------------------------


def gru(
    input: Union[Tensor, PackedSequence],
    weights: Sequence[Tensor],
    hx: Optional[Tensor] = None,
    *,
    num_layers: int = 1,
    bidirectional: bool = False,
    batch_first: bool = False,
    dropout: float = 0.0,
    training: bool = False,
    reset_after: bool = True,
    backend: str = "auto",
    resets: Optional[Tensor] = None,
    _checked: Optional[Tuple[list, int]] = None,
) -> Tuple[Union[Tensor, PackedSequence], Tensor]:
    """A multi-layer GRU with torch.nn.GRU's semantics (see docs/SPEC.md section 3).

    input:   (T, B, I), (B, T, I) if batch_first, (T, I) unbatched, or a PackedSequence
    weights: nn.GRU's flat weights in its order: for each layer, for each direction,
             weight_ih (3H, I or D*H), weight_hh (3H, H)[, bias_ih (3H,), bias_hh (3H,)]
    hx:      (L*D, B, H), or (L*D, H) unbatched; zeros if None
    resets:  bool, shaped like the input's leading dimensions ((T, B), (B, T) if
             batch_first, (T,) unbatched): resets[t, b] starts a new sequence at step t of
             row b, whose state enters as zeros instead of h_{t-1} (or hx at t = 0), in
             every layer; no gradient crosses it.  Reverse direction: the state entering
             step t restarts where resets[t + 1] is set.  Not with a PackedSequence.
    Returns (output (T, B, D*H) laid out like the input, h_n (L*D, B, H)).
    Under torch.autocast, input, hx and weights are cast as nn.GRU's are (see _autocast).
    _checked: (layers, H) from an earlier check_weights of these same weights (FusedGRU's
    cache), or None to check them now.
    """
    num_layers = _check_positive_int("num_layers", num_layers)
    _check_bool("bidirectional", bidirectional)
    _check_bool("batch_first", batch_first)
    _check_bool("reset_after", reset_after)
    dropout = _check_dropout(dropout)
    D = 2 if bidirectional else 1
    layers, H = _checked if _checked is not None else checked_layers(weights, num_layers, D)

    packed = isinstance(input, PackedSequence)
    if packed:
        if resets is not None:
            raise ValueError(
                "resets: not supported with a PackedSequence input (each packed sequence "
                "already starts from hx); pass the padded (T, B, I) tensor with resets, or "
                "split the sequences at their resets before packing")
        return _gru_packed(input, hx, layers, H, num_layers, D, dropout, training,
                           reset_after, backend)
    if not isinstance(input, Tensor):
        raise NotATensorError(f"input: expected a Tensor or PackedSequence, got {type(input).__name__}")
    if input.dim() not in (2, 3):
        raise ShapeError(
            f"input: expected a 2-D (unbatched) or 3-D (batched) tensor, got {input.dim()}-D"
        )
    unbatched = input.dim() == 2
    x = input.unsqueeze(1) if unbatched else (input.transpose(0, 1) if batch_first else input)
    x, hx, layers = _autocast(x, hx, layers)  # casts keep the shapes checked above
    T, B, I = x.shape
    _check_input(x, I, layers[0][0])

    if hx is not None:
        if not isinstance(hx, Tensor):
            raise NotATensorError(f"hx: expected a Tensor, got {type(hx).__name__}")
        expected = (num_layers * D, H) if unbatched else (num_layers * D, B, H)
        if hx.dim() != len(expected):
            raise ShapeError(
                f"hx: expected a {len(expected)}-D tensor of shape {expected} for the "
                f"{'unbatched 2-D' if unbatched else 'batched 3-D'} input, got a {hx.dim()}-D "
                f"one of shape {tuple(hx.shape)}"
            )
        if tuple(hx.shape) != expected:
            raise ShapeError(
                f"hx: expected shape {expected} (num_layers * num_directions, "
                f"{'' if unbatched else 'batch, '}hidden_size), got {tuple(hx.shape)}"
            )
        _check_tensor_like("hx", hx, x, "input")
        if unbatched:
            hx = hx.unsqueeze(1)
    if T == 0:
        raise ShapeError("input: expected a sequence of at least one step, got length 0")
    if resets is not None:
        resets = _check_resets(resets, x, unbatched, batch_first)

    how = fused_onnx.exporting()
    if how is not None:  # torch.onnx.export: ONNX GRU nodes instead of the kernels
        if resets is not None:
            raise RuntimeError(
                "resets: ONNX export of a GRU with state resets is not supported (the ONNX "
                "GRU operator has no resets): export it without resets, or run the steps "
                "between resets as separate calls")
        output, h_n_t = fused_onnx.gru_layers(how, x, hx, layers, num_layers, D, H, dropout,
                                              training, reset_after)
        return _shape_outputs(output, h_n_t, unbatched, batch_first)

    name = _layer_backend(backend, x, B, H, I)
    # Reversed in time, step s of the reverse direction is step T-1-s, and its state
    # restarts where step T-s starts a segment (never at s = 0: hx enters there).
    resets_rev = (torch.cat([resets.new_zeros(1, B), resets.flip(0)[:-1]])
                  if resets is not None and D == 2 else None)

    output, h_n_t = _run_layers(
        x, hx, layers, num_layers, D, dropout, training, reset_after, name, backend == "auto",
        reverse=lambda t: t.flip(0), final=lambda y: y[-1],
        seq=({"resets": resets}, {"resets": resets_rev}))
    return _shape_outputs(output, h_n_t, unbatched, batch_first)


def _run_layers(x: Tensor, hx: Optional[Tensor], layers, num_layers: int, D: int,
                dropout: float, training: bool, reset_after: bool, name: str, auto: bool, *,
                reverse, final, seq) -> Tuple[Tensor, Tensor]:
    """The layers and directions over x's rows, dense (T, B, I) or packed (N, I) on
    backend ``name`` (what "auto" chose, if ``auto``):
    reverse(t) puts rows in the reverse direction's order (its own inverse), final(y)
    gives each sequence's state after a direction's last step, seq = (forward, reverse)
    keywords of gru_layer (the sequence structure).  Returns (output, h_n (L*D, B, H))."""
    layer_input = x.contiguous()
    h_n: List[Tensor] = []
    for layer in range(num_layers):
        outputs = []
        for direction in range(D):
            w_ih, w_hh, b_ih, b_hh = layers[layer * D + direction]
            h0 = hx[layer * D + direction].contiguous() if hx is not None else None
            xin = reverse(layer_input) if direction else layer_input
            y = gru_layer(xin, h0, w_ih, w_hh, b_ih, b_hh, reset_after, name, auto=auto,
                          **seq[direction])
            h_n.append(final(y))
            outputs.append(reverse(y) if direction else y)
        layer_input = outputs[0] if D == 1 else torch.cat(outputs, dim=-1)
        if dropout > 0 and training and layer < num_layers - 1:
            layer_input = F.dropout(layer_input, p=dropout, training=True)
    return layer_input, (h_n[0].unsqueeze(0) if len(h_n) == 1 else torch.stack(h_n, 0))


def _check_resets(resets, x: Tensor, unbatched: bool, batch_first: bool) -> Tensor:
    """resets laid out like the input's leading dimensions -> (T, B) bool on x's device."""
    T, B = x.shape[0], x.shape[1]
    if not isinstance(resets, Tensor):
        raise NotATensorError(f"resets: expected a bool Tensor, got {type(resets).__name__}")
    if resets.dtype != torch.bool:
        raise DTypeError(f"resets: expected a bool tensor (True where a new sequence starts), "
                         f"got {resets.dtype}; convert a 0/1 mask with .bool()")
    expected = (T,) if unbatched else ((B, T) if batch_first else (T, B))
    what = ("(T,) for the unbatched input" if unbatched else
            "(B, T), the input's leading dimensions with batch_first=True" if batch_first else
            "(T, B), the input's leading dimensions")
    if tuple(resets.shape) != expected:
        raise ShapeError(f"resets: expected shape {expected} {what}, got {tuple(resets.shape)}")
    if resets.device != x.device:
        raise RuntimeError(f"resets: expected a tensor on {x.device} (the device of input), "
                           f"got one on {resets.device}")
    if unbatched:
        resets = resets.unsqueeze(1)
    elif batch_first:
        resets = resets.transpose(0, 1)
    return resets.contiguous()


def _gru_packed(input: PackedSequence, hx: Optional[Tensor], layers, H: int, num_layers: int,
                D: int, dropout: float, training: bool, reset_after: bool, backend: str):
    """The layers over a PackedSequence's rows (module docstring): no padded work."""
    data, batch_sizes = input.data, input.batch_sizes
    if not isinstance(data, Tensor) or data.dim() != 2:
        raise ShapeError(f"input: expected a PackedSequence of (N, I) data, got "
                         f"{getattr(data, 'dim', lambda: '?')()}-D data")
    x, hx, layers = _autocast(data, hx, layers)
    I = x.shape[1]
    _check_input(x, I, layers[0][0])
    # B: packed sorted, a value (batch_sizes[0]; under torch.compile an unbacked size, at
    # least 1 as every PackedSequence's), else the length of sorted_indices.
    B = (input.sorted_indices.shape[0] if input.sorted_indices is not None
         else int(batch_sizes[0]))
    if hx is not None:
        if not isinstance(hx, Tensor):
            raise NotATensorError(f"hx: expected a Tensor, got {type(hx).__name__}")
        expected = (num_layers * D, B, H)
        if torch.compiler.is_compiling() and input.sorted_indices is None:
            # no guard on an unbacked size: a run-time check instead
            torch._check(hx.dim() == 3 and hx.shape[1] == B,
                         lambda: f"hx: expected shape {expected}, got {tuple(hx.shape)}")
            expected = (num_layers * D, hx.shape[1], H)
        if tuple(hx.shape) != expected:
            raise ShapeError(f"hx: expected shape {expected} (num_layers * num_directions, "
                             f"batch, hidden_size), got {tuple(hx.shape)}")
        _check_tensor_like("hx", hx, x, "input")
        if input.sorted_indices is not None:  # the caller's order -> the packed rows' order
            hx = hx.index_select(1, input.sorted_indices)
    if fused_onnx.exporting() is not None:
        raise RuntimeError(
            "input: ONNX export of a PackedSequence input is not supported: export the "
            "model with the padded (T, B, I) tensor instead")

    name = _layer_backend(backend, x, 1, H, I)  # B >= 1: a PackedSequence is never empty
    reverse, last = packing.packed_indices(input)

    layer_input, h_n_t = _run_layers(
        x, hx, layers, num_layers, D, dropout, training, reset_after, name, backend == "auto",
        reverse=lambda t: t.index_select(0, reverse), final=lambda y: y.index_select(0, last),
        seq=({"batch_sizes": batch_sizes},) * 2)
    if input.unsorted_indices is not None:  # back to the caller's order
        h_n_t = h_n_t.index_select(1, input.unsorted_indices)
    return PackedSequence(layer_input, batch_sizes, input.sorted_indices,
                          input.unsorted_indices), h_n_t


def _shape_outputs(output: Tensor, h_n: Tensor, unbatched: bool, batch_first: bool):
    """(T, B, D*H), (L*D, B, H) -> laid out like the input was."""
    if unbatched:
        return output.squeeze(1), h_n.squeeze(1)
    if batch_first:
        output = output.transpose(0, 1)
    return output, h_n


def gru_cell(
    input: Tensor,
    hx: Optional[Tensor],
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Optional[Tensor] = None,
    b_hh: Optional[Tensor] = None,
    *,
    reset_after: bool = True,
    backend: str = "auto",
    _checked: Optional[Tuple[list, int]] = None,
) -> Tensor:
    """One GRU step with torch.nn.GRUCell's semantics.

    input: (B, I) or (I,) unbatched;  hx: (B, H) or (H,), zeros if None.  Returns h' like hx.
    """
    if not isinstance(input, Tensor):
        raise NotATensorError(f"input: expected a Tensor, got {type(input).__name__}")
    if input.dim() not in (1, 2):
        raise ShapeError(
            f"input: expected a 1-D (unbatched) or 2-D (batched) tensor, got {input.dim()}-D"
        )
    unbatched = input.dim() == 1
    if hx is not None:
        if not isinstance(hx, Tensor):
            raise NotATensorError(f"hx: expected a Tensor, got {type(hx).__name__}")
        if hx.dim() != input.dim():
            raise ShapeError(
                f"hx: expected a {input.dim()}-D tensor to match the {input.dim()}-D input, "
                f"got {hx.dim()}-D"
            )
        hidden = w_hh.shape[-1] if isinstance(w_hh, Tensor) and w_hh.dim() == 2 else None
        expected = input.shape[:-1] + ((hidden,) if hidden is not None else hx.shape[-1:])
        if tuple(hx.shape) != tuple(expected):
            what = "(H,) for the unbatched input" if unbatched else "(B, H)"
            raise ShapeError(f"hx: expected shape {tuple(expected)} {what}, "
                             f"got {tuple(hx.shape)}")
        hx = hx.unsqueeze(0) if unbatched else hx
        hx = hx.unsqueeze(0)  # (1, B, H): one layer, one direction
    x = input.unsqueeze(0) if unbatched else input
    weights = [w_ih, w_hh] + ([b_ih, b_hh] if b_ih is not None else [])
    if (torch.compiler.is_compiling() or torch.jit.is_tracing() or fused_onnx.exporting()
            or ops.autocast_enabled(x.device.type)):
        # the general path: what it does for tracers, exporters and autocast
        _, h_n = gru(x.unsqueeze(0), weights, hx, reset_after=reset_after, backend=backend,
                     _checked=_checked)
        h = h_n[0]
    else:
        # One layer, one direction, one step: straight to the layer, so that a call costs
        # little more than its kernel (a cell is called once per step from Python).
        _check_bool("reset_after", reset_after)
        if _checked is None:
            _checked = checked_layers(weights, 1, 1)
        (w_ih, w_hh, b_ih, b_hh), = _checked[0]
        B, I = x.shape
        _check_input(x, I, w_ih)
        h0 = None
        if hx is not None:
            _check_tensor_like("hx", hx, x, "input")
            h0 = hx[0].contiguous()
        name = _layer_backend(backend, x, B, _checked[1], I)
        h = gru_layer(x.unsqueeze(0).contiguous(), h0, w_ih, w_hh, b_ih, b_hh, reset_after,
                      name, auto=backend == "auto")[0]
    return h.squeeze(0) if unbatched else h
