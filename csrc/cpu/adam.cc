// One-pass Adam (see fusedlstm/adam.h). Compiled with -fno-math-errno so the square root
// vectorizes; that flag changes no result.
#include "fusedlstm/adam.h"

#include <cmath>

namespace fusedlstm {
namespace {

template <typename S>
inline void Update(int64_t n, S* p, const S* g, S* m,
                   S* v, S b1, S ob1, S b2, S ob2, S lr, S eps) {
  for (int64_t i = 0; i < n; ++i) {
    const S gi = g[i];
    const S mi = b1 * m[i] + ob1 * gi;
    const S vi = b2 * v[i] + ob2 * (gi * gi);
    m[i] = mi;
    v[i] = vi;
    p[i] -= lr * mi / (std::sqrt(vi) + eps);
  }
}

}  // namespace

template <typename S>
void AdamDense(int64_t n, S* p, const S* g, S* m, S* v, const AdamCoefficients& c) {
  Update<S>(n, p, g, m, v, S(c.beta1), S(1 - c.beta1), S(c.beta2), S(1 - c.beta2), S(c.lr_t),
            S(c.eps_t));
}

template <typename S>
void AdamRows(int64_t num_rows, int64_t width, const int64_t* rows, const S* g, S* p, S* m, S* v,
              const AdamCoefficients& c) {
  for (int64_t r = 0; r < num_rows; ++r) {
    const int64_t off = rows[r] * width;
    Update<S>(width, p + off, g + r * width, m + off, v + off, S(c.beta1), S(1 - c.beta1),
              S(c.beta2), S(1 - c.beta2), S(c.lr_t), S(c.eps_t));
  }
}

template void AdamDense<float>(int64_t, float*, const float*, float*, float*, const AdamCoefficients&);
template void AdamDense<double>(int64_t, double*, const double*, double*, double*, const AdamCoefficients&);
template void AdamRows<float>(int64_t, int64_t, const int64_t*, const float*, float*, float*, float*,
                              const AdamCoefficients&);
template void AdamRows<double>(int64_t, int64_t, const int64_t*, const double*, double*, double*,
                               double*, const AdamCoefficients&);

}  // namespace fusedlstm
