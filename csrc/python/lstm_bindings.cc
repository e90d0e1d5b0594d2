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
  Cache(py::array buffer, const LstmShape& s, bool is_double, const int32_t* lengths, bool reverse)
      : buffer_(std::move(buffer)), info_(s, is_double, lengths, reverse) {}
  const CacheInfo& info() const { return info_; }
  CacheInfo& mutable_info() { return info_; }
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

// A cache for a training forward (its buffer reused from `spare` when big enough); the args'
// lengths then point at the cache's own copy, which the backward will see.
template <typename S>
py::object NewCache(const LstmShape& s, const py::object& spare, ForwardArgs<S>* args) {
  py::array_t<S> c = ReuseOrAllocate<S>(spare, CacheSize(s));
  args->cache = MutablePtr(c);
  auto owner =
      std::make_shared<Cache>(c, s, std::is_same<S, double>::value, args->lengths, args->reverse);
  args->lengths = owner->info().lengths();
  CacheInfo& info = owner->mutable_info();
  info.set_step_mask(args->step_mask);
  args->step_mask = info.step_mask();
  info.activation = args->activation;
  info.recurrent_activation = args->recurrent_activation;
  info.precision = args->precision;
  if (args->recurrent_masks) {  // a private copy: the caller's array may change before backward
    py::array_t<S> m({int64_t(4), s.N, s.H});
    std::copy(args->recurrent_masks, args->recurrent_masks + 4 * s.N * s.H, MutablePtr(m));
    info.recurrent_masks = m;
    args->recurrent_masks = m.data();
  }
  return py::cast(owner);
}

// Backward workspaces of 1 MiB or more (bfloat16's packed products: dZ for all steps) kept for
// the next backward of the same dtype, so a training loop maps and zeroes those pages once
// rather than every step: slot 0 for a one-direction backward and a bidirectional one's forward
// direction, slot 1 for its reverse. Taken and given back with the GIL held.
constexpr int64_t kKeepWorkspaceBytes = 1 << 20;
template <typename S>
py::object& SpareWorkspace(int slot) {
  static py::object* spare = new py::object[2];  // never destroyed: it may outlive the interpreter
  return spare[slot];
}

// (the workspace to use, the buffer to give back afterwards)
template <typename S>
std::pair<py::array_t<S>, py::object> TakeWorkspace(int64_t size, int slot) {
  py::object spare = SpareWorkspace<S>(slot);
  SpareWorkspace<S>(slot) = py::object();
  if (spare && py::reinterpret_borrow<py::array>(spare).size() >= size) {
    return {ReuseOrAllocate<S>(spare, size), spare};
  }
  py::array_t<S> fresh = AlignedEmpty<S>({size});
  return {fresh, fresh};
}

template <typename S>
void GiveWorkspace(const py::object& buffer, int slot) {
  const py::array a = py::reinterpret_borrow<py::array>(buffer);
  if (a.nbytes() < kKeepWorkspaceBytes) return;
  py::object& kept = SpareWorkspace<S>(slot);
  if (!kept || py::reinterpret_borrow<py::array>(kept).size() <= a.size()) kept = buffer;
}

// Options of a forward call beyond its arrays.
struct ForwardOptions {
  bool training = true, return_sequences = true, reverse = false;
  int activation = 0, recurrent_activation = 3, precision = 0;
  py::object recurrent_masks = py::none();
  py::object step_mask = py::none();
};

template <typename S>
void ReadOptions(const LstmShape& s, const ForwardOptions& o, ForwardArgs<S>* args) {
  args->reverse = o.reverse;
  args->precision = ReadPrecision<S>(o.precision);
  args->activation = ReadActivation(o.activation, "activation");
  args->recurrent_activation = ReadActivation(o.recurrent_activation, "recurrent_activation");
  if (!o.recurrent_masks.is_none()) {
    if (!o.training) {
      throw py::value_error("recurrent_masks: recurrent dropout applies in training only");
    }
    args->recurrent_masks =
        CheckedPtr<S>(o.recurrent_masks.cast<py::array>(), "recurrent_masks", {4, s.N, s.H});
  }
  if (!o.step_mask.is_none()) {
    if (args->lengths) throw py::value_error("mask: give lengths or a mask, not both");
    args->step_mask = CheckedPtr<uint8_t>(o.step_mask, "mask", {s.N, s.T});
  }
}

