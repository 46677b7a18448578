// The device code of the "cuda" backend: warp tiles, phases, the persistent and per-step
// kernels of the forward (gru_fwd, gru_infer) and the backward (gru_bwd), and the layout part
// of the launch plan (block count, padded sizes, shared-memory layout).
//
// ONE source text, two compilers:
// - nvcc (csrc/gru_cuda.cu includes this file): the GPU kernels, launched by gru_cuda.cu;
// - the host C++ compiler (csrc/host/gru_host_main.cpp): the same kernels run on the CPU, one
//   OS thread per CUDA thread, with csrc/host/cuda_host_shim.h standing in for what CUDA
//   provides (threadIdx..., __syncthreads, grid.sync, dynamic shared memory, wmma, __half /
//   __nv_bfloat16), under ThreadSanitizer and AddressSanitizer (tests/test_cuda_host.py).
// Nothing below is written for the host: what differs between the two lives in the shim,
// and in FUSEDGRU_DYNAMIC_SMEM (the one construct a shim cannot stand in for; see below).
//
// Dimension legend: T timesteps, B batch, I input features, H hidden units, G = 3 gates
// (r, z, n).  Padded sizes: Hp = H rounded up to 16 (units and K), Bp = B rounded up to 16.
// Semantics: fusedgru/reference.py, line for line (SPEC sections 1 and 4).  The design is
// described at the top of gru_cuda.cu.
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>
#include <type_traits>
#include <utility>

#if defined(__CUDACC__)
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_pipeline.h>
#include <mma.h>
#else
#include "host/cuda_host_shim.h"
#endif

