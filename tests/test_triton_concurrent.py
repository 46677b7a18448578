"""The split kernels with their programs running at the same time, on the CPU.

Triton's interpreter runs the programs of a launch one after another, so elsewhere the
persistent strategy can only run on a grid of ONE program, where its grid barrier decides
nothing, and no test could see a race between programs.  Here every program of a launch
runs in its own thread with a thread-local program id (threads interleave at every Python
bytecode switch, and loads and stores are randomly delayed), so:

- the persistent launch meets its grid barrier with 2..8 programs: a missing barrier, a
  wrong barrier target or a buffer overwritten while another program still reads it gives
  a wrong result (checked against the float64 reference) or a hang (turned into an error);
- the "step" launches run their programs concurrently too (no program of a launch may read
  what another writes in the same launch);
- the fp32 state ping-pong (STATE_BUF, on for 16-bit y on a GPU) runs with float32 y
  (gru._FORCE_STATE_BUF), since the interpreter computes in fp32 only.

It replaces the interpreter's GridExecutor.__call__ with the same steps (triton 3.6 and
3.8 share them: copy the arguments, patch triton.language, run ``self.fn(**args)`` per
program, copy back) around a threaded loop, and makes ``interpreter_builder.grid_idx``,
which tl.program_id reads, thread-local.  A program that raises stops the others (they
would wait at the next barrier for ever); a grid barrier that never opens is an error
after HANG_S.  On triton 3.6 this found a window in kernels/gru.py's interpreter patch
(INTERPRET_INDEX_FIX installed triton's broken scalar __index__ for a moment on every
nested jit call), since closed.
"""

import inspect
import itertools
import random
import sys
import threading
import time

import pytest
import torch

from fusedgru import reference, testing

triton = pytest.importorskip("triton")
gru = pytest.importorskip("fusedgru.kernels.gru")
import triton.language as tl  # noqa: E402

pytestmark = pytest.mark.skipif(not gru.INTERPRET,
                                reason="drives Triton's interpreter (TRITON_INTERPRET=1)")

HANG_S = 120.0


class _Aborted(Exception):
    pass


class WrongResult(AssertionError):
    """An output of a launch differs from the float64 reference beyond the budget."""


def _check(name, err, budget=1e-5):
    if not err < budget:  # NaN fails too
        raise WrongResult(f"{name}: relative error {err:.3g} > {budget:g}")


@pytest.fixture
def concurrent_programs(monkeypatch):
    """Within the test every launch runs its programs in concurrent threads."""
    from triton.runtime import interpreter as interp

    tls = threading.local()
    abort = threading.Event()
    rng = random.Random(1234)
    rng_lock = threading.Lock()

    def jitter():
        with rng_lock:
            delay = rng.random() * 2e-4 if rng.random() < 0.02 else 0.0
        if delay:
            time.sleep(delay)

    builder_cls = type(interp.interpreter_builder)
    monkeypatch.setattr(builder_cls, "grid_idx", property(
        lambda self: getattr(tls, "idx", None), lambda self, v: setattr(tls, "idx", v)),
        raising=False)
    # triton 3.6's interpreter does an atomic add as a plain read-modify-write, which loses
    # arrivals when threads really interleave (seen: the counter one short, every program
    # spinning): a lock makes it the atomic it is on a GPU.
    atomic_lock = threading.Lock()
    for name in ("create_load", "create_store", "create_masked_load", "create_masked_store",
                 "create_atomic_rmw", "create_atomic_cas"):
        orig = getattr(builder_cls, name, None)
        if orig is None:
            continue
        atomic = name.startswith("create_atomic")

        def wrapped(self, *args, _orig=orig, _atomic=atomic, **kwargs):
            if abort.is_set():
                raise _Aborted()  # unwinds a program spinning at a barrier that never opens
            jitter()
            if _atomic:
                with atomic_lock:
                    return _orig(self, *args, **kwargs)
            return _orig(self, *args, **kwargs)
        monkeypatch.setattr(builder_cls, name, wrapped)

    def run_grid(fn, args, grid):
        errors = []

        def program(idx, start_delay):
            tls.idx = idx
            time.sleep(start_delay)
            try:
                fn(**args)
            except _Aborted:
                pass
            except BaseException as exc:  # noqa: BLE001 - re-raised below
                errors.append(exc)
                abort.set()  # the others would wait at the next barrier for ever

        order = list(itertools.product(*(range(n) for n in grid)))
        rng.shuffle(order)
        threads = [threading.Thread(target=program, args=(idx, rng.random() * 0.02),
                                    daemon=True) for idx in order]
        for th in threads:
            th.start()
        deadline = time.monotonic() + HANG_S
        for th in threads:
            th.join(max(0.0, deadline - time.monotonic()))
        if any(th.is_alive() for th in threads):
            abort.set()
            for th in threads:
                th.join(10)
            raise RuntimeError(f"{len(threads)} programs still running after {HANG_S} s: "
                               "a grid barrier that never opens")
        if errors:
            raise errors[0]

    def call(self, *args_dev, **kwargs):
        # GridExecutor.__call__ of triton 3.6 / 3.8, with the loop over the grid replaced.
        argspec = inspect.getfullargspec(self.fn)
        kwargs = {k: v for k, v in kwargs.items() if k in argspec.args}
        args_hst, kwargs_hst = self._init_args_hst(args_dev, kwargs)
        patch_scope = interp._patch_lang(self.fn)
        try:
            args = inspect.getcallargs(self.fn, *args_hst, **kwargs_hst)
            args = {name: arg if name in self.constexprs else interp._implicit_cvt(arg)
                    for name, arg in args.items()}
            grid = self.grid(args) if callable(self.grid) else self.grid
            grid = tuple(grid) + (1,) * (3 - len(grid))
            interp.interpreter_builder.set_grid_dim(*grid)
            run_grid(self.fn, args, grid)
        finally:
            patch_scope.restore()
        self._restore_args_dev(args_dev, args_hst, kwargs, kwargs_hst)

    monkeypatch.setattr(interp.GridExecutor, "__call__", call)
    saved = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    # Threads are co-resident whatever the grid: let persistent take any grid.
    monkeypatch.setattr(gru, "max_coresident_programs", lambda device: 1 << 20)
    monkeypatch.setattr(gru, "_FORCE_STATE_BUF", True)
    try:
        yield
    finally:
        sys.setswitchinterval(saved)


