"""Every Triton specialisation benchmarks/gpu_run.sh launches, found and compiled on a CPU.

The GPU run's Triton work is a list of layer calls (the shapes of `fusedgru check`, the
default GPU tests, the sanitizer cases, the benchmark grids).  This replays each call
through the real launchers (kernels/gru.py) on meta tensors, with the device facts of the
H200 put in (132 SMs for the co-residency cap; dot precisions as on CUDA), and hands every
launch to triton's own JIT in warmup mode (compile, never launch) under a driver that
reports an sm_90 target.  So each specialisation is keyed exactly as the runtime keys it:
the JIT's binder specialises the integer arguments (== 1 becomes a constant, divisible by
16 an attribute) and the pointers (16-byte alignment; meta tensors keep the offsets of
views such as a module's hx[k]), and triton.compile writes the result under the same
on-disk cache key a GPU process computes (benchmarks/NOTES-gpu-run.md: the evidence).

    python benchmarks/gpu_specs.py                  count: one line per distinct
                                                    specialisation (jit_cache_hook skips
                                                    each compile), per part of the run
    python benchmarks/gpu_specs.py --warm --jobs 2  compile them all into TRITON_CACHE_DIR
    --parts check,tests,sanitize,stream,rest,seq,precision
                                                    which parts of the run (default all)
    --json FILE                                     the rows, with compile seconds

Needs triton with the nvidia backend (no GPU) and TRITON_INTERPRET unset.  Run from the
repository root (it reads the GPU tests' parametrisation).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import subprocess
import sys
import time
import zlib
from pathlib import Path
from typing import Iterator, List, Optional, Sequence

if os.environ.get("TRITON_INTERPRET") == "1":
    raise SystemExit("gpu_specs: unset TRITON_INTERPRET (the interpreter cannot compile)")

import torch  # noqa: E402
import triton  # noqa: E402
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SM90 = GPUTarget("cuda", 90, 32)
H200_SMS = 132  # multiprocessors (device README, KINDS.md: read off an H200 here)
PARTS = ("check", "tests", "sanitize", "stream", "rest", "seq", "precision")
_MAX_T = 4  # keys do not depend on T beyond 3 steps (first, middle, last): see layer()


class _Sm90Driver:
    """What triton's JIT asks the active driver for, answered as on one H200."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return SM90

    def get_device_capability(self, device=0):
        return (9, 0)

    def get_active_torch_device(self):
        return torch.device("meta")


def _import_fusedgru():
    if importlib.util.find_spec("fusedgru") is None:  # not installed: this checkout
        sys.path.insert(0, str(ROOT))
    import fusedgru  # noqa: F401  (the extension may be absent: the triton row needs none)

    try:
        from fusedgru.kernels import backend as kbackend, gru
    except ImportError:  # a plain checkout on PYTHONPATH: kernels/ is fusedgru.kernels
        fusedgru.__path__.append(str(ROOT))
        from fusedgru.kernels import backend as kbackend, gru  # noqa: F811
    return kbackend, gru


KBACKEND, GRU = _import_fusedgru()


@contextlib.contextmanager
def h200(tf32: bool = False, strict: Optional[str] = None):
    """The launchers' device questions answered as on the H200: SM count, dot precision.
    tf32: whether the flag nn.GRU follows (torch.backends.cudnn.rnn.fp32_precision) allows
    TF32 in that call, which decides float32's DOT_PREC (torch's default: True; the GPU
    tests' "fp32" and `fusedgru bench --tf32 off`: False); strict: the strict float32 path
    forced (gru.force_strict_fp32: "tf32x3", the default, or the FMA path "ieee")."""
    saved = (GRU.max_coresident_programs, GRU.dot_precision, GRU.rnn_tf32_allowed)
    GRU.max_coresident_programs = lambda device: H200_SMS
    GRU.dot_precision = lambda dtype, device_type: GRU.gpu_dot_precision(dtype)
    GRU.rnn_tf32_allowed = lambda: tf32
    try:
        with GRU.force_strict_fp32(strict):
            yield
    finally:
        GRU.max_coresident_programs, GRU.dot_precision, GRU.rnn_tf32_allowed = saved


