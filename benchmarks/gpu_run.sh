#!/usr/bin/env bash
# The one-call GPU run: install, GPU tests, compute-sanitizer, benchmark grids, summary.
#
#   OUT=/some/dir [FUSEDGRU_COMMIT=<sha>] bash benchmarks/gpu_run.sh       (repo root as cwd)
#   bash benchmarks/gpu_run.sh --dry-run        no GPU: the same steps' plumbing on the CPU
#
# Made for the device machine (one H100/H200, no internet, 10 minutes a command): every step
# has a time limit cut to what is left of GPU_RUN_BUDGET (default 570 s), a failing or
# timed-out step is recorded and the next one runs, and the summary is printed last.
# FUSEDGRU_COMMIT: the tree copied to the device machine may have no .git; pass the commit.
#
# Files written under $OUT (at most 8, at most 2 folders deep):
#   summary.json          every step's exit status and time, test and sanitizer verdicts,
#                         the benchmark's speed-ups per provider
#   run.log               everything every step printed (install, tests, benchmark tables)
#   sanitizer.log         compute-sanitizer memcheck and racecheck reports
#   results.json          `fusedgru bench` rows: stream, batch, deep, d2l grids
#   speedup.png           speed-up vs nn.GRU against batch size
#   large_h.json          the Triton large-H strategies (a launch per unit, the same in a
#                         CUDA graph, persistent with a grid barrier) against nn.GRU
#   compile/results.json  the reference under torch.compile on d2l and quick stream (if time)
#   compile/speedup.png
set -u -o pipefail
cd "$(dirname "$0")/.."

DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; fi
OUT="${OUT:-$PWD/gpu-out}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
PY="${PYTHON:-python}"
BUDGET="${GPU_RUN_BUDGET:-570}"
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

elapsed() { echo $(($(date +%s) - START)); }
log() { echo "[gpu_run +$(elapsed)s] $*" | tee -a "$LOG"; }

# run_step NAME CAP RESERVE FILE CMD...: CMD's output goes to FILE; its limit is CAP seconds
# or what is left of the budget once RESERVE seconds are kept for the steps after it.
run_step() {
  local name=$1 cap=$2 reserve=$3 file=$4
  shift 4
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
  log "SKIP $1: $2"
  printf '%s\tskipped\t0\t%s\n' "$1" "$2" >>"$STEPS"
}

log "fusedgru GPU run: out=$OUT dry_run=$DRY budget=${BUDGET}s commit=$FUSEDGRU_COMMIT"

# --- 1. the machine ------------------------------------------------------------------
if [ "$DRY" = 1 ]; then
  run_step env 30 500 "$LOG" "$PY" -c "import torch, sys; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda)"
else
  run_step env 30 500 "$LOG" bash -c "nvidia-smi; nvcc --version; \"$PY\" -c \"import torch, sys; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version())\""
fi

# --- 2. install in place (builds fusedgru._C for this GPU) ---------------------------
if [ "$DRY" = 1 ]; then
  run_step install 30 480 "$LOG" "$PY" -m pip --version
else
  if [ -z "${CUDA_HOME:-}" ] && [ -d /usr/local/cuda ]; then export CUDA_HOME=/usr/local/cuda; fi
  export PATH="${CUDA_HOME:-/usr/local/cuda}/bin:$PATH"
  run_step install 300 230 "$LOG" env TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS="$(nproc)" \
    "$PY" -m pip install --no-build-isolation --no-deps -v -e .
fi

# --- 3. what the package sees, and the float64 check of every backend ----------------
run_step info 60 220 "$LOG" "$PY" -m fusedgru info
run_step check 90 210 "$LOG" "$PY" -m fusedgru check

# --- 4. the GPU tests ------------------------------------------------------------------
run_step pytest-gpu 210 200 "$LOG" "$PY" -m pytest -q -p no:cacheprovider -m gpu tests

# --- 5. compute-sanitizer on small cases of every GPU backend --------------------------
SANITIZER="$(command -v compute-sanitizer || true)"
if [ -z "$SANITIZER" ] && [ -x "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" ]; then
  SANITIZER="${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer"
