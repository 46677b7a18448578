"""FusedGRU and FusedGRUCell: drop-in replacements for torch.nn.GRU and torch.nn.GRUCell.

Parameters carry torch.nn.GRU's names, shapes, order and initialisation, so state dicts
move between the two in both directions with no converter.
"""

from __future__ import annotations

import math
import warnings
import weakref
from typing import List, Optional

import torch
from torch import Tensor, nn

from . import backends, ops
from . import functional as F_gru
from . import onnx as fused_onnx
from .errors import ScriptingUnsupportedError

__all__ = ["FusedGRU", "FusedGRUCell"]


def _backend_in_use(backend: str, weight: Tensor) -> str:
    try:
        resolved = backends.resolve_backend(backend, weight.device, weight.dtype)
    except backends.BackendUnavailableError as exc:
        return f"unavailable: {exc}"
    return resolved if backend != "auto" else f"auto -> {resolved}"


def _checked_weights(module: nn.Module, weights: List[Tensor], num_layers: int,
                     bidirectional: bool):
    """functional.checked_layers of ``module``'s weights, kept while they stay
    the same objects with the same dtype and device, so that a call checks only its input.
    A shape cannot change without a new Parameter object except through ``.data``, which the
    kernels' own shape checks catch.  Not cached while torch.compile traces (the compiled
    graph checks nothing at run time anyway) or torch.jit.trace records (its check re-traces
    and compares the graphs)."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return None
    w0 = weights[0]
    key = (len(weights), num_layers, bidirectional, w0.dtype, w0.device)
    cache = module.__dict__.get("_weights_cache")
    if cache is not None and cache[0] == key and all(a is b for a, b in zip(cache[1], weights)):
        return cache[2]
    checked = F_gru.checked_layers(weights, num_layers, 2 if bidirectional else 1)
    module.__dict__["_weights_cache"] = (key, tuple(weights), checked)
    return checked


def _refuse_scripting(module) -> None:
    name = type(module).__name__
    raise ScriptingUnsupportedError(
        f"torch.jit.script does not support {name}: its kernels are chosen in Python and "
        "called as registered dispatcher ops, which TorchScript cannot compile.  Use "
        "torch.compile or torch.export (both trace it without graph breaks), torch.jit.trace, "
        f"or script the torch.nn twin: fusedgru.to_torch(model) converts every {name} in a "
        "model back to torch.nn (or call .to_torch() on the module)."
    )


class FusedGRU(nn.Module):
    """torch.nn.GRU with fused kernels.  Same arguments, parameters and forward, plus:

    reset_after: True (default) computes torch.nn.GRU / cuDNN's GRU, n = tanh(i_n + r*(W_hn h
        + b_hn)); False computes the textbook GRU of Cho et al., n = tanh(i_n + W_hn (r*h)
        + b_hn).
    backend: "auto" (fastest for the device and dtype), "cuda", "triton", "cpu" or
        "reference"; see fusedgru.available_backends().
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        proj_size: int = 0,
        device=None,
        dtype=None,
        *,
        reset_after: bool = True,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        # nn.GRU's positional order (proj_size before device), and its rejection: a
        # projection exists only for LSTM.  0 (no projection) is what a GRU computes.
        if proj_size != 0:
            raise ValueError("proj_size: the proj_size argument is only supported for LSTM, "
                             f"not RNN or GRU (got proj_size={proj_size!r}; leave it at 0)")
        (input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
         reset_after, backend) = F_gru.check_module_args(
            input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
            reset_after, backend)
        if dropout > 0 and num_layers == 1:
            warnings.warn(
                "dropout option adds dropout after all but last recurrent layer, so non-zero "
                f"dropout expects num_layers greater than 1, but got dropout={dropout} and "
                f"num_layers={num_layers}"
            )
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.bias = bias
        self.batch_first = batch_first
        self.dropout = dropout
        self.bidirectional = bidirectional
        self.reset_after = reset_after
        self.backend = backend
        # What code written for nn.GRU reads off it.
        self.mode = "GRU"
        self.proj_size = 0
        factory = {"device": device, "dtype": dtype}
        D = 2 if bidirectional else 1
        G = 3 * hidden_size
        self._flat_weights_names: List[str] = []
        self._all_weights: List[List[str]] = []  # names, per layer and direction
        for layer in range(num_layers):
            in_size = input_size if layer == 0 else D * hidden_size
            for direction in range(D):
                sfx = f"_l{layer}" + ("_reverse" if direction else "")
                shapes = [("weight_ih", (G, in_size)), ("weight_hh", (G, hidden_size))]
                if bias:
                    shapes += [("bias_ih", (G,)), ("bias_hh", (G,))]
                for prefix, shape in shapes:
                    setattr(self, prefix + sfx, nn.Parameter(torch.empty(shape, **factory)))
                    self._flat_weights_names.append(prefix + sfx)
                self._all_weights.append([prefix + sfx for prefix, _ in shapes])
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """As torch.nn.GRU: every parameter uniform(-1/sqrt(H), 1/sqrt(H))."""
        bound = 1.0 / math.sqrt(self.hidden_size) if self.hidden_size > 0 else 0.0
        for w in self.parameters():
            nn.init.uniform_(w, -bound, bound)

    @property
    def _flat_weights(self) -> List[Tensor]:
        params = self._parameters  # a dict read: getattr goes through Module.__getattr__
        try:
            return [params[name] for name in self._flat_weights_names]
        except KeyError:  # a weight moved out of _parameters (parametrize, weight_norm)
            return [getattr(self, name) for name in self._flat_weights_names]

    @property
    def all_weights(self) -> List[List[Tensor]]:
        per = 4 if self.bias else 2
        w = self._flat_weights
        return [w[k:k + per] for k in range(0, len(w), per)]

    def flatten_parameters(self) -> None:
        """A no-op kept for drop-in compatibility: fusedgru reads parameters in place."""

    def __prepare_scriptable__(self):
        # torch.jit.script calls this on every submodule before compiling it.
        _refuse_scripting(self)

    def __getstate__(self):
        # pickle, torch.save(module), copy.deepcopy: without the lean call's plan (it holds
        # the extension's op handles, which do not pickle); the next call makes it again.
        state = self.__dict__.copy()
        state.pop("_lean", None)
        return state

    def forward(self, input, hx: Optional[Tensor] = None, *, resets: Optional[Tensor] = None):
        """As torch.nn.GRU.forward, plus ``resets``: a bool tensor shaped like the input's
        leading dimensions ((T, B), (B, T) with batch_first, (T,) unbatched); True at
        [t, b] starts a new sequence at step t of row b, whose state enters as zeros
        (instead of h_{t-1}, or hx at t = 0) in every layer, and no gradient crosses it
        (recurrent RL rollouts, streams of documents).  See fusedgru.functional.gru."""
        weights = self._flat_weights
        lean = self.__dict__.get("_lean")
        if resets is None and _lean_serves(lean, self):
            out = _lean_gru_call(lean, weights, input, hx)
            if out is not None:
                return out
        checked = _checked_weights(self, weights, self.num_layers, self.bidirectional)
        out = F_gru.gru(
            input,
            weights,
            hx,
            num_layers=self.num_layers,
            bidirectional=self.bidirectional,
            batch_first=self.batch_first,
            dropout=self.dropout,
            training=self.training,
            reset_after=self.reset_after,
            backend=self.backend,
            resets=resets,
            _checked=checked,
        )
        if checked is not None and _lean_stale(lean, self, weights):
            self.__dict__["_lean"] = _lean_plan(self, weights)
        return out

    @property
    def backend_in_use(self) -> str:
        """The backend that runs this module's parameters' device and dtype."""
        return _backend_in_use(self.backend, self.weight_hh_l0)

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        if self.num_layers != 1:
            s += f", num_layers={self.num_layers}"
        if not self.bias:
            s += ", bias=False"
        if self.batch_first:
            s += ", batch_first=True"
        if self.dropout:
            s += f", dropout={self.dropout}"
        if self.bidirectional:
            s += ", bidirectional=True"
        return s + f", reset_after={self.reset_after}, backend={self.backend_in_use}"

    @classmethod
    def from_torch(cls, gru: nn.GRU, *, backend: str = "auto", share: bool = False) -> "FusedGRU":
        """A FusedGRU computing exactly what ``gru`` computes, with a copy of its weights
        (share=True: with its Parameter objects themselves, as fusedgru.to_fused does)."""
        if not isinstance(gru, nn.GRU):
            raise TypeError(f"gru: expected a torch.nn.GRU, got {type(gru).__name__}")
        if gru.proj_size:  # nn.GRU rejects proj_size; only a hand-edited module has one
            raise ValueError(f"proj_size: a GRU with proj_size={gru.proj_size} has no fused twin")
        new = cls(gru.input_size, gru.hidden_size, gru.num_layers, gru.bias, gru.batch_first,
                  float(gru.dropout), gru.bidirectional, **_factory(gru.weight_hh_l0, share),
                  reset_after=True, backend=backend)
        return _with_weights_of(new, gru, share)

    def to_torch(self, *, share: bool = False) -> nn.GRU:
        """A torch.nn.GRU with a copy of this module's weights (share=True: with its
        Parameter objects themselves); reset_after=True only."""
        _check_torch_formulation(self)
        gru = nn.GRU(self.input_size, self.hidden_size, self.num_layers, self.bias,
                     self.batch_first, self.dropout, self.bidirectional,
                     **_factory(self.weight_hh_l0, share))
        _with_weights_of(gru, self, share)
        if share:
            gru.flatten_parameters()  # cuDNN's packed copy, as nn.GRU keeps after .to(cuda)
        return gru


