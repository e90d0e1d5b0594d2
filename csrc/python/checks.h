// Argument checks shared by every binding of fusedlstm._core: each array's dtype, rank, shape,
// contiguity and writeability, checked before its pointer is taken. The friendly argument
// handling (conversion, defaults, messages naming user arguments) lives in the Python package;
// these checks are the last line that keeps a direct _core call from ever reaching a kernel with
// a bad pointer.
#ifndef FUSEDLSTM_PYTHON_CHECKS_H_
#define FUSEDLSTM_PYTHON_CHECKS_H_

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <sstream>
#include <string>
#include <vector>

#include "fusedlstm/lstm.h"

namespace fusedlstm {
namespace py = pybind11;

inline std::string ShapeStr(const std::vector<int64_t>& dims) {
  std::ostringstream os;
  os << "(";
  for (size_t i = 0; i < dims.size(); ++i) os << (i ? ", " : "") << dims[i];
  if (dims.size() == 1) os << ",";
  os << ")";
  return os.str();
}

inline std::vector<int64_t> Dims(const py::array& a) {
  return std::vector<int64_t>(a.shape(), a.shape() + a.ndim());
}

inline bool IsDtype(const py::array& a, const py::dtype& d) { return a.dtype().is(d); }

// Checks an array argument: exact dtype, C-contiguous, exact shape. Rank first, then dimensions.
template <typename S>
const S* CheckedPtr(const py::handle& obj, const char* name, const std::vector<int64_t>& shape) {
  if (!py::isinstance<py::array>(obj)) {
    throw py::type_error(std::string(name) + ": expected a numpy array");
  }
  py::array a = py::reinterpret_borrow<py::array>(obj);
  if (!py::isinstance<py::array_t<S>>(a) || !a.dtype().is(py::dtype::of<S>())) {
    throw py::type_error(std::string(name) + ": expected dtype " +
                         std::string(py::str(py::dtype::of<S>())) + ", got " +
                         std::string(py::str(a.dtype())));
  }
  if (a.ndim() != static_cast<py::ssize_t>(shape.size())) {
    throw py::value_error(std::string(name) + ": expected " + std::to_string(shape.size()) +
                          "-d array of shape " + ShapeStr(shape) + ", got shape " +
                          ShapeStr(Dims(a)));
  }
  if (Dims(a) != shape) {
    throw py::value_error(std::string(name) + ": expected shape " + ShapeStr(shape) + ", got " +
                          ShapeStr(Dims(a)));
  }
  if (!(a.flags() & py::array::c_style)) {
    throw py::value_error(std::string(name) + ": array must be C-contiguous");
  }
  return static_cast<const S*>(a.data());
}

template <typename S>
const S* OptionalPtr(const py::object& obj, const char* name, const std::vector<int64_t>& shape) {
  return obj.is_none() ? nullptr : CheckedPtr<S>(obj, name, shape);
}

inline const int32_t* CheckedLengths(const py::object& obj, int64_t N, int64_t T) {
  if (obj.is_none()) return nullptr;
  const int32_t* p = CheckedPtr<int32_t>(obj, "lengths", {N});
  for (int64_t n = 0; n < N; ++n) {
    if (p[n] < 0 || p[n] > T) {
      throw py::value_error("lengths[" + std::to_string(n) + "] = " + std::to_string(p[n]) +
                            " is outside [0, T=" + std::to_string(T) + "]");
    }
  }
  return p;
}

// The data of an array the binding writes into (its dtype and shape checked by CheckedPtr).
template <typename S>
S* WritableData(const py::array& a, const char* name) {
  if (!a.writeable()) throw py::value_error(std::string(name) + ": array is read-only");
  return static_cast<S*>(const_cast<void*>(a.data()));
}

// The shape and the checked input pointers of a forward call (outputs not set); the CPU and the
// CUDA bindings read their arguments alike.
template <typename S>
LstmShape ReadForward(const py::array& x, const py::array& kernel, const py::array& rkernel,
                      const py::object& bias, const py::object& h0, const py::object& c0,
                      const py::object& lengths, ForwardArgs<S>* args) {
  if (x.ndim() != 3) throw py::value_error("x: expected a 3-d array [B, T, E], got shape " + ShapeStr(Dims(x)));
  if (rkernel.ndim() != 2) throw py::value_error("recurrent_kernel: expected a 2-d array [H, 4H], got shape " + ShapeStr(Dims(rkernel)));
  LstmShape s;
  s.N = x.shape(0);
  s.T = x.shape(1);
  s.C = x.shape(2);
  s.H = rkernel.shape(0);
  const int64_t G = 4 * s.H;
  args->x = CheckedPtr<S>(x, "x", {s.N, s.T, s.C});
  args->kernel = CheckedPtr<S>(kernel, "kernel", {s.C, G});
  args->recurrent_kernel = CheckedPtr<S>(rkernel, "recurrent_kernel", {s.H, G});
  args->bias = OptionalPtr<S>(bias, "bias", {G});
  args->h0 = OptionalPtr<S>(h0, "h0", {s.N, s.H});
  args->c0 = OptionalPtr<S>(c0, "c0", {s.N, s.H});
  args->lengths = CheckedLengths(lengths, s.N, s.T);
  return s;
}

// The shape of a backward call from (T, N, C, H).
inline LstmShape ReadShapeTNCH(const std::vector<int64_t>& shape_tnch) {
  if (shape_tnch.size() != 4) throw py::value_error("shape: expected (T, N, C, H)");
  LstmShape s;
  s.T = shape_tnch[0];
  s.N = shape_tnch[1];
  s.C = shape_tnch[2];
  s.H = shape_tnch[3];
  if (s.T < 0 || s.N < 0 || s.C < 0 || s.H < 0) throw py::value_error("shape: negative dimension");
  return s;
}

}  // namespace fusedlstm

#endif  // FUSEDLSTM_PYTHON_CHECKS_H_
