// The part of CUDA that csrc/gru_kernels.cuh uses, for the host C++ compiler: the kernels'
// own source runs on the CPU, one OS thread per CUDA thread (gru_host_main.cpp), under
// ThreadSanitizer and AddressSanitizer.  Only what those kernels use is here; an unshimmed
// construct is a compile error, not a silent stand-in.
//
//   threadIdx, blockIdx, blockDim, gridDim   thread_local, set by launch()
//   __syncthreads()                           a barrier per block
//   cooperative_groups::this_grid().sync()    a barrier over the grid (cooperative
//                                             launches only; anything else aborts)
//   this_grid().barrier_arrive() / barrier_wait(token)
//                                             the same barrier split in two: arrive counts
//                                             the thread in, wait returns once every thread
//                                             of the grid has arrived; a wait without its
//                                             arrival, a second arrival before the wait, or
//                                             a kernel returning between the two aborts
//   this_cluster(): sync(), barrier_arrive() / barrier_wait(token), block_rank(),
//                   num_blocks(), map_shared_rank(p, rank)
//                                             thread block clusters (launch(..., cluster)):
//                                             a barrier over the cluster's threads, split as
//                                             the grid's is; map_shared_rank maps an address
//                                             in the calling block's dynamic shared memory to
//                                             the same offset in block `rank` of its cluster
//                                             (an address outside it, a rank outside the
//                                             cluster or a launch without clusters aborts)
//   FUSEDGRU_DYNAMIC_SMEM(smem)               the block's dynamic shared memory, allocated at
//                                             its exact size per launch, filled with 0xFF
//                                             (NaN in every float type) like uninitialised
//                                             shared memory
//   nvcuda::wmma                              fragment, fill / load / store / mma_sync, element
//                                             access, __float_to_tf32 (round to nearest, ties
//                                             away: cvt.rna.tf32.f32, the 13 low bits left
//                                             as the GPU leaves them, see below)
//   __pipeline_memcpy_async, __pipeline_commit, __pipeline_wait_prior
//                                             cp.async (cuda_pipeline.h): a copy is queued
//                                             and made only when a wait covers its batch,
//                                             the latest moment CUDA allows; a kernel that
//                                             returns with copies not waited for aborts
//   __float_as_uint, __uint_as_float          bit casts
//   __half, __nv_bfloat16                     16-bit storage, conversions round to nearest even
//   __global__ __device__ __forceinline__ __launch_bounds__ min int4
//
// What the model is (and is not): a warp's lanes are independent threads here (no lock-step),
// so a race between lanes is reported that a GPU might hide; a wmma operation gives every
// lane the whole tile (loads and the product are per lane, the store is split over the 32
// lanes so each element is written once); the tensor-core product is exact products summed
// in float, in k order (the hardware's order and internal precision are not specified).
// Memory is the CPU's (x86: stronger than the GPU's); the barriers order memory as
// __syncthreads / grid.sync do (acquire / release), and ThreadSanitizer checks every access
// against them.
#pragma once

#include <pthread.h>

#include <atomic>
#include <thread>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <new>
#include <type_traits>
#include <vector>

#include <math.h>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)

struct uint3 {
  unsigned int x = 0, y = 0, z = 0;
};
struct dim3 {
  unsigned int x = 1, y = 1, z = 1;
};
struct alignas(16) int4 {
  int x, y, z, w;
};

inline thread_local uint3 threadIdx;
inline thread_local uint3 blockIdx;
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;

// CUDA's integer min (device function) as the kernels call it.
inline int min(int a, int b) { return a < b ? a : b; }

// CUDA's bit casts between float and unsigned int.
inline unsigned int __float_as_uint(float v) {
  unsigned int u;
  std::memcpy(&u, &v, 4);
  return u;
}
inline float __uint_as_float(unsigned int u) {
  float v;
  std::memcpy(&v, &u, 4);
  return v;
}

namespace fusedgru_host {

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "cuda_host: %s\n", what);
  std::fflush(stderr);
  std::abort();
}

