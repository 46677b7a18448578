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

}  // namespace fusedgru

TORCH_LIBRARY(fusedgru, m) {
  m.def(
      "gru_fwd(Tensor x, Tensor? h0, Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh, "
      "bool reset_after) -> (Tensor, Tensor)");
  m.def(
      "gru_bwd(Tensor grad_y, Tensor x, Tensor? h0, Tensor w_ih, Tensor w_hh, Tensor y, "
      "Tensor ws, bool reset_after) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("_set_poison(bool enable) -> bool", &fusedgru::set_poison);
}

// `import fusedgru._C` loads the library (and so runs the registrations above); the module
// itself is empty.  A JIT build loads the same code with torch.ops.load_library instead.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&def);
}
