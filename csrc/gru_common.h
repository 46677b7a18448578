// Shared by the CPU (gru_cpu.cpp) and CUDA (gru_cuda.cu) implementations of
//   fusedgru::gru_fwd / fusedgru::gru_bwd   (schemas in gru_ops.cpp).
//
// Dimension legend: T timesteps, B batch, I input features, H hidden units, G = 3 gates
// stacked r (reset), z (update), n (new).  The semantics are those of
// fusedgru/reference.py gru_layer_forward / gru_layer_backward, line for line.
#pragma once

#include <ATen/ATen.h>

#include <limits>

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

// Checks the forward's inputs (also the backward's: same names, same rules).
inline Dims check_inputs(const char* op, const at::Tensor& x, const std::optional<at::Tensor>& h0,
                         const at::Tensor& w_ih, const at::Tensor& w_hh,
                         const std::optional<at::Tensor>& b_ih,
                         const std::optional<at::Tensor>& b_hh) {
  TORCH_CHECK(x.dim() == 3, op, ": x must be (T, B, I), got ", x.dim(), " dimensions");
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), op, ": x must be floating point, got ",
              x.scalar_type());
  TORCH_CHECK(w_hh.dim() == 2 && w_hh.size(1) > 0 && w_hh.size(0) == 3 * w_hh.size(1), op,
              ": w_hh must be (3H, H) with H >= 1, got ", w_hh.sizes());
  Dims d{x.size(0), x.size(1), x.size(2), w_hh.size(1)};
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

inline void check_backward_extra(const char* op, const Dims& d, const at::Tensor& x,
                                 const at::Tensor& grad_y, const at::Tensor& y,
                                 const at::Tensor& ws) {
  check_same(op, grad_y, "grad_y", x);
  check_shape(op, grad_y, "grad_y", {d.T, d.B, d.H});
  check_same(op, y, "y", x);
  check_shape(op, y, "y", {d.T, d.B, d.H});
  check_same(op, ws, "ws", x);
  check_shape(op, ws, "ws", {d.T, d.B, 4 * d.H});
}

// After the reverse-time loop (SPEC section 4): every remaining gradient is ONE GEMM or sum
// over all T*B rows.  dgi, dgh: (T, B, 3H) (the same tensor when reset_after=False);
// hprev: (T, B, H) the state entering each step.  Returns (dx, dw_ih, dw_hh, db_ih, db_hh).
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> weight_grads(
    const at::Tensor& dgi, const at::Tensor& dgh, const at::Tensor& x, const at::Tensor& w_ih,
    const at::Tensor& hprev, const at::Tensor& ws, bool reset_after) {
  const int64_t T = x.size(0), B = x.size(1), I = x.size(2), H = hprev.size(2);
  const at::Tensor dgi2 = dgi.view({T * B, 3 * H}), dgh2 = dgh.view({T * B, 3 * H});
  const at::Tensor x2 = x.view({T * B, I}), hp2 = hprev.reshape({T * B, H});
  at::Tensor dx = at::mm(dgi2, w_ih).view({T, B, I});
  at::Tensor dw_ih = at::mm(dgi2.t(), x2);
  at::Tensor dw_hh;
  if (reset_after) {
    dw_hh = at::mm(dgh2.t(), hp2);
  } else {
    // Rows r, z multiply h; rows n multiply r * h.
    dw_hh = at::empty({3 * H, H}, x.options());
    at::Tensor top = dw_hh.narrow(0, 0, 2 * H), bottom = dw_hh.narrow(0, 2 * H, H);
    at::mm_out(top, dgh2.narrow(1, 0, 2 * H).t(), hp2);
    const at::Tensor rh = ws.view({T * B, 4 * H}).narrow(1, 0, H) * hp2;
    at::mm_out(bottom, dgh2.narrow(1, 2 * H, H).t(), rh);
  }
  at::Tensor db_hh = dgh2.sum(0);
  at::Tensor db_ih = reset_after ? dgi2.sum(0) : db_hh.clone();
  return {dx, dw_ih, dw_hh, db_ih, db_hh};
}

// The state entering each step: (T, B, H) = [h0 (zeros if absent), y[0], ..., y[T-2]].
inline at::Tensor states_before(const std::optional<at::Tensor>& h0, const at::Tensor& y) {
  const int64_t T = y.size(0), B = y.size(1), H = y.size(2);
  const at::Tensor h = h0.has_value() ? *h0 : at::zeros({B, H}, y.options());
  if (T == 0) return at::empty({0, B, H}, y.options());
  return at::cat({h.unsqueeze(0), y.narrow(0, 0, T - 1)}, 0);
}

}  // namespace fusedgru
