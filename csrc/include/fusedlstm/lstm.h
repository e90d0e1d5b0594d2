// THE contract of the fused LSTM kernels, CPU and CUDA: notation, layouts, every pointer's shape
// and direction, aliasing, and what the caller must provide. Every adapter (the pybind11 module,
// the TensorFlow op) is written against this header; fusedlstm/validate.h checks their arguments
// against it. This header has no CUDA includes.
//
// Notation: T time steps, N batch rows, C input features, H hidden units. Gates are ordered
// i, f, c, o (Keras order) in blocks of H columns: z = x_t·W + h_{t-1}·R + b, shape [N, 4H];
//   i = sigmoid(z_i), f = sigmoid(z_f), g = tanh(z_c), o = sigmoid(z_o),
//   c_t = f ⊙ c_{t-1} + i ⊙ g,   h_t = o ⊙ tanh(c_t).
// Lengths: row n is valid at steps t < lengths[n] (0 <= lengths[n] <= T, right padding). At a
// padded step the row's state (h, c) is carried unchanged and its output is zero; h_n and c_n
// are each row's state after its last valid step (h0, c0 for length 0). Data at padded steps
// (x, d_outputs) is never read into any result, even when it is NaN or Inf: dx is zero there and
// d_h0/d_c0 of a length-0 row equal d_h_n/d_c_n exactly.
// Reverse (the backward half of a bidirectional layer): row n runs its valid steps from the
// last to the first, reading x at t = lengths[n]-1, ..., 0, and writes each output at the
// position of the input it consumed (so outputs stay aligned with x; zero past the length);
// h_n, c_n are the state after position 0. Padded positions are as above.
// Outputs may be a strided view: the output of (n, t) starts at outputs + (n·T + t)·out_ld
// (out_ld = H when 0), so two directions can write one [N, T, 2H] array.
//
// All arrays are dense, row-major (C order) and unaligned-safe. Kernels never allocate: the
// caller passes a workspace and, for training, a cache, sized by the functions below. The cache's
// internal layout is the kernel's own business; callers treat it as opaque bytes of Scalar.
#ifndef FUSEDLSTM_LSTM_H_
#define FUSEDLSTM_LSTM_H_

#include <cstdint>

#include "fusedlstm/device.h"