template <typename S>
py::tuple Forward(const py::array& x, const py::array& kernel, const py::array& rkernel,
                  const py::object& bias, const py::object& h0, const py::object& c0,
                  const py::object& lengths, const py::object& spare, const ForwardOptions& o) {
  const bool training = o.training, return_sequences = o.return_sequences, reverse = o.reverse;
  ForwardArgs<S> args;
  const LstmShape s = ReadForward<S>(x, kernel, rkernel, bias, h0, c0, lengths, &args);
  ReadOptions<S>(s, o, &args);

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
      training ? AlignedEmpty<S>({ForwardWorkspaceSize(s, true, false, args.precision)})
               : ReuseOrAllocate<S>(spare, ForwardWorkspaceSize(s, false, reverse, args.precision));
  py::object cache = py::none();
  args.h_n = MutablePtr(h_n);
  args.c_n = MutablePtr(c_n);
  args.workspace = MutablePtr(workspace);
  if (training) {
    cache = NewCache<S>(s, spare, &args);
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
  args.reverse = cache.info().reverse();
  args.activation = cache.info().activation;
  args.recurrent_activation = cache.info().recurrent_activation;
  args.step_mask = cache.info().step_mask();
  args.precision = cache.info().precision;
  const py::object& masks = cache.info().recurrent_masks;
  if (!masks.is_none())
    args.recurrent_masks = static_cast<const S*>(masks.cast<py::array>().data());
  ReadUpstream<S>(s, d_outputs, d_h_n, d_c_n, &args);
  py::array_t<S> dx(need_dx ? std::vector<int64_t>{s.N, s.T, s.C} : std::vector<int64_t>{0}),
      dk({s.C, G}), dr({s.H, G}), db(std::vector<int64_t>{G}), dh0({s.N, s.H}), dc0({s.N, s.H});
  auto [workspace, give_back] = TakeWorkspace<S>(
      BackwardWorkspaceSize(s, args.recurrent_masks != nullptr, args.precision), 0);
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
  GiveWorkspace<S>(give_back, 0);
  py::object dx_out = need_dx ? py::object(dx) : py::none();
  return py::make_tuple(dx_out, dk, dr, db, dh0, dc0);
}

// Both directions of a bidirectional layer over one x: direction 0 forward, 1 reverse, writing
// one outputs [N, T, 2H] (direction d in columns [d·H, (d+1)·H)) and h_n, c_n [2, N, H].
template <typename S>
py::tuple ForwardBidirectional(const py::array& x, const py::tuple& weights, const py::object& h0,
                               const py::object& c0, const py::object& lengths, bool training,
                               bool return_sequences, int activation, int recurrent_activation,
                               int precision, const py::tuple& spares) {
  if (weights.size() != 6) throw py::value_error("weights: expected 6 arrays (3 per direction)");
  ForwardArgs<S> a[2];
  LstmShape sd[2];
  for (int d = 0; d < 2; ++d) {
    sd[d] = ReadForward<S>(x, weights[3 * d], weights[3 * d + 1], weights[3 * d + 2],
                           DirectionState(h0, d), DirectionState(c0, d), lengths, &a[d]);
  }
  if (sd[0].H != sd[1].H) {
    throw py::value_error("recurrent_kernel: the two directions have " + std::to_string(sd[0].H) +
                          " and " + std::to_string(sd[1].H) + " units; they must be equal");
  }
  const LstmShape s = sd[0];
  py::object outputs = py::none();
  if (return_sequences) {
    py::array_t<S> o({s.N, s.T, 2 * s.H});
    outputs = o;
    for (int d = 0; d < 2; ++d) a[d].outputs = MutablePtr(o) + d * s.H;
  }
  py::array_t<S> h_n({int64_t(2), s.N, s.H}), c_n({int64_t(2), s.N, s.H});
  py::object caches[2] = {py::none(), py::none()};
  std::vector<py::array_t<S>> workspaces;
  // The caller's spare buffers (up to two): the caches in training, the workspaces in inference
  // (handed back in the caches' places, for the caller to recycle).
  auto spare = [&](int d) {
    return d < py::ssize_t(spares.size()) ? py::object(spares[d]) : py::none();
  };
  for (int d = 0; d < 2; ++d) {
    a[d].reverse = d == 1;
    a[d].out_ld = 2 * s.H;
    a[d].activation = ReadActivation(activation, "activation");
    a[d].recurrent_activation = ReadActivation(recurrent_activation, "recurrent_activation");
    a[d].precision = ReadPrecision<S>(precision);
    a[d].h_n = MutablePtr(h_n) + d * s.N * s.H;
    a[d].c_n = MutablePtr(c_n) + d * s.N * s.H;
    const int64_t wsize = ForwardWorkspaceSize(s, training, a[d].reverse, a[d].precision);
    workspaces.push_back(training ? AlignedEmpty<S>({wsize}) : ReuseOrAllocate<S>(spare(d), wsize));
    a[d].workspace = MutablePtr(workspaces.back());
    caches[d] = training ? NewCache<S>(s, spare(d), &a[d]) : py::object(workspaces.back());
  }
  {
    py::gil_scoped_release release;
    RunDirections(OpenMpDevice(NumThreads()), s,
                  [&](int d, const CpuDevice& device) { LstmForward<S>(device, s, a[d]); });
  }
  return py::make_tuple(outputs, h_n, c_n, caches[0], caches[1]);
}

template <typename S>
py::tuple BackwardBidirectional(Cache& forward, Cache& backward, const py::object& d_outputs,
                                const py::object& d_h_n, const py::object& d_c_n, bool need_dx) {
  const LstmShape s = forward.info().shape();
  const LstmShape sb = backward.info().shape();
  if (forward.info().reverse() || !backward.info().reverse() || sb.N != s.N || sb.T != s.T ||
      sb.C != s.C || sb.H != s.H || backward.info().is_double() != forward.info().is_double()) {
    throw py::value_error("caches: not the two directions of one bidirectional forward");
  }
  const int64_t G = 4 * s.H;
  const S* dout = OptionalPtr<S>(d_outputs, "d_outputs", {s.N, s.T, 2 * s.H});
  const S* dhn = OptionalPtr<S>(d_h_n, "d_h_n", {2, s.N, s.H});
  const S* dcn = OptionalPtr<S>(d_c_n, "d_c_n", {2, s.N, s.H});
  Cache* caches[2] = {&forward, &backward};
  BackwardArgs<S> a[2];
  std::vector<py::array_t<S>> keep;  // every array the kernels write
  auto array = [&](std::vector<int64_t> dims) {
    keep.emplace_back(dims);
    return MutablePtr(keep.back());
  };
  py::array_t<S> dh0({int64_t(2), s.N, s.H}), dc0({int64_t(2), s.N, s.H});
  py::object give_back[2];
  for (int d = 0; d < 2; ++d) {
    a[d].cache = caches[d]->Data<S>();
    a[d].lengths = caches[d]->info().lengths();
    a[d].reverse = d == 1;
    a[d].activation = caches[d]->info().activation;
    a[d].recurrent_activation = caches[d]->info().recurrent_activation;
    a[d].precision = caches[d]->info().precision;
    a[d].out_ld = 2 * s.H;
    a[d].d_outputs = dout ? dout + d * s.H : nullptr;
    a[d].d_h_n = dhn ? dhn + d * s.N * s.H : nullptr;
    a[d].d_c_n = dcn ? dcn + d * s.N * s.H : nullptr;
    a[d].dx = need_dx ? array({s.N, s.T, s.C}) : nullptr;
    a[d].d_kernel = array({s.C, G});
    a[d].d_recurrent_kernel = array({s.H, G});
    a[d].d_bias = array({G});
    a[d].d_h0 = MutablePtr(dh0) + d * s.N * s.H;
    a[d].d_c0 = MutablePtr(dc0) + d * s.N * s.H;
    auto [workspace, owner] = TakeWorkspace<S>(BackwardWorkspaceSize(s, false, a[d].precision), d);
    a[d].workspace = MutablePtr(workspace);
    give_back[d] = owner;
  }
  const py::object buffers[2] = {forward.Take(), backward.Take()};  // consumed
  {
    py::gil_scoped_release release;
    const CpuDevice device = OpenMpDevice(NumThreads());
    RunDirections(device, s, [&](int d, const CpuDevice& dev) { LstmBackward<S>(dev, s, a[d]); });
    if (need_dx) {  // dx = dx_forward + dx_reverse, row by row
      ParallelFor(device, s.N, double(s.N) * s.T * s.C, [&](int64_t n) {
        const int64_t m = s.T * s.C;
        S* out = a[0].dx + n * m;
        const S* add = a[1].dx + n * m;
        for (int64_t i = 0; i < m; ++i) out[i] += add[i];
      });
    }
  }
  for (int d = 0; d < 2; ++d) GiveWorkspace<S>(give_back[d], d);
  py::object dx = need_dx ? py::object(keep[0]) : py::none();
  const size_t per = need_dx ? 4 : 3;  // arrays kept per direction
  const size_t g0 = need_dx ? 1 : 0;
  return py::make_tuple(dx, keep[g0], keep[g0 + 1], keep[g0 + 2], keep[per + g0],
                        keep[per + g0 + 1], keep[per + g0 + 2], dh0, dc0);
}

}  // namespace

