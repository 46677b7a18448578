"""The CUDA backend's kernels, their own source (csrc/gru_kernels.cuh), run on the CPU.

csrc/host/gru_host_main.cpp compiles the kernels with the host C++ compiler against
csrc/host/cuda_host_shim.h: one OS thread per CUDA thread (256 per block, a few blocks),
barriers for __syncthreads() and grid.sync(), the launch plan and launch order of the GPU
(plan_layout, for_each_step_launch), every buffer allocated at its exact size.  Two builds:

- ``tsan``: -fsanitize=thread.  Races between the threads of a block (shared memory) and
  between blocks (the ping-pong buffers across grid.sync()), on the CPU's memory model;
- ``asan``: -fsanitize=address,undefined.  Any read or write past a buffer's last element,
  misaligned int4 / wmma accesses, undefined behaviour.

Each case runs gru_fwd, gru_infer and gru_bwd (on gru_fwd's y and ws) on poisoned (NaN)
outputs; y, ws and the six gradients (the weight gradients from the kernels' dgi / dgh as
gru_common.h's weight_grads computes them) are held to SPEC section 5's budget against the
float64 reference, gru_infer's y must be bitwise gru_fwd's, and the sanitizer must report
nothing.  The sequence structure (issue 19) runs through the same kernels: packed batches
(batch_sizes: skewed lengths, ties, length 1, rows dropping below a tile and a 128-row pass)
and resets (random, at t = 0, at the last step), every dtype under AddressSanitizer, every
formulation x path under both sanitizers, against the reference run with the same
batch_sizes / resets.  test_mutant_is_caught builds mutated copies of the kernel source (a
grid.sync() removed from the forward, one from the backward, a __syncthreads() removed, a
loop bound off by one, the plan's shared memory one element short, the forward's reset mask
dropped, the backward's dh carried across a reset, a packed step's rows ignored, 3xTF32's
a_lo b_hi product dropped, 3xTF32's hi used with the low bits __float_to_tf32 leaves) and
requires each to be caught by the sanitizer meant for it, or by the error budget.  Strict
float32 runs twice: on tensor cores in split precision (f32x3: 3xTF32, the default since
issue 18) and on CUDA cores (f32: the FMA path behind fusedgru::_set_cuda_fp32_path(1)),
both held to float32's budget.  The staged step (issue 18 part 2, step variant 1:
fusedgru::_set_cuda_step_variant(1), the harness's stage=1: the MMA's A operand copied into
shared memory with cp.async once per pass) runs on a subset of both grids, every dtype path,
formulation and sequence structure, held to the budget AND bitwise equal to the old step's
outputs; its mutants (the barrier after the copy removed, the wait for the copies removed)
must be caught; test_staging_fits_or_falls_back checks the plan's fit table.  The
split-barrier step (step variant bit 2, the harness's split=1: the persistent forward and
backward at B <= 64 with their carried state in registers and the next step's operands loaded
between the arrival at the grid barrier and the wait) likewise, alone and with the staged A;
its mutants (the split barrier dropped, the operands of the wrong step loaded, the reset
masks dropped, forward and backward) must be caught.

Builds are cached under build/cuda-host/ by the hash of the sources, flags and compiler, so
each variant compiles once.  What this proves and what only a GPU can prove:
benchmarks/NOTES-cuda-host.md.  Run alone with ``python -m pytest -m cuda_host``.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import zlib
from typing import Dict, List, Optional, Tuple

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

from fusedgru import reference, testing

pytestmark = pytest.mark.cuda_host

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
SOURCES = ("gru_kernels.cuh", "host/cuda_host_shim.h", "host/gru_host_main.cpp")


def _cache_dir() -> str:
    """Where builds are cached: $FUSEDGRU_CUDA_HOST_CACHE, else build/cuda-host/ in the
    checkout (as the ptxas test's build/), else a temp directory (read-only checkout)."""
    if os.environ.get("FUSEDGRU_CUDA_HOST_CACHE"):
        return os.environ["FUSEDGRU_CUDA_HOST_CACHE"]
    if os.access(ROOT, os.W_OK):
        return os.path.join(ROOT, "build", "cuda-host")
    return os.path.join(tempfile.gettempdir(), f"fusedgru-cuda-host-{os.getuid()}")


CACHE = _cache_dir()

COMMON_FLAGS = ["-std=c++20", "-g", "-O1", "-fno-strict-aliasing", "-pthread", "-Wall",
                "-Wextra", "-Wno-unknown-pragmas"]
SANITIZER_FLAGS = {
    "tsan": ["-fsanitize=thread"],
    "asan": ["-fsanitize=address,undefined", "-fno-sanitize-recover=all",
             "-fno-omit-frame-pointer"],
}
# Leak checking is off: the harness, not the kernels, allocates (and LeakSanitizer cannot run
# under every container's ptrace policy).  A TSan report exits 66.
SANITIZER_ENV = {
    "TSAN_OPTIONS": "halt_on_error=1 exitcode=66 second_deadlock_stack=1",
    "ASAN_OPTIONS": "detect_leaks=0 halt_on_error=1 abort_on_error=0",
    "UBSAN_OPTIONS": "print_stacktrace=1 halt_on_error=1",
}
RUN_TIMEOUT = 300

# f32: strict float32 on CUDA cores (the FMA path, fusedgru::_set_cuda_fp32_path(1));
# f32x3: strict float32 on TF32 tensor cores in split precision (3xTF32, the default since
# issue 18), held to float32's budget; tf32: float32 as TF32 (torch's default for RNNs).
DTYPES = {"f64": torch.float64, "f32": torch.float32, "f32x3": torch.float32,
          "tf32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


# ---------------------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------------------


def _compiler() -> Optional[str]:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


@functools.lru_cache(maxsize=None)
def _compiler_id(cxx: str) -> str:
    r = subprocess.run([cxx, "--version"], capture_output=True, text=True)
    return r.stdout


_PROBE = """#include <cstdlib>
#include <thread>
int main() {
  int* p = static_cast<int*>(std::malloc(64));
  std::thread t([p] { p[0] = 1; });
  t.join();
  std::free(p);
}
"""


@functools.lru_cache(maxsize=None)
def runner(variant: str) -> Tuple[str, ...]:
    """The command prefix that runs `variant`'s programs here: () or setarch -R (ASLR off),
    decided once by building and running a two-line probe.  gcc 12's sanitizer runtimes
    cannot start under some kernels' address-space randomisation (vm.mmap_rnd_bits above
    28: TSan "unexpected memory mapping", ASan looping on DEADLYSIGNAL).  Skips, saying
    why, only when the sanitizer is absent or cannot run even with ASLR off."""
    cxx = _compiler()
    if cxx is None:
        pytest.skip("no C++ compiler (g++ / c++ / $CXX) to build the host harness")
    with tempfile.TemporaryDirectory() as d:
        src, exe = os.path.join(d, "probe.cpp"), os.path.join(d, "probe")
        with open(src, "w") as f:
            f.write(_PROBE)
        r = subprocess.run([cxx, *COMMON_FLAGS, *SANITIZER_FLAGS[variant], src, "-o", exe],
                           capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"{cxx} cannot build a {variant} program (runtime not installed?): "
                        f"{r.stderr.strip()[-300:]}")
        env = {**os.environ, **SANITIZER_ENV}
        setarch = shutil.which("setarch")
        prefixes = [()] + ([(setarch, platform.machine(), "-R")] if setarch else [])
        why = ""
        for prefix in prefixes:
            try:
                r = subprocess.run([*prefix, exe], capture_output=True, text=True, env=env,
                                   timeout=30)
            except subprocess.TimeoutExpired:
                why = "the probe hung"
                continue
            if r.returncode == 0 and not r.stderr.strip():
                return prefix
            why = r.stderr.strip()[-300:] or f"exit status {r.returncode}"
    aslr = " even with ASLR off (setarch -R)" if setarch else " (and setarch is missing)"
    pytest.skip(f"{variant} programs cannot run here{aslr}: {why}")


def build(variant: str, sources: Optional[Dict[str, bytes]] = None,
          defines: Tuple[str, ...] = ()) -> str:
    """Path of the harness built with `variant`'s sanitizer; `sources` replaces files of
    SOURCES (the mutants).  Cached by content, so a variant compiles once."""
    cxx = _compiler()
    if cxx is None:
        pytest.skip("no C++ compiler (g++ / c++ / $CXX) to build the host harness")
    texts = {}
    for name in SOURCES:
        if sources and name in sources:
            texts[name] = sources[name]
        else:
            with open(os.path.join(CSRC, name), "rb") as f:
                texts[name] = f.read()
    flags = COMMON_FLAGS + SANITIZER_FLAGS[variant] + [f"-D{d}" for d in defines]
    h = hashlib.sha256()
    for name in SOURCES:
        h.update(name.encode() + b"\0" + texts[name] + b"\0")
    h.update(" ".join(flags).encode() + _compiler_id(cxx).encode())
    out = os.path.join(CACHE, f"{variant}-{h.hexdigest()[:16]}")
    exe = os.path.join(out, "gru_host")
    if os.path.exists(exe):
        return exe
    os.makedirs(out, exist_ok=True)
    main = os.path.join(CSRC, "host", "gru_host_main.cpp")
    if sources:  # kept beside the binary, so that a report's file:line can be read
        for name, text in texts.items():
            os.makedirs(os.path.dirname(os.path.join(out, "src", name)), exist_ok=True)
            with open(os.path.join(out, "src", name), "wb") as f:
                f.write(text)
        main = os.path.join(out, "src", "host", "gru_host_main.cpp")
    tmp = f"{exe}.{os.getpid()}.{threading.get_ident()}.tmp"
    r = subprocess.run([cxx, *flags, main, "-o", tmp], capture_output=True, text=True)
    if r.returncode != 0:
        runner(variant)  # skips if the sanitizer itself is missing
        pytest.fail(f"building the {variant} harness failed:\n{r.stderr[-4000:]}")
    os.replace(tmp, exe)  # atomic: a concurrent session sees all or nothing
    return exe


class Builds:
    """Builds running in the background; [key] waits for one and re-raises its skip or
    failure, so a missing sanitizer skips only the tests that need it."""

    def __init__(self, jobs):
        pool = concurrent.futures.ThreadPoolExecutor(2)  # one compiler per core
        self._futures = {k: pool.submit(f) for k, f in jobs.items()}
        pool.shutdown(wait=False)

    def __getitem__(self, key) -> str:
        return self._futures[key].result()


def _checked_build(variant: str, *args) -> str:
    runner(variant)  # the sanitizer runs here at all (else: skip)
    return build(variant, *args)


@pytest.fixture(scope="session")
def harness() -> Builds:
    """Both sanitizer builds of the harness, compiled in parallel."""
    return Builds({v: functools.partial(_checked_build, v) for v in SANITIZER_FLAGS})


# ---------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------

def execute(variant: str, cmd: List[str], env_extra: Optional[Dict[str, str]] = None,
            timeout: int = RUN_TIMEOUT) -> subprocess.CompletedProcess:
    """Runs a `variant` program with the sanitizers' options (and ASLR off where needed)."""
    env = {**os.environ, **SANITIZER_ENV, **(env_extra or {})}
    return subprocess.run([*runner(variant), *cmd], capture_output=True, text=True, env=env,
                          timeout=timeout)


class TF32Matmul(TorchFunctionMode):
    """torch's float32 matmuls with TF32 operands, as cuBLAS computes them with TF32
    allowed: each operand rounded to 10 mantissa bits (cvt.rna: to nearest, ties away from
    zero), the products accumulated in float32.  The CPU has no TF32, so the reference run
    "in the kernel's precision" (SPEC section 5) is the float32 reference under this mode."""

    @staticmethod
    def round(t: torch.Tensor) -> torch.Tensor:
        if t.dtype != torch.float32:
            return t
        i = t.contiguous().view(torch.int32)
        r = ((i + 0x1000) & -0x2000).view(torch.float32)
        return torch.where(torch.isfinite(t), r, t)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.mm, torch.matmul, torch.bmm, torch.Tensor.__matmul__,
                    torch.Tensor.mm, torch.Tensor.matmul):
            args = tuple(self.round(a) if isinstance(a, torch.Tensor) else a for a in args)
        elif func in (torch.addmm, torch.Tensor.addmm):  # (bias, m1, m2): not the bias
            args = (args[0],) + tuple(self.round(a) for a in args[1:3]) + tuple(args[3:])
        return func(*args, **kwargs)


def _precision(dtype_name: str):
    return TF32Matmul() if dtype_name == "tf32" else contextlib.nullcontext()


@dataclasses.dataclass(frozen=True)
class Spec:
    dtype: str  # f64 f32 tf32 f16 bf16
    path: str  # persistent | step
    T: int
    B: int
    H: int
    reset_after: bool
    h0: bool = True
    bias: bool = True
    # The sequence structure (gru_common.h Layout), at most one of:
    lengths: Optional[Tuple[int, ...]] = None  # packed: B non-increasing lengths, first = T
    resets: Optional[str] = None  # dense with resets: a pattern of RESET_PATTERNS
    # Step variant 1 (fusedgru::_set_cuda_step_variant(1)): A staged in shared memory.  The
    # inputs are those of the same spec without it (seeded by data_id), so that the outputs
    # can be compared bit for bit with the old step's.
    stage: bool = False
    # Step variant bit 2 (_set_cuda_step_variant(2)): the persistent forward's split-barrier
    # step where it applies (B <= 64); the same inputs again, the same bits expected.
    split: bool = False
    # Step variant bit 4 (_set_cuda_step_variant(4)): the K split balanced over the warps
    # (plan_balance).  A different summation order: held to the budget, not to the bits.
    balance: bool = False
    # Step variant bit 8 (_set_cuda_step_variant(8)): the batch tiles split over this many
    # groups of blocks (plan_groups).  Below H = 128 the K split cannot change (Hp / 64 <= 1)
    # and the outputs must be the one-group launch's bits; from H = 128 on, the budget.
    groups: int = 1
    # Step variant bit 16 (_set_cuda_step_variant(16)): the persistent forward as one thread
    # block cluster of at most this many blocks (plan_cluster), 0 = not; the backward is the
    # grid kernels'.  Below H = 128 the K split is 1 in both and the outputs must be the grid
    # kernels' bits; from H = 128 on, the budget.
    cluster: int = 0

    @property
    def id(self) -> str:
        return (self.data_id + ("-staged" if self.stage else "") + ("-split" if self.split else "")
                + ("-balanced" if self.balance else "")
                + (f"-groups{self.groups}" if self.groups > 1 else "")
                + (f"-cluster{self.cluster}" if self.cluster else ""))

    @property
    def old_step(self) -> "Spec":
        """The same case without the variants that must not change a bit (stage, split; groups
        and cluster below H = 128): the old step, or the balanced (grouped) plan's old step."""
        return dataclasses.replace(self, stage=False, split=False,
                                   groups=self.groups if self.H >= 128 else 1,
                                   cluster=self.cluster if self.H >= 128 else 0)

    @property
    def data_id(self) -> str:
        seq = ""
        if self.lengths is not None:  # run-length: 6x2.5.1 = lengths 6, 6, 5, 1
            runs = []
            for n in self.lengths:
                if runs and runs[-1][0] == n:
                    runs[-1][1] += 1
                else:
                    runs.append([n, 1])
            seq = "-packed" + ".".join(f"{n}x{k}" if k > 1 else str(n) for n, k in runs)
        elif self.resets is not None:
            seq = f"-resets-{self.resets}"
        return (f"{self.dtype}-{self.path}-{'after' if self.reset_after else 'before'}-"
                f"T{self.T}B{self.B}H{self.H}{'' if self.h0 else '-noh0'}"
                f"{'' if self.bias else '-nobias'}{seq}")

    def batch_sizes(self) -> Optional[List[int]]:
        if self.lengths is None:
            return None
        return [sum(n > t for n in self.lengths) for t in range(self.T)]

    def reset_mask(self) -> Optional[torch.Tensor]:
        if self.resets is None:
            return None
        return RESET_PATTERNS[self.resets](self.T, self.B, zlib.crc32(self.data_id.encode()))

    def seq_arg(self) -> str:
        """The harness's SEQ argument (csrc/host/gru_host_main.cpp usage)."""
        if self.lengths is not None:
            return "packed=" + ",".join(map(str, self.batch_sizes()))
        if self.resets is not None:
            return "resets=" + "".join("1" if v else "0" for v in self.reset_mask().flatten())
        return "dense"


def _random_resets(T: int, B: int, seed: int) -> torch.Tensor:
    """Bernoulli(0.3) resets anywhere, with at least one at t = 0 and one at t = T - 1."""
    m = torch.rand(T, B, generator=torch.Generator().manual_seed(seed)) < 0.3
    m[0, 0] = m[T - 1, B - 1] = True
    return m


def _edge_resets(T: int, B: int, seed: int) -> torch.Tensor:
    """Resets at the edges only: step 0 of the even rows (h0 dropped, dh0 zero there), the
    last step of the odd rows (the dh it carries back dropped)."""
    m = torch.zeros(T, B, dtype=torch.bool)
    m[0, 0::2] = True
    m[T - 1, 1::2] = True
    return m


RESET_PATTERNS = {"random": _random_resets, "edges": _edge_resets}


def states_before(h0, y2, batch_sizes, resets, B, H):
    """gru_common.h states_before: the state entering each row's step, laid out like y2
    (N, H): h0 (zeros if absent) at step 0, else the same row of the step before; zeros
    where a reset restarts the row."""
    sizes = batch_sizes if batch_sizes is not None else [B] * (y2.shape[0] // max(B, 1))
    prev = h0 if h0 is not None else y2.new_zeros(B, H)
    parts, first = [], 0
    for t, rows in enumerate(sizes):
        hp = prev[:rows]
        if resets is not None:
            hp = hp.masked_fill(resets[t, :rows].unsqueeze(1), 0)
        parts.append(hp)
        prev = y2[first:first + rows]
        first += rows
    return torch.cat(parts, 0)


def weight_grads(dgi, dgh, x, w_ih, hprev, ws, reset_after):
    """gru_common.h weight_grads (the ATen epilogue after the CUDA reverse-time loop), in
    the kernel's dtype: (dx, dw_ih, dw_hh, db_ih, db_hh) from the kernels' dgi, dgh, over
    all N rows (T * B dense, the packed rows)."""
    I, H = x.shape[-1], hprev.shape[-1]
    N = x.numel() // I
    dgi2, dgh2 = dgi.reshape(N, 3 * H), dgh.reshape(N, 3 * H)
    x2, hp2 = x.reshape(N, I), hprev.reshape(N, H)
    dx = (dgi2 @ w_ih).view(x.shape)
    dw_ih = dgi2.T @ x2
    if reset_after:
        dw_hh = dgh2.T @ hp2
    else:  # rows r, z multiply h; rows n multiply r * h
        rh = ws.reshape(N, 4 * H)[:, :H] * hp2
        dw_hh = torch.cat([dgh2[:, :2 * H].T @ hp2, dgh2[:, 2 * H:].T @ rh], 0)
    db_hh = dgh2.sum(0)
    db_ih = dgi2.sum(0) if reset_after else db_hh.clone()
    return dx, dw_ih, dw_hh, db_ih, db_hh


@dataclasses.dataclass
class Result:
    returncode: int
    stderr: str
    errors: Dict[str, float] = dataclasses.field(default_factory=dict)
    budgets: Dict[str, float] = dataclasses.field(default_factory=dict)
    infer_equal: Optional[bool] = None
    digest: Optional[str] = None  # of every output value (float64), for bitwise comparisons

    @property
    def sanitizer_report(self) -> Optional[str]:
        for marker in ("WARNING: ThreadSanitizer", "ERROR: AddressSanitizer",
                       "runtime error:", "cuda_host:"):
            i = self.stderr.find(marker)
            if i >= 0:
                return self.stderr[i:i + 3000]
        return None

    @property
    def wrong(self) -> Dict[str, str]:
        bad = {k: f"err {self.errors[k]:.3g} > budget {self.budgets[k]:.3g}"
               for k in self.errors if not self.errors[k] <= self.budgets[k]}
        if self.infer_equal is False:
            bad["y_infer"] = "gru_infer's y is not bitwise gru_fwd's"
        return bad

    def problems(self) -> List[str]:
        out = []
        if self.returncode != 0:
            out.append(f"exit status {self.returncode}")
        if self.sanitizer_report:
            out.append(self.sanitizer_report)
        elif self.stderr.strip():  # a clean run prints nothing
            out.append(self.stderr[-3000:])
        if not self.errors:
            out.append("nothing was measured")
        out += [f"{k}: {v}" for k, v in self.wrong.items()]
        return out


def case_inputs(spec: Spec):
    """(case, N, the harness's IN values) of `spec`: a random layer case seeded by its id,
    in its dtype, gi as forward_cuda computes it (one GEMM in the dtype)."""
    T, B, H, I = spec.T, spec.B, spec.H, 5
    dt = DTYPES[spec.dtype]
    g = torch.Generator().manual_seed(zlib.crc32(spec.data_id.encode()))
    case = testing.make_layer_case(T, B, I, H, reset_after=spec.reset_after, with_h0=spec.h0,
                                   bias=spec.bias, generator=g, lengths=spec.lengths,
                                   resets=spec.reset_mask())
    N = T * B if case.batch_sizes is None else int(case.batch_sizes.sum())
    x, h0, w_ih, w_hh, b_ih, b_hh = case.args(dtype=dt)
    with _precision(spec.dtype):
        x2 = x.view(N, I)
        gi = torch.addmm(b_ih, x2, w_ih.t()) if b_ih is not None else torch.mm(x2, w_ih.t())
    inputs = [gi, w_hh] + ([b_hh] if spec.bias else []) + ([h0] if spec.h0 else [])
    inputs.append(case.grad_y.to(dt))
    return case, N, np.concatenate([t.double().reshape(-1).numpy() for t in inputs])


def harness_cmd(exe: str, spec: Spec, fin: str, fout: str, seq: Optional[str] = None):
    return [exe, spec.dtype, spec.path, str(spec.T), str(spec.B), str(spec.H),
            str(int(spec.reset_after)), str(int(spec.h0)), str(int(spec.bias)), fin, fout,
            seq if seq is not None else spec.seq_arg(), f"stage={int(spec.stage)}",
            f"split={int(spec.split)}", f"balance={int(spec.balance)}", f"groups={spec.groups}",
            f"cluster={spec.cluster}"]


def run_case(variant: str, exe: str, spec: Spec, env_extra: Optional[Dict[str, str]] = None,
             timeout: int = RUN_TIMEOUT) -> Result:
    """Runs `spec` on the harness `exe` (built as `variant`) and measures it against the
    float64 reference."""
    T, B, H = spec.T, spec.B, spec.H
    dt = DTYPES[spec.dtype]
    case, N, values = case_inputs(spec)
    resets, batch_sizes = case.resets, case.batch_sizes
    x, h0, w_ih, w_hh, b_ih, b_hh = case.args(dtype=dt)
    with tempfile.TemporaryDirectory() as d:
        fin, fout = os.path.join(d, "in"), os.path.join(d, "out")
        values.tofile(fin)
        cmd = harness_cmd(exe, spec, fin, fout)
        try:
            r = execute(variant, cmd, env_extra, timeout)
        except subprocess.TimeoutExpired as e:
            return Result(-1, f"cuda_host: timed out after {timeout} s (a hang?)\n{e.stderr}")
        res = Result(r.returncode, r.stderr)
        if not os.path.exists(fout):
            return res
        out = torch.from_numpy(np.fromfile(fout))
    res.digest = hashlib.sha256(out.numpy().tobytes()).hexdigest()
    rows = (T, B) if batch_sizes is None else (N,)
    sizes = {"y": (*rows, H), "ws": (*rows, 4 * H), "y_infer": (*rows, H),
             "dgi": (*rows, 3 * H), "dgh": (*rows, 3 * H), "dh0": (B, H)}
    got, o = {}, 0
    for k, shape in sizes.items():
        n = int(np.prod(shape))
        got[k] = out[o:o + n].view(shape).to(dt)
        o += n
    assert o == out.numel(), "the harness wrote an unexpected number of values"

    with _precision(spec.dtype):
        hprev = states_before(h0, got["y"].reshape(N, H), spec.batch_sizes(), resets, B, H)
        grads = weight_grads(got["dgi"], got["dgh"], x, w_ih, hprev, got["ws"], spec.reset_after)
    got.update(dict(zip(("dx", "dw_ih", "dw_hh", "db_ih", "db_hh"), grads)))
    res.infer_equal = torch.equal(got["y"], got["y_infer"])

    def run_reference(dtype):
        args = case.args(dtype=dtype)
        seq = case.seq_args()
        y, ws = reference.gru_layer_forward(*args, spec.reset_after, *seq)
        gr = reference.gru_layer_backward(case.grad_y.to(dtype), args[0], args[1], args[2],
                                          args[3], y, ws, spec.reset_after, *seq)
        return dict(y=y, ws=ws, **dict(zip(testing.GRAD_NAMES, gr)))

    oracle = run_reference(torch.float64)
    with _precision(spec.dtype):
        baseline = run_reference(dt)
    for k, want in oracle.items():
        res.errors[k] = testing.rel_err(got[k], want)
        res.budgets[k] = testing.budget(dt, testing.rel_err(baseline[k], want))
    return res


# ---------------------------------------------------------------------------------------
# The grids
# ---------------------------------------------------------------------------------------

# T, B, H, h0, bias: every B and H of {1, 3, 17, 33}, T of {1, 2, 5}, h0 and bias present
# and absent.  H = 33: 3 blocks of 256 threads (768 threads); B = 17, 33: 2 and 3 batch tiles.
SHAPES = [(1, 1, 1, False, True), (2, 3, 17, True, False), (5, 17, 33, True, True),
          (5, 33, 3, False, True)]
COMBOS = [(ra, path) for ra in (True, False) for path in ("persistent", "step")]

# The sequence structure (issue 19), T, B, H, h0, bias + lengths / resets pattern.
# Packed: only a step's active rows are computed (the batch tiles shrink with them).
PACKED = [
    # rows 19, 17, 8, 5, 3, 2: two batch tiles, then one; ties; length 1; 3 blocks
    (6, 19, 33, True, True, (6, 6, 5, 4, 4, 3, 3, 3) + (2,) * 9 + (1, 1)),
    # rows 3, 1, 1, 1: length-1 ties, one row left
    (4, 3, 17, False, True, (4, 1, 1)),
    # one sequence (packed but dense)
    (3, 1, 3, True, False, (3,)),
    # rows 130, 129, 2: two 128-row passes per phase, then one
    (3, 130, 3, True, True, (3, 3) + (2,) * 127 + (1,)),
]
# Resets: random (at t = 0 and at the end among them), at the edges only, T = 1.
RESETS = [
    (5, 17, 33, True, True, "random"),
    (2, 3, 17, True, False, "edges"),
    (1, 1, 1, True, True, "random"),  # the only step restarts the only row: h0 unused
    (5, 33, 3, False, True, "random"),
]
# ThreadSanitizer's structure cases: 2 blocks (races between blocks), 2 batch tiles; packed
# rows 19, 17, 8, 2 (two tiles, then one).  Two thirds of the threads of H = 33, 4 steps.
TSAN_PACKED = (4, 19, 17, True, True, (4, 4) + (3,) * 6 + (2,) * 9 + (1, 1))
TSAN_RESETS = (4, 17, 17, True, True, "random")


def _packed(dt: str, path: str, ra: bool, shape) -> Spec:
    T, B, H, h0, bias, lengths = shape
    return Spec(dt, path, T, B, H, ra, h0, bias, lengths=lengths)


def _resets(dt: str, path: str, ra: bool, shape) -> Spec:
    T, B, H, h0, bias, pattern = shape
    return Spec(dt, path, T, B, H, ra, h0, bias, resets=pattern)


# The case the mutants run (and which both clean builds must pass): 3 blocks, 2 batch tiles,
# 5 steps, in float64 (the mutant builds compile float64 only).  The sequence-structure
# mutants run the same kind of case, packed or with resets.
MUTANT_SPEC = Spec("f64", "persistent", 5, 17, 33, True)
MUTANT_PACKED = _packed("f64", "persistent", True, PACKED[0])
MUTANT_RESETS = _resets("f64", "persistent", True, RESETS[0])
# The 3xTF32 mutants (wrong values only: the error budget must see them) run in float32
# (built f32x3 only), on a case of the AddressSanitizer grid.
MUTANT_3X = Spec("f32x3", "persistent", 5, 17, 33, True)
# The staged step (variant 1): the mutants' case with A staged in shared memory.
MUTANT_STAGED = dataclasses.replace(MUTANT_SPEC, stage=True)
# The split-barrier step (variant 2): the mutants' cases on it.
MUTANT_SPLIT = dataclasses.replace(MUTANT_SPEC, split=True)
MUTANT_SPLIT_RESETS = dataclasses.replace(MUTANT_RESETS, split=True)
# The balanced K split (variant 4): B = 33 (9 tile units forward: split 1 -> 2) and H = 130
# (9 k-steps of 16 per gate: parts of 5 and 4, 9 blocks), in float64.
MUTANT_BALANCED = Spec("f64", "persistent", 2, 33, 130, True, balance=True)
MUTANT_GROUPS = dataclasses.replace(MUTANT_SPEC, groups=2)  # B = 17: 2 groups of 1 tile
MUTANT_GROUPS_SPLIT = dataclasses.replace(MUTANT_GROUPS, split=True)
# The cluster forward (variant 16): H = 33 in clusters of at most 2 blocks: 2 unit blocks in
# block 0, 1 in block 1 (the ragged last block), 2 batch tiles, 5 steps.
MUTANT_CLUSTER = dataclasses.replace(MUTANT_SPEC, cluster=2)


def _staged_specs(specs: List[Spec], variant: str) -> List[Spec]:
    """Step variant 1 (A staged in shared memory) on a subset of a grid's cases: the same
    specs with stage=True, so each is also compared bit for bit with the old step's output.
    asan: every dtype x formulation x path dense (one shape each, rotating), every dtype
    packed and with resets, each in both formulations (the paths alternating), the two-pass
    batch and the K split.  tsan: every formulation x path dense (bf16 / f32x3: both wmma
    paths), one packed and one resets case (the FMA and the split wmma path), the 9-block K
    split, and the mutants' case (f64, the FMA path)."""
    out = []
    if variant == "asan":
        for d, dt in enumerate(DTYPES):
            for k, (ra, path) in enumerate(COMBOS):
                s = SHAPES[k] if (d + k) % 2 else SHAPES[(k + 2) % 4]
                out.append(Spec(dt, path, s[0], s[1], s[2], ra, s[3], s[4], stage=True))
                p = _packed(dt, path, ra, PACKED[(k + d) % len(PACKED)])
                r = _resets(dt, path, ra, RESETS[(k + d) % len(RESETS)])
                out.append(dataclasses.replace(p if (k + d) % 2 == 0 else r, stage=True))
        out += [dataclasses.replace(s, stage=True) for s in specs if s.B == 130 or s.H == 130]
    else:
        out += [dataclasses.replace(s, stage=True) for s in specs
                if s.lengths is None and s.resets is None and s.H == 33 and s.dtype != "f64"
                and s.dtype == ("bf16", "f32x3")[COMBOS.index((s.reset_after, s.path)) % 2]]
        out += [dataclasses.replace(s, stage=True) for s in specs
                if (s.lengths is not None and s.reset_after and s.path == "persistent")
                or (s.resets is not None and not s.reset_after and s.path == "persistent")
                or s.H == 130]
    out.append(MUTANT_STAGED)
    return out


def _structure(s: Spec) -> str:
    return "packed" if s.lengths is not None else "resets" if s.resets is not None else "dense"


def _split_specs(specs: List[Spec], variant: str) -> List[Spec]:
    """Step variant 2 (the split-barrier step) on a subset of a grid's cases, each also
    compared bit for bit with its old-step twin.  asan: every dtype x formulation on the
    persistent path, dense, packed and with resets, alone and (every other one) with the
    staged A; a per-step and a B = 130 case, where it must leave the old step in place.
    tsan: both formulations dense on the two wmma paths, packed and resets on the FMA and
    split-precision paths, the mutants' case."""
    pers = [s for s in specs if s.path == "persistent" and not s.stage and not s.split]
    out = []
    if variant == "asan":
        for d, dt in enumerate(DTYPES):
            for ra in (True, False):
                mine = [s for s in pers if s.dtype == dt and s.reset_after == ra]
                for k, structure in enumerate(("dense", "packed", "resets")):
                    cand = [s for s in mine if _structure(s) == structure]
                    # where it applies and has a barrier to split: B <= 64, T > 1
                    cand = [s for s in cand if s.B <= 64 and s.T > 1] or cand
                    if cand:
                        out.append(dataclasses.replace(cand[0], split=True,
                                                       stage=(d + k) % 2 == 1))
        out += [dataclasses.replace(s, split=True) for s in specs
                if s.B == 130 and not s.stage][:2]
    else:
        out += [dataclasses.replace(s, split=True) for s in pers
                if _structure(s) == "dense" and s.H == 33 and s.dtype in ("bf16", "f32x3")]
        out += [dataclasses.replace(s, split=True) for s in pers if _structure(s) != "dense"]
    # the mutants' cases (their old-step twins are in the grid that runs the mutant)
    for m in (MUTANT_SPLIT, MUTANT_SPLIT_RESETS) if variant == "asan" else (MUTANT_SPLIT,):
        if m not in out:
            out.append(m)
    return out


def _balance_specs(variant: str) -> List[Spec]:
    """Step variant 4 (the balanced K split), where it changes the split: B = 33, H = 130
    (forward: 9 tile units, split 1 -> 2 with parts of 5 and 4 k-steps).  asan: every dtype
    x formulation, the paths alternating, and two with the split-barrier step on top
    (bitwise their balanced twins); tsan: 3xTF32 both formulations on the persistent path,
    one with the split-barrier step.  Held to the budget (a different summation order)."""
    out = []
    if variant == "asan":
        for d, dt in enumerate(DTYPES):
            for k, ra in enumerate((True, False)):
                path = ("persistent", "step")[(d + k) % 2]
                out.append(Spec(dt, path, 2, 33, 130, ra, h0=k == 0, balance=True))
        out += [dataclasses.replace(s, split=True) for s in out
                if s.path == "persistent" and s.dtype in ("bf16", "f32x3")]
        if MUTANT_BALANCED not in out:
            out.append(MUTANT_BALANCED)
    else:
        out = [Spec("f32x3", "persistent", 2, 33, 130, ra, balance=True) for ra in (True, False)]
        out.append(dataclasses.replace(out[0], split=True))
    return out


def _groups_specs(specs: List[Spec], variant: str) -> List[Spec]:
    """Step variant 8 (batch groups of blocks) on cases of the grid with 2 or 3 batch tiles
    (B = 17..33; 130: 9 tiles, 2 groups of 5, a pass that differs from the old 8 + 1), whose
    one-group twins are in the grid: below H = 128 the K split cannot change and the
    outputs must be the twin's bits.  asan: every dtype x formulation dense (2 or 3
    groups), packed and resets in both formulations, the B = 130 cases, the split-barrier
    step and the staged A on top; H = 130 (budget), with the balanced split and the
    split-barrier step.  tsan: every formulation x path dense, packed and resets, one with
    the split-barrier step."""
    base = [s for s in specs if s.B >= 17 and not (s.stage or s.split or s.balance)
            and s.groups == 1]
    out: List[Spec] = []
    if variant == "asan":
        for d, dt in enumerate(DTYPES):
            for k, ra in enumerate((True, False)):
                cand = [s for s in base if s.dtype == dt and s.reset_after == ra
                        and _structure(s) == "dense" and s.B <= 64]
                cand.sort(key=lambda s: s.path != ("persistent", "step")[(d + k) % 2])
                if cand:
                    out.append(dataclasses.replace(cand[0], groups=2 + (d + k) % 2))
        for ra in (True, False):
            for st in ("packed", "resets"):
                cand = [s for s in base if s.reset_after == ra and _structure(s) == st
                        and s.B <= 64]
                if cand:
                    out.append(dataclasses.replace(cand[0], groups=2))
        out += [dataclasses.replace(s, groups=2) for s in base
                if s.B == 130 and _structure(s) == "dense"]
        pers = [s for s in out if s.path == "persistent" and s.B <= 64
                and _structure(s) == "dense"]
        out += [dataclasses.replace(pers[0], split=True),
                dataclasses.replace(pers[1], split=True, stage=True)]
        out += [Spec("f32x3", "persistent", 2, 33, 130, True, groups=2),
                Spec("bf16", "persistent", 2, 33, 130, False, groups=3, balance=True),
                Spec("bf16", "persistent", 2, 33, 130, False, groups=3, balance=True,
                     split=True)]
        if MUTANT_GROUPS not in out:
            out.append(MUTANT_GROUPS)
    else:
        for k, (ra, path) in enumerate(COMBOS):
            cand = [s for s in base if s.reset_after == ra and s.path == path]
            dense = [s for s in cand if _structure(s) == "dense"]
            if dense:
                out.append(dataclasses.replace(dense[k % len(dense)], groups=2))
            other = [s for s in cand if _structure(s) == ("packed", "resets")[k % 2]]
            if other:
                out.append(dataclasses.replace(other[0], groups=2))
        pers = [s for s in out if s.path == "persistent" and _structure(s) == "dense"]
        out.append(dataclasses.replace(pers[0], split=True))
    return out


def _cluster_specs(specs: List[Spec], variant: str) -> List[Spec]:
    """Step variant 16 (the cluster forward) on persistent cases of the grid with T > 1 (a
    cluster barrier per step) whose twins without it are in the grid: below H = 128 the
    outputs must be the twin's bits.  Clusters of at most 2 blocks (H = 33: 2 + 1 unit
    blocks, the last block ragged) and 16 (one unit block each), alternating.  asan: every
    dtype x formulation once, the structure rotating (dense, packed, resets); B = 130 (does
    not fit: the grid kernels, bitwise); the per-step path (not a cluster launch); H = 130
    in clusters of 4 (3 unit blocks each, 9 column groups: another K split, the budget),
    with the balanced split.  tsan: both formulations dense on the two wmma paths, packed
    and resets on the FMA and split-precision paths, H = 130."""
    base = [s for s in specs if not (s.stage or s.split or s.balance) and s.groups == 1
            and s.cluster == 0 and s.T > 1]
    pers = [s for s in base if s.path == "persistent"]
    out: List[Spec] = []
    if variant == "asan":
        for d, dt in enumerate(DTYPES):
            for k, ra in enumerate((True, False)):
                st = ("dense", "packed", "resets")[(2 * d + k) % 3]
                cand = [s for s in pers if s.dtype == dt and s.reset_after == ra
                        and _structure(s) == st and s.B <= 64]
                cand = cand or [s for s in pers if s.dtype == dt and s.reset_after == ra
                                and s.B <= 64]
                if cand:
                    out.append(dataclasses.replace(cand[0], cluster=(2, 16)[(d + k) % 2]))
        out += [dataclasses.replace(s, cluster=16) for s in pers if s.B == 130][:1]
        out += [dataclasses.replace(s, cluster=16) for s in base if s.path == "step"][:1]
        out += [Spec("bf16", "persistent", 3, 5, 130, True, cluster=4),
                Spec("f32x3", "persistent", 3, 5, 130, False, cluster=4, balance=True)]
        if MUTANT_CLUSTER not in out:
            out.append(MUTANT_CLUSTER)
    else:
        for k, ra in enumerate((True, False)):
            for dt in ("bf16", "f32x3"):
                cand = [s for s in pers if s.dtype == dt and s.reset_after == ra
                        and _structure(s) == "dense"]
                if cand:
                    out.append(dataclasses.replace(cand[0], cluster=2))
            for st in ("packed", "resets"):
                cand = [s for s in pers if s.reset_after == ra and _structure(s) == st]
                if cand:
                    out.append(dataclasses.replace(cand[0], cluster=(2, 16)[k]))
        out.append(Spec("f32", "persistent", 3, 5, 130, False, cluster=4))
        if MUTANT_CLUSTER not in out:
            out.append(MUTANT_CLUSTER)
    return out


def _asan_specs() -> List[Spec]:
    """AddressSanitizer + UBSan, and the numerical check: every dtype x formulation x path,
    each with two shapes (every shape meets every dtype twice), and the 128-row two-pass
    batch (B = 130) and the K split over warps (H = 130: 9 blocks)."""
    specs = []
    for dt in DTYPES:
        for k, (ra, path) in enumerate(COMBOS):
            for s in (SHAPES[k], SHAPES[(k + 2) % 4]):
                specs.append(Spec(dt, path, s[0], s[1], s[2], ra, s[3], s[4]))
    specs += [Spec("f32", "persistent", 2, 130, 3, True), Spec("bf16", "step", 2, 130, 3, False),
              Spec("bf16", "persistent", 2, 3, 130, False), Spec("f32", "step", 2, 3, 130, True)]
    # Sequence structure: every dtype x formulation x path once packed and once with
    # resets, the shapes rotating so that each meets every dtype and every combination.
    for d, dt in enumerate(DTYPES):
        for k, (ra, path) in enumerate(COMBOS):
            specs.append(_packed(dt, path, ra, PACKED[(k + d) % len(PACKED)]))
            specs.append(_resets(dt, path, ra, RESETS[(k + d) % len(RESETS)]))
    for m in (MUTANT_SPEC, MUTANT_PACKED, MUTANT_RESETS, MUTANT_3X):
        if m not in specs:
            specs.append(m)
    out = (specs + _staged_specs(specs, "asan") + _split_specs(specs, "asan")
           + _balance_specs("asan"))
    out += [s for s in _groups_specs(specs, "asan") if s not in out]
    return out + [s for s in _cluster_specs(specs, "asan") if s not in out]


def _tsan_specs() -> List[Spec]:
    """ThreadSanitizer: races do not depend on the values, so the three code paths of the
    GEMM (wmma: bf16; split-precision wmma, three fragments per operand pair: f32x3; CUDA-core
    FMA: f32) x formulation x path: the two wmma paths dense on 3 blocks and 5 steps, the
    FMA path (and f32x3 again) in the sequence-structure cases; the 9-block K split, and
    the mutants' case."""
    specs = [Spec(dt, path, 5, 17, 33, ra, h0=(path == "step"))
             for dt in ("f32x3", "bf16") for ra, path in COMBOS]
    specs += [Spec("bf16", "persistent", 2, 3, 130, False), MUTANT_SPEC]
    # Sequence structure on 2 blocks: formulation x path, packed (19 -> 2 rows) and resets
    # (random), the GEMM alternating between CUDA cores and split-precision wmma.
    for k, (ra, path) in enumerate(COMBOS):
        specs.append(_packed(("f32", "f32x3")[k % 2], path, ra, TSAN_PACKED))
        specs.append(_resets(("f32x3", "f32")[k % 2], path, ra, TSAN_RESETS))
    out = (specs + _staged_specs(specs, "tsan") + _split_specs(specs, "tsan")
           + _balance_specs("tsan"))
    out += [s for s in _groups_specs(specs, "tsan") if s not in out]
    return out + [s for s in _cluster_specs(specs, "tsan") if s not in out]


GRIDS = {"asan": _asan_specs(), "tsan": _tsan_specs()}


_GRID_TESTS = {"test_asan_ubsan_and_error_budget": "asan", "test_tsan_and_error_budget": "tsan"}


@pytest.fixture(scope="session")
def grid_results(harness, request):
    """result(variant, spec).  On first use, every case of `variant` that this session
    selected runs, two at a time (one per core); a case not selected runs when asked."""
    wanted: Dict[str, set] = {v: set() for v in GRIDS}
    for item in request.session.items:
        name = getattr(item, "originalname", "")
        if name in _GRID_TESTS:
            wanted[_GRID_TESTS[name]].add(item.callspec.params["spec"])
        elif name == "test_mutant_is_caught":  # its control case
            m = MUTANTS[item.callspec.params["name"]]
            wanted[m[0]].add(m[4])
    cache: Dict[str, Dict[Spec, Result]] = {}

    def result(variant: str, spec: Spec) -> Result:
        if variant not in cache:
            with concurrent.futures.ThreadPoolExecutor(2) as pool:
                futs = {s: pool.submit(run_case, variant, harness[variant], s)
                        for s in wanted[variant]}
                cache[variant] = {s: f.result() for s, f in futs.items()}
        if spec not in cache[variant]:
            cache[variant][spec] = run_case(variant, harness[variant], spec)
        return cache[variant][spec]

    return result


def _check_grid_case(variant: str, spec: Spec, grid_results):
    res = grid_results(variant, spec)
    assert not res.problems(), "\n".join(res.problems())
    if spec.old_step != spec:  # where A is read from, when gi is loaded, which block does a
        # batch tile: not the arithmetic
        old = grid_results(variant, spec.old_step)
        assert res.digest == old.digest, (
            f"{spec.id}: the step variant's outputs differ from the old step's (bitwise)")


def test_the_kernels_source_compiles_as_cxx17():
    """torch 2.11's extension build (the GPU machine's) compiles gru_cuda.cu with
    -std=c++17 under nvcc; torch 2.14's with c++20, as the harnesses here do.  C++20 looks a
    call with explicit template arguments (f<T>(x)) up when the template is instantiated,
    C++17 needs f declared before: fwd_split_loop / fwd_cluster_loop called before their
    definition built everywhere here and failed there ("identifier fwd_cluster_loop is
    undefined").  So the same source, through the host harness, must parse as C++17 too."""
    cxx = _compiler()
    if cxx is None:
        pytest.skip("no C++ compiler (g++ / c++ / $CXX)")
    main = os.path.join(CSRC, "host", "gru_host_main.cpp")
    r = subprocess.run([cxx, "-std=c++17", "-fsyntax-only", "-Wall", "-Wno-unknown-pragmas",
                        main], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-4000:]


@pytest.mark.parametrize("spec", GRIDS["asan"], ids=lambda s: s.id)
def test_asan_ubsan_and_error_budget(spec, grid_results):
    _check_grid_case("asan", spec, grid_results)


@pytest.mark.parametrize("spec", GRIDS["tsan"], ids=lambda s: s.id)
def test_tsan_and_error_budget(spec, grid_results):
    _check_grid_case("tsan", spec, grid_results)


def test_grids_cover_the_staged_step():
    """Step variant 1 under both sanitizers: every dtype x formulation x path dense, every
    dtype packed and with resets in both formulations (AddressSanitizer); every formulation
    x path, packed, resets and the K split (ThreadSanitizer); and each staged case's
    old-step twin is in the same grid (the bitwise comparison costs no extra run)."""
    asan = [s for s in GRIDS["asan"] if s.stage]
    for dt in DTYPES:
        assert {(s.reset_after, s.path) for s in asan
                if s.dtype == dt and _structure(s) == "dense"} == set(COMBOS), dt
        for ra in (True, False):
            assert {_structure(s) for s in asan if s.dtype == dt and s.reset_after == ra} == {
                "dense", "packed", "resets"}, (dt, ra)
    tsan = [s for s in GRIDS["tsan"] if s.stage]
    assert {(s.reset_after, s.path) for s in tsan if _structure(s) == "dense"} == set(COMBOS)
    assert {_structure(s) for s in tsan} == {"dense", "packed", "resets"}
    assert any(s.H == 130 for s in tsan) and any(s.H == 130 for s in asan)
    assert {s.dtype for s in tsan} >= {"bf16", "f32x3", "f32", "f64"}
    for variant, specs in GRIDS.items():
        for s in specs:
            if s.stage or s.split:
                assert s.old_step in specs, (variant, s.id)


def test_grids_cover_the_split_step():
    """Step variant 2 under both sanitizers: every dtype x formulation persistent dense,
    packed and with resets, alone and with the staged A (AddressSanitizer); both
    formulations, dense / packed / resets, the wmma and FMA paths (ThreadSanitizer); the
    cases it must leave alone (per-step path in the grid's twins, B = 130)."""
    asan = [s for s in GRIDS["asan"] if s.split]
    for dt in DTYPES:
        for ra in (True, False):
            assert {_structure(s) for s in asan if s.dtype == dt and s.reset_after == ra} == {
                "dense", "packed", "resets"}, (dt, ra)
    assert any(s.stage for s in asan) and any(not s.stage for s in asan)
    assert any(s.B == 130 for s in asan)
    tsan = [s for s in GRIDS["tsan"] if s.split]
    assert {(s.reset_after, _structure(s)) for s in tsan} >= {
        (ra, st) for ra in (True, False) for st in ("dense", "packed", "resets")}
    assert {s.dtype for s in tsan} >= {"bf16", "f32x3", "f32", "f64"}


# The fit table of benchmarks/NOTES-cuda-latency.md: (dtype, B, H, backward) -> W slice,
# accumulators, staging buffer, whether the persistent kernel stages (sm_90's 232448 B).
FIT_TABLE = {
    ("bf16", 16, 768, False): (74496, 6144, 24832, True),
    ("f32x3", 16, 768, False): (148224, 6144, 49408, True),
    ("bf16", 16, 768, True): (73984, 8192, 73984, True),
    ("f32x3", 16, 768, True): (147712, 8192, 147712, False),
    ("bf16", 64, 1024, False): (99072, 12288, 132096, False),
    ("f32x3", 64, 1024, False): (197376, 12288, 263168, False),
    ("bf16", 64, 1024, True): (98560, 8192, 394240, False),
    ("f32x3", 64, 1024, True): (196864, 8192, 787456, False),
}


@pytest.mark.parametrize("key", list(FIT_TABLE), ids=lambda k: f"{k[0]}-B{k[1]}H{k[2]}-"
                         f"{'bwd' if k[3] else 'fwd'}")
def test_staging_fits_or_falls_back(key, harness):
    """plan_staging (the code gru_cuda.cu's make_plan runs) at the sizes of the prediction:
    the staging buffer is added where it fits next to the W slice and the accumulators, and
    the plan is left as it was (the old step) where it does not."""
    dt, B, H, bwd = key
    w, acc, a, staged = FIT_TABLE[key]
    r = execute("asan", [harness["asan"], "plan", dt, "4", str(B), str(H), str(int(bwd)), "1"])
    assert r.returncode == 0 and not r.stderr.strip(), r.stderr[-3000:]
    got = [int(v) for v in r.stdout.split()]
    assert got[:3] == [w, acc, a] and bool(got[4]) == staged, got
    assert got[3] == w + acc + (a if staged else 0)


# plan_balance at the sizes of the prediction (benchmarks/NOTES-cuda-latency.md, "Balanced
# K split"): (dtype, B, H, backward) -> (split of the old rule, balanced split).
BALANCE_TABLE = {
    ("bf16", 16, 768, False): (2, 8),
    ("bf16", 64, 1024, False): (1, 2),
    ("f32x3", 64, 1024, False): (1, 2),
    ("bf16", 32, 512, False): (1, 4),
    ("bf16", 64, 1024, True): (2, 2),
    ("bf16", 16, 768, True): (8, 8),
    ("bf16", 128, 1024, False): (1, 1),
}


@pytest.mark.parametrize("key", list(BALANCE_TABLE), ids=lambda k: f"{k[0]}-B{k[1]}H{k[2]}-"
                         f"{'bwd' if k[3] else 'fwd'}")
def test_balanced_split_plan(key, harness):
    """plan_balance (make_plan runs it under _set_cuda_step_variant(4)): the K split that
    gives the busiest warp the fewest k-steps in a row, and the accumulators sized for it;
    where the old rule is already best (backward, B = 128) it is kept."""
    dt, B, H, bwd = key
    old, new = BALANCE_TABLE[key]
    got = {}
    for bal in (0, 1):
        r = execute("asan", [harness["asan"], "plan", dt, "4", str(B), str(H), str(int(bwd)),
                             "1", str(bal)])
        assert r.returncode == 0 and not r.stderr.strip(), r.stderr[-3000:]
        got[bal] = [int(v) for v in r.stdout.split()]
    assert (got[0][6], got[1][6]) == (old, new), got
    acc_size = 4  # float accumulators for these dtypes
    units = min((B + 15) // 16, 8) * (1 if bwd else 3)
    assert got[1][1] == new * units * 256 * acc_size, got


# plan_groups at the sizes of the prediction (benchmarks/NOTES-cuda-latency.md, "More blocks
# at large B"): (dtype, B, H, backward, groups asked) -> (NB, tiles per group, K split).
GROUPS_TABLE = {
    ("bf16", 64, 1024, False, 2): (128, 2, 1),   # 4 tiles: 2 groups of 2; 6 units a block
    ("bf16", 64, 1024, True, 2): (128, 2, 4),    # backward: 2 units, split 2 -> 4
    ("bf16", 64, 768, False, 2): (96, 2, 1),
    ("f32x3", 48, 1024, False, 2): (128, 2, 1),  # 3 tiles: groups of 2 and 1
    ("bf16", 16, 768, False, 2): (48, 1, 2),     # one tile: nothing to split, plan unchanged
    ("bf16", 130, 512, False, 3): (96, 3, 1),    # 9 tiles: 3 groups of 3
    ("bf16", 130, 512, False, 4): (96, 3, 1),    # 4 asked: groups of 3 -> 3 groups, none empty
}


@pytest.mark.parametrize("key", list(GROUPS_TABLE), ids=lambda k: f"{k[0]}-B{k[1]}H{k[2]}-"
                         f"{'bwd' if k[3] else 'fwd'}-g{k[4]}")
def test_groups_plan(key, harness):
    """plan_groups (make_plan runs it under _set_cuda_step_variant(8), with the groups the
    SMs left idle allow: 132 // 64 = 2 at H = 1024 on an H200): the launch's blocks, the
    batch tiles of a group, the K split re-planned for them and the accumulators sized for
    a group's pass; one batch tile leaves the plan as it was."""
    dt, B, H, bwd, groups = key
    nb, mtg, split = GROUPS_TABLE[key]
    r = execute("asan", [harness["asan"], "plan", dt, "4", str(B), str(H), str(int(bwd)),
                         "1", "0", str(groups)])
    assert r.returncode == 0 and not r.stderr.strip(), r.stderr[-3000:]
    got = [int(v) for v in r.stdout.split()]
    assert (got[7], got[8], got[6]) == (nb, mtg, split), got
    units = min(mtg, 8) * (1 if bwd else 3)
    assert got[1] == split * units * 256 * 4, got  # float accumulators for these dtypes


def test_grids_cover_the_groups():
    """Step variant 8 under both sanitizers: every dtype x formulation (AddressSanitizer),
    both paths, dense / packed / resets in both formulations, with the split-barrier step
    and the staged A on top, H below 128 (bitwise the one-group launch: the twin is in the
    grid) and above (budget); 2 and 3 groups."""
    asan = [s for s in GRIDS["asan"] if s.groups > 1]
    assert {s.dtype for s in asan} == set(DTYPES)
    assert {(s.reset_after, s.path) for s in asan} == set(COMBOS)
    for ra in (True, False):
        assert {_structure(s) for s in asan if s.reset_after == ra} == {
            "dense", "packed", "resets"}, ra
    assert any(s.split for s in asan) and any(s.stage for s in asan)
    assert any(s.H >= 128 for s in asan) and any(s.H < 128 for s in asan)
    assert {s.groups for s in asan} == {2, 3}
    tsan = [s for s in GRIDS["tsan"] if s.groups > 1]
    assert {s.path for s in tsan} == {"persistent", "step"} and any(s.split for s in tsan)
    assert {_structure(s) for s in tsan} == {"dense", "packed", "resets"}
    for variant, specs in GRIDS.items():
        for s in specs:
            if s.old_step != s:
                assert s.old_step in specs, (variant, s.id)


# plan_cluster at the sizes of the prediction (benchmarks/NOTES-cuda-latency.md, "Thread block
# cluster"): (dtype, B, H, reset_after, max cluster) -> (fits, q, C, W slices, h buffers,
# total bytes, K split); sm_90's 232448 B opt-in.
CLUSTER_TABLE = {
    ("bf16", 16, 512, True, 16): (1, 2, 16, 99840, 33280, 139264, 1),
    ("bf16", 16, 512, False, 16): (1, 2, 16, 99840, 49920, 155904, 1),
    ("bf16", 16, 576, True, 16): (1, 3, 12, 168192, 37376, 214784, 1),   # 3 + 9 x 3 unit blocks
    ("bf16", 16, 576, False, 16): (0, 0, 0, 56064, 0, 62208, 2),          # r (.) h: too big
    ("bf16", 16, 768, True, 16): (0, 0, 0, 74496, 0, 80640, 2),           # W alone 221 KB
    ("bf16", 16, 512, True, 8): (0, 0, 0, 49920, 0, 56064, 2),            # portable 8: too big
    ("bf16", 16, 256, True, 16): (1, 1, 16, 25344, 16896, 48384, 2),
    ("bf16", 64, 256, True, 16): (1, 1, 16, 25344, 67584, 105216, 1),
    ("bf16", 64, 384, True, 16): (0, 0, 0, 37632, 0, 49920, 1),           # 64 x 32 > 1024
    ("tf32", 16, 384, True, 16): (1, 2, 12, 148992, 49664, 204800, 1),
    ("tf32", 16, 448, True, 16): (0, 0, 0, 86784, 0, 92928, 2),
    ("f64", 16, 256, True, 16): (1, 1, 16, 99072, 65792, 177152, 2),      # 8-byte row pad
}


@pytest.mark.parametrize("key", list(CLUSTER_TABLE), ids=lambda k: f"{k[0]}-B{k[1]}H{k[2]}-"
                         f"{'after' if k[3] else 'before'}-max{k[4]}")
def test_cluster_plan(key, harness):
    """plan_cluster (make_plan runs it under _set_cuda_step_variant(16) on sm_90, with 16 blocks
    at most where the device allows non-portable cluster sizes): the fewest unit blocks per
    block that fit the cluster, the W slices, the accumulators and the h buffers (2, or 3 for
    reset_after=False) within sm_90's shared memory; where they do not fit, or a thread would
    own more than kClusterPer elements, the plan is left as it was."""
    dt, B, H, ra, maxc = key
    fits, q, C, w, h, total, split = CLUSTER_TABLE[key]
    r = execute("asan", [harness["asan"], "cplan", dt, str(B), str(H), str(int(ra)), str(maxc),
                         "0"])
    assert r.returncode == 0 and not r.stderr.strip(), r.stderr[-3000:]
    got = [int(v) for v in r.stdout.split()]
    assert (got[0], got[1], got[2], got[3], got[5], got[6], got[7]) == (
        fits, q, C, w, h, total, split), got
    assert got[6] == got[3] + got[4] + got[5]


def test_grids_cover_the_cluster():
    """Step variant 16 under both sanitizers: every dtype x formulation (AddressSanitizer),
    dense, packed and resets, clusters with a ragged last block (2 + 1 unit blocks) and with
    one unit block per block, H below 128 (bitwise the grid kernels: the twin is in the
    grid) and above (budget), with the balanced split, and where it must not apply (B = 130,
    the per-step path); ThreadSanitizer: both formulations, dense / packed / resets, the
    wmma and the FMA paths."""
    asan = [s for s in GRIDS["asan"] if s.cluster]
    assert {s.dtype for s in asan} == set(DTYPES)
    for dt in DTYPES:
        assert {s.reset_after for s in asan if s.dtype == dt} == {True, False}, dt
    assert {_structure(s) for s in asan} == {"dense", "packed", "resets"}
    assert {s.cluster for s in asan} >= {2, 4, 16}
    assert any(s.H >= 128 for s in asan) and any(s.H < 128 for s in asan)
    assert any(s.balance for s in asan)
    assert any(s.B == 130 for s in asan) and any(s.path == "step" for s in asan)
    tsan = [s for s in GRIDS["tsan"] if s.cluster]
    assert {(s.reset_after, _structure(s)) for s in tsan} == {
        (ra, st) for ra in (True, False) for st in ("dense", "packed", "resets")}
    assert {s.dtype for s in tsan} >= {"bf16", "f32x3", "f32", "f64"}
    for variant, specs in GRIDS.items():
        for s in specs:
            if s.old_step != s:
                assert s.old_step in specs, (variant, s.id)


def test_grids_cover_the_issue():
    """Both formulations, paths and every dtype; B and H in {1, 3, 17, 33}; T in {1, 2, 5};
    with and without h0 and bias: in the AddressSanitizer grid."""
    specs = GRIDS["asan"]
    assert {s.dtype for s in specs} == set(DTYPES)
    assert {s.reset_after for s in specs} == {True, False}
    assert {s.path for s in specs} == {"persistent", "step"}
    assert {1, 3, 17, 33} <= {s.B for s in specs} and {1, 3, 17, 33} <= {s.H for s in specs}
    assert {1, 2, 5} <= {s.T for s in specs}
    assert {s.h0 for s in specs} == {True, False} and {s.bias for s in specs} == {True, False}
    for dt in DTYPES:
        assert {(s.reset_after, s.path) for s in specs if s.dtype == dt} == set(COMBOS), dt


def test_grids_cover_the_sequence_structure():
    """Packed and resets, under both sanitizers, with both formulations and both paths;
    every dtype packed and with resets under AddressSanitizer; packed lengths with ties and
    length 1, steps whose rows drop below a 16-row tile and below a 128-row pass, a single
    sequence; resets at t = 0, at the last step, random, and with and without h0."""
    for variant, specs in GRIDS.items():
        for st in ("packed", "resets"):
            got = {(s.reset_after, s.path) for s in specs if _structure(s) == st}
            assert got == set(COMBOS), (variant, st)
    asan = GRIDS["asan"]
    for dt in DTYPES:
        for st in ("packed", "resets"):
            assert {(s.reset_after, s.path) for s in asan
                    if s.dtype == dt and _structure(s) == st} == set(COMBOS), (dt, st)
    packed = [s for s in asan if s.lengths is not None]
    sizes = [s.batch_sizes() for s in packed]
    assert any(len(set(s.lengths)) < len(s.lengths) for s in packed)  # ties
    assert any(1 in s.lengths and s.B > 1 for s in packed)  # length 1 beside longer ones
    assert any(bs[0] > 16 >= bs[-1] for bs in sizes)  # two batch tiles, then one
    assert any(bs[0] > 128 >= bs[-1] for bs in sizes)  # two 128-row passes, then one
    assert any(s.B == 1 for s in packed)
    masks = [(s, s.reset_mask()) for s in asan if s.resets is not None]
    assert any(m[0].any() and s.h0 for s, m in masks)  # h0 dropped for some rows
    assert any(m[-1].any() and s.T > 1 for s, m in masks)  # a restart at the last step
    assert any(m[1:-1].any() for s, m in masks)  # and in between
    assert {s.h0 for s, _ in masks} == {True, False}


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_structure_with_nothing_to_do_is_bitwise_dense(dtype, harness):
    """The same inputs, dense, packed with every length T (the dense rows in the same order)
    and with resets all False: the structure's code paths (step table, reset pointer) with
    nothing to change must give every output bit for bit (both formulations, both paths,
    under AddressSanitizer)."""
    for ra, path in COMBOS:
        spec = Spec(dtype, path, 3, 17, 17, ra)
        _, _, values = case_inputs(spec)
        seqs = ["dense", "packed=" + ",".join([str(spec.B)] * spec.T),
                "resets=" + "0" * (spec.T * spec.B)]
        outs = []
        with tempfile.TemporaryDirectory() as d:
            fin = os.path.join(d, "in")
            values.tofile(fin)
            for k, seq in enumerate(seqs):
                fout = os.path.join(d, f"out{k}")
                r = execute("asan", harness_cmd(harness["asan"], spec, fin, fout, seq))
                assert r.returncode == 0 and not r.stderr.strip(), (seq, r.stderr[-3000:])
                with open(fout, "rb") as f:
                    outs.append(f.read())
        assert outs[0] == outs[1], f"{spec.id}: packed with every length T differs from dense"
        assert outs[0] == outs[2], f"{spec.id}: resets all False differ from no resets"


def test_shim_roundings_match_torch(harness):
    """The shim's __float2half_rn and __float2bfloat16_rn are torch's (round to nearest
    even, subnormals, overflow, NaN); __float_to_tf32 rounds to 10 mantissa bits with ties
    away from zero (cvt.rna), checked against frexp arithmetic in float64."""
    g = torch.Generator().manual_seed(0)
    v = torch.randn(20000, generator=g) * torch.exp2(
        torch.randint(-30, 20, (20000,), generator=g).float())
    one_ulp = 2.0 ** -23
    ties = [1 + 2 ** -11, 1 + 3 * 2 ** -11, 1 + 2 ** -8, 1 + 3 * 2 ** -8, -(1 + 2 ** -11),
            1 + 2 ** -11 + one_ulp, 1 + 2 ** -11 - one_ulp]
    special = [0.0, -0.0, 65504.0, 65519.0, 65520.0, 65536.0, 2 ** -24, 2 ** -25, 3 * 2 ** -25,
               2 ** -14, 1e-8, 3e38, float("inf"), -float("inf")]
    v = torch.cat([v, torch.tensor(ties + special)]).float()
    with tempfile.TemporaryDirectory() as d:
        fin, fout = os.path.join(d, "in"), os.path.join(d, "out")
        v.double().numpy().tofile(fin)
        r = execute("asan", [harness["asan"], "convert", fin, fout])
        assert r.returncode == 0, r.stderr[-3000:]
        out = torch.from_numpy(np.fromfile(fout)).view(-1, 3)
    assert torch.equal(out[:, 0], v.half().double())
    assert torch.equal(out[:, 1], v.bfloat16().double())
    finite = torch.isfinite(v) & (v.abs() < 3e38)
    m, e = torch.frexp(v[finite].double())  # |m| in [0.5, 1): 11 significant bits kept
    scaled = m * 2.0 ** 11
    rna = torch.sign(scaled) * torch.floor(scaled.abs() + 0.5)
    assert torch.equal(out[finite, 2], torch.ldexp(rna, e - 11))


# ---------------------------------------------------------------------------------------
# The harness can fail: mutants of the kernel source
# ---------------------------------------------------------------------------------------

MUTANTS = {
    # The barrier between the steps of the persistent forward (reset_after=True has no
    # other): block A's h_t is read by block B while A overwrites the other ping-pong half.
    "grid-sync-removed": (
        "tsan",
        "    fwd_phase<scalar_t, op_t, acc_t, MM>(p, Ws, acc, t, 0);\n    grid.sync();\n",
        "    fwd_phase<scalar_t, op_t, acc_t, MM>(p, Ws, acc, t, 0);\n",
        "WARNING: ThreadSanitizer: data race", MUTANT_SPEC),
    # The same in the backward: dgh of step t+1 is read while another block writes dgh of
    # step t-1 into the same ping-pong half.
    "backward-grid-sync-removed": (
        "tsan",
        "    bwd_phase<scalar_t, op_t, acc_t, MM>(p, Ws, acc, t, 0);\n    grid.sync();\n",
        "    bwd_phase<scalar_t, op_t, acc_t, MM>(p, Ws, acc, t, 0);\n",
        "WARNING: ThreadSanitizer: data race", MUTANT_SPEC),
    # The barrier at the end of block_gemm: the elementwise threads read accumulator tiles
    # (shared memory) that other warps are still writing.
    "syncthreads-removed": (
        "tsan",
        "out[i] = acc_t(0);\n    }\n  }\n  __syncthreads();\n}\n",
        "out[i] = acc_t(0);\n    }\n  }\n}\n",
        "WARNING: ThreadSanitizer: data race", MUTANT_SPEC),
    # The (row, unit) loop of the reset_after=True forward runs one element too far: row B,
    # one past hstate's (B, Hp) rows.
    "loop-bound-off-by-one": (
        "asan",
        "for (int64_t e = threadIdx.x; e < (b_end - b_beg) * kUnits; e += kThreads) {",
        "for (int64_t e = threadIdx.x; e <= (b_end - b_beg) * kUnits; e += kThreads) {",
        "ERROR: AddressSanitizer: heap-buffer-overflow", MUTANT_SPEC),
    # A planning error: the accumulator region one element short.  The host launch
    # allocates the plan's shared memory at its exact size, so the last tile's last element
    # is written one past it.
    "plan-smem-one-element-short": (
        "asan",
        "pl.acc_bytes = static_cast<int64_t>(g.nsplit) * mtp * NC * kTileElems * acc_size;",
        "pl.acc_bytes = static_cast<int64_t>(g.nsplit) * mtp * NC * kTileElems * acc_size"
        " - acc_size;",
        "ERROR: AddressSanitizer: heap-buffer-overflow", MUTANT_SPEC),
    # Resets: the forward stages h instead of zeros for a row that step t+1 restarts (the
    # reset mask dropped): no invalid access, wrong values (None: the error budget).
    "forward-reset-mask-dropped": (
        "asan",
        "auto staged = [&](int64_t b, acc_t h) { return restart && restart[b] ? acc_t(0) : h; };",
        "auto staged = [&](int64_t b, acc_t h) { (void)b; return h; };",
        None, MUTANT_RESETS),
    # Resets: the backward carries dh back across a restart.
    "backward-reset-carry-kept": (
        "asan",
        "const bool carried = b < carry_rows && !(carry_reset && carry_reset[b]);",
        "const bool carried = b < carry_rows;",
        None, MUTANT_RESETS),
    # Packed: the forward's rows run to the batch's B in the step's last tile instead of
    # stopping at the step's rows: at the last step, rows past the packed data.
    "packed-rows-ignored": (
        "asan",
        "const int64_t b_end = imin64(span.rows, static_cast<int64_t>(mt1) * 16);",
        "const int64_t b_end = imin64(B, static_cast<int64_t>(mt1) * 16);",
        "ERROR: AddressSanitizer: heap-buffer-overflow", MUTANT_PACKED),
    # 3xTF32: the a_lo b_hi product (the low part of h_{t-1} / dgh) dropped: a 2xTF32 that
    # keeps W's low part only; h is then rounded to TF32, ~1e-4 relative.
    "3xtf32-lo-hi-term-dropped": (
        "asan",
        "      wmma::mma_sync(c_lh, a_lo, b, c_lh);\n",
        "",
        None, MUTANT_3X),
    # Staged step: the barrier after the staging copy removed: warps read staged A rows
    # that other threads are still writing.
    "stage-syncthreads-removed": (
        "tsan",
        "  __pipeline_wait_prior(0);\n  __syncthreads();  // every thread's copies visible to "
        "every warp\n",
        "  __pipeline_wait_prior(0);\n",
        "WARNING: ThreadSanitizer: data race", MUTANT_STAGED),
    # Staged step: the wait for the copies removed: cp.async guarantees nothing before the
    # wait (the shim copies at the wait, so the MMAs read poison), and the kernel returns
    # with copies pending.
    "stage-wait-removed": (
        "asan",
        "  __pipeline_commit();\n  __pipeline_wait_prior(0);\n",
        "  __pipeline_commit();\n",
        "cp.async copies (__pipeline_memcpy_async) never waited for", MUTANT_STAGED),
    # Split-barrier forward: the barrier between its steps dropped (arrive, wait): block
    # A's h_t is read by block B while A overwrites the other ping-pong half.
    "split-barrier-removed": (
        "tsan",
        "      auto token = grid.barrier_arrive();\n      load_gi(t + 1);\n"
        "      grid.barrier_wait(std::move(token));\n",
        "      load_gi(t + 1);\n",
        "WARNING: ThreadSanitizer: data race", MUTANT_SPLIT),
    # Split-barrier forward: gi of the step just done loaded again instead of the next one's.
    "split-gi-of-wrong-step": (
        "asan",
        "      load_gi(t + 1);\n",
        "      load_gi(t);\n",
        None, MUTANT_SPLIT),
    # Split-barrier forward: the state carried in registers not zeroed where the next step
    # restarts the row (resets).
    "split-reset-mask-dropped": (
        "asan",
        "        hs[i] = rs[i] ? acc_t(0) : h;\n        stf(p.y + row * H + j, h);\n"
        "        if (p.ws) {\n          scalar_t* wsr",
        "        hs[i] = h;\n        stf(p.y + row * H + j, h);\n"
        "        if (p.ws) {\n          scalar_t* wsr",
        None, MUTANT_SPLIT_RESETS),
    # Split-barrier backward: the barrier between its steps dropped: dgh_{t+1} is read by
    # one block while another writes dgh_{t-1} into the same ping-pong half.
    "split-backward-barrier-removed": (
        "tsan",
        "      auto token = grid.barrier_arrive();\n      load_step(t - 1);\n"
        "      grid.barrier_wait(std::move(token));\n",
        "      load_step(t - 1);\n",
        "WARNING: ThreadSanitizer: data race", MUTANT_SPLIT),
    # Split-barrier backward: the operands of the step just done loaded again.
    "split-backward-operands-of-wrong-step": (
        "asan",
        "      load_step(t - 1);\n",
        "      load_step(t);\n",
        None, MUTANT_SPLIT),
    # Split-barrier backward: dh carried back across a restart (the reset mask dropped).
    "split-backward-reset-carry-kept": (
        "asan",
        "      vc[i] = b < carry_rows && !(carry_reset && carry_reset[b]);",
        "      vc[i] = b < carry_rows;",
        None, MUTANT_SPLIT_RESETS),
    # Balanced K split: the parts rounded down instead of up, so the last k-steps of a
    # K that the split does not divide (H = 130: 9 k-steps in 2 parts) are dropped.
    "balanced-split-parts-rounded-down": (
        "asan",
        "  const int kpart = ((K / 16 + g.nsplit - 1) / g.nsplit) * 16;",
        "  const int kpart = ((K / 16) / g.nsplit) * 16;",
        None, MUTANT_BALANCED),
    # Batch groups, split-barrier forward: a thread's rows not limited to its group's (a
    # step's row_end is span.rows alone), so the last row of group 0's reach (row 16 at B = 17) is also computed and stored by
    # group 1's block of the same units: two blocks write the same y, ws and h elements.
    "groups-split-rows-of-another-group": (
        "tsan",
        "    const int64_t row_end = imin64(span.rows, b_lim);  // the group's rows this step\n"
        "    const int MT = group_tile_end(g, gt0, span.rows), mtp = MT - gt0;\n"
        "    if (p.reset_after) {",
        "    const int64_t row_end = span.rows;\n"
        "    const int MT = group_tile_end(g, gt0, span.rows), mtp = MT - gt0;\n"
        "    if (p.reset_after) {",
        "WARNING: ThreadSanitizer: data race", MUTANT_GROUPS_SPLIT),
    # Batch groups: a group's tiles end one tile early, so the last tile of every group but
    # the last is never computed (its rows keep the poison): the error budget.
    "groups-last-tile-dropped": (
        "asan",
        "  const int end = min(static_cast<int>((rows + 15) / 16), t0 + g.mtg);",
        "  const int end = min(static_cast<int>((rows + 15) / 16), t0 + g.mtg - 1);",
        None, MUTANT_GROUPS),
    # The cluster forward: each block's h_t copied to ranks 0 .. C-2 instead of every rank
    # but its own: the last block never receives the others' units, block 0 overwrites its
    # own copy with itself.  Wrong values only: the error budget.
    "cluster-copy-skips-the-last-rank": (
        "asan",
        "      *cluster.map_shared_rank(mine, d + (d >= rank ? 1 : 0)) = *mine;",
        "      *cluster.map_shared_rank(mine, d) = *mine;",
        None, MUTANT_CLUSTER),
    # The cluster forward without the cluster barrier after the buffers' initialisation:
    # block A's copy of h_0 into block B's buffer 1 races with B zeroing it.
    "cluster-sync-after-init-removed": (
        "tsan",
        "  cluster.sync();  // every block's buffers initialised before another block's first copy\n",
        "",
        "WARNING: ThreadSanitizer: data race", MUTANT_CLUSTER),
    # The cluster forward without the barrier between the steps: block A's h_t lands in the
    # ping-pong half that block B may still be reading as h_{t-2} in step t-1.
    "cluster-step-barrier-removed": (
        "tsan",
        "      auto token = cluster.barrier_arrive();\n      load_gi(t + 1);\n"
        "      cluster.barrier_wait(std::move(token));\n",
        "      load_gi(t + 1);\n",
        "WARNING: ThreadSanitizer: data race", MUTANT_CLUSTER),
    # 3xTF32: hi used as __float_to_tf32 returns it, its 13 low bits not cleared (the GPU
    # leaves them; the shim models that): v - hi is then not v's low part.
    "3xtf32-hi-not-masked": (
        "asan",
        "const float hi = __uint_as_float(__float_as_uint(nvcuda::wmma::__float_to_tf32(v)) &\n"
        "                                     0xFFFFE000u);",
        "const float hi = nvcuda::wmma::__float_to_tf32(v);",
        None, MUTANT_3X),
}

# What a mutant build compiles: the dtype of its case only (a third of the compile time).
_ONE_DTYPE = {"f64": "FUSEDGRU_HOST_F64_ONLY", "f32x3": "FUSEDGRU_HOST_F32X3_ONLY"}


def mutant_source(name: str) -> bytes:
    variant, old, new, _, _ = MUTANTS[name]
    with open(os.path.join(CSRC, "gru_kernels.cuh")) as f:
        src = f.read()
    # The mutation must apply: if the kernel changed, this test must be updated, not pass.
    assert old in src, f"mutant {name}: its pattern is no longer in gru_kernels.cuh"
    return src.replace(old, new, 1).encode()


@pytest.fixture(scope="session")
def mutant_builds() -> Builds:
    """The mutants, each built for its case's dtype only (float64, or f32x3)."""
    return Builds({n: functools.partial(_checked_build, MUTANTS[n][0],
                                        {"gru_kernels.cuh": mutant_source(n)},
                                        (_ONE_DTYPE[MUTANTS[n][4].dtype],))
                   for n in MUTANTS})


@pytest.mark.parametrize("name", list(MUTANTS))
def test_mutant_is_caught(name, mutant_builds, grid_results):
    variant, _, _, report, spec = MUTANTS[name]
    control = grid_results(variant, spec)
    assert not control.problems(), f"the unmutated kernels fail this case: {control.problems()}"
    # Keep going after the first race, so the result is also measured against the reference.
    res = run_case(variant, mutant_builds[name], spec,
                   {"TSAN_OPTIONS": "halt_on_error=0 exitcode=66"}, timeout=120)
    caught = res.problems()
    assert caught, f"mutant {name} passed: the harness cannot see it"
    if report is None:  # a wrong value, no invalid access: the error budget must see it
        assert res.wrong and not res.sanitizer_report, (
            f"mutant {name} was caught ({caught[:2]}) but not by the error budget alone")
        report = "out of budget"
    else:
        assert report in res.stderr, (f"mutant {name} was caught ({caught[:2]}) but not by "
                                      f"the expected {variant} report {report!r}")
    print(f"mutant {name}: exit {res.returncode}, {report!r} reported, "
          f"out of budget: {sorted(res.wrong) or 'none'}")