namespace fusedgru {
namespace cuda_gru {

namespace cg = cooperative_groups;

#if defined(__CUDACC__)
// Declares `name`, the block's dynamic shared memory (unsigned char[], 128-byte aligned).
// The one construct the host cannot shim as written: a block-scope
// `extern __shared__ unsigned char smem[]` names ONE namespace-scope object at one address,
// and every block needs its own (thread_local would give every thread its own; mapping
// per-thread copies onto one block buffer would hide races between a block's threads from
// ThreadSanitizer, which tracks virtual addresses).  So the declaration is this macro, and
// the host shim defines it as a pointer to the block's buffer.  A macro, not an inline
// accessor function: with the accessor nvcc emitted different code (fewer registers in the
// step kernels), with the macro the cubin is the one the plain declaration gave.
#define FUSEDGRU_DYNAMIC_SMEM(name) extern __shared__ __align__(128) unsigned char name[]
#endif

constexpr int kUnits = 16;               // hidden units per block: one 16-wide MMA tile per gate
constexpr int kThreads = 256;            // 8 warps per block
constexpr int kWarps = kThreads / 32;
constexpr int kTileElems = 16 * 16;      // one 16 x 16 accumulator tile
constexpr int kMaxMTilesPerPass = 8;     // batch rows per GEMM+elementwise pass: 8 x 16 = 128

// ---------------------------------------------------------------------------------------
// Scalar helpers: load any storage type as its accumulation type, store back rounded.
// ---------------------------------------------------------------------------------------

__device__ __forceinline__ int64_t imin64(int64_t a, int64_t b) { return a < b ? a : b; }

__device__ __forceinline__ float ldf(const float* p) { return *p; }
__device__ __forceinline__ double ldf(const double* p) { return *p; }
__device__ __forceinline__ float ldf(const __half* p) { return __half2float(*p); }
__device__ __forceinline__ float ldf(const __nv_bfloat16* p) { return __bfloat162float(*p); }

__device__ __forceinline__ void stf(float* p, float v) { *p = v; }
__device__ __forceinline__ void stf(double* p, double v) { *p = v; }
__device__ __forceinline__ void stf(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void stf(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

// Accurate (not --use_fast_math) transcendental functions: the fp32 budget is 2x PyTorch's
// own error + 1e-6.
__device__ __forceinline__ float sigm(float x) { return 1.f / (1.f + expf(-x)); }
__device__ __forceinline__ double sigm(double x) { return 1.0 / (1.0 + exp(-x)); }
__device__ __forceinline__ float tanh_(float x) { return tanhf(x); }
__device__ __forceinline__ double tanh_(double x) { return tanh(x); }

// ---------------------------------------------------------------------------------------
// Warp tile: out (16 x 16, row-major, acc_t) = A (16 rows x [k0, k1), row-major, lda) x W^T
// where W holds the 16 output columns as rows: B(k, n) = W[n * ldw + k] (col-major B).
// k0, k1 are multiples of 16; A and W are padded with zeros to k1.
// ---------------------------------------------------------------------------------------

// How a block's products run: the kernels' last template argument (MM).
constexpr int kFma = 0;     // CUDA cores, FMAs in acc_t: float64, and strict float32 under
                            // fusedgru::_set_cuda_fp32_path(1) (the path before issue 18)
constexpr int kTc = 1;      // tensor cores, one product per operand pair: bf16, fp16, and
                            // float32 as TF32 (when torch lets cuDNN's RNN use TF32)
constexpr int k3xTf32 = 2;  // float32 on TF32 tensor cores in split precision: strict float32

template <typename op_t>
struct Wmma;  // tensor-core shapes per operand type
template <>
struct Wmma<__half> {
  static constexpr int K = 16;
  using frag_t = __half;
};
template <>
struct Wmma<__nv_bfloat16> {
  static constexpr int K = 16;
  using frag_t = __nv_bfloat16;
};
template <>
struct Wmma<float> {  // TF32: 10-bit mantissa operands, fp32 accumulation
  static constexpr int K = 8;
  using frag_t = nvcuda::wmma::precision::tf32;
};

// 3xTF32: splits every element of a tf32 fragment holding float32 values v into
// hi = tf32(v) (kept in f) and lo = tf32(v - hi) (v - hi is exact in float32), so that
// v = hi + lo to ~2^-22 relative.  Round to nearest (cvt.rna) both times.  hi's 13 low
// bits are cleared here: __float_to_tf32 does not clear them (sm_90 SASS: an integer add
// of 0x1000, no mask; the tensor core ignores those bits), and v - hi needs the value the
// tensor core reads.  lo's low bits only reach the tensor core.
template <typename Frag>
__device__ __forceinline__ void split_tf32(Frag& f, Frag& lo) {
#pragma unroll
  for (int i = 0; i < f.num_elements; ++i) {
    const float v = f.x[i];
    const float hi = __uint_as_float(__float_as_uint(nvcuda::wmma::__float_to_tf32(v)) &
                                     0xFFFFE000u);
    lo.x[i] = nvcuda::wmma::__float_to_tf32(v - hi);
    f.x[i] = hi;
  }
}

template <typename op_t, typename acc_t, int MM>
__device__ __forceinline__ void warp_tile(const op_t* A, int lda, const op_t* W, int ldw,
                                          int k0, int k1, acc_t* out) {
  // No __restrict__ on A: it is a buffer other blocks write during the same persistent
  // launch (visible after grid.sync()); const + restrict would let nvcc use the
  // non-coherent read-only path (LDG.NC), which may return stale lines.
  if constexpr (MM == k3xTf32) {
    // Split precision on TF32 tensor cores (strict float32): a b = a_hi b_hi + a_hi b_lo +
    // a_lo b_hi (a_lo b_lo, ~2^-22 relative, dropped), float32 accumulation.  Three
    // accumulators, summed once after the loop: each one's dependent chain of HMMAs is as
    // long as the TF32 path's (one accumulator would make it three times as long).  W's
    // split is made on the fragment after each load (a packed hi / lo W slice would double
    // the resident shared memory: fp32 H > ~575 would leave the persistent kernels).
    static_assert(std::is_same_v<op_t, float> && std::is_same_v<acc_t, float>,
                  "3xTF32 is a float32 path");
    namespace wmma = nvcuda::wmma;
    using tf32 = wmma::precision::tf32;
    wmma::fragment<wmma::matrix_a, 16, 16, 8, tf32, wmma::row_major> a, a_lo;
    wmma::fragment<wmma::matrix_b, 16, 16, 8, tf32, wmma::col_major> b, b_lo;
    wmma::fragment<wmma::accumulator, 16, 16, 8, float> c, c_hl, c_lh;
    wmma::fill_fragment(c, 0.f);
    wmma::fill_fragment(c_hl, 0.f);
    wmma::fill_fragment(c_lh, 0.f);
    // Two k-steps per iteration, as nvcc unrolls the TF32 loop by itself: 16 loads in
    // flight per wait instead of 8 (the loop is bound by the latency of the A loads).
#pragma unroll 2
    for (int k = k0; k < k1; k += 8) {
      wmma::load_matrix_sync(a, A + k, lda);
      wmma::load_matrix_sync(b, W + k, ldw);
      split_tf32(a, a_lo);
      split_tf32(b, b_lo);
      wmma::mma_sync(c_hl, a, b_lo, c_hl);
      wmma::mma_sync(c_lh, a_lo, b, c_lh);
      wmma::mma_sync(c, a, b, c);
    }
#pragma unroll
    for (int i = 0; i < c.num_elements; ++i) c.x[i] += c_hl.x[i] + c_lh.x[i];
    wmma::store_matrix_sync(out, c, 16, wmma::mem_row_major);
  } else if constexpr (MM == kTc) {
    namespace wmma = nvcuda::wmma;
    using S = Wmma<op_t>;
    wmma::fragment<wmma::matrix_a, 16, 16, S::K, typename S::frag_t, wmma::row_major> a;
    wmma::fragment<wmma::matrix_b, 16, 16, S::K, typename S::frag_t, wmma::col_major> b;
    wmma::fragment<wmma::accumulator, 16, 16, S::K, float> c;
    wmma::fill_fragment(c, 0.f);
    for (int k = k0; k < k1; k += S::K) {
      wmma::load_matrix_sync(a, A + k, lda);
      wmma::load_matrix_sync(b, W + k, ldw);
      if constexpr (std::is_same_v<op_t, float>) {
#pragma unroll
        for (int i = 0; i < a.num_elements; ++i) a.x[i] = wmma::__float_to_tf32(a.x[i]);
#pragma unroll
        for (int i = 0; i < b.num_elements; ++i) b.x[i] = wmma::__float_to_tf32(b.x[i]);
      }
      wmma::mma_sync(c, a, b, c);
    }
    wmma::store_matrix_sync(out, c, 16, wmma::mem_row_major);
  } else {
    // CUDA cores (float64; strict float32 under _set_cuda_fp32_path(1)): lane -> row m,
    // 8 columns.
    const int lane = threadIdx.x & 31;
    const int m = lane & 15, n0 = (lane >> 4) * 8;
    acc_t s[8];
#pragma unroll
    for (int c = 0; c < 8; ++c) s[c] = acc_t(0);
    const op_t* a_row = A + static_cast<int64_t>(m) * lda;
    for (int k = k0; k < k1; ++k) {
      const acc_t a = ldf(a_row + k);
#pragma unroll
      for (int c = 0; c < 8; ++c) s[c] += a * ldf(W + (n0 + c) * ldw + k);
    }
#pragma unroll
    for (int c = 0; c < 8; ++c) out[m * 16 + n0 + c] = s[c];
  }
}

// Geometry shared by the host planner and the kernels.
struct Geom {
  int64_t T, B, H;
  int Hp, Bp, MT;  // MT = Bp / 16 batch tiles
  int ldw;         // row stride of the packed W slice (K + 16 bytes: no bank conflicts)
  int nsplit;      // K split across warps when there are fewer tiles than warps
  // The MMA's A operand staged in shared memory (fusedgru::_set_cuda_step_variant(1),
  // plan_staging): row stride in elements, 0 = A read from global memory inside the k loop
  // (the old step); a_off: byte offset of the staging buffer in dynamic shared memory.
  int lds = 0;
  int a_off = 0;
  // The persistent forward's split-barrier step (fusedgru::_set_cuda_step_variant bit 2,
  // plan_split, fwd_split_loop): 1 = on, 0 = the old loop (fwd_phase per step).
  int split = 0;
  // Batch groups (step variant bit 8, plan_groups): the launch's blocks are ngroups x nbu,
  // block = group * nbu + unit block; the nbu unit blocks each own 16 hidden units (their W
  // slice) as before, and group gr computes batch tiles [gr * mtg, (gr + 1) * mtg) only.
  // plan_layout: nbu = Hp / 16, mtg = MT (one group: every block does every batch tile).
  int nbu = 0;
  int mtg = 0;
  // The cluster forward (step variant bit 16, plan_cluster, fwd_cluster_loop): the launch is
  // ONE thread block cluster of `cluster` blocks (0 = not a cluster launch), block `rank`
  // owning q unit blocks (units [16 q rank, 16 q rank + 16 q), the last block fewer) and
  // their W slices; h_{t-1} lives in every block's shared memory, ldh elements a row, at
  // byte offset h_off (2 ping-pong buffers of Bp rows, then r (.) h_{t-1} for
  // reset_after=False).
  int cluster = 0;
  int q = 0;
  int ldh = 0;
  int h_off = 0;
};

// Batch tiles of one pass of a block's GEMM: a group's tiles, at most kMaxMTilesPerPass.
inline int pass_tiles(const Geom& g) { return std::min(g.mtg, kMaxMTilesPerPass); }

// Where the block sits in the grid (bit 8): its unit block ub (its 16 hidden units,
// j0 = 16 ub, and its W slice) and its group's first batch tile t0 (0 with one group).
struct BlockPos {
  int ub, t0;
};
__device__ __forceinline__ BlockPos block_pos(const Geom& g) {
  const int grp = static_cast<int>(blockIdx.x) / g.nbu;
  return BlockPos{static_cast<int>(blockIdx.x) - grp * g.nbu, grp * g.mtg};
}
__device__ __forceinline__ int unit_block(const Geom& g) { return block_pos(g).ub; }
// The end of the block's batch tiles at a step of `rows` rows (t0 when the group has none
// of them: a packed step's later rows, or a batch that leaves the last groups empty).
__device__ __forceinline__ int group_tile_end(const Geom& g, int t0, int64_t rows) {
  const int end = min(static_cast<int>((rows + 15) / 16), t0 + g.mtg);
  return end > t0 ? end : t0;
}

// Staging of A (the step variant 1; benchmarks/NOTES-cuda-latency.md): the pass's rows x
// [0, K) of A copied once into shared memory by all threads (cp.async on sm_80+: 16-byte
// units for the tensor-core paths, 8-byte units for the FMA paths, whose rows are padded by
// 8 bytes instead of 16: see staging_bytes), one wait for the copies, one barrier.
// Returns the staged rows (row stride g.lds).  The buffer is free to overwrite here: every
// warp that read it (the previous block_gemm) passed the barrier that ends block_gemm.
template <int MM>
constexpr int stage_unit_bytes() { return MM == kFma ? 8 : 16; }

template <typename op_t, int MM>
__device__ __forceinline__ const op_t* stage_a(const Geom& g, const op_t* A, int lda, int rows,
                                               int K) {
  FUSEDGRU_DYNAMIC_SMEM(stage_smem);
  op_t* As = reinterpret_cast<op_t*>(stage_smem + g.a_off);
  constexpr int kUnit = stage_unit_bytes<MM>();
  constexpr int kPer = kUnit / static_cast<int>(sizeof(op_t));
  const int upr = K / kPer;  // K s is a multiple of 32 bytes
  const int n = rows * upr;
  for (int i = threadIdx.x; i < n; i += kThreads) {
    const int r = i / upr, u = i - r * upr;
    __pipeline_memcpy_async(As + r * g.lds + u * kPer,
                            A + static_cast<int64_t>(r) * lda + u * kPer, kUnit);
  }
  __pipeline_commit();
  __pipeline_wait_prior(0);
  __syncthreads();  // every thread's copies visible to every warp
  return As;
}

// Block GEMM for batch tiles [mt0, mt1): NC column groups of 16 (W rows c*16.. at c*16*ldw),
// K split into g.nsplit parts; partial tiles go to acc[((s * MTP + mt - mt0) * NC + c)].
// per > 0 (the cluster forward, whose block holds the W slices of several unit blocks, 3
// gates each): column group c is gate c % per of unit block c / per, at
// ((c / per) 3 + c % per) 16 ldw; per = 0: contiguous, as above.
template <typename op_t, typename acc_t, int MM>
__device__ __forceinline__ void block_gemm(const Geom& g, const op_t* A, int lda,
                                           const op_t* W, int NC, int K, int mt0, int mt1,
                                           acc_t* acc, int per = 0) {
  const int warp = threadIdx.x >> 5;
  const int mtp = mt1 - mt0;
  const int units = g.nsplit * mtp * NC;
  const int kpart = ((K / 16 + g.nsplit - 1) / g.nsplit) * 16;
  // Step variant 1: A's rows of this pass from shared memory (same values, same k order:
  // the products are bitwise the old variant's).  Variant 0: from global memory.
  const op_t* Ab = A;
  int ald = lda, mb = 0;
  if (g.lds > 0) {
    Ab = stage_a<op_t, MM>(g, A + static_cast<int64_t>(mt0) * 16 * lda, lda, mtp * 16, K);
    ald = g.lds;
    mb = mt0;
  }
  for (int u = warp; u < units; u += kWarps) {
    const int s = u / (mtp * NC), rem = u % (mtp * NC);
    const int mt = mt0 + rem / NC, c = rem % NC;
    const int k0 = s * kpart, k1 = min(K, k0 + kpart);
    acc_t* out = acc + static_cast<int64_t>((s * mtp + rem / NC) * NC + c) * kTileElems;
    const int wc = per > 0 ? (c / per) * 3 + c % per : c;
    if (k0 < k1) {
      warp_tile<op_t, acc_t, MM>(Ab + static_cast<int64_t>(mt - mb) * 16 * ald, ald,
                                 W + static_cast<int64_t>(wc) * 16 * g.ldw, g.ldw, k0, k1, out);
    } else {
      for (int i = threadIdx.x & 31; i < kTileElems; i += 32) out[i] = acc_t(0);
    }
  }
  __syncthreads();
}

// Sum of the K-split partials of element (row b, unit jj) of column group c.
template <typename acc_t>
__device__ __forceinline__ acc_t tile_sum(const Geom& g, const acc_t* acc, int mt0, int mtp,
                                          int NC, int b, int c, int jj) {
  acc_t v = acc_t(0);
  const int tile = (b >> 4) - mt0;
  for (int s = 0; s < g.nsplit; ++s)
    v += acc[static_cast<int64_t>((s * mtp + tile) * NC + c) * kTileElems + (b & 15) * 16 + jj];
  return v;
}

// ---------------------------------------------------------------------------------------
// Sequence structure (gru_common.h Layout): which rows a step computes, and resets.
//   steps   (T, 2) int64 on the device: (first row, rows) of each step of a packed batch
//           (rows non-increasing, rows(0) = B), or nullptr: dense, step t is rows
//           [t B, t B + B).  Only a step's rows(t) rows are loaded, computed and stored;
//           its batch tiles stop at the last tile holding one of them.
//   resets  (T, B) bool on the device, or nullptr: resets[t B + b] makes the state entering
//           step t of row b zeros (the forward stages zeros for it at the end of step t-1,
//           the launch for h0; the backward reads h_{t-1} as zeros and drops the dh that
//           step t carries back).  Dense only.
// A row active at step t >= 1 was active at step t-1 at the same position b, so all the
// per-row state (hstate, dhs, the ping-pong buffers) stays indexed by b.
// ---------------------------------------------------------------------------------------

struct StepSpan {
  int64_t first, rows;
};

__device__ __forceinline__ StepSpan step_span(const int64_t* steps, int64_t t, int64_t B) {
  if (steps) return StepSpan{steps[2 * t], steps[2 * t + 1]};
  return StepSpan{t * B, B};
}

// Batch tiles of 16 rows that hold a step's `rows` rows.
__device__ __forceinline__ int row_tiles(int64_t rows) { return static_cast<int>((rows + 15) / 16); }

// ---------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------

template <typename scalar_t, typename op_t, typename acc_t>
struct FwdArgs {
  Geom g;
  const scalar_t* gi;    // (T, B, 3H)  x W_ih^T + b_ih  (rows laid out like x: (N, 3H) packed)
  const scalar_t* bhh;   // (3H,) or nullptr
  const op_t* wpack;     // (NB, 3, 16, ldw)  rows of W_hh per block, zero padded
  scalar_t* y;           // (T, B, H)
  scalar_t* ws;          // (T, B, 4H)   [r, z, n, hn], or nullptr (gru_infer: not kept)
  const int64_t* steps;  // (T, 2) (first, rows) of a packed batch, or nullptr (dense)
  const bool* resets;    // (T, B), or nullptr
  acc_t* hstate;         // (B, Hp)  the state in the accumulation type (own units only)
  acc_t* zstate;         // (B, Hp)  z between the two phases of reset_after=False
  op_t* hbuf;            // (2, Bp, Hp)  h_t as MMA operand, ping-pong; hbuf[0] = h0
  op_t* rhbuf;           // (Bp, Hp)  r (.) h_{t-1} (reset_after=False)
  bool reset_after;
};

template <typename scalar_t, typename op_t, typename acc_t, int MM>
__device__ void fwd_phase(const FwdArgs<scalar_t, op_t, acc_t>& p, const op_t* W, acc_t* acc,
                          int64_t t, int phase) {
  const Geom& g = p.g;
  const int64_t B = g.B, H = g.H, Hp = g.Hp;
  const BlockPos pos = block_pos(g);
  const int j0 = pos.ub * kUnits;
  const op_t* hin = p.hbuf + (t & 1) * static_cast<int64_t>(g.Bp) * Hp;
  op_t* hout = p.hbuf + ((t + 1) & 1) * static_cast<int64_t>(g.Bp) * Hp;
  auto bias = [&](int64_t k) { return p.bhh ? acc_t(ldf(p.bhh + k)) : acc_t(0); };
  const StepSpan span = step_span(p.steps, t, B);
  const int MT = group_tile_end(g, pos.t0, span.rows);  // this block's tiles: [pos.t0, MT)
  // The state this step publishes for row b: h, or zeros where step t+1 restarts row b.
  const bool* restart = p.resets && t + 1 < g.T ? p.resets + (t + 1) * B : nullptr;
  auto staged = [&](int64_t b, acc_t h) { return restart && restart[b] ? acc_t(0) : h; };

  for (int mt0 = pos.t0; mt0 < MT; mt0 += kMaxMTilesPerPass) {
    const int mt1 = min(MT, mt0 + kMaxMTilesPerPass), mtp = mt1 - mt0;
    const int64_t b_end = imin64(span.rows, static_cast<int64_t>(mt1) * 16);
    const int64_t b_beg = static_cast<int64_t>(mt0) * 16;
    if (p.reset_after) {
      block_gemm<op_t, acc_t, MM>(g, hin, Hp, W, 3, Hp, mt0, mt1, acc);
      for (int64_t e = threadIdx.x; e < (b_end - b_beg) * kUnits; e += kThreads) {
        const int64_t b = b_beg + e / kUnits;
        const int jj = static_cast<int>(e % kUnits);
        const int64_t j = j0 + jj;
        if (j >= H) continue;
        const int64_t row = span.first + b;
        const scalar_t* gir = p.gi + row * 3 * H;
        const acc_t hr = tile_sum(g, acc, mt0, mtp, 3, b, 0, jj) + bias(j);
        const acc_t hz = tile_sum(g, acc, mt0, mtp, 3, b, 1, jj) + bias(H + j);
        const acc_t hn = tile_sum(g, acc, mt0, mtp, 3, b, 2, jj) + bias(2 * H + j);
        const acc_t r = sigm(acc_t(ldf(gir + j)) + hr);
        const acc_t z = sigm(acc_t(ldf(gir + H + j)) + hz);
        const acc_t n = tanh_(acc_t(ldf(gir + 2 * H + j)) + r * hn);
        const acc_t hp = p.hstate[b * Hp + j];
        const acc_t h = n + z * (hp - n);
        const acc_t hs = staged(b, h);
        p.hstate[b * Hp + j] = hs;
        stf(p.y + row * H + j, h);
        if (p.ws) {
          scalar_t* wsr = p.ws + row * 4 * H;
          stf(wsr + j, r);
          stf(wsr + H + j, z);
          stf(wsr + 2 * H + j, n);
          stf(wsr + 3 * H + j, hn);
        }
        stf(hout + b * Hp + j, hs);
      }
    } else if (phase == 0) {  // r, z from h_{t-1}; publish r (.) h_{t-1}
      block_gemm<op_t, acc_t, MM>(g, hin, Hp, W, 2, Hp, mt0, mt1, acc);
      for (int64_t e = threadIdx.x; e < (b_end - b_beg) * kUnits; e += kThreads) {
        const int64_t b = b_beg + e / kUnits;
        const int jj = static_cast<int>(e % kUnits);
        const int64_t j = j0 + jj;
        if (j >= H) continue;
        const int64_t row = span.first + b;
        const scalar_t* gir = p.gi + row * 3 * H;
        const acc_t r = sigm(acc_t(ldf(gir + j)) + tile_sum(g, acc, mt0, mtp, 2, b, 0, jj) + bias(j));
        const acc_t z =
            sigm(acc_t(ldf(gir + H + j)) + tile_sum(g, acc, mt0, mtp, 2, b, 1, jj) + bias(H + j));
        p.zstate[b * Hp + j] = z;
        stf(p.rhbuf + b * Hp + j, r * p.hstate[b * Hp + j]);
        if (p.ws) {
          stf(p.ws + row * 4 * H + j, r);
          stf(p.ws + row * 4 * H + H + j, z);
        }
      }
    } else {  // n from W_hn (r (.) h_{t-1}); the update
      block_gemm<op_t, acc_t, MM>(g, p.rhbuf, Hp, W + 2 * 16 * g.ldw, 1, Hp, mt0, mt1, acc);
      for (int64_t e = threadIdx.x; e < (b_end - b_beg) * kUnits; e += kThreads) {
        const int64_t b = b_beg + e / kUnits;
        const int jj = static_cast<int>(e % kUnits);
        const int64_t j = j0 + jj;
        if (j >= H) continue;
        const int64_t row = span.first + b;
        const acc_t hn = tile_sum(g, acc, mt0, mtp, 1, b, 0, jj) + bias(2 * H + j);
        const acc_t n = tanh_(acc_t(ldf(p.gi + row * 3 * H + 2 * H + j)) + hn);
        const acc_t z = p.zstate[b * Hp + j];
        const acc_t hp = p.hstate[b * Hp + j];
        const acc_t h = n + z * (hp - n);
        const acc_t hs = staged(b, h);
        p.hstate[b * Hp + j] = hs;
        stf(p.y + row * H + j, h);
        if (p.ws) {
          stf(p.ws + row * 4 * H + 2 * H + j, n);
          stf(p.ws + row * 4 * H + 3 * H + j, hn);
        }
        stf(hout + b * Hp + j, hs);
      }
    }
    __syncthreads();  // acc is reused by the next pass / phase
  }
}

// Copies `count` elements (a multiple of 16 bytes) from global to shared memory.
template <typename T>
__device__ __forceinline__ void copy_to_smem(T* dst, const T* src, int64_t count) {
  const int64_t n16 = count * static_cast<int64_t>(sizeof(T)) / 16;
  const int4* s = reinterpret_cast<const int4*>(src);
  int4* d = reinterpret_cast<int4*>(dst);
  for (int64_t i = threadIdx.x; i < n16; i += kThreads) d[i] = s[i];
  __syncthreads();
}

template <typename op_t, typename acc_t>
__device__ __forceinline__ acc_t* acc_region(unsigned char* smem, int64_t w_bytes) {
  return reinterpret_cast<acc_t*>(smem + w_bytes);
}

// Defined below.  Declared first: a call with explicit template arguments needs the name
// declared before it under C++17, which torch 2.11's extension build gives nvcc (C++20,
// torch 2.14's, finds it when the template is instantiated: the host build and CI never
// saw the difference).
template <typename scalar_t, typename op_t, typename acc_t, int MM>
__device__ void fwd_split_loop(const FwdArgs<scalar_t, op_t, acc_t>& p, const op_t* W,
                               acc_t* acc, const cg::grid_group& grid);
template <typename scalar_t, typename op_t, typename acc_t, int MM>
__device__ void fwd_cluster_loop(const FwdArgs<scalar_t, op_t, acc_t>& p, unsigned char* smem,
                                 int64_t w_bytes);

// One cooperative launch for the whole sequence; W slice resident in shared memory.
template <typename scalar_t, typename op_t, typename acc_t, int MM>
__global__ void __launch_bounds__(kThreads, 1)
    gru_fwd_persistent(const FwdArgs<scalar_t, op_t, acc_t> p, int64_t w_bytes) {
  FUSEDGRU_DYNAMIC_SMEM(smem);
  if (p.g.cluster) {  // step variant bit 16: launched as one thread block cluster
    fwd_cluster_loop<scalar_t, op_t, acc_t, MM>(p, smem, w_bytes);
    return;
  }
  op_t* Ws = reinterpret_cast<op_t*>(smem);
  acc_t* acc = acc_region<op_t, acc_t>(smem, w_bytes);
  const int64_t slice = 3 * 16 * static_cast<int64_t>(p.g.ldw);
  copy_to_smem(Ws, p.wpack + unit_block(p.g) * slice, slice);
  cg::grid_group grid = cg::this_grid();
  if (p.g.split) {
    fwd_split_loop<scalar_t, op_t, acc_t, MM>(p, Ws, acc, grid);
    return;
  }
  for (int64_t t = 0; t < p.g.T; ++t) {
    fwd_phase<scalar_t, op_t, acc_t, MM>(p, Ws, acc, t, 0);
    grid.sync();
    if (!p.reset_after) {
      fwd_phase<scalar_t, op_t, acc_t, MM>(p, Ws, acc, t, 1);
      grid.sync();
    }
  }
}

// ---------------------------------------------------------------------------------------
// The split-barrier forward step (step variant bit 2; benchmarks/NOTES-cuda-latency.md,
// "Split barrier").  The persistent forward at B <= kSplitRows (one pass of the batch):
// - each thread owns fixed elements, unit jj = tid % 16 of the block's 16 and rows
//   b_i = tid / 16 + 16 i (i < kSplitPer), as fwd_phase's (row, unit) loop assigns them
//   (kThreads is a multiple of kUnits), so its biases, its rows' h_{t-1} and z (between the
//   phases of reset_after=False) stay in registers across steps instead of being re-read
//   from global memory each step;
// - the grid barrier after step t is split into arrive and wait (grid.barrier_arrive /
//   barrier_wait), and between the two each thread loads its gi of step t+1 into registers:
//   the loads' latency is spent while the other blocks finish step t, not on step t+1's path.
// The same expressions in the same order as fwd_phase: bitwise the old step's outputs.
// ---------------------------------------------------------------------------------------
constexpr int kSplitRows = 64;
constexpr int kSplitPer = kSplitRows * kUnits / kThreads;  // rows per thread: 4

template <typename scalar_t, typename op_t, typename acc_t, int MM>
__device__ void fwd_split_loop(const FwdArgs<scalar_t, op_t, acc_t>& p, const op_t* W,
                               acc_t* acc, const cg::grid_group& grid) {
  const Geom& g = p.g;
  const int64_t B = g.B, H = g.H, Hp = g.Hp;
  const int jj = static_cast<int>(threadIdx.x) % kUnits;
  const BlockPos pos = block_pos(g);
  const int gt0 = pos.t0;  // the block's group's first batch tile (bit 8)
  const int b0 = gt0 * 16 + static_cast<int>(threadIdx.x) / kUnits;
  const int64_t b_lim = static_cast<int64_t>(gt0 + g.mtg) * 16;  // the group's rows end here
  const int64_t j = static_cast<int64_t>(pos.ub) * kUnits + jj;
  const bool own = j < H;
  auto bias = [&](int64_t k) { return own && p.bhh ? acc_t(ldf(p.bhh + k)) : acc_t(0); };
  const acc_t br = bias(j), bz = bias(H + j), bn = bias(2 * H + j);
  acc_t hs[kSplitPer], zs[kSplitPer], gr[kSplitPer], gz[kSplitPer], gn[kSplitPer];
  bool rs[kSplitPer];  // step t+1 restarts the row (resets): the state it stages is zeros
#pragma unroll
  for (int i = 0; i < kSplitPer; ++i) {
    const int64_t b = b0 + 16 * i;
    hs[i] = own && b < B && b < b_lim ? p.hstate[b * Hp + j] : acc_t(0);
    zs[i] = gr[i] = gz[i] = gn[i] = acc_t(0);
    rs[i] = false;
  }
  // What step t reads from global memory besides h_{t-1}, for the rows it computes (a packed
  // step's rows(t) <= B): gi of step t, and whether step t+1 restarts the row.
  auto load_gi = [&](int64_t t) {
    const StepSpan span = step_span(p.steps, t, B);
    const int64_t row_end = imin64(span.rows, b_lim);  // the group's rows this step
    const bool* restart = p.resets && t + 1 < g.T ? p.resets + (t + 1) * B : nullptr;
#pragma unroll
    for (int i = 0; i < kSplitPer; ++i) {
      const int64_t b = b0 + 16 * i;
      if (own && b < row_end) {
        const scalar_t* gir = p.gi + (span.first + b) * 3 * H;
        gr[i] = acc_t(ldf(gir + j));
        gz[i] = acc_t(ldf(gir + H + j));
        gn[i] = acc_t(ldf(gir + 2 * H + j));
        rs[i] = restart && restart[b];
      }
    }
  };
  load_gi(0);
  for (int64_t t = 0; t < g.T; ++t) {
    const op_t* hin = p.hbuf + (t & 1) * static_cast<int64_t>(g.Bp) * Hp;
    op_t* hout = p.hbuf + ((t + 1) & 1) * static_cast<int64_t>(g.Bp) * Hp;
    const StepSpan span = step_span(p.steps, t, B);
    const int64_t row_end = imin64(span.rows, b_lim);  // the group's rows this step
    const int MT = group_tile_end(g, gt0, span.rows), mtp = MT - gt0;
    if (p.reset_after) {
      block_gemm<op_t, acc_t, MM>(g, hin, Hp, W, 3, Hp, gt0, MT, acc);
#pragma unroll
      for (int i = 0; i < kSplitPer; ++i) {
        const int64_t b = b0 + 16 * i;
        if (!own || b >= row_end) continue;
        const int64_t row = span.first + b;
        const acc_t hr = tile_sum(g, acc, gt0, mtp, 3, b, 0, jj) + br;
        const acc_t hz = tile_sum(g, acc, gt0, mtp, 3, b, 1, jj) + bz;
        const acc_t hn = tile_sum(g, acc, gt0, mtp, 3, b, 2, jj) + bn;
        const acc_t r = sigm(gr[i] + hr);
        const acc_t z = sigm(gz[i] + hz);
        const acc_t n = tanh_(gn[i] + r * hn);
        const acc_t h = n + z * (hs[i] - n);
        hs[i] = rs[i] ? acc_t(0) : h;
        stf(p.y + row * H + j, h);
        if (p.ws) {
          scalar_t* wsr = p.ws + row * 4 * H;
          stf(wsr + j, r);
          stf(wsr + H + j, z);
          stf(wsr + 2 * H + j, n);
          stf(wsr + 3 * H + j, hn);
        }
        stf(hout + b * Hp + j, hs[i]);
      }
    } else {
      block_gemm<op_t, acc_t, MM>(g, hin, Hp, W, 2, Hp, gt0, MT, acc);
#pragma unroll
      for (int i = 0; i < kSplitPer; ++i) {
        const int64_t b = b0 + 16 * i;
        if (!own || b >= row_end) continue;
        const int64_t row = span.first + b;
        const acc_t r = sigm(gr[i] + tile_sum(g, acc, gt0, mtp, 2, b, 0, jj) + br);
        const acc_t z = sigm(gz[i] + tile_sum(g, acc, gt0, mtp, 2, b, 1, jj) + bz);
        zs[i] = z;
        stf(p.rhbuf + b * Hp + j, r * hs[i]);
        if (p.ws) {
          stf(p.ws + row * 4 * H + j, r);
          stf(p.ws + row * 4 * H + H + j, z);
        }
      }
      grid.sync();  // r (.) h_{t-1} of every block; acc free again
      block_gemm<op_t, acc_t, MM>(g, p.rhbuf, Hp, W + 2 * 16 * g.ldw, 1, Hp, gt0, MT, acc);
#pragma unroll
      for (int i = 0; i < kSplitPer; ++i) {
        const int64_t b = b0 + 16 * i;
        if (!own || b >= row_end) continue;
        const int64_t row = span.first + b;
        const acc_t hn = tile_sum(g, acc, gt0, mtp, 1, b, 0, jj) + bn;
        const acc_t n = tanh_(gn[i] + hn);
        const acc_t h = n + zs[i] * (hs[i] - n);
        hs[i] = rs[i] ? acc_t(0) : h;
        stf(p.y + row * H + j, h);
        if (p.ws) {
          stf(p.ws + row * 4 * H + 2 * H + j, n);
          stf(p.ws + row * 4 * H + 3 * H + j, hn);
        }
        stf(hout + b * Hp + j, hs[i]);
      }
    }
    if (t + 1 < g.T) {
      // Arrive (h_t published; this block's reads of acc done), load gi of step t+1 while
      // the other blocks finish step t, then wait for them.  No arrival after the last step.
      auto token = grid.barrier_arrive();
      load_gi(t + 1);
      grid.barrier_wait(std::move(token));
    }
  }
}

// ---------------------------------------------------------------------------------------
// The cluster forward (step variant bit 16; Hopper: sm_90 and later, thread block clusters
// and distributed shared memory; benchmarks/NOTES-cuda-latency.md, "Thread block cluster").
// The whole launch is ONE cluster of g.cluster blocks (at most kMaxCluster, one per SM)
// that together hold all of W_hh: block `rank` keeps the W slices of unit blocks
// [q rank, q rank + nq) (nq = q but in the last block), 3 gates each, in shared memory.
// Every block also keeps its own copy of h_{t-1} (Bp x Hp in the operand type, row stride
// ldh) in shared memory, so the MMA's operands never leave the SM.  Per step:
//   - the block's product h_{t-1} W^T for its 3 nq column groups (block_gemm);
//   - the gates and the update of its B x U elements (U = 16 nq): each thread owns fixed
//     (row, unit) elements e = tid + 256 i (i < kClusterPer, so B U <= 1024): its biases,
//     h_{t-1} and z stay in registers, as in fwd_split_loop;
//   - h_t of its units written into its own buffer, then copied in 16-byte chunks (8 on
//     the FMA paths, whose rows are padded by 8 bytes) to the same place in the other
//     blocks' buffers (cluster.map_shared_rank: stores over the SM-to-SM network);
//   - the cluster barrier (barrier.cluster.arrive.release / wait.acquire), split: gi of
//     step t+1 is loaded between the arrival and the wait.
// No grid barrier, and nothing from global memory on a step's dependency chain (gi is
// prefetched; y and ws are stores).  reset_after=False exchanges r (.) h_{t-1} the same way,
// with a second cluster barrier per step.
// Ping-pong: block A writes h_t into buffer (t+1) & 1 of block B only after the barrier that
// ends step t-1, which B reaches after its last read of that buffer (step t-1's product read
// buffer (t-1) & 1).  The r (.) h buffer is read in phase 1 of step t, before the barrier
// ending step t, and written in phase 0 of step t+1, after it.  Nothing is written to another
// block after the last barrier: no block exits while another may still use its shared memory.
// The products are block_gemm's with 3 nq (2 nq, nq) column groups: where the K split is
// the grid kernels' (always below H = 128, where it is 1) the outputs are bitwise theirs;
// elsewhere another summation order, within the budget.
// ---------------------------------------------------------------------------------------
constexpr int kClusterPer = 4;   // elements (row, unit) a thread owns: B x U <= 1024
constexpr int kMaxCluster = 16;  // blocks of a cluster (8 portable, 16 non-portable)

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
#define FUSEDGRU_HAS_CLUSTERS 0  // sm_80 has no clusters; make_plan takes bit 16 on sm_90+ only
#else
#define FUSEDGRU_HAS_CLUSTERS 1
#endif

// The unit of the cluster forward's buffer copies: 16 bytes, 8 on the FMA paths (their rows
// are padded by 8 bytes: staging_bytes).
template <int MM>
using ClusterChunk = std::conditional_t<MM == kFma, unsigned long long, int4>;

template <typename scalar_t, typename op_t, typename acc_t, int MM>
__device__ void fwd_cluster_loop(const FwdArgs<scalar_t, op_t, acc_t>& p, unsigned char* smem,
                                 int64_t w_bytes) {
#if FUSEDGRU_HAS_CLUSTERS
  using chunk_t = ClusterChunk<MM>;
  constexpr int kPer = static_cast<int>(sizeof(chunk_t) / sizeof(op_t));  // elements a chunk
  const Geom& g = p.g;
  const cg::cluster_group cluster = cg::this_cluster();
  const int C = g.cluster;
  const int rank = static_cast<int>(cluster.block_rank());
  const int ub0 = rank * g.q;            // the block's first unit block
  const int nq = min(g.q, g.nbu - ub0);  // and how many it owns
  const int U = nq * kUnits;
  const int64_t B = g.B, H = g.H, Hp = g.Hp;
  const int64_t j0 = static_cast<int64_t>(ub0) * kUnits;
  const int ldh = g.ldh;
  const int tid = static_cast<int>(threadIdx.x);
  op_t* Ws = reinterpret_cast<op_t*>(smem);
  acc_t* acc = acc_region<op_t, acc_t>(smem, w_bytes);
  op_t* hb = reinterpret_cast<op_t*>(smem + g.h_off);
  const int64_t hsz = static_cast<int64_t>(g.Bp) * ldh;  // elements of one buffer
  op_t* rh = hb + 2 * hsz;                                 // reset_after=False only

  // The block's W slices: nq unit blocks x 3 gates x 16 rows, contiguous in wpack.
  const int64_t slice = 3 * 16 * static_cast<int64_t>(g.ldw);
  copy_to_smem(Ws, p.wpack + ub0 * slice, nq * slice);
  // The h buffers: zeros (padding rows and columns are MMA operands: they must be finite),
  // then h0 (hbuf[0], zero padded as launch_forward stages it) into buffer 0.
  {
    chunk_t* z = reinterpret_cast<chunk_t*>(hb);
    const int64_t n = (p.reset_after ? 2 : 3) * hsz / kPer;
    for (int64_t i = tid; i < n; i += kThreads) z[i] = chunk_t{};
    __syncthreads();
    const int cpr = static_cast<int>(Hp / kPer);
    const chunk_t* src = reinterpret_cast<const chunk_t*>(p.hbuf);
    for (int64_t i = tid; i < static_cast<int64_t>(g.Bp) * cpr; i += kThreads) {
      const int64_t r = i / cpr;
      reinterpret_cast<chunk_t*>(hb + r * ldh)[i - r * cpr] = src[i];
    }
  }
  // The thread's elements: row eb[i] (-1: none) and unit eu[i] of the block's U.
  int eb[kClusterPer], eu[kClusterPer];
  acc_t hs[kClusterPer], zs[kClusterPer], gr[kClusterPer], gz[kClusterPer], gn[kClusterPer];
  acc_t br[kClusterPer], bz[kClusterPer], bn[kClusterPer];
  bool rs[kClusterPer];  // step t+1 restarts the row (resets): the state it stages is zeros
#pragma unroll
  for (int i = 0; i < kClusterPer; ++i) {
    const int e = tid + kThreads * i;
    const int b = e / U, u = e - b * U;
    const int64_t j = j0 + u;
    const bool own = b < B && j < H;
    eb[i] = own ? b : -1;
    eu[i] = u;
    hs[i] = own ? p.hstate[b * Hp + j] : acc_t(0);
    br[i] = own && p.bhh ? acc_t(ldf(p.bhh + j)) : acc_t(0);
    bz[i] = own && p.bhh ? acc_t(ldf(p.bhh + H + j)) : acc_t(0);
    bn[i] = own && p.bhh ? acc_t(ldf(p.bhh + 2 * H + j)) : acc_t(0);
    zs[i] = gr[i] = gz[i] = gn[i] = acc_t(0);
    rs[i] = false;
  }
  // What step t reads from global memory for the rows it computes: gi, and whether step
  // t+1 restarts the row.
  auto load_gi = [&](int64_t t) {
    const StepSpan span = step_span(p.steps, t, B);
    const bool* restart = p.resets && t + 1 < g.T ? p.resets + (t + 1) * B : nullptr;
#pragma unroll
    for (int i = 0; i < kClusterPer; ++i) {
      const int b = eb[i];
      if (b >= 0 && b < span.rows) {
        const scalar_t* gir = p.gi + (span.first + b) * 3 * H + j0 + eu[i];
        gr[i] = acc_t(ldf(gir));
        gz[i] = acc_t(ldf(gir + H));
        gn[i] = acc_t(ldf(gir + 2 * H));
        rs[i] = restart && restart[b];
      }
    }
  };
  // Copies the block's columns of rows [0, rows) of `buf` (written by its threads) to the
  // same place in every other block of the cluster.
  auto publish = [&](op_t* buf, int64_t rows) {
    __syncthreads();
    const int cpr = U / kPer;
    const int per_rank = static_cast<int>(rows) * cpr;
    for (int i = tid; i < per_rank * (C - 1); i += kThreads) {
      const int d = i / per_rank, rem = i - d * per_rank;
      const int r = rem / cpr;
      chunk_t* mine = reinterpret_cast<chunk_t*>(buf + static_cast<int64_t>(r) * ldh + j0) +
                      (rem - r * cpr);
      *cluster.map_shared_rank(mine, d + (d >= rank ? 1 : 0)) = *mine;
    }
  };
  cluster.sync();  // every block's buffers initialised before another block's first copy
  load_gi(0);
  for (int64_t t = 0; t < g.T; ++t) {
    const op_t* hin = hb + (t & 1) * hsz;
    op_t* hout = hb + ((t + 1) & 1) * hsz;
    const StepSpan span = step_span(p.steps, t, B);
    const int MT = row_tiles(span.rows);
    const bool last = t + 1 == g.T;
    if (p.reset_after) {
      block_gemm<op_t, acc_t, MM>(g, hin, ldh, Ws, 3 * nq, g.Hp, 0, MT, acc);
#pragma unroll
      for (int i = 0; i < kClusterPer; ++i) {
        const int b = eb[i];
        if (b < 0 || b >= span.rows) continue;
        const int c = (eu[i] >> 4) * 3, jj = eu[i] & 15;
        const int64_t j = j0 + eu[i], row = span.first + b;
        const acc_t hr = tile_sum(g, acc, 0, MT, 3 * nq, b, c, jj) + br[i];
        const acc_t hz = tile_sum(g, acc, 0, MT, 3 * nq, b, c + 1, jj) + bz[i];
        const acc_t hn = tile_sum(g, acc, 0, MT, 3 * nq, b, c + 2, jj) + bn[i];
        const acc_t r = sigm(gr[i] + hr);
        const acc_t z = sigm(gz[i] + hz);
        const acc_t n = tanh_(gn[i] + r * hn);
        const acc_t h = n + z * (hs[i] - n);
        hs[i] = rs[i] ? acc_t(0) : h;
        stf(p.y + row * H + j, h);
        if (p.ws) {
          scalar_t* wsr = p.ws + row * 4 * H;
          stf(wsr + j, r);
          stf(wsr + H + j, z);
          stf(wsr + 2 * H + j, n);
          stf(wsr + 3 * H + j, hn);
        }
        stf(hout + b * ldh + j, hs[i]);
      }
    } else {
      block_gemm<op_t, acc_t, MM>(g, hin, ldh, Ws, 2 * nq, g.Hp, 0, MT, acc, 2);
#pragma unroll
      for (int i = 0; i < kClusterPer; ++i) {
        const int b = eb[i];
        if (b < 0 || b >= span.rows) continue;
        const int c = (eu[i] >> 4) * 2, jj = eu[i] & 15;
        const int64_t j = j0 + eu[i], row = span.first + b;
        const acc_t r = sigm(gr[i] + tile_sum(g, acc, 0, MT, 2 * nq, b, c, jj) + br[i]);
        const acc_t z = sigm(gz[i] + tile_sum(g, acc, 0, MT, 2 * nq, b, c + 1, jj) + bz[i]);
        zs[i] = z;
        stf(rh + b * ldh + j, r * hs[i]);
        if (p.ws) {
          stf(p.ws + row * 4 * H + j, r);
          stf(p.ws + row * 4 * H + H + j, z);
        }
      }
      publish(rh, span.rows);
      cluster.sync();  // every block's r (.) h_{t-1} in every block; acc free again
      block_gemm<op_t, acc_t, MM>(g, rh, ldh, Ws + 2 * 16 * g.ldw, nq, g.Hp, 0, MT, acc, 1);
#pragma unroll
      for (int i = 0; i < kClusterPer; ++i) {
        const int b = eb[i];
        if (b < 0 || b >= span.rows) continue;
        const int jj = eu[i] & 15;
        const int64_t j = j0 + eu[i], row = span.first + b;
        const acc_t hn = tile_sum(g, acc, 0, MT, nq, b, eu[i] >> 4, jj) + bn[i];
        const acc_t n = tanh_(gn[i] + hn);
        const acc_t h = n + zs[i] * (hs[i] - n);
        hs[i] = rs[i] ? acc_t(0) : h;
        stf(p.y + row * H + j, h);
        if (p.ws) {
          stf(p.ws + row * 4 * H + 2 * H + j, n);
          stf(p.ws + row * 4 * H + 3 * H + j, hn);
        }
        stf(hout + b * ldh + j, hs[i]);
      }
    }
    if (!last) {
      // h_t of the block's units to every block; arrive (h_t published, this block's reads
      // of acc and of the buffers done), load gi of step t+1 while the others finish step
      // t, then wait for them.
      publish(hout, span.rows);
      auto token = cluster.barrier_arrive();
      load_gi(t + 1);
      cluster.barrier_wait(std::move(token));
    }
  }
#else
  __trap();
#endif
}

// Fallback: one launch per step (and phase); the W slice is read from global memory / L2.
// __launch_bounds__(kThreads, 1), as the persistent kernels: a launch is Hp / 16 blocks (x
// the batch groups), about one per SM, so occupancy asks nothing of the registers.  With
// the bound of kThreads alone, ptxas held the per-step kernels to 64 registers on sm_90 and,
// once the batch groups (bit 8) added their block position, spilled 12-24 bytes in two of
// them.
template <typename scalar_t, typename op_t, typename acc_t, int MM>
__global__ void __launch_bounds__(kThreads, 1)
    gru_fwd_step(const FwdArgs<scalar_t, op_t, acc_t> p, int64_t t, int phase) {
  FUSEDGRU_DYNAMIC_SMEM(smem);
  acc_t* acc = reinterpret_cast<acc_t*>(smem);
  const int64_t slice = 3 * 16 * static_cast<int64_t>(p.g.ldw);
  fwd_phase<scalar_t, op_t, acc_t, MM>(p, p.wpack + unit_block(p.g) * slice, acc, t, phase);
}

// ---------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------

template <typename scalar_t, typename op_t, typename acc_t>
struct BwdArgs {
  Geom g;
  const scalar_t* gy;   // (T, B, H)
  const scalar_t* ws;   // (T, B, 4H)
  const scalar_t* y;    // (T, B, H)
  const scalar_t* h0;   // (B, H) or nullptr (zeros)
  const op_t* wpack;    // (NB, 16, ldw): W_hh columns of the block's units, B(k, n) layout,
                        // k = gate * Hp + row (zero padded)
  scalar_t* dgi;        // (T, B, 3H)
  scalar_t* dgh;        // (T, B, 3H)  (== dgi when reset_after=False)
  acc_t* dhs;           // (B, Hp): g z (+ d_rh r) of the step just done, own units
  op_t* gbuf;           // (2, Bp, 3Hp): dgh of a step as MMA operand, ping-pong
  scalar_t* dh0;        // (B, H)
  const int64_t* steps; // (T, 2) (first, rows) of a packed batch, or nullptr (dense)
  const bool* resets;   // (T, B), or nullptr
  bool reset_after;
};

// The backward's element math, shared by bwd_phase and bwd_split_loop (the same expressions
// in the same order: the two steps' outputs are bitwise equal).
//
// h_{t-1} of row b, unit j: zero where step t restarts the row (fresh: resets of step t),
// else y of step t-1 (its rows start at prev_first), or h0 (zeros when absent) at t = 0.
template <typename scalar_t, typename op_t, typename acc_t>
__device__ __forceinline__ acc_t bwd_h_prev(const BwdArgs<scalar_t, op_t, acc_t>& p,
                                            const bool* fresh, int64_t t, int64_t prev_first,
                                            int64_t b, int64_t j) {
  const int64_t H = p.g.H;
  return fresh && fresh[b] ? acc_t(0)
         : t > 0           ? acc_t(ldf(p.y + (prev_first + b) * H + j))
                           : (p.h0 ? acc_t(ldf(p.h0 + b * H + j)) : acc_t(0));
}

// Step t's element (row `row` of the layout, batch row b, unit j) from gg = dL/dh_t and the
// saved r, z, n, hn (reset_after) and h_{t-1}: writes dgh (and dgi when reset_after) and the
// step's MMA operand row go; returns the dh it carries to h_{t-1} directly (gg z).
template <typename scalar_t, typename op_t, typename acc_t>
__device__ __forceinline__ acc_t bwd_element(const BwdArgs<scalar_t, op_t, acc_t>& p,
                                             int64_t row, int64_t j, op_t* go, acc_t gg,
                                             acc_t r, acc_t z, acc_t n, acc_t hn, acc_t h) {
  const int64_t H = p.g.H, Hp = p.g.Hp;
  scalar_t* dghr = p.dgh + row * 3 * H;
  const acc_t da_n = gg * (acc_t(1) - z) * (acc_t(1) - n * n);
  const acc_t da_z = gg * (h - n) * z * (acc_t(1) - z);
  stf(dghr + H + j, da_z);
  stf(go + Hp + j, da_z);
  stf(go + 2 * Hp + j, da_n);  // reset_after=False: operand of phase 1
  if (p.reset_after) {
    const acc_t da_r = da_n * hn * r * (acc_t(1) - r);
    scalar_t* dgir = p.dgi + row * 3 * H;
    stf(dgir + j, da_r);
    stf(dgir + H + j, da_z);
    stf(dgir + 2 * H + j, da_n);
    stf(dghr + j, da_r);
    stf(dghr + 2 * H + j, da_n * r);
    stf(go + j, da_r);
    stf(go + 2 * Hp + j, da_n * r);
  } else {
    stf(dghr + 2 * H + j, da_n);
  }
  return gg * z;
}

// reset_after=False, the second half of step t's element: mm = d(r h) from da_n W_hn;
// writes da_r (dgh and the operand row go) and returns the dh it adds for h_{t-1} (mm r).
template <typename scalar_t, typename op_t, typename acc_t>
__device__ __forceinline__ acc_t bwd_element_rh(const BwdArgs<scalar_t, op_t, acc_t>& p,
                                                int64_t row, int64_t j, op_t* go, acc_t mm,
                                                acc_t r, acc_t h) {
  const acc_t da_r = mm * h * r * (acc_t(1) - r);
  stf(p.dgh + row * 3 * p.g.H + j, da_r);
  stf(go + j, da_r);
  return mm * r;
}

// phase 0 / 1: step t (phase 1 only for reset_after=False); phase 2: dh0 after the loop.
// The dh that step tn carries back (dhs + dgh_tn W_hh, summed where it is consumed: at
// step tn - 1, or in phase 2 for tn = 0) reaches row b only if b was active at step tn and
// step tn did not restart it (resets).
template <typename scalar_t, typename op_t, typename acc_t, int MM>
__device__ void bwd_phase(const BwdArgs<scalar_t, op_t, acc_t>& p, const op_t* W, acc_t* acc,
                          int64_t t, int phase) {
  const Geom& g = p.g;
  const int64_t B = g.B, H = g.H, Hp = g.Hp, T = g.T;
  const int64_t buf = static_cast<int64_t>(g.Bp) * 3 * Hp;
  const int lda = 3 * g.Hp;
  const BlockPos pos = block_pos(g);
  const int j0 = pos.ub * kUnits;
  const int Krec = p.reset_after ? 3 * g.Hp : 2 * g.Hp;  // K of the product that yields dh
  const op_t* gin = p.gbuf + ((t + 1) & 1) * buf;          // dgh_{t+1}
  op_t* gout = p.gbuf + (t & 1) * buf;                      // dgh_t
  const int64_t tn = phase == 2 ? 0 : t + 1;  // the step whose dh is consumed (phase 0, 2)
  const bool has_next = tn < T;
  // Rows of this step (phase 2: all B rows of step 0), rows of step tn, first row of t-1.
  const StepSpan span = phase == 2 ? StepSpan{0, B} : step_span(p.steps, t, B);
  const int64_t carry_rows = !has_next ? 0 : phase == 2 ? B : step_span(p.steps, tn, B).rows;
  const int64_t prev_first = t > 0 ? step_span(p.steps, t - 1, B).first : 0;
  const bool* carry_reset = p.resets && has_next ? p.resets + tn * B : nullptr;
  const bool* fresh = p.resets && phase != 2 ? p.resets + t * B : nullptr;  // h_{t-1} = 0
  const int MT = group_tile_end(g, pos.t0, span.rows);  // this block's tiles: [pos.t0, MT)

  for (int mt0 = pos.t0; mt0 < MT; mt0 += kMaxMTilesPerPass) {
    const int mt1 = min(MT, mt0 + kMaxMTilesPerPass), mtp = mt1 - mt0;
    const int64_t b_end = imin64(span.rows, static_cast<int64_t>(mt1) * 16);
    const int64_t b_beg = static_cast<int64_t>(mt0) * 16;
    if (phase == 1) {
      // d(r h) = da_n W_hn for own units; da_n of every unit is in gout's n columns.
      block_gemm<op_t, acc_t, MM>(g, gout + 2 * Hp, lda, W + 2 * Hp, 1, g.Hp, mt0, mt1, acc);
    } else if (has_next) {
      // dh = (previous g z ...) + dgh_{t+1} W_hh[:, own units]
      const op_t* src = phase == 2 ? p.gbuf : gin;
      block_gemm<op_t, acc_t, MM>(g, src, lda, W, 1, Krec, mt0, mt1, acc);
    }
    for (int64_t e = threadIdx.x; e < (b_end - b_beg) * kUnits; e += kThreads) {
      const int64_t b = b_beg + e / kUnits;
      const int jj = static_cast<int>(e % kUnits);
      const int64_t j = j0 + jj;
      if (j >= H) continue;
      const acc_t mm = has_next || phase == 1 ? tile_sum(g, acc, mt0, mtp, 1, b, 0, jj) : acc_t(0);
      // phase 0 / 2: whether the dh carried from step tn reaches this row
      const bool carried = b < carry_rows && !(carry_reset && carry_reset[b]);
      acc_t* dhs = p.dhs + b * Hp + j;
      if (phase == 2) {
        stf(p.dh0 + b * H + j, carried ? *dhs + mm : acc_t(0));
        continue;
      }
      const int64_t row = span.first + b;
      const scalar_t* wsr = p.ws + row * 4 * H;
      const acc_t r = ldf(wsr + j);
      const acc_t h = bwd_h_prev(p, fresh, t, prev_first, b, j);
      op_t* go = gout + b * 3 * Hp;
      if (phase == 1) {
        *dhs += bwd_element_rh(p, row, j, go, mm, r, h);
        continue;
      }
      const acc_t z = ldf(wsr + H + j);
      const acc_t gy = ldf(p.gy + row * H + j);
      const acc_t gg = carried ? gy + *dhs + mm : gy;
      const acc_t n = ldf(wsr + 2 * H + j);
      const acc_t hn = p.reset_after ? acc_t(ldf(wsr + 3 * H + j)) : acc_t(0);
      *dhs = bwd_element(p, row, j, go, gg, r, z, n, hn, h);
    }
    __syncthreads();
  }
}

// The split-barrier backward step (step variant bit 2, plan_split): the persistent backward
// at B <= kSplitRows, as fwd_split_loop does the forward.  Each thread owns the elements
// bwd_phase's loop gives it (unit tid % 16, rows tid / 16 + 16 i); the carried dh (dhs)
// stays in registers, and what a step reads besides dgh_{t+1} (ws's r, z, n, hn, h_{t-1},
// gy, whether the dh of step t+1 reaches the row) is loaded between the arrival at the
// previous step's grid barrier and the wait.  The same expressions in the same order as
// bwd_phase: bitwise the old step's outputs.
template <typename scalar_t, typename op_t, typename acc_t, int MM>
__device__ void bwd_split_loop(const BwdArgs<scalar_t, op_t, acc_t>& p, const op_t* W,
                               acc_t* acc, const cg::grid_group& grid) {
  const Geom& g = p.g;
  const int64_t B = g.B, H = g.H, Hp = g.Hp, T = g.T;
  const int64_t buf = static_cast<int64_t>(g.Bp) * 3 * Hp;
  const int lda = 3 * g.Hp;
  const int Krec = p.reset_after ? 3 * g.Hp : 2 * g.Hp;
  const int jj = static_cast<int>(threadIdx.x) % kUnits;
  const BlockPos pos = block_pos(g);
  const int gt0 = pos.t0;  // the block's group's first batch tile (bit 8)
  const int b0 = gt0 * 16 + static_cast<int>(threadIdx.x) / kUnits;
  const int64_t b_lim = static_cast<int64_t>(gt0 + g.mtg) * 16;  // the group's rows end here
  const int64_t j = static_cast<int64_t>(pos.ub) * kUnits + jj;
  const bool own = j < H;
  acc_t ds[kSplitPer], vr[kSplitPer], vz[kSplitPer], vn[kSplitPer], vhn[kSplitPer],
      vh[kSplitPer], vgy[kSplitPer];
  bool vc[kSplitPer];  // the dh carried from step t+1 reaches the row
#pragma unroll
  for (int i = 0; i < kSplitPer; ++i) {
    const int64_t b = b0 + 16 * i;
    ds[i] = own && b < B && b < b_lim ? p.dhs[b * Hp + j] : acc_t(0);
    vr[i] = vz[i] = vn[i] = vhn[i] = vh[i] = vgy[i] = acc_t(0);
    vc[i] = false;
  }
  auto load_step = [&](int64_t t) {
    const StepSpan span = step_span(p.steps, t, B);
    const int64_t row_end = imin64(span.rows, b_lim);  // the group's rows this step
    const bool has_next = t + 1 < T;
    const int64_t carry_rows = has_next ? step_span(p.steps, t + 1, B).rows : 0;
    const int64_t prev_first = t > 0 ? step_span(p.steps, t - 1, B).first : 0;
    const bool* carry_reset = p.resets && has_next ? p.resets + (t + 1) * B : nullptr;
    const bool* fresh = p.resets ? p.resets + t * B : nullptr;
#pragma unroll
    for (int i = 0; i < kSplitPer; ++i) {
      const int64_t b = b0 + 16 * i;
      if (!own || b >= row_end) continue;
      const int64_t row = span.first + b;
      const scalar_t* wsr = p.ws + row * 4 * H;
      vr[i] = ldf(wsr + j);
      vz[i] = ldf(wsr + H + j);
      vn[i] = ldf(wsr + 2 * H + j);
      vhn[i] = p.reset_after ? acc_t(ldf(wsr + 3 * H + j)) : acc_t(0);
      vh[i] = bwd_h_prev(p, fresh, t, prev_first, b, j);
      vgy[i] = ldf(p.gy + row * H + j);
      vc[i] = b < carry_rows && !(carry_reset && carry_reset[b]);
    }
  };
  load_step(T - 1);
  for (int64_t t = T - 1; t >= 0; --t) {
    const op_t* gin = p.gbuf + ((t + 1) & 1) * buf;  // dgh_{t+1}
    op_t* gout = p.gbuf + (t & 1) * buf;              // dgh_t
    const bool has_next = t + 1 < T;
    const StepSpan span = step_span(p.steps, t, B);
    const int64_t row_end = imin64(span.rows, b_lim);  // the group's rows this step
    const int MT = group_tile_end(g, gt0, span.rows), mtp = MT - gt0;
    if (has_next) block_gemm<op_t, acc_t, MM>(g, gin, lda, W, 1, Krec, gt0, MT, acc);
#pragma unroll
    for (int i = 0; i < kSplitPer; ++i) {
      const int64_t b = b0 + 16 * i;
      if (!own || b >= row_end) continue;
      const int64_t row = span.first + b;
      const acc_t mm = has_next ? tile_sum(g, acc, gt0, mtp, 1, b, 0, jj) : acc_t(0);
      const acc_t gg = vc[i] ? vgy[i] + ds[i] + mm : vgy[i];
      ds[i] = bwd_element(p, row, j, gout + b * 3 * Hp, gg, vr[i], vz[i], vn[i], vhn[i], vh[i]);
    }
    if (!p.reset_after) {
      grid.sync();  // da_n of every block in gout; acc free again
      block_gemm<op_t, acc_t, MM>(g, gout + 2 * Hp, lda, W + 2 * Hp, 1, g.Hp, gt0, MT, acc);
#pragma unroll
      for (int i = 0; i < kSplitPer; ++i) {
        const int64_t b = b0 + 16 * i;
        if (!own || b >= row_end) continue;
        const int64_t row = span.first + b;
        const acc_t mm = tile_sum(g, acc, gt0, mtp, 1, b, 0, jj);
        ds[i] += bwd_element_rh(p, row, j, gout + b * 3 * Hp, mm, vr[i], vh[i]);
      }
    }
    if (t > 0) {
      // Arrive (dgh_t published; acc read), load step t-1's operands, wait for the others.
      auto token = grid.barrier_arrive();
      load_step(t - 1);
      grid.barrier_wait(std::move(token));
    } else {
      grid.sync();  // dgh_0 of every block, for dh0
    }
  }
  // dh0 (bwd_phase's phase 2): dhs + dgh_0 W_hh where step 0 did not restart the row.
  const int MT = group_tile_end(g, gt0, B), mtp = MT - gt0;
  block_gemm<op_t, acc_t, MM>(g, p.gbuf, lda, W, 1, Krec, gt0, MT, acc);
#pragma unroll
  for (int i = 0; i < kSplitPer; ++i) {
    const int64_t b = b0 + 16 * i;
    if (!own || b >= B || b >= b_lim) continue;
    const acc_t mm = tile_sum(g, acc, gt0, mtp, 1, b, 0, jj);
    const bool carried = !(p.resets && p.resets[b]);
    stf(p.dh0 + b * H + j, carried ? ds[i] + mm : acc_t(0));
  }
}

template <typename scalar_t, typename op_t, typename acc_t, int MM>
__global__ void __launch_bounds__(kThreads, 1)
    gru_bwd_persistent(const BwdArgs<scalar_t, op_t, acc_t> p, int64_t w_bytes) {
  FUSEDGRU_DYNAMIC_SMEM(smem);
  op_t* Ws = reinterpret_cast<op_t*>(smem);
  acc_t* acc = acc_region<op_t, acc_t>(smem, w_bytes);
  const int64_t slice = 16 * static_cast<int64_t>(p.g.ldw);
  copy_to_smem(Ws, p.wpack + unit_block(p.g) * slice, slice);
  cg::grid_group grid = cg::this_grid();
  if (p.g.split) {
    bwd_split_loop<scalar_t, op_t, acc_t, MM>(p, Ws, acc, grid);
    return;
  }
  for (int64_t t = p.g.T - 1; t >= 0; --t) {
    bwd_phase<scalar_t, op_t, acc_t, MM>(p, Ws, acc, t, 0);
    grid.sync();
    if (!p.reset_after) {
      bwd_phase<scalar_t, op_t, acc_t, MM>(p, Ws, acc, t, 1);
      grid.sync();
    }
  }
  bwd_phase<scalar_t, op_t, acc_t, MM>(p, Ws, acc, -1, 2);
}

template <typename scalar_t, typename op_t, typename acc_t, int MM>
__global__ void __launch_bounds__(kThreads, 1)
    gru_bwd_step(const BwdArgs<scalar_t, op_t, acc_t> p, int64_t t, int phase) {
  FUSEDGRU_DYNAMIC_SMEM(smem);
  acc_t* acc = reinterpret_cast<acc_t*>(smem);
  const int64_t slice = 16 * static_cast<int64_t>(p.g.ldw);
  bwd_phase<scalar_t, op_t, acc_t, MM>(p, p.wpack + unit_block(p.g) * slice, acc, t, phase);
}


// ---------------------------------------------------------------------------------------
// The launch plan's layout: what the GPU launch (make_plan in gru_cuda.cu adds the device's
// capacity and the persistent / per-step decision) and the host launch share.
// ---------------------------------------------------------------------------------------

struct Plan {
  Geom g;
  int NB = 0;
  int64_t w_bytes = 0, acc_bytes = 0;
  int64_t a_bytes = 0;  // the staged A (plan_staging), 0 = not staged
  int64_t h_bytes = 0;  // the cluster forward's h (and r (.) h) buffers (plan_cluster)
  bool backward = false;
  bool persistent = false;
  std::string why;

  // Dynamic shared memory of one block: the resident W slice + the accumulator tiles for the
  // persistent kernels (acc_region starts at w_bytes), the accumulator tiles alone for the
  // per-step kernels (they read W from global memory); then the staged A, if any (at
  // g.a_off, set by plan_staging for the kind of kernel it was planned for).
  int64_t smem_bytes(bool persistent_kernel) const {
    return (persistent_kernel ? w_bytes + acc_bytes + h_bytes : acc_bytes) + a_bytes;
  }
};

inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// plan_layout's K split for a block's pass of pass_tiles(g) batch tiles: split K over the
// warps a step would leave idle, keeping >= 4 k-steps of 16 per part; and the accumulator
// tiles it needs.
// Column groups of 16 of a block's largest product: 1 backward, 3 forward (3 q in the
// cluster forward, whose blocks own q unit blocks).
inline int plan_columns(const Plan& pl) {
  return pl.backward ? 1 : 3 * std::max(1, pl.g.cluster ? pl.g.q : 1);
}

inline void plan_split_rule(Plan& pl, int64_t acc_size) {
  Geom& g = pl.g;
  const int mtp = pass_tiles(g);
  const int NC = plan_columns(pl);
  g.nsplit = std::max(1, std::min(kWarps / std::max(1, mtp * NC), std::max(1, g.Hp / 64)));
  pl.acc_bytes = static_cast<int64_t>(g.nsplit) * mtp * NC * kTileElems * acc_size;
}

// Sizes, block count and shared-memory layout of a launch (backward: the reverse-time loop).
inline Plan plan_layout(int64_t T, int64_t B, int64_t H, int64_t op_size, int64_t acc_size,
                        bool backward) {
  Plan pl;
  Geom& g = pl.g;
  g.T = T; g.B = B; g.H = H;
  g.Hp = static_cast<int>(round_up(H, 16));
  g.Bp = static_cast<int>(round_up(std::max<int64_t>(B, 1), 16));
  g.MT = g.Bp / 16;
  g.nbu = g.Hp / kUnits;
  g.mtg = g.MT;
  pl.NB = g.nbu;
  const int K = backward ? 3 * g.Hp : g.Hp;
  const int rows = backward ? 16 : 48;
  g.ldw = K + static_cast<int>(16 / op_size);
  pl.w_bytes = round_up(static_cast<int64_t>(rows) * g.ldw * op_size, 128);
  pl.backward = backward;
  plan_split_rule(pl, acc_size);
  return pl;
}

// Step variant bit 8 (plan_groups): the batch tiles split over `groups` groups of blocks,
// each group the nbu unit blocks again (the same W slices: shared memory per block is
// unchanged but for the accumulators, which shrink with the tiles), so a large batch runs
// on groups x nbu blocks instead of nbu.  B=64 H=1024: 64 blocks doing 4 tiles x 3 gates
// each -> 128 blocks doing 2 x 3 (benchmarks/NOTES-cuda-latency.md, "More blocks at large
// B").  The K split is re-planned by plan_layout's rule for the group's tiles.  groups is
// clamped to [1, MT] and rounded so no group is empty; returns whether the plan changed.
inline bool plan_groups(Plan& pl, int groups, int64_t acc_size) {
  Geom& g = pl.g;
  groups = std::max(1, std::min(groups, g.MT));
  const int mtg = (g.MT + groups - 1) / groups;
  groups = (g.MT + mtg - 1) / mtg;
  if (groups <= 1) return false;
  g.mtg = mtg;
  pl.NB = g.nbu * groups;
  plan_split_rule(pl, acc_size);
  return true;
}

// Step variant bit 4 (plan_balance): the K split chosen to shorten the busiest warp's
// chain of k-steps.  A block's GEMM is `units` tiles (batch tiles x gate column groups),
// each split into s parts of K / s, dealt round-robin to kWarps warps: the busiest warp
// runs ceil(units s / kWarps) parts, K ceil(units s / kWarps) / s k-steps in a row.  The
// old rule (plan_layout) only splits to fill idle warps (units < kWarps); this one takes
// the s in [1, max_split] with the fewest k-steps for the busiest warp (ties: the smaller
// s, fewer partial tiles to add up).  B=64 forward (12 units): s 1 -> 2, 2K -> 1.5K;
// B=16 forward at H >= 512 (3 units): s 2 -> 8, K/2 -> 3K/8.  The same work in all: what
// shrinks is the dependent chain, not the issue count per SM sub-partition.
inline int balanced_split(int units, int max_split) {
  int best = 1, best_rounds = (units + kWarps - 1) / kWarps;
  for (int s = 2; s <= max_split; ++s) {
    const int rounds = (units * s + kWarps - 1) / kWarps;
    if (static_cast<int64_t>(rounds) * best < static_cast<int64_t>(best_rounds) * s) {
      best = s;
      best_rounds = rounds;
    }
  }
  return best;
}

// Re-plans the K split as balanced_split says, if the accumulator tiles then still fit in
// `cap` bytes next to what the block held (the W slice too where the persistent layout
// fit): a balanced plan never moves a launch from the persistent kernels to the per-step
// ones.  Before plan_staging (the staging buffer follows the accumulators).  Returns
// whether the split changed.
inline bool plan_balance(Plan& pl, int64_t acc_size, int64_t cap) {
  Geom& g = pl.g;
  const int mtp = pass_tiles(g);
  const int NC = plan_columns(pl);
  const int s = balanced_split(mtp * NC, std::max(1, g.Hp / 64));
  if (s == g.nsplit) return false;
  const int64_t acc = static_cast<int64_t>(s) * mtp * NC * kTileElems * acc_size;
  const int64_t w = pl.w_bytes + pl.acc_bytes + pl.h_bytes <= cap ? pl.w_bytes + pl.h_bytes : 0;
  if (w + acc > cap) return false;
  g.nsplit = s;
  pl.acc_bytes = acc;
  return true;
}

// The staging buffer of step variant 1 (stage_a): a pass's rows (up to 128) x lds elements,
// lds = K + pad, K = Hp forward, 3 Hp backward (the largest K of any phase).  pad: 16 bytes
// on the tensor-core paths (as the W slice: row r starts at word 4 r (2 m + 1) mod 32, so
// any 8 rows start in 8 distinct 4-bank groups: the fragment loads are conflict-free), 8
// bytes on the FMA paths (lanes read 16 rows at one k: a stride of 2 mod 4 words puts them
// in 16 distinct banks, 16 distinct bank pairs in float64).  Bytes, 128-aligned.
inline int64_t staging_bytes(const Plan& pl, bool fma, int64_t op_size, int* lds) {
  const Geom& g = pl.g;
  const int K = pl.backward ? 3 * g.Hp : g.Hp;
  *lds = K + static_cast<int>((fma ? 8 : 16) / op_size);
  const int rows = pass_tiles(g) * 16;
  return round_up(static_cast<int64_t>(rows) * *lds * op_size, 128);
}

// Adds the staging buffer to the plan of a persistent or a per-step launch when the block's
// shared memory then stays within `cap` bytes; otherwise leaves the plan as it is (the old
// step: A from global memory) and returns false.  Never fails.
inline bool plan_staging(Plan& pl, bool persistent_kernel, bool fma, int64_t op_size,
                         int64_t cap) {
  int lds = 0;
  const int64_t bytes = staging_bytes(pl, fma, op_size, &lds);
  const int64_t base = (persistent_kernel ? pl.w_bytes + pl.acc_bytes : pl.acc_bytes);
  if (base + bytes > cap) return false;
  pl.g.lds = lds;
  pl.g.a_off = static_cast<int>(base);
  pl.a_bytes = bytes;
  return true;
}

// Step variant bit 16 (fwd_cluster_loop): the forward as ONE thread block cluster of at most
// max_cluster blocks, where it fits.  From plan_layout's forward plan: q = ceil(nbu /
// max_cluster) unit blocks per block (the fewest that fit the cluster), C = ceil(nbu / q)
// blocks; the K split by plan_layout's rule for a block's 3 q column groups (balanced by
// plan_balance's rule when `balance`: step variant bit 4); then, after the W slices and the
// accumulators, the h buffers: 2 (3 for reset_after=False: r (.) h) of Bp rows x ldh, ldh =
// Hp + 16 bytes (8 on the FMA paths, as staging_bytes pads).  Taken when a thread's
// elements fit (B x 16 q <= kClusterPer x kThreads) and the block's shared memory fits in
// `cap`; else the plan is left as it was and the answer is false.
inline bool plan_cluster(Plan& pl, int max_cluster, bool reset_after, bool fma,
                         int64_t op_size, int64_t acc_size, int64_t cap, bool balance) {
  if (pl.backward || max_cluster < 1 || pl.g.cluster) return false;
  Plan c = pl;
  Geom& g = c.g;
  g.q = (g.nbu + max_cluster - 1) / max_cluster;
  g.cluster = (g.nbu + g.q - 1) / g.q;
  if (g.B * 16 * g.q > static_cast<int64_t>(kClusterPer) * kThreads) return false;
  g.mtg = g.MT;
  g.lds = 0;
  g.a_off = 0;
  g.split = 0;
  c.NB = g.cluster;
  c.a_bytes = 0;
  c.w_bytes = round_up(static_cast<int64_t>(48) * g.q * g.ldw * op_size, 128);
  plan_split_rule(c, acc_size);
  if (balance) {
    g.nsplit = balanced_split(pass_tiles(g) * plan_columns(c), std::max(1, g.Hp / 64));
    c.acc_bytes = static_cast<int64_t>(g.nsplit) * pass_tiles(g) * plan_columns(c) *
                  kTileElems * acc_size;
  }
  g.ldh = g.Hp + static_cast<int>((fma ? 8 : 16) / op_size);
  g.h_off = static_cast<int>(c.w_bytes + c.acc_bytes);
  c.h_bytes = round_up((reset_after ? 2 : 3) * static_cast<int64_t>(g.Bp) * g.ldh * op_size, 128);
  if (c.smem_bytes(true) > cap) return false;
  pl = c;
  return true;
}

// Step variant bit 2 (fwd_split_loop, bwd_split_loop): the persistent forward and backward
// of a batch of at most kSplitRows rows take the split-barrier step; anything else (the
// per-step kernels, larger batches) keeps the old step.  Returns whether the plan took it.
inline bool plan_split(Plan& pl, bool persistent_kernel) {
  if (!persistent_kernel || pl.g.B > kSplitRows) return false;
  pl.g.split = 1;
  return true;
}

// The per-step path's launches in stream order, as launch(t, phase): the forward runs
// t = 0 .. T-1, the backward t = T-1 .. 0 and then (-1, 2) for dh0; reset_after=False has
// two phases (two launches) per step.
template <typename F>
void for_each_step_launch(int64_t T, bool reset_after, bool backward, F&& launch) {
  const int phases = reset_after ? 1 : 2;
  if (!backward) {
    for (int64_t t = 0; t < T; ++t)
      for (int phase = 0; phase < phases; ++phase) launch(t, phase);
  } else {
    for (int64_t t = T - 1; t >= 0; --t)
      for (int phase = 0; phase < phases; ++phase) launch(t, phase);
    launch(int64_t(-1), 2);
  }
}

}  // namespace cuda_gru
}  // namespace fusedgru
