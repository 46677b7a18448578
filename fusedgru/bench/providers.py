"""Providers: everything that is timed, each built from the same nn.GRU.

    nn.GRU       torch.nn.GRU (cuDNN on a GPU, oneDNN/ATen on the CPU): the baseline
    <backend>    each fusedgru backend of the table usable on the device
                 (FusedGRU.from_torch(gru, backend=...))
    ref+compile  the reference's maths with its per-step cell under torch.compile
    flashrnn     the flashrnn package's GRU, where it is installed (GPU)
    onnxruntime  ONNX Runtime's GRU operator, where onnx and onnxruntime are installed
                 (CPU, inference): the engine a CPU user would pick for serving

Cells called one GRUCell step at a time (Case.call == "cell") use each provider's cell:
nn.GRUCell, FusedGRUCell, ONNX Runtime's GRU over one step; the others sit them out.

Packed cells (Case.call == "packed") give nn.GRU and every fusedgru backend the same
PackedSequence; the others sit them out.  Rollout cells (Case.call == "rollout", resets
inside the sequence) call each provider's rollout module as FusedGRU is called,
m(x, hx, resets=resets) (fusedgru/bench/rollout.py):

    nn.GRU        the masked loop (nn.GRU one step at a time, state *= 1 - reset): the
                  baseline and, in float64, the oracle of rollout cells
    nn.GRUCell    the same masked loop through nn.GRUCell             } rollout cells only,
    nn.GRU-pack   the episodes as the rows of one packed nn.GRU call  } in every rollout
    nn.GRU-pad    the episodes padded to the longest, one nn.GRU call } run
    torchrl-pad   TorchRL's GRUModule, recurrent_backend="pad"        } where torchrl
    torchrl-scan  TorchRL's GRUModule, recurrent_backend="scan"       } imports; batch-first
    torchrl-py    TorchRL's GRUModule(python_based=True)              } inputs (its layout)
    <backend>     FusedGRU(x, hx, resets=resets)

Rollout cells report each provider against nn.GRU (the masked loop), against each of the
"peer" ways above (nn.GRU's and TorchRL's) and against the fastest of them (results.py).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .grids import DTYPES, Case

BASELINE = "nn.GRU"
COMPILE = "ref+compile"
FLASHRNN = "flashrnn"
ONNXRUNTIME = "onnxruntime"
SEGMENTS = ("nn.GRUCell", "nn.GRU-pack", "nn.GRU-pad")  # nn.GRU's other rollout ways
TORCHRL = ("torchrl-pad", "torchrl-scan", "torchrl-py")  # "torchrl" in --backends: all
CALLS = ("seq", "cell", "packed", "rollout")


def _gru_step(gi: Tensor, h: Tensor, w_hh: Tensor, b_hh: Tensor) -> Tensor:
    """One reset_after=True step (SPEC section 1): gi (B, 3H), h (B, H) -> h' (B, H)."""
    gh = torch.addmm(b_hh, h, w_hh.t())
    i_r, i_z, i_n = gi.chunk(3, 1)
    h_r, h_z, h_n = gh.chunk(3, 1)
    r = torch.sigmoid(i_r + h_r)
    z = torch.sigmoid(i_z + h_z)
    n = torch.tanh(i_n + r * h_n)
    return n + z * (h - n)


_COMPILED_STEP: Optional[Callable] = None


