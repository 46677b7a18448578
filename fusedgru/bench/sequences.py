"""Sequence structure of the `packed` and `rollout` cells (issue 19): the length
distributions of packed batches, the episode ends of RL rollouts, and the index arithmetic
that cuts a rollout into its episodes (the "padded segments" way of running nn.GRU).

Every draw here comes from Python's own `random.Random(seed)` (and
`statistics.NormalDist.inv_cdf`), not from torch's generator, so that every run, on any
machine and any torch version, uses the same lengths and the same resets.  The seed is
fixed (SEQ_SEED), not the run's --seed: the structure of a cell is part of what the cell
is.

Length distributions (Case.lengths, packed cells; T is the longest a sequence may be):

    skewed     one sequence of T steps and B - 1 of max(1, T // 40) steps (T = 400: ten);
               the long one sits at row B // 3 (not first: unsorted packing must reorder)
    lognormal  round(exp(N(log 40, 1.0))) clipped to [1, T], drawn per row with SEQ_SEED;
               at B = 64, T = 512: 3517 steps in all, median 32, longest 512 then 215

Episode ends (Case.lengths, rollout cells):

    geometric  resets[t, b] ~ Bernoulli(1/20) for t >= 1 (episodes of geometric length,
               mean 20), resets[0] all False (every row carries its hx in); SEQ_SEED
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from statistics import NormalDist
from typing import List, Optional

import torch
from torch import Tensor

SEQ_SEED = 19  # issue 19; fixed, so that every run uses the same lengths and resets
LOGNORMAL_MEDIAN = 40
LOGNORMAL_SIGMA = 1.0
MEAN_EPISODE = 20
PACKINGS = ("sorted", "unsorted")
LENGTHS = {
    "skewed": "one sequence of T steps, B-1 of T//40 (T=400: 10)",
    "lognormal": f"lognormal, median {LOGNORMAL_MEDIAN}, sigma {LOGNORMAL_SIGMA}, "
                 "clipped to [1, T]",
    "geometric": f"episode ends Bernoulli(1/{MEAN_EPISODE}) per step and row "
                 f"(mean episode {MEAN_EPISODE}), none at t=0",
}


def draw_lengths(kind: str, B: int, T: int, *, sort: bool = False,
                 seed: int = SEQ_SEED) -> List[int]:
    """The B lengths of a packed cell (see the module docstring), in row order; ``sort``:
    longest first (the order enforce_sorted=True requires)."""
    if kind == "skewed":
        lengths = [max(1, T // 40)] * B
        if B:
            lengths[B // 3] = T
    elif kind == "lognormal":
        rng, normal = random.Random(seed), NormalDist()
        mu = math.log(LOGNORMAL_MEDIAN)
        lengths = [min(T, max(1, round(math.exp(mu + LOGNORMAL_SIGMA * normal.inv_cdf(
            min(max(rng.random(), 1e-12), 1 - 1e-12)))))) for _ in range(B)]
    else:
        raise ValueError(f"unknown length distribution {kind!r}; expected skewed, lognormal")
    return sorted(lengths, reverse=True) if sort else lengths


def draw_resets(kind: str, T: int, B: int, *, seed: int = SEQ_SEED) -> Tensor:
    """(T, B) bool: resets[t, b] is True where a new episode starts at step t of row b."""
    if kind != "geometric":
        raise ValueError(f"unknown episode distribution {kind!r}; expected geometric")
    rng = random.Random(seed)
    p = 1.0 / MEAN_EPISODE
    rows = [[False] * B] + [[rng.random() < p for _ in range(B)] for _ in range(1, T)]
    return torch.tensor(rows, dtype=torch.bool).reshape(T, B)


def pack(x: Tensor, lengths: Tensor, sorted_: bool):
    """nn.utils.rnn.pack_padded_sequence of a time-major (T, B, ...) tensor."""
    return torch.nn.utils.rnn.pack_padded_sequence(x, lengths.cpu(), enforce_sorted=sorted_)


def with_data(packed, data: Tensor):
    """The same PackedSequence structure around another data tensor (a grad leaf)."""
    return torch.nn.utils.rnn.PackedSequence(data, packed.batch_sizes, packed.sorted_indices,
                                             packed.unsorted_indices)


@dataclass
class Segments:
    """A rollout's episodes as the rows of a packed batch (see segment_rollout).

    Row order in the flat (B*T) view: env-major, p = b * T + t.  Segment s covers flat rows
    starts[s] .. starts[s] + lengths[s] - 1; segments are numbered in flat order, so a row's
    segments are consecutive and the last one ends at t = T - 1.
    """

    S: int  # number of segments
    lengths: Tensor  # (S,) int64 on the CPU
    env: Tensor  # (S,) int64: the row (environment) of each segment
    carry: Tensor  # (S,) bool: the segment starts at t = 0 without a reset (takes hx)
    last: Tensor  # (B,) int64: the last segment of each row
    pos: Tensor  # (B*T,) int64: step within its segment of each flat row
    seg: Tensor  # (B*T,) int64: the segment of each flat row
    # packed layout (segments sorted longest first, as PackedSequence wants them)
    batch_sizes: Tensor  # (max length,) int64 on the CPU
    sorted_indices: Tensor  # (S,) segment at each sorted position
    unsorted_indices: Tensor  # (S,) sorted position of each segment
    packed_index: Tensor  # (B*T,): the packed data row of each flat row


def segment_rollout(resets: Tensor) -> Segments:
    """Cuts a (T, B) bool resets tensor into episodes, vectorised (no loop over segments):
    a segment starts at t = 0 of every row and wherever resets[t, b] is True."""
    T, B = resets.shape
    dev = resets.device
    starts_mask = resets.t().clone()  # (B, T) env-major
    if T:
        starts_mask[:, 0] = True
    flat = starts_mask.reshape(-1)
    seg = torch.cumsum(flat.to(torch.int64), 0) - 1  # (B*T,)
    starts = torch.nonzero(flat).squeeze(1)  # (S,)
    S = int(starts.numel())
    ends = torch.cat([starts[1:], torch.tensor([B * T], device=dev)])
    lengths = ends - starts
    pos = torch.arange(B * T, device=dev) - starts[seg]
    env = torch.div(starts, max(T, 1), rounding_mode="floor")
    t0 = starts - env * T
    carry = (t0 == 0) & ~resets[0].index_select(0, env) if T else torch.zeros(0, dtype=torch.bool)
    last = seg.view(B, T)[:, -1] if T else torch.zeros(B, dtype=torch.int64, device=dev)
    # Packed layout: sorted longest first (stable), batch_sizes[t] = #segments longer than t;
    # flat row (s, pos) lands at offset[pos] + rank[s].
    lengths_cpu = lengths.cpu()
    order = torch.sort(lengths_cpu, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank[order] = torch.arange(S)
    Lmax = int(lengths_cpu.max()) if S else 0
    batch_sizes = (lengths_cpu.unsqueeze(0) > torch.arange(Lmax).unsqueeze(1)).sum(1)
    offsets = torch.cumsum(batch_sizes, 0) - batch_sizes
    packed_index = offsets.to(dev)[pos] + rank.to(dev)[seg]
    return Segments(S, lengths_cpu, env, carry, last, pos, seg, batch_sizes,
                    order.to(dev), rank.to(dev), packed_index)


def segment_states(hx: Tensor, segs: Segments) -> Tensor:
    """(L, S, H) initial states of the segments: a row's carried hx for its first segment
    (when no reset at t = 0), zeros for every other (gradient reaches hx only through
    those carried ones)."""
    return hx.index_select(1, segs.env) * segs.carry.to(hx.dtype).view(1, -1, 1)


def describe(lengths: Optional[List[int]] = None, resets: Optional[Tensor] = None) -> dict:
    """What results.json records of a cell's sequence structure."""
    if lengths is not None:
        s = sorted(lengths)
        return {"lengths": list(lengths), "tokens": sum(lengths), "longest": s[-1] if s else 0,
                "median": s[len(s) // 2] if s else 0,
                "padded_over_tokens": (len(s) * s[-1] / sum(s)) if s and sum(s) else None}
    assert resets is not None
    segs = segment_rollout(resets)
    return {"resets": int(resets.sum()), "episodes": segs.S,
            "mean_episode": float(segs.lengths.float().mean()) if segs.S else None,
            "longest_episode": int(segs.lengths.max()) if segs.S else 0}
