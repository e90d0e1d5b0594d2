// fusedlstm._core.forward / backward: the CPU kernels on NumPy arrays. Every array is checked
// (checks.h), outputs and the opaque cache allocated here, and the kernel runs with the GIL
// released.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <string>
#include <vector>

#include "bindings.h"
#include "checks.h"
#include "fusedlstm/device.h"
#include "fusedlstm/lstm.h"

namespace fusedlstm {
namespace {

template <typename S>
S* MutablePtr(py::array_t<S>& a) {
  return a.mutable_data();
}

template <typename S>
py::tuple Forward(const py::array& x, const py::array& kernel, const py::array& rkernel,
                  const py::object& bias, const py::object& h0, const py::object& c0,
                  const py::object& lengths, bool training, const py::object& spare,
                  bool return_sequences) {
  ForwardArgs<S> args;
  const LstmShape s = ReadForward<S>(x, kernel, rkernel, bias, h0, c0, lengths, &args);

  py::array_t<S> h_n({s.N, s.H}), c_n({s.N, s.H});
  // Without return_sequences the kernel writes no outputs and None stands in their place.
  py::object outputs = py::none();
  if (return_sequences) {
    py::array_t<S> o({s.N, s.T, s.H});
    args.outputs = MutablePtr(o);
    outputs = o;
  }
  // The spare (if any) serves as the cache in training, as the (large) workspace in inference.
  py::array_t<S> workspace = training
      ? py::array_t<S>(std::vector<int64_t>{ForwardWorkspaceSize(s, true)})
      : ReuseOrAllocate<S>(spare, ForwardWorkspaceSize(s, false));
  py::object cache = py::none();
  args.h_n = MutablePtr(h_n);
  args.c_n = MutablePtr(c_n);
  args.workspace = MutablePtr(workspace);
  if (training) {
    py::array_t<S> c = ReuseOrAllocate<S>(spare, CacheSize(s));
    args.cache = MutablePtr(c);
    cache = c;
  } else {
    cache = workspace;  // handed back so the caller can recycle it
  }
  {
    py::gil_scoped_release release;
    LstmForward<S>(OpenMpDevice(NumThreads()), s, args);
  }
  return py::make_tuple(outputs, h_n, c_n, cache);
}

template <typename S>
py::tuple Backward(const py::array& cache, const std::vector<int64_t>& shape_tnch,
                   const py::object& lengths, const py::object& d_outputs,
                   const py::object& d_h_n, const py::object& d_c_n, bool need_dx) {
  const LstmShape s = ReadShapeTNCH(shape_tnch);
  const int64_t G = 4 * s.H;
  BackwardArgs<S> args;
  if (!cache.writeable()) throw py::value_error("cache: must be writeable");
  args.cache = const_cast<S*>(CheckedPtr<S>(cache, "cache", {CacheSize(s)}));
  args.lengths = CheckedLengths(lengths, s);
  ReadUpstream<S>(s, d_outputs, d_h_n, d_c_n, &args);
  py::array_t<S> dx(need_dx ? std::vector<int64_t>{s.N, s.T, s.C} : std::vector<int64_t>{0}),
      dk({s.C, G}), dr({s.H, G}), db(std::vector<int64_t>{G}), dh0({s.N, s.H}), dc0({s.N, s.H});
  py::array_t<S> workspace(std::vector<int64_t>{BackwardWorkspaceSize(s)});
  args.dx = need_dx ? MutablePtr(dx) : nullptr;
  args.d_kernel = MutablePtr(dk);
  args.d_recurrent_kernel = MutablePtr(dr);
  args.d_bias = MutablePtr(db);
  args.d_h0 = MutablePtr(dh0);
  args.d_c0 = MutablePtr(dc0);
  args.workspace = MutablePtr(workspace);
  {
    py::gil_scoped_release release;
    LstmBackward<S>(OpenMpDevice(NumThreads()), s, args);
  }
  py::object dx_out = need_dx ? py::object(dx) : py::none();
  return py::make_tuple(dx_out, dk, dr, db, dh0, dc0);
}

}  // namespace

void RegisterLstm(py::module_& m) {
  m.def(
      "forward",
      [](const py::array& x, const py::array& kernel, const py::array& rkernel,
         const py::object& bias, const py::object& h0, const py::object& c0,
         const py::object& lengths, bool training, const py::object& spare,
         bool return_sequences) {
        if (IsDtype(x, py::dtype::of<float>()))
          return Forward<float>(x, kernel, rkernel, bias, h0, c0, lengths, training, spare,
                                return_sequences);
        if (IsDtype(x, py::dtype::of<double>()))
          return Forward<double>(x, kernel, rkernel, bias, h0, c0, lengths, training, spare,
                                 return_sequences);
        throw py::type_error("x: dtype must be float32 or float64, got " +
                             std::string(py::str(x.dtype())));
      },
      py::arg("x"), py::arg("kernel"), py::arg("recurrent_kernel"), py::arg("bias"),
      py::arg("h0"), py::arg("c0"), py::arg("lengths"), py::arg("training"),
      py::arg("spare") = py::none(), py::arg("return_sequences") = true);
  m.def(
      "backward",
      [](const py::array& cache, const std::vector<int64_t>& shape, const py::object& lengths,
         const py::object& d_outputs, const py::object& d_h_n, const py::object& d_c_n,
         bool need_dx) {
        if (IsDtype(cache, py::dtype::of<float>()))
          return Backward<float>(cache, shape, lengths, d_outputs, d_h_n, d_c_n, need_dx);
        if (IsDtype(cache, py::dtype::of<double>()))
          return Backward<double>(cache, shape, lengths, d_outputs, d_h_n, d_c_n, need_dx);
        throw py::type_error("cache: dtype must be float32 or float64");
      },
      py::arg("cache"), py::arg("shape"), py::arg("lengths"), py::arg("d_outputs"),
      py::arg("d_h_n"), py::arg("d_c_n"), py::arg("need_dx") = true);
}

}  // namespace fusedlstm
