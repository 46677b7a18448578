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
nothing.  test_mutant_is_caught builds mutated copies of the kernel source (a grid.sync()
removed from the forward, one from the backward, a __syncthreads() removed, a loop bound off
by one, the plan's shared memory one element short) and requires each to be caught by the
sanitizer meant for it.

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

DTYPES = {"f64": torch.float64, "f32": torch.float32, "tf32": torch.float32,
          "f16": torch.float16, "bf16": torch.bfloat16}


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

    @property
    def id(self) -> str:
        return (f"{self.dtype}-{self.path}-{'after' if self.reset_after else 'before'}-"
                f"T{self.T}B{self.B}H{self.H}{'' if self.h0 else '-noh0'}"
                f"{'' if self.bias else '-nobias'}")


def weight_grads(dgi, dgh, x, w_ih, hprev, ws, reset_after):
    """gru_common.h weight_grads (the ATen epilogue after the CUDA reverse-time loop), in
    the kernel's dtype: (dx, dw_ih, dw_hh, db_ih, db_hh) from the kernels' dgi, dgh."""
    T, B, I = x.shape
    H = hprev.shape[2]
    dgi2, dgh2 = dgi.reshape(T * B, 3 * H), dgh.reshape(T * B, 3 * H)
    x2, hp2 = x.reshape(T * B, I), hprev.reshape(T * B, H)
    dx = (dgi2 @ w_ih).view(T, B, I)
    dw_ih = dgi2.T @ x2
    if reset_after:
        dw_hh = dgh2.T @ hp2
    else:  # rows r, z multiply h; rows n multiply r * h
        rh = ws.reshape(T * B, 4 * H)[:, :H] * hp2
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


def run_case(variant: str, exe: str, spec: Spec, env_extra: Optional[Dict[str, str]] = None,
             timeout: int = RUN_TIMEOUT) -> Result:
    """Runs `spec` on the harness `exe` (built as `variant`) and measures it against the
    float64 reference."""
    T, B, H, I = spec.T, spec.B, spec.H, 5
    dt = DTYPES[spec.dtype]
    g = torch.Generator().manual_seed(zlib.crc32(spec.id.encode()))
    case = testing.make_layer_case(T, B, I, H, reset_after=spec.reset_after, with_h0=spec.h0,
                                   bias=spec.bias, generator=g)
    x, h0, w_ih, w_hh, b_ih, b_hh = case.args(dtype=dt)
    gy = case.grad_y.to(dt)
    with _precision(spec.dtype):  # gi as forward_cuda computes it: one GEMM in the dtype
        x2 = x.view(T * B, I)
        gi = torch.addmm(b_ih, x2, w_ih.t()) if b_ih is not None else torch.mm(x2, w_ih.t())
    inputs = [gi, w_hh] + ([b_hh] if spec.bias else []) + ([h0] if spec.h0 else []) + [gy]
    with tempfile.TemporaryDirectory() as d:
        fin, fout = os.path.join(d, "in"), os.path.join(d, "out")
        np.concatenate([t.double().reshape(-1).numpy() for t in inputs]).tofile(fin)
        cmd = [exe, spec.dtype, spec.path, str(T), str(B), str(H), str(int(spec.reset_after)),
               str(int(spec.h0)), str(int(spec.bias)), fin, fout]
        try:
            r = execute(variant, cmd, env_extra, timeout)
        except subprocess.TimeoutExpired as e:
            return Result(-1, f"cuda_host: timed out after {timeout} s (a hang?)\n{e.stderr}")
        res = Result(r.returncode, r.stderr)
        if not os.path.exists(fout):
            return res
        out = torch.from_numpy(np.fromfile(fout))
    sizes = {"y": (T, B, H), "ws": (T, B, 4 * H), "y_infer": (T, B, H), "dgi": (T, B, 3 * H),
             "dgh": (T, B, 3 * H), "dh0": (B, H)}
    got, o = {}, 0
    for k, shape in sizes.items():
        n = int(np.prod(shape))
        got[k] = out[o:o + n].view(shape).to(dt)
        o += n
    assert o == out.numel(), "the harness wrote an unexpected number of values"

    with _precision(spec.dtype):
        hprev = torch.cat([(h0 if h0 is not None else x.new_zeros(B, H)).unsqueeze(0),
                           got["y"][:-1]], 0)
        grads = weight_grads(got["dgi"], got["dgh"], x, w_ih, hprev, got["ws"], spec.reset_after)
    got.update(dict(zip(("dx", "dw_ih", "dw_hh", "db_ih", "db_hh"), grads)))
    res.infer_equal = torch.equal(got["y"], got["y_infer"])

    def run_reference(dtype):
        args = case.args(dtype=dtype)
        y, ws = reference.gru_layer_forward(*args, spec.reset_after)
        gr = reference.gru_layer_backward(case.grad_y.to(dtype), args[0], args[1], args[2],
                                          args[3], y, ws, spec.reset_after)
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

# The case the mutants run (and which both clean builds must pass): 3 blocks, 2 batch tiles,
# 5 steps, in float64 (the mutant builds compile float64 only).
MUTANT_SPEC = Spec("f64", "persistent", 5, 17, 33, True)


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
    if MUTANT_SPEC not in specs:
        specs.append(MUTANT_SPEC)
    return specs


def _tsan_specs() -> List[Spec]:
    """ThreadSanitizer: races do not depend on the values, so the two code paths of the
    GEMM (CUDA-core FMA: f32; wmma: bf16) x formulation x path on 3 blocks and 5 steps,
    the 9-block K split, and the mutants' case."""
    specs = [Spec(dt, path, 5, 17, 33, ra, h0=(path == "step"))
             for dt in ("f32", "bf16") for ra, path in COMBOS]
    specs += [Spec("bf16", "persistent", 2, 3, 130, False), MUTANT_SPEC]
    return specs


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
            wanted[MUTANTS[item.callspec.params["name"]][0]].add(MUTANT_SPEC)
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


@pytest.mark.parametrize("spec", GRIDS["asan"], ids=lambda s: s.id)
def test_asan_ubsan_and_error_budget(spec, grid_results):
    res = grid_results("asan", spec)
    assert not res.problems(), "\n".join(res.problems())


@pytest.mark.parametrize("spec", GRIDS["tsan"], ids=lambda s: s.id)
def test_tsan_and_error_budget(spec, grid_results):
    res = grid_results("tsan", spec)
    assert not res.problems(), "\n".join(res.problems())


def test_grids_cover_the_issue():
    """Both formulations, paths and every dtype; B and H in {1, 3, 17, 33}; T in {1, 2, 5};
    with and without h0 and bias: in the AddressSanitizer grid."""
    specs = GRIDS["asan"]
    assert {s.dtype for s in specs} == set(DTYPES)
    assert {s.reset_after for s in specs} == {True, False}
    assert {s.path for s in specs} == {"persistent", "step"}
    assert {1, 3, 17, 33} <= {s.B for s in specs} and {1, 3, 17, 33} <= {s.H for s in specs}
    assert {s.T for s in specs} == {1, 2, 5}
    assert {s.h0 for s in specs} == {True, False} and {s.bias for s in specs} == {True, False}
    for dt in DTYPES:
        assert {(s.reset_after, s.path) for s in specs if s.dtype == dt} == set(COMBOS), dt


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
        "    fwd_phase<scalar_t, op_t, acc_t, TC>(p, Ws, acc, t, 0);\n    grid.sync();\n",
        "    fwd_phase<scalar_t, op_t, acc_t, TC>(p, Ws, acc, t, 0);\n",
        "WARNING: ThreadSanitizer: data race"),
    # The same in the backward: dgh of step t+1 is read while another block writes dgh of
    # step t-1 into the same ping-pong half.
    "backward-grid-sync-removed": (
        "tsan",
        "    bwd_phase<scalar_t, op_t, acc_t, TC>(p, Ws, acc, t, 0);\n    grid.sync();\n",
        "    bwd_phase<scalar_t, op_t, acc_t, TC>(p, Ws, acc, t, 0);\n",
        "WARNING: ThreadSanitizer: data race"),
    # The barrier at the end of block_gemm: the elementwise threads read accumulator tiles
    # (shared memory) that other warps are still writing.
    "syncthreads-removed": (
        "tsan",
        "out[i] = acc_t(0);\n    }\n  }\n  __syncthreads();\n}\n",
        "out[i] = acc_t(0);\n    }\n  }\n}\n",
        "WARNING: ThreadSanitizer: data race"),
    # The (row, unit) loop of the reset_after=True forward runs one element too far: row B,
    # one past hstate's (B, Hp) rows.
    "loop-bound-off-by-one": (
        "asan",
        "for (int64_t e = threadIdx.x; e < (b_end - b_beg) * kUnits; e += kThreads) {",
        "for (int64_t e = threadIdx.x; e <= (b_end - b_beg) * kUnits; e += kThreads) {",
        "ERROR: AddressSanitizer: heap-buffer-overflow"),
    # A planning error: the accumulator region one element short.  The host launch
    # allocates the plan's shared memory at its exact size, so the last tile's last element
    # is written one past it.
    "plan-smem-one-element-short": (
        "asan",
        "pl.acc_bytes = static_cast<int64_t>(g.nsplit) * mtp * NC * kTileElems * acc_size;",
        "pl.acc_bytes = static_cast<int64_t>(g.nsplit) * mtp * NC * kTileElems * acc_size"
        " - acc_size;",
        "ERROR: AddressSanitizer: heap-buffer-overflow"),
}


