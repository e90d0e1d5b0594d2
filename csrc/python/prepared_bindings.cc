// fusedlstm._core.prepare and the Prepared class: weights packed once (lstm_infer.h), then
// inference calls on them. The packed buffer is private to the object, so no caller can hand
// the kernel a buffer that does not match its C and H; it is only read, so any number of
// threads may call infer at once (each call has its own workspace).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

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

 private:
  template <typename S>
  py::tuple Run(const py::array& x, const py::object& h0, const py::object& c0,
                const py::object& lengths, bool return_sequences, const py::object& spare,
                bool reverse, Acts acts, const py::object& mask) const {
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
    InferArgs<S> args;
    args.x = CheckedPtr<S>(x, "x", {s.N, s.T, s.C});
    args.h0 = OptionalPtr<S>(h0, "h0", {s.N, s.H});
    args.c0 = OptionalPtr<S>(c0, "c0", {s.N, s.H});
    args.lengths = CheckedLengths(lengths, s);
    args.prepared = static_cast<const S*>(buffer_.data());
    args.precision = precision_;
    args.reverse = reverse;
    if (!mask.is_none()) {
      if (args.lengths) throw py::value_error("mask: give lengths or a mask, not both");
      args.step_mask = CheckedPtr<uint8_t>(mask, "mask", {s.N, s.T});
    }
    args.activation = acts.act;
    args.recurrent_activation = acts.rec;
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