class FusedGRUCell(nn.Module):
    """torch.nn.GRUCell with fused kernels: weight_ih (3H, I), weight_hh (3H, H),
    bias_ih / bias_hh (3H,); forward(input (B, I) or (I,), hx=None) -> h' (B, H) or (H,).
    ``reset_after`` and ``backend`` as in FusedGRU."""

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, device=None,
                 dtype=None, *, reset_after: bool = True, backend: str = "auto") -> None:
        super().__init__()
        (input_size, hidden_size, _, bias, _, _, _, reset_after, backend) = F_gru.check_module_args(
            input_size, hidden_size, 1, bias, False, 0.0, False, reset_after, backend, cell=True)
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.bias = bias
        self.reset_after = reset_after
        self.backend = backend
        factory = {"device": device, "dtype": dtype}
        G = 3 * hidden_size
        self.weight_ih = nn.Parameter(torch.empty(G, input_size, **factory))
        self.weight_hh = nn.Parameter(torch.empty(G, hidden_size, **factory))
        if bias:
            self.bias_ih = nn.Parameter(torch.empty(G, **factory))
            self.bias_hh = nn.Parameter(torch.empty(G, **factory))
        else:
            self.register_parameter("bias_ih", None)
            self.register_parameter("bias_hh", None)
        self.reset_parameters()

    reset_parameters = FusedGRU.reset_parameters
    __prepare_scriptable__ = FusedGRU.__prepare_scriptable__
    __getstate__ = FusedGRU.__getstate__

    def forward(self, input: Tensor, hx: Optional[Tensor] = None) -> Tensor:
        p = self._parameters  # a dict read; Module.__getattr__ costs more than the kernel
        try:
            w = [p["weight_ih"], p["weight_hh"], p["bias_ih"], p["bias_hh"]]
        except KeyError:  # parametrized or otherwise moved weights
            w = [self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh]
        lean = self.__dict__.get("_lean")
        if _lean_serves(lean, self):
            h = _lean_cell_call(lean, w, input, hx)
            if h is not None:
                return h
        weights = w if w[2] is not None else w[:2]
        checked = _checked_weights(self, weights, 1, False)
        h = F_gru.gru_cell(input, hx, *w, reset_after=self.reset_after, backend=self.backend,
                           _checked=checked)
        if checked is not None and _lean_stale(lean, self, w):
            self.__dict__["_lean"] = _lean_plan(self, w)
        return h

    @property
    def backend_in_use(self) -> str:
        return _backend_in_use(self.backend, self.weight_hh)

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        if not self.bias:
            s += ", bias=False"
        return s + f", reset_after={self.reset_after}, backend={self.backend_in_use}"

    @classmethod
    def from_torch(cls, cell: nn.GRUCell, *, backend: str = "auto",
                   share: bool = False) -> "FusedGRUCell":
        """A FusedGRUCell computing exactly what ``cell`` computes, with a copy of its weights
        (share=True: with its Parameter objects themselves, as fusedgru.to_fused does)."""
        if not isinstance(cell, nn.GRUCell):
            raise TypeError(f"cell: expected a torch.nn.GRUCell, got {type(cell).__name__}")
        new = cls(cell.input_size, cell.hidden_size, cell.bias,
                  **_factory(cell.weight_hh, share), reset_after=True, backend=backend)
        return _with_weights_of(new, cell, share)

    def to_torch(self, *, share: bool = False) -> nn.GRUCell:
        """A torch.nn.GRUCell with a copy of this module's weights (share=True: with its
        Parameter objects themselves); reset_after=True only."""
        _check_torch_formulation(self)
        cell = nn.GRUCell(self.input_size, self.hidden_size, self.bias,
                          **_factory(self.weight_hh, share))
        return _with_weights_of(cell, self, share)


