// fusedgru::gru_fwd / gru_infer / gru_bwd on CUDA: the "cuda" backend.
//
// STATUS: compiled for sm_80 / sm_90 and checked with ptxas (no spills, no stack), but
// NEVER RUN ON A GPU at the time of writing.  tests/test_extension_gpu.py is its first check.
//
// Dimension legend: T timesteps, B batch, I input features, H hidden units, G = 3 gates
// (r, z, n).  Padded sizes: Hp = H rounded up to 16 (units and K), Bp = B rounded up to 16.
// Semantics: fusedgru/reference.py, line for line (SPEC sections 1 and 4).
//
// Forward.  gi = x W_ih^T + b_ih is one ATen (cuBLAS) GEMM before the loop.  Then ONE
// cooperative launch of NB = Hp / 16 blocks runs all T steps: block nb owns hidden units
// [16 nb, 16 nb + 16) and keeps their rows of W_hh for all three gates (48 x Hp) in shared
// memory for the whole sequence.  Per step each block computes its (B x 48) slice of
// h_{t-1} W_hh^T on tensor cores (wmma: bf16/fp16 operands, TF32 for float32 when
// torch.backends.cuda.matmul.allow_tf32 allows it, fp32 accumulation; plain FMA for float64
// and strict float32), applies the gates and the update to its units, publishes h_t in the
// operand dtype to a ping-pong buffer (Bp x Hp, zero padded, so MMA tiles never need
// bounds checks), and meets the other blocks at a grid barrier (cooperative groups).
// reset_after=False needs r (.) h of every unit before W_hn: a second barrier per step.
//
// Inference (gru_infer: nothing needs a gradient) runs the same kernels with ws = nullptr:
// r, z, n, hn are only stored for the backward (no stage of a step reads them back; z
// crosses the barrier of reset_after=False in zstate, r as r (.) h in rhbuf), so the
// stores are skipped and no (T, B, 4H) buffer exists.  A null test on a kernel argument
// (warp-uniform) rather than a template flag: no second set of 20 kernels.
//
// Backward.  The reverse-time loop is the same kind of persistent launch with W_hh^T
// resident: block nb keeps the 16 columns of W_hh of its units (16 x 3Hp) and computes
// dh for them from the previous step's dgh (all 3H columns, published in a ping-pong
// buffer).  dx, dW_ih, dW_hh and the biases are single ATen GEMMs / sums after the loop
// (gru_common.h weight_grads): no atomics, deterministic.
//
// Beyond on-chip capacity (the W slice does not fit in shared memory, or more blocks than
// can be co-resident), the same phase code runs as one launch per step (per phase),
// reading the packed W slice from global memory / L2: GEMM + elementwise still fused in
// one kernel.  make_plan() is the dispatcher's view of that limit (fusedgru::_cuda_plan).
//
// Every launch is on the current stream under a CUDAGuard; offsets into (T, B, ...) tensors
// are 64-bit; nothing synchronises with the host.
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>
#include <torch/library.h>

#include <map>
#include <mutex>
#include <utility>
#include <sstream>
#include <type_traits>

#include "gru_common.h"

