// fusedlstm._core.prepare and the Prepared class: weights packed once (lstm_infer.h), then
// inference calls on them. The packed buffer is private to the object, so no caller can hand
// the kernel a buffer that does not match its C and H; it is only read, so any number of
// threads may call infer at once (each call has its own workspace).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "bindings.h"
#include "checks.h"
#include "fusedlstm/device.h"
#include "fusedlstm/lstm_infer.h"

namespace fusedlstm {
namespace {

struct Acts {
  Activation act, rec;
};

class Prepared {
 public:
  Prepared(py::array buffer, int64_t C, int64_t H, bool is_double, Precision precision)
      : buffer_(std::move(buffer)), C_(C), H_(H), is_double_(is_double), precision_(precision) {}

  int64_t input_size() const { return C_; }
  int64_t units() const { return H_; }
  py::dtype dtype() const { return is_double_ ? py::dtype::of<double>() : py::dtype::of<float>(); }
  int64_t nbytes() const { return static_cast<int64_t>(buffer_.nbytes()); }
  const char* precision() const {
    return precision_ == Precision::kBfloat16 ? "bfloat16" : "float32";
  }

  py::tuple Infer(const py::array& x, const py::object& h0, const py::object& c0,
                  const py::object& lengths, bool return_sequences, const py::object& spare,
                  bool reverse, int activation, int recurrent_activation,
                  const py::object& mask) const {
    const Acts acts{ReadActivation(activation, "activation"),
                    ReadActivation(recurrent_activation, "recurrent_activation")};
    return is_double_
               ? Run<double>(x, h0, c0, lengths, return_sequences, spare, reverse, acts, mask)
               : Run<float>(x, h0, c0, lengths, return_sequences, spare, reverse, acts, mask);
  }

  // Whether another Prepared was packed from weights of the same shape, dtype and precision.
  bool Matches(const Prepared& o) const {
    return C_ == o.C_ && H_ == o.H_ && is_double_ == o.is_double_ && precision_ == o.precision_;
  }
  bool is_double() const { return is_double_; }

  // Validates x, the states (h0/c0 one direction's [N, H] each) and lengths or mask against the
  // packed weights and fills args' inputs; outputs, states out and workspace are the caller's.
  template <typename S>
  LstmShape ReadInputs(const py::array& x, const py::object& h0, const py::object& c0,
                       const py::object& lengths, bool reverse, Acts acts, const py::object& mask,
                       InferArgs<S>* args) const {
    const int64_t G = 4 * H_;
    std::vector<int64_t> h0_dims, c0_dims, len_dims;
    LstmShape s;
    Require(ValidateProblem(Dims(x), {H_, G}, OptionalDims(lengths, "lengths", &len_dims), &s));
    if (s.C != C_) {
      throw py::value_error("x: expected shape (N, T, " + std::to_string(C_) +
                            ") for weights prepared with kernel " + ShapeString({C_, G}) +
                            ", got " + ShapeString(Dims(x)));
    }
    Require(ValidateForwardInputs(s, {C_, G}, nullptr, OptionalDims(h0, "h0", &h0_dims),
                                  OptionalDims(c0, "c0", &c0_dims)));
    Require(ValidateSizes(s));
    args->x = CheckedPtr<S>(x, "x", {s.N, s.T, s.C});
    args->h0 = OptionalPtr<S>(h0, "h0", {s.N, s.H});
    args->c0 = OptionalPtr<S>(c0, "c0", {s.N, s.H});
    args->lengths = CheckedLengths(lengths, s);
    args->prepared = static_cast<const S*>(buffer_.data());
    args->precision = precision_;
    args->reverse = reverse;
    if (!mask.is_none()) {
      if (args->lengths) throw py::value_error("mask: give lengths or a mask, not both");
      args->step_mask = CheckedPtr<uint8_t>(mask, "mask", {s.N, s.T});
    }
    args->activation = acts.act;
    args->recurrent_activation = acts.rec;
    return s;
  }

