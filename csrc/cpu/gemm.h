// A small GEMM for the per-step recurrent products, C[M, N] += A[M, K] · B[K, N], whose B (the
// recurrent weights) is the same at every time step: it is packed once per call into panels
// and reused T times, where a general GEMM (Eigen) re-packs it at every step. A is read in place
// (row-major, any leading dimension). Results depend only on M, N, K, never on threads or
// alignment: every element goes through the same micro-kernel, tails are zero-padded.
#ifndef FUSEDLSTM_CPU_GEMM_H_
#define FUSEDLSTM_CPU_GEMM_H_

#include <cstdint>

namespace fusedlstm {

// Elements of Scalar that PackRhs writes for a K × N right-hand side.
template <typename S>
int64_t PackedRhsSize(int64_t K, int64_t N);

// Packs B, whose element (k, n) is b[k * row_stride + n * col_stride] (so a transposed matrix
// packs as easily as a plain one), into `out` (PackedRhsSize(K, N) elements).
template <typename S>
void PackRhs(const S* b, int64_t row_stride, int64_t col_stride, int64_t K, int64_t N, S* out);

// C[M, N] += A[M, K] · B, with B packed by PackRhs(…, K, N, …). A and C are row-major with
// leading dimensions lda and ldc.
template <typename S>
void GemmPackedRhs(int64_t M, int64_t N, int64_t K, const S* a, int64_t lda, const S* packed_b,
                   S* c, int64_t ldc);

// Columns [col_begin, col_end) of the same product, col_begin a multiple of PanelWidth<S>():
// a task's share of the columns, reading its panels of a B packed whole. c points at column 0.
// Each element gets exactly the sum GemmPackedRhs gives it. accumulate = false: C = A·B (C is
// only written: the value adding to zeros gives, but for the sign of a zero sum). backwards:
// with few rows, B's panels are read last to first (same results; see GemmCols). six_rows:
// 5 rows or more go in tiles of 6 rows × 2 panels, not 8 × 1 (same results; 10-15% faster for
// inference at 16-32 rows; in training's steps no gain above this machine's noise).
template <typename S>
void GemmPackedRhsCols(int64_t M, int64_t N, int64_t K, int64_t col_begin, int64_t col_end,
                       const S* a, int64_t lda, const S* packed_b, S* c, int64_t ldc,
                       bool accumulate = true, bool backwards = false, bool six_rows = false);

// The same columns of C += A·B with B row-major in place (element (k, n) at b[k·ldb + n]), no
// packing: for a few rows of A that stream B once or a few times, packing costs more than it
// saves. Each element gets exactly the sum GemmPackedRhsCols gives it (the same depth blocks
// and micro-kernels), and col_begin may be any column.
template <typename S>
void GemmRowMajorRhsCols(int64_t M, int64_t N, int64_t K, int64_t col_begin, int64_t col_end,
                         const S* a, int64_t lda, const S* b, int64_t ldb, S* c, int64_t ldc,
                         bool accumulate = true);

// LSTM weights in "gate groups": U = kGateGroupUnits<S> units (two panels' width over 4)
// per group, group q's columns [q·4U, q·4U + 4u) holding the four gates of units [qU, qU + u)
// as [i(u) f(u) c(u) o(u)] (u = U but for the last group). So a product's gates for a range of
// whole groups are a range of whole panels, and each gate of a full group is U contiguous
// values (one SIMD register of S). PackGateRows packs rows [k0, k1) of w [K, 4H] (Keras gate
// blocks i, f, c, o of H columns each) reordered so, as PackRhs(…, K, 4H, …) lays it out;
// packing every row gives the whole packed matrix. Each source row is read front to back
// (packing panel by panel reads a few values of every row in turn, which the prefetcher
// cannot follow).
template <typename S>
constexpr int kGateGroupUnits = 64 / sizeof(S);  // one 64-byte register per gate of a group
template <typename S>
void PackGateRows(const S* w, int64_t K, int64_t H, int64_t k0, int64_t k1, S* out);

// Columns per packed panel (two SIMD registers of S).
template <typename S>
int64_t PanelWidth();

}  // namespace fusedlstm

#endif  // FUSEDLSTM_CPU_GEMM_H_
