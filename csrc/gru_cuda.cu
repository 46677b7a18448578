// fusedgru::gru_fwd / gru_infer / gru_bwd on CUDA: the "cuda" backend.
//
// STATUS: compiled for sm_80 / sm_90 and checked with ptxas (no spills, no stack), but
// NEVER RUN ON A GPU at the time of writing (the 3xTF32 path and the staged step variant of
// issue 18 included).  tests/test_extension_gpu.py is its first check.
//
// Dimension legend: T timesteps, B batch, I input features, H hidden units, G = 3 gates
// (r, z, n).  Padded sizes: Hp = H rounded up to 16 (units and K), Bp = B rounded up to 16.
// Semantics: fusedgru/reference.py, line for line (SPEC sections 1 and 4).
//
// Forward.  gi = x W_ih^T + b_ih is one ATen (cuBLAS) GEMM before the loop.  Then ONE
// cooperative launch of NB = Hp / 16 blocks runs all T steps: block nb owns hidden units
// [16 nb, 16 nb + 16) and keeps their rows of W_hh for all three gates (48 x Hp) in shared
// memory for the whole sequence.  Per step each block computes its (B x 48) slice of
// h_{t-1} W_hh^T on tensor cores (wmma, fp32 accumulation: bf16/fp16 operands; float32 as
// TF32 when torch lets cuDNN's RNN use TF32, as nn.GRU does, else split-precision 3xTF32;
// plain FMA for float64: see FUSEDGRU_DISPATCH), applies the gates and the update to its
// units, publishes h_t in the operand dtype to a ping-pong buffer (Bp x Hp, zero padded, so
// MMA tiles never need bounds checks), and meets the other blocks at a grid barrier
// (cooperative groups).
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
// Sequence structure (batch_sizes, resets: gru_common.h Layout; in the kernels,
// gru_kernels.cuh "Sequence structure").  Packed: the same kernels with B = batch_sizes[0]
// and a device table of (first row, rows) per step: a step loads, computes and stores its
// active rows only (batch tiles past them are skipped, no padded work); rows past a
// sequence's end keep their last state in the per-row buffers, unread.  Resets: a (T, B)
// bool pointer: the forward stages zeros as the state entering a restarted row (h0 masked
// here for step 0, the kernels at the end of step t-1 for step t, y keeps the true h); the
// backward reads h_{t-1} as zeros there and drops the dh that step carries back.  Dense
// calls pass nullptr for both and take the code path they took before.
//
// Every launch is on the current stream under a CUDAGuard; offsets into (T, B, ...) tensors
// are 64-bit; nothing synchronises with the host.
//
// Files: the device code (and the plan's layout) is gru_kernels.cuh, which the host C++
// compiler also builds, running these kernels on CPU threads under ThreadSanitizer and
// AddressSanitizer (csrc/host/, tests/test_cuda_host.py); this file is the GPU's host side:
// capacity plan, weight packing, launches, dispatcher registration.
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <atomic>
#include <map>
#include <mutex>
#include <utility>
#include <sstream>
#include <type_traits>

#include "gru_common.h"
#include "gru_kernels.cuh"  // the device code (also built for the CPU: csrc/host/)

