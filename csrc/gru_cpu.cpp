// fusedgru::gru_fwd / gru_bwd on the CPU: the "cpu" backend.
//
// Dimension legend: T timesteps, B batch, I input features, H hidden units, G = 3 gates
// (r, z, n).  Semantics: fusedgru/reference.py, line for line; SPEC section 4 for the
// backward.
//
// Structure (forward, reset_after=True):
//   gi = x W_ih^T + b_ih              one GEMM over all T*B rows before the loop
//   for t: gh = h W_hh^T              one GEMM per step into a preallocated (B, 3H) buffer
//          gates + update             ONE fused at::vec loop over (row, 64-unit chunk),
//                                     split over threads by at::parallel_for
// torch.nn.GRU's CPU path launches ~10 ATen ops per step (linear, chunk, sigmoid x2, tanh,
// mul/add ...), each a dispatcher call plus a pass over memory; the fused loop does one
// pass.  The backward runs the same way in reverse time, and dx, dW_ih, dW_hh and the
// biases are single GEMMs / sums over all T*B rows after the loop.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/autograd.h>
#include <torch/library.h>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include <unistd.h>

#include "gru_common.h"

namespace fusedgru {
namespace {

using at::Tensor;

// Units per parallel task: a multiple of every Vectorized width (4..16).
constexpr int64_t kChunk = 64;
// Work below ~16K elements per step runs on the calling thread: an OpenMP fork/join costs
// a few microseconds, about what 16K fused gate evaluations take on one AVX2 core.
// Switch for A/B timing: fusedgru::_set_cpu_inline_elems (the smallest per-task share).
constexpr int64_t kInlineElems = 16384;
std::atomic<int64_t> g_inline_elems{kInlineElems};

// The integer switches' setter: refuses a value below `lo` ("fusedgru::<what> must be >= lo,
// got v"), else stores it and returns the previous one.
int64_t exchange_at_least(std::atomic<int64_t>& knob, int64_t v, int64_t lo, const char* what) {
  TORCH_CHECK(v >= lo, "fusedgru::", what, " must be >= ", lo, ", got ", v);
  return knob.exchange(v);
}

int64_t set_inline_elems(int64_t n) {
  return exchange_at_least(g_inline_elems, n, 1, "_set_cpu_inline_elems: n");
}

// Runs f(b, j0, j1) for every row b < B and every chunk [j0, j1) of [0, H).
template <typename F>
inline void for_rows_and_chunks(int64_t B, int64_t H, const F& f) {
  const int64_t nch = (H + kChunk - 1) / kChunk;
  const int64_t grain =
      std::max<int64_t>(1, g_inline_elems.load(std::memory_order_relaxed) / kChunk);
  at::parallel_for(0, B * nch, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / nch;
      const int64_t j0 = (i % nch) * kChunk;
      f(b, j0, std::min(H, j0 + kChunk));
    }
  });
}

// Calls body(j, n) for vectors [j, j + n) covering [j0, j1), n < Vec::size() only at the end.
template <typename Vec, typename F>
inline void for_vectors(int64_t j0, int64_t j1, const F& body) {
  constexpr int64_t W = Vec::size();
  int64_t j = j0;
  for (; j + W <= j1; j += W) body(j, W);
  if (j < j1) body(j, j1 - j);
}

template <typename Vec, typename T>
inline Vec ld(const T* p, int64_t n) {
  return n == Vec::size() ? Vec::loadu(p) : Vec::loadu(p, n);
}

template <typename Vec, typename T>
inline void st(const Vec& v, T* p, int64_t n) {
  if (n == Vec::size()) v.store(p); else v.store(p, n);
}

template <typename Vec>
inline Vec sigmoid(const Vec& x) {
  const Vec one(1);
  return one / (one + x.neg().exp());  // exp overflows to inf for x << 0: 1/inf = 0, exact
}

// ---------------------------------------------------------------------------------------
// float32 gate activations
// ---------------------------------------------------------------------------------------
//
// ATen's Vectorized<float>::exp / tanh call SLEEF's 1-ulp routines: about 1.3 ns (exp) and
// 4 ns (tanh) per element on one AVX2 core, so the pointwise part of a step (two sigmoids
// and a tanh per unit) cost ~7 ns per unit: 115 us of a 64 x 256 step, as much as a
// seventh of its GEMM.  The routines below are ~2-3 ulp (measured bound tested in
// tests/test_cpu_activations.py) at a quarter of the cost.  float64 keeps SLEEF.
// Switch for tests and A/B timing: fusedgru::_set_cpu_fast_activations (default on).
std::atomic<bool> g_fast_act{true};

bool set_fast_activations(bool on) { return g_fast_act.exchange(on); }

using VecF = at::vec::Vectorized<float>;
using VecI = at::vec::Vectorized<int32_t>;

// e^x: x = n ln2 + r with |r| <= ln2 / 2 (ln2 split in two so n ln2_hi is exact), e^r by
// its Taylor series to r^7 (truncation < 6e-9 relative, a tenth of an ulp), times 2^n built
// in the exponent bits.  The clamp keeps 2^n a normal number (n in [-126, 127]) and passes
// NaN through; e^x below e^-87 or above e^88 is not needed by the gates (they saturate).
inline VecF exp_gate(VecF x) {
  x = at::vec::clamp(x, VecF(-87.0f), VecF(88.0f));
  const VecF n = (x * VecF(1.44269504088896341f)).round();
  VecF r = at::vec::fmadd(n, VecF(-0.693145751953125f), x);
  r = at::vec::fmadd(n, VecF(-1.428606765330187045e-06f), r);
  VecF p(1.0f / 5040);
  p = at::vec::fmadd(p, r, VecF(1.0f / 720));
  p = at::vec::fmadd(p, r, VecF(1.0f / 120));
  p = at::vec::fmadd(p, r, VecF(1.0f / 24));
  p = at::vec::fmadd(p, r, VecF(1.0f / 6));
  p = at::vec::fmadd(p, r, VecF(0.5f));
  p = at::vec::fmadd(p, r, VecF(1.0f));
  p = at::vec::fmadd(p, r, VecF(1.0f));
  const VecI e = (at::vec::convert_to_int_of_same_size(n) + VecI(127)) << VecI(23);
  return p * at::vec::cast<float>(e);
}

inline VecF sigmoid_gate(const VecF& x) {
  const VecF one(1.0f);
  return one / (one + exp_gate(x.neg()));
}

// tanh: (1 - e) / (1 + e) with e = e^{-2|x|} where |x| >= 0.4 (1 - e loses at most ~2 ulp
// there), the odd Taylor series to x^13 below (truncation < 5e-9 relative); x's sign put
// back by bits, so -0 stays -0 and NaN stays NaN.
inline VecF tanh_gate(const VecF& x) {
  const VecF one(1.0f);
  const VecF sign = x & VecF(-0.0f);
  const VecF ax = x.abs();
  const VecF e = exp_gate(ax * VecF(-2.0f));
  const VecF big = (one - e) / (one + e);
  const VecF x2 = ax * ax;
  VecF p(21844.0f / 6081075);
  p = at::vec::fmadd(p, x2, VecF(-1382.0f / 155925));
  p = at::vec::fmadd(p, x2, VecF(62.0f / 2835));
  p = at::vec::fmadd(p, x2, VecF(-17.0f / 315));
  p = at::vec::fmadd(p, x2, VecF(2.0f / 15));
  p = at::vec::fmadd(p, x2, VecF(-1.0f / 3));
  const VecF small = at::vec::fmadd(p * x2, ax, ax);
  return VecF::blendv(big, small, ax < VecF(0.4f)) | sign;
}

// The forward's activations: the fast routines above for float32 when switched on, ATen's
// (SLEEF) otherwise.
template <typename scalar_t>
struct Act {
  using Vec = at::vec::Vectorized<scalar_t>;
  bool fast;
  Vec sig(const Vec& x) const { return sigmoid(x); }
  Vec tanh(const Vec& x) const { return x.tanh(); }
};

template <>
struct Act<float> {
  bool fast;
  VecF sig(const VecF& x) const { return fast ? sigmoid_gate(x) : sigmoid(x); }
  VecF tanh(const VecF& x) const { return fast ? tanh_gate(x) : x.tanh(); }
};

std::tuple<Tensor, Tensor> cpu_activations(const Tensor& x_) {
  TORCH_CHECK(x_.device().is_cpu() && x_.scalar_type() == at::kFloat,
              "fusedgru::_cpu_activations: x must be a float32 CPU tensor, got ",
              x_.scalar_type(), " on ", x_.device());
  const Tensor x = x_.contiguous();
  Tensor s = at::empty_like(x), t = at::empty_like(x);
  const Act<float> act{g_fast_act.load(std::memory_order_relaxed)};
  const float* xp = x.data_ptr<float>();
  float* sp = s.data_ptr<float>();
  float* tp = t.data_ptr<float>();
  for_vectors<VecF>(0, x.numel(), [&](int64_t j, int64_t n) {
    const VecF v = ld<VecF>(xp + j, n);
    st(act.sig(v), sp + j, n);
    st(act.tanh(v), tp + j, n);
  });
  return {s, t};
}

// ---------------------------------------------------------------------------------------
// Small-batch products, inline
// ---------------------------------------------------------------------------------------
//
// At B = 1..small_b rows (8 unless the switch below says otherwise) a step's product is a
// matrix-vector product per row: a few thousand multiply-adds, under a microsecond of
// arithmetic, while an ATen GEMM call costs ~1.5-2 us of dispatch and BLAS set-up (and may
// fork threads for it).  These loops run on the calling thread over the weights in their
// own row-major layout (no packing, so nothing to cache or invalidate): small_nt reads each
// weight row once per 4 outputs with one accumulator per (row, output), small_nn_add adds
// whole weight rows scaled by one input.
// 8: measured at 1 thread (2026-12-01), inline over ATen's GEMM at B=8 was 1.15-1.3x
// faster per call (T=1, H 64..1024; T=35, H 64, 256); at B=16 the two were within noise.
constexpr int64_t kSmallBDefault = 8;
std::atomic<int64_t> g_small_b{kSmallBDefault};

// Test / benchmark switch (fusedgru::_set_cpu_small_batch): the largest row count that takes
// the inline products (0: always ATen's GEMM, the path before them).  Returns the previous.
int64_t set_small_batch(int64_t rows) {
  return exchange_at_least(g_small_b, rows, 0, "_set_cpu_small_batch: rows");
}

// Multiply-adds per parallel task of small_nt: ~6 us of work on one AVX2 core.  Interleaved
// A/B at 2 threads (benchmarks/NOTES-cpu-cuda.md), a FusedGRUCell call split vs on the
// calling thread: B=8 H=1024 2.1x, B=1 H=1024 2.6x, B=4..8 H=256 1.3x, smaller products
// unchanged (one task).  Switch fusedgru::_set_cpu_small_split (off: the calling thread);
// the size itself: fusedgru::_set_cpu_small_task_macs (A/B timing).  Halved to 2^17 on
// 2026-12-02 (7th session, an AVX-512 Xeon, 2 threads, interleaved): B=1 H=256 (196K
// multiply-adds a product) now splits in two, GRUCell call 0.69x -> 1.30x nn.GRUCell, T=1
// call 1.13x -> 2.05x nn.GRU, 32-step cell loop with backward 0.64x -> 1.07x; B=8 H=64
// (98K) stays one task (at 2^16 it split and lost 5-12%); the other cells unchanged.
constexpr int64_t kSmallTaskMacsDefault = 1 << 17;
std::atomic<int64_t> g_small_task_macs{kSmallTaskMacsDefault};

int64_t set_small_task_macs(int64_t macs) {
  return exchange_at_least(g_small_task_macs, macs, 1, "_set_cpu_small_task_macs: macs");
}
std::atomic<bool> g_small_split{true};

bool set_small_split(bool on) { return g_small_split.exchange(on); }

// The grain of an inline product's at::parallel_for over `items` work items of
// `item_macs` multiply-adds each: enough items for g_small_task_macs, at least one; all of
// them (one task) with the split switched off.
int64_t small_grain(int64_t item_macs, int64_t items) {
  if (!g_small_split.load(std::memory_order_relaxed)) return items;
  return std::max<int64_t>(1, g_small_task_macs.load(std::memory_order_relaxed) /
                                  std::max<int64_t>(1, item_macs));
}

// The backward's own thresholds (test / benchmark switches fusedgru::_set_cpu_small_bwd_step
// and _set_cpu_small_wgrad): the largest row count whose per-step dh product takes the
// inline loops (small_nn_add), and the largest T*B whose weight gradients do
// (small_weight_grads); -1 (the default): small_b, as the forward.
std::atomic<int64_t> g_small_bwd_step{-1};
std::atomic<int64_t> g_small_wgrad{-1};

int64_t set_small_bwd_step(int64_t rows) {
  return exchange_at_least(g_small_bwd_step, rows, -1, "_set_cpu_small_bwd_step: rows");
}

int64_t set_small_wgrad(int64_t rows) {
  return exchange_at_least(g_small_wgrad, rows, -1, "_set_cpu_small_wgrad: rows");
}

inline int64_t small_rows(const std::atomic<int64_t>& own) {
  const int64_t v = own.load(std::memory_order_relaxed);
  return v >= 0 ? v : g_small_b.load(std::memory_order_relaxed);
}

// small_nt takes batch rows two at a time (default) or one at a time: switch
// fusedgru::_set_cpu_small_pairs, for A/B timing and tests.
std::atomic<bool> g_small_pairs{true};

bool set_small_pairs(bool on) { return g_small_pairs.exchange(on); }

// small_nt's AVX-512 tiles prefetch the next group of 4 weight rows (a line of each per
// 16 lanes of k) during a group's last batch tile, so that the next group's first tile
// finds them in L2 instead of waiting on memory: 0 off, 1 into L1, 2 into L2 (default).
// Interleaved A/B, T=1 FusedGRU calls, 1 thread, 7 rounds, AMD EPYC Zen 4 (32 KB L1d, the
// x rows of a 4-row tile 16 KB at K=1024), off / L1 / L2 in us (tenth session,
// benchmarks/NOTES-cpu-cuda.md): H=1024 B=8 3346 / 3717 / 2453 (ONNX Runtime 2748), B=1
// 1518 / ~1000 / ~1000 (ORT 1432), B=64 10185 / 10657 / 9826, H=256 B=8 within noise.
// Into L1 the next rows evict the x rows of a 4-row tile.  Only for a weight matrix over
// kPrefetchMinBytes (half of a 2 MB L2): a smaller one stays in cache from step to step,
// where the prefetches can only take load slots.  That bound rests on this reasoning, not
// on a measurement: H=256, B=1, T=128 read 1997 and 2270 us in two grid runs without
// prefetch and 2438 with it, within this host's noise.  Switch:
// fusedgru::_set_cpu_small_prefetch.
std::atomic<int> g_small_prefetch{2};
constexpr int64_t kPrefetchMinBytes = int64_t(1) << 20;
int64_t set_small_prefetch(int64_t mode) {
  TORCH_CHECK(mode >= 0 && mode <= 2, "_set_cpu_small_prefetch: mode must be 0 (off), 1 (L1) "
              "or 2 (L2), got ", mode);
  return g_small_prefetch.exchange(static_cast<int>(mode));
}

// ---------------------------------------------------------------------------------------
// small_nt's float32 products in AVX-512, chosen at run time
// ---------------------------------------------------------------------------------------
//
// The extension is built for AVX2 (16 vector registers).  Its dot-product tile of 4 weight
// rows x 2 batch rows (8 sums, 6 loads per 8 FMAs, 14 registers in use) ran at ~25 GMAC/s
// at B=8 H=256..1024 on one Zen 4 core (2026-12-02), where the core's FMA units allow ~2x
// that, and ONNX Runtime's MLAS (AVX-512) reached 43 GMAC/s at B=8 H=1024.  With 32
// registers a tile of 4 weight rows x 4 batch rows fits (16 sums, 8 loads per 16 FMAs of 16
// lanes), so each loaded vector feeds twice the FMAs.  Compiled for AVX-512 by function
// attribute (the rest of the file stays AVX2) and taken only where the CPU and the OS
// support it (__builtin_cpu_supports checks both) and ATEN_CPU_CAPABILITY, when set, names
// avx512.  Each output's sum runs over 16-lane partial sums in k order, folded the same
// way whatever the tile, thread split or batch-row count: the bits do not depend on them
// (they differ from the AVX2 path's, within SPEC's budget).
// Switch for tests and A/B timing: fusedgru::_set_cpu_small_avx512 (default: on where
// supported).
#if defined(__x86_64__) && defined(__GNUC__)
#define FUSEDGRU_AVX512_TARGET 1
#define FUSEDGRU_AVX512 __attribute__((target("avx512f,avx2,fma")))
#define FUSEDGRU_AVX512_INLINE __attribute__((target("avx512f,avx2,fma"), always_inline)) inline
#endif