# The lean call: one registered op per FusedGRUCell call, and per FusedGRU call of one
# layer in one direction (a cell is called once per step from Python, and a streaming model
# calls its GRU with T=1: its Python costs more than its kernel at small sizes).  After a
# call through the general path, a module whose backend runs the CPU extension keeps
# (weights, dtype, device, I, H, reset_after); later calls that need nothing the general
# path adds (no autocast, no tracer, compiler, exporter or torch.func transform, a (B, I)
# input and a (B, H) or absent hx of the weights' dtype and device) call
# fusedgru::gru_infer directly, or, when autograd records (a gradient to compute),
# fusedgru::gru_fwd and later gru_bwd through _LeanTrain.  Anything else (a bad input
# included, so that it gets the general path's exception) returns None and takes the
# general path.
#
# A plan is (weights, what it assumed of the module, served); served is (dtype, device, I, H,
# reset_after, (infer, fwd, bwd) ops), or None where the lean call does not serve (another
# backend, an empty size, more than one layer or direction): kept as well, so that a module
# the lean call does not serve is not planned again at every call.


# The weight gradients of lean step calls.  A loop of FusedGRUCell calls (or FusedGRU calls
# of T=1) makes one autograd node per step; each used to return a fresh dW_ih and dW_hh,
# which autograd then added into one buffer per weight: per step, at H = 256, 1.5 MB written
# and then read back and added (3 MB against a 2 MB L2), more than the products cost.
# Instead every step of a backward pass adds its products into ONE buffer per weight
# (fusedgru::gru_bwd_acc), the buffer the pass's first step returns; the later steps return
# None for it.  That gradient does not go to the weight directly, where other uses of the
# weight (a regularizer, a tied weight) add theirs into the same autograd buffer, but to a
# token (fusedgru::grad_token: a (3H, K) stand-in that only these calls consume, not a view
# of the weight), so autograd's buffer for its node holds that one tensor until every step
# has run; the node then hands it on to the weight (its hooks, .grad) once.  The buffers
# are found by autograd's graph task id, so that passes that overlap (threads, reentrant
# checkpoints, retain_graph) never share one, and held weakly (a pass that needs no weight
# gradient drops its buffer; ids are never reused).  Calls of T > 1 keep returning their
# gradients (one call per pass is the usual case there, and the token costs ~2 us).
# Switch: _set_lean_accumulate (default on).
_LEAN_ACCUMULATE = [True]