class CompiledReferenceGRU(nn.Module):
    """The reference's maths (fusedgru/reference.py: one input-projection GEMM over all
    steps, then a per-step cell) with the cell under torch.compile.

    The cell, not the whole time loop, is compiled: an unrolled T = 1024 loop takes minutes
    to compile, the cell seconds, and dynamic=True keeps one compiled graph across batch and
    hidden sizes.  Parameters carry nn.GRU's names, so gradients compare name by name.
    """

    def __init__(self, gru: nn.GRU):
        super().__init__()
        if not gru.bias:
            raise ValueError("ref+compile: bias=False is not benchmarked")
        self.num_layers, self.D = gru.num_layers, 2 if gru.bidirectional else 1
        for name, p in gru.named_parameters():
            self.register_parameter(name, nn.Parameter(p.detach().clone()))

    def forward(self, x: Tensor, h0: Tensor) -> Tuple[Tensor, Tensor]:
        global _COMPILED_STEP
        if _COMPILED_STEP is None:
            _COMPILED_STEP = torch.compile(_gru_step, dynamic=True)
        inp, h_n = x, []
        for layer in range(self.num_layers):
            outs = []
            for d in range(self.D):
                sfx = f"_l{layer}" + ("_reverse" if d else "")
                gi = nn.functional.linear(inp, getattr(self, "weight_ih" + sfx),
                                          getattr(self, "bias_ih" + sfx))  # (T, B, 3H)
                if d:
                    gi = gi.flip(0)
                h = h0[layer * self.D + d]
                w_hh, b_hh = getattr(self, "weight_hh" + sfx), getattr(self, "bias_hh" + sfx)
                ys = []
                # Each (grad mode, dtype, stride pattern) of the grid is one more graph of
                # the same cell; torch's default limit of 8 would leave later cells eager.
                with torch._dynamo.config.patch(recompile_limit=64):
                    for t in range(gi.shape[0]):
                        h = _COMPILED_STEP(gi[t], h, w_hh, b_hh)
                        ys.append(h)
                y = torch.stack(ys)
                h_n.append(h)
                outs.append(y.flip(0) if d else y)
            inp = outs[0] if self.D == 1 else torch.cat(outs, 2)
        return inp, torch.stack(h_n)


class FlashRNNGRU(nn.Module):
    """The flashrnn package's fused CUDA GRU behind nn.GRU's parameters (1 layer, one
    direction).  NEVER RUN: written against flashrnn 1.0's documented call
    flashrnn(Wx (B,T,G,NH,D), R (G,NH,D,D), b (G+1,NH,D), states, function="gru"); the gate
    order and transposes are assumptions that the correctness check confirms or refutes
    (a mismatch is reported as WRONG, never timed)."""

    def __init__(self, gru: nn.GRU):
        super().__init__()
        if gru.num_layers != 1 or gru.bidirectional or not gru.bias:
            raise ValueError("flashrnn adapter: 1 layer, one direction, with bias only")
        from flashrnn.flashrnn import flashrnn  # noqa: F401  (import check)

        for name, p in gru.named_parameters():
            self.register_parameter(name, nn.Parameter(p.detach().clone()))

    def forward(self, x: Tensor, h0: Tensor) -> Tuple[Tensor, Tensor]:
        from flashrnn.flashrnn import flashrnn

        T, B, _ = x.shape
        H = self.weight_hh_l0.shape[1]
        wx = nn.functional.linear(x, self.weight_ih_l0)  # (T, B, 3H)
        wx = wx.view(T, B, 3, 1, H).transpose(0, 1)  # (B, T, G, NH, D)
        R = self.weight_hh_l0.view(3, H, H).transpose(1, 2).unsqueeze(1)  # (G, NH, D, D)
        bi, bh = self.bias_ih_l0.view(3, H), self.bias_hh_l0.view(3, H)
        b = torch.stack([bi[0] + bh[0], bi[1] + bh[1], bi[2], bh[2]]).unsqueeze(1)
        states = h0.view(1, 1, B, 1, H)
        dt = {torch.float32: "float32", torch.bfloat16: "bfloat16",
              torch.float16: "float16"}[x.dtype]
        y, last = flashrnn(wx, R, b, states=states, function="gru", backend="cuda_fused",
                           dtype=dt)
        y = y.reshape(B, T, H).transpose(0, 1)
        return y, last.reshape(1, B, H)