// A barrier of `count` threads, as std::barrier (arrive_and_wait, arrive_and_drop).  The
// arrivals are counted under a mutex; the waiters sleep on an atomic phase (futex) and leave
// without taking the mutex again.  (std::barrier spins: under ThreadSanitizer a 3-block
// case took 23 s with it against ~4 s with a sleeping barrier; a condition variable makes
// every waiter queue for the mutex on wake-up.)  Each arrival takes the mutex after the previous ones and the last
// publishes the new phase with a release store that every waiter acquires, so everything
// before the barrier in any thread happens before everything after it in every thread: what
// __syncthreads() and grid.sync() promise.
class Barrier {
 public:
  explicit Barrier(unsigned count) : expected_(count) {}
  void arrive_and_wait() {
    uint32_t phase;
    {
      std::lock_guard<std::mutex> lock(mu_);
      phase = phase_.load(std::memory_order_relaxed);
      if (++arrived_ == expected_) {
        complete(phase);
        return;
      }
    }
    while (phase_.load(std::memory_order_acquire) == phase) wait_for_change(phase);
  }
  // arrive_and_wait in two halves (grid.barrier_arrive / barrier_wait): arrive returns the
  // phase it joined, wait(phase) returns once that phase has completed.
  uint32_t arrive() {
    std::lock_guard<std::mutex> lock(mu_);
    const uint32_t phase = phase_.load(std::memory_order_relaxed);
    if (++arrived_ == expected_) complete(phase);
    return phase;
  }
  void wait(uint32_t phase) {
    while (phase_.load(std::memory_order_acquire) == phase) wait_for_change(phase);
  }
  // Leaves the barrier for good (a thread whose kernel returned).
  void arrive_and_drop() {
    std::lock_guard<std::mutex> lock(mu_);
    --expected_;
    if (arrived_ > 0 && arrived_ == expected_) complete(phase_.load(std::memory_order_relaxed));
  }

 private:
  void complete(uint32_t phase) {  // under mu_
    arrived_ = 0;
    phase_.store(phase + 1, std::memory_order_release);
#if __cplusplus >= 202002L
    phase_.notify_all();
#endif
  }
  // C++20's atomic wait (the sanitizer builds); under C++17 a yield, so that the source
  // also compiles as C++17: tests/test_cuda_host.py checks that the kernels' source does,
  // as torch 2.11's extension build compiles it.
  void wait_for_change(uint32_t phase) {
#if __cplusplus >= 202002L
    phase_.wait(phase, std::memory_order_acquire);
#else
    (void)phase;
    std::this_thread::yield();
#endif
  }
  std::mutex mu_;
  unsigned expected_, arrived_ = 0;
  std::atomic<uint32_t> phase_{0};
};

// One kernel launch: its grid, its barriers and its blocks' shared memory.
struct Launch {
  unsigned grid = 0, block = 0;
  unsigned cluster = 0;  // blocks per thread block cluster, 0 = launched without clusters
  bool cooperative = false;
  int64_t smem_bytes = 0;
  std::vector<std::unique_ptr<Barrier>> block_bar;    // one per block
  std::unique_ptr<Barrier> grid_bar;                   // cooperative launches only
  std::vector<std::unique_ptr<Barrier>> cluster_bar;  // one per cluster
  std::vector<unsigned char*> smem;                    // one per block, exact size
  std::vector<unsigned> syncs, grid_syncs, cluster_syncs;  // per thread: barriers reached
};

// cp.async as cuda_pipeline.h exposes it: per thread, the copies issued since the last
// commit, and the committed batches not yet waited for (oldest first).
struct AsyncCopy {
  void* dst;
  const void* src;
  size_t size;
};
inline thread_local std::vector<AsyncCopy> t_async_open;
inline thread_local std::vector<std::vector<AsyncCopy>> t_async_batches;

inline thread_local Launch* t_launch = nullptr;
inline thread_local unsigned t_tid = 0;  // blockIdx.x * blockDim.x + threadIdx.x
inline thread_local bool t_grid_arrived = false;  // barrier_arrive not yet waited for
inline thread_local bool t_cluster_arrived = false;  // the cluster's, likewise

inline void syncthreads() {
  Launch* l = t_launch;
  ++l->syncs[t_tid];
  l->block_bar[blockIdx.x]->arrive_and_wait();
}

inline void grid_sync() {
  Launch* l = t_launch;
  if (!l->cooperative)
    fail("grid.sync() in a kernel not launched cooperatively (cudaLaunchCooperativeKernel)");
  if (t_grid_arrived) fail("grid.sync() between grid.barrier_arrive() and barrier_wait()");
  ++l->grid_syncs[t_tid];
  l->grid_bar->arrive_and_wait();
}