bool avx512_supported() {
#ifdef FUSEDGRU_AVX512_TARGET
  static const bool ok = [] {
    if (!__builtin_cpu_supports("avx512f")) return false;
    const char* cap = std::getenv("ATEN_CPU_CAPABILITY");
    return cap == nullptr || *cap == '\0' || std::string(cap).rfind("avx512", 0) == 0;
  }();
  return ok;
#else
  return false;
#endif
}

std::atomic<bool> g_small_avx512{avx512_supported()};

bool set_small_avx512(bool on) {
  TORCH_CHECK(!on || avx512_supported(),
              "fusedgru::_set_cpu_small_avx512: on=True needs a CPU with AVX-512F (and "
              "ATEN_CPU_CAPABILITY unset or avx512*); this one has not");
  return g_small_avx512.exchange(on);
}

bool cpu_has_avx512() { return avx512_supported(); }

// The forward's float32 products (x W_ih^T of a call's rows, h W_hh^T of a step's rows) of up
// to this many rows take small_nt when it runs in AVX-512, where the panels do not take them:
// at 9..64 rows its tile beat ATen's GEMM (MKL, which does not use AVX-512 on this AMD CPU)
// in an interleaved A/B (1 thread, GRUCell calls, noisy host, 2026-12-02): B=64 H=256
// 1.37 -> 0.89 ms, B=64 H=1024 12.7 -> 10.0 ms, B=64 H=64 92 -> 75 us; sequences (T=35)
// B=16..64 H=256 within the noise (0.94-1.05x).  The backward keeps its own thresholds.
// Switch: fusedgru::_set_cpu_small_wide (0: small_b for every dtype, the rule before).
constexpr int64_t kWideRowsDefault = 64;
std::atomic<int64_t> g_small_wide{kWideRowsDefault};

int64_t set_small_wide(int64_t rows) {
  return exchange_at_least(g_small_wide, rows, 0, "_set_cpu_small_wide: rows");
}

// Where ATen's GEMM runs AVX-512 too (MKL does on Intel CPUs, not on AMD ones), small_nt's
// edge at many rows holds only for long dot products: each output of its tile ends in a
// horizontal sum of 16 lanes (~20 shuffle and add instructions per 4 outputs, sharing the
// FMA port), against K/16 FMAs of work.  There, products with K < kWideMinKMkl512 take the
// wide rows up to kWideRowsShortK only.  Interleaved A/B on the AVX-512 Xeon (2026-12-02,
// eighth session, 1 thread, against nn.GRUCell / nn.GRU, small_nt / MKL above small_b):
// GRUCell calls B=64 H=64 0.78x / 0.92x, H=128 0.77x / 0.92x, H=256 0.86x / 0.92x, B=40
// H=128 0.83x / 0.91x, B=48 H=256 0.90x / 0.91x, H=512 0.98x / 0.94x, H=768 1.00x /
// 0.98x, H=1024 1.07x / 1.06x; T=1 call B=64 H=256 0.96x / 1.03x; but B=1 H=256 T=35
// (x W_ih^T of 35 rows) 2.65x / 2.49x and B=16 H=256 T=4 (16-row steps, MKL repacking W_hh
// at each) 1.25x / 1.10x: hence the cap at 48 rows, not small_b.
// Switch: fusedgru::_set_cpu_small_wide_min_k (-1: this rule; 0: the wide rows at every
// K, the rule before; else the K below which the cap applies).
constexpr int64_t kWideMinKMkl512 = 512;
constexpr int64_t kWideRowsShortK = 48;
std::atomic<int64_t> g_small_wide_min_k{-1};

int64_t set_small_wide_min_k(int64_t k) {
  return exchange_at_least(g_small_wide_min_k, k, -1, "_set_cpu_small_wide_min_k: k");
}

// Whether torch's BLAS (MKL in the x86 wheels) runs AVX-512 code: an Intel CPU with
// AVX-512, unless MKL_ENABLE_INSTRUCTIONS or MKL_CBWR (other than AUTO) names a lower
// level.  A heuristic: it does not ask MKL itself.
bool blas_runs_avx512() {
#ifdef FUSEDGRU_AVX512_TARGET
  static const bool ok = [] {
    if (!__builtin_cpu_is("intel") || !avx512_supported()) return false;
    for (const char* name : {"MKL_ENABLE_INSTRUCTIONS", "MKL_CBWR"}) {
      const char* v = std::getenv(name);
      if (v == nullptr || *v == '\0') continue;
      const std::string s(v);
      if (s.rfind("AVX512", 0) != 0 && s.rfind("AUTO", 0) != 0) return false;
    }
    return true;
  }();
  return ok;
#else
  return false;
#endif
}

int64_t small_wide_min_k() {
  const int64_t set = g_small_wide_min_k.load(std::memory_order_relaxed);
  return set >= 0 ? set : (blas_runs_avx512() ? kWideMinKMkl512 : 0);
}

// The forward's inline-product threshold for scalar_t and a product of inner size K:
// small_b, raised to the wide rows for float32 in AVX-512 (capped for short K, above).
// small_b = 0 (every product on ATen's GEMM) stays 0.
template <typename scalar_t>
int64_t fwd_small_rows(int64_t K) {
  const int64_t b = g_small_b.load(std::memory_order_relaxed);
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (b > 0 && g_small_avx512.load(std::memory_order_relaxed)) {
      const int64_t wide = g_small_wide.load(std::memory_order_relaxed);
      return std::max(b, K < small_wide_min_k() ? std::min(wide, kWideRowsShortK) : wide);
    }
  }
  return b;
}

#ifdef FUSEDGRU_AVX512_TARGET
// Four sums of 16 lanes -> {sum(a), sum(b), sum(c), sum(d)}: halves added, then two rounds
// of pairwise adds.
FUSEDGRU_AVX512_INLINE __m256 half_sum(__m512 v) {
  return _mm256_add_ps(_mm512_castps512_ps256(v),
                       _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
}

FUSEDGRU_AVX512_INLINE __m128 fold4(__m512 a, __m512 b, __m512 c, __m512 d) {
  const __m256 t0 = _mm256_hadd_ps(half_sum(a), half_sum(b));
  const __m256 t1 = _mm256_hadd_ps(half_sum(c), half_sum(d));
  const __m256 t2 = _mm256_hadd_ps(t0, t1);
  return _mm_add_ps(_mm256_castps256_ps128(t2), _mm256_extractf128_ps(t2, 1));
}

// out[b, o .. o + NW) (+)= x_b . W[o + j] for the NB batch rows x[0 .. NB): NB x NW sums
// in registers over k in steps of 16 lanes, the last step masked.
template <int NB, int NW, int PF = 0>
FUSEDGRU_AVX512_INLINE void nt_tile_avx512(const float* const* x, const float* w, int64_t K,
                                           float* const* out, int64_t o, bool add,
                                           const float* pf = nullptr) {
  __m512 acc[NB][4];
#pragma GCC unroll 4
  for (int i = 0; i < NB; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) acc[i][j] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    if constexpr (PF != 0) {  // the next group's 4 weight rows, a line each per step
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j)
        _mm_prefetch(reinterpret_cast<const char*>(pf + j * K + k),
                     PF == 1 ? _MM_HINT_T0 : _MM_HINT_T1);
    }
    __m512 v[NW];
#pragma GCC unroll 4
    for (int j = 0; j < NW; ++j) v[j] = _mm512_loadu_ps(w + j * K + k);
#pragma GCC unroll 4
    for (int i = 0; i < NB; ++i) {
      const __m512 xi = _mm512_loadu_ps(x[i] + k);
#pragma GCC unroll 4
      for (int j = 0; j < NW; ++j) acc[i][j] = _mm512_fmadd_ps(xi, v[j], acc[i][j]);
    }
  }
  if (k < K) {
    const __mmask16 m = static_cast<__mmask16>((1u << (K - k)) - 1u);
    __m512 v[NW];
#pragma GCC unroll 4
    for (int j = 0; j < NW; ++j) v[j] = _mm512_maskz_loadu_ps(m, w + j * K + k);
#pragma GCC unroll 4
    for (int i = 0; i < NB; ++i) {
      const __m512 xi = _mm512_maskz_loadu_ps(m, x[i] + k);
#pragma GCC unroll 4
      for (int j = 0; j < NW; ++j) acc[i][j] = _mm512_fmadd_ps(xi, v[j], acc[i][j]);
    }
  }
#pragma GCC unroll 4
  for (int i = 0; i < NB; ++i) {
    const __m128 r = fold4(acc[i][0], acc[i][1], acc[i][2], acc[i][3]);
    float* p = out[i] + o;
    if (NW == 4) {
      _mm_storeu_ps(p, add ? _mm_add_ps(_mm_loadu_ps(p), r) : r);
    } else {
      const float r0 = _mm_cvtss_f32(r);
      *p = add ? *p + r0 : r0;
    }
  }
}

// nt_tile_avx512 of 4 weight rows, prefetching ``next`` (another 4 rows; none if null) as
// g_small_prefetch's mode ``pf`` says.
template <int NB>
FUSEDGRU_AVX512_INLINE void nt_tile_pf_avx512(const float* const* x, const float* w, int64_t K,
                                              float* const* out, int64_t o, bool add,
                                              const float* next, int pf) {
  if (next == nullptr) nt_tile_avx512<NB, 4>(x, w, K, out, o, add);
  else if (pf == 1) nt_tile_avx512<NB, 4, 1>(x, w, K, out, o, add, next);
  else nt_tile_avx512<NB, 4, 2>(x, w, K, out, o, add, next);
}

// small_nt's body for weight rows [o0, o1): groups of 4 rows, batch rows 4 at a time inside
// (W's 4 rows stay in L1 while every batch row uses them), then the rows left one by one.
FUSEDGRU_AVX512 void small_nt_avx512(const float* a, int64_t lda, int64_t B, int64_t K,
                                     const float* W, int64_t o0, int64_t o1, float* out,
                                     int64_t ldo, bool add, int pf) {
  const auto rows = [&](int64_t b, const float** x, float** o) {
    for (int i = 0; i < 4 && b + i < B; ++i) {
      x[i] = a + (b + i) * lda;
      o[i] = out + (b + i) * ldo;
    }
  };
  const float* x[4] = {};
  float* ob[4] = {};
  int64_t o = o0;
  for (; o + 4 <= o1; o += 4) {
    const float* w = W + o * K;
    // The group's last tile (its weight rows in L1 by then) prefetches the next group's.
    const float* next = (pf != 0 && o + 8 <= o1) ? w + 4 * K : nullptr;
    int64_t b = 0;
    for (; b + 4 <= B; b += 4) {
      rows(b, x, ob);
      nt_tile_pf_avx512<4>(x, w, K, ob, o, add, b + 4 == B ? next : nullptr, pf);
    }
    rows(b, x, ob);
    switch (B - b) {
      case 3: nt_tile_pf_avx512<3>(x, w, K, ob, o, add, next, pf); break;
      case 2: nt_tile_pf_avx512<2>(x, w, K, ob, o, add, next, pf); break;
      case 1: nt_tile_pf_avx512<1>(x, w, K, ob, o, add, next, pf); break;
      default: break;
    }
  }
  for (; o < o1; ++o) {
    for (int64_t b = 0; b < B; ++b) {
      rows(b, x, ob);
      nt_tile_avx512<1, 1>(x, W + o * K, K, ob, o, add);
    }
  }
}
#endif

// out[b, o] (+)= sum_k a[b, k] * W[o, k] for b < B, o < O: a (B, K) row stride lda,
// W (O, K) row-major, out row stride ldo.  add: accumulate into out instead of writing it.
// Groups of 4 weight rows outside, batch rows inside: W is read from memory once per call
// whatever B is (4 rows of K stay in L1 while every batch row uses them).
template <typename scalar_t>
void small_nt(const scalar_t* a, int64_t lda, int64_t B, int64_t K, const scalar_t* W,
              int64_t O, scalar_t* out, int64_t ldo, bool add) {
  using Vec = at::vec::Vectorized<scalar_t>;
  const auto sum = [](const Vec& v) {
    return at::vec::vec_reduce_all<scalar_t>([](Vec& x, Vec& y) { return x + y; }, v);
  };
  const bool pairs = g_small_pairs.load(std::memory_order_relaxed);
  // Groups of 4 weight rows split over threads when a task gets at least g_small_task_macs
  // multiply-adds (the calling thread alone below: a fork costs a few microseconds).  Each
  // output's sum is the same whatever the split: bitwise the same results.
  const int64_t ng = (O + 3) / 4;
  const int64_t grain = small_grain(4 * B * K, ng);
#ifdef FUSEDGRU_AVX512_TARGET
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (g_small_avx512.load(std::memory_order_relaxed)) {
      const int pf = O * K * int64_t(sizeof(float)) > kPrefetchMinBytes
                         ? g_small_prefetch.load(std::memory_order_relaxed) : 0;
      at::parallel_for(0, ng, grain, [&](int64_t g0, int64_t g1) {
        small_nt_avx512(a, lda, B, K, W, 4 * g0, std::min(O, 4 * g1), out, ldo, add, pf);
      });
      return;
    }
  }
#endif
  at::parallel_for(0, ng, grain, [&](int64_t g0, int64_t g1) {
    const int64_t o_end = std::min(O, 4 * g1);
    int64_t o = 4 * g0;
    for (; o + 4 <= o_end; o += 4) {
      const scalar_t* w0 = W + o * K;
      int64_t b = 0;
      // Two batch rows at a time: 8 sums, 6 loads per 8 FMAs (one row: 5 loads per 4 FMAs,
      // bound by the loads).  Each sum runs in the same order either way: bitwise the same.
      for (; pairs && b + 2 <= B; b += 2) {
        const scalar_t* ab = a + b * lda;
        const scalar_t* ac = ab + lda;
        Vec s0(0), s1(0), s2(0), s3(0), t0(0), t1(0), t2(0), t3(0);
        for_vectors<Vec>(0, K, [&](int64_t k, int64_t n) {
          const Vec x = ld<Vec>(ab + k, n), y = ld<Vec>(ac + k, n);
          const Vec v0 = ld<Vec>(w0 + k, n), v1 = ld<Vec>(w0 + K + k, n);
          const Vec v2 = ld<Vec>(w0 + 2 * K + k, n), v3 = ld<Vec>(w0 + 3 * K + k, n);
          s0 = at::vec::fmadd(x, v0, s0);
          s1 = at::vec::fmadd(x, v1, s1);
          s2 = at::vec::fmadd(x, v2, s2);
          s3 = at::vec::fmadd(x, v3, s3);
          t0 = at::vec::fmadd(y, v0, t0);
          t1 = at::vec::fmadd(y, v1, t1);
          t2 = at::vec::fmadd(y, v2, t2);
          t3 = at::vec::fmadd(y, v3, t3);
        });
        const scalar_t r[8] = {sum(s0), sum(s1), sum(s2), sum(s3),
                               sum(t0), sum(t1), sum(t2), sum(t3)};
        scalar_t* ob = out + b * ldo;
        scalar_t* oc = ob + ldo;
        for (int i = 0; i < 4; ++i) {
          ob[o + i] = add ? ob[o + i] + r[i] : r[i];
          oc[o + i] = add ? oc[o + i] + r[4 + i] : r[4 + i];
        }
      }
      for (; b < B; ++b) {
        const scalar_t* ab = a + b * lda;
        scalar_t* ob = out + b * ldo;
        Vec s0(0), s1(0), s2(0), s3(0);
        for_vectors<Vec>(0, K, [&](int64_t k, int64_t n) {
          const Vec x = ld<Vec>(ab + k, n);  // lanes past n load as 0
          s0 = at::vec::fmadd(x, ld<Vec>(w0 + k, n), s0);
          s1 = at::vec::fmadd(x, ld<Vec>(w0 + K + k, n), s1);
          s2 = at::vec::fmadd(x, ld<Vec>(w0 + 2 * K + k, n), s2);
          s3 = at::vec::fmadd(x, ld<Vec>(w0 + 3 * K + k, n), s3);
        });
        const scalar_t r[4] = {sum(s0), sum(s1), sum(s2), sum(s3)};
        for (int i = 0; i < 4; ++i) ob[o + i] = add ? ob[o + i] + r[i] : r[i];
      }
    }
    for (; o < o_end; ++o) {
      for (int64_t b = 0; b < B; ++b) {
        const scalar_t* ab = a + b * lda;
        Vec s(0);
        for_vectors<Vec>(0, K, [&](int64_t k, int64_t n) {
          s = at::vec::fmadd(ld<Vec>(ab + k, n), ld<Vec>(W + o * K + k, n), s);
        });
        out[b * ldo + o] = add ? out[b * ldo + o] + sum(s) : sum(s);
      }
    }
  });
}