namespace fusedgru {
namespace cuda_gru {

using at::Tensor;

// ---------------------------------------------------------------------------------------
// Host: planning (the on-chip capacity limit), packing, launches
// ---------------------------------------------------------------------------------------

struct DeviceInfo {
  int sms = 0, smem_optin = 0, coop = 0, major = 0;
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
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&d.major, cudaDevAttrComputeCapabilityMajor, dev));
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

// Test / benchmark switch (fusedgru::_set_cuda_step_variant): how a step runs, two bits
// (benchmarks/NOTES-cuda-latency.md), 0 = the step before issue 18 part 2, the default until
// a GPU run has timed them:
//   bit 1: the MMA's A operand (h_{t-1}; dgh_{t+1} in the backward) staged in shared memory
//          once per pass (stage_a), where it fits; else read from global memory in the k loop;
//   bit 2: the persistent forward and backward at B <= kSplitRows take the split-barrier
//          step (fwd_split_loop / bwd_split_loop: the carried state in registers, what the
//          next step reads besides the MMA operand loaded between the arrival at the grid
//          barrier and the wait); else the old loop;
//   bit 4: the K split of each block's GEMM balanced over its warps (plan_balance: the
//          busiest warp's chain of k-steps as short as it gets), where the accumulators
//          still fit; a different summation order, so not the old step's bits;
//   bit 8: the batch tiles split over groups of blocks (plan_groups: as many groups as the
//          SMs left idle allow, each group the Hp / 16 unit blocks again), where every
//          block stays co-resident; the K split re-planned for a group's tiles (other
//          partial sums where it changes).
//   bit 16: the forward as ONE thread block cluster (sm_90+: plan_cluster, fwd_cluster_loop;
//          h_t exchanged through distributed shared memory, a cluster barrier per step
//          instead of a grid barrier), where it fits in 16 blocks (8 where the device
//          refuses non-portable cluster sizes) and the device can schedule the cluster;
//          else the other bits as usual.  Bits 1, 2 and 8 do not apply to it; bit 4 does.
//          The backward is not a cluster launch.
std::atomic<int64_t> g_step_variant{0};

int64_t set_cuda_step_variant(int64_t mode) {
  TORCH_CHECK(mode >= 0 && mode <= 31,
              "fusedgru::_set_cuda_step_variant: mode must be 0 (the old step) or a sum of 1 (A "
              "staged in shared memory), 2 (the split-barrier step), 4 (the balanced K "
              "split), 8 (batch groups of blocks) and 16 (the cluster forward), got ", mode);
  return g_step_variant.exchange(mode);
}

// The cluster forward's launch configuration: ONE cluster of pl.NB blocks.
struct ClusterLaunch {
  cudaLaunchConfig_t cfg{};
  cudaLaunchAttribute attr[1];
  ClusterLaunch(const Plan& pl, cudaStream_t stream) {
    cfg.gridDim = dim3(pl.NB);
    cfg.blockDim = dim3(kThreads);
    cfg.dynamicSmemBytes = static_cast<size_t>(pl.smem_bytes(true));
    cfg.stream = stream;
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = static_cast<unsigned>(pl.NB);
    attr[0].val.clusterDim.y = 1;
    attr[0].val.clusterDim.z = 1;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
  }
};

// The largest cluster the kernel may be launched in: 16 where the device accepts
// non-portable cluster sizes for it (H100 / H200 do), else the portable 8.
int cluster_limit(const void* kern) {
  static std::mutex mu;
  static std::map<const void*, int> known;
  std::lock_guard<std::mutex> lock(mu);
  auto it = known.find(kern);
  if (it != known.end()) return it->second;
  int lim = 8;
  if (cudaFuncSetAttribute(kern, cudaFuncAttributeNonPortableClusterSizeAllowed, 1) ==
      cudaSuccess)
    lim = kMaxCluster;
  else
    (void)cudaGetLastError();  // not sticky: clear it
  known[kern] = lim;
  return lim;
}

// Step variant bit 16: the cluster plan for the forward on sm_90+, or why not (in `why`).
// Checked with the occupancy API that the device can schedule one such cluster (its blocks'
// shared memory on distinct SMs of one GPC); a refused query is a plan not taken.
bool cluster_plan(Plan& pl, int64_t T, int64_t B, int64_t H, int64_t op_size, int64_t acc_size,
                  bool reset_after, bool fma, bool balance, const void* kern, int dev,
                  const DeviceInfo& d, std::ostringstream& why) {
  if (d.major < 9) {
    why << "; step variant 16 -> grid kernels: thread block clusters need sm_90";
    return false;
  }
  Plan c = plan_layout(T, B, H, op_size, acc_size, false);
  const int lim = cluster_limit(kern);
  if (!plan_cluster(c, lim, reset_after, fma, op_size, acc_size, d.smem_optin, balance)) {
    why << "; step variant 16 -> grid kernels: does not fit one cluster of " << lim
        << " blocks (B x 16 q <= " << kClusterPer * kThreads << ", shared memory <= "
        << d.smem_optin << " B)";
    return false;
  }
  allow_dynamic_smem(kern, dev, c.smem_bytes(true));
  ClusterLaunch cl(c, nullptr);
  int clusters = 0;
  if (cudaOccupancyMaxActiveClusters(&clusters, kern, &cl.cfg) != cudaSuccess) {
    (void)cudaGetLastError();
    clusters = 0;
  }
  if (clusters < 1) {
    why << "; step variant 16 -> grid kernels: the device cannot schedule a cluster of "
        << c.NB << " blocks with " << c.smem_bytes(true) << " B shared memory each";
    return false;
  }
  c.persistent = true;
  pl = c;
  why << "cluster: 1 cluster of " << c.NB << " blocks x " << kThreads << " threads, " << c.g.q
      << " unit blocks (" << 16 * c.g.q << " units) each, " << c.smem_bytes(true)
      << " B shared memory (W slices " << c.w_bytes << ", h buffers " << c.h_bytes
      << "), K split " << c.g.nsplit << " (step variant 16)";
  return true;
}

// Blocks of the persistent kernel `kern` that fit on one SM with `bytes` of dynamic shared
// memory; 0 when `bytes` is over the device's opt-in limit.
int resident_blocks(const void* kern, int dev, const DeviceInfo& d, int64_t bytes) {
  if (bytes > d.smem_optin) return 0;
  allow_dynamic_smem(kern, dev, bytes);
  int occ = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&occ, kern, kThreads,
                                                               static_cast<size_t>(bytes)));
  return occ;
}

