"""Ahead-of-time compilation of every kernel configuration the dispatcher can choose, for a
GPU architecture, with no GPU: lowering errors and shared-memory overflows show up in CI.

    python -m fusedgru.kernels.aot [--arch 90] [--level all|cover|ci] [--json FILE]
                                   [--dtypes fp32,...] [--precisions tf32x3,...] [--dump DIR]
        prints one row per configuration: shared memory, registers, spilled bytes (ptxas'
        stack frame: SPILLS marks one), and with --dump writes TTGIR / PTX / SASS

Uses triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32)).  The signature
format (name -> type string, constexprs by name) is the one of triton >= 3.3; what differs
between triton 3.6 and 3.8 (attrs for pointer alignment, the metadata fields) is guarded.
Registers and spills come from cuobjdump (shipped with triton) where it runs.
"""

from __future__ import annotations

import argparse
import json
import itertools
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional

import torch
import triton

from . import gru as _gru_loaded

__all__ = ["KernelSpec", "dispatch_specs", "compile_spec", "SHARED_LIMIT", "main"]

# Maximum shared memory per block (opt-in), bytes.
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}

_TY = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}

# Precisions the dispatcher picks: (weight dtype, DOT_PREC).  float32: "tf32" (the RNN
# flag allows TF32, torch's default), "tf32x3" (strict float32, split precision) and
# "ieee" (the FMA path strict float32 can be forced to, gru.force_strict_fp32).
PRECISIONS = [(torch.float32, "ieee"), (torch.float32, "tf32"), (torch.float32, "tf32x3"),
              (torch.float16, "ieee"), (torch.bfloat16, "ieee")]


@dataclass
class KernelSpec:
    """One compiled configuration: a kernel, its pointer dtypes and its constexprs."""

    kernel: str
    dtype: torch.dtype
    constexprs: Dict[str, object]
    num_warps: int
    # Filled by compile_spec:
    shared: Optional[int] = None
    registers: Optional[int] = None
    spill_bytes: Optional[int] = None
    extra: Dict[str, object] = field(default_factory=dict)

    @property
    def label(self) -> str:
        flags = ",".join(f"{k}={v}" for k, v in self.constexprs.items()
                         if k not in ("LIBDEVICE_TANH",))
        return f"{self.kernel}[{_TY[self.dtype]},{flags},warps={self.num_warps}]"


def _jit_module():
    """kernels/gru.py, with compiled kernels.

    triton.jit reads TRITON_INTERPRET when a function is defined, triton.language's own
    jit functions (tl.sigmoid ...) included, so a process that imported triton under the
    interpreter cannot compile: run this module in a fresh process without it (as
    tests/test_triton_aot.py does).
    """
    if _gru_loaded.INTERPRET:
        raise RuntimeError("ahead-of-time compilation needs a process without "
                           "TRITON_INTERPRET=1: run python -m fusedgru.kernels.aot")
    return _gru_loaded


def _signature(kernel: str, dtype: torch.dtype, seq: int = 0) -> Dict[str, str]:
    """seq: the SEQ flag.  The launchers pass the packed rows' table (int64) as seq_ptr
    and the resets (uint8) as rs_ptr where they are used, else a tensor of the call's dtype
    (y, dh0): the unused pointer's type follows."""
    fn = getattr(_jit_module(), kernel)
    p = "*" + _TY[dtype]
    f32 = "*fp32"
    sq = ["*i64" if seq == 1 else p, "*u8" if seq == 2 else p]  # seq_ptr, rs_ptr
    types = {
        "_fwd_resident_kernel": [p] * 6 + sq + ["i32"] * 3,
        "_bwd_resident_kernel": [p] * 8 + sq + ["i32"] * 3,
        "_fwd_split_kernel": [p] * 6 + [f32, "*i32"] + sq + ["i32"] * 5,
        "_bwd_split_kernel": [p] * 7 + [f32] * 2 + [p, "*i32"] + sq + ["i32"] * 4,
    }[kernel]
    names = fn.arg_names
    sig = {}
    for i, name in enumerate(names):
        sig[name] = types[i] if i < len(types) else "constexpr"
    return sig


# The sequence structure's flag (kernels/gru.py, SEQ): 0 dense, 1 packed rows, 2 resets.
SEQS = (0, 1, 2)
# The precision and formulation whose packed and resets specialisations the CI set
# compiles (every kernel and strategy at the largest blocks: 12 per architecture); the
# others are dense-only there (reset_after=False adds no construct the SEQ paths lower
# differently; --level cover compiles it).
# tf32x3: strict float32's default, what the packed / rollout benchmark cells run, and the
# kernels' largest register and shared-memory use of the three float32 precisions.
CI_SEQ_PRECISION = (torch.float32, "tf32x3", True)  # (dtype, DOT_PREC, RESET_AFTER)