// ---------------------------------------------------------------------------------------
// Panel products: a register-tiled micro-kernel for the per-step products of a few to a few
// dozen rows (the recurrence's h W_hh^T, dgh W_hh), where ATen's GEMM costs a call and a
// repack of W every step.  out[m, n] (+)= sum_k a[m, k] * Bop[k, n]: the B operand is read
// as panels of kNR = 2 vectors of columns; each tile keeps kMR rows x 2 vectors of sums in
// registers and per k loads 2 vectors of the panel and broadcasts kMR values of a (2*kMR
// FMAs per 2 loads, where small_nt's dot products did 4 FMAs per 5 loads and a horizontal
// sum per output).  Sums run over blocks of kKC terms, each block added into out: about
// kKC + K/kKC roundings per output instead of K.
//   NT (out = a W^T, W (N, K) row-major): W packed once per call into panels
//      [N/kNR][K][kNR] (pack_panels), zero-padded, so every load is whole;
//   NN (out += a W, W (K, N) row-major): W read in place, panel p = columns of W's rows
//      (row stride N), the last panel's loads clipped to the columns that exist.
// Which products take them: g_panel_rows = -1 (the default, "auto"): the forward's per-step
// product of more than small_b (from 2 * kMR rows up when H <= kAutoPanelSmallH) and at most
// kAutoPanelRows rows (any number with the AVX-512 panels), in a call of at least
// kAutoPanelSteps steps (W is packed once per call, a pass over W: worth it after a few
// steps, not for a T=1 call); the backward never (its in-place panels stride through W,
// slower at large H).  n >= 0: rows up to n in the forward and the backward (0: off, the
// paths before them).  Switch: fusedgru::_set_cpu_panel_rows.  Measurements:
// benchmarks/NOTES-cpu-cuda.md.
constexpr int64_t kKC = 128;
constexpr int kMR = 4;
constexpr int64_t kAutoPanelRows = 32;
constexpr int64_t kAutoPanelSteps = 8;
constexpr int64_t kAutoPanelSmallH = 512;
std::atomic<int64_t> g_panel_rows{-1};

int64_t set_panel_rows(int64_t rows) {
  TORCH_CHECK(rows >= -1, "fusedgru::_set_cpu_panel_rows: rows must be >= -1 (-1: automatic), "
              "got ", rows);
  return g_panel_rows.exchange(rows);
}

// The rows (lo, hi] whose per-step products take panels in a call of T steps (forward or
// backward), under g_panel_rows.
struct PanelRows {
  int64_t lo = 0, hi = 0;
  bool takes(int64_t R) const { return R > lo && R <= hi; }
};

// wide: the panels are the AVX-512 ones.  Their upper bound was lifted on 2026-12-02 (eighth
// session, the AVX-512 Xeon, interleaved, T=32 inference, us per step against the rule
// before: small_nt to 64 rows, ATen's GEMM above, which repacks W_hh every step): 1 thread
// B=64 H=64 39.1 -> 29.7, H=256 332 -> 287, B=48 H=256 251 -> 216, H=1024 4588 -> 4406,
// B=128 H=64 64.5 -> 59.5, H=256 617 -> 592, H=1024 9104 -> 8937, B=256 H=256 1330 -> 1320;
// 2 threads B=64 1.08-1.29x, B=128 H=256 1.10x.  The AVX2 panels keep kAutoPanelRows
// (above it they were within the noise of ATen's GEMM on the AMD host, 2026-12-02).
inline PanelRows panel_rows_for(bool backward, int64_t T, int64_t H, int64_t small_b,
                                bool wide) {
  const int64_t set = g_panel_rows.load(std::memory_order_relaxed);
  if (set >= 0) return {0, set};
  if (backward || T < kAutoPanelSteps) return {};
  // From 2 tiles (8 rows) up where W_hh is small enough to stay in cache between steps; at
  // larger H the inline products' single pass over W per step wins up to small_b rows.
  return {H <= kAutoPanelSmallH ? std::min<int64_t>(2 * kMR - 1, small_b) : small_b,
          wide ? std::numeric_limits<int64_t>::max() : kAutoPanelRows};
}

template <typename scalar_t>
constexpr int64_t panel_cols() {
  return 2 * at::vec::Vectorized<scalar_t>::size();
}

// Columns of a panel of the AVX-512 micro-kernel (2 zmm vectors of float32).
constexpr int64_t kNR512 = 32;

// W (N, K) row-major -> panels [ceil(N / NR)][K][NR], columns past N zero.  NR: kNR
// (panel_cols, the AVX2 micro-kernel) or kNR512 (wide: the AVX-512 one, float32).
template <typename scalar_t>
Tensor pack_panels(const scalar_t* W, int64_t N, int64_t K, const at::TensorOptions& opt,
                   bool wide = false) {
  const int64_t NR = wide ? kNR512 : panel_cols<scalar_t>();
  const int64_t np = (N + NR - 1) / NR;
  Tensor packed = at::empty({np * K * NR}, opt);
  scalar_t* p = packed.data_ptr<scalar_t>();
  // Panels split over threads (a 3072 x 1024 W is 3M elements, ~ms on one core).  Per k the
  // NR rows' values: NR read streams, each line used over the next k's (NR lines in L1).
  at::parallel_for(0, np, std::max<int64_t>(1, 65536 / std::max<int64_t>(1, K * NR)),
                   [&](int64_t q0, int64_t q1) {
    for (int64_t q = q0; q < q1; ++q) {
      scalar_t* pq = p + q * K * NR;
      const int64_t n0 = q * NR, nc = std::min(NR, N - n0);
      const scalar_t* wq = W + n0 * K;
      if (nc == NR) {
        for (int64_t k = 0; k < K; ++k)
          for (int64_t j = 0; j < NR; ++j) pq[k * NR + j] = wq[j * K + k];
      } else {
        for (int64_t k = 0; k < K; ++k)
          for (int64_t j = 0; j < NR; ++j) pq[k * NR + j] = j < nc ? wq[j * K + k] : scalar_t(0);
      }
    }
  });
  return packed;
}

// out[r, 0:ncols] (+)= sum_{k < kc} a[r * lda + k] * b[k * ldb + 0:kNR] for r < MR.
// WHOLE: ncols == kNR and the panel rows are readable kNR wide; else loads and stores are
// clipped to ncols.
template <typename scalar_t, int MR, bool WHOLE>
inline void panel_tile(const scalar_t* a, int64_t lda, int64_t kc, const scalar_t* b,
                       int64_t ldb, scalar_t* out, int64_t ldo, int64_t ncols, bool add) {
  using Vec = at::vec::Vectorized<scalar_t>;
  constexpr int64_t V = Vec::size();
  const int64_t n0 = WHOLE ? V : std::min<int64_t>(V, ncols);
  const int64_t n1 = WHOLE ? V : std::max<int64_t>(0, ncols - V);
  Vec s0[MR], s1[MR];
  for (int r = 0; r < MR; ++r) s0[r] = s1[r] = Vec(scalar_t(0));
  for (int64_t k = 0; k < kc; ++k) {
    const scalar_t* bk = b + k * ldb;
    const Vec w0 = WHOLE ? Vec::loadu(bk) : Vec::loadu(bk, n0);
    const Vec w1 = WHOLE ? Vec::loadu(bk + V) : (n1 > 0 ? Vec::loadu(bk + V, n1) : Vec(0));
    for (int r = 0; r < MR; ++r) {
      const Vec x(a[r * lda + k]);
      s0[r] = at::vec::fmadd(x, w0, s0[r]);
      s1[r] = at::vec::fmadd(x, w1, s1[r]);
    }
  }
  for (int r = 0; r < MR; ++r) {
    scalar_t* o = out + r * ldo;
    if (WHOLE) {
      if (add) {
        s0[r] = s0[r] + Vec::loadu(o);
        s1[r] = s1[r] + Vec::loadu(o + V);
      }
      s0[r].store(o);
      s1[r].store(o + V);
    } else {
      if (add) s0[r] = s0[r] + Vec::loadu(o, n0);
      s0[r].store(o, n0);
      if (n1 > 0) {
        if (add) s1[r] = s1[r] + Vec::loadu(o + V, n1);
        s1[r].store(o + V, n1);
      }
    }
  }
}

template <typename scalar_t, bool WHOLE>
inline void panel_rows(const scalar_t* a, int64_t lda, int64_t M, int64_t kc, const scalar_t* b,
                       int64_t ldb, scalar_t* out, int64_t ldo, int64_t ncols, bool add) {
  int64_t m = 0;
  for (; m + kMR <= M; m += kMR)
    panel_tile<scalar_t, kMR, WHOLE>(a + m * lda, lda, kc, b, ldb, out + m * ldo, ldo, ncols, add);
  switch (M - m) {
    case 3: panel_tile<scalar_t, 3, WHOLE>(a + m * lda, lda, kc, b, ldb, out + m * ldo, ldo, ncols, add); break;
    case 2: panel_tile<scalar_t, 2, WHOLE>(a + m * lda, lda, kc, b, ldb, out + m * ldo, ldo, ncols, add); break;
    case 1: panel_tile<scalar_t, 1, WHOLE>(a + m * lda, lda, kc, b, ldb, out + m * ldo, ldo, ncols, add); break;
    default: break;
  }
}

// out (M, N) row stride ldo (+)= a (M, K) row stride lda times the B operand: packed
// (pack_panels of W (N, K): out = a W^T) when `packed`, else W (K, N) row-major itself
// (out = a W).  Panels are split over threads when the product is large enough.
template <typename scalar_t>
void panel_gemm(const scalar_t* a, int64_t lda, int64_t M, int64_t K, const scalar_t* B,
                bool packed, int64_t N, scalar_t* out, int64_t ldo, bool add) {
  constexpr int64_t NR = panel_cols<scalar_t>();
  const int64_t np = (N + NR - 1) / NR;
  const int64_t grain = std::max<int64_t>(1, (1 << 17) / std::max<int64_t>(1, M * K * NR));
  at::parallel_for(0, np, grain, [&](int64_t q0, int64_t q1) {
    for (int64_t q = q0; q < q1; ++q) {
      const int64_t nc = std::min(NR, N - q * NR);
      const scalar_t* bq = packed ? B + q * K * NR : B + q * NR;
      const int64_t ldb = packed ? NR : N;
      scalar_t* oq = out + q * NR;
      for (int64_t k0 = 0; k0 < K; k0 += kKC) {
        const int64_t kc = std::min(kKC, K - k0);
        const bool acc = add || k0 > 0;
        if (nc == NR)
          panel_rows<scalar_t, true>(a + k0, lda, M, kc, bq + k0 * ldb, ldb, oq, ldo, nc, acc);
        else
          panel_rows<scalar_t, false>(a + k0, lda, M, kc, bq + k0 * ldb, ldb, oq, ldo, nc, acc);
      }
    }
  });
}

// ---------------------------------------------------------------------------------------
// The panel products in AVX-512 (float32, packed W only: out = a W^T)
// ---------------------------------------------------------------------------------------
//
// Panels of kNR512 = 32 columns (2 zmm vectors), tiles of 8 rows: 16 sums in registers, per
// k 2 panel loads and 8 broadcasts for 16 FMAs of 16 lanes (the AVX2 tile: 4 rows x 2
// vectors of 8, 8 sums).  Each output's sum runs over blocks of kKC terms in k order, each
// block started from zero and added into out, as panel_tile does: bitwise the AVX2 panels'
// results.  Where they serve: the forward's per-step panel products (use_wide_panels), and,
// under _set_cpu_wide_gi (off by default), gi = x W_ih^T + b_ih of more than the wide rows,
// where ATen's GEMM (MKL) ran at ~36 GMAC/s on one core: a B=32 H=256 T=35 inference call
// spent 6.0 of its 14.0 ms there (2026-12-02, noisy host), and was 0.77-0.80x ONNX Runtime.
#ifdef FUSEDGRU_AVX512_TARGET
constexpr int kMR512 = 8;
constexpr int64_t kRowBlock512 = 128;  // rows of a task (gi of many rows: tasks split rows too)

template <int MR, bool WHOLE>
FUSEDGRU_AVX512_INLINE void panel_tile_avx512(const float* a, int64_t lda, int64_t kc,
                                              const float* b, float* out, int64_t ldo,
                                              __mmask16 m0, __mmask16 m1, bool add) {
  __m512 s0[MR], s1[MR];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) s0[r] = s1[r] = _mm512_setzero_ps();
  for (int64_t k = 0; k < kc; ++k) {
    const __m512 w0 = _mm512_loadu_ps(b + k * kNR512);
    const __m512 w1 = _mm512_loadu_ps(b + k * kNR512 + 16);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m512 x = _mm512_set1_ps(a[r * lda + k]);
      s0[r] = _mm512_fmadd_ps(x, w0, s0[r]);
      s1[r] = _mm512_fmadd_ps(x, w1, s1[r]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    float* o = out + r * ldo;
    if (WHOLE) {
      if (add) {
        s0[r] = _mm512_add_ps(s0[r], _mm512_loadu_ps(o));
        s1[r] = _mm512_add_ps(s1[r], _mm512_loadu_ps(o + 16));
      }
      _mm512_storeu_ps(o, s0[r]);
      _mm512_storeu_ps(o + 16, s1[r]);
    } else {
      if (add) {
        s0[r] = _mm512_add_ps(s0[r], _mm512_maskz_loadu_ps(m0, o));
        s1[r] = _mm512_add_ps(s1[r], _mm512_maskz_loadu_ps(m1, o + 16));
      }
      _mm512_mask_storeu_ps(o, m0, s0[r]);
      _mm512_mask_storeu_ps(o + 16, m1, s1[r]);
    }
  }
}

// Rows [m0, m1) of one panel q (nc <= 32 of its columns exist), every k block.
template <bool WHOLE>
FUSEDGRU_AVX512 void panel_block_avx512(const float* a, int64_t lda, int64_t m0, int64_t m1,
                                        int64_t K, const float* bq, int64_t nc, float* oq,
                                        int64_t ldo, bool add) {
  const auto mask = [](int64_t n) {
    return n >= 16 ? static_cast<__mmask16>(0xFFFF)
                   : static_cast<__mmask16>(n > 0 ? (1u << n) - 1u : 0u);
  };
  const __mmask16 mk0 = mask(nc), mk1 = mask(nc - 16);
  for (int64_t k0 = 0; k0 < K; k0 += kKC) {
    const int64_t kc = std::min(kKC, K - k0);
    const bool acc = add || k0 > 0;
    const float* ak = a + k0;
    const float* bk = bq + k0 * kNR512;
    int64_t m = m0;
    for (; m + kMR512 <= m1; m += kMR512)
      panel_tile_avx512<kMR512, WHOLE>(ak + m * lda, lda, kc, bk, oq + m * ldo, ldo, mk0, mk1, acc);
    const float* am = ak + m * lda;
    float* om = oq + m * ldo;
    switch (m1 - m) {
      case 7: panel_tile_avx512<7, WHOLE>(am, lda, kc, bk, om, ldo, mk0, mk1, acc); break;
      case 6: panel_tile_avx512<6, WHOLE>(am, lda, kc, bk, om, ldo, mk0, mk1, acc); break;
      case 5: panel_tile_avx512<5, WHOLE>(am, lda, kc, bk, om, ldo, mk0, mk1, acc); break;
      case 4: panel_tile_avx512<4, WHOLE>(am, lda, kc, bk, om, ldo, mk0, mk1, acc); break;
      case 3: panel_tile_avx512<3, WHOLE>(am, lda, kc, bk, om, ldo, mk0, mk1, acc); break;
      case 2: panel_tile_avx512<2, WHOLE>(am, lda, kc, bk, om, ldo, mk0, mk1, acc); break;
      case 1: panel_tile_avx512<1, WHOLE>(am, lda, kc, bk, om, ldo, mk0, mk1, acc); break;
      default: break;
    }
  }
}