fi
if [ "$DRY" = 1 ]; then
  # no GPU: the driver alone, on the CPU backends (the sanitizer needs a GPU)
  run_step memcheck 120 170 "$SAN" env TRITON_INTERPRET=1 "$PY" benchmarks/sanitize_cases.py --device cpu
  skip_step racecheck "dry run"
elif [ -n "$SANITIZER" ]; then
  # Without the caching allocator each tensor is its own allocation: an out-of-bounds
  # access is caught at its tensor's edge, not inside a cached block.
  run_step memcheck 110 180 "$SAN" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" \
    --tool memcheck --error-exitcode 9 --print-limit 50 "$PY" benchmarks/sanitize_cases.py
  run_step racecheck 110 160 "$SAN" "$SANITIZER" --tool racecheck --error-exitcode 9 \
    --print-limit 50 "$PY" benchmarks/sanitize_cases.py
else
  skip_step memcheck "compute-sanitizer not found"
  skip_step racecheck "compute-sanitizer not found"
fi

# --- 6. the Triton large-H strategies, measured (issue 3's choice) ---------------------
if [ "$DRY" = 1 ]; then
  skip_step large-h "needs a GPU (benchmarks/large_h.py times CUDA launches)"
else
  run_step large-h 90 130 "$LOG" "$PY" benchmarks/large_h.py --out "$OUT/large_h.json" \
    --time-budget 60
fi

# --- 7. the benchmark grids ------------------------------------------------------------
# Providers: every fusedgru backend of the table that runs CUDA float32 (not the reference,
# a correctness tool on a GPU), flashrnn where installed; ref+compile runs separately
# below so that its compile time cannot crowd out the cells.
if [ "$DRY" = 1 ]; then BENCH_DEVICE=cpu; else BENCH_DEVICE=cuda; fi
BACKS="$(BENCH_DEVICE=$BENCH_DEVICE "$PY" - <<'EOF' 2>/dev/null
import importlib.util, os, torch
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
if dev == "cuda" and importlib.util.find_spec("flashrnn") is not None:
    names.append("flashrnn")
print(",".join(names))
EOF
)"
log "benchmark providers besides nn.GRU: ${BACKS:-none}"
# Stop starting cells 60 s before the step's own limit (a cell of the largest sizes, its
# first call autotuning, can take tens of seconds); keep ~100 s for the steps after it.
TB=$((BUDGET - $(elapsed) - 160))
if [ "$DRY" = 1 ]; then
  run_step bench 200 100 "$LOG" "$PY" -m fusedgru.bench --grid tiny --device cpu --threads 1 \
    --backends "${BACKS:-nn.GRU}" --out "$OUT" --no-progress --time-budget "$TB"
else
  run_step bench 500 100 "$LOG" "$PY" -m fusedgru.bench --grid stream,batch,deep,d2l \
    --backends "${BACKS:-nn.GRU}" --out "$OUT" --no-progress --time-budget "$TB"
fi

# --- 8. the reference under torch.compile (what is left of the budget) -----------------
if [ "$DRY" = 1 ]; then
  run_step bench-compile 120 20 "$LOG" "$PY" -m fusedgru.bench --grid tiny --quick --device cpu \
    --threads 1 --backends ref+compile --out "$OUT/compile" --no-progress
else
  TB=$((BUDGET - $(elapsed) - 60))
  run_step bench-compile 200 20 "$LOG" "$PY" -m fusedgru.bench --grid d2l,stream --quick \
    --dtype float32 --backends ref+compile --out "$OUT/compile" --no-progress --time-budget "$TB"
fi

# --- 9. summary (always), logs capped under 16 MiB -------------------------------------
for f in "$LOG" "$SAN"; do
  if [ "$(stat -c %s "$f")" -gt 15000000 ]; then
    { head -c 2000000 "$f"; printf '\n\n[... cut by gpu_run.sh ...]\n\n'; tail -c 12000000 "$f"; } >"$WORK/cut"
    mv "$WORK/cut" "$f"
  fi
done
timeout 60 "$PY" benchmarks/gpu_summary.py --steps "$STEPS" --out "$OUT" --dry-run "$DRY" 2>&1 | tee -a "$LOG"
rm -rf "$WORK"
exit 0