inline uint32_t grid_arrive() {
  Launch* l = t_launch;
  if (!l->cooperative)
    fail("grid.barrier_arrive() in a kernel not launched cooperatively");
  if (t_grid_arrived) fail("grid.barrier_arrive() twice without barrier_wait()");
  t_grid_arrived = true;
  ++l->grid_syncs[t_tid];
  return l->grid_bar->arrive();
}

inline void grid_wait(uint32_t token) {
  if (!t_grid_arrived) fail("grid.barrier_wait() without grid.barrier_arrive()");
  t_grid_arrived = false;
  t_launch->grid_bar->wait(token);
}

inline Launch* cluster_launch(const char* what) {
  Launch* l = t_launch;
  if (l->cluster == 0) {
    std::fprintf(stderr, "cuda_host: %s in a kernel launched without thread block clusters\n",
                 what);
    std::abort();
  }
  return l;
}

inline void cluster_sync() {
  Launch* l = cluster_launch("cluster.sync()");
  if (t_cluster_arrived) fail("cluster.sync() between cluster.barrier_arrive() and barrier_wait()");
  ++l->cluster_syncs[t_tid];
  l->cluster_bar[blockIdx.x / l->cluster]->arrive_and_wait();
}

inline uint32_t cluster_arrive() {
  Launch* l = cluster_launch("cluster.barrier_arrive()");
  if (t_cluster_arrived) fail("cluster.barrier_arrive() twice without barrier_wait()");
  t_cluster_arrived = true;
  ++l->cluster_syncs[t_tid];
  return l->cluster_bar[blockIdx.x / l->cluster]->arrive();
}

inline void cluster_wait(uint32_t token) {
  Launch* l = cluster_launch("cluster.barrier_wait()");
  if (!t_cluster_arrived) fail("cluster.barrier_wait() without cluster.barrier_arrive()");
  t_cluster_arrived = false;
  l->cluster_bar[blockIdx.x / l->cluster]->wait(token);
}

// cluster.map_shared_rank(p, rank): p must point into the calling block's dynamic shared
// memory (the only shared memory the kernels have); the same offset in block `rank` of the
// cluster.
inline void* map_shared_rank(const void* p, int rank) {
  Launch* l = cluster_launch("cluster.map_shared_rank()");
  if (rank < 0 || static_cast<unsigned>(rank) >= l->cluster)
    fail("cluster.map_shared_rank(): rank outside the cluster");
  const unsigned char* own = l->smem[blockIdx.x];
  const auto* q = static_cast<const unsigned char*>(p);
  if (q < own || q >= own + l->smem_bytes)
    fail("cluster.map_shared_rank(): the address is not in the block's dynamic shared memory");
  const unsigned first = blockIdx.x / l->cluster * l->cluster;
  return l->smem[first + static_cast<unsigned>(rank)] + (q - own);
}

// A fixed set of OS threads, one per CUDA thread of the largest launch, reused by every
// launch (creating 10^4 threads per call costs seconds under ThreadSanitizer).  A launch
// starts at one barrier and ends at another: everything a launch wrote happens before the
// next launch reads it, as kernels on one stream.
class ThreadPool {
 public:
  explicit ThreadPool(unsigned n) : n_(n), start_(n + 1), done_(n + 1) {
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, 1 << 20);
    threads_.resize(n);
    for (unsigned i = 0; i < n; ++i) {
      args_.push_back(std::make_unique<Arg>(Arg{this, i}));
      if (pthread_create(&threads_[i], &attr, &ThreadPool::main, args_.back().get()) != 0)
        fail("pthread_create failed (thread limit?)");
    }
    pthread_attr_destroy(&attr);
  }
  ~ThreadPool() {
    stop_ = true;
    start_.arrive_and_wait();
    for (pthread_t t : threads_) pthread_join(t, nullptr);
  }
  unsigned size() const { return n_; }

  // Runs body(i) on threads 0 .. count-1 and waits for all of them.
  void run(unsigned count, std::function<void(unsigned)> body) {
    if (count > n_) fail("launch larger than the thread pool");
    count_ = count;
    body_ = std::move(body);
    start_.arrive_and_wait();
    done_.arrive_and_wait();
  }

 private:
  struct Arg {
    ThreadPool* pool;
    unsigned index;
  };
  static void* main(void* p) {
    Arg* a = static_cast<Arg*>(p);
    ThreadPool* pool = a->pool;
    for (;;) {
      pool->start_.arrive_and_wait();
      if (pool->stop_) return nullptr;
      if (a->index < pool->count_) pool->body_(a->index);
      pool->done_.arrive_and_wait();
    }
  }
  unsigned n_;
  Barrier start_, done_;
  std::vector<pthread_t> threads_;
  std::vector<std::unique_ptr<Arg>> args_;
  unsigned count_ = 0;
  bool stop_ = false;
  std::function<void(unsigned)> body_;
};