// out (M, N) row stride ldo (+)= a (M, K) row stride lda times W^T, W packed by
// pack_panels(..., wide=true).  Tasks: (row block of kRowBlock512, panel), panels fastest
// (a task's rows of a stay in L2 while the next panels use them), split over threads when
// the product is large enough (panel_gemm's rule).  One task per output: bitwise the same
// whatever the split.
void panel_gemm_avx512(const float* a, int64_t lda, int64_t M, int64_t K, const float* P,
                       int64_t N, float* out, int64_t ldo, bool add) {
  const int64_t np = (N + kNR512 - 1) / kNR512;
  const int64_t nrb = (M + kRowBlock512 - 1) / kRowBlock512;
  const int64_t per = std::min(M, kRowBlock512) * K * kNR512;
  const int64_t grain = std::max<int64_t>(1, (1 << 17) / std::max<int64_t>(1, per));
  at::parallel_for(0, np * nrb, grain, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t q = t % np, rb = t / np;
      const int64_t m0 = rb * kRowBlock512, m1 = std::min(M, m0 + kRowBlock512);
      const int64_t nc = std::min(kNR512, N - q * kNR512);
      const float* bq = P + q * K * kNR512;
      if (nc == kNR512)
        panel_block_avx512<true>(a, lda, m0, m1, K, bq, nc, out + q * kNR512, ldo, add);
      else
        panel_block_avx512<false>(a, lda, m0, m1, K, bq, nc, out + q * kNR512, ldo, add);
    }
  });
}
#endif

// Whether this call's panels are the AVX-512 ones (float32 where small_nt runs in AVX-512).
template <typename scalar_t>
bool use_wide_panels() {
#ifdef FUSEDGRU_AVX512_TARGET
  if constexpr (std::is_same_v<scalar_t, float>)
    return g_small_avx512.load(std::memory_order_relaxed);
#endif
  return false;
}

// panel_gemm over a packed W, by the micro-kernel its panels were packed for.
template <typename scalar_t>
void panel_gemm_packed(const scalar_t* a, int64_t lda, int64_t M, int64_t K, const scalar_t* P,
                       bool wide, int64_t N, scalar_t* out, int64_t ldo, bool add) {
#ifdef FUSEDGRU_AVX512_TARGET
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (wide) {
      panel_gemm_avx512(a, lda, M, K, P, N, out, ldo, add);
      return;
    }
  }
#endif
  TORCH_INTERNAL_ASSERT(!wide, "wide panels are float32 AVX-512 only");
  panel_gemm(a, lda, M, K, P, true, N, out, ldo, add);
}

// gi = x W_ih^T + b_ih of more than the wide rows on the AVX-512 panels (float32) instead of
// ATen's GEMM: test / benchmark switch fusedgru::_set_cpu_wide_gi, default OFF.  Measured
// (2026-12-02, noisy host, 9 interleaved rounds): at 1 thread 0.90-1.07x MKL over 35..1120
// rows; at 2 threads 0.34-1.00x, the packing and the product adding fork / join points
// where a descheduled second thread stalls the call.  Kept for an A/B on a quiet machine.
std::atomic<bool> g_wide_gi{false};

bool set_wide_gi(bool on) { return g_wide_gi.exchange(on); }

// Rows summed into one partial sum before it joins the total (small_nn_add): a sum of 3H
// terms in one running accumulator loses ~3H roundings' worth of accuracy (a 32-step
// GRUCell loop at H=1024 went over SPEC's float32 budget for dh0); blocks of kSumBlock
// bring that to ~kSumBlock + 3H/kSumBlock, BLAS's order of magnitude.
constexpr int64_t kSumBlock = 16;

// Column vectors per tile of small_nn_add / small_outer: with 2 rows of sums (AVX2: 8 of
// the 16 vector registers), each loaded weight vector feeds 2 FMAs and each broadcast 4.
constexpr int64_t kColVecs = 4;

// small_nn_add's tile: out[b, k0 .. k0 + NC*V) for the NB batch rows from b over the weight
// rows [o0, o1): one block's partial sums in registers (the first row's product, then an
// FMA per row in order), added into out at the end, as the untiled loop did: bitwise the
// same order.  Every vector whole except the last when n < V (then NC = 1).
template <typename Vec, int NB, int NC>
inline void nn_tile(const typename Vec::value_type* a, int64_t lda, int64_t o0, int64_t o1,
                    const typename Vec::value_type* W, int64_t K, int64_t k0, int64_t n,
                    typename Vec::value_type* out) {
  constexpr int64_t V = Vec::size();
  Vec acc[NB][NC];
  for (int i = 0; i < NB; ++i) {
    const Vec ai(a[i * lda + o0]);
    for (int c = 0; c < NC; ++c) acc[i][c] = ai * ld<Vec>(W + o0 * K + k0 + c * V, n);
  }
  for (int64_t o = o0 + 1; o < o1; ++o) {
    Vec w[NC];
    for (int c = 0; c < NC; ++c) w[c] = ld<Vec>(W + o * K + k0 + c * V, n);
    for (int i = 0; i < NB; ++i) {
      const Vec ai(a[i * lda + o]);
      for (int c = 0; c < NC; ++c) acc[i][c] = at::vec::fmadd(ai, w[c], acc[i][c]);
    }
  }
  for (int i = 0; i < NB; ++i)
    for (int c = 0; c < NC; ++c) {
      typename Vec::value_type* p = out + i * K + k0 + c * V;
      st(ld<Vec>(p, n) + acc[i][c], p, n);
    }
}

#ifdef FUSEDGRU_AVX512_TARGET
// small_nn_add's float32 tile in AVX-512: out[b, k0 .. k0 + 16*NC) for NB batch rows over
// the weight rows [o0, o1), as nn_tile (the first row's product, then an FMA per row in
// order, the block's sums added into out at the end): the same bits, 16 lanes per
// instruction instead of 8.  n: the lanes of the last vector (NC = 1 when n < 16).
// One weight row o of nn_tile_avx512: its NC vectors times each batch row's a[i, o],
// the first row (FIRST) a product, every later one an FMA into the sums.
template <int NB, int NC, bool FIRST>
FUSEDGRU_AVX512_INLINE void nn_row_avx512(const float* a, int64_t lda, int64_t o, const float* W,
                                          int64_t K, int64_t k0, __mmask16 m,
                                          __m512 (&acc)[NB][NC]) {
  __m512 w[NC];
#pragma GCC unroll 4
  for (int c = 0; c < NC; ++c) w[c] = _mm512_maskz_loadu_ps(m, W + o * K + k0 + c * 16);
#pragma GCC unroll 4
  for (int i = 0; i < NB; ++i) {
    const __m512 ai = _mm512_set1_ps(a[i * lda + o]);
#pragma GCC unroll 4
    for (int c = 0; c < NC; ++c)
      acc[i][c] = FIRST ? _mm512_mul_ps(ai, w[c]) : _mm512_fmadd_ps(ai, w[c], acc[i][c]);
  }
}

template <int NB, int NC>
FUSEDGRU_AVX512_INLINE void nn_tile_avx512(const float* a, int64_t lda, int64_t o0, int64_t o1,
                                           const float* W, int64_t K, int64_t k0, int64_t n,
                                           float* out) {
  const __mmask16 m = n >= 16 ? static_cast<__mmask16>(0xFFFF)
                              : static_cast<__mmask16>((1u << n) - 1u);
  __m512 acc[NB][NC];
  nn_row_avx512<NB, NC, true>(a, lda, o0, W, K, k0, m, acc);
  for (int64_t o = o0 + 1; o < o1; ++o) nn_row_avx512<NB, NC, false>(a, lda, o, W, K, k0, m, acc);
#pragma GCC unroll 4
  for (int i = 0; i < NB; ++i)
#pragma GCC unroll 4
    for (int c = 0; c < NC; ++c) {
      float* p = out + i * K + k0 + c * 16;
      _mm512_mask_storeu_ps(p, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, p), acc[i][c]));
    }
}

// small_nn_add's body in AVX-512 for the column slabs [s0, s1) of 64 columns (the last
// ones 16 at a time, then masked), blocks of kSumBlock weight rows in order, batch rows 4
// at a time: the same loop order as the AVX2 body.
FUSEDGRU_AVX512 void small_nn_add_avx512(const float* a, int64_t lda, int64_t B, int64_t O,
                                         const float* W, int64_t K, float* out, int64_t s0,
                                         int64_t s1) {
  const int64_t full = K / 64;
  for (int64_t o0 = 0; o0 < O; o0 += kSumBlock) {
    const int64_t o1 = std::min(O, o0 + kSumBlock);
    for (int64_t s = s0; s < s1; ++s) {
      const bool whole = s < full;
      const int64_t k0 = whole ? s * 64 : full * 64 + (s - full) * 16;
      const int64_t n = whole ? 16 : std::min<int64_t>(16, K - k0);
      int64_t b = 0;
      for (; b + 4 <= B; b += 4) {
        if (whole) nn_tile_avx512<4, 4>(a + b * lda, lda, o0, o1, W, K, k0, 16, out + b * K);
        else nn_tile_avx512<4, 1>(a + b * lda, lda, o0, o1, W, K, k0, n, out + b * K);
      }
      for (; b < B; ++b) {
        if (whole) nn_tile_avx512<1, 4>(a + b * lda, lda, o0, o1, W, K, k0, 16, out + b * K);
        else nn_tile_avx512<1, 1>(a + b * lda, lda, o0, o1, W, K, k0, n, out + b * K);
      }
    }
  }
}

// Switch fusedgru::_set_cpu_nn_avx512 (default on; it takes effect only where the small
// AVX-512 products do: g_small_avx512).
std::atomic<bool> g_nn_avx512{true};

bool set_nn_avx512(bool on) { return g_nn_avx512.exchange(on); }
#else
bool set_nn_avx512(bool on) { return on && false; }
#endif

// out[b, k] += sum_o a[b, o] * W[o, k] for b < B, k < K: a (B, O) row stride lda,
// W (O, K) row-major, out (B, K) contiguous.  Columns in slabs of kColVecs vectors, a task's
// slabs (split over threads when a task gets at least g_small_task_macs multiply-adds: each
// output column is summed by one task, in the same order whatever the split) within blocks
// of kSumBlock weight rows in order: the block's rows are read as 16 sequential streams over
// the task's columns (a slab outermost instead read W down its columns, 4 KB apart at
// H=1024: a 1-thread B=1 H=1024 cell loop ran 1.5x slower).  A slab's block (<= 16 x 32
// values) stays in L1 while the batch rows use it two at a time, the block's sums in
// registers, then added into out.  Until 2026-12-02 the block's sums went through a scratch
// row in memory: a load and a store per FMA besides the weight's load, on one thread.
template <typename scalar_t>
void small_nn_add(const scalar_t* a, int64_t lda, int64_t B, int64_t O, const scalar_t* W,
                  int64_t K, scalar_t* out) {
  using Vec = at::vec::Vectorized<scalar_t>;
  constexpr int64_t V = Vec::size();
#ifdef FUSEDGRU_AVX512_TARGET
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (g_small_avx512.load(std::memory_order_relaxed) &&
        g_nn_avx512.load(std::memory_order_relaxed)) {
      const int64_t full = K / 64;
      const int64_t nslab = full + (K - full * 64 + 15) / 16;
      const int64_t grain = small_grain(B * O * 64, nslab);
      at::parallel_for(0, nslab, grain, [&](int64_t s0, int64_t s1) {
        small_nn_add_avx512(a, lda, B, O, W, K, out, s0, s1);
      });
      return;
    }
  }
#endif
  const int64_t full = K / (kColVecs * V);  // whole slabs; the columns left go vector by vector
  const int64_t nslab = full + (K - full * kColVecs * V + V - 1) / V;
  const int64_t grain = small_grain(B * O * kColVecs * V, nslab);
  at::parallel_for(0, nslab, grain, [&](int64_t s0, int64_t s1) {
    for (int64_t o0 = 0; o0 < O; o0 += kSumBlock) {
      const int64_t o1 = std::min(O, o0 + kSumBlock);
      for (int64_t s = s0; s < s1; ++s) {
        const bool whole = s < full;
        const int64_t k0 = whole ? s * kColVecs * V : full * kColVecs * V + (s - full) * V;
        const int64_t n = whole ? V : std::min(V, K - k0);
        int64_t b = 0;
        for (; b + 2 <= B; b += 2) {
          if (whole) nn_tile<Vec, 2, kColVecs>(a + b * lda, lda, o0, o1, W, K, k0, V, out + b * K);
          else nn_tile<Vec, 2, 1>(a + b * lda, lda, o0, o1, W, K, k0, n, out + b * K);
        }
        if (b < B) {
          if (whole) nn_tile<Vec, 1, kColVecs>(a + b * lda, lda, o0, o1, W, K, k0, V, out + b * K);
          else nn_tile<Vec, 1, 1>(a + b * lda, lda, o0, o1, W, K, k0, n, out + b * K);
        }
      }
    }
  });
}

// small_outer's output written with non-temporal stores when it is at least kOuterNtBytes
// (switch fusedgru::_set_cpu_outer_nt): a store that misses the cache first reads the line
// (write-allocate), so a 12 MB dW (H = 1024) cost 24 MB of DRAM traffic per step.  Only
// where the two dW of a step would not stay in the last-level cache until autograd's add_
// reads them back (together more than half of it).  On an Intel host with 480 MB of L3
// (2026-12-02, 7th session; 32-step cell loop with backward, H = 1024, medians of the
// interleaved rounds without page faults) streaming them made the loop slower: 1 thread
// B=1 193 ms against 179 without, B=8 220 against 214; 2 threads B=1 101 against 92, B=8
// 121 against 112.  From 512 KB up it took the B=1 H=256 loop from 0.95x to 0.78x
// nn.GRUCell.  The AMD host it was chosen on (01c1c37) has 32 MB of L3 per CCD: 2 x 12 MB
// is more than half of it, so there it still streams.
constexpr int64_t kOuterNtBytes = int64_t(4) << 20;
std::atomic<bool> g_outer_nt{true};

bool set_outer_nt(bool on) { return g_outer_nt.exchange(on); }

// The last-level cache the rule above assumes: -1 (the default) what sysconf reports
// (_SC_LEVEL3_CACHE_SIZE; 0 where unknown), else this many bytes; 0: unknown, stream from
// kOuterNtBytes up (the rule before).  Switch fusedgru::_set_cpu_llc_bytes (tests, A/B).
std::atomic<int64_t> g_llc_bytes{-1};

int64_t set_llc_bytes(int64_t bytes) {
  return exchange_at_least(g_llc_bytes, bytes, -1, "_set_cpu_llc_bytes: bytes");
}

int64_t llc_bytes() {
  const int64_t set = g_llc_bytes.load(std::memory_order_relaxed);
  if (set >= 0) return set;
  static const int64_t reported = [] {
    const long v = sysconf(_SC_LEVEL3_CACHE_SIZE);
    return v > 0 ? static_cast<int64_t>(v) : int64_t(0);
  }();
  return reported;
}

// Whether a weight gradient of `bytes` (one of a step's two) is written around the cache.
bool outer_streams(int64_t bytes) {
  if (!g_outer_nt.load(std::memory_order_relaxed) || bytes < kOuterNtBytes) return false;
  const int64_t llc = llc_bytes();
  return llc == 0 || 4 * bytes > llc;
}