// kern: the persistent kernel the plan would launch (for its occupancy).  The layout is
// plan_layout's (gru_kernels.cuh, shared with the host build); this adds the device's limits.
// fma: the products run on CUDA cores (MM == kFma: the staging buffer's padding differs).
// reset_after: the cluster forward's plan (bit 16) holds an r (.) h buffer when false.
Plan make_plan(int64_t T, int64_t B, int64_t H, int64_t op_size, int64_t acc_size,
               bool backward, const void* kern, int dev, bool fma, bool reset_after) {
  Plan pl = plan_layout(T, B, H, op_size, acc_size, backward);
  const DeviceInfo d = device_info(dev);
  const int mode = cuda_path_mode();
  std::ostringstream why;
  const int64_t variant = g_step_variant.load(std::memory_order_relaxed);
  // Bit 16 first: where the cluster forward is taken it is the whole plan.
  std::ostringstream cluster_why;
  if ((variant & 16) && !backward && mode != 2 &&
      cluster_plan(pl, T, B, H, op_size, acc_size, reset_after, fma, (variant & 4) != 0, kern,
                   dev, d, cluster_why)) {
    pl.why = cluster_why.str();
    return pl;
  }
  // Bit 8: batch groups first (the K split, balanced or not, is planned for a group's
  // tiles); kept only if every block of the grouped launch is still co-resident (checked
  // below; else the plan without groups).
  int groups = 1;
  if (variant & 8) {
    Plan grouped = pl;
    if (plan_groups(grouped, d.sms / std::max(1, pl.g.nbu), acc_size)) {
      const int occg = resident_blocks(kern, dev, d, grouped.smem_bytes(true));
      if (static_cast<int64_t>(grouped.NB) <= static_cast<int64_t>(occg) * d.sms) {
        groups = grouped.NB / grouped.g.nbu;
        pl = grouped;
      }
    }
  }
  const int old_split = pl.g.nsplit;
  const bool balanced = (variant & 4) && plan_balance(pl, acc_size, d.smem_optin);
  TORCH_CHECK(pl.acc_bytes <= d.smem_optin, "fusedgru: accumulator tiles (", pl.acc_bytes,
              " bytes) exceed shared memory");
  const int64_t resident = pl.smem_bytes(true);
  const int occ = resident_blocks(kern, dev, d, resident);
  if (mode == 2) {
    why << "per-step kernels forced (fusedgru::_set_cuda_path(2))";
  } else if (!d.coop) {
    why << "per-step kernels: the device has no cooperative launch";
  } else if (resident > d.smem_optin) {
    why << "per-step kernels: W slice " << pl.w_bytes << " B + accumulators " << pl.acc_bytes
        << " B > " << d.smem_optin << " B of shared memory per block";
  } else if (static_cast<int64_t>(pl.NB) > static_cast<int64_t>(occ) * d.sms) {
    why << "per-step kernels: " << pl.NB << " blocks > " << occ << " x " << d.sms
        << " co-resident";
  } else {
    pl.persistent = true;
    why << "persistent: " << pl.NB << " blocks x " << kThreads << " threads, "
        << resident << " B shared memory (W slice " << pl.w_bytes << ")";
  }
  TORCH_CHECK(pl.persistent || mode != 1, "fusedgru: persistent kernel requested but ",
              why.str());
  if (variant & 8) {
    if (groups > 1)
      why << "; step variant 8: " << groups << " batch groups of " << pl.g.nbu << " blocks ("
          << pl.g.mtg << " tiles each)";
    else
      why << "; step variant 8: one group (" << pl.g.MT << " batch tiles, " << pl.g.nbu
          << " blocks of " << d.sms << " SMs)";
  }
  if (variant & 4) {
    if (balanced)
      why << "; step variant 4: K split " << old_split << " -> " << pl.g.nsplit;
    else
      why << "; step variant 4: K split " << pl.g.nsplit << " kept";
  }
  if (variant & 1) {
    // Staged A where it fits next to what the chosen kernel already holds (and, persistent,
    // still leaves every block co-resident); else the old step.  Never fails.
    Plan staged = pl;
    bool ok = plan_staging(staged, pl.persistent, fma, op_size, d.smem_optin);
    if (ok && pl.persistent) {
      const int occ2 = resident_blocks(kern, dev, d, staged.smem_bytes(true));
      ok = static_cast<int64_t>(pl.NB) <= static_cast<int64_t>(occ2) * d.sms;
    }
    if (ok) {
      pl = staged;
      why << "; step variant 1: A staged in shared memory (" << pl.a_bytes << " B, "
          << pl.smem_bytes(pl.persistent) << " B in all)";
    } else {
      int lds = 0;
      why << "; step variant 1 -> old step: staging A (" << staging_bytes(pl, fma, op_size, &lds)
          << " B) does not fit next to " << pl.smem_bytes(pl.persistent) << " B (limit "
          << d.smem_optin << " B)";
    }
  }
  if (variant & 2) {
    if (plan_split(pl, pl.persistent))
      why << "; step variant 2: the split-barrier step";
    else
      why << "; step variant 2 -> old loop: the split-barrier step runs the persistent "
             "kernels at B <= " << kSplitRows << " only";
  }
  if ((variant & 16) && !backward) {
    if (mode == 2)
      why << "; step variant 16 -> per-step kernels forced";
    else
      why << cluster_why.str();
  } else if (variant & 16) {
    why << "; step variant 16: the backward is not a cluster launch";
  }
  pl.why = why.str();
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

// Whether a float32 GRU may run its products on TF32 tensor cores: what cuDNN's RNN reads,
// so what torch.nn.GRU on CUDA follows (fusedgru.ops.rnn_tf32_allowed in Python):
// torch.backends.cudnn.rnn.fp32_precision, "tf32" by default, "none" inheriting cudnn's and
// then the global setting (torch.backends.cudnn.allow_tf32 in older releases sets it).
// With an op, allowTF32CuDNN reads the fp32_precision settings only and never raises the
// "mix of the legacy and new APIs" error (the op-less call does).  In torch 2.11 .. 2.14.
inline bool tf32_rnn_allowed() {
  return at::globalContext().allowTF32CuDNN(at::Float32Op::RNN);
}

// Test / benchmark switch (fusedgru::_set_cuda_fp32_path): how strict float32 (TF32 not
// allowed) runs: 0 split-precision 3xTF32 on tensor cores (the default), 1 FMA on CUDA
// cores (the path before issue 18, kept so one GPU run can time both).
std::atomic<int64_t> g_fp32_path{0};

int64_t set_cuda_fp32_path(int64_t mode) {
  TORCH_CHECK(mode == 0 || mode == 1,
              "fusedgru::_set_cuda_fp32_path: mode must be 0 (3xTF32) or 1 (FMA), got ", mode);
  return g_fp32_path.exchange(mode);
}

// Calls FN<scalar_t (ATen), op_t (ATen), acc_t, MM>(args...) for dtype ST (MM: kFma, kTc,
// k3xTf32, gru_kernels.cuh).  float32: TF32 tensor cores when tf32_rnn_allowed() (True by
// default, like nn.GRU), else 3xTF32 (or the FMA path under _set_cuda_fp32_path(1)).
#define FUSEDGRU_DISPATCH(ST, FN, ...)                                                   \
  switch (ST) {                                                                          \
    case at::kFloat:                                                                     \
      if (tf32_rnn_allowed())                                                            \
        FN<float, float, float, kTc>(__VA_ARGS__);                                       \
      else if (g_fp32_path.load(std::memory_order_relaxed) == 1)                         \
        FN<float, float, float, kFma>(__VA_ARGS__);                                      \
      else                                                                               \
        FN<float, float, float, k3xTf32>(__VA_ARGS__);                                   \
      break;                                                                             \
    case at::kDouble: FN<double, double, double, kFma>(__VA_ARGS__); break;              \
    case at::kHalf: FN<at::Half, at::Half, float, kTc>(__VA_ARGS__); break;              \
    case at::kBFloat16: FN<at::BFloat16, at::BFloat16, float, kTc>(__VA_ARGS__); break;  \
    default: TORCH_CHECK(false, "fusedgru (cuda): unsupported dtype ", ST);              \
  }

void check_cuda(const char* op, const Tensor& x) {
  TORCH_CHECK(x.is_cuda(), op, ": expected CUDA tensors, got ", x.device());
  const auto st = x.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16,
              op, ": supports float32, float64, float16 and bfloat16, got ", st);
}