void RegisterLstm(py::module_& m) {
  m.def(
      "forward",
      [](const py::array& x, const py::array& kernel, const py::array& rkernel,
         const py::object& bias, const py::object& h0, const py::object& c0,
         const py::object& lengths, bool training, const py::object& spare, bool return_sequences,
         bool reverse, int activation, int recurrent_activation, const py::object& recurrent_masks,
         const py::object& mask, int precision) {
        ForwardOptions o;
        o.precision = precision;
        o.training = training;
        o.return_sequences = return_sequences;
        o.reverse = reverse;
        o.activation = activation;
        o.recurrent_activation = recurrent_activation;
        o.recurrent_masks = recurrent_masks;
        o.step_mask = mask;
        if (IsDtype(x, py::dtype::of<float>()))
          return Forward<float>(x, kernel, rkernel, bias, h0, c0, lengths, spare, o);
        if (IsDtype(x, py::dtype::of<double>()))
          return Forward<double>(x, kernel, rkernel, bias, h0, c0, lengths, spare, o);
        throw py::type_error("x: dtype must be float32 or float64, got " +
                             std::string(py::str(x.dtype())));
      },
      py::arg("x"), py::arg("kernel"), py::arg("recurrent_kernel"), py::arg("bias"), py::arg("h0"),
      py::arg("c0"), py::arg("lengths"), py::arg("training"), py::arg("spare") = py::none(),
      py::arg("return_sequences") = true, py::arg("reverse") = false, py::arg("activation") = 0,
      py::arg("recurrent_activation") = 3, py::arg("recurrent_masks") = py::none(),
      py::arg("mask") = py::none(), py::arg("precision") = 0);
  m.def(
      "forward_bidirectional",
      [](const py::array& x, const py::tuple& weights, const py::object& h0, const py::object& c0,
         const py::object& lengths, bool training, bool return_sequences, int activation,
         int recurrent_activation, int precision, const py::tuple& spares) {
        if (IsDtype(x, py::dtype::of<float>()))
          return ForwardBidirectional<float>(x, weights, h0, c0, lengths, training,
                                             return_sequences, activation, recurrent_activation,
                                             precision, spares);
        if (IsDtype(x, py::dtype::of<double>()))
          return ForwardBidirectional<double>(x, weights, h0, c0, lengths, training,
                                              return_sequences, activation, recurrent_activation,
                                              precision, spares);
        throw py::type_error("x: dtype must be float32 or float64, got " +
                             std::string(py::str(x.dtype())));
      },
      py::arg("x"), py::arg("weights"), py::arg("h0"), py::arg("c0"), py::arg("lengths"),
      py::arg("training"), py::arg("return_sequences") = true, py::arg("activation") = 0,
      py::arg("recurrent_activation") = 3, py::arg("precision") = 0,
      py::arg("spares") = py::tuple(),
      "(outputs [N, T, 2H] or None, h_n [2, N, H], c_n [2, N, H], cache_forward, "
      "cache_reverse); weights: (kernel, recurrent_kernel, bias) of each direction.");
  m.def(
      "backward_bidirectional",
      [](Cache& forward, Cache& backward, const py::object& d_outputs, const py::object& d_h_n,
         const py::object& d_c_n, bool need_dx) {
        if (forward.info().is_double()) {
          return BackwardBidirectional<double>(forward, backward, d_outputs, d_h_n, d_c_n, need_dx);
        }
        return BackwardBidirectional<float>(forward, backward, d_outputs, d_h_n, d_c_n, need_dx);
      },
      py::arg("forward"), py::arg("backward"), py::arg("d_outputs"), py::arg("d_h_n"),
      py::arg("d_c_n"), py::arg("need_dx") = true,
      "(dx summed over directions or None, dk, dr, db of each direction, dh0 [2, N, H], "
      "dc0 [2, N, H]); consumes both caches.");
  m.def(
      "release_workspaces",
      []() {
        for (int slot = 0; slot < 2; ++slot) {
          SpareWorkspace<float>(slot) = py::object();
          SpareWorkspace<double>(slot) = py::object();
        }
      },
      "Free the backward workspaces kept for reuse (fusedlstm.empty_cache calls it).");
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
