"""The cells the benchmark times (a GRU shape, a dtype and a mode: Case) and the named
grids of docs/SPEC.md section 6 with their --quick subsets."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64}
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "fp64": "float64"}
MODES = ("inference", "train")


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
    # GRUCell call per step from Python (T calls; nn.GRUCell / FusedGRUCell).
    call: str = "seq"

    @property
    def D(self) -> int:
        return 2 if self.bidirectional else 1

    def key(self) -> tuple:
        """What identifies a cell across runs (the grid's name is not part of it)."""
        return (self.B, self.H, self.T, self.I, self.layers, self.bidirectional, self.dtype,
                self.mode, self.call)

    @property
    def label(self) -> str:
        return (f"{self.grid} {self.mode} {self.dtype} B={self.B} H={self.H} T={self.T}"
                + (f" I={self.I}" if self.I != self.H else "")
                + (f" L={self.layers}" if self.layers != 1 else "")
                + (" bidir" if self.bidirectional else "")
                + (f" {self.call}" if self.call != "seq" else ""))


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
    # Not in SPEC: seconds on any machine, for the smoke tests and CI.
    "tiny": GridSpec((1, 3), (8, 17), (5,), ("float32",), _BOTH, I=6,
                     summary="smoke test: tiny odd sizes"),
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
    "tiny": {},
}
ALL = ("stream", "batch", "deep", "d2l", "cpu")  # --grid all: every grid of SPEC section 6


def grid_cases(name: str, *, quick: bool = False, dtypes: Optional[Sequence[str]] = None,
               modes: Optional[Sequence[str]] = None) -> List[Case]:
    spec = GRIDS[name]
    sub = QUICK.get(name, {}) if quick else {}
    cases = []
    for dtype in spec.dtypes:
        if dtypes and dtype not in dtypes:
            continue
        for mode in spec.modes:
            if modes and mode not in modes:
                continue
            for H in sub.get("H", spec.H):
                for B in sub.get("B", spec.B):
                    for T in sub.get("T", spec.T):
                        cases.append(Case(name, B, H, T, spec.I or H, spec.layers,
                                          spec.bidirectional, dtype, mode, spec.call))
    return cases