# ---------------------------------------------------------------------------------------
# The run's Triton layer calls
# ---------------------------------------------------------------------------------------

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


def layer(T, B, I, H, dtype, *, tf32=False, strict=None, reset_after=True,
          h0: Optional[int] = 0, train=True, strategy=None, config=None, infer_too=False,
          batch_sizes: Optional[Sequence[int]] = None, resets: bool = False):
    """One layer-direction as the triton row runs it: forward keeping ws and the backward
    (train), or the inference forward (not train; also with infer_too).  h0: None, or the
    element offset of h0 in its buffer (a module's hx[layer * D + direction] is a view at
    that offset, which decides its 16-byte alignment).  T is capped at _MAX_T: the launches
    of step 0, of a middle step and of the last (or the persistent launch) are all there
    from T = 3 on, and T itself is never specialised (do_not_specialize).

    tf32 / strict: float32's precision (h200).  batch_sizes: packed rows (the sizes of the
    steps, non-increasing; B and T are taken from them, capped at _MAX_T steps): x, y, ws
    are the (N, .) packed rows and batch_sizes an int64 CPU tensor, as FusedGRU passes a
    PackedSequence.  resets: a (T, B) bool resets mask on the meta device (dense)."""
    dev = "meta"
    if batch_sizes is not None:
        batch_sizes = list(batch_sizes)[:_MAX_T]
        T, B = len(batch_sizes), batch_sizes[0]
    T = min(T, _MAX_T)
    with h200(tf32, strict), contextlib.ExitStack() as stack:
        if strategy is not None:
            config = GRU.strategy_config(strategy, B, H, dtype, torch.device("cuda"))
        if config is not None:
            stack.enter_context(GRU.force_config(config))
        seq = {}
        if batch_sizes is not None:
            seq["batch_sizes"] = torch.tensor(batch_sizes, dtype=torch.int64)
            x = torch.empty(sum(batch_sizes), I, device=dev, dtype=dtype)
        else:
            x = torch.empty(T, B, I, device=dev, dtype=dtype)
            if resets:
                seq["resets"] = torch.empty(T, B, device=dev, dtype=torch.bool)
        hx = None if h0 is None else torch.empty(h0 + B * H, device=dev, dtype=dtype)[h0:].view(B, H)
        w_ih = torch.empty(3 * H, I, device=dev, dtype=dtype)
        w_hh = torch.empty(3 * H, H, device=dev, dtype=dtype)
        b = torch.empty(3 * H, device=dev, dtype=dtype)
        if train:
            y, ws = KBACKEND.triton_forward(x, hx, w_ih, w_hh, b, b, reset_after, **seq)
            KBACKEND.triton_backward(torch.empty_like(y), x, hx, w_ih, w_hh, y, ws, reset_after,
                                     **seq)
        if infer_too or not train:
            KBACKEND.triton_inference(x, hx, w_ih, w_hh, b, b, reset_after, **seq)


def module(T, B, I, H, dtype, *, layers=1, bidirectional=False, h0=True, **kw):
    """FusedGRU's layer calls (fusedgru/functional.py): layer l, direction d gets
    hx[l * D + d] (a view) and an input of I (l = 0) or D * H features."""
    D = 2 if bidirectional else 1
    for li in range(layers):
        for d in range(D):
            layer(T, B, I if li == 0 else D * H, H, dtype,
                  h0=(li * D + d) * B * H if h0 else None, **kw)


def _load(path: str):
    spec = importlib.util.spec_from_file_location(Path(path).stem, ROOT / path)
    mod = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(ROOT / Path(path).parent))
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.path.pop(0)
    return mod


def _default(params) -> list:
    """The values of a parametrisation that run without --gpu-exhaustive."""
    out = []
    for p in params:
        if hasattr(p, "marks"):
            if any(m.name == "exhaustive" for m in p.marks):
                continue
            p = p.values[0] if len(p.values) == 1 else p.values
        out.append(p)
    return out