 private:
  template <typename S>
  py::tuple Run(const py::array& x, const py::object& h0, const py::object& c0,
                const py::object& lengths, bool return_sequences, const py::object& spare,
                bool reverse, Acts acts, const py::object& mask) const {
    InferArgs<S> args;
    const LstmShape s = ReadInputs<S>(x, h0, c0, lengths, reverse, acts, mask, &args);
    py::array_t<S> h_n({s.N, s.H}), c_n({s.N, s.H});
    py::object outputs = py::none();
    if (return_sequences) {
      py::array_t<S> o({s.N, s.T, s.H});
      args.outputs = o.mutable_data();
      outputs = o;
    }
    py::array_t<S> workspace =
        ReuseOrAllocate<S>(spare, InferWorkspaceSize<S>(s, reverse, precision_));
    args.h_n = h_n.mutable_data();
    args.c_n = c_n.mutable_data();
    args.workspace = workspace.mutable_data();
    {
      py::gil_scoped_release release;
      LstmInfer<S>(OpenMpDevice(NumThreads()), s, args);
    }
    return py::make_tuple(outputs, h_n, c_n, workspace);
  }

  py::array buffer_;
  int64_t C_, H_;
  bool is_double_;
  Precision precision_;
};

// Both directions of a bidirectional layer in one call: `forward` over x, `backward` over each
// row's valid steps last to first, their outputs side by side in one [N, T, 2H] array (no
// concatenation) and the states as [2, N, H]; the directions run at once, a thread each, when
// that keeps the threads busier (RunDirections). h0/c0: [2, N, H] or None; spares: up to two
// recycled workspaces, handed back (used) after the states.
template <typename S>
py::tuple RunBidirectional(const Prepared& forward, const Prepared& backward, const py::array& x,
                           const py::object& h0, const py::object& c0, const py::object& lengths,
                           bool return_sequences, const py::tuple& spares, Acts acts,
                           const py::object& mask) {
  const Prepared* p[2] = {&forward, &backward};
  InferArgs<S> a[2];
  LstmShape s;
  for (const char* name : {"h0", "c0"}) {  // [2, N, H]: one [N, H] slice per direction
    const py::object& st = name[0] == 'h' ? h0 : c0;
    if (st.is_none()) continue;
    const std::vector<int64_t> dims = Dims(py::array(st));
    if (dims.size() != 3 || dims[0] != 2) {
      throw py::value_error(std::string(name) + ": expected shape (2, N, H), got " +
                            ShapeString(dims));
    }
  }
  for (int d = 0; d < 2; ++d) {
    s = p[d]->ReadInputs<S>(x, DirectionState(h0, d), DirectionState(c0, d), lengths, d == 1, acts,
                            mask, &a[d]);
  }
  py::object outputs = py::none();
  if (return_sequences) {
    py::array_t<S> o({s.N, s.T, 2 * s.H});
    outputs = o;
    for (int d = 0; d < 2; ++d) {
      a[d].outputs = o.mutable_data() + d * s.H;
      a[d].out_ld = 2 * s.H;
    }
  }
  py::array_t<S> h_n({int64_t(2), s.N, s.H}), c_n({int64_t(2), s.N, s.H});
  // Directions run one after the other share one workspace (the second finds it in cache).
  const CpuDevice device = OpenMpDevice(NumThreads());
  const int n_work = RunDirectionsConcurrently(device, s) ? 2 : 1;
  const int64_t size = std::max(InferWorkspaceSize<S>(s, false, a[0].precision),
                                InferWorkspaceSize<S>(s, true, a[1].precision));
  py::object work[2] = {py::none(), py::none()};
  for (int d = 0; d < 2; ++d) {
    if (d < n_work) {
      const py::object spare = d < py::ssize_t(spares.size()) ? py::object(spares[d]) : py::none();
      py::array_t<S> w = ReuseOrAllocate<S>(spare, size);
      a[d].workspace = w.mutable_data();
      work[d] = w;
    } else {
      a[d].workspace = a[0].workspace;
    }
    a[d].h_n = h_n.mutable_data() + d * s.N * s.H;
    a[d].c_n = c_n.mutable_data() + d * s.N * s.H;
  }
  {
    py::gil_scoped_release release;
    RunDirections(device, s, [&](int d, const CpuDevice& dev) { LstmInfer<S>(dev, s, a[d]); });
  }
  return py::make_tuple(outputs, h_n, c_n, work[0], work[1]);
}

py::tuple InferBidirectional(const Prepared& forward, const Prepared& backward, const py::array& x,
                             const py::object& h0, const py::object& c0, const py::object& lengths,
                             bool return_sequences, const py::tuple& spares, int activation,
                             int recurrent_activation, const py::object& mask) {
  if (!forward.Matches(backward)) {
    throw py::value_error(
        "backward: the two directions must be prepared from weights of one shape, dtype and "
        "precision; got kernels " +
        ShapeString({forward.input_size(), 4 * forward.units()}) + " (" + forward.precision() +
        ") and " + ShapeString({backward.input_size(), 4 * backward.units()}) + " (" +
        backward.precision() + ")");
  }
  const Acts acts{ReadActivation(activation, "activation"),
                  ReadActivation(recurrent_activation, "recurrent_activation")};
  return forward.is_double() ? RunBidirectional<double>(forward, backward, x, h0, c0, lengths,
                                                        return_sequences, spares, acts, mask)
                             : RunBidirectional<float>(forward, backward, x, h0, c0, lengths,
                                                       return_sequences, spares, acts, mask);
}

template <typename S>
Prepared Prepare(const py::array& kernel, const py::array& rkernel, const py::object& bias,
                 int precision_code) {
  const Precision precision = ReadPrecision<S>(precision_code);
  const std::vector<int64_t> r = Dims(rkernel), k = Dims(kernel);
  if (r.size() != 2 || r[1] != 4 * r[0]) {
    throw py::value_error("recurrent_kernel: expected shape (H, 4H), got " + ShapeString(r));
  }
  const int64_t H = r[0], G = 4 * H;
  if (k.size() != 2 || k[1] != G) {
    throw py::value_error("kernel: expected shape (C, " + std::to_string(G) + "), got " +
                          ShapeString(k));
  }
  const int64_t C = k[0];
  LstmShape s;
  s.T = 1;
  s.N = 1;
  s.C = C;
  s.H = H;
  Require(ValidateSizes(s));
  const S* kp = CheckedPtr<S>(kernel, "kernel", {C, G});
  const S* rp = CheckedPtr<S>(rkernel, "recurrent_kernel", {H, G});
  const S* bp = OptionalPtr<S>(bias, "bias", {G});
  py::array_t<S> buffer = AlignedEmpty<S>({PreparedWeightsSize<S>(C, H, precision)});
  S* out = buffer.mutable_data();
  {
    py::gil_scoped_release release;
    PrepareWeights<S>(OpenMpDevice(NumThreads()), C, H, kp, rp, bp, out, precision);
  }
  return Prepared(buffer, C, H, std::is_same<S, double>::value, precision);
}

}  // namespace

void RegisterPrepared(py::module_& m) {
  py::class_<Prepared>(m, "Prepared")
      .def_property_readonly("input_size", &Prepared::input_size)
      .def_property_readonly("units", &Prepared::units)
      .def_property_readonly("dtype", &Prepared::dtype)
      .def_property_readonly("nbytes", &Prepared::nbytes)
      .def_property_readonly("precision", &Prepared::precision)
      .def("infer", &Prepared::Infer, py::arg("x"), py::arg("h0") = py::none(),
           py::arg("c0") = py::none(), py::arg("lengths") = py::none(),
           py::arg("return_sequences") = true, py::arg("spare") = py::none(),
           py::arg("reverse") = false, py::arg("activation") = 0,
           py::arg("recurrent_activation") = 3, py::arg("mask") = py::none());
  m.def("infer_bidirectional", &InferBidirectional, py::arg("forward"), py::arg("backward"),
        py::arg("x"), py::arg("h0") = py::none(), py::arg("c0") = py::none(),
        py::arg("lengths") = py::none(), py::arg("return_sequences") = true,
        py::arg("spares") = py::tuple(), py::arg("activation") = 0,
        py::arg("recurrent_activation") = 3, py::arg("mask") = py::none());
  m.def(
      "prepare",
      [](const py::array& kernel, const py::array& rkernel, const py::object& bias, int precision) {
        if (IsDtype(kernel, py::dtype::of<double>())) {
          return Prepare<double>(kernel, rkernel, bias, precision);
        }
        return Prepare<float>(kernel, rkernel, bias, precision);
      },
      py::arg("kernel"), py::arg("recurrent_kernel"), py::arg("bias") = py::none(),
      py::arg("precision") = 0);
}

}  // namespace fusedlstm
