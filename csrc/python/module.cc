// fusedlstm._core: registration only. Each concern's bindings live in their own file
// (bindings.h); the argument checks they share live in checks.h.
#include <pybind11/pybind11.h>

#include "bindings.h"

PYBIND11_MODULE(_core, m) {
  m.doc() = "Compiled fused LSTM kernels (use the fusedlstm package, not this module).";
  fusedlstm::RegisterLstm(m);
  fusedlstm::RegisterOptim(m);
  fusedlstm::RegisterRuntime(m);
  fusedlstm::RegisterCuda(m);
  fusedlstm::RegisterPrepared(m);
}