# The GPU tests' precisions: (dtype, the RNN flag allows TF32).  "fp32" is strict float32
# (tf32x3 in the kernels), "tf32" torch's default for float32.
PREC = {"fp32": (F32, False), "tf32": (F32, True), "fp16": (F16, False), "bf16": (BF16, False)}
# What a process that leaves torch's flags alone runs float32 in (cudnn.rnn.fp32_precision
# "tf32" by default): fusedgru check, the sanitizer cases.
TORCH_DEFAULT_TF32 = True


def part_check():
    """fusedgru check --backends cuda triton: its shapes, every CUDA dtype the row takes."""
    from fusedgru import cli

    # float32 in torch's default precision (TF32), and strict: check's float32 row runs in
    # whatever the flags say, and a check that sets strict float32 must find it compiled.
    for dtype, tf32 in ((F32, TORCH_DEFAULT_TF32), (F32, not TORCH_DEFAULT_TF32), (BF16, False),
                        (F16, False)):
        for ra in (True, False):
            for T, B, I, H, with_h0, _bias in cli._CHECK_SHAPES:
                yield dict(fn=layer, args=(T, B, I, H, dtype),
                           kw=dict(reset_after=ra, h0=0 if with_h0 else None, tf32=tf32))


def part_tests():
    """tests/test_triton_gpu.py's default parametrisation (and the Triton calls of
    tests/test_ecosystem_gpu.py are in part 'rest')."""
    t = _load("tests/test_triton_gpu.py")
    for p in _default(t._layer_params()):
        prec, T, B, I, H = p
        dtype, tf32 = PREC[prec[0]]
        for ra in (True, False):
            yield dict(fn=layer, args=(T, B, I, H, dtype),
                       kw=dict(tf32=tf32, reset_after=ra, h0=0 if H % 2 == 1 else None))
    for prec in _default(t.LARGE_H_PRECISIONS):
        dtype, tf32 = PREC[prec[0]]
        for T, B, I, H in _default(t.LARGE_H_SIZES):
            for ra in (True, False):
                for strategy in GRU.LARGE_H_STRATEGIES:
                    yield dict(fn=layer, args=(T, B, I, H, dtype),
                               kw=dict(tf32=tf32, reset_after=ra, strategy=strategy,
                                       h0=0 if B % 2 == 1 else None))
    for strategy in GRU.LARGE_H_STRATEGIES:  # the long sequence, bf16 by default
        yield dict(fn=layer, args=(1024, 4, 32, 256, BF16), kw=dict(strategy=strategy))
    for strategy in ("resident", "step", "persistent"):  # every element written
        cfg = GRU.Config("resident", 16, 64, 0, 8) if strategy == "resident" else \
            GRU.Config(strategy, 16, 32, 64, 4)
        for ra, dtype in ((True, F32), (False, F32), (True, BF16)):
            yield dict(fn=layer, args=(5, 37, 6, 45, dtype), kw=dict(reset_after=ra, config=cfg))
    for prec, H in _default([(("fp32",), 17), (("tf32",), 100), (("fp16",), 17)]):
        dtype, tf32 = PREC[prec[0]]  # module parity with cuDNN: 2 layers, bidirectional
        yield dict(fn=module, args=(11, 5, 13, H, dtype),
                   kw=dict(layers=2, bidirectional=True, tf32=tf32))
    for prec, T, B, I, H in _default(t.STRICT_FP32_PATH_SIZES):  # the FMA path forced
        for ra in (True, False):
            yield dict(fn=layer, args=(T, B, I, H, F32),
                       kw=dict(reset_after=ra, strict="ieee", h0=0 if H % 2 == 1 else None))
    for mode, tf32 in (("default", TORCH_DEFAULT_TF32), ("ieee", False)):  # nn.GRU's mode
        for H in _default(t.PRECISION_MODE_H):
            yield dict(fn=module, args=(9, 8, 24, H, F32), kw=dict(tf32=tf32))
    for H in (17, 200):  # no host sync
        yield dict(fn=layer, args=(6, 3, 5, H, F32), kw={})
    yield dict(fn=layer, args=(2100, 4096, 8, 64, BF16), kw=dict(h0=None))  # 64-bit offsets
    yield dict(fn=module, args=(5, 3, 7, 33, F32), kw=dict(h0=False, train=True))  # compile