def _set_lean_accumulate(on: bool) -> bool:
    """Test / A/B switch: whether lean step calls add their weight gradients into one buffer
    per backward pass (True, the default) or return them per call.  Returns the old
    setting."""
    old, _LEAN_ACCUMULATE[0] = _LEAN_ACCUMULATE[0], bool(on)
    return old


def _grad_token(holder: list, k: int, w: Tensor) -> tuple:
    """(token, buffers by graph task) for weight k (0: w_ih, 1: w_hh) of a plan: the token
    the calls of a graph share while any of them is alive (the calls keep it), else a new
    one."""
    rec = holder[k]
    if rec is not None:
        tok = rec[0]()
        if tok is not None and tok.shape == w.shape:
            return tok, rec[1]
    accs = rec[1] if rec is not None else weakref.WeakValueDictionary()
    tok = torch.ops.fusedgru.grad_token.default(w)
    holder[k] = (weakref.ref(tok), accs)
    return tok, accs


class _LeanTrain(torch.autograd.Function):
    """A lean call that autograd records: fusedgru::gru_fwd, and gru_bwd (or gru_bwd_acc) in
    the backward, both called below the autograd dispatch key.  Through the ops' registered
    autograd formula (fusedgru/ops.py: the general path) each call also runs torch.library's
    Python wrapper and re-dispatch, ~100 us per step of a FusedGRUCell loop at B=1 whose
    kernels take ~15 us.  Same ops, same arguments: bitwise the general path's results.  A
    backward that builds a graph (create_graph=True: double backward) differentiates the
    general op instead, recomputing the forward, so that the gradient of the saved ws reaches
    the inputs as it does there.  tok_ih / tok_hh: the weights' tokens (None: the weight's
    gradient is returned to it directly), sinks their buffers by graph task."""

    @staticmethod
    def forward(ctx, reset_after, fwd, bwd, acc, sinks, x, h0, w_ih, w_hh, b_ih, b_hh, tok_ih,
                tok_hh):
        with torch._C._AutoDispatchBelowADInplaceOrView():
            y, ws = fwd(x, h0, w_ih, w_hh, b_ih, b_hh, reset_after, None, None)
        ctx.save_for_backward(x, h0, w_ih, w_hh, b_ih, b_hh, y, ws)
        ctx.reset_after, ctx.fwd, ctx.bwd, ctx.acc, ctx.sinks = reset_after, fwd, bwd, acc, sinks
        ctx.tokens = (tok_ih, tok_hh)  # alive while the graph is: its calls share them
        return y

    @staticmethod
    def backward(ctx, gy):
        x, h0, w_ih, w_hh, b_ih, b_hh, y, ws = ctx.saved_tensors
        inputs = (x, h0, w_ih, w_hh, b_ih, b_hh)
        needs = ctx.needs_input_grad[5:]
        need_dx, need_dw = ops.wanted_grads(needs[:6])
        if torch.is_grad_enabled():  # create_graph: through the general ops' formulas
            # The forward again, recorded (its ws is an output there, whose gradient the
            # double backward needs), and gru_bwd on it through its registered formula: the
            # gradients as the general path computes them, differentiable in the inputs.
            # (autograd.grad of the recomputed y would follow h0's own history back through
            # the earlier calls of a loop and count their weight gradients again.)
            y2, ws2 = ctx.fwd(*inputs, ctx.reset_after, None, None)
            grads = list(ops.unwanted_to_none(
                ctx.bwd(gy, x, h0, w_ih, w_hh, y2, ws2, ctx.reset_after, None, None, need_dx,
                        need_dw), need_dx, need_dw))
            for k in (1, 4, 5):
                if inputs[k] is None:
                    grads[k] = None
            return (None,) * 5 + tuple(grads) + (None, None)
        gy = gy.contiguous()
        # the weights whose gradient goes through their token: all that need one, or none
        via = [needs[6 + k] and ctx.sinks[k] is not None for k in (0, 1)]
        tid = torch._C._current_graph_task_id() if any(via) else -1
        # (no graph task: the node called outside autograd's engine)
        if tid < 0 or torch.compiler.is_compiling() or any(
                needs[2 + k] and not via[k] for k in (0, 1)):
            via = [False, False]
        toks = [None, None]
        if any(via):
            bufs = [ctx.sinks[k].get(tid) if via[k] else None for k in (0, 1)]
        if any(via) and all(b is not None or not v for b, v in zip(bufs, via)):
            need_db = needs[4] or needs[5]
            with torch._C._AutoDispatchBelowADInplaceOrView():
                dx, dh0, db_ih, db_hh = ctx.acc(gy, x, h0, w_ih, w_hh, y, ws, ctx.reset_after,
                                                need_dx, need_db, bufs[0], bufs[1])
            grads = [dx if need_dx else None, dh0, None, None,
                     db_ih if need_db else None, db_hh if need_db else None]
        else:
            with torch._C._AutoDispatchBelowADInplaceOrView():
                grads = list(ops.unwanted_to_none(
                    ctx.bwd(gy, x, h0, w_ih, w_hh, y, ws, ctx.reset_after, None, None,
                            need_dx, need_dw), need_dx, need_dw))
            for k in (0, 1):  # the pass's first call with a token: its dW becomes the buffer
                if via[k]:
                    if bufs[k] is None:
                        ctx.sinks[k][tid] = toks[k] = grads[2 + k]
                    else:
                        bufs[k].add_(grads[2 + k])
                    grads[2 + k] = None
        for k in (1, 4, 5):  # no gradient for an absent hx or bias
            if inputs[k] is None:
                grads[k] = None
        return (None,) * 5 + tuple(grads) + tuple(toks)


