// Shared by the CPU (gru_cpu.cpp) and CUDA (gru_cuda.cu) implementations of
//   fusedgru::gru_fwd / fusedgru::gru_bwd   (schemas in gru_ops.cpp).
//
// Dimension legend: T timesteps, B batch, I input features, H hidden units, G = 3 gates
// stacked r (reset), z (update), n (new).  The semantics are those of
// fusedgru/reference.py gru_layer_forward / gru_layer_backward, line for line.
#pragma once

#include <ATen/ATen.h>

#include <limits>
#include <vector>

namespace fusedgru {

struct Dims {
  int64_t T, B, I, H;
};

// True while a test has asked the ops to fill their outputs with NaN before computing, so
// that an element a kernel forgets to write fails the comparison (gru_ops.cpp).
bool poison_outputs();

// Test / benchmark switch for the CUDA dispatcher (gru_ops.cpp): 0 = automatic,
// 1 = persistent kernels or an error, 2 = per-step kernels only.
int cuda_path_mode();

inline void poison(const at::Tensor& t) {
  if (poison_outputs() && t.numel() > 0) t.fill_(std::numeric_limits<double>::quiet_NaN());
}

inline void check_same(const char* op, const at::Tensor& t, const char* name, const at::Tensor& x) {
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), op, ": ", name, " must have the dtype of x (",
              x.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " must be on the device of x (",
              x.device(), "), got ", t.device());
}

inline void check_shape(const char* op, const at::Tensor& t, const char* name,
                        at::IntArrayRef expected) {
  TORCH_CHECK(t.sizes() == expected, op, ": ", name, " must have shape ", expected, ", got ",
              t.sizes());
}

// The sequence structure a call may carry (the optional batch_sizes / resets arguments of
// the schemas in gru_ops.cpp; fusedgru/reference.py says the same in Python):
//
//   dense   x (T, B, I); step t's rows are x[t, 0:B].
//   packed  batch_sizes: int64 CPU tensor (T,), each >= 1, non-increasing (a PackedSequence's
//           batch_sizes); x (N, I) with N = sum(batch_sizes), the packed data: step t's rows
//           are x[first(t) : first(t) + rows(t)], the first rows(t) of the length-sorted
//           batch, B = batch_sizes[0].  y, ws, grad_y, dx are laid out like x (N rows).
//           Rows past a sequence's end are neither computed nor stored.
//   resets  (dense only) bool (T, B) on x's device: resets[t, b] means the state entering
//           step t of row b is zeros instead of h_{t-1} (or h0 at t = 0); no gradient flows
//           across it.
// In both layouts step t's rows are contiguous, and a row active at step t >= 1 was active
// at step t-1 at the same position within its step, so the state entering step t of row b
// is y[first(t-1) + b] (or h0[b] at t = 0).
struct Layout {
  bool packed = false;
  int64_t T = 0, B = 0, N = 0;          // N: rows of x (T * B when dense)
  std::vector<int64_t> sizes, offsets;  // packed only: rows(t), first(t)
  at::Tensor resets;                    // (T, B) bool, or undefined
  int64_t rows(int64_t t) const { return packed ? sizes[t] : B; }
  int64_t first(int64_t t) const { return packed ? offsets[t] : t * B; }
  bool has_resets() const { return resets.defined(); }
};

