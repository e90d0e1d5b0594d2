// What a training forward hands its backward, on either device: the cache memory together with
// what it was written for (shape, dtype, lengths). A backward takes only this object, so it reads
// a cache as exactly what it is: no caller can pair a buffer with another shape (a swapped N and
// T has the same size) or other lengths. Python cannot construct one, and its fields are
// read-only there.
#ifndef FUSEDLSTM_PYTHON_CACHE_H_
#define FUSEDLSTM_PYTHON_CACHE_H_

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <vector>

#include "fusedlstm/lstm.h"

namespace fusedlstm {
namespace py = pybind11;

class CacheInfo {
 public:
  // `lengths` (nullptr: all T) is copied: the caller's array may change before the backward.
  CacheInfo(const LstmShape& s, bool is_double, const int32_t* lengths, bool reverse = false)
      : shape_(s), is_double_(is_double), has_lengths_(lengths != nullptr), reverse_(reverse) {
    if (lengths) lengths_.assign(lengths, lengths + s.N);
  }
  const LstmShape& shape() const { return shape_; }
  bool is_double() const { return is_double_; }
  bool reverse() const { return reverse_; }
  // A private copy of the forward's step mask (nullptr: none); the backward sees the same.
  const uint8_t* step_mask() const { return step_mask_.empty() ? nullptr : step_mask_.data(); }
  void set_step_mask(const uint8_t* m) {
    if (m) step_mask_.assign(m, m + shape_.N * shape_.T);
  }
  // The forward's activations and recurrent masks (a private copy, or None): its backward's.
  Activation activation = Activation::kTanh;
  Activation recurrent_activation = Activation::kSigmoid;
  Precision precision = Precision::kFloat32;
  py::object recurrent_masks = py::none();
  // The copy the forward ran with (and the backward must see); nullptr for all T.
  const int32_t* lengths() const { return has_lengths_ ? lengths_.data() : nullptr; }

 private:
  LstmShape shape_;
  bool is_double_;
  bool has_lengths_;
  bool reverse_;
  std::vector<int32_t> lengths_;
  std::vector<uint8_t> step_mask_;
};

// The read-only properties every cache class shows Python: shape (N, T, C, H: x's shape, then
// H), dtype, lengths (a copy, or None), used, nbytes. Class must have info(), used(), nbytes().
template <typename Class>
void DefCacheProperties(py::class_<Class, std::shared_ptr<Class>>& c) {
  c.def_property_readonly(
       "shape",
       [](const Class& k) {
         const LstmShape& s = k.info().shape();
         return py::make_tuple(s.N, s.T, s.C, s.H);
       },
       "(N, T, C, H) of the forward that wrote it")
      .def_property_readonly("dtype",
                             [](const Class& k) {
                               return k.info().is_double() ? py::dtype::of<double>()
                                                           : py::dtype::of<float>();
                             })
      .def_property_readonly(
          "lengths",
          [](const Class& k) -> py::object {
            const int32_t* p = k.info().lengths();
            if (!p) return py::none();
            py::array_t<int32_t> a(std::vector<int64_t>{k.info().shape().N});
            std::copy(p, p + k.info().shape().N, a.mutable_data());
            return a;
          },
          "a copy of the lengths the forward ran with, or None (all T)")
      .def_property_readonly(
          "reverse", [](const Class& k) { return k.info().reverse(); },
          "whether the forward ran each row's steps last to first")
      .def_property_readonly(
          "activations",
          [](const Class& k) {
            return py::make_tuple(static_cast<int>(k.info().activation),
                                  static_cast<int>(k.info().recurrent_activation));
          },
          "(activation, recurrent_activation) codes the forward ran with")
      .def_property_readonly(
          "precision",
          [](const Class& k) {
            return k.info().precision == Precision::kBfloat16 ? "bfloat16" : "float32";
          },
          "the products' precision the forward ran with (its backward's)")
      .def_property_readonly(
          "has_recurrent_masks", [](const Class& k) { return !k.info().recurrent_masks.is_none(); },
          "whether the forward applied recurrent masks")
      .def_property_readonly("used", &Class::used, "True once a backward has consumed it")
      .def_property_readonly("nbytes", &Class::nbytes, "bytes it holds (0 once used)");
}

}  // namespace fusedlstm

#endif  // FUSEDLSTM_PYTHON_CACHE_H_
