// The FMA peak probe of peak.h. Compiled with FMA contraction on, like gemm.cc: acc * a + b must
// be one FMA, as in the micro-kernel it stands for.
#include "peak.h"

#include <chrono>
#include <cstdint>

namespace fusedlstm {

double FmaPeakFlopsOneThread(double seconds) {
  typedef float V __attribute__((vector_size(64)));  // the micro-kernel's vector (gemm.cc)
  constexpr int kLanes = 64 / sizeof(float);
  constexpr int kAcc = 16;  // independent chains: enough to hide FMA latency
  V acc[kAcc];
  for (int i = 0; i < kAcc; ++i) acc[i] = V{} + 1e-3f * static_cast<float>(i);
  const V a = V{} + 0.999999f, b = V{} + 1e-7f;
  const int64_t chunk = 1 << 20;
  int64_t iters = 0;
  const auto start = std::chrono::steady_clock::now();
  double elapsed = 0;
  do {
    for (int64_t k = 0; k < chunk; ++k) {
      // Dependent FMA chains: without fast-math the compiler can neither fold nor skip them.
      for (int i = 0; i < kAcc; ++i) acc[i] = acc[i] * a + b;
    }
    iters += chunk;
    elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  } while (elapsed < seconds);
  float sink = 0;  // the result is used, so the loop is not dead code
  for (int i = 0; i < kAcc; ++i) sink += acc[i][0];
  volatile float keep = sink;
  (void)keep;
  return 2.0 * kLanes * kAcc * double(iters) / elapsed;
}

}  // namespace fusedlstm
