// The CUDA backend's kernels (csrc/gru_kernels.cuh, the source nvcc compiles) run on the CPU:
// one OS thread per CUDA thread (cuda_host_shim.h), the blocks and shared-memory layout of
// the same plan as the GPU launch (plan_layout), the same launch sequence
// (for_each_step_launch), every buffer of launch_forward / launch_backward (gru_cuda.cu)
// allocated at its exact size.  Built and driven by tests/test_cuda_host.py, plain and under
// -fsanitize=thread and -fsanitize=address,undefined.
//
// A standalone program rather than a Python extension: a sanitizer runtime must be loaded
// first in the process (LD_PRELOAD of libtsan into Python is fragile and reports Python's
// own threads), and a crash or a deadlock in a kernel takes down only this process.
//
// usage: gru_host DTYPE PATH T B H RESET_AFTER HAS_H0 HAS_BIAS IN OUT [OPTS...]
//        gru_host convert IN OUT      (the shim's 16-bit and TF32 roundings, see main)
//        gru_host plan DTYPE T B H BACKWARD PERSISTENT [BALANCE [GROUPS]]   (the
//                                     shared-memory plan with staging: w_bytes acc_bytes
//                                     a_bytes total staged lds nsplit NB mtg; BALANCE=1:
//                                     after plan_balance; GROUPS: plan_groups first)
//   DTYPE  f64 | f32 (strict float32 on CUDA cores: FMA, _set_cuda_fp32_path(1)) |
//          f32x3 (strict float32 on TF32 tensor cores, split precision 3xTF32: the default) |
//          tf32 | f16 | bf16 (tensor cores, wmma)
//   PATH   persistent (one cooperative launch) | step (one launch per step and phase)
//   OPTS   after IN OUT, any of: stage=0|1, split=0|1, balance=0|1, groups=N, cluster=N
//          and SEQ.
//            stage=1    step variant bit 1 (fusedgru::_set_cuda_step_variant(1)): the MMA's
//                       A operand staged in shared memory (plan_staging, stage_a) where it
//                       fits in kSmemCap; stage=0 (the default): the old step
//            split=1    step variant bit 2 (_set_cuda_step_variant(2)): the persistent
//                       kernels' split-barrier step where it applies (plan_split,
//                       fwd_split_loop, bwd_split_loop); split=0 (the default): the old loop
//            balance=1  step variant bit 4 (_set_cuda_step_variant(4)): the K split balanced
//                       over the warps (plan_balance) where the accumulators fit in kSmemCap
//            groups=N   step variant bit 8 (_set_cuda_step_variant(8)): the batch tiles split
//                       over N groups of blocks (plan_groups; make_plan takes N from the SMs
//                       left idle); groups=1 (the default): one group
//            cluster=N  step variant bit 16 (_set_cuda_step_variant(16)): the persistent
//                       forward as one thread block cluster of at most N blocks
//                       (plan_cluster, fwd_cluster_loop; make_plan asks for 16, 8 where the
//                       device refuses non-portable sizes) where it fits; cluster=0 (the
//                       default): the grid kernels.  The backward is not a cluster launch
//   SEQ    the sequence structure (gru_common.h Layout), default dense:
//            packed=N0,N1,...   batch_sizes (T values, non-increasing, N0 = B): the rows
//                               below are then the N = sum(batch_sizes) packed rows
//            resets=0110...     resets (T x B digits, row-major (t, b))
//   IN     float64 values, already representable in DTYPE:
//            gi (T, B, 3H) = x W_ih^T + b_ih, w_hh (3H, H), b_hh (3H) if HAS_BIAS,
//            h0 (B, H) if HAS_H0, grad_y (T, B, H)      ((T, B) -> N rows when packed)
//   OUT    float64: y (T, B, H) and ws (T, B, 4H) of gru_fwd, y of gru_infer (T, B, H),
//            then gru_bwd (fed gru_fwd's y and ws): dgi (T, B, 3H), dgh (T, B, 3H), dh0 (B, H)
// Exit status 0 on success; the shim and the sanitizers abort with a report on stderr.
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "../gru_kernels.cuh"