namespace fusedlstm {

// The activations (Keras's names): `activation` for the candidate g and the cell output
// (h = o ⊙ activation(c)), `recurrent_activation` for the gates i, f, o. The defaults are the
// classic LSTM's; hard_sigmoid is Keras 3's relu6(x + 3) / 6. Derivatives of relu and
// hard_sigmoid at their kinks are 0 (TensorFlow's convention).
enum class Activation : int32_t {
  kTanh = 0,
  kRelu = 1,
  kLinear = 2,
  kSigmoid = 3,
  kHardSigmoid = 4
};

// The precision of the products (the GEMMs): float32 (Scalar's own, the default), or bfloat16
// operands with float32 sums, for Scalar = float only. With bfloat16, x, h, the weights and dZ
// are rounded to bfloat16 as they are packed for a product; the gate math, the cell state, the
// outputs and every gradient stay float32 (mixed precision with float32 master weights). The
// CPU kernels need AVX512_BF16 for it (csrc/cpu/gemm_bf16.h says which engine runs).
enum class Precision : int32_t { kFloat32 = 0, kBfloat16 = 1 };

struct LstmShape {
  int64_t T = 0;  // time steps
  int64_t N = 0;  // batch rows
  int64_t C = 0;  // input features
  int64_t H = 0;  // hidden units
};

// Elements of Scalar the forward pass needs as scratch (valid for both modes; contents undefined
// on entry and exit).
int64_t ForwardWorkspaceSize(const LstmShape& s, bool training, bool reverse = false,
                             Precision precision = Precision::kFloat32);
// Elements of Scalar the training cache holds (what backward reads). 0 is never returned for a
// shape with N*T > 0.
int64_t CacheSize(const LstmShape& s);
// Elements of Scalar the backward pass needs as scratch (more with recurrent masks).
int64_t BackwardWorkspaceSize(const LstmShape& s, bool recurrent_masks = false,
                              Precision precision = Precision::kFloat32);

template <typename Scalar>
struct ForwardArgs {
  // Inputs (read only).
  const Scalar* x = nullptr;                 // [N, T, C]
  const Scalar* kernel = nullptr;            // [C, 4H]
  const Scalar* recurrent_kernel = nullptr;  // [H, 4H]
  const Scalar* bias = nullptr;              // [4H], or nullptr for zeros
  const Scalar* h0 = nullptr;                // [N, H], or nullptr for zeros
  const Scalar* c0 = nullptr;                // [N, H], or nullptr for zeros
  const int32_t* lengths = nullptr;          // [N] in [0, T], or nullptr for all T
  // Outputs (fully written).
  Scalar* outputs = nullptr;  // [N, T, H]; zero at padded steps. The CPU kernel
                              // takes nullptr: not written (only the final
                              // state wanted); the CUDA kernels need it.
  Scalar* h_n = nullptr;      // [N, H]
  Scalar* c_n = nullptr;      // [N, H]
  // Scratch: ForwardWorkspaceSize(shape, training) elements.
  Scalar* workspace = nullptr;
  // Training only: CacheSize(shape) elements, fully written; must outlive the matching backward.
  // It keeps its own copies of x, kernel and recurrent_kernel, so the caller may modify or free
  // those after forward returns. nullptr means inference: nothing is stored.
  Scalar* cache = nullptr;
  bool reverse = false;  // run each row's valid steps last to first (see above)
  int64_t out_ld = 0;    // elements from one step's outputs to the next (0: H)
  Activation activation = Activation::kTanh;
  Activation recurrent_activation = Activation::kSigmoid;
  // Training only: [4, N, H], or nullptr. Gate g's recurrent product reads h_{t-1} ⊙ masks[g]
  // (Keras's recurrent dropout: one mask per gate and row, fixed over the steps; the caller
  // draws and scales them). h, c, outputs and h_n stay unmasked. The backward needs the same
  // array. With masks the recurrence runs row-block tasks only (no unit split).
  const Scalar* recurrent_masks = nullptr;
  // [N, T], or nullptr: step t of row n is valid where nonzero (any steps, Keras's masks with
  // holes); given instead of lengths. Invalid steps are as padded ones (state carried, output
  // zero, nothing read); a reverse pass reads positions T-1 ... 0.
  const uint8_t* step_mask = nullptr;
  Precision precision = Precision::kFloat32;  // of the products (workspace sized for it)
};

template <typename Scalar>
struct BackwardArgs {
  // The cache written by a training forward with the same shape and lengths. Backward consumes
  // it: its contents are overwritten (the gate cache becomes the gate gradients), so a cache can
  // be used for exactly one backward.
  Scalar* cache = nullptr;
  const int32_t* lengths = nullptr;  // the same lengths the forward saw, or nullptr
  // Upstream gradients (read only); nullptr means zeros. d_outputs at padded steps is ignored.
  const Scalar* d_outputs = nullptr;  // [N, T, H]
  const Scalar* d_h_n = nullptr;      // [N, H]
  const Scalar* d_c_n = nullptr;      // [N, H]
  // Gradients (fully written, never accumulated into).
  Scalar* dx = nullptr;                  // [N, T, C], or nullptr: not computed (frozen input)
  Scalar* d_kernel = nullptr;            // [C, 4H]
  Scalar* d_recurrent_kernel = nullptr;  // [H, 4H]
  Scalar* d_bias = nullptr;              // [4H]
  Scalar* d_h0 = nullptr;                // [N, H]
  Scalar* d_c0 = nullptr;                // [N, H]
  // Scratch: BackwardWorkspaceSize(shape) elements.
  Scalar* workspace = nullptr;
  bool reverse = false;  // as the forward that wrote the cache ran
  int64_t out_ld = 0;    // d_outputs' step stride (0: H), as ForwardArgs::out_ld
  Activation activation = Activation::kTanh;  // as the forward ran
  Activation recurrent_activation = Activation::kSigmoid;
  const Scalar* recurrent_masks = nullptr;    // the forward's, or nullptr as it had none
  const uint8_t* step_mask = nullptr;         // the forward's
  Precision precision = Precision::kFloat32;  // the forward's (workspace sized for it)
};

// -- CPU kernels (csrc/cpu) -----------------------------------------------------------------
// No output may alias an input or another output. The arguments are trusted: adapters validate
// shapes, lengths and sizes (validate.h) and pointers before calling.
template <typename Scalar>
void LstmForward(const CpuDevice& device, const LstmShape& shape, const ForwardArgs<Scalar>& args);

template <typename Scalar>
void LstmBackward(const CpuDevice& device, const LstmShape& shape,
                  const BackwardArgs<Scalar>& args);

// Two independent passes over one shape (the directions of a bidirectional layer): whether to
// run them at once, each on one thread of one parallel region, rather than one after the other
// with all threads each. True when the device has threads and one pass alone would leave some
// idle (its row blocks are fewer than the threads; on 2 threads always: the two passes have
// equal work, so one per thread is balanced and shares no cache lines). Results are the same
// either way (tasks depend on the shape alone).
bool RunDirectionsConcurrently(const CpuDevice& device, const LstmShape& shape);

// -- CUDA kernels (csrc/cuda; built only with FUSEDLSTM_CUDA=ON) ----------------------------
// The same contract as the CPU kernels: the same shapes, Keras weight layout and gate order,
// lengths semantics, ForwardArgs/BackwardArgs (outputs required, never nullptr) and cache size
// (CacheSize), in elements of Scalar. Every pointer is device memory. The cache is laid out as
// the CPU kernels' but with the weights in Keras order, not interleaved: caches do not cross
// devices. cuBLAS does the input projection over all steps, the per-step recurrent products and
// the hoisted weight/input gradients; one fused elementwise kernel per step does the gates and
// cell update (one more the backward gate pass); the bias gradient is a per-column sequential
// sum (no atomics), so results are bit-reproducible on a given GPU. cuBLAS takes int sizes: a
// shape ValidateCudaSizes (validate.h) refuses throws std::invalid_argument; a failing CUDA or
// cuBLAS call throws std::runtime_error naming it.

// Where the kernels run: a cudaStream_t and a cublasHandle_t bound to it (opaque here).
struct CudaContext {
  void* stream = nullptr;  // cudaStream_t; nullptr is the legacy default stream
  void* cublas = nullptr;  // cublasHandle_t, required
};

// Scratch sizes of the CUDA kernels (elements of Scalar).
int64_t CudaForwardWorkspaceSize(const LstmShape& s, bool training, bool reverse = false);
int64_t CudaBackwardWorkspaceSize(const LstmShape& s, bool recurrent_masks = false);

template <typename Scalar>
void LstmForwardCuda(const CudaContext& ctx, const LstmShape& shape,
                     const ForwardArgs<Scalar>& args);

template <typename Scalar>
void LstmBackwardCuda(const CudaContext& ctx, const LstmShape& shape,
                      const BackwardArgs<Scalar>& args);

}  // namespace fusedlstm

#endif  // FUSEDLSTM_LSTM_H_