// kernel<<<grid, block, smem_bytes>>>(...) (cooperative: cudaLaunchCooperativeKernel) with
// `kernel()` a callable that calls the kernel with its arguments.  Checks afterwards that
// every thread of a block reached the same number of __syncthreads() and every thread of
// the grid the same number of grid.sync() (a divergent barrier hangs or corrupts a GPU;
// here a thread leaving early drops out of the barriers instead of hanging the run).
// cluster > 0: launched in thread block clusters of `cluster` blocks (cudaLaunchKernelEx with
// cudaLaunchAttributeClusterDimension); grid must be a multiple of it, at most 16 (the
// non-portable limit; 8 portable), and not cooperative (the kernels' cluster launches are
// not).  Every thread of a cluster must reach the same number of cluster barriers.
template <typename K>
void launch(ThreadPool& pool, unsigned grid, unsigned block, int64_t smem_bytes,
            bool cooperative, K kernel, unsigned cluster = 0) {
  if (grid == 0 || block == 0 || block > 1024) fail("invalid launch configuration");
  if (smem_bytes < 0) fail("negative dynamic shared memory size");
  if (cluster > 0 && (cluster > 16 || grid % cluster != 0 || cooperative))
    fail("invalid cluster launch (grid a multiple of the cluster size <= 16, not cooperative)");
  Launch l;
  l.grid = grid;
  l.block = block;
  l.cluster = cluster;
  l.cooperative = cooperative;
  l.smem_bytes = smem_bytes;
  const unsigned n = grid * block;
  l.syncs.assign(n, 0);
  l.grid_syncs.assign(n, 0);
  l.cluster_syncs.assign(n, 0);
  for (unsigned c = 0; cluster > 0 && c < grid / cluster; ++c)
    l.cluster_bar.push_back(std::make_unique<Barrier>(cluster * block));
  for (unsigned b = 0; b < grid; ++b) {
    l.block_bar.push_back(std::make_unique<Barrier>(block));
    // Exact size (AddressSanitizer catches the first byte past it), 128-byte aligned as the
    // kernels declare it; poisoned like uninitialised shared memory.
    auto* p = static_cast<unsigned char*>(
        ::operator new(static_cast<size_t>(smem_bytes > 0 ? smem_bytes : 1),
                       std::align_val_t(128)));
    std::memset(p, 0xFF, static_cast<size_t>(smem_bytes));
    l.smem.push_back(p);
  }
  if (cooperative) l.grid_bar = std::make_unique<Barrier>(n);
  pool.run(n, [&](unsigned i) {
    t_launch = &l;
    t_tid = i;
    blockIdx = uint3{i / block, 0, 0};
    threadIdx = uint3{i % block, 0, 0};
    blockDim = dim3{block, 1, 1};
    gridDim = dim3{grid, 1, 1};
    kernel();
    if (!t_async_open.empty() || !t_async_batches.empty())
      fail("a kernel returned with cp.async copies (__pipeline_memcpy_async) never waited for");
    if (t_grid_arrived) fail("a kernel returned between grid.barrier_arrive() and barrier_wait()");
    if (t_cluster_arrived)
      fail("a kernel returned between cluster.barrier_arrive() and barrier_wait()");
    l.block_bar[blockIdx.x]->arrive_and_drop();
    if (cooperative) l.grid_bar->arrive_and_drop();
    if (cluster > 0) l.cluster_bar[blockIdx.x / cluster]->arrive_and_drop();
    t_launch = nullptr;
  });
  for (unsigned i = 0; i < n; ++i) {
    const unsigned first = (i / block) * block;
    if (l.syncs[i] != l.syncs[first]) {
      std::fprintf(stderr, "cuda_host: divergent __syncthreads(): block %u thread %u reached %u, "
                   "thread 0 reached %u\n", i / block, i % block, l.syncs[i], l.syncs[first]);
      std::abort();
    }
    const unsigned cfirst = cluster > 0 ? (i / block) / cluster * cluster * block : 0;
    if (l.cluster_syncs[i] != l.cluster_syncs[cfirst]) {
      std::fprintf(stderr, "cuda_host: divergent cluster barrier: thread %u reached %u, thread "
                   "%u reached %u\n", i, l.cluster_syncs[i], cfirst, l.cluster_syncs[cfirst]);
      std::abort();
    }
    if (l.grid_syncs[i] != l.grid_syncs[0]) {
      std::fprintf(stderr, "cuda_host: divergent grid.sync(): thread %u reached %u, thread 0 "
                   "reached %u\n", i, l.grid_syncs[i], l.grid_syncs[0]);
      std::abort();
    }
  }
  for (unsigned char* p : l.smem) ::operator delete(p, std::align_val_t(128));
}

}  // namespace fusedgru_host