def _setting(module, d: dict, name: str, default=None):
    """A module setting, from the instance dict where it lives (a plain attribute), else
    through getattr (a subclass's property, say)."""
    return d[name] if name in d else getattr(module, name, default)


def _assumed(module) -> tuple:
    """The module settings a lean plan depends on.  A FusedGRUCell has no batch_first,
    num_layers or bidirectional: getattr(cell, "batch_first", None) raises and catches an
    AttributeError inside Module.__getattr__, 2.7 us per call for the three (the B=1 H=64
    kernel takes 6), so the cell's are constants."""
    d = module.__dict__
    if isinstance(module, FusedGRUCell):
        return (_setting(module, d, "backend"), _setting(module, d, "reset_after"), None, 1,
                False)
    return (_setting(module, d, "backend"), _setting(module, d, "reset_after"),
            _setting(module, d, "batch_first"), _setting(module, d, "num_layers", 1),
            _setting(module, d, "bidirectional", False))


def _lean_serves(lean, module) -> bool:
    return lean is not None and lean[2] is not None and lean[1] == _assumed(module)


def _lean_stale(lean, module, w) -> bool:
    """Whether the plan must be made again: new weight objects or module settings."""
    return (lean is None or lean[1] != _assumed(module) or len(lean[0]) != len(w)
            or any(a is not b for a, b in zip(lean[0], w))
            or lean[3] != (w[1].dtype, w[1].device))  # .float(), .to(): the same objects


