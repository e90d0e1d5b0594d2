// Validation of the kernels' arguments (lstm.h), shared by every adapter: the pybind11 module
// turns a message into ValueError, the TensorFlow op into InvalidArgument. Each function returns
// an empty string when the arguments are fine, else one message that names the argument, the
// dimension (in lstm.h's notation: T, N, C, H) and both values. Adapters check what only they
// know (dtypes, memory layout, device) themselves; shapes, lengths and sizes are checked here.
// Header-only: no adapter needs another source file for it.
#ifndef FUSEDLSTM_VALIDATE_H_
#define FUSEDLSTM_VALIDATE_H_

#include <climits>
#include <cstdint>
#include <sstream>
#include <string>
#include <vector>

#include "fusedlstm/lstm.h"

namespace fusedlstm {

// A shape as messages write it: "(3, 4)", "(24,)".
inline std::string ShapeString(const std::vector<int64_t>& dims) {
  std::ostringstream os;
  os << "(";
  for (size_t i = 0; i < dims.size(); ++i) os << (i ? ", " : "") << dims[i];
  if (dims.size() == 1) os << ",";
  os << ")";
  return os.str();
}

// One expected dimension: its value, its symbol in the layout, and where the value comes from.
struct ExpectedDim {
  int64_t value;
  const char* symbol;  // "N", "4H", ...
  const char* from;    // "x's N", ...
};

// "" when `dims` is exactly `want`. Otherwise the rank, or else the first dimension that differs:
//   kernel: expected shape (5, 24) [C, 4H], got (4, 24): dimension 0 (C) is 4, expected 5 = x's C
//   bias: expected shape (24,) [4H], got (24, 1): rank 2, expected 1
inline std::string CheckShape(const char* name, const std::vector<int64_t>& dims,
                              const std::vector<ExpectedDim>& want, const char* layout) {
  std::vector<int64_t> expected;
  for (const ExpectedDim& d : want) expected.push_back(d.value);
  std::ostringstream os;
  if (dims.size() != want.size()) {
    os << name << ": expected shape " << ShapeString(expected) << " " << layout << ", got "
       << ShapeString(dims) << ": rank " << dims.size() << ", expected " << want.size();
    return os.str();
  }
  for (size_t i = 0; i < want.size(); ++i) {
    if (dims[i] != want[i].value) {
      os << name << ": expected shape " << ShapeString(expected) << " " << layout << ", got "
         << ShapeString(dims) << ": dimension " << i << " (" << want[i].symbol << ") is " << dims[i]
         << ", expected " << want[i].value << " = " << want[i].from;
      return os.str();
    }
  }
  return "";
}

// "" when `dims` has `rank` dimensions, none negative.
inline std::string CheckRank(const char* name, const std::vector<int64_t>& dims, size_t rank,
                             const char* layout) {
  std::ostringstream os;
  if (dims.size() != rank) {
    os << name << ": expected rank " << rank << " " << layout << ", got shape "
       << ShapeString(dims);
    return os.str();
  }
  for (size_t i = 0; i < dims.size(); ++i) {
    if (dims[i] < 0) {
      os << name << ": dimension " << i << " is negative, got shape " << ShapeString(dims);
      return os.str();
    }
  }
  return "";
}

// The problem shape from x [N, T, C] and recurrent_kernel [H, 4H]; lengths, when given (not
// nullptr), must be [N]. Ranks are checked before any dimension is read.
inline std::string ValidateProblem(const std::vector<int64_t>& x,
                                   const std::vector<int64_t>& recurrent_kernel,
                                   const std::vector<int64_t>* lengths, LstmShape* s) {
  std::string e = CheckRank("x", x, 3, "[N, T, C]");
  if (e.empty()) e = CheckRank("recurrent_kernel", recurrent_kernel, 2, "[H, 4H]");
  if (!e.empty()) return e;
  s->N = x[0];
  s->T = x[1];
  s->C = x[2];
  s->H = recurrent_kernel[0];
  if (s->H > INT64_MAX / 4) return "recurrent_kernel: dimension 0 (H) is too large";
  e = CheckShape("recurrent_kernel", recurrent_kernel,
                 {{s->H, "H", "its own H"}, {4 * s->H, "4H", "4 x recurrent_kernel's H"}},
                 "[H, 4H]");
  if (e.empty() && lengths) e = CheckShape("lengths", *lengths, {{s->N, "N", "x's N"}}, "[N]");
  return e;
}

// The forward's other inputs against the problem shape; nullptr: an optional one left out.
inline std::string ValidateForwardInputs(const LstmShape& s, const std::vector<int64_t>& kernel,
                                         const std::vector<int64_t>* bias,
                                         const std::vector<int64_t>* h0,
                                         const std::vector<int64_t>* c0) {
  const ExpectedDim N{s.N, "N", "x's N"}, C{s.C, "C", "x's C"};
  const ExpectedDim H{s.H, "H", "recurrent_kernel's H"};
  const ExpectedDim G{4 * s.H, "4H", "4 x recurrent_kernel's H"};
  std::string e = CheckShape("kernel", kernel, {C, G}, "[C, 4H]");
  if (e.empty() && bias) e = CheckShape("bias", *bias, {G}, "[4H]");
  if (e.empty() && h0) e = CheckShape("h0", *h0, {N, H}, "[N, H]");
  if (e.empty() && c0) e = CheckShape("c0", *c0, {N, H}, "[N, H]");
  return e;
}

// The backward's upstream gradients against the problem shape; nullptr: left out (zeros).
inline std::string ValidateUpstream(const LstmShape& s, const std::vector<int64_t>* d_outputs,
                                    const std::vector<int64_t>* d_h_n,
                                    const std::vector<int64_t>* d_c_n) {
  const ExpectedDim N{s.N, "N", "the forward's N"}, T{s.T, "T", "the forward's T"};
  const ExpectedDim H{s.H, "H", "the forward's H"};
  std::string e;
  if (d_outputs) e = CheckShape("d_outputs", *d_outputs, {N, T, H}, "[N, T, H]");
  if (e.empty() && d_h_n) e = CheckShape("d_h_n", *d_h_n, {N, H}, "[N, H]");
  if (e.empty() && d_c_n) e = CheckShape("d_c_n", *d_c_n, {N, H}, "[N, H]");
  return e;
}

// Every lengths[n] in [0, T] (nullptr: all T, nothing to check).
inline std::string ValidateLengths(const int32_t* lengths, const LstmShape& s) {
  if (!lengths) return "";
  for (int64_t n = 0; n < s.N; ++n) {
    if (lengths[n] < 0 || lengths[n] > s.T) {
      std::ostringstream os;
      os << "lengths[" << n << "] = " << lengths[n] << " is outside [0, T=" << s.T << "]";
      return os.str();
    }
  }
  return "";
}

namespace validate_detail {
// a * b, or -1 when it would exceed `limit` (a, b >= 0).
inline int64_t MulAtMost(int64_t a, int64_t b, int64_t limit) {
  if (a < 0 || b < 0) return -1;
  if (a != 0 && b > limit / a) return -1;
  return a * b;
}
inline int64_t AddAtMost(int64_t a, int64_t b, int64_t limit) {
  if (a < 0 || b < 0 || a > limit - b) return -1;
  return a + b;
}
}  // namespace validate_detail

// The most elements any buffer of a problem may need: every size the kernels compute (CacheSize,
// the workspaces, their packed panels) stays far below INT64_MAX.
constexpr int64_t kMaxElements = int64_t(1) << 56;

// "" when no dimension is negative and a generous bound on every buffer's size (N·(T+1)·(C+8H+8)
// + (C+H+8)·(8H+64) + N·(8H+64) elements) is at most kMaxElements, so no size computed from the
// shape can overflow. A shape this large could not be allocated anyway.
inline std::string ValidateSizes(const LstmShape& s) {
  using validate_detail::AddAtMost;
  using validate_detail::MulAtMost;
  std::ostringstream os;
  if (s.T < 0 || s.N < 0 || s.C < 0 || s.H < 0) {
    os << "shape: negative dimension (T=" << s.T << ", N=" << s.N << ", C=" << s.C << ", H=" << s.H
       << ")";
    return os.str();
  }
  const int64_t L = kMaxElements;
  const int64_t h8 = MulAtMost(8, s.H, L);
  const int64_t per_row = AddAtMost(AddAtMost(s.C, h8, L), 8, L);
  const int64_t rows = MulAtMost(s.N, AddAtMost(s.T, 1, L), L);
  const int64_t weights =
      MulAtMost(AddAtMost(AddAtMost(s.C, s.H, L), 8, L), AddAtMost(h8, 64, L), L);
  const int64_t states = MulAtMost(s.N, AddAtMost(h8, 64, L), L);
  const int64_t total = AddAtMost(AddAtMost(MulAtMost(rows, per_row, L), weights, L), states, L);
  if (h8 < 0 || per_row < 0 || rows < 0 || weights < 0 || states < 0 || total < 0) {
    os << "shape: T=" << s.T << ", N=" << s.N << ", C=" << s.C << ", H=" << s.H
       << " is too large: its buffers would need more than 2^56 elements";
    return os.str();
  }
  return "";
}

// Elements one CUDA elementwise launch may cover: the grid's 2^31 - 1 blocks of 256 threads.
constexpr int64_t kMaxCudaLaunchElements = int64_t(INT_MAX) * 256;

// "" when every size the CUDA kernels hand to cuBLAS (an int there) fits in an int: N·T, C, 4H
// and the leading dimensions T·4H (T·H is smaller); and every elementwise launch (over N·T·C and
// N·T·H elements at most) fits in one grid. The CPU kernels have no such limits.
inline std::string ValidateCudaSizes(const LstmShape& s) {
  using validate_detail::MulAtMost;
  const int64_t L = INT_MAX, G = kMaxCudaLaunchElements;
  struct Named {
    const char* what;
    int64_t value;
    int64_t limit;
  };
  const int64_t nt = MulAtMost(s.N, s.T, L);
  const Named sizes[] = {{"N*T", nt, L},
                         {"C", s.C <= L ? s.C : -1, L},
                         {"4H", MulAtMost(4, s.H, L), L},
                         {"T*4H", MulAtMost(s.T, MulAtMost(4, s.H, L), L), L},
                         {"N*T*C", MulAtMost(nt, s.C, G), G},
                         {"N*T*H", MulAtMost(nt, s.H, G), G}};
  for (const Named& n : sizes) {
    if (n.value < 0) {
      std::ostringstream os;
      os << "shape: T=" << s.T << ", N=" << s.N << ", C=" << s.C << ", H=" << s.H << ": " << n.what
         << " exceeds " << n.limit
         << (n.limit == L ? " (INT_MAX, the largest size cuBLAS takes)"
                          : " (the most elements one CUDA launch covers)")
         << "; use the CPU kernels or split the batch";
      return os.str();
    }
  }
  return "";
}

}  // namespace fusedlstm

#endif  // FUSEDLSTM_VALIDATE_H_
