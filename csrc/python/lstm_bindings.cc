// fusedlstm._core.forward / backward: the CPU kernels on NumPy arrays. Every array is checked
// (checks.h), outputs and the opaque cache allocated here, and the kernel runs with the GIL
// released.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#include "bindings.h"
#include "cache.h"
#include "checks.h"
#include "fusedlstm/device.h"
#include "fusedlstm/lstm.h"

namespace fusedlstm {
namespace {

template <typename S>
S* MutablePtr(py::array_t<S>& a) {
  return a.mutable_data();
}

// A CPU training cache (cache.h): a NumPy buffer, possibly a prefix of a recycled spare. Python
// sees the buffer (to recycle it once consumed) but never passes it to a backward by itself.
class Cache {
 public:
  Cache(py::array buffer, const LstmShape& s, bool is_double, const int32_t* lengths)
      : buffer_(std::move(buffer)), info_(s, is_double, lengths) {}
  const CacheInfo& info() const { return info_; }
  bool used() const { return buffer_.is_none(); }
  int64_t nbytes() const {
    return used() ? 0 : static_cast<int64_t>(py::reinterpret_borrow<py::array>(buffer_).nbytes());
  }
  const py::object& buffer() const { return buffer_; }
  // The buffer, checked against the shape and dtype it was written for, as the kernel's pointer.
  template <typename S>
  S* Data() const {
    if (used()) throw py::value_error("cache: already used by a backward (good for one)");
    const py::array a = py::reinterpret_borrow<py::array>(buffer_);
    CheckedPtr<S>(a, "cache", {CacheSize(info_.shape())});
    return WritableData<S>(a, "cache");
  }
  // Consumed: the buffer is handed back (kept alive while the kernel runs) and no second
  // backward can take it.
  py::object Take() {
    py::object b = buffer_;
    buffer_ = py::none();
    return b;
  }

 private:
  py::object buffer_;
  CacheInfo info_;
};

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
  py::array_t<S> workspace =
      training ? py::array_t<S>(std::vector<int64_t>{ForwardWorkspaceSize(s, true)})
               : ReuseOrAllocate<S>(spare, ForwardWorkspaceSize(s, false));
  py::object cache = py::none();
  args.h_n = MutablePtr(h_n);
  args.c_n = MutablePtr(c_n);
  args.workspace = MutablePtr(workspace);
  if (training) {
    py::array_t<S> c = ReuseOrAllocate<S>(spare, CacheSize(s));
    args.cache = MutablePtr(c);
    auto owner = std::make_shared<Cache>(c, s, std::is_same<S, double>::value, args.lengths);
    args.lengths = owner->info().lengths();  // the forward runs on the copy the backward sees
    cache = py::cast(owner);
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
py::tuple Backward(Cache& cache, const py::object& d_outputs, const py::object& d_h_n,
                   const py::object& d_c_n, bool need_dx) {
  const LstmShape s = cache.info().shape();
  const int64_t G = 4 * s.H;
  BackwardArgs<S> args;
  args.cache = cache.Data<S>();
  args.lengths = cache.info().lengths();
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
  const py::object buffer = cache.Take();  // consumed: the kernel overwrites it
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
         const py::object& lengths, bool training, const py::object& spare, bool return_sequences) {
        if (IsDtype(x, py::dtype::of<float>()))
          return Forward<float>(x, kernel, rkernel, bias, h0, c0, lengths, training, spare,
                                return_sequences);
        if (IsDtype(x, py::dtype::of<double>()))
          return Forward<double>(x, kernel, rkernel, bias, h0, c0, lengths, training, spare,
                                 return_sequences);
        throw py::type_error("x: dtype must be float32 or float64, got " +
                             std::string(py::str(x.dtype())));
      },
      py::arg("x"), py::arg("kernel"), py::arg("recurrent_kernel"), py::arg("bias"), py::arg("h0"),
      py::arg("c0"), py::arg("lengths"), py::arg("training"), py::arg("spare") = py::none(),
      py::arg("return_sequences") = true);
  py::class_<Cache, std::shared_ptr<Cache>> cache(
      m, "Cache",
      "A training forward's cache: what backward reads, with its shape, dtype and lengths.");
  DefCacheProperties(cache);
  cache.def_property_readonly(
      "buffer", &Cache::buffer,
      "the memory (a NumPy array; backward overwrites it), or None once used");
  m.def(
      "backward",
      [](Cache& cache, const py::object& d_outputs, const py::object& d_h_n,
         const py::object& d_c_n, bool need_dx) {
        if (cache.info().is_double()) {
          return Backward<double>(cache, d_outputs, d_h_n, d_c_n, need_dx);
        }
        return Backward<float>(cache, d_outputs, d_h_n, d_c_n, need_dx);
      },
      py::arg("cache"), py::arg("d_outputs"), py::arg("d_h_n"), py::arg("d_c_n"),
      py::arg("need_dx") = true,
      "Gradients from a training forward's Cache, which it consumes (one backward each).");
}

}  // namespace fusedlstm
