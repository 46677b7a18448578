"""The ways to run a GRU over RL rollouts with resets inside the sequence (the `rollout`
cells), each called as FusedGRU is: forward(x (T, B, I), hx (L, B, H), *, resets (T, B)
bool) -> (y (T, B, H), h_n (L, B, H)).  resets[t, b] True: the state entering step t of row
b is zeros (instead of h_{t-1}, or of hx at t = 0), in every layer; no gradient crosses a
reset.

    MaskedLoopGRU  nn.GRU called one step at a time from Python, the state multiplied by
                   (1 - reset) before each step: what RL code usually writes; the
                   baseline of the rollout cells and their float64 oracle
    MaskedCellLoopGRU  the same loop through nn.GRUCell (one per layer)
    SegmentsGRU    the rollout cut into its episodes, the episodes run as the rows of one
                   nn.GRU call, the outputs scattered back to (T, B, H): "pack" builds the
                   PackedSequence of the episodes directly (no padded copy); "pad" pads them
                   to the longest episode (one layer only: the state after padding is not
                   the episode's last state, h_n is read off the outputs)
    TorchRLGRU     TorchRL's GRUModule (recurrent mode, is_init = resets) with its
                   "pad" or "scan" recurrent backend, or its python-based GRU ("py")

All of them hold nn.GRU's parameters under nn.GRU's names (the adapters' names end in
them), so gradients compare name by name.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from .sequences import segment_rollout, segment_states


def _gru_kwargs(gru: nn.GRU, **over) -> dict:
    kw = dict(input_size=gru.input_size, hidden_size=gru.hidden_size,
              num_layers=gru.num_layers, bias=gru.bias, batch_first=gru.batch_first,
              dropout=gru.dropout, bidirectional=gru.bidirectional,
              device=gru.weight_hh_l0.device, dtype=gru.weight_hh_l0.dtype)
    kw.update(over)
    return kw


def _copy_into(cls, gru: nn.GRU, **over):
    m = cls(**_gru_kwargs(gru, **over))
    m.load_state_dict(gru.state_dict())
    if hasattr(m, "flatten_parameters"):
        m.flatten_parameters()
    return m


def _check(x: Tensor, hx: Optional[Tensor], resets: Tensor, L: int, H: int) -> Tensor:
    if x.dim() != 3 or resets.shape != x.shape[:2] or resets.dtype != torch.bool:
        raise ValueError(f"rollout: x (T, B, I) and resets (T, B) bool expected, got "
                         f"{tuple(x.shape)} and {tuple(resets.shape)} {resets.dtype}")
    if hx is None:
        hx = x.new_zeros(L, x.shape[1], H)
    return hx


class MaskedLoopGRU(nn.GRU):
    """nn.GRU one step at a time, state *= (1 - reset) before each step (the usual loop;
    one nn.GRU call per step serves any number of layers).  Time-major, one direction."""

    @classmethod
    def from_gru(cls, gru: nn.GRU) -> "MaskedLoopGRU":
        if gru.bidirectional or gru.batch_first:
            raise ValueError("masked loop: time-major, one direction")
        return _copy_into(cls, gru)

    def forward(self, x: Tensor, hx: Optional[Tensor] = None, *,  # type: ignore[override]
                resets: Tensor) -> Tuple[Tensor, Tensor]:
        h = _check(x, hx, resets, self.num_layers, self.hidden_size)
        keep = (~resets).to(x.dtype).unsqueeze(-1)  # (T, B, 1)
        ys = []
        for t in range(x.shape[0]):
            y, h = super().forward(x[t:t + 1], h * keep[t])
            ys.append(y)
        return (torch.cat(ys) if ys else x.new_zeros(0, x.shape[1], self.hidden_size)), h


class MaskedCellLoopGRU(nn.GRU):
    """The same loop through nn.GRUCell (one per layer, on nn.GRU's own Parameter
    objects): each step, each layer, GRUCell(x, h * (1 - reset)).  On the CPU a GRUCell call
    costs less than a one-step nn.GRU call (measured at B=64, H=256: inference 136 vs 166
    ms per 128 steps, training about equal)."""

    @classmethod
    def from_gru(cls, gru: nn.GRU) -> "MaskedCellLoopGRU":
        if gru.bidirectional or gru.batch_first:
            raise ValueError("masked loop: time-major, one direction")
        m = _copy_into(cls, gru)
        cells = []
        for layer in range(m.num_layers):
            cell = nn.GRUCell(m.input_size if layer == 0 else m.hidden_size, m.hidden_size,
                              m.bias, device="meta")
            for w in ("weight_ih", "weight_hh") + (("bias_ih", "bias_hh") if m.bias else ()):
                setattr(cell, w, getattr(m, f"{w}_l{layer}"))
            cells.append(cell)
        object.__setattr__(m, "_cells", cells)  # not submodules: the parameters are m's
        return m

    def forward(self, x: Tensor, hx: Optional[Tensor] = None, *,  # type: ignore[override]
                resets: Tensor) -> Tuple[Tensor, Tensor]:
        hx = _check(x, hx, resets, self.num_layers, self.hidden_size)
        keep = (~resets).to(x.dtype).unsqueeze(-1)  # (T, B, 1)
        h = list(hx.unbind(0))
        ys = []
        for t in range(x.shape[0]):
            inp = x[t]
            for layer, cell in enumerate(self._cells):
                h[layer] = inp = cell(inp, h[layer] * keep[t])
            ys.append(inp)
        return (torch.stack(ys) if ys else x.new_zeros(0, x.shape[1], self.hidden_size)), \
            torch.stack(h)


class SegmentsGRU(nn.GRU):
    """The rollout's episodes as the rows of one nn.GRU call (see the module docstring).
    The cutting (index arithmetic on the resets, vectorised) is part of each call, as it is
    in training: every rollout has other resets."""

    segments = "pack"  # not "mode": nn.GRU's own attribute (its cuDNN mode)

    @classmethod
    def from_gru(cls, gru: nn.GRU, mode: str = "pack") -> "SegmentsGRU":
        if gru.bidirectional or gru.batch_first:
            raise ValueError("padded segments: time-major, one direction")
        if mode not in ("pack", "pad"):
            raise ValueError(f"mode {mode!r}: pack or pad")
        if mode == "pad" and gru.num_layers != 1:
            raise ValueError("padded segments: one layer (h_n of every layer needs 'pack')")
        m = _copy_into(cls, gru)
        m.segments = mode
        return m

    def forward(self, x: Tensor, hx: Optional[Tensor] = None, *,  # type: ignore[override]
                resets: Tensor) -> Tuple[Tensor, Tensor]:
        hx = _check(x, hx, resets, self.num_layers, self.hidden_size)
        T, B, I = x.shape
        H = self.hidden_size
        segs = segment_rollout(resets)
        h0 = segment_states(hx, segs)  # (L, S, H)
        x_flat = x.transpose(0, 1).reshape(B * T, I)  # env-major rows
        if self.segments == "pack":
            inv = torch.empty_like(segs.packed_index)
            inv[segs.packed_index] = torch.arange(B * T, device=x.device)
            packed = nn.utils.rnn.PackedSequence(x_flat.index_select(0, inv), segs.batch_sizes,
                                                 segs.sorted_indices, segs.unsorted_indices)
            out, h_seg = super().forward(packed, h0)
            y_flat = out.data.index_select(0, segs.packed_index)
            h_n = h_seg.index_select(1, segs.last)
        else:
            Lmax = int(segs.lengths.max())
            where = segs.pos * segs.S + segs.seg  # row of (pos, seg) in (Lmax * S)
            xp = x_flat.new_zeros(Lmax * segs.S, I).index_copy(0, where, x_flat)
            yp, _ = super().forward(xp.view(Lmax, segs.S, I), h0)
            y_flat = yp.reshape(Lmax * segs.S, H).index_select(0, where)
            h_n = None
        y = y_flat.view(B, T, H).transpose(0, 1)
        if h_n is None:
            h_n = y[-1].unsqueeze(0)  # one layer: the last step of every row
        return y, h_n


def torchrl_reason() -> Optional[str]:
    """Why TorchRL cannot be compared here (None: it can)."""
    try:
        import tensordict  # noqa: F401
        import torchrl  # noqa: F401
        from torchrl.modules import GRUModule, set_recurrent_mode  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - absent, or built against another torch
        return f"torchrl is not importable ({type(exc).__name__}: {str(exc)[:200]})"
    return None


def torchrl_version() -> Optional[str]:
    try:
        import torchrl

        return torchrl.__version__
    except Exception:  # noqa: BLE001
        return None


class TorchRLGRU(nn.Module):
    """TorchRL's GRUModule in recurrent mode with is_init = resets, called as the other
    rollout modules but BATCH-FIRST (its layout): forward(x (B, T, I), hx (L, B, H), *,
    resets (B, T)) -> (y (B, T, H), h_n (L, B, H)).

    TorchRL replaces the state entering step t by the recurrent_state stored at step t
    wherever is_init[t] is True, and reads the first step's stored state as the initial
    one; the states given are therefore hx at t = 0 (zeros where resets[0]) and zeros
    elsewhere, which is exactly "zeros after a reset".  h_n is its ("next", state) at the
    last step (a trajectory end in every row).

    backend "pad": GRUModule(recurrent_backend="pad") over nn.GRU (episodes split and
    packed); "scan": recurrent_backend="scan" (TorchRL's scan with its own backward);
    "py": GRUModule(python_based=True), TorchRL's python GRU over the padded episodes.
    """

    def __init__(self, gru: nn.GRU, backend: str = "pad"):
        super().__init__()
        from torchrl.modules import GRU as TorchRLPyGRU
        from torchrl.modules import GRUModule

        if gru.bidirectional:
            raise ValueError("torchrl: one direction")
        inner = (_copy_into(TorchRLPyGRU, gru, batch_first=True, bidirectional=False)
                 if backend == "py" else _copy_into(nn.GRU, gru, batch_first=True))
        self.backend = backend
        self.module = GRUModule(gru=inner, in_keys=["x", "rs", "is_init"],
                                out_keys=["y", ("next", "rs")],
                                recurrent_backend="scan" if backend == "scan" else "pad")

    def forward(self, x: Tensor, hx: Optional[Tensor] = None, *,
                resets: Tensor) -> Tuple[Tensor, Tensor]:
        from tensordict import TensorDict
        from torchrl.modules import set_recurrent_mode

        B, T = resets.shape
        gru = self.module.gru
        L, H = gru.num_layers, gru.hidden_size
        if hx is None:
            hx = x.new_zeros(L, B, H)
        first = (hx * (~resets[:, 0]).to(hx.dtype).view(1, B, 1)).transpose(0, 1)  # (B, L, H)
        states = torch.cat([first.unsqueeze(1), x.new_zeros(B, T - 1, L, H)], 1)
        td = TensorDict({"x": x, "rs": states, "is_init": resets.unsqueeze(-1)},
                        batch_size=[B, T])
        with set_recurrent_mode(True):
            td = self.module(td)
        return td["y"], td["next", "rs"][:, -1].transpose(0, 1)

