#!/usr/bin/env bash
# Rebuilds gpu-carry/ from scratch on a CPU machine: what benchmarks/gpu_run.sh takes along
# to the GPU machine (one H200, CPython 3.12, torch 2.11.0+cu130, triton 3.6.0, no
# internet) so that it spends no GPU time building or compiling what a CPU can.
#
#   bash benchmarks/prepare_gpu_carry.sh            (repo root as cwd; ~25 min on 2 cores)
#   SKIP_EXT=1 / SKIP_TRITON=1                      redo only the other part
#
# gpu-carry/ (ignored through .git/info/exclude; never committed; < 64 MiB with the tree):
#   _C.cpython-312-x86_64-linux-gnu.so  fusedgru._C built against torch 2.11.0+cu130 for
#                                       cp312, sm_90 only, from a clean clone of HEAD
#   triton-cache.tar.xz                 TRITON_CACHE_DIR filled by benchmarks/gpu_specs.py
#                                       --warm: every Triton specialisation the run
#                                       launches, compiled by triton 3.6's own JIT path
#                                       (warmup) for sm_90, keys as the runtime's
#   triton-specs.json                   what was compiled, with compile times
#   csrc.sha256                         hash of the sources the .so was built from
#   coop_check                          benchmarks/coop_check.cu built for sm_90 (the
#                                       first-minute cooperative-launch check)
#   MANIFEST.txt                        commit, versions, sizes, sha256 of each file
#
# Needs: /usr/local/cuda (nvcc 13.0) and a Python 3.12 venv with torch 2.11.0 (PyPI's is
# cu130) and triton 3.6.0 at $VENV (default /tmp/venv211); made if missing (PyPI).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
VENV="${VENV:-/tmp/venv211}"
PY312="${PY312:-/root/.pyenv/versions/3.12.1/bin/python3.12}"
CARRY="$ROOT/gpu-carry"
T0=$(date +%s)
say() { echo "[prepare_gpu_carry +$(($(date +%s) - T0))s] $*"; }

grep -qx '/gpu-carry/' .git/info/exclude 2>/dev/null || {
  mkdir -p .git/info && echo '/gpu-carry/' >>.git/info/exclude; }
mkdir -p "$CARRY"

if [ ! -x "$VENV/bin/python" ]; then
  say "making $VENV (torch 2.11.0 cu130, triton 3.6.0, Python 3.12)"
  "$PY312" -m venv "$VENV"
  "$VENV/bin/pip" install -q torch==2.11.0 triton==3.6.0 numpy pytest pytest-benchmark \
    ninja setuptools wheel tqdm matplotlib
fi
"$VENV/bin/python" -c "import torch, triton, sys; assert torch.__version__.startswith('2.11.0'), torch.__version__; assert triton.__version__ == '3.6.0'; assert sys.version_info[:2] == (3, 12); print('venv:', sys.version.split()[0], torch.__version__, torch.version.cuda, triton.__version__)"

COMMIT="$(git rev-parse HEAD)"
if [ "${SKIP_EXT:-0}" != 1 ]; then
  # A clean clone of HEAD: the build sees committed sources only, and its objects cannot
  # mix with the checkout's own build/ (made against torch 2.14 / cp311).
  SRC="$(mktemp -d /tmp/fusedgru-carry-XXXX)"
  git clone -q "$ROOT" "$SRC/repo"
  say "building fusedgru._C for sm_90 against torch 2.11 / cp312 in $SRC/repo"
  (cd "$SRC/repo" && CUDA_HOME=/usr/local/cuda TORCH_CUDA_ARCH_LIST=9.0 \
     MAX_JOBS="$(nproc)" "$VENV/bin/python" setup.py -q build_ext --inplace >"$SRC/build.log" 2>&1) \
    || { tail -40 "$SRC/build.log"; exit 1; }
  so="$(ls "$SRC"/repo/fusedgru/_C.cpython-312-*.so)"
  strip --strip-debug -o "$CARRY/$(basename "$so")" "$so"
  # It must load under that torch and register CUDA kernels (no GPU needed for either).
  (cd "$SRC/repo" && "$VENV/bin/python" -c "
import torch, fusedgru._C
assert torch._C._dispatch_has_kernel_for_dispatch_key('fusedgru::gru_fwd', 'CUDA')
assert torch._C._dispatch_has_kernel_for_dispatch_key('fusedgru::gru_infer', 'CUDA')
print('fusedgru._C (cp312, torch', torch.__version__, ') loads, CUDA kernels registered')")
  # sm_90 only (cuobjdump as triton ships it: the CUDA image here has none)
  "$VENV/bin/python" -c "import os, triton; print(os.path.join(os.path.dirname(triton.__file__), 'backends', 'nvidia', 'bin', 'cuobjdump'))" \
    | xargs -I{} {} --list-elf "$CARRY/$(basename "$so")" | sed 's/.*\.\(sm_[0-9a-z]*\)\..*/\1/' | sort | uniq -c
  # what it was built from: gpu_run.sh uses it only where the tree's sources hash the same
  (cd "$SRC/repo" && cat csrc/*.cu csrc/*.cuh csrc/*.cpp csrc/*.h csrc/build_config.py setup.py \
     | sha256sum | cut -d' ' -f1) >"$CARRY/csrc.sha256"
  rm -rf "$SRC"
  say "extension done"
  /usr/local/cuda/bin/nvcc -O2 -arch=sm_90 -o "$CARRY/coop_check" benchmarks/coop_check.cu
  say "coop_check built"
fi

if [ "${SKIP_TRITON:-0}" != 1 ]; then
  say "compiling every Triton specialisation of the run for sm_90 (triton 3.6, JIT warmup)"
  CACHE="$(mktemp -d /tmp/fusedgru-triton-cache-XXXX)"
  env -u TRITON_INTERPRET TRITON_CACHE_DIR="$CACHE" PYTHONPATH="$ROOT" \
    "$VENV/bin/python" benchmarks/gpu_specs.py --warm --jobs "$(nproc)" \
    --json "$CARRY/triton-specs.json"
  # every compiled kernel within sm_90's shared memory (the load would fail on the GPU)
  "$VENV/bin/python" - "$CACHE" <<'PYEOF'
import glob, json, sys
rows = [json.load(open(f)) for f in glob.glob(sys.argv[1] + "/*/*.json") if "__grp__" not in f]
rows = [r for r in rows if "shared" in r]
over = [r["name"] for r in rows if r["shared"] > 232448]
print(f"{len(rows)} kernels, shared memory at most {max(r['shared'] for r in rows)} of 232448 bytes")
sys.exit(1 if over else 0)
PYEOF
  tar -C "$CACHE" -cJf "$CARRY/triton-cache.tar.xz" .
  rm -rf "$CACHE"
  say "triton cache done"
fi

{
  echo "commit $COMMIT"
  echo "made $(date -u +%FT%TZ) in $(($(date +%s) - T0)) s"
  "$VENV/bin/python" -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__)"
  (cd "$CARRY" && for f in *; do [ "$f" = MANIFEST.txt ] || echo "$(stat -c %s "$f") $(sha256sum "$f")"; done)
} >"$CARRY/MANIFEST.txt"
cat "$CARRY/MANIFEST.txt"
du -sh "$CARRY"
say "done"