inline void __syncthreads() { fusedgru_host::syncthreads(); }

// cp.async (cuda_pipeline_primitives.h): size 4, 8 or 16, both pointers aligned to it.
inline void __pipeline_memcpy_async(void* __restrict__ dst_shared,
                                    const void* __restrict__ src_global, size_t size_and_align,
                                    size_t zfill = 0) {
  if ((size_and_align != 4 && size_and_align != 8 && size_and_align != 16) || zfill != 0 ||
      reinterpret_cast<uintptr_t>(dst_shared) % size_and_align != 0 ||
      reinterpret_cast<uintptr_t>(src_global) % size_and_align != 0)
    fusedgru_host::fail("__pipeline_memcpy_async: size must be 4, 8 or 16 bytes, both "
                        "pointers aligned to it");
  fusedgru_host::t_async_open.push_back({dst_shared, src_global, size_and_align});
}
inline void __pipeline_commit() {
  fusedgru_host::t_async_batches.push_back(std::move(fusedgru_host::t_async_open));
  fusedgru_host::t_async_open.clear();
}
// Completes (makes) the oldest committed batches until at most `prior` are pending.
inline void __pipeline_wait_prior(size_t prior) {
  auto& q = fusedgru_host::t_async_batches;
  while (q.size() > prior) {
    for (const auto& c : q.front()) std::memcpy(c.dst, c.src, c.size);
    q.erase(q.begin());
  }
}

// The kernels' `extern __shared__ unsigned char smem[]` (see gru_kernels.cuh).
#define FUSEDGRU_DYNAMIC_SMEM(name) \
  unsigned char* const name = fusedgru_host::t_launch->smem[blockIdx.x]

namespace cooperative_groups {
struct grid_group {
  using arrival_token = unsigned int;
  void sync() const { fusedgru_host::grid_sync(); }
  arrival_token barrier_arrive() const { return fusedgru_host::grid_arrive(); }
  void barrier_wait(arrival_token&& token) const { fusedgru_host::grid_wait(token); }
};
inline grid_group this_grid() { return grid_group{}; }
struct cluster_group {
  using arrival_token = unsigned int;
  void sync() const { fusedgru_host::cluster_sync(); }
  arrival_token barrier_arrive() const { return fusedgru_host::cluster_arrive(); }
  void barrier_wait(arrival_token&& token) const { fusedgru_host::cluster_wait(token); }
  unsigned block_rank() const {
    return blockIdx.x % fusedgru_host::cluster_launch("cluster.block_rank()")->cluster;
  }
  unsigned num_blocks() const {
    return fusedgru_host::cluster_launch("cluster.num_blocks()")->cluster;
  }
  template <typename T>
  T* map_shared_rank(T* p, int rank) const {
    return static_cast<T*>(fusedgru_host::map_shared_rank(p, rank));
  }
};
inline cluster_group this_cluster() { return cluster_group{}; }
}  // namespace cooperative_groups

// ---------------------------------------------------------------------------------------
// 16-bit floating point: storage + the conversions the kernels call (round to nearest even)
// ---------------------------------------------------------------------------------------