template <typename Vec>
inline void st_out(const Vec& v, typename Vec::value_type* p, int64_t n, bool nt) {
#if defined(__AVX__)
  using T = typename Vec::value_type;
  if (nt && n == Vec::size() && reinterpret_cast<uintptr_t>(p) % 32 == 0) {
    if constexpr (std::is_same_v<T, float> && Vec::size() == 8) {
      _mm256_stream_ps(p, static_cast<__m256>(v));
      return;
    } else if constexpr (std::is_same_v<T, double> && Vec::size() == 4) {
      _mm256_stream_pd(p, static_cast<__m256d>(v));
      return;
    }
  }
#endif
  (void)nt;
  st(v, p, n);
}

#ifdef FUSEDGRU_AVX512_TARGET
// small_outer's float32 body in AVX-512 for R <= kOuterRows512 rows, output rows [o0, o1):
// two output rows at a time with their 2R coefficients a[r, o] broadcast once into
// registers, then per 16 columns R loads of x (in L1), 2R FMAs and 2 stores.  The AVX2 body
// reloads every coefficient for every 8 columns (3 loads per 2 FMAs at R = 8): on an
// AVX-512 Xeon (2026-12-02, 7th session) its B = 8, H = 256 weight gradients took ~90 us
// more than MKL's.  Each output's sum runs over r in order, r = 0 a product and one FMA
// per later row, as in the AVX2 body: the same bits.
constexpr int64_t kOuterRows512 = 8;

// 16 columns [k, k + 16) (WHOLE; else the lanes of m) of output rows o .. o + NO.
template <int R, int NO, bool WHOLE>
FUSEDGRU_AVX512_INLINE void outer_cols_avx512(const __m512 (&c)[NO][R], const float* x,
                                              int64_t ldx, int64_t k, __mmask16 m, float* out,
                                              int64_t ldo, int64_t o, bool nt, bool add) {
  __m512 acc[NO];
  const __m512 x0 = WHOLE ? _mm512_loadu_ps(x + k) : _mm512_maskz_loadu_ps(m, x + k);
#pragma GCC unroll 2
  for (int j = 0; j < NO; ++j) acc[j] = _mm512_mul_ps(c[j][0], x0);
#pragma GCC unroll 8
  for (int r = 1; r < R; ++r) {
    const float* xr = x + r * ldx + k;
    const __m512 v = WHOLE ? _mm512_loadu_ps(xr) : _mm512_maskz_loadu_ps(m, xr);
#pragma GCC unroll 2
    for (int j = 0; j < NO; ++j) acc[j] = _mm512_fmadd_ps(c[j][r], v, acc[j]);
  }
#pragma GCC unroll 2
  for (int j = 0; j < NO; ++j) {
    float* p = out + (o + j) * ldo + k;
    if (add) acc[j] = _mm512_add_ps(WHOLE ? _mm512_loadu_ps(p) : _mm512_maskz_loadu_ps(m, p), acc[j]);
    if (!WHOLE) {
      _mm512_mask_storeu_ps(p, m, acc[j]);
    } else if (nt && reinterpret_cast<uintptr_t>(p) % 64 == 0) {
      _mm512_stream_ps(p, acc[j]);
    } else {
      _mm512_storeu_ps(p, acc[j]);
    }
  }
}

template <int R, int NO>
FUSEDGRU_AVX512_INLINE void outer_rows_avx512(const float* a, int64_t lda, int64_t o,
                                              const float* x, int64_t ldx, int64_t K,
                                              float* out, int64_t ldo, bool nt, bool add) {
  __m512 c[NO][R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 2
    for (int j = 0; j < NO; ++j) c[j][r] = _mm512_set1_ps(a[r * lda + o + j]);
  int64_t k = 0;
  for (; k + 16 <= K; k += 16)
    outer_cols_avx512<R, NO, true>(c, x, ldx, k, static_cast<__mmask16>(0xFFFF), out, ldo, o, nt,
                                   add);
  if (k < K)
    outer_cols_avx512<R, NO, false>(c, x, ldx, k, static_cast<__mmask16>((1u << (K - k)) - 1u),
                                    out, ldo, o, nt, add);
}

template <int R>
FUSEDGRU_AVX512 void outer_block_avx512(const float* a, int64_t lda, int64_t o0, int64_t o1,
                                        const float* x, int64_t ldx, int64_t K, float* out,
                                        int64_t ldo, bool nt, bool add) {
  int64_t o = o0;
  for (; o + 2 <= o1; o += 2) outer_rows_avx512<R, 2>(a, lda, o, x, ldx, K, out, ldo, nt, add);
  if (o < o1) outer_rows_avx512<R, 1>(a, lda, o, x, ldx, K, out, ldo, nt, add);
  if (nt) _mm_sfence();  // the streamed lines visible before the task ends
}

// Output rows [o0, o1) of small_outer for R <= kOuterRows512.
inline void small_outer_avx512(const float* a, int64_t lda, int64_t R, int64_t o0, int64_t o1,
                               const float* x, int64_t ldx, int64_t K, float* out, int64_t ldo,
                               bool nt, bool add) {
  switch (R) {
    case 1: return outer_block_avx512<1>(a, lda, o0, o1, x, ldx, K, out, ldo, nt, add);
    case 2: return outer_block_avx512<2>(a, lda, o0, o1, x, ldx, K, out, ldo, nt, add);
    case 3: return outer_block_avx512<3>(a, lda, o0, o1, x, ldx, K, out, ldo, nt, add);
    case 4: return outer_block_avx512<4>(a, lda, o0, o1, x, ldx, K, out, ldo, nt, add);
    case 5: return outer_block_avx512<5>(a, lda, o0, o1, x, ldx, K, out, ldo, nt, add);
    case 6: return outer_block_avx512<6>(a, lda, o0, o1, x, ldx, K, out, ldo, nt, add);
    case 7: return outer_block_avx512<7>(a, lda, o0, o1, x, ldx, K, out, ldo, nt, add);
    default: return outer_block_avx512<8>(a, lda, o0, o1, x, ldx, K, out, ldo, nt, add);
  }
}

// Test / A/B switch fusedgru::_set_cpu_outer_avx512 (default on; it takes effect only
// where the small AVX-512 products do: g_small_avx512).
std::atomic<bool> g_outer_avx512{true};

bool set_outer_avx512(bool on) { return g_outer_avx512.exchange(on); }
#else
bool set_outer_avx512(bool on) { return on && false; }
#endif

// out[o, k] = sum_r a[r, o] * x[r, k] for o < O, k < K, over R rows: a (R, O) row stride
// lda, x (R, K) row stride ldx, out (O, K) row stride ldo.  A weight gradient over a few
// rows (a T*B <= small_b call): an outer product, written once (ATen's GEMM with an inner
// dimension of 1-4 took ~4 ms for 3072 x 1024, twice what writing it costs).  Rows of out
// two at a time (each loaded x vector feeds 2 FMAs), split over threads by rows when a
// task gets at least g_small_task_macs multiply-adds; each output's sum runs over r in order
// whatever the tiling or split.  add: out[o, k] += that sum instead (out + sum, the bits of
// adding the written product afterwards, as autograd's add_ does), never streamed.
template <typename scalar_t>
void small_outer(const scalar_t* a, int64_t lda, int64_t R, int64_t O, const scalar_t* x,
                 int64_t ldx, int64_t K, scalar_t* out, int64_t ldo, bool add = false) {
  using Vec = at::vec::Vectorized<scalar_t>;
  const bool nt = !add && outer_streams(O * K * static_cast<int64_t>(sizeof(scalar_t)));
  const int64_t npair = (O + 1) / 2;
  const int64_t grain = small_grain(2 * R * K, npair);
#ifdef FUSEDGRU_AVX512_TARGET
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (R >= 1 && R <= kOuterRows512 && g_small_avx512.load(std::memory_order_relaxed) &&
        g_outer_avx512.load(std::memory_order_relaxed)) {
      at::parallel_for(0, npair, grain, [&](int64_t p0, int64_t p1) {
        small_outer_avx512(a, lda, R, 2 * p0, std::min(O, 2 * p1), x, ldx, K, out, ldo, nt, add);
      });
      return;
    }
  }
#endif
  at::parallel_for(0, npair, grain, [&](int64_t p0, int64_t p1) {
    for (int64_t o = 2 * p0; o < std::min(O, 2 * p1); o += 2) {
      scalar_t* o0 = out + o * ldo;
      if (o + 1 < O) {
        scalar_t* o1 = o0 + ldo;
        for_vectors<Vec>(0, K, [&](int64_t k, int64_t n) {
          const Vec x0 = ld<Vec>(x + k, n);
          Vec acc0 = Vec(a[o]) * x0, acc1 = Vec(a[o + 1]) * x0;
          for (int64_t r = 1; r < R; ++r) {
            const Vec xr = ld<Vec>(x + r * ldx + k, n);
            acc0 = at::vec::fmadd(Vec(a[r * lda + o]), xr, acc0);
            acc1 = at::vec::fmadd(Vec(a[r * lda + o + 1]), xr, acc1);
          }
          if (add) {
            acc0 = ld<Vec>(o0 + k, n) + acc0;
            acc1 = ld<Vec>(o1 + k, n) + acc1;
          }
          st_out(acc0, o0 + k, n, nt);
          st_out(acc1, o1 + k, n, nt);
        });
      } else {
        for_vectors<Vec>(0, K, [&](int64_t k, int64_t n) {
          Vec acc = Vec(a[o]) * ld<Vec>(x + k, n);
          for (int64_t r = 1; r < R; ++r)
            acc = at::vec::fmadd(Vec(a[r * lda + o]), ld<Vec>(x + r * ldx + k, n), acc);
          if (add) acc = ld<Vec>(o0 + k, n) + acc;
          st_out(acc, o0 + k, n, nt);
        });
      }
    }
#if defined(__SSE2__)
    if (nt) _mm_sfence();  // the streamed lines visible before the task ends
#endif
  });
}

// dW_ih = dgi^T x and dW_hh = dgh^T h_prev over all R rows (reset_after=False: rows n of
// dW_hh multiply r * h_prev), written into dw_ih / dw_hh ((3H, I) / (3H, H), contiguous; an
// undefined one is skipped), or with add added into them (gru_bwd_acc).  small: small_outer
// (R <= small rows), else ATen's GEMM (addmm_ where it adds).
template <typename scalar_t>
void weight_products(const Tensor& dgi, const Tensor& dgh, const Tensor& x, const Tensor& hprev,
                     const Tensor& ws, bool reset_after, bool small, bool add,
                     const Tensor& dw_ih, const Tensor& dw_hh) {
  const int64_t I = x.size(-1), H = hprev.size(-1), G = 3 * H;
  const int64_t R = x.numel() / std::max<int64_t>(I, 1);
  const Tensor dgi2 = dgi.reshape({R, G}), dgh2 = dgh.reshape({R, G});
  // out (n, K) (+)= a[:, o0 : o0 + n]^T b, a (R, G), b (R, K) contiguous
  const auto product = [&](const Tensor& a, int64_t o0, int64_t n, const Tensor& b,
                           Tensor out) {
    const int64_t K = b.size(1);
    if (small) {
      small_outer(a.data_ptr<scalar_t>() + o0, G, R, n, b.data_ptr<scalar_t>(), K, K,
                  out.data_ptr<scalar_t>(), K, add);
    } else if (add) {
      out.addmm_(a.narrow(1, o0, n).t(), b);
    } else {
      at::mm_out(out, a.narrow(1, o0, n).t(), b);
    }
  };
  if (dw_ih.defined()) product(dgi2, 0, G, x.reshape({R, I}), dw_ih);
  if (!dw_hh.defined()) return;
  const Tensor hp2 = hprev.reshape({R, H});
  if (reset_after) {
    product(dgh2, 0, G, hp2, dw_hh);
  } else {
    // Rows r, z multiply h; rows n multiply r * h (r: ws[..., :H]).
    product(dgh2, 0, 2 * H, hp2, dw_hh.narrow(0, 0, 2 * H));
    const Tensor rh = ws.reshape({R, 4 * H}).narrow(1, 0, H) * hp2;
    product(dgh2, 2 * H, H, rh, dw_hh.narrow(0, 2 * H, H));
  }
}

// dx = dgi W_ih by small_nn_add (R <= small rows).
template <typename scalar_t>
Tensor small_dx(const Tensor& dgi, const Tensor& x, const Tensor& w_ih) {
  const int64_t I = x.size(-1), G = dgi.size(-1);
  const int64_t R = x.numel() / std::max<int64_t>(I, 1);
  Tensor dx = at::zeros(x.sizes(), x.options());
  small_nn_add(dgi.data_ptr<scalar_t>(), G, R, G, w_ih.data_ptr<scalar_t>(), I,
               dx.data_ptr<scalar_t>());
  return dx;
}

// (db_ih, db_hh): the sums of dgi / dgh over their R rows, each output's over r in order.
template <typename scalar_t>
std::tuple<Tensor, Tensor> small_bias_grads(const Tensor& dgi, const Tensor& dgh) {
  const int64_t G = dgh.size(-1), R = dgh.numel() / std::max<int64_t>(G, 1);
  const scalar_t* dgi_p = dgi.data_ptr<scalar_t>();
  const scalar_t* dgh_p = dgh.data_ptr<scalar_t>();
  Tensor db_hh = at::empty({G}, dgh.options()), db_ih = at::empty({G}, dgh.options());
  scalar_t* dbh = db_hh.data_ptr<scalar_t>();
  scalar_t* dbi = db_ih.data_ptr<scalar_t>();
  for (int64_t o = 0; o < G; ++o) {
    scalar_t sh = 0, si = 0;
    for (int64_t r = 0; r < R; ++r) {
      sh += dgh_p[r * G + o];
      si += dgi_p[r * G + o];
    }
    dbh[o] = sh;
    dbi[o] = si;
  }
  return {db_ih, db_hh};
}

// weight_grads (gru_common.h) for a call of T*B <= small_b rows: dx, dW_ih, dW_hh and the
// bias gradients by the inline loops above instead of five ATen GEMMs and sums (need_dx /
// need_dw false: empty tensors instead, as there).
template <typename scalar_t>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> small_weight_grads(
    const Tensor& dgi, const Tensor& dgh, const Tensor& x, const Tensor& w_ih,
    const Tensor& hprev, const Tensor& ws, bool reset_after, bool need_dx, bool need_dw) {
  const int64_t I = x.size(-1), G = dgh.size(-1);
  const Tensor dx = need_dx ? small_dx<scalar_t>(dgi, x, w_ih) : at::empty({0}, x.options());
  if (!need_dw) return without_weight_grads(dx);
  const Tensor dw_ih = at::empty({G, I}, x.options()), dw_hh = at::empty({G, G / 3}, x.options());
  weight_products<scalar_t>(dgi, dgh, x, hprev, ws, reset_after, true, false, dw_ih, dw_hh);
  const auto [db_ih, db_hh] = small_bias_grads<scalar_t>(dgi, dgh);
  return {dx, dw_ih, dw_hh, db_ih, db_hh};
}

// ---------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------

// The forward's float32 element phase in AVX-512: 16 units per instruction instead of 8.
// The gate activations are exp_gate / sigmoid_gate / tanh_gate with the same operations in
// the same order as ATen's AVX2 Vectorized<float> runs them (clamp as min(max(lo, x)),
// round to nearest, truncating conversion, the same FMAs), and the element expressions are
// the AVX2 loop's: the same bits (tested).  Taken where the fast activations are on and
// small_nt runs in AVX-512; switch fusedgru::_set_cpu_pointwise_avx512 (default on).
// Predicted from the instruction counts: ~100 instructions per 8 units in the AVX2 loop
// (3 activations of ~20-30, 10 loads, 5 stores, 3 divisions), about halved per unit; the
// divisions (3 per vector, ~16 lanes per 10 cycles in zmm) stay as they were per unit.
std::atomic<bool> g_pointwise_avx512{true};

bool set_pointwise_avx512(bool on) { return g_pointwise_avx512.exchange(on); }

#ifdef FUSEDGRU_AVX512_TARGET
FUSEDGRU_AVX512_INLINE __m512 or16(__m512 a, __m512 b) {
  return _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(a), _mm512_castps_si512(b)));
}

