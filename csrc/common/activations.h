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

// Keras 3's hard_sigmoid: relu6(x + 3) / 6 (0 below -3, 1 above 3, linear between).
template <typename Derived>
auto HardSigmoid(const Eigen::ArrayBase<Derived>& x) {
  using S = typename Derived::Scalar;
  return (x + S(3)).cwiseMax(S(0)).cwiseMin(S(6)) / S(6);
}

// Its derivative from y = hard_sigmoid(x): 1/6 strictly inside (0, 1), else 0 (as TensorFlow's
// Relu6Grad passes gradient only strictly inside its range).
template <typename Derived>
auto HardSigmoidGradFromOutput(const Eigen::ArrayBase<Derived>& y) {
  using S = typename Derived::Scalar;
  return ((y > S(0)) && (y < S(1))).template cast<S>() * (S(1) / S(6));
}

// relu(x) = max(x, 0); its derivative from y: 1 where y > 0, else 0.
template <typename Derived>
auto Relu(const Eigen::ArrayBase<Derived>& x) {
  return x.cwiseMax(typename Derived::Scalar(0));
}
template <typename Derived>
auto ReluGradFromOutput(const Eigen::ArrayBase<Derived>& y) {
  using S = typename Derived::Scalar;
  return (y > S(0)).template cast<S>();
}

// A runtime choice of one of the activations above (the lstm.h Activation codes), written into
// `out` (an array of the same size): out = act(x), or out = act'(x) given y = act(x).
template <typename Act, typename X, typename Out>
void ApplyActivation(Act a, const X& x, Out&& out) {
  switch (a) {
    case Act::kTanh:
      out = Tanh(x);
      return;
    case Act::kRelu:
      out = Relu(x);
      return;
    case Act::kLinear:
      out = x;
      return;
    case Act::kSigmoid:
      out = Sigmoid(x);
      return;
    case Act::kHardSigmoid:
      out = HardSigmoid(x);
      return;
  }
}
template <typename Act, typename Y, typename Out>
void ActivationGradFromOutput(Act a, const Y& y, Out&& out) {
  using S = typename Y::Scalar;
  switch (a) {
    case Act::kTanh:
      out = TanhGradFromOutput(y);
      return;
    case Act::kRelu:
      out = ReluGradFromOutput(y);
      return;
    case Act::kLinear:
      out.setConstant(S(1));
      return;
    case Act::kSigmoid:
      out = SigmoidGradFromOutput(y);
      return;
    case Act::kHardSigmoid:
      out = HardSigmoidGradFromOutput(y);
      return;
  }
}

}  // namespace fusedlstm

#endif  // FUSEDLSTM_COMMON_ACTIVATIONS_H_
