// Eigen implementation of the fused LSTM contract (fusedlstm/lstm.h) for CpuDevice.
//
// Forward: one input-projection GEMM for all steps, then per step one parallel_for whose tasks
// each own a block of rows × hidden units: the task's slice of the recurrent GEMM followed at
// once by its fused gate/cell/output pass (no barrier in between; one per step).
// Backward: per step a fused pass producing the gate gradients dZ_t, then the GEMM
// dh_{t-1} = dZ_t·Rᵀ; after the loop the weight, input and bias gradients are single GEMMs (one
// reduction) over all steps, tiled into one parallel_for.
// Every partition is derived from the shape alone, and each task's arithmetic is the same
// whichever thread runs it, so results are bit-identical for any thread count.
//
// Internal layout (batch-major, Keras gate blocks, so nothing is transposed or repacked):
//   gates  [N, T, 4H]  pre-activations, then activated gates (cache), then dZ (backward)
//   hprev  [N, T, H]   h_{t-1} for every step (the LHS of the recurrent GEMM and of dR)
//   cstate [N, T+1, H] c_{t-1} at index t; c_t at t+1
#include <algorithm>
#include <cstring>

#include <Eigen/Core>

#include "../common/activations.h"
#include "fusedlstm/lstm.h"

#ifndef EIGEN_DONT_PARALLELIZE
#error "Build with EIGEN_DONT_PARALLELIZE: threads come only through CpuDevice."
#endif