def dispatch_specs(level: str = "all") -> Iterator[KernelSpec]:
    """The configurations choose_config + the launchers can produce on a GPU.

    level "all":   every one (each flag combination).
    level "cover": per kernel, precision, block shape and formulation, only the flag
                   values that add code (h0 present, a previous step present ...): the
                   dropped ones only remove a masked load, never change a tile or the
                   shared memory.
    level "ci":    "cover" at the largest block shapes only (most registers and shared
                   memory), every kernel, precision and formulation; what CI compiles.
    Each comes dense (SEQ=0) and, but in "ci" only for CI_SEQ_PRECISION, packed (SEQ=1)
    and with resets (SEQ=2).
    """
    assert level in ("all", "cover", "ci"), level
    for spec in _dense_specs(level):
        for seq in SEQS:
            c = spec.constexprs
            if seq and level == "ci" and \
                    (spec.dtype, c["DOT_PREC"], c["RESET_AFTER"]) != CI_SEQ_PRECISION:
                continue
            yield KernelSpec(spec.kernel, spec.dtype, dict(spec.constexprs, SEQ=seq),
                             spec.num_warps)


def _dense_specs(level: str) -> Iterator[KernelSpec]:
    gru = _jit_module()
    bools = (True, False) if level == "all" else (True,)
    hps = [hp for hp in (16, 32, 64, 128, 256) if hp <= max(gru.RESIDENT_MAX.values())]
    for (dtype, prec), ra, h0 in itertools.product(PRECISIONS, (True, False), bools):
        # Resident kernels: HP up to the dtype's limit.
        fits = [hp for hp in hps if hp <= gru.resident_max(dtype)]
        for hp in fits[-1:] if level == "ci" else fits:
            cfg = gru.choose_config(16, hp, dtype)
            assert cfg.strategy == "resident" and cfg.block_h == hp
            common = dict(RESET_AFTER=ra, HAS_H0=h0)
            for store_ws in bools:  # False (inference) only drops the ws stores
                yield KernelSpec("_fwd_resident_kernel", dtype, dict(
                    common, STORE_WS=store_ws, LIBDEVICE_TANH=True, DOT_PREC=prec,
                    BLOCK_B=cfg.block_b, BLOCK_H=hp), cfg.num_warps)
            yield KernelSpec("_bwd_resident_kernel", dtype, dict(
                common, DOT_PREC=prec, BLOCK_B=cfg.block_b, BLOCK_H=hp), cfg.num_warps)
        # Split kernels: the two batch blocks choose_config picks (B <= 16, B > 16), one
        # launch per unit ("step") and the persistent launch of the later steps.
        big_h = 2 * gru.resident_max(dtype)
        state_buf = dtype != torch.float32
        for B in (17,) if level == "ci" else (16, 17):
            cfg = gru.choose_config(B, big_h, dtype)
            assert cfg.strategy == "step"
            assert gru.choose_config(B, big_h, dtype, 1 << 30, "persistent") == \
                gru.Config("persistent", cfg.block_b, cfg.block_h, cfg.block_k, cfg.num_warps)
            blocks = dict(BLOCK_B=cfg.block_b, BLOCK_N=cfg.block_h, BLOCK_K=cfg.block_k)
            fwd = dict(RESET_AFTER=ra, STATE_BUF=state_buf, LIBDEVICE_TANH=True,
                       DOT_PREC=prec, **blocks)
            # Forward units: PREV 0 (t = 0, no h0) or 1 (t = 0, h0 given), and 2 (t > 0).
            phases = (0,) if ra else (1, 2)
            prevs = (2,) if level == "ci" else sorted({2, 1 if h0 else 0})
            for phase, prev in itertools.product(phases, prevs):
                yield KernelSpec("_fwd_split_kernel", dtype, dict(
                    fwd, PHASE=phase, PREV=prev, PERSIST=False), cfg.num_warps)
            yield KernelSpec("_fwd_split_kernel", dtype, dict(
                fwd, PHASE=0, PREV=2, PERSIST=True), cfg.num_warps)
            # Backward units (STAGE, HAS_NEXT, HAS_CUR): the last step, the middle steps,
            # the dh0 unit; then the persistent launch (which holds all three).
            bwd = dict(RESET_AFTER=ra, HAS_H0=h0, DOT_PREC=prec, **blocks)
            stages = [(0, True, True), (0, False, True), (0, True, False)]
            if not ra:
                stages.append((1, False, True))
            if level != "all":
                stages = [s for s in stages if s != (0, False, True)]
            if level == "ci":
                stages = [s for s in stages if s != (0, True, False)]
            for stage, has_next, has_cur in stages:
                yield KernelSpec("_bwd_split_kernel", dtype, dict(
                    bwd, STAGE=stage, HAS_NEXT=has_next, HAS_CUR=has_cur, PERSIST=False),
                    cfg.num_warps)
            yield KernelSpec("_bwd_split_kernel", dtype, dict(
                bwd, STAGE=0, HAS_NEXT=True, HAS_CUR=True, PERSIST=True), cfg.num_warps)


