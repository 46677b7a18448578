#!/usr/bin/env bash
# The first-contact GPU run: one call of at most 8 minutes, most telling steps first.
#
#   OUT=/some/dir [FUSEDGRU_COMMIT=<sha>] bash benchmarks/gpu_run.sh       (repo root as cwd)
#   bash benchmarks/gpu_run.sh --dry-run        no GPU: the same steps' plumbing on the CPU
#
# The device tool call (benchmarks/NOTES-gpu-run.md; make gpu-carry/ first with
# `bash benchmarks/prepare_gpu_carry.sh`, ~25 min on 2 CPU cores, no GPU):
#
#   run(command="FUSEDGRU_COMMIT=<git rev-parse HEAD> bash benchmarks/gpu_run.sh",
#       carry=["gpu-carry"], timeout_s=540)
#
# then give_back() unless a second, shorter run follows at once (GPU_RUN_BUDGET=200 and
# GPU_RUN_STEPS=coop,install,smoke,pytest-gpu re-check what the first run fixed).
#
# Order (what a first contact must learn first), with the predicted time of each step on
# the H200 machine (16 cores) when gpu-carry/ is there, and without it:
#
#   step          what                                                  carry   no carry
#   env           nvidia-smi, versions                                     3 s        3 s
#   coop          FIRST MINUTE: a cooperative grid larger than fits must     10 s       25 s
#                 fail with an error, not hang (coop_check.cu / .py, under
#                 timeout); a fitting one must pass a grid barrier
#   install       the carried fusedgru._C (cp312, torch 2.11, sm_90) if it   15 s       75 s
#                 imports, else pip install -e . (nvcc, 16 jobs, 40-60 s);
#                 the carried Triton cache (gpu_specs.py keys) unpacked
#   triton-warm   gpu_specs.py --warm -j 14: with the carried cache every    10 s       35 s
#                 key is found; without, 224 specialisations compile in
#                 parallel (1-3.5 s each on one core)
#   info, check   (a) smoke: fusedgru info; fusedgru check on cuda and       35 s       35 s
#                 triton (float64/32, bf16, fp16, both formulations)
#   pytest-gpu    (b) GPU parity tests, first-contact subset (233 of 433),   90 s       90 s
#                 pytest-xdist -n 8 (tests/test_triton_gpu.py,
#                 tests/test_extension_gpu.py)
#   memcheck,     (c) compute-sanitizer on 2 small cases per GPU backend     75 s       75 s
#   racecheck     (sanitize_cases.py --first-contact), the two in parallel
#   stream        (d) fusedgru bench --grid stream (B 1..64, H 256..1024,   150 s      150 s
#                 T 1024; fp32, bf16; inference, train) vs nn.GRU
#   step-variants (e) the rest, while time is left: the cuda step variants  (what is left of
#   ecosystem,    0..3 (issue 18, benchmarks/step_variants.py, ~20 s),        the budget)
#   large-h,      ecosystem GPU tests, large-H strategies, batch/deep/d2l
#   bench-rest,   grids, torch.compile reference
#   bench-compile
#                                                       predicted (a)-(d):  ~390 s     ~490 s
#
# Without the carry (a)-(d) do not all fit: the stream grid is cut by its time budget.
# The prediction is printed at the end of every run (dry runs too) beside the measured
# times.  Every step's limit is cut to what is left of GPU_RUN_BUDGET (default 480 s); a
# failing or timed-out step is recorded and the next one runs; the summary is printed last.
# FUSEDGRU_COMMIT: the tree copied to the device machine may have no .git; pass the commit.
# GPU_RUN_STEPS: a comma-separated subset of the step names above (default: all).
#
# Files written under $OUT (at most 8, at most 2 folders deep):
#   summary.json          every step's exit status and time, test and sanitizer verdicts,
#                         the benchmark's speed-ups per provider, Triton cache hits
#   run.log               everything every step printed (install, tests, benchmark tables)
#   sanitizer.log         compute-sanitizer memcheck and racecheck reports
#   results.json          `fusedgru bench` rows of the stream grid
#   speedup.png           speed-up vs nn.GRU against batch size (stream grid)
#   step_variants.json    the cuda backend's step variants 0..31 vs nn.GRU (if time)
#   large_h.json          the Triton large-H strategies against nn.GRU (if time)
#   rest/results.json     batch, deep, d2l grids, then the reference under torch.compile
set -u -o pipefail
cd "$(dirname "$0")/.."

DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; fi
OUT="${OUT:-$PWD/gpu-out}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
PY="${PYTHON:-python3}"
BUDGET="${GPU_RUN_BUDGET:-480}"
ONLY=",${GPU_RUN_STEPS:-all},"
CARRY="$PWD/gpu-carry"
START=$(date +%s)
LOG="$OUT/run.log"
SAN="$OUT/sanitizer.log"
WORK="$(mktemp -d)"
STEPS="$WORK/steps.tsv"
: >"$STEPS"
: >"$LOG"
: >"$SAN"
export PYTHONUNBUFFERED=1
if [ -z "${FUSEDGRU_COMMIT:-}" ] && git rev-parse HEAD >/dev/null 2>&1; then
  FUSEDGRU_COMMIT="$(git rev-parse HEAD)"
fi
export FUSEDGRU_COMMIT="${FUSEDGRU_COMMIT:-unknown}"
NCPU="$(nproc)"

# Predicted seconds per step on the H200 machine (header table): with the carry, without.
declare -A PRED_CARRY=([env]=3 [coop]=10 [install]=15 [triton-warm]=10 [info]=10 [check]=25
  [pytest-gpu]=90 [memcheck]=75 [racecheck]=0 [stream]=150)
declare -A PRED_BARE=([env]=3 [coop]=25 [install]=75 [triton-warm]=35 [info]=10 [check]=25
  [pytest-gpu]=90 [memcheck]=75 [racecheck]=0 [stream]=150)

elapsed() { echo $(($(date +%s) - START)); }
log() { echo "[gpu_run +$(elapsed)s] $*" | tee -a "$LOG"; }
wanted() { [ "$ONLY" = ",all," ] || [[ "$ONLY" == *",$1,"* ]]; }

# run_step NAME CAP RESERVE FILE CMD...: CMD's output goes to FILE; its limit is CAP seconds
# or what is left of the budget once RESERVE seconds are kept for the steps after it.
run_step() {
  local name=$1 cap=$2 reserve=$3 file=$4
  shift 4
  if ! wanted "$name"; then return 0; fi
  local left=$((BUDGET - $(elapsed) - reserve))
  local t=$((cap < left ? cap : left))
  if [ "$t" -lt 5 ]; then
    log "SKIP $name: out of time"
    printf '%s\tskipped\t0\tout of time\n' "$name" >>"$STEPS"
    return 0
  fi
  log "RUN  $name (limit ${t}s): $*"
  echo "===== step $name: $* =====" >>"$file"
  local t0 rc dt note=""
  t0=$(date +%s)
  timeout --kill-after=10 "$t" "$@" >>"$file" 2>&1
  rc=$?
  dt=$(($(date +%s) - t0))
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then note="timed out after ${t}s"; fi
  log "DONE $name rc=$rc ${dt}s $note"
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$dt" "$note" >>"$STEPS"
  return 0
}

skip_step() {
  if ! wanted "$1"; then return 0; fi
  log "SKIP $1: $2"
  printf '%s\tskipped\t0\t%s\n' "$1" "$2" >>"$STEPS"
}

log "fusedgru GPU run: out=$OUT dry_run=$DRY budget=${BUDGET}s commit=$FUSEDGRU_COMMIT cores=$NCPU"

# --- env ------------------------------------------------------------------------------
if [ "$DRY" = 1 ]; then
  run_step env 30 450 "$LOG" "$PY" -c "import torch, sys; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda)"
else
  run_step env 30 450 "$LOG" bash -c "nvidia-smi; nvcc --version | tail -2; \"$PY\" -c \"import torch, triton, sys; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version(), 'triton', triton.__version__)\""
fi
if [ -z "${CUDA_HOME:-}" ] && [ -d /usr/local/cuda ]; then export CUDA_HOME=/usr/local/cuda; fi
export PATH="${CUDA_HOME:-/usr/local/cuda}/bin:$PATH"