struct __half {
  uint16_t bits;
};
struct __nv_bfloat16 {
  uint16_t bits;
};

// Written out rather than through _Float16 (GCC >= 12 / Clang >= 15 on x86 only);
// tests/test_cuda_host.py checks both conversions against torch's.
inline float __half2float(__half h) {
  const uint32_t sign = static_cast<uint32_t>(h.bits & 0x8000u) << 16;
  const uint32_t e = (h.bits >> 10) & 0x1Fu, m = h.bits & 0x3FFu;
  float f;
  if (e == 0) {  // zero or subnormal: m * 2^-24
    f = std::ldexp(static_cast<float>(m), -24);
    return sign ? -f : f;
  }
  const uint32_t u = e == 31 ? (sign | 0x7F800000u | (m << 13))             // inf, NaN
                             : (sign | ((e - 15 + 127) << 23) | (m << 13));  // normal
  std::memcpy(&f, &u, 4);
  return f;
}
inline __half __float2half_rn(float v) {
  uint32_t x;
  std::memcpy(&x, &v, 4);
  const uint32_t sign = (x >> 16) & 0x8000u, ax = x & 0x7FFFFFFFu;
  __half h;
  if (ax > 0x7F800000u) {  // NaN stays a NaN
    h.bits = static_cast<uint16_t>(sign | 0x7E00u);
  } else if (ax >= 0x47800000u) {  // |v| >= 2^16 (or inf): inf
    h.bits = static_cast<uint16_t>(sign | 0x7C00u);
  } else if (ax < 0x38800000u) {  // below 2^-14: a multiple of 2^-24, rounded to even
    float a;
    std::memcpy(&a, &ax, 4);
    h.bits = static_cast<uint16_t>(sign | static_cast<uint32_t>(std::nearbyint(a * 16777216.f)));
  } else {  // normal: drop 13 mantissa bits, round to nearest even (a carry may reach inf)
    uint32_t b = ((((ax >> 23) - 127 + 15) << 10) | ((ax & 0x7FFFFFu) >> 13));
    const uint32_t rem = ax & 0x1FFFu;
    if (rem > 0x1000u || (rem == 0x1000u && (b & 1u))) ++b;
    h.bits = static_cast<uint16_t>(sign | b);
  }
  return h;
}
inline float __bfloat162float(__nv_bfloat16 h) {
  const uint32_t u = static_cast<uint32_t>(h.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  __nv_bfloat16 h;
  if (std::isnan(v)) {
    h.bits = static_cast<uint16_t>((u >> 16) | 0x40);  // stays a NaN
  } else {
    u += 0x7FFFu + ((u >> 16) & 1u);  // round to nearest, ties to even
    h.bits = static_cast<uint16_t>(u >> 16);
  }
  return h;
}

// ---------------------------------------------------------------------------------------
// wmma: each lane holds the whole tile (see the top of this file)
// ---------------------------------------------------------------------------------------

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
namespace precision {
struct tf32 {};
}  // namespace precision
enum layout_t { mem_row_major, mem_col_major };

namespace detail {
template <typename T>
struct storage { using type = T; };
template <>
struct storage<precision::tf32> { using type = float; };

template <typename Use, int M, int N, int K>
struct shape;
template <int M, int N, int K>
struct shape<matrix_a, M, N, K> { static constexpr int rows = M, cols = K; };
template <int M, int N, int K>
struct shape<matrix_b, M, N, K> { static constexpr int rows = K, cols = N; };
template <int M, int N, int K>
struct shape<accumulator, M, N, K> { static constexpr int rows = M, cols = N; };

inline float to_float(float v) { return v; }
inline float to_float(__half v) { return __half2float(v); }
inline float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

// The tensor core reads a tf32 operand's 19 upper bits (a float not rounded by
// __float_to_tf32 is truncated).
template <typename T>
inline float operand(float v) {
  if constexpr (std::is_same_v<T, precision::tf32>) {
    uint32_t u;
    std::memcpy(&u, &v, 4);
    u &= 0xFFFFE000u;
    std::memcpy(&v, &u, 4);
  }
  return v;
}
template <typename T>
inline float operand(__half v) { return __half2float(v); }
template <typename T>
inline float operand(__nv_bfloat16 v) { return __bfloat162float(v); }

// wmma's preconditions: a 256-bit aligned pointer, ldm a multiple of 16 bytes.
template <typename E>
inline void check_ptr(const E* p, unsigned ldm, const char* op) {
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0 || (ldm * sizeof(E)) % 16 != 0) {
    std::fprintf(stderr, "cuda_host: wmma::%s with pointer %p (needs 32-byte alignment), "
                 "ldm %u (needs a multiple of 16 bytes)\n", op, static_cast<const void*>(p), ldm);
    std::abort();
  }
}
}  // namespace detail

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  using element_type = typename detail::storage<T>::type;
  static constexpr int rows = detail::shape<Use, M, N, K>::rows;
  static constexpr int cols = detail::shape<Use, M, N, K>::cols;
  static constexpr int num_elements = rows * cols;
  element_type x[num_elements];  // row-major (rows x cols), whatever the memory layout
};