// Checks the forward's inputs (also the backward's: same names, same rules) and reads the
// layout (above).
inline Dims check_inputs(const char* op, const at::Tensor& x, const std::optional<at::Tensor>& h0,
                         const at::Tensor& w_ih, const at::Tensor& w_hh,
                         const std::optional<at::Tensor>& b_ih,
                         const std::optional<at::Tensor>& b_hh,
                         const std::optional<at::Tensor>& batch_sizes,
                         const std::optional<at::Tensor>& resets, Layout& lay) {
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), op, ": x must be floating point, got ",
              x.scalar_type());
  TORCH_CHECK(w_hh.dim() == 2 && w_hh.size(1) > 0 && w_hh.size(0) == 3 * w_hh.size(1), op,
              ": w_hh must be (3H, H) with H >= 1, got ", w_hh.sizes());
  Dims d{};
  lay = Layout{};
  if (batch_sizes.has_value()) {
    const at::Tensor& bs = *batch_sizes;
    TORCH_CHECK(x.dim() == 2, op, ": with batch_sizes, x must be the packed (N, I) data, got ",
                x.dim(), " dimensions");
    TORCH_CHECK(bs.dim() == 1 && bs.scalar_type() == at::kLong && bs.device().is_cpu(), op,
                ": batch_sizes must be a 1-D int64 CPU tensor, got ", bs.sizes(), " ",
                bs.scalar_type(), " on ", bs.device());
    TORCH_CHECK(!resets.has_value(), op, ": resets cannot be combined with batch_sizes");
    const at::Tensor bsc = bs.contiguous();
    const int64_t* p = bsc.data_ptr<int64_t>();
    lay.packed = true;
    lay.T = bsc.size(0);
    lay.sizes.assign(p, p + lay.T);
    lay.offsets.resize(lay.T);
    int64_t total = 0;
    for (int64_t t = 0; t < lay.T; ++t) {
      TORCH_CHECK(p[t] >= 1 && (t == 0 || p[t] <= p[t - 1]), op,
                  ": batch_sizes must be >= 1 and non-increasing, got ", p[t], " at step ", t);
      lay.offsets[t] = total;
      total += p[t];
    }
    TORCH_CHECK(total == x.size(0), op, ": x has ", x.size(0),
                " rows, but batch_sizes sums to ", total);
    lay.B = lay.T > 0 ? p[0] : 0;
    lay.N = total;
    d = Dims{lay.T, lay.B, x.size(1), w_hh.size(1)};
  } else {
    TORCH_CHECK(x.dim() == 3, op, ": x must be (T, B, I), got ", x.dim(), " dimensions");
    d = Dims{x.size(0), x.size(1), x.size(2), w_hh.size(1)};
    lay.T = d.T;
    lay.B = d.B;
    lay.N = d.T * d.B;
    if (resets.has_value()) {
      TORCH_CHECK(resets->scalar_type() == at::kBool, op, ": resets must be bool, got ",
                  resets->scalar_type());
      TORCH_CHECK(resets->device() == x.device(), op, ": resets must be on the device of x (",
                  x.device(), "), got ", resets->device());
      check_shape(op, *resets, "resets", {d.T, d.B});
      lay.resets = resets->contiguous();
    }
  }
  check_same(op, w_hh, "w_hh", x);
  check_same(op, w_ih, "w_ih", x);
  check_shape(op, w_ih, "w_ih", {3 * d.H, d.I});
  if (h0.has_value()) {
    check_same(op, *h0, "h0", x);
    check_shape(op, *h0, "h0", {d.B, d.H});
  }
  TORCH_CHECK(b_ih.has_value() == b_hh.has_value(), op,
              ": b_ih and b_hh must both be given or both be None");
  if (b_ih.has_value()) {
    check_same(op, *b_ih, "b_ih", x);
    check_shape(op, *b_ih, "b_ih", {3 * d.H});
    check_same(op, *b_hh, "b_hh", x);
    check_shape(op, *b_hh, "b_hh", {3 * d.H});
  }
  return d;
}

// x's shape with the feature dimension replaced by n: (T, B, n) dense, (N, n) packed.
inline std::vector<int64_t> rows_shape(const Layout& lay, int64_t n) {
  if (lay.packed) return {lay.N, n};
  return {lay.T, lay.B, n};
}

inline void check_backward_extra(const char* op, const Dims& d, const Layout& lay,
                                 const at::Tensor& x, const at::Tensor& grad_y,
                                 const at::Tensor& y, const at::Tensor& ws) {
  check_same(op, grad_y, "grad_y", x);
  check_shape(op, grad_y, "grad_y", rows_shape(lay, d.H));
  check_same(op, y, "y", x);
  check_shape(op, y, "y", rows_shape(lay, d.H));
  check_same(op, ws, "ws", x);
  check_shape(op, ws, "ws", rows_shape(lay, 4 * d.H));
}

