// The inference contract: weights prepared (packed) once, then any number of forward passes
// that store nothing for a backward. Notation, gate order, lengths and the meaning of every
// array are those of lstm.h; this header adds only what differs.
//
// PrepareWeights copies kernel [C, 4H], recurrent_kernel [H, 4H] and bias [4H] (nullptr: zeros)
// into `prepared`, in the layouts LstmInfer reads (packed panels for the per-step products), so
// a caller that keeps `prepared` pays for packing once instead of at every call. The buffer is
// read only by LstmInfer and may be shared by concurrent calls.
//
// LstmInfer gives the results of LstmForward with cache == nullptr (which calls it), bit for
// bit, and the same for any thread count. Streaming: a sequence split into chunks, each call
// starting from the previous one's h_n and c_n, gives the results of one call over the whole
// sequence bit for bit (no step's arithmetic depends on T).
#ifndef FUSEDLSTM_LSTM_INFER_H_
#define FUSEDLSTM_LSTM_INFER_H_

#include <cstdint>

#include "fusedlstm/device.h"
#include "fusedlstm/lstm.h"

namespace fusedlstm {

// Elements of Scalar in a prepared-weights buffer for C input features and H units. Weights
// prepared for bfloat16 products (Scalar = float) are packed as bfloat16; LstmInfer must be
// called with the precision they were prepared for.
template <typename Scalar>
int64_t PreparedWeightsSize(int64_t C, int64_t H, Precision precision = Precision::kFloat32);

template <typename Scalar>
void PrepareWeights(const CpuDevice& device, int64_t C, int64_t H, const Scalar* kernel,
                    const Scalar* recurrent_kernel, const Scalar* bias, Scalar* prepared,
                    Precision precision = Precision::kFloat32);

// Elements of Scalar LstmInfer needs as scratch.
template <typename Scalar>
int64_t InferWorkspaceSize(const LstmShape& s, bool reverse = false,
                           Precision precision = Precision::kFloat32);

template <typename Scalar>
struct InferArgs {
  const Scalar* x = nullptr;         // [N, T, C]
  const Scalar* prepared = nullptr;  // PrepareWeights's output for this C and H, or nullptr:
  // float products on the Keras-layout weights read in place (no packing, for calls too small
  // to repay it), all three given (bias [4H] not null):
  const Scalar* kernel = nullptr;            // [C, 4H]
  const Scalar* recurrent_kernel = nullptr;  // [H, 4H]
  const Scalar* bias = nullptr;              // [4H]
  const Scalar* h0 = nullptr;                // [N, H], or nullptr for zeros
  const Scalar* c0 = nullptr;                // [N, H], or nullptr for zeros
  const int32_t* lengths = nullptr;          // [N] in [0, T], or nullptr for all T
  Scalar* outputs = nullptr;    // [N, T, H] (zero at padded steps), or nullptr: not written
  Scalar* h_n = nullptr;        // [N, H]
  Scalar* c_n = nullptr;        // [N, H]
  Scalar* workspace = nullptr;  // InferWorkspaceSize(shape, reverse, precision) elements
  bool reverse = false;         // as ForwardArgs::reverse
  int64_t out_ld = 0;           // as ForwardArgs::out_ld
  Activation activation = Activation::kTanh;  // as ForwardArgs
  Activation recurrent_activation = Activation::kSigmoid;
  const uint8_t* step_mask = nullptr;         // as ForwardArgs::step_mask
  Precision precision = Precision::kFloat32;  // the one the weights were prepared for
};

// No output may alias an input or another output; arguments are trusted (adapters validate).
template <typename Scalar>
void LstmInfer(const CpuDevice& device, const LstmShape& shape, const InferArgs<Scalar>& args);

}  // namespace fusedlstm

#endif  // FUSEDLSTM_LSTM_INFER_H_