FUSEDGRU_AVX512_INLINE __m512 exp_gate16(__m512 x) {
  x = _mm512_min_ps(_mm512_set1_ps(88.0f), _mm512_max_ps(_mm512_set1_ps(-87.0f), x));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fmadd_ps(n, _mm512_set1_ps(-0.693145751953125f), x);
  r = _mm512_fmadd_ps(n, _mm512_set1_ps(-1.428606765330187045e-06f), r);
  __m512 p = _mm512_set1_ps(1.0f / 5040);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  const __m512i e = _mm512_slli_epi32(
      _mm512_add_epi32(_mm512_cvttps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(p, _mm512_castsi512_ps(e));
}

FUSEDGRU_AVX512_INLINE __m512 sigmoid_gate16(__m512 x) {
  const __m512 one = _mm512_set1_ps(1.0f);
  const __m512 neg = _mm512_castsi512_ps(
      _mm512_xor_si512(_mm512_castps_si512(x), _mm512_set1_epi32(INT32_MIN)));
  return _mm512_div_ps(one, _mm512_add_ps(one, exp_gate16(neg)));
}

FUSEDGRU_AVX512_INLINE __m512 tanh_gate16(__m512 x) {
  const __m512 one = _mm512_set1_ps(1.0f);
  const __m512i xi = _mm512_castps_si512(x);
  const __m512 sign = _mm512_castsi512_ps(_mm512_and_si512(xi, _mm512_set1_epi32(INT32_MIN)));
  const __m512 ax = _mm512_castsi512_ps(_mm512_andnot_si512(_mm512_set1_epi32(INT32_MIN), xi));
  const __m512 e = exp_gate16(_mm512_mul_ps(ax, _mm512_set1_ps(-2.0f)));
  const __m512 big = _mm512_div_ps(_mm512_sub_ps(one, e), _mm512_add_ps(one, e));
  const __m512 x2 = _mm512_mul_ps(ax, ax);
  __m512 p = _mm512_set1_ps(21844.0f / 6081075);
  p = _mm512_fmadd_ps(p, x2, _mm512_set1_ps(-1382.0f / 155925));
  p = _mm512_fmadd_ps(p, x2, _mm512_set1_ps(62.0f / 2835));
  p = _mm512_fmadd_ps(p, x2, _mm512_set1_ps(-17.0f / 315));
  p = _mm512_fmadd_ps(p, x2, _mm512_set1_ps(2.0f / 15));
  p = _mm512_fmadd_ps(p, x2, _mm512_set1_ps(-1.0f / 3));
  const __m512 small = _mm512_fmadd_ps(_mm512_mul_ps(p, x2), ax, ax);
  const __mmask16 lo = _mm512_cmp_ps_mask(ax, _mm512_set1_ps(0.4f), _CMP_LT_OQ);
  return or16(_mm512_mask_blend_ps(lo, big, small), sign);
}

// The functions below take the whole vectors of 16 units from j0 and return where they
// stopped; the AVX2 loop does the rest (fewer than 16 units), so that every unit gets the
// bits it got without them.  When these functions took the last units too (masked), a
// unit that the AVX2 loop computes in a partial vector came out 1 ulp apart: its
// partial-vector version rounds differently from its whole-vector one (most likely GCC
// contracting a multiply and an add into an FMA in one of them only; not confirmed).
FUSEDGRU_AVX512_INLINE __m512 ld16(const float* p) { return _mm512_loadu_ps(p); }

// sigmoid(gi + gh + b) of the gate whose units start at offset `at` (j: r, H + j: z).
FUSEDGRU_AVX512_INLINE __m512 gate16(const float* gi, const float* gh, const float* b,
                                     int64_t at) {
  return sigmoid_gate16(_mm512_add_ps(_mm512_add_ps(ld16(gi + at), ld16(gh + at)), ld16(b + at)));
}

// The input side of n: gi's n part plus b_ih's (bp[3H:], see forward_biases).
FUSEDGRU_AVX512_INLINE __m512 gi_n16(const float* gir, const float* bp, int64_t H, int64_t j) {
  return _mm512_add_ps(ld16(gir + 2 * H + j), ld16(bp + 3 * H + j));
}

// h' = n + z (h - n).
FUSEDGRU_AVX512_INLINE __m512 next_h16(__m512 nn, __m512 z, __m512 h) {
  return _mm512_add_ps(nn, _mm512_mul_ps(z, _mm512_sub_ps(h, nn)));
}

// reset_after=True, one row from unit j0: forward_loop's element expressions.
FUSEDGRU_AVX512 int64_t fwd_after_elems16(const float* gir, const float* ghr, const float* bp,
                                       const float* hpr, float* yr, float* wsr, int64_t H,
                                       int64_t j0, int64_t j1) {
  int64_t j = j0;
  for (; j + 16 <= j1; j += 16) {
    const __m512 r = gate16(gir, ghr, bp, j), z = gate16(gir, ghr, bp, H + j);
    const __m512 hn = _mm512_add_ps(ld16(ghr + 2 * H + j), ld16(bp + 2 * H + j));
    const __m512 nn = tanh_gate16(_mm512_add_ps(gi_n16(gir, bp, H, j), _mm512_mul_ps(r, hn)));
    _mm512_storeu_ps(yr + j, next_h16(nn, z, ld16(hpr + j)));
    _mm512_storeu_ps(wsr + j, r);
    _mm512_storeu_ps(wsr + H + j, z);
    _mm512_storeu_ps(wsr + 2 * H + j, nn);
    _mm512_storeu_ps(wsr + 3 * H + j, hn);
  }
  return j;
}

// reset_after=False, one row from unit j0, first half: r, z, r h.
FUSEDGRU_AVX512 int64_t fwd_before_rz16(const float* gir, const float* gr, const float* bp,
                                     const float* hpr, float* rhr, float* wsr, int64_t H,
                                     int64_t j0, int64_t j1) {
  int64_t j = j0;
  for (; j + 16 <= j1; j += 16) {
    const __m512 r = gate16(gir, gr, bp, j), z = gate16(gir, gr, bp, H + j);
    _mm512_storeu_ps(rhr + j, _mm512_mul_ps(r, ld16(hpr + j)));
    _mm512_storeu_ps(wsr + j, r);
    _mm512_storeu_ps(wsr + H + j, z);
  }
  return j;
}

// reset_after=False, second half: n and h'.
FUSEDGRU_AVX512 int64_t fwd_before_n16(const float* gir, const float* ghn, const float* bp,
                                    const float* hpr, float* yr, float* wsr, int64_t H,
                                    int64_t j0, int64_t j1) {
  int64_t j = j0;
  for (; j + 16 <= j1; j += 16) {
    const __m512 hn = _mm512_add_ps(ld16(ghn + j), ld16(bp + 2 * H + j));
    const __m512 nn = tanh_gate16(_mm512_add_ps(gi_n16(gir, bp, H, j), hn));
    _mm512_storeu_ps(yr + j, next_h16(nn, ld16(wsr + H + j), ld16(hpr + j)));
    _mm512_storeu_ps(wsr + 2 * H + j, nn);
    _mm512_storeu_ps(wsr + 3 * H + j, hn);
  }
  return j;
}
#endif

// Whether this call's float32 element phase runs in AVX-512 (read once per call).
template <typename scalar_t>
bool use_pointwise_avx512(const Act<scalar_t>& act) {
#ifdef FUSEDGRU_AVX512_TARGET
  if constexpr (std::is_same_v<scalar_t, float>)
    return act.fast && g_small_avx512.load(std::memory_order_relaxed) &&
           g_pointwise_avx512.load(std::memory_order_relaxed);
#endif
  return false;
}

// One step's product by the path chosen for its R rows: panels (packed once per call),
// the inline loops, or ATen's GEMM (which takes the rows as Tensors).
enum class StepPath { kPanel, kSmall, kGemm };

inline StepPath step_path(int64_t R, const PanelRows& panels, int64_t small_b) {
  if (panels.takes(R)) return StepPath::kPanel;
  return R <= small_b ? StepPath::kSmall : StepPath::kGemm;
}

// out[0:R] = a W^T: a (R, K) contiguous (a_rows the same rows as a Tensor, for the GEMM),
// W (N, K) row-major (pack: its panels, AVX-512 ones when wide; w_t: its (K, N) transposed
// view), out (>= R, N).
template <typename scalar_t>
void step_nt(StepPath path, const scalar_t* a, const Tensor& a_rows, int64_t R, int64_t K,
             const scalar_t* W, const Tensor& pack, bool wide, const Tensor& w_t, int64_t N,
             Tensor& out) {
  scalar_t* o = out.data_ptr<scalar_t>();
  if (path == StepPath::kPanel) {
    panel_gemm_packed(a, K, R, K, pack.data_ptr<scalar_t>(), wide, N, o, N, false);
  } else if (path == StepPath::kSmall) {
    small_nt(a, K, R, K, W, N, o, N, false);
  } else {
    Tensor out_r = out.narrow(0, 0, R);
    at::mm_out(out_r, a_rows, w_t);
  }
}

// out[0:R] (+)= a W: a (R, K) row stride lda (a_rows the same as a Tensor), W (K, N)
// row-major (w the same as a Tensor), out (>= R, N) contiguous; add: accumulate.
template <typename scalar_t>
void step_nn(StepPath path, const scalar_t* a, int64_t lda, const Tensor& a_rows, int64_t R,
             int64_t K, const scalar_t* W, const Tensor& w, int64_t N, Tensor& out, bool add) {
  scalar_t* o = out.data_ptr<scalar_t>();
  if (path == StepPath::kPanel) {
    panel_gemm(a, lda, R, K, W, false, N, o, N, add);
  } else if (path == StepPath::kSmall) {
    if (!add) std::fill_n(o, R * N, scalar_t(0));
    small_nn_add(a, lda, R, K, W, N, o);
  } else {
    Tensor out_r = out.narrow(0, 0, R);
    if (add) out_r.addmm_(a_rows, w);
    else at::mm_out(out_r, a_rows, w);
  }
}

// The state entering step t of each of its R = lay.rows(t) rows, as a pointer to R
// consecutive rows of H and (for ATen's GEMM) the same rows as a Tensor: h0 at t = 0, else
// the first R rows of step t-1's outputs; rows that a reset restarts read zeros, from a
// masked copy in `scratch` (B, H), made only for a step that has a reset.
template <typename scalar_t>
struct StateBefore {
  const Layout& lay;
  const Tensor& h0;
  const Tensor& y;
  Tensor scratch;
  const bool* resets = nullptr;  // (T, B) on the CPU, or null

  StateBefore(const Layout& l, const Tensor& h0_, const Tensor& y_) : lay(l), h0(h0_), y(y_) {
    if (lay.has_resets()) {
      resets = lay.resets.data_ptr<bool>();
      scratch = at::empty({lay.B, y.size(-1)}, y.options());
    }
  }

  std::pair<const scalar_t*, Tensor> at_step(int64_t t, bool want_tensor) {
    const int64_t R = lay.rows(t), H = y.size(-1);
    const scalar_t* p = t == 0 ? h0.data_ptr<scalar_t>()
                               : y.data_ptr<scalar_t>() + lay.first(t - 1) * H;
    const bool* rt = resets ? resets + t * lay.B : nullptr;
    if (rt != nullptr && std::any_of(rt, rt + R, [](bool v) { return v; })) {
      scalar_t* s = scratch.data_ptr<scalar_t>();
      for (int64_t b = 0; b < R; ++b) {
        if (rt[b]) std::fill_n(s + b * H, H, scalar_t(0));
        else std::copy_n(p + b * H, H, s + b * H);
      }
      return {s, want_tensor ? scratch.narrow(0, 0, R) : Tensor()};
    }
    if (!want_tensor) return {p, Tensor()};
    const Tensor src = t == 0 ? h0 : y.view({-1, H}).narrow(0, lay.first(t - 1), R);
    return {p, src.narrow(0, 0, R)};
  }
};

template <typename scalar_t>
void forward_loop(const Tensor& gi,    // x's rows with 3H features = x W_ih^T (forward_biases)
                  const Tensor& h0,    // (B, H)
                  const Tensor& w_hh,  // (3H, H)
                  const Tensor& bias,  // (4H,): forward_biases
                  bool reset_after, Tensor& y /* x's rows with H features */,
                  Tensor& ws /* x's rows with 4H, or a (B, 4H) scratch reused every step */,
                  bool save_ws, const Layout& lay) {
  using Vec = at::vec::Vectorized<scalar_t>;
  const int64_t T = lay.T, B = lay.B, H = w_hh.size(1);
  const scalar_t* gi_p = gi.data_ptr<scalar_t>();
  const scalar_t* b_p = bias.data_ptr<scalar_t>();
  scalar_t* y_p = y.data_ptr<scalar_t>();
  scalar_t* ws_p = ws.data_ptr<scalar_t>();
  StateBefore<scalar_t> before(lay, h0, y);
  // Where step t's ws rows start: its first row when ws keeps every step for the backward,
  // 0 when it is one step's scratch (inference: r, z, n, hn stay in cache).
  auto ws_first = [&](int64_t t) { return save_ws ? lay.first(t) : 0; };

  const int64_t small_b = fwd_small_rows<scalar_t>(H);
  const bool wide_ok = use_wide_panels<scalar_t>();  // read once: rule, packing and use agree
  const PanelRows prows =
      panel_rows_for(false, T, H, g_small_b.load(std::memory_order_relaxed), wide_ok);
  const Act<scalar_t> act{g_fast_act.load(std::memory_order_relaxed)};
  const bool pw16 = use_pointwise_avx512(act);
  (void)pw16;  // read by the AVX-512 build only
  // Panels of W_hh when some step takes them (rows never grow with t: the first step has
  // the most, the last the fewest).
  const bool panels = lay.rows(T - 1) <= prows.hi && lay.rows(0) > prows.lo;
  const bool wide = panels && wide_ok;
  const scalar_t* w_p = w_hh.data_ptr<scalar_t>();
  if (reset_after) {
    const Tensor w_t = w_hh.t();                 // (H, 3H) view, no copy
    Tensor gh = at::empty({B, 3 * H}, gi.options());  // h W_hh^T, reused every step
    scalar_t* gh_p = gh.data_ptr<scalar_t>();
    const Tensor wpack = panels ? pack_panels(w_p, 3 * H, H, gi.options(), wide) : Tensor();
    for (int64_t t = 0; t < T; ++t) {
      const int64_t R = lay.rows(t), row0 = lay.first(t), ws0 = ws_first(t);
      const StepPath path = step_path(R, prows, small_b);
      const auto state = before.at_step(t, path == StepPath::kGemm);
      const scalar_t* hp_p = state.first;  // (a structured binding: not capturable in C++17)
      step_nt(path, hp_p, state.second, R, H, w_p, wpack, wide, w_t, 3 * H, gh);
      for_rows_and_chunks(R, H, [&](int64_t b, int64_t j0, int64_t j1) {
        const int64_t row = row0 + b;
        const scalar_t* gir = gi_p + row * 3 * H;
        const scalar_t* ghr = gh_p + b * 3 * H;
        const scalar_t* hpr = hp_p + b * H;
        scalar_t* yr = y_p + row * H;
        scalar_t* wsr = ws_p + (ws0 + b) * 4 * H;
#ifdef FUSEDGRU_AVX512_TARGET
        if constexpr (std::is_same_v<scalar_t, float>) {
          if (pw16) j0 = fwd_after_elems16(gir, ghr, b_p, hpr, yr, wsr, H, j0, j1);
        }
#endif
        for_vectors<Vec>(j0, j1, [&](int64_t j, int64_t n) {
          const Vec r = act.sig(ld<Vec>(gir + j, n) + ld<Vec>(ghr + j, n) + ld<Vec>(b_p + j, n));
          const Vec z = act.sig(ld<Vec>(gir + H + j, n) + ld<Vec>(ghr + H + j, n) +
                                ld<Vec>(b_p + H + j, n));
          const Vec hn = ld<Vec>(ghr + 2 * H + j, n) + ld<Vec>(b_p + 2 * H + j, n);
          const Vec gin = ld<Vec>(gir + 2 * H + j, n) + ld<Vec>(b_p + 3 * H + j, n);
          const Vec nn = act.tanh(gin + r * hn);
          const Vec h = ld<Vec>(hpr + j, n);
          st(nn + z * (h - nn), yr + j, n);
          st(r, wsr + j, n);
          st(z, wsr + H + j, n);
          st(nn, wsr + 2 * H + j, n);
          st(hn, wsr + 3 * H + j, n);
        });
      });
    }
    return;
  }

  // reset_after=False: [r, z] from h, then W_hn applied to r * h (two GEMMs per step).
  const Tensor w_rz_t = w_hh.narrow(0, 0, 2 * H).t();  // (H, 2H)
  const Tensor w_n_t = w_hh.narrow(0, 2 * H, H).t();   // (H, H)
  Tensor grz = at::empty({B, 2 * H}, gi.options());
  Tensor rh = at::empty({B, H}, gi.options());
  Tensor ghn = at::empty({B, H}, gi.options());
  scalar_t* grz_p = grz.data_ptr<scalar_t>();
  scalar_t* rh_p = rh.data_ptr<scalar_t>();
  scalar_t* ghn_p = ghn.data_ptr<scalar_t>();
  const Tensor rzpack = panels ? pack_panels(w_p, 2 * H, H, gi.options(), wide) : Tensor();
  const Tensor npack =
      panels ? pack_panels(w_p + 2 * H * H, H, H, gi.options(), wide) : Tensor();
  for (int64_t t = 0; t < T; ++t) {
    const int64_t R = lay.rows(t), row0 = lay.first(t), ws0 = ws_first(t);
    const StepPath path = step_path(R, prows, small_b);
    const auto state = before.at_step(t, path == StepPath::kGemm);
    const scalar_t* hp_p = state.first;  // (a structured binding: not capturable in C++17)
    step_nt(path, hp_p, state.second, R, H, w_p, rzpack, wide, w_rz_t, 2 * H, grz);
    for_rows_and_chunks(R, H, [&](int64_t b, int64_t j0, int64_t j1) {
      const int64_t row = row0 + b;
      const scalar_t* gir = gi_p + row * 3 * H;
      const scalar_t* gr = grz_p + b * 2 * H;
      scalar_t* wsr = ws_p + (ws0 + b) * 4 * H;
#ifdef FUSEDGRU_AVX512_TARGET
      if constexpr (std::is_same_v<scalar_t, float>) {
        if (pw16) j0 = fwd_before_rz16(gir, gr, b_p, hp_p + b * H, rh_p + b * H, wsr, H, j0, j1);
      }
#endif
      for_vectors<Vec>(j0, j1, [&](int64_t j, int64_t n) {
        const Vec r = act.sig(ld<Vec>(gir + j, n) + ld<Vec>(gr + j, n) + ld<Vec>(b_p + j, n));
        const Vec z = act.sig(ld<Vec>(gir + H + j, n) + ld<Vec>(gr + H + j, n) +
                              ld<Vec>(b_p + H + j, n));
        st(r * ld<Vec>(hp_p + b * H + j, n), rh_p + b * H + j, n);
        st(r, wsr + j, n);
        st(z, wsr + H + j, n);
      });
    });
    step_nt(path, rh_p, path == StepPath::kGemm ? rh.narrow(0, 0, R) : Tensor(), R, H,
            w_p + 2 * H * H, npack, wide, w_n_t, H, ghn);
    for_rows_and_chunks(R, H, [&](int64_t b, int64_t j0, int64_t j1) {
      const int64_t row = row0 + b;
      const scalar_t* gir = gi_p + row * 3 * H;
      scalar_t* yr = y_p + row * H;
      scalar_t* wsr = ws_p + (ws0 + b) * 4 * H;
#ifdef FUSEDGRU_AVX512_TARGET
      if constexpr (std::is_same_v<scalar_t, float>) {
        if (pw16) j0 = fwd_before_n16(gir, ghn_p + b * H, b_p, hp_p + b * H, yr, wsr, H, j0, j1);
      }
#endif
      for_vectors<Vec>(j0, j1, [&](int64_t j, int64_t n) {
        const Vec hn = ld<Vec>(ghn_p + b * H + j, n) + ld<Vec>(b_p + 2 * H + j, n);
        const Vec gin = ld<Vec>(gir + 2 * H + j, n) + ld<Vec>(b_p + 3 * H + j, n);
        const Vec nn = act.tanh(gin + hn);
        const Vec z = ld<Vec>(wsr + H + j, n);
        const Vec h = ld<Vec>(hp_p + b * H + j, n);
        st(nn + z * (h - nn), yr + j, n);
        st(nn, wsr + 2 * H + j, n);
        st(hn, wsr + 3 * H + j, n);
      });
    });
  }
}

// b_ih folded into the element phase instead of into gi (switch
// fusedgru::_set_cpu_fold_bias_ih, default on): ATen's addmm copies b_ih into every row of
// its output before the GEMM adds into it, and the inline and panel products did the same,
// a pass over N x 3H (at B=64 H=256 T=1, 196 KB: ~4% of a GRUCell call; at T*B = 4096
// rows, 12.6 MB).  The element phase adds a vector more per n gate instead.
std::atomic<bool> g_fold_bias_ih{true};

bool set_fold_bias_ih(bool on) { return g_fold_bias_ih.exchange(on); }

// The element phase's biases (4H): [b_ih + b_hh for r and z | b_hh for n | b_ih for n]
// (absent ones zeros); fold false: [b_hh | 0] (b_ih is in gi).  Filled by one loop: as
// ATen ops (zeros, narrow, copy_, add_) it took ~4 us of a 36 us B=1 H=256 call.
template <typename scalar_t>
Tensor forward_biases(const std::optional<Tensor>& b_ih_, const std::optional<Tensor>& b_hh_,
                      int64_t H, const at::TensorOptions& opts, bool fold) {
  Tensor bias = at::empty({4 * H}, opts);
  scalar_t* o = bias.data_ptr<scalar_t>();
  const Tensor b_hh = b_hh_.has_value() ? b_hh_->contiguous() : Tensor();
  const Tensor b_ih = b_ih_.has_value() && fold ? b_ih_->contiguous() : Tensor();
  const scalar_t* bh = b_hh.defined() ? b_hh.data_ptr<scalar_t>() : nullptr;
  const scalar_t* bi = b_ih.defined() ? b_ih.data_ptr<scalar_t>() : nullptr;
  for (int64_t j = 0; j < 3 * H; ++j) {
    const scalar_t h = bh ? bh[j] : scalar_t(0);
    o[j] = bi && j < 2 * H ? h + bi[j] : h;
  }
  for (int64_t j = 0; j < H; ++j) o[3 * H + j] = bi ? bi[2 * H + j] : scalar_t(0);
  return bias;
}

// The forward of gru_fwd (save_ws: ws keeps every step for the backward) and gru_infer
// (ws is one step's scratch).  Returns {y, ws (both laid out like x: (T, B, .) dense,
// (N, .) packed) or the (1, B, 4H) scratch}.
std::tuple<Tensor, Tensor> forward_cpu(const char* op, bool save_ws, const Tensor& x_,
                                       const std::optional<Tensor>& h0_, const Tensor& w_ih_,
                                       const Tensor& w_hh_, const std::optional<Tensor>& b_ih_,
                                       const std::optional<Tensor>& b_hh_, bool reset_after,
                                       const std::optional<Tensor>& batch_sizes,
                                       const std::optional<Tensor>& resets) {
  Layout lay;
  const Dims d = check_inputs(op, x_, h0_, w_ih_, w_hh_, b_ih_, b_hh_, batch_sizes, resets, lay);
  TORCH_CHECK(x_.device().is_cpu(), op, ": expected CPU tensors, got ", x_.device());
  TORCH_CHECK(x_.scalar_type() == at::kFloat || x_.scalar_type() == at::kDouble, op,
              ": supports float32 and float64, got ", x_.scalar_type());
  const Tensor x = x_.contiguous(), w_ih = w_ih_.contiguous(), w_hh = w_hh_.contiguous();
  Tensor y = at::empty(rows_shape(lay, d.H), x.options());
  Tensor ws = save_ws ? at::empty(rows_shape(lay, 4 * d.H), x.options())
                      : at::empty({1, d.B, 4 * d.H}, x.options());
  poison(y);
  poison(ws);
  if (d.T == 0 || d.B == 0) return {y, ws};
  const Tensor h0 = h0_.has_value() ? h0_->contiguous() : at::zeros({d.B, d.H}, x.options());
  const bool fold = g_fold_bias_ih.load(std::memory_order_relaxed);
  const bool gi_bias = b_ih_.has_value() && !fold;  // b_ih in gi (the switch off)
  const Tensor x2 = x.view({lay.N, d.I});
  // gi = x W_ih^T (+ b_ih with the switch off): one GEMM over all rows (T*B, or N packed:
  // no padding); inline for a few rows (T=1 calls).
  const bool is_f32 = x.scalar_type() == at::kFloat;
  const bool small_gi = is_f32 ? lay.N <= fwd_small_rows<float>(d.I)
                               : lay.N <= fwd_small_rows<double>(d.I);
  const bool panel_gi = !small_gi && is_f32 && use_wide_panels<float>() &&
                        g_wide_gi.load(std::memory_order_relaxed);
  Tensor gi = small_gi || panel_gi
                  ? at::empty({lay.N, 3 * d.H}, x.options())
                  : (gi_bias ? at::addmm(*b_ih_, x2, w_ih.t()) : at::mm(x2, w_ih.t()));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "gru_fwd_cpu", [&] {
    const Tensor bias = forward_biases<scalar_t>(b_ih_, b_hh_, d.H, x.options(), fold);
    if (panel_gi) {
      scalar_t* gi_p = gi.data_ptr<scalar_t>();
      const int64_t G = 3 * d.H;
      if (gi_bias) {
        const Tensor b = b_ih_->contiguous();
        for (int64_t r = 0; r < lay.N; ++r) std::copy_n(b.data_ptr<scalar_t>(), G, gi_p + r * G);
      }
      const Tensor pack = pack_panels(w_ih.data_ptr<scalar_t>(), G, d.I, x.options(), true);
      panel_gemm_packed(x2.data_ptr<scalar_t>(), d.I, lay.N, d.I, pack.data_ptr<scalar_t>(),
                        true, G, gi_p, G, gi_bias);
    } else if (small_gi) {
      scalar_t* gi_p = gi.data_ptr<scalar_t>();
      const int64_t rows = lay.N, G = 3 * d.H;
      if (gi_bias) {
        const Tensor b = b_ih_->contiguous();
        for (int64_t r = 0; r < rows; ++r)
          std::copy_n(b.data_ptr<scalar_t>(), G, gi_p + r * G);
      }
      small_nt(x2.data_ptr<scalar_t>(), d.I, rows, d.I, w_ih.data_ptr<scalar_t>(), G, gi_p, G,
               gi_bias);
    }
    forward_loop<scalar_t>(gi, h0, w_hh, bias, reset_after, y, ws, save_ws, lay);
  });
  return {y, ws};
}

std::tuple<Tensor, Tensor> gru_fwd_cpu(const Tensor& x, const std::optional<Tensor>& h0,
                                       const Tensor& w_ih, const Tensor& w_hh,
                                       const std::optional<Tensor>& b_ih,
                                       const std::optional<Tensor>& b_hh, bool reset_after,
                                       const std::optional<Tensor>& batch_sizes,
                                       const std::optional<Tensor>& resets) {
  return forward_cpu("fusedgru::gru_fwd (cpu)", true, x, h0, w_ih, w_hh, b_ih, b_hh,
                     reset_after, batch_sizes, resets);
}

Tensor gru_infer_cpu(const Tensor& x, const std::optional<Tensor>& h0, const Tensor& w_ih,
                     const Tensor& w_hh, const std::optional<Tensor>& b_ih,
                     const std::optional<Tensor>& b_hh, bool reset_after,
                     const std::optional<Tensor>& batch_sizes,
                     const std::optional<Tensor>& resets) {
  return std::get<0>(forward_cpu("fusedgru::gru_infer (cpu)", false, x, h0, w_ih, w_hh, b_ih,
                                 b_hh, reset_after, batch_sizes, resets));
}

// fusedgru::gru_cell_infer: gru_infer of one step, (B, I) -> h' (B, H) (the lean
// FusedGRUCell call's): the (1, B, I) view in and the select out, done here, cost ~1.2 us
// from Python of a B=1 H=64 call of ~11 (two dispatches through the Python binding).
Tensor gru_cell_infer_cpu(const Tensor& x, const std::optional<Tensor>& h0, const Tensor& w_ih,
                          const Tensor& w_hh, const std::optional<Tensor>& b_ih,
                          const std::optional<Tensor>& b_hh, bool reset_after) {
  TORCH_CHECK(x.dim() == 2, "fusedgru::gru_cell_infer (cpu): x: expected a 2-D (B, I) tensor, got ",
              x.dim(), "-D");
  return gru_infer_cpu(x.unsqueeze(0), h0, w_ih, w_hh, b_ih, b_hh, reset_after, std::nullopt,
                       std::nullopt)
      .squeeze(0);
}

// ---------------------------------------------------------------------------------------
// Backward (SPEC section 4)
// ---------------------------------------------------------------------------------------

// Fills dgi / dgh (laid out like y, 3H features) and returns dh0 (B, H).  hprev: the state
// entering each row's step, laid out like y (states_before: zeros where a reset restarts
// it).  A row inactive at step t (packed) is inactive at every later step, so its dh is
// still zero when the reverse-time loop reaches its last step; a reset at step t stops the
// gradient: dh of those rows is zeroed after the step.
template <typename scalar_t>
Tensor backward_loop(const Tensor& grad_y, const Tensor& hprev, const Tensor& w_hh,
                     const Tensor& ws, bool reset_after, Tensor& dgi, Tensor& dgh,
                     const Layout& lay) {
  using Vec = at::vec::Vectorized<scalar_t>;
  const int64_t T = lay.T, B = lay.B, H = w_hh.size(1);
  const bool* resets = lay.has_resets() ? lay.resets.data_ptr<bool>() : nullptr;
  const scalar_t* gy_p = grad_y.data_ptr<scalar_t>();
  const scalar_t* hp_p = hprev.data_ptr<scalar_t>();
  const scalar_t* ws_p = ws.data_ptr<scalar_t>();
  scalar_t* dgi_p = dgi.data_ptr<scalar_t>();
  scalar_t* dgh_p = dgh.data_ptr<scalar_t>();
  // dh: what step t+1 sends back to step t; overwritten in place by each step.
  Tensor dh = at::zeros({B, H}, grad_y.options());
  scalar_t* dh_p = dh.data_ptr<scalar_t>();
  const Tensor dgh2 = dgh.view({-1, 3 * H});
  auto stop_at_resets = [&](int64_t t) {
    if (resets == nullptr) return;
    for (int64_t b = 0; b < lay.rows(t); ++b)
      if (resets[t * B + b]) std::fill_n(dh_p + b * H, H, scalar_t(0));
  };
  const int64_t small_b = small_rows(g_small_bwd_step);
  const PanelRows prows = panel_rows_for(true, T, H, small_b, false);
  const scalar_t* w_p = w_hh.data_ptr<scalar_t>();
  const Vec one(1);

  if (reset_after) {
    for (int64_t t = T - 1; t >= 0; --t) {
      const int64_t R = lay.rows(t), row0 = lay.first(t);
      for_rows_and_chunks(R, H, [&](int64_t b, int64_t j0, int64_t j1) {
        const int64_t row = row0 + b;
        const scalar_t* wsr = ws_p + row * 4 * H;
        const scalar_t* gyr = gy_p + row * H;
        const scalar_t* hr = hp_p + row * H;
        scalar_t* dir = dgi_p + row * 3 * H;
        scalar_t* dhr_ = dgh_p + row * 3 * H;
        scalar_t* dhb = dh_p + b * H;
        for_vectors<Vec>(j0, j1, [&](int64_t j, int64_t n) {
          const Vec g = ld<Vec>(gyr + j, n) + ld<Vec>(dhb + j, n);
          const Vec r = ld<Vec>(wsr + j, n), z = ld<Vec>(wsr + H + j, n);
          const Vec nn = ld<Vec>(wsr + 2 * H + j, n), hn = ld<Vec>(wsr + 3 * H + j, n);
          const Vec h = ld<Vec>(hr + j, n);
          const Vec da_n = g * (one - z) * (one - nn * nn);
          const Vec da_z = g * (h - nn) * z * (one - z);
          const Vec da_r = da_n * hn * r * (one - r);
          st(da_r, dir + j, n);
          st(da_z, dir + H + j, n);
          st(da_n, dir + 2 * H + j, n);
          st(da_r, dhr_ + j, n);
          st(da_z, dhr_ + H + j, n);
          st(da_n * r, dhr_ + 2 * H + j, n);
          st(g * z, dhb + j, n);
        });
      });
      // dh = g * z + dgh_t W_hh   (B,3H) x (3H,H), in place
      const StepPath path = step_path(R, prows, small_b);
      step_nn(path, dgh_p + row0 * 3 * H, 3 * H,
              path == StepPath::kGemm ? dgh2.narrow(0, row0, R) : Tensor(), R, 3 * H, w_p, w_hh,
              H, dh, true);
      stop_at_resets(t);
    }
    return dh;
  }

  // reset_after=False: dgi == dgh = [da_r, da_z, da_n]; the caller passes the same tensor.
  const Tensor w_rz = w_hh.narrow(0, 0, 2 * H);  // (2H, H)
  const Tensor w_n = w_hh.narrow(0, 2 * H, H);    // (H, H)
  Tensor drh = at::empty({B, H}, grad_y.options());  // d(r * h) = da_n W_hn
  scalar_t* drh_p = drh.data_ptr<scalar_t>();
  for (int64_t t = T - 1; t >= 0; --t) {
    const int64_t R = lay.rows(t), row0 = lay.first(t);
    for_rows_and_chunks(R, H, [&](int64_t b, int64_t j0, int64_t j1) {
      const int64_t row = row0 + b;
      const scalar_t* wsr = ws_p + row * 4 * H;
      const scalar_t* gyr = gy_p + row * H;
      const scalar_t* hr = hp_p + row * H;
      scalar_t* dr = dgh_p + row * 3 * H;
      scalar_t* dhb = dh_p + b * H;
      for_vectors<Vec>(j0, j1, [&](int64_t j, int64_t n) {
        const Vec g = ld<Vec>(gyr + j, n) + ld<Vec>(dhb + j, n);
        const Vec z = ld<Vec>(wsr + H + j, n), nn = ld<Vec>(wsr + 2 * H + j, n);
        const Vec h = ld<Vec>(hr + j, n);
        st(g * (h - nn) * z * (one - z), dr + H + j, n);
        st(g * (one - z) * (one - nn * nn), dr + 2 * H + j, n);
        st(g * z, dhb + j, n);
      });
    });
    const Tensor dgt = dgh2.narrow(0, row0, R);
    const scalar_t* dgt_p = dgh_p + row0 * 3 * H;
    const StepPath path = step_path(R, prows, small_b);
    const bool gemm = path == StepPath::kGemm;
    step_nn(path, dgt_p + 2 * H, 3 * H, gemm ? dgt.narrow(1, 2 * H, H) : Tensor(), R, H,
            w_p + 2 * H * H, w_n, H, drh, false);
    for_rows_and_chunks(R, H, [&](int64_t b, int64_t j0, int64_t j1) {
      const int64_t row = row0 + b;
      const scalar_t* wsr = ws_p + row * 4 * H;
      const scalar_t* hr = hp_p + row * H;
      scalar_t* dr = dgh_p + row * 3 * H;
      scalar_t* dhb = dh_p + b * H;
      const scalar_t* drhb = drh_p + b * H;
      for_vectors<Vec>(j0, j1, [&](int64_t j, int64_t n) {
        const Vec r = ld<Vec>(wsr + j, n);
        const Vec d = ld<Vec>(drhb + j, n);
        st(d * ld<Vec>(hr + j, n) * r * (one - r), dr + j, n);
        st(ld<Vec>(dhb + j, n) + d * r, dhb + j, n);
      });
    });
    // dh += [da_r, da_z] W_h[rz]
    step_nn(path, dgt_p, 3 * H, gemm ? dgt.narrow(1, 0, 2 * H) : Tensor(), R, 2 * H, w_p, w_rz,
            H, dh, true);
    stop_at_resets(t);
  }
  (void)dgi_p;
  return dh;
}

// What gru_bwd and gru_bwd_acc share: the checks, the reverse-time loop's gate gradients
// dgi / dgh (one tensor when reset_after=False), the states entering each step and dh0.
struct BwdCore {
  Layout lay;
  Tensor x, w_ih, ws, dgi, dgh, hprev, dh0;
};

BwdCore backward_core(const char* op, const Tensor& grad_y_, const Tensor& x_,
                      const std::optional<Tensor>& h0_, const Tensor& w_ih_, const Tensor& w_hh_,
                      const Tensor& y_, const Tensor& ws_, bool reset_after,
                      const std::optional<Tensor>& batch_sizes,
                      const std::optional<Tensor>& resets) {
  BwdCore c;
  Layout& lay = c.lay;
  const Dims d = check_inputs(op, x_, h0_, w_ih_, w_hh_, std::nullopt, std::nullopt, batch_sizes,
                              resets, lay);
  check_backward_extra(op, d, lay, x_, grad_y_, y_, ws_);
  TORCH_CHECK(x_.device().is_cpu(), op, ": expected CPU tensors, got ", x_.device());
  TORCH_CHECK(x_.scalar_type() == at::kFloat || x_.scalar_type() == at::kDouble, op,
              ": supports float32 and float64, got ", x_.scalar_type());
  const int64_t B = d.B, H = d.H;
  c.x = x_.contiguous();
  c.w_ih = w_ih_.contiguous();
  c.ws = ws_.contiguous();
  const Tensor w_hh = w_hh_.contiguous(), grad_y = grad_y_.contiguous(), y = y_.contiguous();
  const Tensor h0 = h0_.has_value() ? h0_->contiguous() : at::zeros({B, H}, c.x.options());

  c.dgh = at::empty(rows_shape(lay, 3 * H), c.x.options());
  c.dgi = reset_after ? at::empty(rows_shape(lay, 3 * H), c.x.options()) : c.dgh;
  poison(c.dgh);
  poison(c.dgi);
  c.hprev = states_before(h0, y, lay);  // laid out like y, contiguous
  AT_DISPATCH_FLOATING_TYPES(c.x.scalar_type(), "gru_bwd_cpu", [&] {
    c.dh0 = backward_loop<scalar_t>(grad_y, c.hprev, w_hh, c.ws, reset_after, c.dgi, c.dgh, lay);
  });
  return c;
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> gru_bwd_cpu(
    const Tensor& grad_y, const Tensor& x, const std::optional<Tensor>& h0, const Tensor& w_ih,
    const Tensor& w_hh, const Tensor& y, const Tensor& ws, bool reset_after,
    const std::optional<Tensor>& batch_sizes, const std::optional<Tensor>& resets, bool need_dx,
    bool need_dw) {
  const BwdCore c = backward_core("fusedgru::gru_bwd (cpu)", grad_y, x, h0, w_ih, w_hh, y, ws,
                                  reset_after, batch_sizes, resets);
  Tensor dx, dw_ih, dw_hh, db_ih, db_hh;
  if (c.lay.N <= small_rows(g_small_wgrad)) {
    AT_DISPATCH_FLOATING_TYPES(c.x.scalar_type(), "gru_bwd_cpu_small", [&] {
      std::tie(dx, dw_ih, dw_hh, db_ih, db_hh) = small_weight_grads<scalar_t>(
          c.dgi, c.dgh, c.x, c.w_ih, c.hprev, c.ws, reset_after, need_dx, need_dw);
    });
  } else {
    std::tie(dx, dw_ih, dw_hh, db_ih, db_hh) = weight_grads(
        c.dgi, c.dgh, c.x, c.w_ih, c.hprev, c.ws, reset_after, need_dx, need_dw);
  }
  return {dx, c.dh0, dw_ih, dw_hh, db_ih, db_hh};
}

// fusedgru::grad_token: the stand-in through which the lean step calls' summed weight
// gradient reaches the weight (fusedgru/modules.py, _grad_token).  Forward: a (3H, K)
// tensor of zero strides over its own 0-dim zero, not a view of w (a view would hold w's
// storage while any graph holds the token, and autograd remakes a view's grad_fn after
// every in-place update of w: an as_strided scatter of the whole gradient); backward: the
// gradient, unchanged, to w.  In C++: as a Python autograd.Function it took 12.7 us a call.
struct GradToken : public torch::autograd::Function<GradToken> {
  static Tensor forward(torch::autograd::AutogradContext*, const Tensor& w) {
    return at::zeros({}, w.options()).expand(w.sizes());
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext*,
                                                 torch::autograd::variable_list grads) {
    return {grads[0]};
  }
};

Tensor grad_token_autograd(const Tensor& w) { return GradToken::apply(w); }

Tensor grad_token_plain(const Tensor& w) { return at::zeros({}, w.options()).expand(w.sizes()); }

// fusedgru::gru_bwd_acc: gru_bwd of a dense call (no batch_sizes / resets) whose weight
// gradients are ADDED into dw_ih / dw_hh (either may be absent: not computed) instead of
// returned: (dx, dh0, db_ih, db_hh).  The lean training call (fusedgru/modules.py) adds
// every step of a backward pass into one buffer per weight: autograd would otherwise get a
// fresh (3H, I) and (3H, H) per step and add each into its own buffer, reading and writing
// them twice more (at H = 256, 1.5 MB a step against a 2 MB L2).  The same bits as that
// add (small_outer: out + sum; ATen's GEMM: addmm_ with beta 1, not bitwise).
std::tuple<Tensor, Tensor, Tensor, Tensor> gru_bwd_acc_cpu(
    const Tensor& grad_y, const Tensor& x, const std::optional<Tensor>& h0, const Tensor& w_ih,
    const Tensor& w_hh, const Tensor& y, const Tensor& ws, bool reset_after, bool need_dx,
    bool need_db, const std::optional<Tensor>& dw_ih, const std::optional<Tensor>& dw_hh) {
  constexpr const char* op = "fusedgru::gru_bwd_acc (cpu)";
  const BwdCore c = backward_core(op, grad_y, x, h0, w_ih, w_hh, y, ws, reset_after,
                                  std::nullopt, std::nullopt);
  const int64_t G = c.dgh.size(-1);
  const auto out_or_none = [&](const std::optional<Tensor>& t, const char* name, int64_t K) {
    if (!t.has_value()) return Tensor();
    TORCH_CHECK(t->sizes() == at::IntArrayRef({G, K}) && t->scalar_type() == c.x.scalar_type()
                    && t->device().is_cpu() && t->is_contiguous(),
                op, ": ", name, ": expected a contiguous ", c.x.scalar_type(), " CPU tensor of shape (",
                G, ", ", K, "), got ", t->scalar_type(), " ", t->sizes(), " on ", t->device(),
                t->is_contiguous() ? "" : " (not contiguous)");
    return *t;
  };
  const Tensor into_ih = out_or_none(dw_ih, "dw_ih", c.x.size(-1));
  const Tensor into_hh = out_or_none(dw_hh, "dw_hh", G / 3);
  const bool small = c.lay.N <= small_rows(g_small_wgrad);
  Tensor dx = at::empty({0}, c.x.options());
  Tensor db_ih = at::empty({0}, c.x.options()), db_hh = at::empty({0}, c.x.options());
  AT_DISPATCH_FLOATING_TYPES(c.x.scalar_type(), "gru_bwd_acc_cpu", [&] {
    if (need_dx) {
      dx = small ? small_dx<scalar_t>(c.dgi, c.x, c.w_ih)
                 : at::mm(c.dgi.reshape({-1, G}), c.w_ih).view(c.x.sizes());
    }
    weight_products<scalar_t>(c.dgi, c.dgh, c.x, c.hprev, c.ws, reset_after, small, true,
                              into_ih, into_hh);
    if (need_db) {
      if (small) {
        std::tie(db_ih, db_hh) = small_bias_grads<scalar_t>(c.dgi, c.dgh);
      } else {
        db_hh = c.dgh.reshape({-1, G}).sum(0);
        db_ih = reset_after ? c.dgi.reshape({-1, G}).sum(0) : db_hh.clone();
      }
    }
  });
  return {dx, c.dh0, db_ih, db_hh};
}

}  // namespace
}  // namespace fusedgru

