// Argument checks shared by every binding of fusedlstm._core: each array's type, dtype,
// contiguity and writeability, checked before its pointer is taken, and the kernels' shapes,
// lengths and sizes through fusedlstm/validate.h (the checks the TensorFlow op makes too), its
// messages raised as ValueError. The friendly argument handling (conversion, defaults, messages
// in the Python API's words) lives in the Python package; these checks are the last line that
// keeps a direct _core call from ever reaching a kernel with a bad pointer.
#ifndef FUSEDLSTM_PYTHON_CHECKS_H_
#define FUSEDLSTM_PYTHON_CHECKS_H_

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "../cpu/gemm_bf16.h"
#include "fusedlstm/device.h"
#include "fusedlstm/lstm.h"
#include "fusedlstm/validate.h"

namespace fusedlstm {
namespace py = pybind11;

// A message from validate.h as a ValueError (nothing when it is empty).
inline void Require(const std::string& error) {
  if (!error.empty()) throw py::value_error(error);
}

inline std::vector<int64_t> Dims(const py::array& a) {
  return std::vector<int64_t>(a.shape(), a.shape() + a.ndim());
}

// Equal dtypes, not only the same object: an unpickled array's dtype is a fresh, equal one.
// Native byte order only (a byte-swapped array's data is not the kernel's numbers).
inline bool IsDtype(const py::array& a, const py::dtype& d) {
  const py::dtype t = a.dtype();
  if (t.is(d)) return true;
  if (t.num() != d.num()) return false;
  const uint16_t probe = 1;
  const char native = *reinterpret_cast<const char*>(&probe) == 1 ? '<' : '>';
  return t.byteorder() == '=' || t.byteorder() == '|' || t.byteorder() == native;
}

inline py::array AsArray(const py::handle& obj, const char* name) {
  if (!py::isinstance<py::array>(obj)) {
    throw py::type_error(std::string(name) + ": expected a numpy array, got " +
                         std::string(py::str(py::type::of(obj).attr("__name__"))));
  }
  return py::reinterpret_borrow<py::array>(obj);
}

// The dimensions of an optional array argument, stored in `dims`; nullptr for None.
inline const std::vector<int64_t>* OptionalDims(const py::object& obj, const char* name,
                                                std::vector<int64_t>* dims) {
  if (obj.is_none()) return nullptr;
  *dims = Dims(AsArray(obj, name));
  return dims;
}

// Checks an array argument: exact dtype, exact shape (rank first), C-contiguous.
template <typename S>
const S* CheckedPtr(const py::handle& obj, const char* name, const std::vector<int64_t>& shape) {
  py::array a = AsArray(obj, name);
  if (!IsDtype(a, py::dtype::of<S>())) {
    throw py::type_error(std::string(name) + ": expected dtype " +
                         std::string(py::str(py::dtype::of<S>())) + ", got " +
                         std::string(py::str(a.dtype())));
  }
  const std::vector<int64_t> dims = Dims(a);
  if (dims.size() != shape.size()) {
    throw py::value_error(std::string(name) + ": expected rank " + std::to_string(shape.size()) +
                          " (shape " + ShapeString(shape) + "), got shape " + ShapeString(dims));
  }
  if (dims != shape) {
    throw py::value_error(std::string(name) + ": expected shape " + ShapeString(shape) + ", got " +
                          ShapeString(dims));
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

// lengths [N] of int32, each in [0, T]; nullptr for None (all T).
inline const int32_t* CheckedLengths(const py::object& obj, const LstmShape& s) {
  if (obj.is_none()) return nullptr;
  const int32_t* p = CheckedPtr<int32_t>(obj, "lengths", {s.N});
  Require(ValidateLengths(p, s));
  return p;
}

// The data of an array the binding writes into (its dtype and shape checked by CheckedPtr).
template <typename S>
S* WritableData(const py::array& a, const char* name) {
  if (!a.writeable()) throw py::value_error(std::string(name) + ": array is read-only");
  return static_cast<S*>(const_cast<void*>(a.data()));
}

// The shape and the checked input pointers of a forward call (outputs not set); the CPU and the
// CUDA bindings read their arguments alike. Shapes first (validate.h), then dtypes and layout.
template <typename S>
LstmShape ReadForward(const py::array& x, const py::array& kernel, const py::array& rkernel,
                      const py::object& bias, const py::object& h0, const py::object& c0,
                      const py::object& lengths, ForwardArgs<S>* args) {
  std::vector<int64_t> bias_dims, h0_dims, c0_dims, len_dims;
  const std::vector<int64_t>* len = OptionalDims(lengths, "lengths", &len_dims);
  LstmShape s;
  Require(ValidateProblem(Dims(x), Dims(rkernel), len, &s));
  Require(ValidateForwardInputs(s, Dims(kernel), OptionalDims(bias, "bias", &bias_dims),
                                OptionalDims(h0, "h0", &h0_dims),
                                OptionalDims(c0, "c0", &c0_dims)));
  Require(ValidateSizes(s));
  const int64_t G = 4 * s.H;
  args->x = CheckedPtr<S>(x, "x", {s.N, s.T, s.C});
  args->kernel = CheckedPtr<S>(kernel, "kernel", {s.C, G});
  args->recurrent_kernel = CheckedPtr<S>(rkernel, "recurrent_kernel", {s.H, G});
  args->bias = OptionalPtr<S>(bias, "bias", {G});
  args->h0 = OptionalPtr<S>(h0, "h0", {s.N, s.H});
  args->c0 = OptionalPtr<S>(c0, "c0", {s.N, s.H});
  args->lengths = CheckedLengths(lengths, s);
  return s;
}

// The checked upstream gradients of a backward call (nullptr for None).
template <typename S>
void ReadUpstream(const LstmShape& s, const py::object& d_outputs, const py::object& d_h_n,
                  const py::object& d_c_n, BackwardArgs<S>* args) {
  std::vector<int64_t> dout_dims, dhn_dims, dcn_dims;
  Require(ValidateUpstream(s, OptionalDims(d_outputs, "d_outputs", &dout_dims),
                           OptionalDims(d_h_n, "d_h_n", &dhn_dims),
                           OptionalDims(d_c_n, "d_c_n", &dcn_dims)));
  args->d_outputs = OptionalPtr<S>(d_outputs, "d_outputs", {s.N, s.T, s.H});
  args->d_h_n = OptionalPtr<S>(d_h_n, "d_h_n", {s.N, s.H});
  args->d_c_n = OptionalPtr<S>(d_c_n, "d_c_n", {s.N, s.H});
}

// An activation code from Python (fusedlstm's name table maps Keras's names to these).
inline Activation ReadActivation(int code, const char* name) {
  if (code < 0 || code > static_cast<int>(Activation::kHardSigmoid)) {
    throw py::value_error(std::string(name) + ": unknown activation code " + std::to_string(code));
  }
  return static_cast<Activation>(code);
}

// The products' precision from its code (0 float32, 1 bfloat16), checked against the arrays'
// dtype and this CPU: bfloat16 computes on float32 arrays, with AVX512_BF16.
template <typename S>
Precision ReadPrecision(int code) {
  if (code == 0) return Precision::kFloat32;
  if (code != 1) throw py::value_error("precision: unknown code " + std::to_string(code));
  if (!std::is_same<S, float>::value) {
    throw py::type_error(
        "precision='bfloat16' computes on float32 arrays (it rounds the products' operands "
        "itself); got float64 (use float32 arrays, or precision='float32')");
  }
  if (Bf16Active() == Bf16Engine::kNone) {
    const std::string missing = *Bf16Missing() ? Bf16Missing()
                                               : "AVX512_BF16 (switched off in this process by "
                                                 "set_bf16_engine('none'))";
    throw std::runtime_error("precision='bfloat16' needs " + missing +
                             "; use precision='float32' on this machine");
  }
  return Precision::kBfloat16;
}

constexpr int64_t kBufferAlign = 64;

// Elements of S to skip from p to the next 64-byte boundary.
template <typename S>
int64_t AlignSkip(const void* p) {
  const int64_t rem = int64_t(reinterpret_cast<uintptr_t>(p) % kBufferAlign);
  return ((kBufferAlign - rem) % kBufferAlign) / int64_t(sizeof(S));
}

// A fresh C-contiguous array whose data starts on a 64-byte boundary: a view of a 1-d owner a
// cache line longer. NumPy's allocator only promises 16 bytes, and the kernels read packed
// panels and scratch rows with 64-byte vector loads: at 16 every other load splits a cache line
// (measured: a B = 1 step took 40% longer).
template <typename S>
py::array_t<S> AlignedEmpty(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  py::array_t<S> raw(std::vector<int64_t>{n + kBufferAlign / int64_t(sizeof(S))});
  S* base = raw.mutable_data();
  std::vector<int64_t> strides(shape.size());
  int64_t stride = sizeof(S);
  for (size_t i = shape.size(); i-- > 0;) {
    strides[i] = stride;
    stride *= shape[i];
  }
  return py::array_t<S>(shape, strides, base + AlignSkip<S>(base), raw);
}

// A caller-provided scratch array when it is big enough (dtype, 1-d, contiguous, writeable):
// `size` elements of it from its first 64-byte boundary, else a fresh one. The Python layer
// recycles big buffers (the owner of what this returned) so a steady training loop does not
// page-fault through a new mmap every call, even when the sequence length changes from batch
// to batch (bucketing).
template <typename S>
py::array_t<S> ReuseOrAllocate(const py::object& spare, int64_t size) {
  if (!spare.is_none() && py::isinstance<py::array_t<S>>(spare)) {
    py::array a = py::reinterpret_borrow<py::array>(spare);
    if (IsDtype(a, py::dtype::of<S>()) && a.ndim() == 1 && (a.flags() & py::array::c_style) &&
        a.writeable()) {
      const int64_t skip = AlignSkip<S>(a.data());
      if (a.shape(0) >= skip + size) {
        return py::reinterpret_borrow<py::array_t<S>>(a[py::slice(skip, skip + size, 1)]);
      }
    }
  }
  return AlignedEmpty<S>({size});
}

// Direction d's state h0[d] of a [2, N, H] array, or None.
inline py::object DirectionState(const py::object& a, int d) {
  return a.is_none() ? py::none() : py::object(a[py::int_(d)]);
}

// Runs f(d, device) for the two directions d = 0, 1: at once, one thread each, or one after the
// other with every thread (RunDirectionsConcurrently decides; the results are the same).
template <typename F>
void RunDirections(const CpuDevice& device, const LstmShape& s, F&& f) {
  if (!RunDirectionsConcurrently(device, s)) {
    f(0, device);
    f(1, device);
    return;
  }
  const CpuDevice one;  // inline: each direction on the thread that claimed it
  ParallelFor(device, 2, kMinParallelFlops, [&](int64_t d) { f(static_cast<int>(d), one); });
}

}  // namespace fusedlstm

#endif  // FUSEDLSTM_PYTHON_CHECKS_H_
