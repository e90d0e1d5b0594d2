// Adam, the dense update and the lazy row update of an embedding table, as one pass over the
// parameters (the NumPy form costs a dozen passes and temporaries per array). The textbook
// update with the bias corrections folded into the step size, as in TensorFlow and PyTorch:
//   m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g²;  p -= lr_t m / (sqrt(v) + eps_t)
// with lr_t = lr sqrt(1 - b2^t) / (1 - b1^t) and eps_t = eps sqrt(1 - b2^t) computed by the
// caller. Arithmetic is in the parameters' precision; the results depend on nothing else.
// Two things a training loop does around every step ride along in the same pass:
//   - gradient clipping by global norm: g is read as grad_scale * g (the caller computed the
//     norm over all arrays first);
//   - Polyak averaging (an exponential moving average of the weights, as Keras' use_ema or
//     tf.train.ExponentialMovingAverage): after p is updated, avg -= (1 - keep) (avg - p).
#ifndef FUSEDLSTM_ADAM_H_
#define FUSEDLSTM_ADAM_H_

#include <cstdint>

namespace fusedlstm {

struct AdamCoefficients {
  double lr_t = 0, eps_t = 0, beta1 = 0, beta2 = 0;
  double grad_scale = 1;    // multiplies every gradient element as it is read
  double average_keep = 0;  // decay of the moving average (used when one is given)
};

// p, g, m, v: n elements each (g read-only). average: n elements or null (no averaging).
template <typename S>
void AdamDense(int64_t n, S* p, const S* g, S* m, S* v, const AdamCoefficients& c,
               S* average = nullptr);

// The rows `rows[0..num_rows)` (distinct, each in range: the caller checks) of the row-major
// tables p, m, v of row length `width`; g holds one gradient row per entry of `rows`. Other rows
// are neither read nor written.
template <typename S>
void AdamRows(int64_t num_rows, int64_t width, const int64_t* rows, const S* g, S* p, S* m, S* v,
              const AdamCoefficients& c);

}  // namespace fusedlstm

#endif  // FUSEDLSTM_ADAM_H_