def _lean_plan(module, w) -> tuple:
    assumed = _assumed(module)
    served = None
    I, H = w[0].shape[1], w[1].shape[1]
    if (assumed[3] == 1 and not assumed[4] and I > 0 and H > 0
            and F_gru.layer_backend_name(module.backend, w[1]) == "cpu"
            and hasattr(torch.ops.fusedgru, "gru_infer")):
        ops = torch.ops.fusedgru
        acc = ops.gru_bwd_acc.default if hasattr(ops, "gru_bwd_acc") else None
        cell = ops.gru_cell_infer.default if hasattr(ops, "gru_cell_infer") else None
        assert w[1].device.type == "cpu"  # the cpu backend's: _lean_cell_call relies on it
        served = (w[1].dtype, w[1].device, I, H, module.reset_after,
                  (ops.gru_infer.default, ops.gru_fwd.default, ops.gru_bwd.default, acc, cell),
                  [None, None])  # the weights' gradient tokens (_grad_token)
    return tuple(w), assumed, served, (w[1].dtype, w[1].device)



def _lean_gru_call(lean, weights, input, hx) -> Optional[tuple]:
    """FusedGRU's lean call (one layer, one direction; see above): (output, h_n) or None."""
    if len(weights) != len(lean[0]) or type(input) is not Tensor or input.dim() != 3:
        return None
    batch_first = lean[1][2]
    x = input.transpose(0, 1) if batch_first else input
    if x.shape[0] == 0:
        return None
    h0 = None
    if hx is not None:
        if type(hx) is not Tensor or hx.dim() != 3 or hx.shape[0] != 1:
            return None
        h0 = hx[0]
    w = list(weights) + [None, None] if len(weights) == 2 else weights
    y = _lean_cell_call(lean, w, x, h0, seq=True)
    if y is None:
        return None
    h_n = y[-1:]
    return (y.transpose(0, 1) if batch_first else y), h_n