def part_sanitize():
    """benchmarks/sanitize_cases.py's first-contact cases of the triton row."""
    s = _load("benchmarks/sanitize_cases.py")
    for kind, name, dtype, ra, shape in s.first_contact_cases("triton"):
        T, B, I, H = shape
        strategy = kind[len("layer-"):] if kind.startswith("layer-") else None
        yield dict(fn=layer, args=(T, B, I, H, dtype),
                   kw=dict(reset_after=ra, strategy=strategy, h0=None if B == 1 else 0,
                           infer_too=True, tf32=TORCH_DEFAULT_TF32))


def _grid(name: str, quick: bool = False, **prec):
    """The cells of `fusedgru bench --grid name` as FusedGRU runs them (bench's default
    `--tf32 off`: strict float32; prec: tf32 / strict of h200 instead): packed cells on
    their packed rows (the batch sizes of the cell's lengths), rollout cells with resets."""
    from fusedgru.bench import grids, sequences

    for case in grids.grid_cases(name, quick=quick):
        dtype = grids.DTYPES[case.dtype]
        kw = dict(layers=case.layers, bidirectional=case.bidirectional,
                  train=case.mode == "train", **prec)
        if case.call == "packed":
            lengths = sequences.draw_lengths(case.lengths, case.B, case.T,
                                             sort=case.packing == "sorted")
            kw["batch_sizes"] = [sum(n > t for n in lengths) for t in range(max(lengths))]
        elif case.call == "rollout":
            kw["resets"] = True
        yield dict(fn=module, args=(case.T, case.B, case.I, case.H, dtype), kw=kw)


def part_stream():
    """fusedgru bench --grid stream (float32 without TF32, bf16; inference and train)."""
    yield from _grid("stream")


def part_seq():
    """fusedgru bench --grid packed,rollout (float32, strict; inference and train)."""
    yield from _grid("packed")
    yield from _grid("rollout")


def part_precision():
    """The stream grid's float32 cells in the two other float32 paths, so that one GPU run
    can time all three (benchmarks/NOTES-triton.md, "Strict float32"): TF32
    (`fusedgru bench --tf32 on`) and the FMA path (FUSEDGRU_TRITON_STRICT_FP32=ieee)."""
    for prec in (dict(tf32=True), dict(strict="ieee")):
        for c in _grid("stream", **prec):
            if c["args"][4] == F32:
                yield c


def part_rest():
    """The ecosystem GPU tests' Triton calls, benchmarks/large_h.py, the other grids."""
    for B, T in ((8, 33), (8, 20), (4, 9), (16, 100), (16, 70), (6, 5)):  # Tagger: 2x bidir
        for dtype in (F32, BF16):
            yield dict(fn=module, args=(T, B, 32, 40, dtype),
                       kw=dict(layers=2, bidirectional=True, infer_too=True))
    for tf32 in (True, False):  # the fp32_precision API test: "tf32", then "ieee"
        yield dict(fn=module, args=(6, 5, 32, 40, F32),
                   kw=dict(layers=2, bidirectional=True, h0=False, tf32=tf32))
        # a default float32 FusedGRU computes as nn.GRU does (both modes, 2 layers)
        yield dict(fn=module, args=(12, 6, 24, 96, F32), kw=dict(layers=2, tf32=tf32))
    yield dict(fn=module, args=(5, 3, 8, 12, F32), kw=dict(h0=True))  # opcheck (layer-level)
    for dtype in (F16, BF16):  # autocast: T=50, B=16, I=64, H=128, 2 layers, bidir
        yield dict(fn=module, args=(50, 16, 64, 128, dtype), kw=dict(layers=2, bidirectional=True))
    lh = _load("benchmarks/large_h.py")
    for cell in lh._grid(False):
        dtype = lh.DTYPES[cell["dtype"]]
        for strategy in GRU.LARGE_H_STRATEGIES:
            try:
                with h200():
                    GRU.strategy_config(strategy, cell["B"], cell["H"], dtype,
                                        torch.device("cuda"))
            except ValueError:  # resident H, or a grid over the SMs: large_h skips it too
                continue
            yield dict(fn=layer, args=(cell["T"], cell["B"], cell["I"], cell["H"], dtype),
                       kw=dict(strategy=strategy, train=cell["mode"] == "train"))
    for name in ("batch", "deep", "d2l"):
        yield from _grid(name)


