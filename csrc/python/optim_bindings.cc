// fusedlstm._core.adam_dense / adam_rows / embedding_row_grads: Adam's one-pass updates and the
// sparse embedding gradient on NumPy arrays (fusedlstm.sentiment.optim, .layers). Every array is
// checked (dtype, C order, shape, writeable) and row indices in range before anything is written.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "bindings.h"
#include "checks.h"
#include "fusedlstm/adam.h"
#include "fusedlstm/embedding.h"

namespace fusedlstm {
namespace {

AdamCoefficients Coefficients(double lr_t, double eps_t, double beta1, double beta2,
                              double grad_scale, double average_keep = 0) {
  if (!std::isfinite(grad_scale)) throw py::value_error("grad_scale must be finite");
  if (!(average_keep >= 0 && average_keep < 1)) {
    throw py::value_error("average_keep must be in [0, 1), got " + std::to_string(average_keep));
  }
  AdamCoefficients c;
  c.lr_t = lr_t;
  c.eps_t = eps_t;
  c.beta1 = beta1;
  c.beta2 = beta2;
  c.grad_scale = grad_scale;
  c.average_keep = average_keep;
  return c;
}

template <typename S>
void AdamDenseChecked(const py::array& p, const py::array& g, const py::array& m,
                      const py::array& v, const py::object& average, const AdamCoefficients& c) {
  const std::vector<int64_t> shape = Dims(p);
  CheckedPtr<S>(p, "param", shape);
  const S* gp = CheckedPtr<S>(g, "grad", shape);
  CheckedPtr<S>(m, "m", shape);
  CheckedPtr<S>(v, "v", shape);
  S* ap = nullptr;
  if (!average.is_none()) {
    if (!py::isinstance<py::array>(average))
      throw py::type_error("average: expected an array or None");
    const py::array a = py::reinterpret_borrow<py::array>(average);
    CheckedPtr<S>(a, "average", shape);
    ap = WritableData<S>(a, "average");
  }
  S *pp = WritableData<S>(p, "param"), *mp = WritableData<S>(m, "m"), *vp = WritableData<S>(v, "v");
  py::gil_scoped_release release;
  AdamDense<S>(p.size(), pp, gp, mp, vp, c, ap);
}

template <typename S>
void AdamRowsChecked(const py::array& p, const py::array& m, const py::array& v,
                     const py::array& rows, const py::array& g, const AdamCoefficients& c) {
  Require(CheckRank("param", Dims(p), 2, "[rows, columns]"));
  const std::vector<int64_t> shape = Dims(p);
  CheckedPtr<S>(p, "param", shape);
  CheckedPtr<S>(m, "m", shape);
  CheckedPtr<S>(v, "v", shape);
  Require(CheckRank("rows", Dims(rows), 1, "[R]"));
  const int64_t n = rows.shape(0);
  const int64_t* rp = CheckedPtr<int64_t>(rows, "rows", {n});
  const S* gp = CheckedPtr<S>(g, "row grads", {n, shape[1]});
  for (int64_t r = 0; r < n; ++r) {
    if (rp[r] < 0 || rp[r] >= shape[0]) {
      throw py::value_error("rows[" + std::to_string(r) + "] = " + std::to_string(rp[r]) +
                            " is outside [0, " + std::to_string(shape[0]) + ")");
    }
  }
  S *pp = WritableData<S>(p, "param"), *mp = WritableData<S>(m, "m"), *vp = WritableData<S>(v, "v");
  py::gil_scoped_release release;
  AdamRows<S>(n, shape[1], rp, gp, pp, mp, vp, c);
}

// The sparse gradient of an embedding lookup (fusedlstm/embedding.h) as (rows, grads) arrays.
template <typename S>
py::tuple EmbeddingRowGradsChecked(const py::array& ids, const py::object& lengths,
                                   const py::array& dx) {
  Require(CheckRank("ids", Dims(ids), 2, "[N, T]"));
  Require(CheckRank("d_x", Dims(dx), 3, "[N, T, C]"));
  // The LSTM's names: the lookup's output is the LSTM's input x [N, T, C].
  LstmShape s;
  s.N = ids.shape(0);
  s.T = ids.shape(1);
  s.C = dx.shape(2);
  Require(CheckShape("d_x", Dims(dx),
                     {{s.N, "N", "ids' N"}, {s.T, "T", "ids' T"}, {s.C, "C", "its own C"}},
                     "[N, T, C]"));
  const int64_t* ip = CheckedPtr<int64_t>(ids, "ids", {s.N, s.T});
  const S* gp = CheckedPtr<S>(dx, "d_x", {s.N, s.T, s.C});
  const int32_t* lp = CheckedLengths(lengths, s);
  py::array_t<int64_t> rows(std::vector<int64_t>{s.N * s.T});
  py::array_t<S> grads(std::vector<int64_t>{s.N * s.T, s.C});
  int64_t r;
  {
    py::gil_scoped_release release;
    r = EmbeddingRowGrads<S>(s.N, s.T, s.C, ip, lp, gp, rows.mutable_data(), grads.mutable_data());
  }
  // The first r entries (views of C-contiguous prefixes, so still C-contiguous).
  py::slice first(0, r, 1);
  return py::make_tuple(rows[first], grads[py::make_tuple(first, py::ellipsis())]);
}

}  // namespace

void RegisterOptim(py::module_& m) {
  m.def(
      "adam_dense",
      [](const py::array& p, const py::array& g, const py::array& m, const py::array& v,
         double lr_t, double eps_t, double beta1, double beta2, double grad_scale,
         const py::object& average, double average_keep) {
        const AdamCoefficients c =
            Coefficients(lr_t, eps_t, beta1, beta2, grad_scale, average_keep);
        if (IsDtype(p, py::dtype::of<float>()))
          return AdamDenseChecked<float>(p, g, m, v, average, c);
        if (IsDtype(p, py::dtype::of<double>()))
          return AdamDenseChecked<double>(p, g, m, v, average, c);
        throw py::type_error("param: dtype must be float32 or float64, got " +
                             std::string(py::str(p.dtype())));
      },
      py::arg("param"), py::arg("grad"), py::arg("m"), py::arg("v"), py::arg("lr_t"),
      py::arg("eps_t"), py::arg("beta1"), py::arg("beta2"), py::arg("grad_scale") = 1.0,
      py::arg("average") = py::none(), py::arg("average_keep") = 0.0,
      "One Adam step on a whole array, in place (see fusedlstm/adam.h): the gradient read as "
      "grad_scale * grad; with `average`, that moving average of the weights is updated too.");
  m.def(
      "adam_rows",
      [](const py::array& p, const py::array& m, const py::array& v, const py::array& rows,
         const py::array& g, double lr_t, double eps_t, double beta1, double beta2,
         double grad_scale) {
        const AdamCoefficients c = Coefficients(lr_t, eps_t, beta1, beta2, grad_scale);
        if (IsDtype(p, py::dtype::of<float>())) return AdamRowsChecked<float>(p, m, v, rows, g, c);
        if (IsDtype(p, py::dtype::of<double>()))
          return AdamRowsChecked<double>(p, m, v, rows, g, c);
        throw py::type_error("param: dtype must be float32 or float64, got " +
                             std::string(py::str(p.dtype())));
      },
      py::arg("param"), py::arg("m"), py::arg("v"), py::arg("rows"), py::arg("row_grads"),
      py::arg("lr_t"), py::arg("eps_t"), py::arg("beta1"), py::arg("beta2"),
      py::arg("grad_scale") = 1.0,
      "Lazy Adam on the given distinct rows of a table, in place; other rows untouched.");
  m.def(
      "embedding_row_grads",
      [](const py::array& ids, const py::object& lengths, const py::array& dx) {
        if (IsDtype(dx, py::dtype::of<float>()))
          return EmbeddingRowGradsChecked<float>(ids, lengths, dx);
        if (IsDtype(dx, py::dtype::of<double>()))
          return EmbeddingRowGradsChecked<double>(ids, lengths, dx);
        throw py::type_error("d_x: dtype must be float32 or float64, got " +
                             std::string(py::str(dx.dtype())));
      },
      py::arg("ids"), py::arg("lengths"), py::arg("d_x"),
      "(rows, grads): the distinct valid ids, increasing, and each one's summed d_x rows.");
}

}  // namespace fusedlstm