TORCH_LIBRARY_FRAGMENT(fusedgru, m) {
  m.def("_set_cpu_small_batch(int rows) -> int", &fusedgru::set_small_batch);
  m.def("_set_cpu_small_bwd_step(int rows) -> int", &fusedgru::set_small_bwd_step);
  m.def("_set_cpu_small_wgrad(int rows) -> int", &fusedgru::set_small_wgrad);
  m.def("_set_cpu_panel_rows(int rows) -> int", &fusedgru::set_panel_rows);
  m.def("_set_cpu_fast_activations(bool on) -> bool", &fusedgru::set_fast_activations);
  m.def("_set_cpu_pointwise_avx512(bool on) -> bool", &fusedgru::set_pointwise_avx512);
  m.def("_set_cpu_inline_elems(int n) -> int", &fusedgru::set_inline_elems);
  m.def("_set_cpu_small_pairs(bool on) -> bool", &fusedgru::set_small_pairs);
  m.def("_set_cpu_small_prefetch(int mode) -> int", &fusedgru::set_small_prefetch);
  m.def("_set_cpu_small_split(bool on) -> bool", &fusedgru::set_small_split);
  m.def("_set_cpu_small_avx512(bool on) -> bool", &fusedgru::set_small_avx512);
  m.def("_cpu_has_avx512() -> bool", &fusedgru::cpu_has_avx512);
  m.def("_set_cpu_small_wide(int rows) -> int", &fusedgru::set_small_wide);
  m.def("_set_cpu_small_wide_min_k(int k) -> int", &fusedgru::set_small_wide_min_k);
  m.def("_set_cpu_wide_gi(bool on) -> bool", &fusedgru::set_wide_gi);
  m.def("_set_cpu_outer_nt(bool on) -> bool", &fusedgru::set_outer_nt);
  m.def("_set_cpu_outer_avx512(bool on) -> bool", &fusedgru::set_outer_avx512);
  m.def("_set_cpu_nn_avx512(bool on) -> bool", &fusedgru::set_nn_avx512);
  m.def("_set_cpu_small_task_macs(int macs) -> int", &fusedgru::set_small_task_macs);
  m.def("_set_cpu_llc_bytes(int bytes) -> int", &fusedgru::set_llc_bytes);
  m.def("_set_cpu_fold_bias_ih(bool on) -> bool", &fusedgru::set_fold_bias_ih);
  // Test hook: the forward's float32 activations (sigmoid, tanh) of x, as the kernels
  // compute them under the current switch.
  m.def("_cpu_activations(Tensor x) -> (Tensor, Tensor)", &fusedgru::cpu_activations);
  // gru_infer of one step of a (B, I) input -> (B, H) (CPU only; the lean FusedGRUCell call's)
  m.def(
      "gru_cell_infer(Tensor x, Tensor? h0, Tensor w_ih, Tensor w_hh, Tensor? b_ih, "
      "Tensor? b_hh, bool reset_after) -> Tensor");
  // the lean step calls' gradient token of a weight (see GradToken)
  m.def("grad_token(Tensor w) -> Tensor");
  // gru_bwd with the weight gradients added into dw_ih / dw_hh (CPU only; the lean training
  // call's, below autograd): (dx, dh0, db_ih, db_hh)
  m.def(
      "gru_bwd_acc(Tensor grad_y, Tensor x, Tensor? h0, Tensor w_ih, Tensor w_hh, Tensor y, "
      "Tensor ws, bool reset_after, bool need_dx, bool need_db, Tensor(a!)? dw_ih, "
      "Tensor(b!)? dw_hh) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fusedgru, CPU, m) {
  m.impl("gru_fwd", &fusedgru::gru_fwd_cpu);
  m.impl("gru_infer", &fusedgru::gru_infer_cpu);
  m.impl("gru_bwd", &fusedgru::gru_bwd_cpu);
  m.impl("gru_bwd_acc", &fusedgru::gru_bwd_acc_cpu);
  m.impl("gru_cell_infer", &fusedgru::gru_cell_infer_cpu);
  m.impl("grad_token", &fusedgru::grad_token_plain);
}

TORCH_LIBRARY_IMPL(fusedgru, Autograd, m) {
  m.impl("grad_token", &fusedgru::grad_token_autograd);
}