def calls(parts) -> Iterator[tuple]:
    table = {"check": part_check, "tests": part_tests, "sanitize": part_sanitize,
             "stream": part_stream, "rest": part_rest, "seq": part_seq,
             "precision": part_precision}
    for part in parts:
        for c in table[part]():
            yield part, c


# ---------------------------------------------------------------------------------------
# Driving triton's JIT
# ---------------------------------------------------------------------------------------


class _WarmupOnly:
    """Stands for a @triton.jit kernel inside the launchers: kernel[grid](...) compiles
    (or finds) the specialisation through the JIT, as a launch would, and launches
    nothing."""

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        return lambda *args, **kw: self.kernel.warmup(*args, grid=grid, **kw)


KERNELS = ("_fwd_resident_kernel", "_bwd_resident_kernel", "_fwd_split_kernel",
           "_bwd_split_kernel")


@contextlib.contextmanager
def jit_on_sm90(on_new_key):
    """Every launch of the launchers goes through the JIT's warmup for sm_90; on_new_key
    (the jit_cache_hook: called with the key before each compile) returns True to skip
    that compile."""
    from triton.runtime import driver

    saved_kernels = {k: getattr(GRU, k) for k in KERNELS}
    saved_hook = knobs.runtime.jit_cache_hook
    saved_driver = driver._active  # None without a GPU: the default is made on first use
    driver.set_active(_Sm90Driver())
    for k in KERNELS:
        setattr(GRU, k, _WarmupOnly(saved_kernels[k]))
    knobs.runtime.jit_cache_hook = on_new_key
    try:
        yield
    finally:
        knobs.runtime.jit_cache_hook = saved_hook
        for k, v in saved_kernels.items():
            setattr(GRU, k, v)
        driver._active = saved_driver


def _label(fn_name: str, compile_info: dict) -> str:
    """kernel[dtype,constexpr flags,warps,cooperative] and how B and H were specialised
    (== 1: a constant; %16: the divisibility attribute), pointers not 16-byte aligned."""
    sig = compile_info["signature"]
    names = list(sig)
    consts = {names[k[0]] if isinstance(k, tuple) else k: v
              for k, v in compile_info["constants"].items()}
    attrs = compile_info["configs"][0] if compile_info.get("configs") else {}
    attrs = {names[k[0]]: v for k, v in attrs.items()} if isinstance(attrs, dict) else {}
    ints = []
    for name in ("B", "H"):
        if sig.get(name) == "constexpr":
            ints.append(f"{name}=={consts[name]}")
        elif name in sig:
            ints.append(f"{name}%16{'==0' if attrs.get(name) else '!=0'}")
    unaligned = [n for n in names if sig[n].startswith("*") and not attrs.get(n)]
    flags = ",".join(f"{k}={v}" for k, v in consts.items()
                     if k.isupper() and k not in ("B", "H", "LIBDEVICE_TANH"))
    ty = next(v for v in sig.values() if v.startswith("*"))
    return (f"{fn_name}[{ty[1:]},{flags},warps={compile_info['num_warps']}"
            f"{',cooperative' if compile_info['launch_cooperative_grid'] else ''}] "
            f"{' '.join(ints)}" + (f" unaligned={','.join(unaligned)}" if unaligned else ""))


