// The pieces of the fusedlstm._core module: each Register* adds one concern's functions and
// classes to it, and module.cc calls them all. Names seen from Python are fixed by these files.
#ifndef FUSEDLSTM_PYTHON_BINDINGS_H_
#define FUSEDLSTM_PYTHON_BINDINGS_H_

#include <pybind11/pybind11.h>

namespace fusedlstm {

// forward, backward (lstm_bindings.cc).
void RegisterLstm(pybind11::module_& m);
// forward_cuda, backward_cuda, cuda_device_count (cuda_bindings.cc; only the device count
// without a CUDA build).
void RegisterCuda(pybind11::module_& m);
// adam_dense, adam_rows, embedding_row_grads (optim_bindings.cc).
void RegisterOptim(pybind11::module_& m);
// set_num_threads, get_num_threads, build_info, fma_peak_gflops (runtime_bindings.cc).
void RegisterRuntime(pybind11::module_& m);
// prepare and the Prepared class: inference on weights packed once (prepared_bindings.cc).
void RegisterPrepared(pybind11::module_& m);

// Threads the kernels run on: set_num_threads's value, else OpenMP's default.
int NumThreads();

}  // namespace fusedlstm

#endif  // FUSEDLSTM_PYTHON_BINDINGS_H_