namespace fusedlstm {
namespace {

constexpr int64_t kUnitBlock = 64;   // hidden units per step task (bounds the stack temporaries)
constexpr int64_t kRowBlock = 128;   // batch rows per step task
constexpr int64_t kGemmTile = 256;   // output tile edge for the hoisted GEMMs

template <typename S>
using MatRM = Eigen::Matrix<S, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
template <typename S>
using MapRM = Eigen::Map<MatRM<S>, Eigen::Unaligned, Eigen::OuterStride<>>;
template <typename S>
using CMapRM = Eigen::Map<const MatRM<S>, Eigen::Unaligned, Eigen::OuterStride<>>;
template <typename S>
using VecA = Eigen::Array<S, Eigen::Dynamic, 1>;
template <typename S>
using MapA = Eigen::Map<VecA<S>>;
template <typename S>
using CMapA = Eigen::Map<const VecA<S>>;
// A 64-byte-aligned stack row of one unit block.
template <typename S>
using AMapA = Eigen::Map<VecA<S>, Eigen::Aligned64>;

inline int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Part p of [0, n) split into k nearly equal parts.
struct Range {
  int64_t begin, end;
  int64_t size() const { return end - begin; }
};
inline Range Part(int64_t n, int64_t k, int64_t p) { return {n * p / k, n * (p + 1) / k}; }

// A fixed grid of tasks over rows × columns.
struct Grid {
  int64_t row_parts, col_parts;
  Grid(int64_t rows, int64_t cols, int64_t row_block, int64_t col_block)
      : row_parts(std::max<int64_t>(1, CeilDiv(rows, row_block))),
        col_parts(std::max<int64_t>(1, CeilDiv(cols, col_block))) {}
  int64_t count() const { return row_parts * col_parts; }
};

// The cache's sections, in order.
template <typename S>
struct CacheView {
  S* kernel;   // [C, 4H]
  S* rkernel;  // [H, 4H]
  S* x;        // [N, T, C]
  S* gates;    // [N, T, 4H]
  S* hprev;    // [N, T, H]
  S* cstate;   // [N, T+1, H]
  CacheView(S* base, const LstmShape& s) {
    const int64_t G = 4 * s.H;
    kernel = base;
    rkernel = kernel + s.C * G;
    x = rkernel + s.H * G;
    gates = x + s.N * s.T * s.C;
    hprev = gates + s.N * s.T * G;
    cstate = hprev + s.N * s.T * s.H;
  }
};

inline int64_t Length(const int32_t* lengths, int64_t n, int64_t T) {
  return lengths ? lengths[n] : T;
}

template <typename S>
void CopyOrZero(S* dst, const S* src, int64_t count) {
  if (count <= 0) return;
  if (src) {
    std::memcpy(dst, src, sizeof(S) * count);
  } else {
    std::fill(dst, dst + count, S(0));
  }
}

// Z[N*T, 4H] = X[N*T, C] · W[C, 4H], tiled.
template <typename S>
void InputProjection(const CpuDevice& device, const LstmShape& s, const S* x, const S* kernel,
                     S* z) {
  const int64_t M = s.N * s.T, G = 4 * s.H;
  CMapRM<S> X(x, M, s.C, Eigen::OuterStride<>(s.C));
  CMapRM<S> W(kernel, s.C, G, Eigen::OuterStride<>(G));
  MapRM<S> Z(z, M, G, Eigen::OuterStride<>(G));
  const Grid grid(M, G, kGemmTile, kGemmTile);
  ParallelFor(device, grid.count(), [&](int64_t task) {
    const Range r = Part(M, grid.row_parts, task / grid.col_parts);
    const Range c = Part(G, grid.col_parts, task % grid.col_parts);
    if (s.C == 0) {
      Z.block(r.begin, c.begin, r.size(), c.size()).setZero();
      return;
    }
    Z.block(r.begin, c.begin, r.size(), c.size()).noalias() =
        X.middleRows(r.begin, r.size()) * W.middleCols(c.begin, c.size());
  });
}

}  // namespace

int64_t ForwardWorkspaceSize(const LstmShape& s, bool training) {
  if (training) return 0;  // everything lives in the cache
  return s.N * s.T * 4 * s.H + 2 * s.N * s.H;
}

int64_t CacheSize(const LstmShape& s) {
  const int64_t G = 4 * s.H;
  return s.C * G + s.H * G + s.N * s.T * (s.C + G + s.H) + s.N * (s.T + 1) * s.H;
}

int64_t BackwardWorkspaceSize(const LstmShape& /*s*/) { return 0; }

template <typename S>
void LstmForward(const CpuDevice& device, const LstmShape& s, const ForwardArgs<S>& a) {
  const int64_t T = s.T, N = s.N, H = s.H, G = 4 * H;
  const bool training = a.cache != nullptr;
  if (N == 0) return;
  if (T == 0 || H == 0) {
    CopyOrZero(a.h_n, a.h0, N * H);
    CopyOrZero(a.c_n, a.c0, N * H);
    return;  // backward of an empty sequence reads nothing from the cache

  }

  // State storage. Training: the history in the cache (h_{t-1} at hprev[n, t], c at
  // cstate[n, t]). Inference: h ping-pongs between two [N, H] buffers, c is updated in c_n.
  S* gates;
  S *h_hist = nullptr, *c_hist = nullptr, *hbuf = nullptr;
  if (training) {
    CacheView<S> cv(a.cache, s);
    std::memcpy(cv.kernel, a.kernel, sizeof(S) * s.C * G);
    std::memcpy(cv.rkernel, a.recurrent_kernel, sizeof(S) * H * G);
    if (s.C > 0) std::memcpy(cv.x, a.x, sizeof(S) * N * T * s.C);
    gates = cv.gates;
    h_hist = cv.hprev;
    c_hist = cv.cstate;
    for (int64_t n = 0; n < N; ++n) {
      CopyOrZero(h_hist + n * T * H, a.h0 ? a.h0 + n * H : nullptr, H);
      CopyOrZero(c_hist + n * (T + 1) * H, a.c0 ? a.c0 + n * H : nullptr, H);
    }
  } else {
    gates = a.workspace;
    hbuf = a.workspace + N * T * G;
    CopyOrZero(hbuf, a.h0, N * H);
    CopyOrZero(a.c_n, a.c0, N * H);
  }

  InputProjection(device, s, a.x, a.kernel, gates);

  const Grid grid(N, H, kRowBlock, kUnitBlock);
  CMapRM<S> R(a.recurrent_kernel, H, G, Eigen::OuterStride<>(G));
  for (int64_t t = 0; t < T; ++t) {
    // Where h_{t-1} is read and h_t, c_{t-1}, c_t live for row n.
    const S* h_in = training ? h_hist + t * H : hbuf + (t % 2) * N * H;
    const int64_t h_in_ld = training ? T * H : H;
    ParallelFor(device, grid.count(), [&](int64_t task) {
      const Range rows = Part(N, grid.row_parts, task / grid.col_parts);
      const Range units = Part(H, grid.col_parts, task % grid.col_parts);
      const int64_t u0 = units.begin, nu = units.size();
      // Recurrent GEMM slice: Z[rows, t, g*H + units] += h_{t-1}[rows] · R[:, g*H + units].
      CMapRM<S> Hin(h_in + rows.begin * h_in_ld, rows.size(), H, Eigen::OuterStride<>(h_in_ld));
      for (int64_t g = 0; g < 4; ++g) {
        MapRM<S> Zg(gates + (rows.begin * T + t) * G + g * H + u0, rows.size(), nu,
                    Eigen::OuterStride<>(T * G));
        Zg.noalias() += Hin * R.middleCols(g * H + u0, nu);
      }
      // Fused pass: gates, cell, output for each row of the block.
      for (int64_t n = rows.begin; n < rows.end; ++n) {
        const bool valid = t < Length(a.lengths, n, T);
        const S* c_prev = training ? c_hist + (n * (T + 1) + t) * H + u0 : a.c_n + n * H + u0;
        S* c_next = training ? c_hist + (n * (T + 1) + t + 1) * H + u0 : a.c_n + n * H + u0;
        const S* h_prev = h_in + n * h_in_ld + u0;
        S* h_next = training ? (t + 1 < T ? h_hist + (n * T + t + 1) * H + u0 : a.h_n + n * H + u0)
                             : hbuf + ((t + 1) % 2) * N * H + n * H + u0;
        S* out = a.outputs + (n * T + t) * H + u0;
        if (!valid) {
          if (c_next != c_prev) std::memcpy(c_next, c_prev, sizeof(S) * nu);
          std::memcpy(h_next, h_prev, sizeof(S) * nu);
          std::fill(out, out + nu, S(0));
          continue;
        }
        // Transcendentals are evaluated into 64-byte-aligned stack rows so Eigen splits every
        // segment into packets and scalar tail by index alone: results never depend on where
        // NumPy happened to allocate an array.
        S* z = gates + (n * T + t) * G + u0;
        alignas(64) S gate[4][kUnitBlock], cell[kUnitBlock], hid[kUnitBlock];
        AMapA<S> i(gate[0], nu), f(gate[1], nu), g(gate[2], nu), o(gate[3], nu);
        AMapA<S> cn(cell, nu), hn(hid, nu);
        if (a.bias) {
          i = Sigmoid(CMapA<S>(z, nu) + CMapA<S>(a.bias + u0, nu));
          f = Sigmoid(CMapA<S>(z + H, nu) + CMapA<S>(a.bias + H + u0, nu));
          g = Tanh(CMapA<S>(z + 2 * H, nu) + CMapA<S>(a.bias + 2 * H + u0, nu));
          o = Sigmoid(CMapA<S>(z + 3 * H, nu) + CMapA<S>(a.bias + 3 * H + u0, nu));
        } else {
          i = Sigmoid(CMapA<S>(z, nu));
          f = Sigmoid(CMapA<S>(z + H, nu));
          g = Tanh(CMapA<S>(z + 2 * H, nu));
          o = Sigmoid(CMapA<S>(z + 3 * H, nu));
        }
        cn = f * CMapA<S>(c_prev, nu) + i * g;
        hn = o * Tanh(cn);
        if (training) {
          for (int64_t k = 0; k < 4; ++k) std::memcpy(z + k * H, gate[k], sizeof(S) * nu);
        }
        std::memcpy(c_next, cell, sizeof(S) * nu);
        std::memcpy(h_next, hid, sizeof(S) * nu);
        std::memcpy(out, hid, sizeof(S) * nu);
      }
    });
  }

  if (training) {
    for (int64_t n = 0; n < N; ++n) {
      std::memcpy(a.c_n + n * H, c_hist + (n * (T + 1) + T) * H, sizeof(S) * H);
    }
  } else {
    std::memcpy(a.h_n, hbuf + (T % 2) * N * H, sizeof(S) * N * H);
  }
}

template <typename S>
void LstmBackward(const CpuDevice& device, const LstmShape& s, const BackwardArgs<S>& a) {
  const int64_t T = s.T, N = s.N, H = s.H, C = s.C, G = 4 * H;
  CacheView<S> cv(a.cache, s);
  // The running dh and dc live in the d_h0 / d_c0 outputs: that is where they end.
  CopyOrZero(a.d_h0, a.d_h_n, N * H);
  CopyOrZero(a.d_c0, a.d_c_n, N * H);
  if (N * T == 0 || H == 0) {
    std::fill(a.dx, a.dx + N * T * C, S(0));
    std::fill(a.d_kernel, a.d_kernel + C * G, S(0));
    std::fill(a.d_recurrent_kernel, a.d_recurrent_kernel + H * G, S(0));
    std::fill(a.d_bias, a.d_bias + G, S(0));
    return;
  }
  S* dz_all = cv.gates;  // activated gates are overwritten by dZ, step by step
  CMapRM<S> R(cv.rkernel, H, G, Eigen::OuterStride<>(G));
  const Grid grid(N, H, kRowBlock, kUnitBlock);

  for (int64_t t = T - 1; t >= 0; --t) {
    // (a) Fused pass: dZ_t from dh = d_out_t + dh_next and dc_next; dc becomes dc_{t-1}.
    ParallelFor(device, grid.count(), [&](int64_t task) {
      const Range rows = Part(N, grid.row_parts, task / grid.col_parts);
      const Range units = Part(H, grid.col_parts, task % grid.col_parts);
      const int64_t u0 = units.begin, nu = units.size();
      alignas(64) S dh_buf[kUnitBlock], dc_buf[kUnitBlock], tc_buf[kUnitBlock], i_buf[kUnitBlock];
      AMapA<S> dh(dh_buf, nu), dc(dc_buf, nu), tc(tc_buf, nu), gi(i_buf, nu);
      for (int64_t n = rows.begin; n < rows.end; ++n) {
        S* z = dz_all + (n * T + t) * G + u0;
        if (t >= Length(a.lengths, n, T)) {
          // Padded step: no gradient into this step's gates; dh and dc pass through unchanged.
          for (int64_t g = 0; g < 4; ++g) std::fill(z + g * H, z + g * H + nu, S(0));
          continue;
        }
        MapA<S> i(z, nu), f(z + H, nu), gg(z + 2 * H, nu), o(z + 3 * H, nu);
        MapA<S> dh_run(a.d_h0 + n * H + u0, nu), dc_run(a.d_c0 + n * H + u0, nu);
        const CMapA<S> c_prev(cv.cstate + (n * (T + 1) + t) * H + u0, nu);
        const CMapA<S> c_t(cv.cstate + (n * (T + 1) + t + 1) * H + u0, nu);
        if (a.d_outputs) {
          dh = dh_run + CMapA<S>(a.d_outputs + (n * T + t) * H + u0, nu);
        } else {
          dh = dh_run;
        }
        tc = Tanh(c_t);  // into an aligned row (see the forward pass)
        // The rest is + and × only: identical in packet and scalar code (no FMA contraction).
        dc = dc_run + dh * o * TanhGradFromOutput(tc);
        dc_run = dc * f;                                   // dc_{t-1}
        o = dh * tc * SigmoidGradFromOutput(o);            // dz_o
        f = dc * c_prev * SigmoidGradFromOutput(f);        // dz_f
        gi = i;
        i = dc * gg * SigmoidGradFromOutput(gi);           // dz_i
        gg = dc * gi * TanhGradFromOutput(gg);             // dz_c
        dh_run.setZero();  // (b) adds dZ_t·Rᵀ; padded rows keep their carried dh
      }
    });
    // (b) dh_{t-1}[rows, units] += dZ_t[rows, :] · R[units, :]ᵀ.
    ParallelFor(device, grid.count(), [&](int64_t task) {
      const Range rows = Part(N, grid.row_parts, task / grid.col_parts);
      const Range units = Part(H, grid.col_parts, task % grid.col_parts);
      CMapRM<S> dZt(dz_all + (rows.begin * T + t) * G, rows.size(), G, Eigen::OuterStride<>(T * G));
      MapRM<S> dH(a.d_h0 + rows.begin * H + units.begin, rows.size(), units.size(),
                  Eigen::OuterStride<>(H));
      dH.noalias() += dZt * R.middleRows(units.begin, units.size()).transpose();
    });
  }

  // Hoisted gradients over all steps, all tiles in one parallel_for:
  //   dX = dZ·Wᵀ [NT, C],  dW = Xᵀ·dZ [C, G],  dR = Hprevᵀ·dZ [H, G],  db = Σ_rows dZ [G].
  const int64_t M = N * T;
  CMapRM<S> dZ(dz_all, M, G, Eigen::OuterStride<>(G));
  CMapRM<S> X(cv.x, M, C, Eigen::OuterStride<>(C));
  CMapRM<S> W(cv.kernel, C, G, Eigen::OuterStride<>(G));
  CMapRM<S> Hp(cv.hprev, M, H, Eigen::OuterStride<>(H));
  MapRM<S> dX(a.dx, M, C, Eigen::OuterStride<>(C));
  MapRM<S> dW(a.d_kernel, C, G, Eigen::OuterStride<>(G));
  MapRM<S> dR(a.d_recurrent_kernel, H, G, Eigen::OuterStride<>(G));
  const Grid gx(M, C, kGemmTile, kGemmTile), gw(C, G, kGemmTile, kGemmTile),
      gr(H, G, kGemmTile, kGemmTile), gb(1, G, 1, kGemmTile);
  const int64_t nx = C > 0 ? gx.count() : 0, nw = C > 0 ? gw.count() : 0;
  ParallelFor(device, nx + nw + gr.count() + gb.count(), [&](int64_t task) {
    if (task < nx) {
      const Range r = Part(M, gx.row_parts, task / gx.col_parts);
      const Range c = Part(C, gx.col_parts, task % gx.col_parts);
      dX.block(r.begin, c.begin, r.size(), c.size()).noalias() =
          dZ.middleRows(r.begin, r.size()) * W.middleRows(c.begin, c.size()).transpose();
      return;
    }
    task -= nx;
    if (task < nw) {
      const Range r = Part(C, gw.row_parts, task / gw.col_parts);
      const Range c = Part(G, gw.col_parts, task % gw.col_parts);
      dW.block(r.begin, c.begin, r.size(), c.size()).noalias() =
          X.middleCols(r.begin, r.size()).transpose() * dZ.middleCols(c.begin, c.size());
      return;
    }
    task -= nw;
    if (task < gr.count()) {
      const Range r = Part(H, gr.row_parts, task / gr.col_parts);
      const Range c = Part(G, gr.col_parts, task % gr.col_parts);
      dR.block(r.begin, c.begin, r.size(), c.size()).noalias() =
          Hp.middleCols(r.begin, r.size()).transpose() * dZ.middleCols(c.begin, c.size());
      return;
    }
    task -= gr.count();
    // A plain loop: every column summed over rows in the same order, however it vectorizes.
    const Range c = Part(G, gb.col_parts, task);
    S* db = a.d_bias + c.begin;
    std::fill(db, db + c.size(), S(0));
    for (int64_t r = 0; r < M; ++r) {
      const S* row = dz_all + r * G + c.begin;
      for (int64_t k = 0; k < c.size(); ++k) db[k] += row[k];
    }
  });
}

#define FUSEDLSTM_INSTANTIATE(S)                                                        \
  template void LstmForward<S>(const CpuDevice&, const LstmShape&, const ForwardArgs<S>&); \
  template void LstmBackward<S>(const CpuDevice&, const LstmShape&, const BackwardArgs<S>&);
FUSEDLSTM_INSTANTIATE(float)
FUSEDLSTM_INSTANTIATE(double)
#undef FUSEDLSTM_INSTANTIATE

}  // namespace fusedlstm
