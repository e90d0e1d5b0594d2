// The CUDA kernels behind the same contract as the CPU ones (lstm.h): the same shapes, Keras
// weight layout and gate order, lengths semantics (padded steps carry the state, output zero and
// are never read into any result), the same ForwardArgs/BackwardArgs, and the same cache and
// cache size (CacheSize), in elements of Scalar. Every pointer is device memory. cuBLAS does the input projection over all steps, the
// per-step recurrent products and the hoisted weight/input gradients; one fused elementwise
// kernel per step does the gates and cell update (one more the backward gate pass); the bias
// gradient is a per-column sequential sum (no atomics), so results are bit-reproducible on a
// given GPU. Built only with FUSEDLSTM_CUDA=ON; this header has no CUDA includes.
#ifndef FUSEDLSTM_LSTM_CUDA_H_
#define FUSEDLSTM_LSTM_CUDA_H_

#include <cstdint>

#include "fusedlstm/lstm.h"

namespace fusedlstm {

// Where the kernels run: a cudaStream_t and a cublasHandle_t bound to it (opaque here).
struct CudaContext {
  void* stream = nullptr;  // cudaStream_t; nullptr is the legacy default stream
  void* cublas = nullptr;  // cublasHandle_t, required
};

// Scratch sizes of the CUDA kernels (elements of Scalar). The cache is CacheSize(shape), laid out
// as the CPU kernels' (weights in Keras order here, not interleaved: caches do not cross devices).
int64_t CudaForwardWorkspaceSize(const LstmShape& s, bool training);
int64_t CudaBackwardWorkspaceSize(const LstmShape& s);

// Throw std::runtime_error naming the failing CUDA/cuBLAS call.
template <typename Scalar>
void LstmForwardCuda(const CudaContext& ctx, const LstmShape& shape, const ForwardArgs<Scalar>& args);

template <typename Scalar>
void LstmBackwardCuda(const CudaContext& ctx, const LstmShape& shape,
                      const BackwardArgs<Scalar>& args);

}  // namespace fusedlstm

#endif  // FUSEDLSTM_LSTM_CUDA_H_