namespace fusedgru {
namespace cuda_gru {
namespace host {

// Every buffer at its true size (AddressSanitizer reports the first byte past it), 256-byte
// aligned as cudaMalloc / the caching allocator return it.
class Arena {
 public:
  ~Arena() {
    for (void* p : ptrs_) ::operator delete(p, std::align_val_t(256));
  }
  template <typename T>
  T* alloc(int64_t n) {
    if (n <= 0) return nullptr;
    void* p = ::operator new(static_cast<size_t>(n) * sizeof(T), std::align_val_t(256));
    ptrs_.push_back(p);
    return static_cast<T*>(p);
  }

 private:
  std::vector<void*> ptrs_;
};

inline double to_double(double v) { return v; }
inline double to_double(float v) { return v; }
inline double to_double(__half v) { return __half2float(v); }
inline double to_double(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
T from_double(double v) {
  if constexpr (std::is_same_v<T, __half>)
    return __float2half_rn(static_cast<float>(v));
  else if constexpr (std::is_same_v<T, __nv_bfloat16>)
    return __float2bfloat16_rn(static_cast<float>(v));
  else
    return static_cast<T>(v);
}

template <typename T>
T* filled(Arena& a, int64_t n, double v) {
  T* p = a.alloc<T>(n);
  for (int64_t i = 0; i < n; ++i) p[i] = from_double<T>(v);
  return p;
}

// at::empty in the GPU code: NaN here, so a read before a write shows.
template <typename T>
T* poisoned(Arena& a, int64_t n) {
  return filled<T>(a, n, std::numeric_limits<double>::quiet_NaN());
}

// The dynamic shared memory a block may use: sm_90's opt-in (cudaDevAttrMaxSharedMemory-
// PerBlockOptin, H100 / H200); what decides whether the staged A fits (plan_staging).
constexpr int64_t kSmemCap = 232448;

struct Case {
  int64_t T, B, H;
  int64_t N;  // rows of gi / y / grad_y: T B dense, sum(batch_sizes) packed
  bool reset_after, has_h0, has_bias, persistent;
  bool stage = false;  // step variant bit 1 (stage=1)
  bool split = false;  // step variant bit 2 (split=1)
  bool balance = false;  // step variant bit 4 (balance=1)
  int groups = 1;        // step variant bit 8 (groups=N)
  int cluster = 0;       // step variant bit 16 (cluster=N: at most N blocks)
  std::vector<int64_t> batch_sizes;  // empty: dense
  std::vector<bool> resets;          // (T, B), or empty
  std::vector<double> gi, w_hh, b_hh, h0, grad_y;
};

// seq_args (gru_cuda.cu): the device table of (first, rows) per step of a packed batch and
// the resets array, each at its exact size (nullptr when absent).
struct Seq {
  const int64_t* steps = nullptr;
  const bool* resets = nullptr;
};

inline Seq seq_args(Arena& a, const Case& c) {
  Seq s;
  if (!c.batch_sizes.empty()) {
    int64_t* steps = a.alloc<int64_t>(2 * c.T);
    int64_t first = 0;
    for (int64_t t = 0; t < c.T; ++t) {
      steps[2 * t] = first;
      steps[2 * t + 1] = c.batch_sizes[t];
      first += c.batch_sizes[t];
    }
    s.steps = steps;
  }
  if (!c.resets.empty()) {
    bool* r = a.alloc<bool>(c.T * c.B);
    for (int64_t i = 0; i < c.T * c.B; ++i) r[i] = c.resets[i];
    s.resets = r;
  }
  return s;
}

struct Output {
  std::vector<double> data;
  template <typename T>
  void add(const T* p, int64_t n) {
    for (int64_t i = 0; i < n; ++i) data.push_back(to_double(p[i]));
  }
};

template <typename T>
T* copy_in(Arena& a, const std::vector<double>& v) {
  T* p = a.alloc<T>(static_cast<int64_t>(v.size()));
  for (size_t i = 0; i < v.size(); ++i) p[i] = from_double<T>(v[i]);
  return p;
}

// make_plan (gru_cuda.cu) for the harness's options, in its order: groups, the balanced
// split, staging, the split-barrier step.
// The cluster forward first (make_plan: it replaces the rest where it is taken).
inline Plan plan_of(const Case& c, int64_t op_size, int64_t acc_size, bool backward, bool fma) {
  Plan pl = plan_layout(c.T, c.B, c.H, op_size, acc_size, backward);
  if (c.cluster > 0 && c.persistent &&
      plan_cluster(pl, c.cluster, c.reset_after, fma, op_size, acc_size, kSmemCap, c.balance))
    return pl;
  if (c.groups > 1) plan_groups(pl, c.groups, acc_size);
  if (c.balance) plan_balance(pl, acc_size, kSmemCap);
  if (c.stage) plan_staging(pl, c.persistent, fma, op_size, kSmemCap);
  if (c.split) plan_split(pl, c.persistent);
  return pl;
}

// launch_forward (gru_cuda.cu): the same buffers, initial values and launches.
// The launches of one layer in gru_cuda.cu's order: one cooperative launch of the
// persistent kernel, or a launch per phase of every step (for_each_step_launch).
template <typename Persistent, typename Step>
void launch_layer(fusedgru_host::ThreadPool& pool, const Plan& pl, const Case& c,
                  bool backward, const Persistent& persistent, const Step& step) {
  if (c.persistent && pl.g.cluster) {  // cudaLaunchKernelEx, one cluster of pl.NB blocks
    fusedgru_host::launch(pool, pl.NB, kThreads, pl.smem_bytes(true), false, persistent,
                          static_cast<unsigned>(pl.NB));
  } else if (c.persistent) {
    fusedgru_host::launch(pool, pl.NB, kThreads, pl.smem_bytes(true), true, persistent);
  } else {
    for_each_step_launch(c.T, c.reset_after, backward, [&](int64_t t, int phase) {
      fusedgru_host::launch(pool, pl.NB, kThreads, pl.smem_bytes(false), false,
                            [&] { step(t, phase); });
    });
  }
}

template <typename sc, typename opt, typename acc_t, int MM>
void forward(const Case& c, fusedgru_host::ThreadPool& pool, Arena& a, const sc* gi,
             const sc* bhh, const sc* h0, sc* y, sc* ws) {
  const Plan pl = plan_of(c, sizeof(opt), sizeof(acc_t), false, MM == kFma);
  const Geom& g = pl.g;
  const int64_t H = c.H, B = c.B;
  // pack_forward: (NB, 3, 16, ldw), block nb / gate k / unit n holds W_hh[k H + 16 nb + n].
  opt* wpack = filled<opt>(a, static_cast<int64_t>(g.nbu) * 3 * 16 * g.ldw, 0.0);
  for (int nb = 0; nb < g.nbu; ++nb)
    for (int gate = 0; gate < 3; ++gate)
      for (int n = 0; n < 16; ++n) {
        const int64_t j = 16 * nb + n;
        if (j >= H) continue;
        for (int64_t k = 0; k < H; ++k)
          wpack[((nb * 3 + gate) * 16 + n) * static_cast<int64_t>(g.ldw) + k] =
              from_double<opt>(c.w_hh[(gate * H + j) * H + k]);
      }
  acc_t* hstate = filled<acc_t>(a, B * g.Hp, 0.0);
  acc_t* zstate = c.reset_after ? nullptr : poisoned<acc_t>(a, B * g.Hp);
  opt* hbuf = filled<opt>(a, 2 * static_cast<int64_t>(g.Bp) * g.Hp, 0.0);
  opt* rhbuf = c.reset_after ? nullptr : filled<opt>(a, static_cast<int64_t>(g.Bp) * g.Hp, 0.0);
  if (h0) {  // masked by resets[0] (the state entering step 0 of a restarted row: zeros)
    for (int64_t b = 0; b < B; ++b)
      for (int64_t j = 0; j < H; ++j) {
        const double v = !c.resets.empty() && c.resets[b] ? 0.0 : to_double(h0[b * H + j]);
        hstate[b * g.Hp + j] = static_cast<acc_t>(v);
        hbuf[b * g.Hp + j] = from_double<opt>(v);
      }
  }
  const Seq seq = seq_args(a, c);
  FwdArgs<sc, opt, acc_t> p;
  p.g = g;
  p.gi = gi;
  p.bhh = bhh;
  p.wpack = wpack;
  p.y = y;
  p.ws = ws;
  p.hstate = hstate;
  p.zstate = zstate;
  p.hbuf = hbuf;
  p.rhbuf = rhbuf;
  p.steps = seq.steps;
  p.resets = seq.resets;
  p.reset_after = c.reset_after;
  launch_layer(pool, pl, c, false,
               [&] { gru_fwd_persistent<sc, opt, acc_t, MM>(p, pl.w_bytes); },
               [&](int64_t t, int phase) { gru_fwd_step<sc, opt, acc_t, MM>(p, t, phase); });
}

// launch_backward (gru_cuda.cu).
template <typename sc, typename opt, typename acc_t, int MM>
void backward(const Case& c, fusedgru_host::ThreadPool& pool, Arena& a, const sc* gy,
              const sc* ws, const sc* y, const sc* h0, sc* dgi, sc* dgh, sc* dh0) {
  const Plan pl = plan_of(c, sizeof(opt), sizeof(acc_t), true, MM == kFma);
  const Geom& g = pl.g;
  const int64_t H = c.H;
  // pack_backward: (NB, 16, ldw) with [nb][n][k Hp + r] = W_hh[k H + r, 16 nb + n].
  opt* wpack = filled<opt>(a, static_cast<int64_t>(g.Hp) * g.ldw, 0.0);
  for (int64_t n = 0; n < H; ++n)
    for (int gate = 0; gate < 3; ++gate)
      for (int64_t r = 0; r < H; ++r)
        wpack[n * g.ldw + gate * g.Hp + r] = from_double<opt>(c.w_hh[(gate * H + r) * H + n]);
  const Seq seq = seq_args(a, c);
  BwdArgs<sc, opt, acc_t> p;
  p.g = g;
  p.gy = gy;
  p.ws = ws;
  p.y = y;
  p.h0 = h0;
  p.wpack = wpack;
  p.dgi = dgi;
  p.dgh = dgh;
  p.dhs = filled<acc_t>(a, c.B * g.Hp, 0.0);
  p.gbuf = filled<opt>(a, 2 * static_cast<int64_t>(g.Bp) * 3 * g.Hp, 0.0);
  p.dh0 = dh0;
  p.steps = seq.steps;
  p.resets = seq.resets;
  p.reset_after = c.reset_after;
  launch_layer(pool, pl, c, true,
               [&] { gru_bwd_persistent<sc, opt, acc_t, MM>(p, pl.w_bytes); },
               [&](int64_t t, int phase) { gru_bwd_step<sc, opt, acc_t, MM>(p, t, phase); });
}

// gru_fwd, gru_infer, then gru_bwd on gru_fwd's y and ws.
template <typename sc, typename opt, typename acc_t, int MM>
Output run(const Case& c) {
  const int64_t N = c.N, B = c.B, H = c.H;
  // Threads for the larger of the two launches' grids (groups: the backward's may differ).
  const int nb = std::max(plan_of(c, sizeof(opt), sizeof(acc_t), false, MM == kFma).NB,
                          plan_of(c, sizeof(opt), sizeof(acc_t), true, MM == kFma).NB);
  fusedgru_host::ThreadPool pool(static_cast<unsigned>(nb) * kThreads);
  Arena a;
  const sc* gi = copy_in<sc>(a, c.gi);
  const sc* bhh = c.has_bias ? copy_in<sc>(a, c.b_hh) : nullptr;
  const sc* h0 = c.has_h0 ? copy_in<sc>(a, c.h0) : nullptr;
  const sc* gy = copy_in<sc>(a, c.grad_y);
  Output out;

  sc* y = poisoned<sc>(a, N * H);
  sc* ws = poisoned<sc>(a, N * 4 * H);
  forward<sc, opt, acc_t, MM>(c, pool, a, gi, bhh, h0, y, ws);
  out.add(y, N * H);
  out.add(ws, N * 4 * H);

  sc* y_inf = poisoned<sc>(a, N * H);
  forward<sc, opt, acc_t, MM>(c, pool, a, gi, bhh, h0, y_inf, nullptr);
  out.add(y_inf, N * H);

  sc* dgh = poisoned<sc>(a, N * 3 * H);
  sc* dgi = c.reset_after ? poisoned<sc>(a, N * 3 * H) : dgh;  // one tensor when False
  sc* dh0 = poisoned<sc>(a, B * H);
  backward<sc, opt, acc_t, MM>(c, pool, a, gy, ws, y, h0, dgi, dgh, dh0);
  out.add(dgi, N * 3 * H);
  out.add(dgh, N * 3 * H);
  out.add(dh0, B * H);
  return out;
}

}  // namespace host
}  // namespace cuda_gru
}  // namespace fusedgru

namespace {

[[noreturn]] void usage(const char* why) {
  std::fprintf(stderr, "gru_host: %s\nusage: gru_host f64|f32|f32x3|tf32|f16|bf16 persistent|step "
               "T B H RESET_AFTER HAS_H0 HAS_BIAS IN OUT [stage=0|1] [split=0|1] [balance=0|1] [groups=N] [cluster=N] [packed=N0,N1,...|resets=0110...]\n",
               why);
  std::exit(2);
}

std::vector<double> take(FILE* f, int64_t n) {
  std::vector<double> v(static_cast<size_t>(n));
  if (n > 0 && std::fread(v.data(), sizeof(double), v.size(), f) != v.size())
    usage("input file too short");
  return v;
}

}  // namespace

int main(int argc, char** argv) {
  using namespace fusedgru::cuda_gru::host;
  if (argc == 4 && std::string(argv[1]) == "convert") {
    // The shim's roundings, for the test: each float64 of IN (read as float32) -> its
    // __half, __nv_bfloat16 and __float_to_tf32 value (as the tensor core reads it: the 19
    // upper bits), three float64 per input in OUT.
    FILE* in = std::fopen(argv[2], "rb");
    FILE* o = std::fopen(argv[3], "wb");
    if (!in || !o) usage("cannot open the files of convert");
    double v;
    while (std::fread(&v, sizeof(double), 1, in) == 1) {
      const float f = static_cast<float>(v);
      const double r[3] = {to_double(__float2half_rn(f)), to_double(__float2bfloat16_rn(f)),
                           nvcuda::wmma::detail::operand<nvcuda::wmma::precision::tf32>(
                               nvcuda::wmma::__float_to_tf32(f))};
      std::fwrite(r, sizeof(double), 3, o);
    }
    std::fclose(in);
    std::fclose(o);
    return 0;
  }
  if (argc >= 8 && argc <= 10 && std::string(argv[1]) == "plan") {
    // The plan of one launch with staging (sizes only, nothing runs): for the fit table of
    // benchmarks/NOTES-cuda-latency.md.
    using namespace fusedgru::cuda_gru;
    const std::string dt = argv[2];
    const int64_t T = std::atoll(argv[3]), B = std::atoll(argv[4]), H = std::atoll(argv[5]);
    const bool bwd = std::atoi(argv[6]) != 0, pers = std::atoi(argv[7]) != 0;
    const int64_t op = dt == "f64" ? 8 : (dt == "f16" || dt == "bf16") ? 2 : 4;
    const int64_t acc = dt == "f64" ? 8 : 4;
    const bool fma = dt == "f64" || dt == "f32";
    Plan pl = plan_layout(T, B, H, op, acc, bwd);
    if (argc == 10) plan_groups(pl, std::atoi(argv[9]), acc);
    if (argc >= 9 && std::atoi(argv[8]) != 0) plan_balance(pl, acc, kSmemCap);
    const bool staged = plan_staging(pl, pers, fma, op, kSmemCap);
    int lds = 0;
    std::printf("%lld %lld %lld %lld %d %d %d %d %d\n", static_cast<long long>(pl.w_bytes),
                static_cast<long long>(pl.acc_bytes),
                static_cast<long long>(staging_bytes(pl, fma, op, &lds)),
                static_cast<long long>(pl.smem_bytes(pers)), staged ? 1 : 0, lds, pl.g.nsplit,
                pl.NB, pl.g.mtg);
    return 0;
  }
  if (argc == 8 && std::string(argv[1]) == "cplan") {
    // The cluster forward's plan (plan_cluster), sizes only: fits q C w_bytes acc_bytes
    // h_bytes total nsplit, for benchmarks/NOTES-cuda-latency.md and its test.
    // usage: gru_host cplan DTYPE B H RESET_AFTER MAX_CLUSTER BALANCE
    using namespace fusedgru::cuda_gru;
    const std::string dt = argv[2];
    const int64_t B = std::atoll(argv[3]), H = std::atoll(argv[4]);
    const int64_t op = dt == "f64" ? 8 : (dt == "f16" || dt == "bf16") ? 2 : 4;
    const int64_t acc = dt == "f64" ? 8 : 4;
    Plan pl = plan_layout(1, B, H, op, acc, false);
    const bool fits = plan_cluster(pl, std::atoi(argv[6]), std::atoi(argv[5]) != 0,
                                   dt == "f64" || dt == "f32", op, acc, kSmemCap,
                                   std::atoi(argv[7]) != 0);
    std::printf("%d %d %d %lld %lld %lld %lld %d\n", fits ? 1 : 0, pl.g.q, pl.g.cluster,
                static_cast<long long>(pl.w_bytes), static_cast<long long>(pl.acc_bytes),
                static_cast<long long>(pl.h_bytes), static_cast<long long>(pl.smem_bytes(true)),
                pl.g.nsplit);
    return 0;
  }
  if (argc < 11) usage("expected at least 10 arguments");
  const std::string dtype = argv[1], path = argv[2];
  Case c;
  c.T = std::atoll(argv[3]);
  c.B = std::atoll(argv[4]);
  c.H = std::atoll(argv[5]);
  c.reset_after = std::atoi(argv[6]) != 0;
  c.has_h0 = std::atoi(argv[7]) != 0;
  c.has_bias = std::atoi(argv[8]) != 0;
  if (path != "persistent" && path != "step") usage("PATH must be persistent or step");
  c.persistent = path == "persistent";
  if (c.T < 1 || c.B < 1 || c.H < 1) usage("T, B, H must be >= 1");
  c.N = c.T * c.B;
  std::string seq = "dense";
  for (int i = 11; i < argc; ++i) {
    const std::string opt = argv[i];
    if (opt == "stage=0" || opt == "stage=1")
      c.stage = opt == "stage=1";
    else if (opt == "split=0" || opt == "split=1")
      c.split = opt == "split=1";
    else if (opt == "balance=0" || opt == "balance=1")
      c.balance = opt == "balance=1";
    else if (opt.rfind("groups=", 0) == 0) {
      c.groups = std::atoi(opt.c_str() + 7);
      if (c.groups < 1) usage("groups=: expected a count >= 1");
    } else if (opt.rfind("cluster=", 0) == 0) {
      c.cluster = std::atoi(opt.c_str() + 8);
      if (c.cluster < 0 || c.cluster > fusedgru::cuda_gru::kMaxCluster) usage("cluster=: expected 0 .. 16");
    }
    else
      seq = opt;
  }
  if (seq.rfind("packed=", 0) == 0) {
    const char* s = seq.c_str() + 7;
    while (*s) {
      char* end;
      c.batch_sizes.push_back(std::strtoll(s, &end, 10));
      if (end == s || (*end && *end != ',')) usage("packed=: expected comma-separated sizes");
      s = *end ? end + 1 : end;
    }
    if (static_cast<int64_t>(c.batch_sizes.size()) != c.T || c.batch_sizes[0] != c.B)
      usage("packed=: expected T sizes, the first = B");
    c.N = 0;
    for (int64_t t = 0; t < c.T; ++t) {
      if (c.batch_sizes[t] < 1 || (t > 0 && c.batch_sizes[t] > c.batch_sizes[t - 1]))
        usage("packed=: sizes must be >= 1 and non-increasing");
      c.N += c.batch_sizes[t];
    }
  } else if (seq.rfind("resets=", 0) == 0) {
    const std::string bits = seq.substr(7);
    if (static_cast<int64_t>(bits.size()) != c.T * c.B ||
        bits.find_first_not_of("01") != std::string::npos)
      usage("resets=: expected T x B digits 0 / 1");
    for (char ch : bits) c.resets.push_back(ch == '1');
  } else if (seq != "dense") {
    usage("SEQ must be dense, packed=... or resets=...");
  }
  FILE* in = std::fopen(argv[9], "rb");
  if (!in) usage("cannot open IN");
  c.gi = take(in, c.N * 3 * c.H);
  c.w_hh = take(in, 3 * c.H * c.H);
  if (c.has_bias) c.b_hh = take(in, 3 * c.H);
  if (c.has_h0) c.h0 = take(in, c.B * c.H);
  c.grad_y = take(in, c.N * c.H);
  std::fclose(in);

  // The mutation tests build one dtype (compile time): FUSEDGRU_HOST_F64_ONLY or
  // FUSEDGRU_HOST_F32X3_ONLY.
#if defined(FUSEDGRU_HOST_F64_ONLY)
#define FUSEDGRU_HOST_F64 1
#define FUSEDGRU_HOST_F32X3 0
#define FUSEDGRU_HOST_REST 0
#elif defined(FUSEDGRU_HOST_F32X3_ONLY)
#define FUSEDGRU_HOST_F64 0
#define FUSEDGRU_HOST_F32X3 1
#define FUSEDGRU_HOST_REST 0
#else
#define FUSEDGRU_HOST_F64 1
#define FUSEDGRU_HOST_F32X3 1
#define FUSEDGRU_HOST_REST 1
#endif
  using namespace fusedgru::cuda_gru;  // kFma, kTc, k3xTf32
  Output out;
  bool built = false;
#if FUSEDGRU_HOST_F64
  if (dtype == "f64") {
    out = run<double, double, double, kFma>(c);
    built = true;
  }
#endif
#if FUSEDGRU_HOST_F32X3
  if (dtype == "f32x3") {
    out = run<float, float, float, k3xTf32>(c);
    built = true;
  }
#endif
#if FUSEDGRU_HOST_REST
  if (dtype == "f32") {
    out = run<float, float, float, kFma>(c);
    built = true;
  } else if (dtype == "tf32") {
    out = run<float, float, float, kTc>(c);
    built = true;
  } else if (dtype == "f16") {
    out = run<__half, __half, float, kTc>(c);
    built = true;
  } else if (dtype == "bf16") {
    out = run<__nv_bfloat16, __nv_bfloat16, float, kTc>(c);
    built = true;
  }
#endif
  if (!built) usage("unknown or not built DTYPE");
  FILE* o = std::fopen(argv[10], "wb");
  if (!o || std::fwrite(out.data.data(), sizeof(double), out.data.size(), o) != out.data.size())
    usage("cannot write OUT");
  std::fclose(o);
  return 0;
}