class OnnxRuntimeGRU(nn.Module):
    """ONNX Runtime's GRU operator (linear_before_reset=1: nn.GRU's formulation) with an
    nn.GRU's weights: one GRU node per layer, both directions in it, built with onnx.helper
    (not through an exporter) in ONNX's layout (fusedgru.onnx: gates z, r, n; B = [Wb, Rb]).
    The session is made once, as a serving user makes it: ONNX Runtime packs the weights
    then.  float32, inference; its threads are torch's (the run's --threads)."""

    def __init__(self, gru: nn.GRU):
        super().__init__()
        import numpy as np
        import onnx
        import onnxruntime as ort
        from onnx import TensorProto, helper, numpy_helper

        from ..onnx import _onnx_weights

        if gru.weight_hh_l0.dtype != torch.float32 or gru.weight_hh_l0.device.type != "cpu":
            raise ValueError("onnxruntime: float32 on the CPU only")
        L, D, H = gru.num_layers, 2 if gru.bidirectional else 1, gru.hidden_size
        weights = [p.detach() for p in gru._flat_weights]
        per = 4 if gru.bias else 2
        nodes, inits = [], [numpy_helper.from_array(np.array([0], dtype=np.int64), "axis0")]
        layer_in = "x"
        for layer in range(L):
            group = weights[layer * D * per:(layer + 1) * D * per]
            W, R, B = _onnx_weights([tuple(group[k * per:(k + 1) * per]) + (None,) * (4 - per)
                                     for k in range(D)], H)
            names = [f"W{layer}", f"R{layer}", f"B{layer}" if B is not None else ""]
            for n, t in zip(names, (W, R, B)):
                if n:
                    inits.append(numpy_helper.from_array(t.numpy().astype(np.float32), n))
            # this layer's initial states: h0[layer*D:(layer+1)*D]
            for n, v in ((f"start{layer}", layer * D), (f"end{layer}", (layer + 1) * D)):
                inits.append(numpy_helper.from_array(np.array([v], dtype=np.int64), n))
            nodes.append(helper.make_node("Slice", ["h0", f"start{layer}", f"end{layer}", "axis0"],
                                          [f"h0_{layer}"]))
            nodes.append(helper.make_node(
                "GRU", [layer_in] + names + ["", f"h0_{layer}"], [f"Y{layer}", f"Yh{layer}"],
                hidden_size=H, linear_before_reset=1,
                direction="bidirectional" if D == 2 else "forward"))
            # (T, D, B, H) -> (T, B, D*H) for the next layer and the output
            nodes.append(helper.make_node("Transpose", [f"Y{layer}"], [f"Yt{layer}"], perm=[0, 2, 1, 3]))
            inits.append(numpy_helper.from_array(np.array([0, 0, D * H], dtype=np.int64), f"shape{layer}"))
            nodes.append(helper.make_node("Reshape", [f"Yt{layer}", f"shape{layer}"], [f"y{layer}"]))
            layer_in = f"y{layer}"
        nodes.append(helper.make_node("Identity", [layer_in], ["y"]))
        nodes.append(helper.make_node("Concat", [f"Yh{k}" for k in range(L)], ["h_n"], axis=0))
        f32 = TensorProto.FLOAT
        outputs = [helper.make_tensor_value_info("y", f32, ["T", "B", D * H]),
                   helper.make_tensor_value_info("h_n", f32, [L * D, "B", H])]
        self.bare = L == 1 and D == 1
        if self.bare:
            # One layer, one direction: the GRU node alone, as a serving graph has it (each
            # further node costs ONNX Runtime about a microsecond a call); Y (T, 1, B, H)
            # becomes (T, B, H) by a view here.
            nodes = [helper.make_node("GRU", ["x", "W0", "R0", "B0" if gru.bias else "", "",
                                              "h0"], ["y", "h_n"], hidden_size=H,
                                      linear_before_reset=1)]
            inits = [t for t in inits if t.name in ("W0", "R0", "B0")]
            outputs[0] = helper.make_tensor_value_info("y", f32, ["T", 1, "B", H])
        graph = helper.make_graph(
            nodes, "gru",
            [helper.make_tensor_value_info("x", f32, ["T", "B", gru.input_size]),
             helper.make_tensor_value_info("h0", f32, [L * D, "B", H])], outputs, inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        onnx.checker.check_model(model)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = torch.get_num_threads()
        opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(model.SerializeToString(), opts,
                                            providers=["CPUExecutionProvider"])

    def forward(self, x: Tensor, h0: Tensor) -> Tuple[Tensor, Tensor]:
        y, h_n = self.session.run(None, {"x": x.detach().numpy(), "h0": h0.detach().numpy()})
        y = torch.from_numpy(y)
        return (y.view(y.shape[0], y.shape[2], y.shape[3]) if self.bare else y), torch.from_numpy(h_n)


def onnxruntime_reason(case: Optional[Case], device: torch.device) -> Optional[str]:
    """Why ONNX Runtime's GRU does not run (None: it does)."""
    if device.type != "cpu":
        return "ONNX Runtime is compared on the CPU"
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        return f"onnx / onnxruntime are not installed ({type(exc).__name__})"
    if case is not None and case.mode != "inference":
        return "ONNX Runtime serves inference only"
    if case is not None and case.dtype != "float32":
        return "ONNX Runtime's CPU GRU is compared in float32"
    return None


class CellLoop(nn.Module):
    """A GRU called one step at a time through a cell, as Python code does it: forward(x
    (T, B, I), h0 (1, B, H)) -> (y (T, B, H), h_n (1, B, H)), T cell calls."""

    # its parameters' names -> nn.GRU's, so that gradients compare name by name
    GRU_NAMES = {f"cell.{w}": f"{w}_l0" for w in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")}

    def __init__(self, cell: nn.Module):
        super().__init__()
        self.cell = cell

    def forward(self, x: Tensor, h0: Tensor) -> Tuple[Tensor, Tensor]:
        h = h0[0]
        ys = []
        for t in range(x.shape[0]):
            h = self.cell(x[t], h)
            ys.append(h)
        return torch.stack(ys), h.unsqueeze(0)


def gru_to_cell(gru: nn.GRU) -> nn.GRUCell:
    """The nn.GRUCell of a one-layer, one-direction nn.GRU (a copy of its weights)."""
    cell = nn.GRUCell(gru.input_size, gru.hidden_size, gru.bias,
                      device=gru.weight_hh_l0.device, dtype=gru.weight_hh_l0.dtype)
    cell.load_state_dict({k.removesuffix("_l0"): v for k, v in gru.state_dict().items()})
    return cell


@dataclass
class Provider:
    name: str
    # "baseline", "fusedgru", "compile", "flashrnn", "onnxruntime", or "peer": another
    # way of running nn.GRU (or TorchRL) on rollout cells, beside the baseline
    kind: str
    build: Optional[Callable[[nn.GRU], nn.Module]]  # None: rollout cells only
    note: str = ""
    # why it cannot run a case (None: it can)
    unsupported: Callable[[Case, torch.device], Optional[str]] = lambda case, dev: None
    # the module a Case.call == "cell" cell times, from the cell's nn.GRUCell (None: the
    # provider sits such cells out)
    build_cell: Optional[Callable[[nn.GRUCell], nn.Module]] = None
    # packed cells: build's module takes the PackedSequence (False: sits them out)
    packed: bool = False
    # rollout cells: the module called m(x, hx, resets=resets) (None: sits them out)
    build_rollout: Optional[Callable[[nn.GRU], nn.Module]] = None
    # rollout cells: "time" (T, B, ...) inputs and outputs, or "batch" (B, T, ...)
    layout: str = "time"

    def __post_init__(self):
        # unsupported() says why_not_call's reasons too: callers that ask it alone
        # (benchmarks/test_gru_speed.py) skip the cells a provider cannot be called on
        own = self.unsupported
        self.unsupported = lambda case, dev: self.why_not_call(case.call) or own(case, dev)

    def module_for(self, case: Case, gru: nn.GRU) -> nn.Module:
        """What a cell times, from the cell's nn.GRU: the sequence module, for cells called
        step by step the provider's GRUCell in a Python loop, for rollout cells its
        rollout module."""
        if case.call in ("seq", "packed"):
            return self.build(gru)
        if case.call == "rollout":
            return self.build_rollout(gru)
        return CellLoop(self.build_cell(gru_to_cell(gru)))

    def why_not_call(self, call: str) -> Optional[str]:
        """Why it sits out every cell called this way (None: it does not)."""
        if call in ("seq", "packed") and self.build is None:
            return f"{self.name} runs rollout cells only"
        if call == "cell" and self.build_cell is None:
            return f"{self.name} has no single-step cell"
        if call == "packed" and not self.packed:
            return f"{self.name} takes no PackedSequence"
        if call == "rollout" and self.build_rollout is None:
            return f"{self.name} has no resets inside the sequence"
        return None

    def why_not(self, case: Case, device: torch.device) -> Optional[str]:
        return self.unsupported(case, device)


def _build_baseline(gru: nn.GRU) -> nn.Module:
    m = copy.deepcopy(gru)
    m.flatten_parameters()
    return m


def _fusedgru_provider(name: str) -> Provider:
    from .. import backends
    from ..modules import FusedGRU

    impl = backends.get_backend(name)

    def unsupported(case: Case, device: torch.device) -> Optional[str]:
        return impl.unsupported_reason(device.type, DTYPES[case.dtype])

    from ..modules import FusedGRUCell

    def unsupported_here(case: Case, device: torch.device) -> Optional[str]:
        if case.call == "rollout":
            why = fusedgru_resets_reason()
            if why is not None:
                return why
        return unsupported(case, device)

    build = lambda gru: FusedGRU.from_torch(gru, backend=name)  # noqa: E731
    return Provider(name, "fusedgru", build,
                    note=backends.BACKENDS[name].summary, unsupported=unsupported_here,
                    build_cell=lambda cell: FusedGRUCell.from_torch(cell, backend=name),
                    packed=True, build_rollout=build)


def fusedgru_resets_reason() -> Optional[str]:
    """Why FusedGRU cannot take resets= here (None: it can; issue 19)."""
    import inspect

    from ..modules import FusedGRU

    if "resets" not in inspect.signature(FusedGRU.forward).parameters:
        return "FusedGRU.forward takes no resets= yet (issue 19)"
    return None


def _rollout_unsupported(name: str):
    def why(case: Case, device: torch.device) -> Optional[str]:
        if case.call != "rollout":
            return None
        if case.bidirectional:
            return "rollouts run one direction"
        if name == "nn.GRU-pad" and case.layers != 1:
            return "padded segments: one layer (h_n of every layer needs nn.GRU-pack)"
        return None

    return why


def _rollout_peers(device: torch.device, explicit: bool, wanted: Sequence[str]
                   ) -> Tuple[List[Provider], Dict[str, str]]:
    """The other ways of running rollout cells: nn.GRU over the episodes (always beside
    the baseline's masked loop) and TorchRL's GRUModule (where it imports)."""
    from .rollout import MaskedCellLoopGRU, SegmentsGRU, TorchRLGRU, torchrl_reason

    peers = [Provider("nn.GRUCell", "peer", None,
                      note="rollout: the masked loop through nn.GRUCell (one per layer)",
                      unsupported=_rollout_unsupported("nn.GRUCell"),
                      build_rollout=MaskedCellLoopGRU.from_gru),
             Provider("nn.GRU-pack", "peer", None,
                      note="rollout: the episodes as rows of one packed nn.GRU call",
                      unsupported=_rollout_unsupported("nn.GRU-pack"),
                      build_rollout=lambda gru: SegmentsGRU.from_gru(gru, "pack")),
             Provider("nn.GRU-pad", "peer", None,
                      note="rollout: the episodes padded to the longest, one nn.GRU call",
                      unsupported=_rollout_unsupported("nn.GRU-pad"),
                      build_rollout=lambda gru: SegmentsGRU.from_gru(gru, "pad"))]
    left_out: Dict[str, str] = {}
    names = [n for n in TORCHRL if not explicit or n in wanted or "torchrl" in wanted]
    why = torchrl_reason() if names else None
    for n in names:
        if why is not None:
            left_out[n] = why
            continue
        backend = n.split("-", 1)[1]
        peers.append(Provider(
            n, "peer", None, layout="batch",
            note={"pad": "TorchRL GRUModule(recurrent_backend='pad') over nn.GRU",
                  "scan": "TorchRL GRUModule(recurrent_backend='scan')",
                  "py": "TorchRL GRUModule(python_based=True)"}[backend],
            unsupported=_rollout_unsupported(n),
            build_rollout=lambda gru, b=backend: TorchRLGRU(gru, b)))
    return peers, left_out


def _flashrnn_reason(device: torch.device) -> Optional[str]:
    if device.type != "cuda":
        return "flashrnn runs on CUDA devices only"
    try:
        import flashrnn  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        return f"flashrnn is not installed ({type(exc).__name__})"
    return None


def discover_providers(device: torch.device, requested: Optional[Sequence[str]] = None,
                       quick: bool = False, calls: Optional[Sequence[str]] = None
                       ) -> Tuple[List[Provider], Dict[str, str]]:
    """(providers to time, {name: why it is left out}).  nn.GRU always comes first: every
    speed-up is against it.  Without ``requested``: every fusedgru backend that is a fast
    path on the device (not the Triton interpreter on the CPU, not the reference on a GPU),
    ref+compile (not with --quick: compiling takes longer than the quick grid) and flashrnn
    where installed.

    ``calls``: how the run's cells are called (Case.call).  With rollout cells the other
    ways of running them come in (nn.GRUCell, nn.GRU-pack and nn.GRU-pad always, TorchRL's where it
    imports and is not left out by ``requested``); a provider that runs none of ``calls``
    is left out, with the reason."""
    from .. import backends

    status = backends.backend_status()
    explicit = requested is not None
    wanted = list(requested) if explicit else None
    known = (set(backends.BACKENDS) | {BASELINE, COMPILE, FLASHRNN, ONNXRUNTIME, "torchrl"}
             | set(SEGMENTS) | set(TORCHRL))
    if explicit:
        unknown = [n for n in wanted if n not in known]
        if unknown:
            raise ValueError(f"--backends: unknown {unknown}; expected names from "
                             f"{sorted(known)}")
    from .rollout import MaskedLoopGRU

    providers = [Provider(BASELINE, "baseline", _build_baseline,
                          note="torch.nn.GRU" + (" (cuDNN)" if device.type == "cuda" else "")
                          + ("; rollout cells: its masked loop over steps"
                             if calls is not None and "rollout" in calls else ""),
                          build_cell=copy.deepcopy, packed=True,
                          build_rollout=MaskedLoopGRU.from_gru,
                          unsupported=_rollout_unsupported(BASELINE))]
    left_out: Dict[str, str] = {}
    for name in backends.BACKENDS:  # the table's order, never a hard-coded list
        if explicit and name not in wanted:
            continue
        why = status[name]
        if why is None and not explicit:
            if name == "triton" and device.type == "cpu":
                why = ("runs under the Triton interpreter on the CPU: a correctness tool, "
                       "not timed unless asked for (--backends triton)")
            elif name == "reference" and device.type == "cuda":
                why = "the reference is a correctness tool on a GPU (--backends reference)"
        if why is not None:
            left_out[name] = why
            continue
        providers.append(_fusedgru_provider(name))
    if (explicit and COMPILE in wanted) or (not explicit and not quick):
        providers.append(Provider(
            COMPILE, "compile", CompiledReferenceGRU,
            note="reference cell under torch.compile(dynamic=True)",
            unsupported=lambda case, dev: None))
    elif not explicit:
        left_out[COMPILE] = "left out of --quick (compiling takes ~30 s; --backends ref+compile)"
    if not explicit or FLASHRNN in wanted:
        why = _flashrnn_reason(device)
        if why is None:
            providers.append(Provider(
                FLASHRNN, "flashrnn", FlashRNNGRU, note="flashrnn cuda_fused GRU",
                unsupported=lambda case, dev: (
                    "1 layer, one direction only" if case.layers != 1 or case.bidirectional
                    else None)))
        else:
            left_out[FLASHRNN] = why
    if not explicit or ONNXRUNTIME in wanted:
        why = onnxruntime_reason(None, device)
        if why is None:
            # Over one step, ONNX Runtime's GRU is its cell: a GRUCell call is a T=1 run.
            providers.append(Provider(
                ONNXRUNTIME, "onnxruntime", OnnxRuntimeGRU,
                note="ONNX Runtime's GRU operator, weights packed at session creation",
                unsupported=onnxruntime_reason,
                build_cell=lambda cell: _OnnxCell(cell)))
        else:
            left_out[ONNXRUNTIME] = why
    if calls is not None and "rollout" in calls:
        peers, why_peers = _rollout_peers(device, explicit, wanted or [])
        providers[1:1] = peers  # beside the baseline: the table lists nn.GRU's ways first
        left_out.update(why_peers)
    if calls is not None:
        kept = []
        for p in providers:
            whys = [p.why_not_call(c) for c in calls]
            if p.kind == "baseline" or not all(whys):
                kept.append(p)
            else:
                left_out[p.name] = "runs none of this run's cells (" + "; ".join(
                    sorted(set(whys))) + ")"
        providers = kept
    return providers, left_out


class _OnnxCell(nn.Module):
    """ONNX Runtime's GRU over one step, called as a GRUCell: (B, I), (B, H) -> (B, H)."""

    def __init__(self, cell: nn.GRUCell):
        super().__init__()
        gru = nn.GRU(cell.input_size, cell.hidden_size, bias=cell.bias)
        gru.load_state_dict({k + "_l0": v for k, v in cell.state_dict().items()})
        self.seq = OnnxRuntimeGRU(gru)

    def forward(self, x: Tensor, h: Tensor) -> Tensor:
        return self.seq(x.unsqueeze(0), h.unsqueeze(0))[1][0]
