// Gate nonlinearities and their derivatives, written once for every backend. They operate on
// Eigen array expressions (CPU) and are plain formulas a CUDA kernel can mirror. The derivatives
// are expressed through the activation's own output (the form BPTT uses: the cache holds
// activated gates, not pre-activations).
#ifndef FUSEDLSTM_COMMON_ACTIVATIONS_H_
#define FUSEDLSTM_COMMON_ACTIVATIONS_H_

#include <Eigen/Core>
#include <limits>

namespace fusedlstm {

// sigmoid(x) = 1 / (1 + exp(-x)); Eigen's logistic never overflows (float: rational fit on
// [-9, 15.7], exp(x) below -9; double: exp(-x) saturates to inf and the quotient to 0).
// logistic(-inf) must be exactly 0, so that a gradient through it (0 · inf) is NaN as in the
// NumPy reference. Eigen's AVX and AVX-512 paths give 0; its SSE-only float path (the portable
// build) gives a denormal, so only there the -inf lanes are set apart. (The select is not
// vectorized: on the AVX-512 build it made an inference call 1.5-1.8x slower.)
template <typename Derived>
auto Sigmoid(const Eigen::ArrayBase<Derived>& x) {
#if defined(EIGEN_VECTORIZE_AVX)
  return x.logistic();
#else
  using S = typename Derived::Scalar;
  return (x == -std::numeric_limits<S>::infinity()).select(S(0), x.logistic());
#endif
}

template <typename Derived>
auto Tanh(const Eigen::ArrayBase<Derived>& x) {
  return x.tanh();
}

// d sigmoid / dx written with y = sigmoid(x).
template <typename Derived>
auto SigmoidGradFromOutput(const Eigen::ArrayBase<Derived>& y) {
  return y * (typename Derived::Scalar(1) - y);
}

// d tanh / dx written with y = tanh(x).
template <typename Derived>
auto TanhGradFromOutput(const Eigen::ArrayBase<Derived>& y) {
  return typename Derived::Scalar(1) - y.square();
}

}  // namespace fusedlstm

#endif  // FUSEDLSTM_COMMON_ACTIVATIONS_H_
