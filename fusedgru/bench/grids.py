"""The cells the benchmark times (a GRU shape, a dtype and a mode: Case) and the named
grids of docs/SPEC.md section 6 with their --quick subsets."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64}
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "fp64": "float64"}
# "train-frozen-input": training where the input needs no gradient (the first layer on raw
# features, an RL observation, one-hot characters): every provider may skip dx, as nn.GRU
# does.  Any grid with "train" cells has these too, when asked for with --mode.
MODES = ("inference", "train", "train-frozen-input")


def is_train(mode: str) -> bool:
    """Whether cells of this mode run forward + backward."""
    return mode in ("train", "train-frozen-input")


def input_needs_grad(mode: str) -> bool:
    """Whether a training cell of this mode takes the gradient of the input too."""
    return mode == "train"


@dataclass(frozen=True)
class Case:
    """One cell of a grid: a GRU shape, a dtype and a mode."""

    grid: str
    B: int
    H: int
    T: int
    I: int
    layers: int = 1
    bidirectional: bool = False
    dtype: str = "float32"
    mode: str = "inference"
    # How the GRU is called: "seq" one call over T steps (nn.GRU / FusedGRU), "cell" one
    # GRUCell call per step from Python (T calls; nn.GRUCell / FusedGRUCell), "packed" one
    # call on a PackedSequence (T: the longest a sequence may be), "rollout" one call with
    # resets= inside the sequence (each provider's way: providers.py, rollout.py).
    call: str = "seq"
    # packed: the length distribution; rollout: the episode ends (sequences.LENGTHS)
    lengths: str = ""
    # packed: "sorted" (enforce_sorted=True, rows longest first) or "unsorted"
    packing: str = ""

    @property
    def D(self) -> int:
        return 2 if self.bidirectional else 1

    def key(self) -> tuple:
        """What identifies a cell across runs (the grid's name is not part of it)."""
        return (self.B, self.H, self.T, self.I, self.layers, self.bidirectional, self.dtype,
                self.mode, self.call, self.lengths, self.packing)

    @property
    def label(self) -> str:
        return (f"{self.grid} {self.mode} {self.dtype} B={self.B} H={self.H} T={self.T}"
                + (f" I={self.I}" if self.I != self.H else "")
                + (f" L={self.layers}" if self.layers != 1 else "")
                + (" bidir" if self.bidirectional else "")
                + (f" {self.call}" if self.call not in ("seq", "packed", "rollout") else "")
                + (f" {self.lengths}" if self.lengths else "")
                + (f" {self.packing}" if self.packing else ""))


@dataclass(frozen=True)
class GridSpec:
    B: Tuple[int, ...]
    H: Tuple[int, ...]
    T: Tuple[int, ...]
    dtypes: Tuple[str, ...]
    modes: Tuple[str, ...]
    I: Optional[int] = None  # None: I = H
    layers: int = 1
    bidirectional: bool = False
    summary: str = ""
    call: str = "seq"
    lengths: str = ""
    packing: str = ""
    # Cells that are not a product B x H x T (the packed grid): one dict per shape, keys
    # of Case (B, H, T, I, layers, bidirectional, lengths); dtypes x modes x shapes.
    shapes: Tuple[dict, ...] = ()


_BOTH = ("inference", "train")
GRIDS: Dict[str, GridSpec] = {
    "stream": GridSpec((1, 8, 16, 64), (256, 512, 1024), (1024,), ("float32", "bfloat16"),
                       _BOTH, summary="GPU: small batches, long sequences"),
    "batch": GridSpec((128, 256), (512, 1024, 2048), (256,), ("float32", "bfloat16"), _BOTH,
                      summary="GPU: large batches and hidden sizes"),
    "deep": GridSpec((32,), (512,), (512,), ("float32", "bfloat16"), ("train",), layers=2,
                     bidirectional=True, summary="GPU: 2 layers, bidirectional"),
    "d2l": GridSpec((32,), (256,), (35,), ("float32",), ("train",), I=28,
                    summary="the textbook character model (I = 28 one-hot characters)"),
    "cpu": GridSpec((1, 32), (64, 256), (35, 128), ("float32",), _BOTH,
                    summary="what a machine without a GPU measures"),
    # Single-step calls, where the cost of a call is what counts (streaming inference, an
    # RL actor): T=1 calls of the sequence module, GRUCell calls, and a 32-step loop of
    # GRUCell calls with backward (the usual way to run per-step logic in training).
    "calls": GridSpec((1, 8, 64), (64, 256, 1024), (1,), ("float32",), ("inference",),
                      summary="single-step calls: T=1 through the sequence module"),
    "cells": GridSpec((1, 8, 64), (64, 256, 1024), (1,), ("float32",), ("inference",),
                      call="cell", summary="single-step calls: one GRUCell call"),
    "cell-loop": GridSpec((1, 8, 64), (64, 256, 1024), (32,), ("float32",), ("train",),
                          call="cell", summary="32 GRUCell calls in a Python loop + backward"),
    # Sequence structure inside the batch (issue 19; benchmarks/NOTES-sequence-bench.md).
    # packed: PackedSequence inputs (nn.GRU and FusedGRU take the same PackedSequence);
    # unsorted packing by default (--packing sorted,unsorted for both).
    "packed": GridSpec((), (), (), ("float32",), _BOTH, call="packed", packing="unsorted",
                       shapes=(dict(B=64, H=256, T=400, lengths="skewed"),
                               dict(B=64, H=256, T=512, lengths="lognormal"),
                               dict(B=64, H=64, T=512, lengths="lognormal"),
                               dict(B=64, H=256, T=512, lengths="lognormal", layers=2,
                                    bidirectional=True)),
                       summary="PackedSequence batches: one sequence of 400 steps + 63 of 10;"
                               " lognormal lengths (median 40, <= 512) at H 256, 64 and 2 "
                               "layers bidirectional"),
    # rollout: RL rollouts, episode ends at random inside the sequence (resets=); against
    # nn.GRU's usual ways (masked loop, episodes as packed/padded segments) and TorchRL.
    "rollout": GridSpec((64,), (256,), (128,), ("float32",), _BOTH, I=256, call="rollout",
                        lengths="geometric",
                        summary="RL rollouts with resets: B=64 envs, T=128, episodes of mean "
                                "20 steps, vs nn.GRU's masked loop / segments and TorchRL"),
    # Not in SPEC: seconds on any machine, for the smoke tests and CI.
    "tiny": GridSpec((1, 3), (8, 17), (5,), ("float32",), _BOTH, I=6,
                     summary="smoke test: tiny odd sizes"),
    "tiny-packed": GridSpec((), (), (), ("float32",), _BOTH, call="packed", packing="unsorted",
                            shapes=(dict(B=5, H=8, T=40, I=6, lengths="skewed"),
                                    dict(B=6, H=8, T=64, I=6, lengths="lognormal", layers=2,
                                         bidirectional=True)),
                            summary="smoke test: the packed grid at tiny sizes"),
    "tiny-rollout": GridSpec((5,), (8,), (40,), ("float32",), _BOTH, I=6, call="rollout",
                             lengths="geometric",
                             summary="smoke test: the rollout grid at tiny sizes"),
}
# --quick: a subset of each grid (about a minute on the device it is meant for).
QUICK: Dict[str, dict] = {
    "stream": {"B": (1, 64), "H": (256, 1024)},
    "batch": {"B": (128,), "H": (512, 2048)},
    "deep": {"T": (128,)},
    "d2l": {},
    "cpu": {"T": (35,)},
    "calls": {"B": (1, 64), "H": (64, 1024)},
    "cells": {"B": (1, 64), "H": (64, 1024)},
    "cell-loop": {"B": (1, 64), "H": (64, 256)},
    "packed": {"shapes": (0, 1)},  # the skewed case and lognormal at H=256
    "rollout": {},
    "tiny": {},
    "tiny-packed": {},
    "tiny-rollout": {},
}
# --grid all: every grid of SPEC section 6 (the single-step sets and the sequence-structure
# grids, packed and rollout, are named explicitly)
ALL = ("stream", "batch", "deep", "d2l", "cpu")


def grid_cases(name: str, *, quick: bool = False, dtypes: Optional[Sequence[str]] = None,
               modes: Optional[Sequence[str]] = None,
               packings: Optional[Sequence[str]] = None) -> List[Case]:
    """The cells of a grid; ``packings`` ("sorted", "unsorted"): the packings of its packed
    cells (default: the grid's own)."""
    spec = GRIDS[name]
    sub = QUICK.get(name, {}) if quick else {}
    cases = []
    for dtype in spec.dtypes:
        if dtypes and dtype not in dtypes:
            continue
        spec_modes = spec.modes
        if modes and "train" in spec.modes:  # frozen-input cells only when asked for
            spec_modes += ("train-frozen-input",)
        for mode in spec_modes:
            if modes and mode not in modes:
                continue
            if spec.shapes:
                picked = [spec.shapes[i] for i in sub.get("shapes", range(len(spec.shapes)))]
                for shape in picked:
                    for packing in (packings or (spec.packing,)) if spec.packing else ("",):
                        kw = {"I": shape["H"], "layers": spec.layers,
                              "bidirectional": spec.bidirectional, "lengths": spec.lengths,
                              **shape}
                        cases.append(Case(name, dtype=dtype, mode=mode, call=spec.call,
                                          packing=packing, **kw))
                continue
            for H in sub.get("H", spec.H):
                for B in sub.get("B", spec.B):
                    for T in sub.get("T", spec.T):
                        cases.append(Case(name, B, H, T, spec.I or H, spec.layers,
                                          spec.bidirectional, dtype, mode, spec.call,
                                          spec.lengths, spec.packing))
    return cases