// The kernels' view of the sequence structure (gru_kernels.cuh, "Sequence structure"):
// the (T, 2) int64 table of (first row, rows) per step of a packed batch on the device,
// copied once per call from pinned memory without a host sync (undefined when dense: the
// kernels get nullptr and take the dense path), and resets' (T, B) bool data (or nullptr).
struct SeqArgs {
  Tensor steps;
  const int64_t* steps_ptr = nullptr;
  const bool* resets_ptr = nullptr;
};

SeqArgs seq_args(const Layout& lay, const Tensor& x) {
  SeqArgs s;
  if (lay.packed && lay.T > 0) {
    Tensor host = at::empty({lay.T, 2}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
    int64_t* h = host.data_ptr<int64_t>();
    for (int64_t t = 0; t < lay.T; ++t) {
      h[2 * t] = lay.offsets[t];
      h[2 * t + 1] = lay.sizes[t];
    }
    s.steps = host.to(x.device(), /*non_blocking=*/true);
    s.steps_ptr = s.steps.data_ptr<int64_t>();
  }
  if (lay.has_resets()) s.resets_ptr = lay.resets.data_ptr<bool>();
  return s;
}

template <typename scalar_t, typename op_at, typename acc_t, int MM>
void launch_forward(const Dims& d, const Tensor& x, const std::optional<Tensor>& h0_,
                    const Tensor& w_hh, const Tensor& gi, const Tensor& bhh, bool reset_after,
                    const Layout& lay, Tensor& y,
                    Tensor& ws /* like y with 4H, or undefined: not kept */) {
  const int dev = x.get_device();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(dev).stream();
  using sc = typename Native<scalar_t>::type;
  using opt = typename Native<op_at>::type;
  const at::ScalarType op_type = c10::CppTypeToScalarType<op_at>::value;
  const at::ScalarType acc_type = c10::CppTypeToScalarType<acc_t>::value;
  auto persistent = gru_fwd_persistent<sc, opt, acc_t, MM>;
  Plan pl = make_plan(d.T, d.B, d.H, sizeof(opt), sizeof(acc_t), false,
                      reinterpret_cast<const void*>(persistent), dev, MM == kFma, reset_after);
  const Geom& g = pl.g;
  const Tensor wpack = pack_forward(w_hh, g, op_type);
  Tensor hstate = at::zeros({d.B, g.Hp}, x.options().dtype(acc_type));
  Tensor zstate = reset_after ? Tensor() : at::empty({d.B, g.Hp}, x.options().dtype(acc_type));
  Tensor hbuf = at::zeros({2, g.Bp, g.Hp}, x.options().dtype(op_type));
  Tensor rhbuf = reset_after ? Tensor() : at::zeros({g.Bp, g.Hp}, x.options().dtype(op_type));
  if (h0_.has_value()) {
    // The state entering step 0, staged as the kernels stage the others: zeros where
    // resets[0] restarts a row.
    const Tensor h0 = lay.has_resets() ? h0_->masked_fill(lay.resets[0].unsqueeze(1), 0) : *h0_;
    hstate.narrow(1, 0, d.H).copy_(h0);
    hbuf[0].narrow(0, 0, d.B).narrow(1, 0, d.H).copy_(h0);
  }
  const SeqArgs seq = seq_args(lay, x);
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
  p.steps = seq.steps_ptr;
  p.resets = seq.resets_ptr;
  p.reset_after = reset_after;
  if (pl.g.cluster) {  // step variant 16: one thread block cluster, not cooperative
    ClusterLaunch cl(pl, stream);
    C10_CUDA_CHECK(cudaLaunchKernelEx(&cl.cfg, persistent, p, pl.w_bytes));
  } else if (pl.persistent) {
    int64_t w_bytes = pl.w_bytes;
    void* args[] = {&p, &w_bytes};
    C10_CUDA_CHECK(cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(persistent),
                                               dim3(pl.NB), dim3(kThreads), args,
                                               static_cast<size_t>(pl.smem_bytes(true)),
                                               stream));
  } else {
    auto step = gru_fwd_step<sc, opt, acc_t, MM>;
    const int64_t smem = pl.smem_bytes(false);
    allow_dynamic_smem(reinterpret_cast<const void*>(step), dev, smem);
    for_each_step_launch(d.T, reset_after, false, [&](int64_t t, int phase) {
      step<<<pl.NB, kThreads, smem, stream>>>(p, t, phase);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
}

// The forward of gru_fwd (save_ws: ws (T, B, 4H) keeps r, z, n, hn of every step for the
// backward) and of gru_infer (no ws: the kernels skip those stores).  Returns {y (T, B, H),
// ws (T, B, 4H) or an undefined tensor}; packed: (N, H) and (N, 4H).
std::tuple<Tensor, Tensor> forward_cuda(const char* op, bool save_ws, const Tensor& x_,
                                        const std::optional<Tensor>& h0_, const Tensor& w_ih_,
                                        const Tensor& w_hh_, const std::optional<Tensor>& b_ih_,
                                        const std::optional<Tensor>& b_hh_, bool reset_after,
                                        const std::optional<Tensor>& batch_sizes,
                                        const std::optional<Tensor>& resets) {
  Layout lay;
  const Dims d = check_inputs(op, x_, h0_, w_ih_, w_hh_, b_ih_, b_hh_, batch_sizes, resets, lay);
  check_cuda(op, x_);
  const c10::cuda::CUDAGuard guard(x_.device());
  const Tensor x = x_.contiguous(), w_ih = w_ih_.contiguous(), w_hh = w_hh_.contiguous();
  Tensor y = at::empty(rows_shape(lay, d.H), x.options());
  Tensor ws = save_ws ? at::empty(rows_shape(lay, 4 * d.H), x.options()) : Tensor();
  poison(y);
  if (save_ws) poison(ws);
  if (d.T == 0 || d.B == 0) return {y, ws};
  const Tensor x2 = x.view({lay.N, d.I});
  const Tensor gi = b_ih_.has_value() ? at::addmm(*b_ih_, x2, w_ih.t()) : at::mm(x2, w_ih.t());
  const Tensor bhh = b_hh_.has_value() ? b_hh_->contiguous() : Tensor();

  FUSEDGRU_DISPATCH(x.scalar_type(), launch_forward, d, x, h0_, w_hh, gi, bhh, reset_after, lay, y,
                    ws);
  return {y, ws};
}

std::tuple<Tensor, Tensor> gru_fwd_cuda(const Tensor& x, const std::optional<Tensor>& h0,
                                        const Tensor& w_ih, const Tensor& w_hh,
                                        const std::optional<Tensor>& b_ih,
                                        const std::optional<Tensor>& b_hh, bool reset_after,
                                        const std::optional<Tensor>& batch_sizes,
                                        const std::optional<Tensor>& resets) {
  return forward_cuda("fusedgru::gru_fwd (cuda)", true, x, h0, w_ih, w_hh, b_ih, b_hh,
                      reset_after, batch_sizes, resets);
}

// y only: the same kernels as gru_fwd (bitwise the same y), without the (T, B, 4H) ws.
Tensor gru_infer_cuda(const Tensor& x, const std::optional<Tensor>& h0, const Tensor& w_ih,
                      const Tensor& w_hh, const std::optional<Tensor>& b_ih,
                      const std::optional<Tensor>& b_hh, bool reset_after,
                      const std::optional<Tensor>& batch_sizes,
                      const std::optional<Tensor>& resets) {
  return std::get<0>(forward_cuda("fusedgru::gru_infer (cuda)", false, x, h0, w_ih, w_hh, b_ih,
                                  b_hh, reset_after, batch_sizes, resets));
}

template <typename scalar_t, typename op_at, typename acc_t, int MM>
void launch_backward(const Dims& d, const Tensor& grad_y, const Tensor& x,
                     const std::optional<Tensor>& h0, const Tensor& w_hh, const Tensor& y,
                     const Tensor& ws, bool reset_after, const Layout& lay, Tensor& dgi,
                     Tensor& dgh, Tensor& dh0) {
  const int dev = x.get_device();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(dev).stream();
  using sc = typename Native<scalar_t>::type;
  using opt = typename Native<op_at>::type;
  const at::ScalarType op_type = c10::CppTypeToScalarType<op_at>::value;
  const at::ScalarType acc_type = c10::CppTypeToScalarType<acc_t>::value;
  auto persistent = gru_bwd_persistent<sc, opt, acc_t, MM>;
  Plan pl = make_plan(d.T, d.B, d.H, sizeof(opt), sizeof(acc_t), true,
                      reinterpret_cast<const void*>(persistent), dev, MM == kFma, reset_after);
  const Geom& g = pl.g;
  const Tensor wpack = pack_backward(w_hh, g, op_type);
  Tensor dhs = at::zeros({d.B, g.Hp}, x.options().dtype(acc_type));
  Tensor gbuf = at::zeros({2, g.Bp, 3 * g.Hp}, x.options().dtype(op_type));
  const SeqArgs seq = seq_args(lay, x);
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
  p.steps = seq.steps_ptr;
  p.resets = seq.resets_ptr;
  p.reset_after = reset_after;
  if (pl.persistent) {
    int64_t w_bytes = pl.w_bytes;
    void* args[] = {&p, &w_bytes};
    C10_CUDA_CHECK(cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(persistent),
                                               dim3(pl.NB), dim3(kThreads), args,
                                               static_cast<size_t>(pl.smem_bytes(true)),
                                               stream));
  } else {
    auto step = gru_bwd_step<sc, opt, acc_t, MM>;
    const int64_t smem = pl.smem_bytes(false);
    allow_dynamic_smem(reinterpret_cast<const void*>(step), dev, smem);
    for_each_step_launch(d.T, reset_after, true, [&](int64_t t, int phase) {
      step<<<pl.NB, kThreads, smem, stream>>>(p, t, phase);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> gru_bwd_cuda(
    const Tensor& grad_y_, const Tensor& x_, const std::optional<Tensor>& h0_,
    const Tensor& w_ih_, const Tensor& w_hh_, const Tensor& y_, const Tensor& ws_,
    bool reset_after, const std::optional<Tensor>& batch_sizes,
    const std::optional<Tensor>& resets, bool need_dx, bool need_dw) {
  constexpr const char* op = "fusedgru::gru_bwd (cuda)";
  Layout lay;
  const Dims d = check_inputs(op, x_, h0_, w_ih_, w_hh_, std::nullopt, std::nullopt, batch_sizes,
                              resets, lay);
  check_backward_extra(op, d, lay, x_, grad_y_, y_, ws_);
  check_cuda(op, x_);
  const c10::cuda::CUDAGuard guard(x_.device());
  const Tensor x = x_.contiguous(), w_ih = w_ih_.contiguous(), w_hh = w_hh_.contiguous();
  const Tensor grad_y = grad_y_.contiguous(), y = y_.contiguous(), ws = ws_.contiguous();
  const std::optional<Tensor> h0 =
      h0_.has_value() ? std::optional<Tensor>(h0_->contiguous()) : std::nullopt;
  Tensor dgh = at::empty(rows_shape(lay, 3 * d.H), x.options());
  Tensor dgi = reset_after ? at::empty(rows_shape(lay, 3 * d.H), x.options()) : dgh;
  Tensor dh0 = at::empty({d.B, d.H}, x.options());
  poison(dgh);
  poison(dgi);
  poison(dh0);
  if (d.T == 0 || d.B == 0) {
    dh0.zero_();
  } else {
    FUSEDGRU_DISPATCH(x.scalar_type(), launch_backward, d, grad_y, x, h0, w_hh, y, ws,
                      reset_after, lay, dgi, dgh, dh0);
  }
  // The states entering each step feed only the weight gradients here.
  const Tensor hprev = need_dw ? states_before(h0, y, lay) : Tensor();
  auto [dx, dw_ih, dw_hh, db_ih, db_hh] =
      weight_grads(dgi, dgh, x, w_ih, hprev, ws, reset_after, need_dx, need_dw);
  return {dx, dh0, dw_ih, dw_hh, db_ih, db_hh};
}

template <typename scalar_t, typename op_at, typename acc_t, int MM>
void describe_plan(const Tensor& x, const Tensor& w_hh, bool reset_after, bool backward,
                   std::string& out) {
  using sc = typename Native<scalar_t>::type;
  using opt = typename Native<op_at>::type;
  const void* k = backward ? reinterpret_cast<const void*>(gru_bwd_persistent<sc, opt, acc_t, MM>)
                           : reinterpret_cast<const void*>(gru_fwd_persistent<sc, opt, acc_t, MM>);
  Plan pl = make_plan(x.size(0), x.size(1), w_hh.size(1), sizeof(opt), sizeof(acc_t), backward,
                      k, x.get_device(), MM == kFma, reset_after);
  const char* mm = MM == k3xTf32 ? ", tensor cores (3xTF32)"
                   : MM == kTc   ? (std::is_same_v<op_at, float> ? ", tensor cores (TF32)"
                                                                 : ", tensor cores")
                                 : ", CUDA cores";
  out = pl.why + mm +
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

TORCH_LIBRARY_FRAGMENT(fusedgru, m) {
  m.def("_set_cuda_fp32_path(int mode) -> int", &fusedgru::cuda_gru::set_cuda_fp32_path);
  m.def("_set_cuda_step_variant(int mode) -> int", &fusedgru::cuda_gru::set_cuda_step_variant);
}

TORCH_LIBRARY_IMPL(fusedgru, CUDA, m) {
  m.impl("gru_fwd", &fusedgru::cuda_gru::gru_fwd_cuda);
  m.impl("gru_infer", &fusedgru::cuda_gru::gru_infer_cuda);
  m.impl("gru_bwd", &fusedgru::cuda_gru::gru_bwd_cuda);
  m.impl("_cuda_plan", &fusedgru::cuda_gru::cuda_plan);
}
