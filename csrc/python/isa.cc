// fusedlstm._isa: does this CPU have the instruction sets the kernels were compiled for?
//
// A build with FUSEDLSTM_NATIVE=ON (the default) is compiled with -march=native. Moved to an
// older CPU (a wheel from pip's cache on a shared home directory, a container image built
// elsewhere), merely loading _core would kill the interpreter with SIGILL. This module is
// compiled for the baseline CPU, without those flags, and the package asks it before it imports
// _core, so such a mismatch becomes an ImportError that says what is missing and how to rebuild.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstring>
#include <string>
#include <vector>

extern "C" const char* const fusedlstm_isa_required[];  // isa_required.cc

namespace py = pybind11;

namespace {

// 1 supported, 0 not, -1 a name this check does not know.
int Supports(const std::string& name) {
#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
#define FUSEDLSTM_ISA(n) \
  if (name == n) return __builtin_cpu_supports(n) ? 1 : 0
  FUSEDLSTM_ISA("sse3");
  FUSEDLSTM_ISA("ssse3");
  FUSEDLSTM_ISA("sse4.1");
  FUSEDLSTM_ISA("sse4.2");
  FUSEDLSTM_ISA("popcnt");
  FUSEDLSTM_ISA("aes");
  FUSEDLSTM_ISA("pclmul");
  FUSEDLSTM_ISA("avx");
  FUSEDLSTM_ISA("avx2");
  FUSEDLSTM_ISA("fma");
  FUSEDLSTM_ISA("bmi");
  FUSEDLSTM_ISA("bmi2");
  FUSEDLSTM_ISA("avx512f");
  FUSEDLSTM_ISA("avx512vl");
  FUSEDLSTM_ISA("avx512bw");
  FUSEDLSTM_ISA("avx512dq");
  FUSEDLSTM_ISA("avx512cd");
  FUSEDLSTM_ISA("avx512vbmi");
  FUSEDLSTM_ISA("avx512ifma");
  FUSEDLSTM_ISA("avx512vnni");
  FUSEDLSTM_ISA("avx512vbmi2");
  FUSEDLSTM_ISA("avx512bitalg");
  FUSEDLSTM_ISA("avx512vpopcntdq");
  FUSEDLSTM_ISA("avx512bf16");
  FUSEDLSTM_ISA("gfni");
  FUSEDLSTM_ISA("vpclmulqdq");
#undef FUSEDLSTM_ISA
#endif
  return -1;
}

std::vector<std::string> Required() {
  std::vector<std::string> out;
  for (const char* const* p = fusedlstm_isa_required; *p != nullptr; ++p) out.emplace_back(*p);
  return out;
}

}  // namespace

PYBIND11_MODULE(_isa, m) {
  m.doc() = "Instruction sets the compiled kernels need, checked against this CPU (no SIMD code).";
  m.def("required", &Required,
        "Instruction-set extensions the kernels were compiled to use (x86; empty elsewhere).");
  m.def(
      "supported",
      [](const std::string& name) -> py::object {
        const int s = Supports(name);
        if (s < 0) return py::none();
        return py::bool_(s == 1);
      },
      py::arg("name"),
      "Whether this CPU has the extension; None for a name this check does not know.");
  m.def(
      "missing",
      []() {
        std::vector<std::string> out;
        for (const auto& n : Required())
          if (Supports(n) == 0) out.push_back(n);
        return out;
      },
      "Required extensions this CPU lacks (empty: _core is safe to load).");
}