def mutant_source(name: str) -> bytes:
    variant, old, new, _ = MUTANTS[name]
    with open(os.path.join(CSRC, "gru_kernels.cuh")) as f:
        src = f.read()
    # The mutation must apply: if the kernel changed, this test must be updated, not pass.
    assert old in src, f"mutant {name}: its pattern is no longer in gru_kernels.cuh"
    return src.replace(old, new, 1).encode()


@pytest.fixture(scope="session")
def mutant_builds() -> Builds:
    """The mutants, float64 only (a third of the compile time)."""
    return Builds({n: functools.partial(_checked_build, MUTANTS[n][0],
                                        {"gru_kernels.cuh": mutant_source(n)},
                                        ("FUSEDGRU_HOST_F64_ONLY",))
                   for n in MUTANTS})


@pytest.mark.parametrize("name", list(MUTANTS))
def test_mutant_is_caught(name, mutant_builds, grid_results):
    variant, _, _, report = MUTANTS[name]
    control = grid_results(variant, MUTANT_SPEC)
    assert not control.problems(), f"the unmutated kernels fail this case: {control.problems()}"
    # Keep going after the first race, so the result is also measured against the reference.
    res = run_case(variant, mutant_builds[name], MUTANT_SPEC,
                   {"TSAN_OPTIONS": "halt_on_error=0 exitcode=66"}, timeout=120)
    caught = res.problems()
    assert caught, f"mutant {name} passed: the harness cannot see it"
    assert report in res.stderr, (f"mutant {name} was caught ({caught[:2]}) but not by the "
                                  f"expected {variant} report {report!r}")
    print(f"mutant {name}: exit {res.returncode}, {report!r} reported, "
          f"out of budget: {sorted(res.wrong) or 'none'}")