// What the weight gradients' producers return when need_dw is false: dx and four empty
// (0,) tensors, distinct (a schema's outputs never alias each other).
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
without_weight_grads(const at::Tensor& dx) {
  const auto none = [&] { return at::empty({0}, dx.options()); };
  return {dx, none(), none(), none(), none()};
}

// After the reverse-time loop (SPEC section 4): every remaining gradient is ONE GEMM or sum
// over all rows (T*B dense, N packed: no padded rows).  dgi, dgh: laid out like y with 3H
// features (the same tensor when reset_after=False); hprev: the state entering each row's
// step, laid out like y (states_before; only read when need_dw, so a caller that has no
// other use for it may pass an undefined tensor then).  Returns (dx laid out like x, dw_ih,
// dw_hh, db_ih, db_hh); need_dx / need_dw false: dx / the other four are empty (0,)
// tensors, not computed.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> weight_grads(
    const at::Tensor& dgi, const at::Tensor& dgh, const at::Tensor& x, const at::Tensor& w_ih,
    const at::Tensor& hprev, const at::Tensor& ws, bool reset_after, bool need_dx,
    bool need_dw) {
  const int64_t I = x.size(-1), H = dgi.size(-1) / 3;
  const at::Tensor dgi2 = dgi.reshape({-1, 3 * H}), dgh2 = dgh.reshape({-1, 3 * H});
  const int64_t N = dgi2.size(0);
  at::Tensor dx = need_dx ? at::mm(dgi2, w_ih).view(x.sizes()) : at::empty({0}, x.options());
  if (!need_dw) return without_weight_grads(dx);
  const at::Tensor x2 = x.reshape({N, I}), hp2 = hprev.reshape({N, H});
  at::Tensor dw_ih = at::mm(dgi2.t(), x2);
  at::Tensor dw_hh;
  if (reset_after) {
    dw_hh = at::mm(dgh2.t(), hp2);
  } else {
    // Rows r, z multiply h; rows n multiply r * h.
    dw_hh = at::empty({3 * H, H}, x.options());
    at::Tensor top = dw_hh.narrow(0, 0, 2 * H), bottom = dw_hh.narrow(0, 2 * H, H);
    at::mm_out(top, dgh2.narrow(1, 0, 2 * H).t(), hp2);
    const at::Tensor rh = ws.reshape({N, 4 * H}).narrow(1, 0, H) * hp2;
    at::mm_out(bottom, dgh2.narrow(1, 2 * H, H).t(), rh);
  }
  at::Tensor db_hh = dgh2.sum(0);
  at::Tensor db_ih = reset_after ? dgi2.sum(0) : db_hh.clone();
  return {dx, dw_ih, dw_hh, db_ih, db_hh};
}

// The state entering each row's step, laid out like y (contiguous): dense (T, B, H) =
// [h0 (zeros if absent), y[0], ..., y[T-2]]; packed (N, H), row first(t) + b = h0[b] at
// t = 0, else y[first(t-1) + b]; rows whose step starts a new sequence (resets) are zeros.
inline at::Tensor states_before(const std::optional<at::Tensor>& h0, const at::Tensor& y,
                                const Layout& lay) {
  const int64_t H = y.size(-1), B = lay.B;
  const at::Tensor h = h0.has_value() ? *h0 : at::zeros({B, H}, y.options());
  if (lay.T == 0) return at::empty(y.sizes(), y.options());
  at::Tensor hp;
  if (lay.packed) {
    std::vector<int64_t> idx(lay.N);
    for (int64_t t = 0; t < lay.T; ++t)
      for (int64_t b = 0; b < lay.sizes[t]; ++b)
        idx[lay.offsets[t] + b] = t == 0 ? b : B + lay.offsets[t - 1] + b;
    const at::Tensor index =
        at::tensor(idx, at::TensorOptions().dtype(at::kLong)).to(y.device());
    return at::cat({h, y}, 0).index_select(0, index);
  }
  hp = at::cat({h.unsqueeze(0), y.narrow(0, 0, lay.T - 1)}, 0);
  if (lay.has_resets()) hp.masked_fill_(lay.resets.unsqueeze(-1), 0);
  return hp;
}

}  // namespace fusedgru
