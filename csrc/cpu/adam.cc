// One-pass Adam (see fusedlstm/adam.h). Compiled with -fno-math-errno so the square root
// vectorizes; that flag changes no result.
#include "fusedlstm/adam.h"

#include <cmath>

namespace fusedlstm {
namespace {

template <typename S>
struct Step {
  S b1, ob1, b2, ob2, lr, eps, scale;
  explicit Step(const AdamCoefficients& c)
      : b1(S(c.beta1)),
        ob1(S(1 - c.beta1)),
        b2(S(c.beta2)),
        ob2(S(1 - c.beta2)),
        lr(S(c.lr_t)),
        eps(S(c.eps_t)),
        scale(S(c.grad_scale)) {}
};

// The gradient is scaled and the average kept only when asked: a plain step stays
// bit-identical to the textbook update (not multiplied by 1), and pays for neither.
template <typename S, bool kScaled, bool kAveraged>
inline void Update(int64_t n, S* p, const S* g, S* m, S* v, S* avg, S rate, const Step<S>& s) {
  for (int64_t i = 0; i < n; ++i) {
    const S gi = kScaled ? g[i] * s.scale : g[i];
    const S mi = s.b1 * m[i] + s.ob1 * gi;
    const S vi = s.b2 * v[i] + s.ob2 * (gi * gi);
    m[i] = mi;
    v[i] = vi;
    const S pi = p[i] - s.lr * mi / (std::sqrt(vi) + s.eps);
    p[i] = pi;
    if (kAveraged) avg[i] -= rate * (avg[i] - pi);
  }
}

template <typename S>
void Dispatch(int64_t n, S* p, const S* g, S* m, S* v, const AdamCoefficients& c, S* avg) {
  const Step<S> s(c);
  const S rate = S(1 - c.average_keep);
  const bool scaled = c.grad_scale != 1;
  if (avg != nullptr) {
    if (scaled)
      Update<S, true, true>(n, p, g, m, v, avg, rate, s);
    else
      Update<S, false, true>(n, p, g, m, v, avg, rate, s);
  } else if (scaled) {
    Update<S, true, false>(n, p, g, m, v, avg, rate, s);
  } else {
    Update<S, false, false>(n, p, g, m, v, avg, rate, s);
  }
}

}  // namespace

template <typename S>
void AdamDense(int64_t n, S* p, const S* g, S* m, S* v, const AdamCoefficients& c, S* average) {
  // One thread: two measured no faster on this update (91K parameters at SST-2's shape).
  Dispatch<S>(n, p, g, m, v, c, average);
}

template <typename S>
void AdamRows(int64_t num_rows, int64_t width, const int64_t* rows, const S* g, S* p, S* m, S* v,
              const AdamCoefficients& c) {
  for (int64_t r = 0; r < num_rows; ++r) {
    const int64_t off = rows[r] * width;
    Dispatch<S>(width, p + off, g + r * width, m + off, v + off, c, nullptr);
  }
}

template void AdamDense<float>(int64_t, float*, const float*, float*, float*,
                               const AdamCoefficients&, float*);
template void AdamDense<double>(int64_t, double*, const double*, double*, double*,
                                const AdamCoefficients&, double*);
template void AdamRows<float>(int64_t, int64_t, const int64_t*, const float*, float*, float*,
                              float*, const AdamCoefficients&);
template void AdamRows<double>(int64_t, int64_t, const int64_t*, const double*, double*, double*,
                               double*, const AdamCoefficients&);

}  // namespace fusedlstm