def run(parts, warm: bool, shard=(0, 1), progress=None) -> List[dict]:
    """[{key, label, part, seconds?}] for every distinct specialisation of ``parts``."""
    rows, seen = [], {}
    state = {"part": None, "t0": None, "key": None}

    def close():  # the time since the last new key: its compile (or cache load)
        if warm and state["t0"] is not None and rows:
            rows[-1]["seconds"] = round(time.perf_counter() - state["t0"], 2)
            state["t0"] = None

    def on_new_key(key, repr, fn, compile, **_):  # noqa: A002 - triton's keyword names
        k = (fn.name, str(key))
        if k in seen:
            return not warm or seen[k]  # a skipped key comes back: skip it again
        mine = zlib.crc32(repr.encode()) % shard[1] == shard[0]
        skip = not (warm and mine)
        seen[k] = skip
        if mine:
            close()
            # _label reads the specialisation the binder made (constexprs, attrs).
            rows.append({"kernel": fn.name, "label": _label(fn.name, compile),
                         "part": state["part"], "repr": repr})
            state["t0"] = time.perf_counter()
            if progress:
                progress(rows[-1])
        return skip

    with jit_on_sm90(on_new_key):
        for part, c in calls(parts):
            state["part"] = part
            c["fn"](*c["args"], **c["kw"])
            close()
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default=",".join(PARTS))
    ap.add_argument("--warm", action="store_true",
                    help="compile into TRITON_CACHE_DIR (default: count only)")
    ap.add_argument("--jobs", type=int, default=1, help="with --warm: processes")
    ap.add_argument("--shard", default=None, help=argparse.SUPPRESS)  # i/n, a worker
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    parts = [p for p in args.parts.split(",") if p]
    bad = set(parts) - set(PARTS)
    if bad:
        ap.error(f"unknown parts {sorted(bad)}; expected {PARTS}")
    t0 = time.perf_counter()
    if args.warm and args.jobs > 1 and args.shard is None:
        procs = []
        for i in range(args.jobs):
            out = Path(os.environ.get("TMPDIR", "/tmp")) / f"gpu_specs.{os.getpid()}.{i}.json"
            procs.append((subprocess.Popen(
                [sys.executable, __file__, "--parts", args.parts, "--warm", "--shard",
                 f"{i}/{args.jobs}", "--json", str(out), "--quiet"]), out))
        rows, rc = [], 0
        for p, out in procs:
            rc |= p.wait()
            rows += json.loads(out.read_text())["rows"] if out.exists() else []
            out.unlink(missing_ok=True)
    else:
        shard = tuple(int(v) for v in args.shard.split("/")) if args.shard else (0, 1)
        show = None if args.quiet else (lambda r: print(f"{r['part']:9} {r['label']}", flush=True))
        rows = run(parts, args.warm, shard, show)
        rc = 0
    wall = time.perf_counter() - t0
    by_part = {p: sum(r["part"] == p for r in rows) for p in parts}
    secs = [r["seconds"] for r in rows if "seconds" in r]
    print(f"gpu_specs: triton {triton.__version__}, sm_90: {len(rows)} distinct Triton "
          f"specialisations ({', '.join(f'{p} {n}' for p, n in by_part.items())}; a part "
          f"counts only keys no earlier part launched)"
          + (f"; compiled in {sum(secs):.0f} s of compile time, {wall:.0f} s wall, "
             f"{(sum(secs) / len(secs)) if secs else 0:.2f} s each on this CPU" if args.warm else ""))
    if args.json:
        Path(args.json).write_text(json.dumps({
            "triton": triton.__version__, "torch": torch.__version__, "arch": 90,
            "parts": parts, "by_part": by_part, "wall_s": round(wall, 1), "rows": rows},
            indent=1))
    return rc


if __name__ == "__main__":
    sys.exit(main())