template <typename Use, int M, int N, int K, typename T, typename L, typename V>
inline void fill_fragment(fragment<Use, M, N, K, T, L>& f, V v) {
  using E = typename fragment<Use, M, N, K, T, L>::element_type;
  for (int i = 0; i < f.num_elements; ++i) f.x[i] = static_cast<E>(v);
}

template <typename Use, int M, int N, int K, typename T, typename L, typename E>
inline void load_matrix_sync(fragment<Use, M, N, K, T, L>& f, const E* p, unsigned ldm) {
  static_assert(std::is_same_v<L, row_major> || std::is_same_v<L, col_major>);
  static_assert(std::is_same_v<E, typename fragment<Use, M, N, K, T, L>::element_type>);
  detail::check_ptr(p, ldm, "load_matrix_sync");
  using F = fragment<Use, M, N, K, T, L>;
  for (int r = 0; r < F::rows; ++r)
    for (int c = 0; c < F::cols; ++c)
      f.x[r * F::cols + c] =
          std::is_same_v<L, row_major> ? p[static_cast<int64_t>(r) * ldm + c]
                                       : p[static_cast<int64_t>(c) * ldm + r];
}

template <int M, int N, int K, typename E>
inline void store_matrix_sync(E* p, const fragment<accumulator, M, N, K, E>& f, unsigned ldm,
                              layout_t layout) {
  detail::check_ptr(p, ldm, "store_matrix_sync");
  // A warp-wide store: lane l writes elements l, l + 32, ... (each element once).
  for (int i = static_cast<int>(threadIdx.x & 31); i < f.num_elements; i += 32) {
    const int r = i / N, c = i % N;
    p[layout == mem_row_major ? static_cast<int64_t>(r) * ldm + c
                              : static_cast<int64_t>(c) * ldm + r] = f.x[i];
  }
}

template <int M, int N, int K, typename T, typename LA, typename LB>
inline void mma_sync(fragment<accumulator, M, N, K, float>& d,
                     const fragment<matrix_a, M, N, K, T, LA>& a,
                     const fragment<matrix_b, M, N, K, T, LB>& b,
                     const fragment<accumulator, M, N, K, float>& c) {
  float out[M * N];
  for (int m = 0; m < M; ++m)
    for (int n = 0; n < N; ++n) {
      float s = c.x[m * N + n];
      for (int k = 0; k < K; ++k)
        s += detail::operand<T>(a.x[m * K + k]) * detail::operand<T>(b.x[k * N + n]);
      out[m * N + n] = s;
    }
  std::memcpy(d.x, out, sizeof(out));
}

// cvt.rna.tf32.f32 as sm_90 executes it (cuobjdump -sass of gru_cuda.o: an inf / NaN
// test and an integer add of 0x1000, no mask): round to 10 mantissa bits, ties away from
// zero, in the 19 upper bits; the 13 low bits are NOT cleared (what is left of v's plus
// the carry).  A tf32 operand's value is its 19 upper bits (detail::operand, what mma_sync
// reads), so code that uses the result as a float (3xTF32's v - hi) must clear them itself.
inline float __float_to_tf32(float v) {
  if (!std::isfinite(v)) return v;
  uint32_t u;
  std::memcpy(&u, &v, 4);
  u += 0x1000u;
  std::memcpy(&v, &u, 4);
  return v;
}

}  // namespace wmma
}  // namespace nvcuda
