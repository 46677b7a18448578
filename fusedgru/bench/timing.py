"""Timing and memory of one call.

Timing: triton.testing.do_bench (median, after warm-up, L2 flushed) on a GPU, with
torch.utils.benchmark as the fallback; torch.utils.benchmark.Timer.blocked_autorange
(median) on the CPU.  Memory: on a GPU the peak allocated during one call beyond what was
allocated before it; in training on any device also the bytes the autograd graph saves for
the backward (parameters and inputs not counted).

Spread: the interquartile range of the timed repetitions over their median (IQR / median),
recorded with every timing; above NOISY_SPREAD a timing is reported as too noisy to trust.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn

from .grids import DTYPES, Case

if TYPE_CHECKING:
    from .cells import CellData


# IQR / median above which a timing is reported as too noisy to trust: its repetitions then
# scatter by more than the differences worth reporting (a 1.1x speed-up is within such a
# cell's own noise).  The saved CPU grid run (benchmarks/results/, 1 thread on a shared
# 2-core VM) has a median spread of 4% and 3 of 32 timings above 10%.
NOISY_SPREAD = 0.10


def spread(median_ms: Optional[float], iqr_ms: Optional[float]) -> Optional[float]:
    """IQR / median (0.05: the middle half of the repetitions lies within 5% of the median's
    size); None when either is unknown."""
    if not median_ms or iqr_ms is None:
        return None
    return iqr_ms / median_ms


@dataclass
class TimingOptions:
    quick: bool = False
    # A cell's providers are timed in this many interleaved rounds (round r times every
    # provider once, in turn), each round with 1 / rounds of the time budget below: a burst
    # of noise on a shared machine then hits every provider's figure alike instead of one
    # provider's whole measurement.  1: one timing per provider (the bench before rounds).
    rounds: int = 3

    def per_round(self) -> "RoundOptions":
        return RoundOptions(self)

    @property
    def cpu_min_run_time(self) -> float:
        return 0.1 if self.quick else 0.5

    @property
    def cpu_min_runs(self) -> int:
        """Timed calls at least when one call is long (a block of blocked_autorange is then
        one call): a median and an IQR need a few, and the packed and rollout cells take up
        to seconds a call on 2 CPU cores (a single run was reported with spread 0%)."""
        return 3 if self.quick else 5

    @property
    def gpu_warmup_ms(self) -> int:
        return 10 if self.quick else 25

    @property
    def gpu_rep_ms(self) -> int:
        return 40 if self.quick else 100


class RoundOptions:
    """One round's share of a TimingOptions budget (the same interface time_call reads):
    1 / rounds of the minimum run time and of do_bench's repetitions, at least 2 timed calls
    (a median needs a few; over the rounds a provider gets at least cpu_min_runs)."""

    def __init__(self, opts: TimingOptions):
        self.rounds = max(1, opts.rounds)
        self.cpu_min_run_time = opts.cpu_min_run_time / self.rounds
        self.cpu_min_runs = max(2, -(-opts.cpu_min_runs // self.rounds))
        self.gpu_warmup_ms = opts.gpu_warmup_ms
        self.gpu_rep_ms = max(10, opts.gpu_rep_ms // self.rounds)


def time_rounds(fns: Sequence[Callable[[], None]], device: torch.device, opts: TimingOptions,
                on_error: Callable[[int, Exception], None] = None):
    """Times every fn in opts.rounds interleaved rounds: [(median ms, details)] in fns'
    order, None for one that raised (on_error(i, exc) told, and it sits out the rounds
    after).  The median is the median of the rounds' medians; "iqr_ms" the median of the
    rounds' interquartile ranges (the spread within a round); "rounds_ms" every round's
    median, so that a drift between rounds shows."""
    per = opts.per_round()
    got: List[Optional[List[tuple]]] = [[] for _ in fns]
    for _ in range(per.rounds):
        for i, fn in enumerate(fns):
            if got[i] is None:
                continue
            try:
                got[i].append(time_call(fn, device, per, warm=len(got[i]) == 0))
            except Exception as exc:  # noqa: BLE001 - one provider must not stop the others
                got[i] = None
                if on_error is not None:
                    on_error(i, exc)
    out = []
    for res in got:
        if not res:
            out.append(None)
            continue
        meds = [ms for ms, _ in res]
        details = dict(res[0][1])
        details["method"] = (f"{details['method']}, median of {len(res)} interleaved rounds")
        details["rounds_ms"] = meds
        details["iqr_ms"] = statistics.median(d["iqr_ms"] for _, d in res)
        if "runs" in details:
            details["runs"] = sum(d["runs"] for _, d in res)
        out.append((statistics.median(meds), details))
    return out


def time_call(fn: Callable[[], None], device: torch.device, opts: TimingOptions,
              warm: bool = True):
    """(median ms, details, among them the interquartile range "iqr_ms").  No hand-written
    timing loop: do_bench on a GPU (median and quartiles, its own warm-up and L2 flush),
    torch.utils.benchmark on the CPU (and as the GPU fallback, which synchronises the device
    around each block)."""
    import torch.utils.benchmark as tbench

    if warm:
        fn()  # first call: lazy initialisation, autotuning, compilation
    if device.type == "cuda":
        torch.cuda.synchronize()
        try:
            from triton.testing import do_bench
        except Exception:  # noqa: BLE001 - triton missing: torch.utils.benchmark instead
            do_bench = None
        if do_bench is not None:
            ms, q25, q75 = do_bench(fn, warmup=opts.gpu_warmup_ms, rep=opts.gpu_rep_ms,
                                    quantiles=[0.5, 0.25, 0.75])
            return float(ms), {"method": "triton.testing.do_bench(median)",
                               "warmup_ms": opts.gpu_warmup_ms, "rep_ms": opts.gpu_rep_ms,
                               "iqr_ms": float(q75 - q25)}
    else:
        t0 = time.perf_counter()
        fn()
        one = time.perf_counter() - t0
    min_run_time = opts.cpu_min_run_time if device.type == "cpu" else opts.gpu_rep_ms / 1e3
    if device.type == "cpu":  # at least cpu_min_runs timed calls, however long a call is
        min_run_time = max(min_run_time, opts.cpu_min_runs * one * 1.05)
    m = tbench.Timer(stmt="fn()", globals={"fn": fn},
                     num_threads=torch.get_num_threads()).blocked_autorange(
        min_run_time=min_run_time)
    return m.median * 1e3, {"method": "torch.utils.benchmark.blocked_autorange(median)",
                            "runs": len(m.times), "iqr_ms": m.iqr * 1e3,
                            "threads": torch.get_num_threads()}


def peak_memory(fn: Callable[[], None], device: torch.device) -> Optional[int]:
    """Peak bytes allocated on the GPU during one call, beyond what was allocated before."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize()
    return int(torch.cuda.max_memory_allocated(device) - before)


def saved_activation_bytes(module: nn.Module, case: Case, data: CellData,
                           layout: str = "time") -> int:
    """Bytes the autograd graph of one training forward keeps for the backward (storages
    counted once; parameters and the inputs x, h0 not counted).  Device-independent: on the
    CPU, where no allocator statistics exist, this is the training-memory comparison."""
    from .cells import make_io

    io = make_io(case, data, DTYPES[case.dtype], grad=True, layout=layout)
    module.train()
    skip = {t.untyped_storage().data_ptr() for t in [io.x, io.h0, *module.parameters()]}
    seen: Dict[int, int] = {}

    def pack(t: Tensor):
        try:
            s = t.untyped_storage()
        except Exception:  # noqa: BLE001 - e.g. a tensor subclass without storage
            return t
        if s.data_ptr() not in skip:
            seen[s.data_ptr()] = max(seen.get(s.data_ptr(), 0), s.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y, hn = io.call(module)
    torch.autograd.backward((y, hn), (io.gy, io.ghn))
    for p in module.parameters():
        p.grad = None
    return int(sum(seen.values()))