def _launch_and_check(poisoned_run, T, B, I, H, reset_after, with_h0, keep_ws, cfg, seed):
    gen = torch.Generator().manual_seed(seed)
    case = testing.make_layer_case(T, B, I, H, reset_after=reset_after, with_h0=with_h0,
                                   generator=gen)
    y, ws, dgi, dgh, dh0 = poisoned_run(case, cfg, "cpu", keep_ws=keep_ws)
    x64, h064, w_ih64, w_hh64, b_ih64, b_hh64 = case.args("cpu", torch.float64)
    y64, ws64 = reference.gru_layer_forward(x64, h064, w_ih64, w_hh64, b_ih64, b_hh64,
                                            reset_after)
    _check("y", testing.rel_err(y, y64))
    if not keep_ws:
        return
    _check("ws", testing.rel_err(ws, ws64))
    _, dh0_64, _, _, db_ih64, db_hh64 = reference.gru_layer_backward(
        case.grad_y.double(), x64, h064, w_ih64, w_hh64, y64, ws64, reset_after)
    # dgi summed over (T, B) is the input-bias gradient, dgh's the recurrent one.
    _check("dh0", testing.rel_err(dh0, dh0_64))
    _check("dgi", testing.rel_err(dgi.sum((0, 1)).double(), db_ih64))
    _check("dgh", testing.rel_err(dgh.sum((0, 1)).double(), db_hh64))


# Block shapes of 16 so that small sizes give several programs: (T, B, I, H) -> programs.
SMALL = dict(block_b=16, block_h=16, block_k=16, num_warps=4)
CASES = [
    (4, 17, 3, 37, True, True),    # 2 x 3 = 6 programs, 3 K chunks, h0 given
    (3, 5, 4, 33, False, False),   # 1 x 3 programs, no h0
    (1, 20, 3, 17, True, False),   # T = 1: no persistent launch in the forward
    (2, 3, 2, 40, False, True),
]


@pytest.mark.parametrize("strategy", ["persistent", "step"])
@pytest.mark.parametrize("reset_after", [True, False], ids=["reset_after", "reset_before"])
@pytest.mark.parametrize("T,B,I,H,keep_ws,with_h0", CASES)
def test_split_kernels_with_concurrent_programs(concurrent_programs, poisoned_run, strategy,
                                                reset_after, T, B, I, H, keep_ws, with_h0):
    cfg = gru.Config(strategy, **SMALL)
    assert cfg.programs(B, H) > 1 or T == 1
    _launch_and_check(poisoned_run, T, B, I, H, reset_after, with_h0, keep_ws, cfg,
                      seed=T * 31 + H)


@triton.jit
def _block_barrier_only(bar_ptr, target):
    """A mutant of gru._grid_barrier: waits for this program's threads only."""
    tl.debug_barrier()


def test_harness_catches_a_missing_grid_barrier(concurrent_programs, poisoned_run,
                                                 monkeypatch):
    """The harness can fail: with the grid barrier reduced to a block-level one, the
    persistent forward reads h_{t-1} columns that other programs have not written yet
    (poisoned NaN) or that belong to another step, and the result is wrong."""
    # The jitted kernels resolve _grid_barrier from their module's globals at run time.
    monkeypatch.setattr(gru, "_grid_barrier", _block_barrier_only)
    cfg = gru.Config("persistent", **SMALL)
    wrong = 0
    for seed in range(3):
        try:
            _launch_and_check(poisoned_run, 6, 17, 3, 37, True, True, False, cfg, seed=seed)
        except WrongResult:
            wrong += 1
    assert wrong > 0, "three runs without the grid barrier all gave the right result"