def _attrs(fn, signature, target):
    """Pointer alignment (16 bytes), as the JIT specialises real torch tensors; None where
    this triton has no such hook (the compile is then of the unaligned variant)."""
    try:
        from triton.compiler.compiler import make_backend

        backend = make_backend(target)
        d = backend.parse_attr("D")
    except Exception:  # noqa: BLE001 - API differences between triton versions
        return None
    return {(i,): d for i, (name, ty) in enumerate(signature.items()) if ty.startswith("*")}


def _cuobjdump_usage(cubin: bytes):
    """(registers, spill bytes) of a cubin, or (None, None) if cuobjdump cannot run.

    Spill bytes: the stack frame plus local memory (cuobjdump's STACK + LOCAL).  ptxas puts
    register spills in the stack frame (its "N bytes stack frame, N bytes spill stores"),
    not in LOCAL, and Triton kernels have nothing else there (no local arrays, no calls
    with a stack ABI): a frame is a spill."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                        "cuobjdump")
    if not os.path.exists(tool):
        return None, None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        try:
            out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True,
                                 timeout=60).stdout
        except (OSError, subprocess.SubprocessError):
            return None, None
    reg = re.search(r"REG:(\d+)", out)
    local = re.search(r"LOCAL:(\d+)", out)
    stack = re.search(r"STACK:(\d+)", out)
    if local is None and stack is None:
        return (int(reg.group(1)) if reg else None, None)
    spill = sum(int(m.group(1)) for m in (local, stack) if m)
    return (int(reg.group(1)) if reg else None, spill)


def _sass(cubin: bytes) -> Optional[str]:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                        "cuobjdump")
    if not os.path.exists(tool):
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        try:
            return subprocess.run([tool, "-sass", f.name], capture_output=True, text=True,
                                  timeout=120).stdout
        except (OSError, subprocess.SubprocessError):
            return None


def instruction_counts(sass: str) -> Dict[str, int]:
    """Per opcode (without its modifiers), how many SASS instructions a kernel has: the
    tensor-core products (HMMA), the fp32 FMAs, local-memory traffic (LDL / STL) ..."""
    counts: Dict[str, int] = {}
    for m in re.finditer(r"^\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)",
                         sass, re.M):
        counts[m.group(1)] = counts.get(m.group(1), 0) + 1
    return counts


def barrier_facts(ptx: str, sass: Optional[str]) -> Dict[str, Optional[int]]:
    """What the grid barrier of a persistent kernel compiled to: its release adds and
    acquire loads (PTX; each must be issued by one thread, so predicated), and in the SASS
    the GPU-scope fences before the adds and the L1 invalidations (CCTL.IVALL) after the
    acquire loads, which let plain loads read what other SMs wrote."""
    lines = ptx.splitlines()
    rel = [l for l in lines if re.search(r"atom\.global\.gpu\.release\.add", l)]
    acq = [l for l in lines if re.search(r"ld\.global\.gpu\.acquire", l)]
    return {
        "release_adds": len(rel),
        "acquire_loads": len(acq),
        "unpredicated": sum(not l.strip().startswith("@") for l in rel + acq),
        "membar_gpu": None if sass is None else len(re.findall(r"MEMBAR\.\w*\.?GPU", sass)),
        "cctl_ivall": None if sass is None else sass.count("CCTL.IVALL"),
    }


def compile_spec(spec: KernelSpec, arch: int = 90, dump: Optional[str] = None) -> KernelSpec:
    """Compiles ``spec`` for sm_<arch>; fills shared memory, registers and spills.

    dump: a folder to write the kernel's TTGIR, PTX and SASS into (<label>.ttgir ...), and
    its SASS instruction counts into spec.extra["sass_counts"].
    Raises on a lowering error; the caller checks spec.shared against SHARED_LIMIT[arch].
    """
    from triton.backends.compiler import GPUTarget

    fn = getattr(_jit_module(), spec.kernel)
    target = GPUTarget("cuda", arch, 32)
    sig = _signature(spec.kernel, spec.dtype, spec.constexprs.get("SEQ", 0))
    kwargs = {}
    attrs = _attrs(fn, sig, target)
    if attrs is not None:
        kwargs["attrs"] = attrs
    src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=dict(spec.constexprs),
                                    **kwargs)
    options = {"num_warps": spec.num_warps}
    if spec.constexprs.get("PERSIST"):
        # As the launcher passes it (a launch attribute; a misspelt option fails here).
        options[_gru_loaded.COOPERATIVE_LAUNCH] = True
    compiled = triton.compile(src, target=target, options=options)
    md = compiled.metadata
    spec.shared = int(md.shared if hasattr(md, "shared") else md["shared"])
    spec.registers, spec.spill_bytes = _cuobjdump_usage(compiled.asm["cubin"])
    if dump is not None:
        os.makedirs(dump, exist_ok=True)
        stem = os.path.join(dump, re.sub(r"[^A-Za-z0-9_.=,-]+", "_", spec.label))
        sass = _sass(compiled.asm["cubin"])
        for ext, text in (("ttgir", compiled.asm.get("ttgir")), ("ptx", compiled.asm["ptx"]),
                          ("sass", sass)):
            if text is not None:
                with open(f"{stem}.{ext}", "w") as f:
                    f.write(text)
        if sass is not None:
            spec.extra["sass_counts"] = instruction_counts(sass)
    if spec.constexprs.get("PERSIST"):
        spec.extra["barrier"] = barrier_facts(compiled.asm["ptx"], _sass(compiled.asm["cubin"]))
        spec.extra["cooperative"] = bool(getattr(md, _gru_loaded.COOPERATIVE_LAUNCH))
    return spec


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--level", default="all", choices=("all", "cover", "ci"),
                    help="which configurations (see dispatch_specs)")
    ap.add_argument("--dtypes", default="fp32,fp16,bf16", help="comma-separated subset")
    ap.add_argument("--json", help="also write the rows to this file")
    ap.add_argument("--precisions", default=None,
                    help="comma-separated DOT_PREC subset (ieee,tf32,tf32x3; default all)")
    ap.add_argument("--dump", default=None,
                    help="write each kernel's TTGIR / PTX / SASS into this folder")
    args = ap.parse_args(argv)
    rows, bad = [], 0
    print(f"sm_{args.arch}, triton {triton.__version__}, shared limit "
          f"{SHARED_LIMIT[args.arch]} bytes")
    print(f"{'configuration':100s} {'shared':>8s} {'regs':>5s} {'spill':>6s}")
    dtypes = set(args.dtypes.split(","))
    for spec in dispatch_specs(args.level):
        if _TY[spec.dtype] not in dtypes:
            continue
        if args.precisions and spec.constexprs["DOT_PREC"] not in args.precisions.split(","):
            continue
        try:
            compile_spec(spec, args.arch, args.dump)
        except Exception as exc:  # noqa: BLE001 - reported per configuration, then fails
            bad += 1
            rows.append({"label": spec.label, "error": f"{type(exc).__name__}: {exc}"})
            print(f"{spec.label:100s} LOWERING ERROR {type(exc).__name__}: {exc}")
            continue
        over = spec.shared > SHARED_LIMIT[args.arch]
        spills = bool(spec.spill_bytes)
        bad += over
        rows.append({"label": spec.label, "kernel": spec.kernel, "dtype": _TY[spec.dtype],
                     "constexprs": {k: v for k, v in spec.constexprs.items()},
                     "num_warps": spec.num_warps, "shared": spec.shared,
                     "registers": spec.registers, "spill_bytes": spec.spill_bytes,
                     "over_limit": bool(over), **spec.extra})
        print(f"{spec.label:100s} {spec.shared:8d} {spec.registers!s:>5s} "
              f"{spec.spill_bytes!s:>6s}{'  OVER LIMIT' if over else ''}"
              f"{'  SPILLS' if spills else ''}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"arch": args.arch, "triton": triton.__version__,
                       "shared_limit": SHARED_LIMIT[args.arch], "rows": rows}, f, indent=1)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