namespace fusedgru {
namespace cuda_gru {

namespace cg = cooperative_groups;
using at::Tensor;

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

template <typename op_t, typename acc_t, bool TC>
__device__ __forceinline__ void warp_tile(const op_t* A, int lda, const op_t* W, int ldw,
                                          int k0, int k1, acc_t* out) {
  // No __restrict__ on A: it is a buffer other blocks write during the same persistent
  // launch (visible after grid.sync()); const + restrict would let nvcc use the
  // non-coherent read-only path (LDG.NC), which may return stale lines.
  if constexpr (TC) {
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
    // CUDA cores (float64, or float32 when TF32 is not allowed): lane -> row m, 8 columns.
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
};

// Block GEMM for batch tiles [mt0, mt1): NC column groups of 16 (W rows c*16.. at c*16*ldw),
// K split into g.nsplit parts; partial tiles go to acc[((s * MTP + mt - mt0) * NC + c)].
template <typename op_t, typename acc_t, bool TC>
__device__ __forceinline__ void block_gemm(const Geom& g, const op_t* A, int lda,
                                           const op_t* W, int NC, int K, int mt0, int mt1,
                                           acc_t* acc) {
  const int warp = threadIdx.x >> 5;
  const int mtp = mt1 - mt0;
  const int units = g.nsplit * mtp * NC;
  const int kpart = ((K / 16 + g.nsplit - 1) / g.nsplit) * 16;
  for (int u = warp; u < units; u += kWarps) {
    const int s = u / (mtp * NC), rem = u % (mtp * NC);
    const int mt = mt0 + rem / NC, c = rem % NC;
    const int k0 = s * kpart, k1 = min(K, k0 + kpart);
    acc_t* out = acc + static_cast<int64_t>((s * mtp + rem / NC) * NC + c) * kTileElems;
    if (k0 < k1) {
      warp_tile<op_t, acc_t, TC>(A + static_cast<int64_t>(mt) * 16 * lda, lda,
                                 W + static_cast<int64_t>(c) * 16 * g.ldw, g.ldw, k0, k1, out);
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
// Forward
// ---------------------------------------------------------------------------------------

template <typename scalar_t, typename op_t, typename acc_t>
struct FwdArgs {
  Geom g;
  const scalar_t* gi;    // (T, B, 3H)  x W_ih^T + b_ih
  const scalar_t* bhh;   // (3H,) or nullptr
  const op_t* wpack;     // (NB, 3, 16, ldw)  rows of W_hh per block, zero padded
  scalar_t* y;           // (T, B, H)
  scalar_t* ws;          // (T, B, 4H)   [r, z, n, hn], or nullptr (gru_infer: not kept)
  acc_t* hstate;         // (B, Hp)  the state in the accumulation type (own units only)
  acc_t* zstate;         // (B, Hp)  z between the two phases of reset_after=False
  op_t* hbuf;            // (2, Bp, Hp)  h_t as MMA operand, ping-pong; hbuf[0] = h0
  op_t* rhbuf;           // (Bp, Hp)  r (.) h_{t-1} (reset_after=False)
  bool reset_after;
};

template <typename scalar_t, typename op_t, typename acc_t, bool TC>
__device__ void fwd_phase(const FwdArgs<scalar_t, op_t, acc_t>& p, const op_t* W, acc_t* acc,
                          int64_t t, int phase) {
  const Geom& g = p.g;
  const int64_t B = g.B, H = g.H, Hp = g.Hp;
  const int j0 = blockIdx.x * kUnits;
  const op_t* hin = p.hbuf + (t & 1) * static_cast<int64_t>(g.Bp) * Hp;
  op_t* hout = p.hbuf + ((t + 1) & 1) * static_cast<int64_t>(g.Bp) * Hp;
  auto bias = [&](int64_t k) { return p.bhh ? acc_t(ldf(p.bhh + k)) : acc_t(0); };

  for (int mt0 = 0; mt0 < g.MT; mt0 += kMaxMTilesPerPass) {
    const int mt1 = min(g.MT, mt0 + kMaxMTilesPerPass), mtp = mt1 - mt0;
    const int64_t b_end = imin64(B, static_cast<int64_t>(mt1) * 16);
    const int64_t b_beg = static_cast<int64_t>(mt0) * 16;
    if (p.reset_after) {
      block_gemm<op_t, acc_t, TC>(g, hin, Hp, W, 3, Hp, mt0, mt1, acc);
      for (int64_t e = threadIdx.x; e < (b_end - b_beg) * kUnits; e += kThreads) {
        const int64_t b = b_beg + e / kUnits;
        const int jj = static_cast<int>(e % kUnits);
        const int64_t j = j0 + jj;
        if (j >= H) continue;
        const int64_t row = t * B + b;
        const scalar_t* gir = p.gi + row * 3 * H;
        const acc_t hr = tile_sum(g, acc, mt0, mtp, 3, b, 0, jj) + bias(j);
        const acc_t hz = tile_sum(g, acc, mt0, mtp, 3, b, 1, jj) + bias(H + j);
        const acc_t hn = tile_sum(g, acc, mt0, mtp, 3, b, 2, jj) + bias(2 * H + j);
        const acc_t r = sigm(acc_t(ldf(gir + j)) + hr);
        const acc_t z = sigm(acc_t(ldf(gir + H + j)) + hz);
        const acc_t n = tanh_(acc_t(ldf(gir + 2 * H + j)) + r * hn);
        const acc_t hp = p.hstate[b * Hp + j];
        const acc_t h = n + z * (hp - n);
        p.hstate[b * Hp + j] = h;
        stf(p.y + row * H + j, h);
        if (p.ws) {
          scalar_t* wsr = p.ws + row * 4 * H;
          stf(wsr + j, r);
          stf(wsr + H + j, z);
          stf(wsr + 2 * H + j, n);
          stf(wsr + 3 * H + j, hn);
        }
        stf(hout + b * Hp + j, h);
      }
    } else if (phase == 0) {  // r, z from h_{t-1}; publish r (.) h_{t-1}
      block_gemm<op_t, acc_t, TC>(g, hin, Hp, W, 2, Hp, mt0, mt1, acc);
      for (int64_t e = threadIdx.x; e < (b_end - b_beg) * kUnits; e += kThreads) {
        const int64_t b = b_beg + e / kUnits;
        const int jj = static_cast<int>(e % kUnits);
        const int64_t j = j0 + jj;
        if (j >= H) continue;
        const int64_t row = t * B + b;
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
      block_gemm<op_t, acc_t, TC>(g, p.rhbuf, Hp, W + 2 * 16 * g.ldw, 1, Hp, mt0, mt1, acc);
      for (int64_t e = threadIdx.x; e < (b_end - b_beg) * kUnits; e += kThreads) {
        const int64_t b = b_beg + e / kUnits;
        const int jj = static_cast<int>(e % kUnits);
        const int64_t j = j0 + jj;
        if (j >= H) continue;
        const int64_t row = t * B + b;
        const acc_t hn = tile_sum(g, acc, mt0, mtp, 1, b, 0, jj) + bias(2 * H + j);
        const acc_t n = tanh_(acc_t(ldf(p.gi + row * 3 * H + 2 * H + j)) + hn);
        const acc_t z = p.zstate[b * Hp + j];
        const acc_t hp = p.hstate[b * Hp + j];
        const acc_t h = n + z * (hp - n);
        p.hstate[b * Hp + j] = h;
        stf(p.y + row * H + j, h);
        if (p.ws) {
          stf(p.ws + row * 4 * H + 2 * H + j, n);
          stf(p.ws + row * 4 * H + 3 * H + j, hn);
        }
        stf(hout + b * Hp + j, h);
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

// One cooperative launch for the whole sequence; W slice resident in shared memory.
template <typename scalar_t, typename op_t, typename acc_t, bool TC>
__global__ void __launch_bounds__(kThreads, 1)
    gru_fwd_persistent(const FwdArgs<scalar_t, op_t, acc_t> p, int64_t w_bytes) {
  extern __shared__ __align__(128) unsigned char smem[];
  op_t* Ws = reinterpret_cast<op_t*>(smem);
  acc_t* acc = acc_region<op_t, acc_t>(smem, w_bytes);
  const int64_t slice = 3 * 16 * static_cast<int64_t>(p.g.ldw);
  copy_to_smem(Ws, p.wpack + blockIdx.x * slice, slice);
  cg::grid_group grid = cg::this_grid();
  for (int64_t t = 0; t < p.g.T; ++t) {
    fwd_phase<scalar_t, op_t, acc_t, TC>(p, Ws, acc, t, 0);
    grid.sync();
    if (!p.reset_after) {
      fwd_phase<scalar_t, op_t, acc_t, TC>(p, Ws, acc, t, 1);
      grid.sync();
    }
  }
}

// Fallback: one launch per step (and phase); the W slice is read from global memory / L2.
template <typename scalar_t, typename op_t, typename acc_t, bool TC>
__global__ void __launch_bounds__(kThreads)
    gru_fwd_step(const FwdArgs<scalar_t, op_t, acc_t> p, int64_t t, int phase) {
  extern __shared__ __align__(128) unsigned char smem[];
  acc_t* acc = reinterpret_cast<acc_t*>(smem);
  const int64_t slice = 3 * 16 * static_cast<int64_t>(p.g.ldw);
  fwd_phase<scalar_t, op_t, acc_t, TC>(p, p.wpack + blockIdx.x * slice, acc, t, phase);
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
  bool reset_after;
};

// phase 0 / 1: step t (phase 1 only for reset_after=False); phase 2: dh0 after the loop.
template <typename scalar_t, typename op_t, typename acc_t, bool TC>
__device__ void bwd_phase(const BwdArgs<scalar_t, op_t, acc_t>& p, const op_t* W, acc_t* acc,
                          int64_t t, int phase) {
  const Geom& g = p.g;
  const int64_t B = g.B, H = g.H, Hp = g.Hp, T = g.T;
  const int64_t buf = static_cast<int64_t>(g.Bp) * 3 * Hp;
  const int lda = 3 * g.Hp;
  const int j0 = blockIdx.x * kUnits;
  const int Krec = p.reset_after ? 3 * g.Hp : 2 * g.Hp;  // K of the product that yields dh
  const op_t* gin = p.gbuf + ((t + 1) & 1) * buf;          // dgh_{t+1}
  op_t* gout = p.gbuf + (t & 1) * buf;                      // dgh_t
  const bool has_next = phase == 2 || t < T - 1;

  for (int mt0 = 0; mt0 < g.MT; mt0 += kMaxMTilesPerPass) {
    const int mt1 = min(g.MT, mt0 + kMaxMTilesPerPass), mtp = mt1 - mt0;
    const int64_t b_end = imin64(B, static_cast<int64_t>(mt1) * 16);
    const int64_t b_beg = static_cast<int64_t>(mt0) * 16;
    if (phase == 1) {
      // d(r h) = da_n W_hn for own units; da_n of every unit is in gout's n columns.
      block_gemm<op_t, acc_t, TC>(g, gout + 2 * Hp, lda, W + 2 * Hp, 1, g.Hp, mt0, mt1, acc);
    } else if (has_next) {
      // dh = (previous g z ...) + dgh_{t+1} W_hh[:, own units]
      const op_t* src = phase == 2 ? p.gbuf : gin;
      block_gemm<op_t, acc_t, TC>(g, src, lda, W, 1, Krec, mt0, mt1, acc);
    }
    for (int64_t e = threadIdx.x; e < (b_end - b_beg) * kUnits; e += kThreads) {
      const int64_t b = b_beg + e / kUnits;
      const int jj = static_cast<int>(e % kUnits);
      const int64_t j = j0 + jj;
      if (j >= H) continue;
      const acc_t mm = has_next || phase == 1 ? tile_sum(g, acc, mt0, mtp, 1, b, 0, jj) : acc_t(0);
      acc_t* dhs = p.dhs + b * Hp + j;
      if (phase == 2) {
        stf(p.dh0 + b * H + j, *dhs + mm);
        continue;
      }
      const int64_t row = t * B + b;
      const scalar_t* wsr = p.ws + row * 4 * H;
      const acc_t r = ldf(wsr + j), z = ldf(wsr + H + j);
      const acc_t h = t > 0 ? acc_t(ldf(p.y + (row - B) * H + j))
                            : (p.h0 ? acc_t(ldf(p.h0 + b * H + j)) : acc_t(0));
      scalar_t* dghr = p.dgh + row * 3 * H;
      op_t* go = gout + b * 3 * Hp;
      if (phase == 1) {
        const acc_t da_r = mm * h * r * (acc_t(1) - r);
        stf(dghr + j, da_r);
        stf(go + j, da_r);
        *dhs += mm * r;
        continue;
      }
      const acc_t gg = acc_t(ldf(p.gy + row * H + j)) + *dhs + mm;
      const acc_t n = ldf(wsr + 2 * H + j);
      const acc_t da_n = gg * (acc_t(1) - z) * (acc_t(1) - n * n);
      const acc_t da_z = gg * (h - n) * z * (acc_t(1) - z);
      *dhs = gg * z;
      stf(dghr + H + j, da_z);
      stf(go + Hp + j, da_z);
      stf(go + 2 * Hp + j, da_n);  // reset_after=False: operand of phase 1
      if (p.reset_after) {
        const acc_t hn = ldf(wsr + 3 * H + j);
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
    }
    __syncthreads();
  }
}

template <typename scalar_t, typename op_t, typename acc_t, bool TC>
__global__ void __launch_bounds__(kThreads, 1)
    gru_bwd_persistent(const BwdArgs<scalar_t, op_t, acc_t> p, int64_t w_bytes) {
  extern __shared__ __align__(128) unsigned char smem[];
  op_t* Ws = reinterpret_cast<op_t*>(smem);
  acc_t* acc = acc_region<op_t, acc_t>(smem, w_bytes);
  const int64_t slice = 16 * static_cast<int64_t>(p.g.ldw);
  copy_to_smem(Ws, p.wpack + blockIdx.x * slice, slice);
  cg::grid_group grid = cg::this_grid();
  for (int64_t t = p.g.T - 1; t >= 0; --t) {
    bwd_phase<scalar_t, op_t, acc_t, TC>(p, Ws, acc, t, 0);
    grid.sync();
    if (!p.reset_after) {
      bwd_phase<scalar_t, op_t, acc_t, TC>(p, Ws, acc, t, 1);
      grid.sync();
    }
  }
  bwd_phase<scalar_t, op_t, acc_t, TC>(p, Ws, acc, -1, 2);
}

template <typename scalar_t, typename op_t, typename acc_t, bool TC>
__global__ void __launch_bounds__(kThreads)
    gru_bwd_step(const BwdArgs<scalar_t, op_t, acc_t> p, int64_t t, int phase) {
  extern __shared__ __align__(128) unsigned char smem[];
  acc_t* acc = reinterpret_cast<acc_t*>(smem);
  const int64_t slice = 16 * static_cast<int64_t>(p.g.ldw);
  bwd_phase<scalar_t, op_t, acc_t, TC>(p, p.wpack + blockIdx.x * slice, acc, t, phase);
}

// ---------------------------------------------------------------------------------------
// Host: planning (the on-chip capacity limit), packing, launches
// ---------------------------------------------------------------------------------------

struct DeviceInfo {
  int sms = 0, smem_optin = 0, coop = 0;
};

DeviceInfo device_info(int dev) {
  static std::mutex mu;
  static DeviceInfo cache[64];
  static bool known[64] = {};
  std::lock_guard<std::mutex> lock(mu);
  TORCH_CHECK(dev >= 0 && dev < 64, "fusedgru: CUDA device index out of range");
  if (!known[dev]) {
    DeviceInfo d;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&d.sms, cudaDevAttrMultiProcessorCount, dev));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&d.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&d.coop, cudaDevAttrCooperativeLaunch, dev));
    cache[dev] = d;
    known[dev] = true;
  }
  return cache[dev];
}

// Lets `kern` be launched with up to `bytes` of dynamic shared memory on device `dev`.
// The attribute belongs to the kernel and device, not to a launch: setting it to each
// call's own size would let a host thread with a smaller H lower it between another
// thread's set and launch, and that launch would fail.  So it only ever grows (under a
// lock); a launch asks for its own size, and the occupancy query is made with it.
void allow_dynamic_smem(const void* kern, int dev, int64_t bytes) {
  static std::mutex mu;
  static std::map<std::pair<const void*, int>, int64_t> allowed;
  std::lock_guard<std::mutex> lock(mu);
  int64_t& cur = allowed[{kern, dev}];
  if (bytes > cur) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(bytes)));
    cur = bytes;
  }
}

struct Plan {
  Geom g;
  int NB = 0;
  int64_t w_bytes = 0, acc_bytes = 0;
  bool persistent = false;
  std::string why;
};

inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// kern: the persistent kernel the plan would launch (for its occupancy).
Plan make_plan(int64_t T, int64_t B, int64_t H, int64_t op_size, int64_t acc_size,
               bool backward, const void* kern, int dev) {
  Plan pl;
  Geom& g = pl.g;
  g.T = T; g.B = B; g.H = H;
  g.Hp = static_cast<int>(round_up(H, 16));
  g.Bp = static_cast<int>(round_up(std::max<int64_t>(B, 1), 16));
  g.MT = g.Bp / 16;
  pl.NB = g.Hp / kUnits;
  const int K = backward ? 3 * g.Hp : g.Hp;
  const int rows = backward ? 16 : 48;
  const int NC = backward ? 1 : 3;
  g.ldw = K + static_cast<int>(16 / op_size);
  const int mtp = std::min(g.MT, kMaxMTilesPerPass);
  // Split K over the warps a step would leave idle, keeping >= 4 k-steps of 16 per part.
  g.nsplit = std::max(1, std::min(kWarps / std::max(1, mtp * NC), std::max(1, g.Hp / 64)));
  pl.w_bytes = round_up(static_cast<int64_t>(rows) * g.ldw * op_size, 128);
  pl.acc_bytes = static_cast<int64_t>(g.nsplit) * mtp * NC * kTileElems * acc_size;
  const DeviceInfo d = device_info(dev);
  const int mode = cuda_path_mode();
  std::ostringstream why;
  TORCH_CHECK(pl.acc_bytes <= d.smem_optin, "fusedgru: accumulator tiles (", pl.acc_bytes,
              " bytes) exceed shared memory");
  int occ = 0;
  if (pl.w_bytes + pl.acc_bytes <= d.smem_optin) {
    allow_dynamic_smem(kern, dev, pl.w_bytes + pl.acc_bytes);
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
        &occ, kern, kThreads, static_cast<size_t>(pl.w_bytes + pl.acc_bytes)));
  }
  if (mode == 2) {
    why << "per-step kernels forced (fusedgru::_set_cuda_path(2))";
  } else if (!d.coop) {
    why << "per-step kernels: the device has no cooperative launch";
  } else if (pl.w_bytes + pl.acc_bytes > d.smem_optin) {
    why << "per-step kernels: W slice " << pl.w_bytes << " B + accumulators " << pl.acc_bytes
        << " B > " << d.smem_optin << " B of shared memory per block";
  } else if (static_cast<int64_t>(pl.NB) > static_cast<int64_t>(occ) * d.sms) {
    why << "per-step kernels: " << pl.NB << " blocks > " << occ << " x " << d.sms
        << " co-resident";
  } else {
    pl.persistent = true;
    why << "persistent: " << pl.NB << " blocks x " << kThreads << " threads, "
        << (pl.w_bytes + pl.acc_bytes) << " B shared memory (W slice " << pl.w_bytes << ")";
  }
  pl.why = why.str();
  TORCH_CHECK(pl.persistent || mode != 1, "fusedgru: persistent kernel requested but ", pl.why);
  return pl;
}

// Forward W_hh packing: (NB, 3, 16, ldw), block nb / gate c / unit n holds W_hh[c H + 16 nb + n].
Tensor pack_forward(const Tensor& w_hh, const Geom& g, at::ScalarType op_type) {
  const int64_t H = g.H;
  Tensor w = at::constant_pad_nd(w_hh.view({3, H, H}), {0, g.ldw - H, 0, g.Hp - H});
  return w.view({3, g.Hp / kUnits, kUnits, g.ldw}).permute({1, 0, 2, 3}).contiguous().to(op_type);
}

// Backward packing: (NB, 16, ldw) with [nb][n][c Hp + k] = W_hh[c H + k, 16 nb + n].
Tensor pack_backward(const Tensor& w_hh, const Geom& g, at::ScalarType op_type) {
  const int64_t H = g.H;
  Tensor w = at::constant_pad_nd(w_hh.view({3, H, H}), {0, g.Hp - H, 0, g.Hp - H});
  w = w.permute({2, 0, 1}).reshape({g.Hp, 3 * g.Hp});
  return at::constant_pad_nd(w, {0, g.ldw - 3 * g.Hp}).contiguous().to(op_type);
}

template <typename T>
struct Native { using type = T; };
template <>
struct Native<at::Half> { using type = __half; };
template <>
struct Native<at::BFloat16> { using type = __nv_bfloat16; };

template <typename T>
const typename Native<T>::type* nat(const Tensor& t) {
  return reinterpret_cast<const typename Native<T>::type*>(t.data_ptr<T>());
}
template <typename T>
typename Native<T>::type* nat_mut(const Tensor& t) {
  return reinterpret_cast<typename Native<T>::type*>(t.data_ptr<T>());
}

// Whether torch lets float32 matmuls on CUDA use TF32 (fusedgru.ops.tf32_matmul_allowed in
// C++): read through the fp32_precision settings, since the legacy allowTF32CuBLAS() throws
// once a user has set those ("mix of the legacy and new APIs"); setting the legacy flag sets
// them too.  "none" on the CUDA matmul inherits the generic setting.
inline bool tf32_matmul_allowed() {
  const auto& ctx = at::globalContext();
  at::Float32Precision p = ctx.float32Precision(at::Float32Backend::CUDA, at::Float32Op::MATMUL);
  if (p == at::Float32Precision::NONE)
    p = ctx.float32Precision(at::Float32Backend::GENERIC, at::Float32Op::ALL);
  return p == at::Float32Precision::TF32;
}

// Calls FN<scalar_t (ATen), op_t (ATen), acc_t, TC>(args...) for dtype ST.  float32 uses TF32
// tensor cores only when torch allows TF32 for float32 matmuls (False by default).
#define FUSEDGRU_DISPATCH(ST, FN, ...)                                                   \
  switch (ST) {                                                                          \
    case at::kFloat:                                                                     \
      if (tf32_matmul_allowed())                                                         \
        FN<float, float, float, true>(__VA_ARGS__);                                      \
      else                                                                               \
        FN<float, float, float, false>(__VA_ARGS__);                                     \
      break;                                                                             \
    case at::kDouble: FN<double, double, double, false>(__VA_ARGS__); break;             \
    case at::kHalf: FN<at::Half, at::Half, float, true>(__VA_ARGS__); break;             \
    case at::kBFloat16: FN<at::BFloat16, at::BFloat16, float, true>(__VA_ARGS__); break; \
    default: TORCH_CHECK(false, "fusedgru (cuda): unsupported dtype ", ST);              \
  }

void check_cuda(const char* op, const Tensor& x) {
  TORCH_CHECK(x.is_cuda(), op, ": expected CUDA tensors, got ", x.device());
  const auto st = x.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16,
              op, ": supports float32, float64, float16 and bfloat16, got ", st);
}

template <typename scalar_t, typename op_at, typename acc_t, bool TC>
void launch_forward(const Dims& d, const Tensor& x, const std::optional<Tensor>& h0_,
                    const Tensor& w_hh, const Tensor& gi, const Tensor& bhh, bool reset_after,
                    Tensor& y, Tensor& ws /* (T,B,4H), or undefined: not kept */) {
  const int dev = x.get_device();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(dev).stream();
  using sc = typename Native<scalar_t>::type;
  using opt = typename Native<op_at>::type;
  const at::ScalarType op_type = c10::CppTypeToScalarType<op_at>::value;
  const at::ScalarType acc_type = c10::CppTypeToScalarType<acc_t>::value;
  auto persistent = gru_fwd_persistent<sc, opt, acc_t, TC>;
  Plan pl = make_plan(d.T, d.B, d.H, sizeof(opt), sizeof(acc_t), false,
                      reinterpret_cast<const void*>(persistent), dev);
  const Geom& g = pl.g;
  const Tensor wpack = pack_forward(w_hh, g, op_type);
  Tensor hstate = at::zeros({d.B, g.Hp}, x.options().dtype(acc_type));
  Tensor zstate = reset_after ? Tensor() : at::empty({d.B, g.Hp}, x.options().dtype(acc_type));
  Tensor hbuf = at::zeros({2, g.Bp, g.Hp}, x.options().dtype(op_type));
  Tensor rhbuf = reset_after ? Tensor() : at::zeros({g.Bp, g.Hp}, x.options().dtype(op_type));
  if (h0_.has_value()) {
    hstate.narrow(1, 0, d.H).copy_(*h0_);
    hbuf[0].narrow(0, 0, d.B).narrow(1, 0, d.H).copy_(*h0_);
  }
  FwdArgs<sc, opt, acc_t> p;
  p.g = g;
  p.gi = nat<scalar_t>(gi);
  p.bhh = bhh.defined() ? nat<scalar_t>(bhh) : nullptr;
  p.wpack = nat<op_at>(wpack);
  p.y = nat_mut<scalar_t>(y);
  p.ws = ws.defined() ? nat_mut<scalar_t>(ws) : nullptr;
  p.hstate = hstate.data_ptr<acc_t>();
  p.zstate = reset_after ? nullptr : zstate.data_ptr<acc_t>();
  p.hbuf = nat_mut<op_at>(hbuf);
  p.rhbuf = reset_after ? nullptr : nat_mut<op_at>(rhbuf);
  p.reset_after = reset_after;
  if (pl.persistent) {
    int64_t w_bytes = pl.w_bytes;
    void* args[] = {&p, &w_bytes};
    C10_CUDA_CHECK(cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(persistent),
                                               dim3(pl.NB), dim3(kThreads), args,
                                               static_cast<size_t>(pl.w_bytes + pl.acc_bytes),
                                               stream));
  } else {
    auto step = gru_fwd_step<sc, opt, acc_t, TC>;
    allow_dynamic_smem(reinterpret_cast<const void*>(step), dev, pl.acc_bytes);
    for (int64_t t = 0; t < d.T; ++t) {
      for (int phase = 0; phase < (reset_after ? 1 : 2); ++phase) {
        step<<<pl.NB, kThreads, pl.acc_bytes, stream>>>(p, t, phase);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    }
  }
}

// The forward of gru_fwd (save_ws: ws (T, B, 4H) keeps r, z, n, hn of every step for the
// backward) and of gru_infer (no ws: the kernels skip those stores).  Returns {y (T, B, H),
// ws (T, B, 4H) or an undefined tensor}.
std::tuple<Tensor, Tensor> forward_cuda(const char* op, bool save_ws, const Tensor& x_,
                                        const std::optional<Tensor>& h0_, const Tensor& w_ih_,
                                        const Tensor& w_hh_, const std::optional<Tensor>& b_ih_,
                                        const std::optional<Tensor>& b_hh_, bool reset_after) {
  const Dims d = check_inputs(op, x_, h0_, w_ih_, w_hh_, b_ih_, b_hh_);
  check_cuda(op, x_);
  const c10::cuda::CUDAGuard guard(x_.device());
  const Tensor x = x_.contiguous(), w_ih = w_ih_.contiguous(), w_hh = w_hh_.contiguous();
  Tensor y = at::empty({d.T, d.B, d.H}, x.options());
  Tensor ws = save_ws ? at::empty({d.T, d.B, 4 * d.H}, x.options()) : Tensor();
  poison(y);
  if (save_ws) poison(ws);
  if (d.T == 0 || d.B == 0) return {y, ws};
  const Tensor x2 = x.view({d.T * d.B, d.I});
  const Tensor gi = b_ih_.has_value() ? at::addmm(*b_ih_, x2, w_ih.t()) : at::mm(x2, w_ih.t());
  const Tensor bhh = b_hh_.has_value() ? b_hh_->contiguous() : Tensor();

  FUSEDGRU_DISPATCH(x.scalar_type(), launch_forward, d, x, h0_, w_hh, gi, bhh, reset_after, y, ws);
  return {y, ws};
}

std::tuple<Tensor, Tensor> gru_fwd_cuda(const Tensor& x, const std::optional<Tensor>& h0,
                                        const Tensor& w_ih, const Tensor& w_hh,
                                        const std::optional<Tensor>& b_ih,
                                        const std::optional<Tensor>& b_hh, bool reset_after) {
  return forward_cuda("fusedgru::gru_fwd (cuda)", true, x, h0, w_ih, w_hh, b_ih, b_hh,
                      reset_after);
}

// y only: the same kernels as gru_fwd (bitwise the same y), without the (T, B, 4H) ws.
Tensor gru_infer_cuda(const Tensor& x, const std::optional<Tensor>& h0, const Tensor& w_ih,
                      const Tensor& w_hh, const std::optional<Tensor>& b_ih,
                      const std::optional<Tensor>& b_hh, bool reset_after) {
  return std::get<0>(forward_cuda("fusedgru::gru_infer (cuda)", false, x, h0, w_ih, w_hh, b_ih,
                                  b_hh, reset_after));
}

template <typename scalar_t, typename op_at, typename acc_t, bool TC>
void launch_backward(const Dims& d, const Tensor& grad_y, const Tensor& x,
                     const std::optional<Tensor>& h0, const Tensor& w_hh, const Tensor& y,
                     const Tensor& ws, bool reset_after, Tensor& dgi, Tensor& dgh, Tensor& dh0) {
  const int dev = x.get_device();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(dev).stream();
  using sc = typename Native<scalar_t>::type;
  using opt = typename Native<op_at>::type;
  const at::ScalarType op_type = c10::CppTypeToScalarType<op_at>::value;
  const at::ScalarType acc_type = c10::CppTypeToScalarType<acc_t>::value;
  auto persistent = gru_bwd_persistent<sc, opt, acc_t, TC>;
  Plan pl = make_plan(d.T, d.B, d.H, sizeof(opt), sizeof(acc_t), true,
                      reinterpret_cast<const void*>(persistent), dev);
  const Geom& g = pl.g;
  const Tensor wpack = pack_backward(w_hh, g, op_type);
  Tensor dhs = at::zeros({d.B, g.Hp}, x.options().dtype(acc_type));
  Tensor gbuf = at::zeros({2, g.Bp, 3 * g.Hp}, x.options().dtype(op_type));
  BwdArgs<sc, opt, acc_t> p;
  p.g = g;
  p.gy = nat<scalar_t>(grad_y);
  p.ws = nat<scalar_t>(ws);
  p.y = nat<scalar_t>(y);
  p.h0 = h0.has_value() ? nat<scalar_t>(*h0) : nullptr;
  p.wpack = nat<op_at>(wpack);
  p.dgi = nat_mut<scalar_t>(dgi);
  p.dgh = nat_mut<scalar_t>(dgh);
  p.dhs = dhs.data_ptr<acc_t>();
  p.gbuf = nat_mut<op_at>(gbuf);
  p.dh0 = nat_mut<scalar_t>(dh0);
  p.reset_after = reset_after;
  if (pl.persistent) {
    int64_t w_bytes = pl.w_bytes;
    void* args[] = {&p, &w_bytes};
    C10_CUDA_CHECK(cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(persistent),
                                               dim3(pl.NB), dim3(kThreads), args,
                                               static_cast<size_t>(pl.w_bytes + pl.acc_bytes),
                                               stream));
  } else {
    auto step = gru_bwd_step<sc, opt, acc_t, TC>;
    allow_dynamic_smem(reinterpret_cast<const void*>(step), dev, pl.acc_bytes);
    for (int64_t t = d.T - 1; t >= 0; --t) {
      for (int phase = 0; phase < (reset_after ? 1 : 2); ++phase) {
        step<<<pl.NB, kThreads, pl.acc_bytes, stream>>>(p, t, phase);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    }
    step<<<pl.NB, kThreads, pl.acc_bytes, stream>>>(p, -1, 2);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> gru_bwd_cuda(
    const Tensor& grad_y_, const Tensor& x_, const std::optional<Tensor>& h0_,
    const Tensor& w_ih_, const Tensor& w_hh_, const Tensor& y_, const Tensor& ws_,
    bool reset_after) {
  constexpr const char* op = "fusedgru::gru_bwd (cuda)";
  const Dims d = check_inputs(op, x_, h0_, w_ih_, w_hh_, std::nullopt, std::nullopt);
  check_backward_extra(op, d, x_, grad_y_, y_, ws_);
  check_cuda(op, x_);
  const c10::cuda::CUDAGuard guard(x_.device());
  const Tensor x = x_.contiguous(), w_ih = w_ih_.contiguous(), w_hh = w_hh_.contiguous();
  const Tensor grad_y = grad_y_.contiguous(), y = y_.contiguous(), ws = ws_.contiguous();
  const std::optional<Tensor> h0 =
      h0_.has_value() ? std::optional<Tensor>(h0_->contiguous()) : std::nullopt;
  Tensor dgh = at::empty({d.T, d.B, 3 * d.H}, x.options());
  Tensor dgi = reset_after ? at::empty({d.T, d.B, 3 * d.H}, x.options()) : dgh;
  Tensor dh0 = at::empty({d.B, d.H}, x.options());
  poison(dgh);
  poison(dgi);
  poison(dh0);
  if (d.T == 0 || d.B == 0) {
    dh0.zero_();
  } else {
    FUSEDGRU_DISPATCH(x.scalar_type(), launch_backward, d, grad_y, x, h0, w_hh, y, ws,
                      reset_after, dgi, dgh, dh0);
  }
  const Tensor hprev = states_before(h0, y);
  auto [dx, dw_ih, dw_hh, db_ih, db_hh] = weight_grads(dgi, dgh, x, w_ih, hprev, ws, reset_after);
  return {dx, dh0, dw_ih, dw_hh, db_ih, db_hh};
}

template <typename scalar_t, typename op_at, typename acc_t, bool TC>
void describe_plan(const Tensor& x, const Tensor& w_hh, bool reset_after, bool backward,
                   std::string& out) {
  using sc = typename Native<scalar_t>::type;
  using opt = typename Native<op_at>::type;
  const void* k = backward ? reinterpret_cast<const void*>(gru_bwd_persistent<sc, opt, acc_t, TC>)
                           : reinterpret_cast<const void*>(gru_fwd_persistent<sc, opt, acc_t, TC>);
  Plan pl = make_plan(x.size(0), x.size(1), w_hh.size(1), sizeof(opt), sizeof(acc_t), backward,
                      k, x.get_device());
  out = pl.why + (TC ? ", tensor cores" : ", CUDA cores") +
        (reset_after ? "" : ", two barriers per step");
}

std::string cuda_plan(const Tensor& x, const Tensor& w_hh, bool reset_after, bool backward) {
  check_cuda("fusedgru::_cuda_plan", x);
  TORCH_CHECK(x.dim() == 3 && w_hh.dim() == 2, "fusedgru::_cuda_plan: x (T,B,I), w_hh (3H,H)");
  const c10::cuda::CUDAGuard guard(x.device());
  std::string out;
  FUSEDGRU_DISPATCH(x.scalar_type(), describe_plan, x, w_hh, reset_after, backward, out);
  return out;
}

}  // namespace cuda_gru
}  // namespace fusedgru

TORCH_LIBRARY_IMPL(fusedgru, CUDA, m) {
  m.impl("gru_fwd", &fusedgru::cuda_gru::gru_fwd_cuda);
  m.impl("gru_infer", &fusedgru::cuda_gru::gru_infer_cuda);
  m.impl("gru_bwd", &fusedgru::cuda_gru::gru_bwd_cuda);
  m.impl("_cuda_plan", &fusedgru::cuda_gru::cuda_plan);
}
