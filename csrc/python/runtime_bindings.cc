// fusedlstm._core.set_num_threads / get_num_threads / build_info / fma_peak_gflops: how the
// kernels run and what they were built with.
#include <pybind11/pybind11.h>

#include <Eigen/Core>
#include <atomic>
#include <string>
#include <thread>
#include <vector>

#include "../cpu/peak.h"
#include "bindings.h"
#include "fusedlstm/device.h"

namespace py = pybind11;

namespace fusedlstm {
namespace {

std::atomic<int> g_num_threads{0};  // 0: not set yet, use OpenMP's default

}  // namespace

int NumThreads() {
  const int n = g_num_threads.load();
  return n > 0 ? n : OpenMpDefaultThreads();
}

void RegisterRuntime(py::module_& m) {
  m.def(
      "fma_peak_gflops",
      [](int threads, double seconds) {
        if (threads < 1) throw py::value_error("threads must be >= 1");
        // One probe per thread, all at once (std::thread: each probe must own a core).
        std::vector<double> flops(threads, 0.0);
        {
          py::gil_scoped_release release;
          std::vector<std::thread> pool;
          for (int i = 1; i < threads; ++i) {
            pool.emplace_back([&flops, i, seconds] { flops[i] = FmaPeakFlopsOneThread(seconds); });
          }
          flops[0] = FmaPeakFlopsOneThread(seconds);
          for (auto& th : pool) th.join();
        }
        double total = 0;
        for (double f : flops) total += f;
        return total / 1e9;
      },
      py::arg("threads"), py::arg("seconds") = 0.3,
      "float32 GFLOP/s of a register-only FMA loop on `threads` threads (the machine's ceiling).");
  m.def("set_num_threads", [](int n) {
    if (n < 1) throw py::value_error("set_num_threads: n must be >= 1, got " + std::to_string(n));
    g_num_threads.store(n);
  });
  m.def("get_num_threads", []() { return NumThreads(); });
  m.def("build_info", []() {
    py::dict d;
#if defined(__clang__)
    d["compiler"] = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
    d["compiler"] = std::string("gcc ") + __VERSION__;
#else
    d["compiler"] = "unknown";
#endif
    d["simd"] = std::string(Eigen::SimdInstructionSetsInUse());
    d["native"] = bool(FUSEDLSTM_NATIVE_BUILD);
    d["compile_flags"] = std::string(FUSEDLSTM_COMPILE_FLAGS);
    d["openmp"] = OpenMpEnabled();
    d["num_threads"] = NumThreads();
    d["eigen"] = std::to_string(EIGEN_WORLD_VERSION) + "." + std::to_string(EIGEN_MAJOR_VERSION) +
                 "." + std::to_string(EIGEN_MINOR_VERSION);
#ifdef FUSEDLSTM_WITH_CUDA
    d["cuda"] = true;
#else
    d["cuda"] = false;
#endif
    d["sanitizers"] = std::string(FUSEDLSTM_SANITIZERS);
    return d;
  });
}

}  // namespace fusedlstm