# --- coop: the first minute --------------------------------------------------------------
# A cooperative launch of more blocks than fit must be REFUSED (the persistent kernels'
# grid barriers rely on it); each half under its own timeout so a hang costs 30 s, not the
# run.  The carried binary first, else built here (nvcc, ~10 s).
if [ "$DRY" = 1 ]; then
  run_step coop 30 440 "$LOG" bash -c "test -f benchmarks/coop_check.cu && \"$PY\" -m py_compile benchmarks/coop_check.py && echo 'coop: sources present (the check needs a GPU)'"
else
  run_step coop 60 440 "$LOG" bash -c "
    bin=\"$CARRY/coop_check\"
    if ! { [ -x \"\$bin\" ] && timeout 30 \"\$bin\"; }; then
      echo 'coop: carried binary missing or failed to run; building it here'
      nvcc -O2 -arch=sm_90 -o \"$WORK/coop_check\" benchmarks/coop_check.cu && timeout 30 \"$WORK/coop_check\" || exit 1
    fi
    timeout 30 \"$PY\" benchmarks/coop_check.py"
fi

# --- install -----------------------------------------------------------------------------
# The carried fusedgru._C (built on a CPU machine against torch 2.11.0+cu130 for cp312 and
# sm_90 by prepare_gpu_carry.sh) if it loads with CUDA kernels under this python, else a
# build here.  The package itself is installed editable without building (FUSEDGRU_NO_EXT).
SO="$(ls "$CARRY"/_C.cpython-*.so 2>/dev/null | head -1)"
SRC_HASH="$(cat csrc/*.cu csrc/*.cuh csrc/*.cpp csrc/*.h csrc/build_config.py | sha256sum | cut -d' ' -f1)"
if [ -n "$SO" ] && [ "$(cat "$CARRY/csrc.sha256" 2>/dev/null)" != "$SRC_HASH" ]; then
  log "install: the carried fusedgru._C was built from other sources than this tree's; building"
  SO=""
fi
if [ "$DRY" = 1 ]; then
  run_step install 30 420 "$LOG" bash -c "\"$PY\" -m pip --version; ls -la \"$CARRY\" 2>/dev/null || echo 'no gpu-carry/ (prepare_gpu_carry.sh makes it)'"
else
  run_step install 150 360 "$LOG" bash -c "
    ok=0
    if [ -n \"$SO\" ]; then
      cp \"$SO\" fusedgru/ && FUSEDGRU_NO_EXT=1 \"$PY\" -m pip install -q --no-build-isolation --no-deps -e . \
        && \"$PY\" -c 'import torch, fusedgru.extension as e; assert e.load_error() is None, e.load_error(); assert e.cuda_backend.unavailable_reason() is None, e.cuda_backend.unavailable_reason(); print(\"install: carried fusedgru._C loads, cuda backend available\")' \
        && ok=1
      [ \$ok = 1 ] || { echo 'install: the carried .so does not load here; building'; rm -f fusedgru/\$(basename \"$SO\"); }
    fi
    if [ \$ok = 0 ]; then
      TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=$NCPU \"$PY\" -m pip install --no-build-isolation --no-deps -v -e . || exit 1
    fi"
fi

# The Triton cache: the carried one (every specialisation of the run, keyed as the runtime
# keys them: benchmarks/NOTES-gpu-run.md), else filled here in parallel before the steps
# that need it.  Outside the tree (94 MB unpacked: a dry run must not leave it where the
# next device call would carry it) and removed at the end.
export TRITON_CACHE_DIR="$WORK/triton-cache"
mkdir -p "$TRITON_CACHE_DIR"
if [ -f "$CARRY/triton-cache.tar.xz" ]; then
  tar -C "$TRITON_CACHE_DIR" -xJf "$CARRY/triton-cache.tar.xz" && HAVE_CACHE=1 || HAVE_CACHE=0
else
  HAVE_CACHE=0
fi
ncache() { find "$TRITON_CACHE_DIR" -name '__grp__*' 2>/dev/null | wc -l; }
CACHE0=$(ncache)
log "Triton cache: $CACHE0 kernels carried (TRITON_CACHE_DIR=$TRITON_CACHE_DIR)"
# Always run: with the carried cache every key is found (nothing compiles, ~10 s); if the
# keys differ here after all (another triton build), the misses compile in parallel now
# instead of one by one inside the steps below.  The log says how many compiled.
if [ "$DRY" = 1 ]; then
  run_step triton-warm 60 340 "$LOG" env -u TRITON_INTERPRET "$PY" benchmarks/gpu_specs.py \
    --parts check,tests,sanitize,stream
else
  run_step triton-warm 90 330 "$LOG" env -u TRITON_INTERPRET "$PY" benchmarks/gpu_specs.py \
    --warm --jobs $((NCPU > 2 ? NCPU - 2 : 1)) --parts check,tests,sanitize,stream
  log "Triton cache after triton-warm: $(ncache) kernels ($(( $(ncache) - CACHE0 )) compiled here)"
fi

# --- (a) smoke ---------------------------------------------------------------------------
run_step info 40 320 "$LOG" "$PY" -m fusedgru info
if [ "$DRY" = 1 ]; then
  run_step check 120 300 "$LOG" "$PY" -m fusedgru check --backends cpu reference
else
  run_step check 70 300 "$LOG" "$PY" -m fusedgru check --backends cuda triton
fi

# --- (b) GPU parity tests (first-contact subset; --gpu-exhaustive is the full sweep) ------
XDIST=""
if "$PY" -c "import xdist" 2>/dev/null; then XDIST="-n $((NCPU >= 16 ? 8 : 2))"; fi
if [ "$DRY" = 1 ]; then
  # collection only: the GPU tests skip here, each with its reason
  run_step pytest-gpu 120 280 "$LOG" "$PY" -m pytest -q -p no:cacheprovider -m gpu -rs \
    tests/test_triton_gpu.py tests/test_extension_gpu.py
else
  run_step pytest-gpu 150 240 "$LOG" "$PY" -m pytest -q -p no:cacheprovider -m gpu $XDIST \
    tests/test_triton_gpu.py tests/test_extension_gpu.py
fi

# --- (c) compute-sanitizer: two small cases per GPU backend, memcheck and racecheck at once -
SANITIZER="$(command -v compute-sanitizer || true)"
if [ "$DRY" = 1 ]; then
  # no GPU: the driver alone, on the CPU backends (the sanitizer needs a GPU)
  run_step memcheck 120 200 "$SAN" env TRITON_INTERPRET=1 "$PY" benchmarks/sanitize_cases.py \
    --device cpu --first-contact
  skip_step racecheck "dry run"
elif [ -n "$SANITIZER" ]; then
  # Without the caching allocator each tensor is its own allocation: an out-of-bounds
  # access is caught at its tensor's edge, not inside a cached block.
  : >"$WORK/racecheck.log"
  run_step racecheck 110 170 "$WORK/racecheck.log" "$SANITIZER" --tool racecheck \
    --error-exitcode 9 --print-limit 50 "$PY" benchmarks/sanitize_cases.py --first-contact &
  RACE_PID=$!
  run_step memcheck 110 170 "$SAN" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" \
    --tool memcheck --error-exitcode 9 --print-limit 50 "$PY" benchmarks/sanitize_cases.py \
    --first-contact
  wait "$RACE_PID"
  cat "$WORK/racecheck.log" >>"$SAN"
else
  skip_step memcheck "compute-sanitizer not found"
  skip_step racecheck "compute-sanitizer not found"
fi

# --- (d) the stream grid against nn.GRU -------------------------------------------------
# Providers: every fusedgru backend of the table that runs CUDA float32 (not the reference,
# a correctness tool on a GPU).  Cells stop starting 20 s before the step's own limit.
if [ "$DRY" = 1 ]; then BENCH_DEVICE=cpu; else BENCH_DEVICE=cuda; fi
BACKS="$(BENCH_DEVICE=$BENCH_DEVICE "$PY" - <<'PYEOF' 2>/dev/null
import os, torch
from fusedgru import backends
dev = os.environ["BENCH_DEVICE"]
names = []
for name in backends.BACKENDS:
    if backends.backend_status()[name] is not None:
        continue
    if name == "reference" and dev == "cuda":
        continue
    if name == "triton" and dev == "cpu":  # the interpreter: not a fast path
        continue
    if backends.get_backend(name).unsupported_reason(dev, torch.float32) is None:
        names.append(name)
print(",".join(names))
PYEOF
)"
log "benchmark providers besides nn.GRU: ${BACKS:-none}"
if [ "$DRY" = 1 ]; then
  run_step stream 120 60 "$LOG" "$PY" -m fusedgru.bench --grid tiny --device cpu --threads 1 \
    --backends "${BACKS:-nn.GRU}" --out "$OUT" --no-progress --time-budget 60
else
  TB=$((BUDGET - $(elapsed) - 60 - 20))
  run_step stream 200 60 "$LOG" "$PY" -m fusedgru.bench --grid stream \
    --backends "${BACKS:-nn.GRU}" --out "$OUT" --no-progress --time-budget "$TB"
fi

# --- (e) the rest, while time is left ---------------------------------------------------
# First the step variants of issue 18 (old and new persistent step side by side).
if [ "$DRY" = 1 ]; then
  run_step step-variants 60 20 "$LOG" "$PY" benchmarks/step_variants.py --dry-run \
    --out "$OUT/step_variants.json"
else
  run_step step-variants 60 30 "$LOG" "$PY" benchmarks/step_variants.py \
    --out "$OUT/step_variants.json" --time-budget 40
fi
if [ "$DRY" = 1 ]; then
  run_step ecosystem 60 20 "$LOG" "$PY" -m pytest -q -p no:cacheprovider -m gpu -rs \
    tests/test_ecosystem_gpu.py
  skip_step large-h "needs a GPU (benchmarks/large_h.py times CUDA launches)"
  run_step bench-compile 120 10 "$LOG" "$PY" -m fusedgru.bench --grid tiny --quick \
    --device cpu --threads 1 --backends ref+compile --out "$OUT/rest" --no-progress
else
  run_step ecosystem 120 50 "$LOG" "$PY" -m pytest -q -p no:cacheprovider -m gpu $XDIST \
    tests/test_ecosystem_gpu.py
  run_step large-h 90 30 "$LOG" "$PY" benchmarks/large_h.py --out "$OUT/large_h.json" \
    --quick --time-budget 40
  TB=$((BUDGET - $(elapsed) - 40))
  run_step bench-rest 200 15 "$LOG" "$PY" -m fusedgru.bench --grid d2l,deep,batch --quick \
    --backends "${BACKS:-nn.GRU}" --out "$OUT/rest" --no-progress --time-budget "$TB"
fi

# --- summary (always), logs capped under 16 MiB ------------------------------------------
CACHE1=$(ncache)
log "Triton cache: $CACHE0 kernels carried, $((CACHE1 - CACHE0)) compiled during the run"
printf 'triton-cache\t0\t0\t%s carried, %s compiled during the run\n' "$CACHE0" "$((CACHE1 - CACHE0))" >>"$STEPS"
if [ "$HAVE_CACHE" = 1 ]; then declare -n PRED=PRED_CARRY; else declare -n PRED=PRED_BARE; fi
[ -n "$SO" ] || PRED[install]=${PRED_BARE[install]}
PSUM=0
for k in "${!PRED[@]}"; do PSUM=$((PSUM + PRED[$k])); done
log "predicted GPU time of steps env..stream: ${PSUM} s (carry: .so $([ -n "$SO" ] && echo yes || echo no), Triton cache $([ "$HAVE_CACHE" = 1 ] && echo yes || echo no)); budget ${BUDGET} s; this run took $(elapsed) s"
for f in "$LOG" "$SAN"; do
  if [ "$(stat -c %s "$f")" -gt 15000000 ]; then
    { head -c 2000000 "$f"; printf '\n\n[... cut by gpu_run.sh ...]\n\n'; tail -c 12000000 "$f"; } >"$WORK/cut"
    mv "$WORK/cut" "$f"
  fi
done
timeout 60 "$PY" benchmarks/gpu_summary.py --steps "$STEPS" --out "$OUT" --dry-run "$DRY" \
  --predicted "$PSUM" --budget "$BUDGET" 2>&1 | tee -a "$LOG"
rm -rf "$WORK"
exit 0
