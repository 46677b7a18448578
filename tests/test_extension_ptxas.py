"""The CUDA kernels' resource report from ptxas for sm_90 (and sm_80): no register spills and
no local-memory stack in any kernel of csrc/gru_cuda.cu (device code in gru_kernels.cuh),
the persistent ones above all (a spill inside the time loop costs a local-memory round trip
on every step).

Compiles the .cu source to a cubin with `nvcc -Xptxas=-v` (device code only, C++20 as torch
builds extensions; the code itself is C++17).  The report is cached under
build/ by source hash, so only the first run after an edit pays for the compile (~1-3 min on
2 cores).  Runs without a GPU; skips only when nvcc or the CUDA headers of torch are missing.
"""

import hashlib
import os
import re
import shutil
import subprocess
import sysconfig

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SRC = os.path.join(ROOT, "csrc", "gru_cuda.cu")


def _nvcc():
    from torch.utils.cpp_extension import CUDA_HOME

    cand = [os.path.join(CUDA_HOME, "bin", "nvcc")] if CUDA_HOME else []
    cand.append(shutil.which("nvcc"))
    return next((c for c in cand if c and os.path.exists(c)), None)


def _include_dirs():
    from torch.utils import cpp_extension

    try:
        dirs = cpp_extension.include_paths(device_type="cuda")
    except TypeError:  # older signature
        dirs = cpp_extension.include_paths(cuda=True)
    return dirs + [os.path.join(ROOT, "csrc"), sysconfig.get_paths()["include"]]


def ptxas_report(arch: str) -> str:
    return _compile(arch)[0]


def _compile(arch: str):
    """(ptxas report, path of the cubin), cached by source hash."""
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (set CUDA_HOME): cannot read the ptxas report")
    if torch.version.cuda is None:
        pytest.skip("torch is a CPU-only build: no CUDA headers to compile against")
    h = hashlib.sha256()
    # The .cu file and the headers it includes from csrc/ (the kernels live in gru_kernels.cuh).
    for name in ("gru_cuda.cu", "gru_common.h", "gru_kernels.cuh"):
        with open(os.path.join(ROOT, "csrc", name), "rb") as f:
            h.update(f.read())
    key = hashlib.sha256(h.digest() + arch.encode() + torch.__version__.encode()).hexdigest()[:16]
    cache = os.path.join(ROOT, "build", f"ptxas-{arch}-{key}.txt")
    out = cache + ".cubin"
    if os.path.exists(cache) and os.path.exists(out):
        with open(cache) as f:
            return f.read(), out
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    cmd = [nvcc, "-cubin", f"-arch={arch}", "-O3", "-Xptxas=-v", "-std=c++20",
           "--expt-relaxed-constexpr", "-DFUSEDGRU_WITH_CUDA=1",
           "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
           "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
           *[f"-I{d}" for d in _include_dirs()], SRC, "-o", out]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, f"nvcc failed:\n{r.stderr[-4000:]}"
    with open(cache, "w") as f:
        f.write(r.stderr)
    return r.stderr, out


def parse(report: str):
    """{kernel (demangled-ish name): {'registers', 'stack', 'spill_stores', 'spill_loads'}}"""
    kernels, cur = {}, None
    for line in report.splitlines():
        m = re.search(r"Compiling entry function '(\w+)'", line)
        if m:
            cur = m.group(1)
            kernels[cur] = {}
            continue
        if cur is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads",
                      line)
        if m:
            kernels[cur].update(stack=int(m.group(1)), spill_stores=int(m.group(2)),
                                spill_loads=int(m.group(3)))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            kernels[cur]["registers"] = int(m.group(1))
    return kernels


@pytest.mark.parametrize("arch", ["sm_90", "sm_80"])
def test_no_spills_no_stack(arch):
    if arch == "sm_80" and os.environ.get("FUSEDGRU_PTXAS_ALL_ARCHS") != "1":
        pytest.skip("sm_80 checked only with FUSEDGRU_PTXAS_ALL_ARCHS=1 (the build log has it)")
    kernels = parse(ptxas_report(arch))
    persistent = [k for k in kernels if "persistent" in k]
    # fwd + bwd x (bf16, fp16, fp32 TF32, fp32 3xTF32, fp32 FMA, fp64)
    assert len(persistent) == 12, sorted(kernels)
    assert len(kernels) == 24, sorted(kernels)
    bad = {k: v for k, v in kernels.items()
           if v.get("stack", 1) or v.get("spill_stores", 1) or v.get("spill_loads", 1)}
    assert not bad, f"spills or stack in: {bad}"
    for k, v in kernels.items():
        assert v["registers"] <= 255, (k, v)


def sass_ops(arch: str):
    """{kernel (mangled name): Counter of SASS opcodes} from cuobjdump of the cubin."""
    import collections

    cand = [os.path.join(os.path.dirname(_nvcc()), "cuobjdump"), shutil.which("cuobjdump")]
    try:  # the copy Triton ships
        import triton.backends.nvidia as tn

        cand.append(os.path.join(os.path.dirname(tn.__file__), "bin", "cuobjdump"))
    except ImportError:
        pass
    cuobjdump = next((c for c in cand if c and os.path.exists(c)), None)
    if cuobjdump is None:
        pytest.skip("cuobjdump not found (next to nvcc, on PATH, or in Triton)")
    r = subprocess.run([cuobjdump, "-sass", _compile(arch)[1]], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    parts = re.split(r"\n\s*Function : (\S+)\n", r.stdout)
    return {parts[i]: collections.Counter(re.findall(
        r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", parts[i + 1]))
        for i in range(1, len(parts), 2)}


def test_staged_step_compiles_to_cp_async():
    """Step variant 1 (fusedgru::_set_cuda_step_variant(1), stage_a in gru_kernels.cuh):
    every kernel copies its A operand to shared memory with cp.async (LDGSTS) and waits for
    it (LDGDEPBAR + DEPBAR) on sm_90, not with a synchronous fallback copy."""
    ops = sass_ops("sm_90")
    assert len(ops) == 24, sorted(ops)
    bad = {k: (v["LDGSTS"], v["LDGDEPBAR"], v["DEPBAR"]) for k, v in ops.items()
           if not (v["LDGSTS"] and v["LDGDEPBAR"] and v["DEPBAR"])}
    assert not bad, f"no cp.async staging in: {bad}"
