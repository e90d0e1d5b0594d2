// fusedlstm._core.set_num_threads / get_num_threads / build_info / fma_peak_gflops and the
// bfloat16 engine's state and probes: how the kernels run and what they were built with.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <Eigen/Core>
#include <algorithm>
#include <atomic>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "../cpu/gemm_bf16.h"
#include "../cpu/peak.h"
#include "bindings.h"
#include "fusedlstm/device.h"

namespace py = pybind11;

namespace fusedlstm {
namespace {

std::atomic<int> g_num_threads{0};  // 0: not set yet, use OpenMP's default

// Sum over `threads` probes run at once (std::thread: each probe must own a core), in GFLOP/s.
double PeakGflops(int threads, double seconds, double (*probe)(double)) {
  if (threads < 1) throw py::value_error("threads must be >= 1");
  std::vector<double> flops(threads, 0.0);
  {
    py::gil_scoped_release release;
    std::vector<std::thread> pool;
    for (int i = 1; i < threads; ++i) {
      pool.emplace_back([&flops, i, seconds, probe] { flops[i] = probe(seconds); });
    }
    flops[0] = probe(seconds);
    for (auto& th : pool) th.join();
  }
  double total = 0;
  for (double f : flops) total += f;
  return total / 1e9;
}

const char* EngineName(Bf16Engine e) {
  switch (e) {
    case Bf16Engine::kAmx:
      return "amx";
    case Bf16Engine::kAvx512:
      return "avx512_bf16";
    default:
      return "none";
  }
}

using FArray = py::array_t<float, py::array::c_style | py::array::forcecast>;

void RegisterBf16(py::module_& m) {
  m.def(
      "bf16_engine", []() { return std::string(EngineName(Bf16Active())); },
      "The bfloat16 engine the kernels use: 'amx', 'avx512_bf16' or 'none'.");
  m.def("bf16_available", []() { return std::string(EngineName(Bf16Available())); });
  m.def(
      "bf16_missing", []() { return std::string(Bf16Missing()); },
      "What the CPU lacks for bfloat16 compute ('' when it has it).");
  m.def(
      "set_bf16_engine",
      [](const std::string& name) {
        Bf16Engine e = Bf16Engine::kNone;
        if (name == "amx") {
          e = Bf16Engine::kAmx;
        } else if (name == "avx512_bf16") {
          e = Bf16Engine::kAvx512;
        } else if (name == "auto") {
          e = Bf16Available();
        } else if (name != "none") {
          throw py::value_error(
              "set_bf16_engine: engine must be 'amx', 'avx512_bf16', 'none' "
              "or 'auto', got '" +
              name + "'");
        }
        if (!SetBf16Engine(e)) {
          throw py::value_error("set_bf16_engine: '" + name + "' is not available on this CPU (" +
                                EngineName(Bf16Available()) + " is the best it has)");
        }
      },
      py::arg("engine"), "Choose the bfloat16 engine (tests and benchmarks compare them).");
  m.def(
      "bf16_peak_gflops",
      [](int threads, double seconds, const std::string& unit) {
        if (unit == "avx512_bf16") return PeakGflops(threads, seconds, Bf16DotPeakFlopsOneThread);
        if (unit == "amx") return PeakGflops(threads, seconds, AmxPeakFlopsOneThread);
        throw py::value_error("bf16_peak_gflops: unit must be 'avx512_bf16' or 'amx'");
      },
      py::arg("threads"), py::arg("seconds") = 0.3, py::arg("unit") = "avx512_bf16",
      "GFLOP/s of a register-only bfloat16 dot loop (0 where the CPU lacks the unit).");
  m.def(
      "round_bf16",
      [](FArray x) {
        FArray out(x.request().shape);
        const float* src = x.data();
        float* dst = out.mutable_data();
        for (py::ssize_t i = 0; i < x.size(); ++i) {
          const uint32_t u = uint32_t(FloatToBf16(src[i])) << 16;
          std::memcpy(dst + i, &u, 4);
        }
        return out;
      },
      py::arg("x"), "x rounded to bfloat16 as the kernels round it, as float32.");
  m.def(
      "gemm_bf16",
      [](FArray a, FArray b, bool a_transposed, bool b_transposed) {
        if (Bf16Active() == Bf16Engine::kNone) {
          throw std::runtime_error(std::string("gemm_bf16: bfloat16 compute needs ") +
                                   Bf16Missing());
        }
        if (a.ndim() != 2 || b.ndim() != 2) throw py::value_error("gemm_bf16: 2-D arrays only");
        // a is [M, K] (transposed: stored [K, M]); b is [K, N] (transposed: stored [N, K]).
        const int64_t M = a_transposed ? a.shape(1) : a.shape(0);
        const int64_t K = a_transposed ? a.shape(0) : a.shape(1);
        const int64_t Kb = b_transposed ? b.shape(1) : b.shape(0);
        const int64_t N = b_transposed ? b.shape(0) : b.shape(1);
        if (K != Kb) throw py::value_error("gemm_bf16: inner dimensions differ");
        const int64_t ars = a_transposed ? 1 : K, acs = a_transposed ? M : 1;
        const int64_t brs = b_transposed ? 1 : N, bcs = b_transposed ? K : 1;
        std::vector<uint16_t> packed(PackedRhsBf16Size(K, N));
        FArray c({M, N});
        std::fill(c.mutable_data(), c.mutable_data() + M * N, 0.0f);
        {
          py::gil_scoped_release release;
          PackRhsBf16(b.data(), brs, bcs, K, N, 0, N, packed.data());
          GemmBf16(Bf16Active(), M, N, K, 0, N, a.data(), ars, acs, packed.data(), c.mutable_data(),
                   N, true);
        }
        return c;
      },
      py::arg("a"), py::arg("b"), py::arg("a_transposed") = false, py::arg("b_transposed") = false,
      "A·B with bfloat16 operands (tests).");
}

}  // namespace

int NumThreads() {
  const int n = g_num_threads.load();
  return n > 0 ? n : OpenMpDefaultThreads();
}

void RegisterRuntime(py::module_& m) {
  RegisterBf16(m);
  m.def(
      "fma_peak_gflops",
      [](int threads, double seconds) {
        return PeakGflops(threads, seconds, FmaPeakFlopsOneThread);
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
