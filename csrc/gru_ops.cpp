// The dispatcher boundary of the extension: the schemas of fusedgru::gru_fwd / gru_bwd
// (one layer, one direction; shapes in gru_common.h and fusedgru/reference.py).  Each
// device registers its kernels with TORCH_LIBRARY_IMPL in its own file (gru_cpu.cpp,
// gru_cuda.cu); fusedgru/extension.py adds the fake kernels for torch.compile.  Autograd
// is not registered here: fusedgru.function.GRULayerFunction is the one autograd boundary.
#include <Python.h>
#include <torch/library.h>

#include <atomic>

#include "gru_common.h"

namespace fusedgru {

static std::atomic<bool> g_poison{false};

bool poison_outputs() { return g_poison.load(std::memory_order_relaxed); }

// Test-only switch (tests/test_extension.py): while on, both ops fill every output with NaN
// before computing it.  Returns the previous setting.
static bool set_poison(bool enable) { return g_poison.exchange(enable); }

static std::atomic<int64_t> g_cuda_path{0};

int cuda_path_mode() { return static_cast<int>(g_cuda_path.load(std::memory_order_relaxed)); }

// Test / benchmark switch: which CUDA kernels gru_fwd / gru_bwd use (0 automatic,
// 1 persistent or error, 2 per-step fallback).  Returns the previous setting.
static int64_t set_cuda_path(int64_t mode) {
  TORCH_CHECK(mode >= 0 && mode <= 2, "fusedgru::_set_cuda_path: mode must be 0, 1 or 2");
  return g_cuda_path.exchange(mode);
}

}  // namespace fusedgru

// batch_sizes / resets: the sequence structure (packed rows without padding, state resets
// inside a sequence); their meaning is in gru_common.h (Layout).
TORCH_LIBRARY(fusedgru, m) {
  m.def(
      "gru_fwd(Tensor x, Tensor? h0, Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh, "
      "bool reset_after, Tensor? batch_sizes=None, Tensor? resets=None) -> (Tensor, Tensor)");
  // Inference (nothing needs a gradient): y only, no (T, B, 4H) ws written to memory.
  m.def(
      "gru_infer(Tensor x, Tensor? h0, Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh, "
      "bool reset_after, Tensor? batch_sizes=None, Tensor? resets=None) -> Tensor");
  // need_dx / need_dw False: dx / the four weight and bias gradients are not computed and
  // come back as empty (0,) tensors (the input / the parameters need no gradient).
  m.def(
      "gru_bwd(Tensor grad_y, Tensor x, Tensor? h0, Tensor w_ih, Tensor w_hh, Tensor y, "
      "Tensor ws, bool reset_after, Tensor? batch_sizes=None, Tensor? resets=None, "
      "bool need_dx=True, bool need_dw=True) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("_set_poison(bool enable) -> bool", &fusedgru::set_poison);
  m.def("_set_cuda_path(int mode) -> int", &fusedgru::set_cuda_path);
  // Which CUDA path gru_fwd (backward=False) or gru_bwd would take for these sizes, and why
  // (CUDA kernel in gru_cuda.cu): the on-chip capacity limit, as the dispatcher sees it.
  m.def("_cuda_plan(Tensor x, Tensor w_hh, bool reset_after, bool backward) -> str");
}

// `import fusedgru._C` loads the library (and so runs the registrations above); the module
// itself is empty.  A JIT build loads the same code with torch.ops.load_library instead.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&def);
}