# What _lean_cell_call asks at every call, bound once: C functions where torch has them.
# The call's own Python is costly beyond its time at H >= 256: what it touches evicts lines
# of the weights from the cache, which the kernel then reads again (a B=1 H=256 call: 8.5 us
# over the op's 25 with the previous checks; B=64 H=256, 30 over 366).
_is_tracing = torch._C._is_tracing
_autocast_on = torch.is_autocast_enabled
_functorch_stack = torch._C._functorch.peek_interpreter_stack
_inference_mode = torch.is_inference_mode_enabled  # records nothing, grad mode or not


def _lean_cell_call(lean, w, input, hx, seq: bool = False) -> Optional[Tensor]:
    """h' of a cell call (input (B, I)), or with seq: y (T, B, H) of a sequence (input
    (T, B, I)); None where the general path must run.  A plan serves the cpu backend only:
    its tensors are CPU tensors (is_cpu, without making device objects)."""
    weights, _, (dtype, _, I, H, reset_after, (infer, fwd, bwd, acc, cell), tokens), _ = lean
    if (w[0] is not weights[0] or w[1] is not weights[1]
            or (len(weights) > 2 and (w[2] is not weights[2] or w[3] is not weights[3]))
            or (len(weights) == 2 and w[2] is not None) or type(input) is not Tensor):
        return None
    shape = input.shape
    if len(shape) != (3 if seq else 2) or shape[-1] != I or shape[-2] == 0:
        return None
    if input.dtype is not dtype or not input.is_cpu or w[1].dtype is not dtype \
            or not w[1].is_cpu:
        return None
    if hx is not None and (type(hx) is not Tensor or hx.dtype is not dtype or not hx.is_cpu
                           or hx.shape != (shape[-2], H)):
        return None
    # compiler / tracer / autocast / ONNX export / torch.func: the general path handles them
    if (torch.compiler.is_compiling() or _is_tracing() or _autocast_on("cpu")
            or fused_onnx.exporting_flags() is not None or _functorch_stack() is not None):
        return None
    if torch.is_grad_enabled() and not _inference_mode() and (
            input.requires_grad or w[1].requires_grad or w[0].requires_grad
            or (hx is not None and hx.requires_grad)
            or (w[2] is not None and (w[2].requires_grad or w[3].requires_grad))):
        tok_ih = tok_hh = sink_ih = sink_hh = None
        if acc is not None and _LEAN_ACCUMULATE[0] and (not seq or shape[0] == 1):
            if w[0].requires_grad and w[0].is_leaf:
                tok_ih, sink_ih = _grad_token(tokens, 0, w[0])
            if w[1].requires_grad and w[1].is_leaf:
                tok_hh, sink_hh = _grad_token(tokens, 1, w[1])
        x = input if seq else input.unsqueeze(0)
        y = _LeanTrain.apply(reset_after, fwd, bwd, acc, (sink_ih, sink_hh), x.contiguous(), hx,
                             *w, tok_ih, tok_hh)
    elif seq or cell is None:
        y = infer(input if seq else input.unsqueeze(0), hx, w[0], w[1], w[2], w[3], reset_after)
    else:
        return cell(input, hx, w[0], w[1], w[2], w[3], reset_after)
    return y if seq else y[0]


def _factory(weight: Tensor, share: bool) -> dict:
    """Where a twin's own parameters are made: nowhere real when it takes the source's."""
    return {"device": "meta"} if share else {"device": weight.device, "dtype": weight.dtype}


def _with_weights_of(new: nn.Module, src: nn.Module, share: bool) -> nn.Module:
    """``new`` with ``src``'s weights (a copy, or share: the Parameter objects) and mode."""
    if share:
        for name, param in src.named_parameters(recurse=False):
            setattr(new, name, param)
    else:
        new.load_state_dict(src.state_dict())
    new.train(src.training)
    return new


def _check_torch_formulation(module) -> None:
    if not module.reset_after:
        raise ValueError(
            f"reset_after: a {type(module).__name__} with reset_after=False computes a GRU "
            "that torch.nn has no module for (torch.nn.GRU and nn.GRUCell compute only "
            "reset_after=True); it cannot be converted to torch.nn"
        )
