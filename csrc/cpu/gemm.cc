// The packed-RHS GEMM of gemm.h: an 8 × (2 vectors) register-blocked micro-kernel written with
// GCC/Clang vector extensions (64-byte vectors: one AVX-512 register, two AVX2 ones, ...).
// This file is compiled with FMA contraction on (the micro-kernel's acc += a·b must be an FMA);
// every element of C goes through the same instruction sequence for a given K, so contraction
// cannot make results depend on position, alignment or threads.
#include "gemm.h"

#include <Eigen/Core>
#include <algorithm>
#include <cstring>

namespace fusedlstm {
namespace {

constexpr int64_t kKc = 256;  // depth of one packed block (A rows stay in L1 across a panel)
constexpr int kMr = 8;        // rows per micro-tile

template <typename S>
struct Traits {
  typedef S Vec __attribute__((vector_size(64)));
  static constexpr int kLanes = 64 / sizeof(S);
  static constexpr int kNr = 2 * kLanes;  // columns per panel
};

inline int64_t RoundUp(int64_t n, int64_t m) { return (n + m - 1) / m * m; }
inline int64_t CeilDivI(int64_t n, int64_t m) { return (n + m - 1) / m; }

// C's vector at row: acc, or row + acc.
template <typename S, typename V>
inline void StoreOrAdd(S* row, const V& acc, bool store) {
  V c = acc;
  if (!store) {
    std::memcpy(&c, row, sizeof(V));
    c += acc;
  }
  std::memcpy(row, &c, sizeof(V));
}

// `panel`: row k of the panel's NR columns at panel + k·ldb (ldb = NR when packed).
template <typename S, int MR>
inline void MicroKernel(int64_t kc, const S* a, int64_t lda, const S* panel, int64_t ldb, S* c,
                        int64_t ldc, int64_t cols, bool store) {
  using T = Traits<S>;
  using V = typename T::Vec;
  constexpr int L = T::kLanes, NR = T::kNr;
  V acc[MR][2];
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = V{};
  for (int64_t k = 0; k < kc; ++k) {
    V b0, b1;
    std::memcpy(&b0, panel + k * ldb, sizeof(V));
    std::memcpy(&b1, panel + k * ldb + L, sizeof(V));
    for (int r = 0; r < MR; ++r) {
      const S x = a[r * lda + k];
      acc[r][0] += x * b0;
      acc[r][1] += x * b1;
    }
  }
  for (int r = 0; r < MR; ++r) {
    S* row = c + r * ldc;
    if (cols == NR) {
      StoreOrAdd(row, acc[r][0], store);
      StoreOrAdd(row + L, acc[r][1], store);
    } else {
      S tmp[NR];
      std::memcpy(tmp, &acc[r][0], sizeof(V));
      std::memcpy(tmp + L, &acc[r][1], sizeof(V));
      for (int64_t q = 0; q < cols; ++q) row[q] = store ? tmp[q] : row[q] + tmp[q];
    }
  }
}

template <typename S>
void Tail(int rows, int64_t kc, const S* a, int64_t lda, const S* panel, int64_t ldb, S* c,
          int64_t ldc, int64_t cols, bool store) {
  switch (rows) {
    case 1:
      return MicroKernel<S, 1>(kc, a, lda, panel, ldb, c, ldc, cols, store);
    case 2:
      return MicroKernel<S, 2>(kc, a, lda, panel, ldb, c, ldc, cols, store);
    case 3:
      return MicroKernel<S, 3>(kc, a, lda, panel, ldb, c, ldc, cols, store);
    case 4:
      return MicroKernel<S, 4>(kc, a, lda, panel, ldb, c, ldc, cols, store);
    case 5:
      return MicroKernel<S, 5>(kc, a, lda, panel, ldb, c, ldc, cols, store);
    case 6:
      return MicroKernel<S, 6>(kc, a, lda, panel, ldb, c, ldc, cols, store);
    case 7:
      return MicroKernel<S, 7>(kc, a, lda, panel, ldb, c, ldc, cols, store);
    default:
      return;
  }
}

}  // namespace

template <typename S>
int64_t PackedRhsSize(int64_t K, int64_t N) {
  return K * RoundUp(N, Traits<S>::kNr);
}

// Rows [0, k) of a full panel (returned: kc rounded down to the tile size) from a transposed
// source: element (k, q) is src[q * col_stride + k]. Each L × L tile is L contiguous loads, an
// in-register transpose (Eigen's ptranspose) and L contiguous stores; element by element it
// was a strided store per element (30 µs for R at H = 128, 13 µs this way).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wignored-attributes"  // Eigen's packet types as template args
template <typename S>
int64_t PackTransposedTiles(const S* src, int64_t col_stride, int64_t kc, S* dst) {
  namespace ei = Eigen::internal;
  using Packet = typename ei::packet_traits<S>::type;
  constexpr int L = ei::unpacket_traits<Packet>::size, NR = Traits<S>::kNr;
  static_assert(NR % L == 0, "a panel is whole tiles wide");
  int64_t k0 = 0;
  for (; k0 + L <= kc; k0 += L) {
    for (int q0 = 0; q0 < NR; q0 += L) {
      ei::PacketBlock<Packet, L> tile;
      for (int i = 0; i < L; ++i) {
        tile.packet[i] = ei::ploadu<Packet>(src + (q0 + i) * col_stride + k0);
      }
      ei::ptranspose(tile);
      for (int i = 0; i < L; ++i) ei::pstoreu(dst + (k0 + i) * NR + q0, tile.packet[i]);
    }
  }
  return k0;
}
#pragma GCC diagnostic pop

// Layout: depth blocks of kKc; inside block pc, panel j (columns j..j+NR) is kc × NR row-major
// at offset pc * Np + j * kc, zero-padded past N.
template <typename S>
void PackRhs(const S* b, int64_t row_stride, int64_t col_stride, int64_t K, int64_t N, S* out) {
  constexpr int NR = Traits<S>::kNr;
  const int64_t Np = RoundUp(N, NR);
  for (int64_t pc = 0; pc < K; pc += kKc) {
    const int64_t kc = std::min(kKc, K - pc);
    for (int64_t j = 0; j < Np; j += NR) {
      S* dst = out + pc * Np + j * kc;
      const int64_t cols = std::min<int64_t>(NR, N - j);
      const S* src = b + pc * row_stride + j * col_stride;
      if (col_stride == 1) {  // rows of B are contiguous: copy them
        for (int64_t k = 0; k < kc; ++k) {
          std::memcpy(dst + k * NR, src + k * row_stride, sizeof(S) * cols);
          std::fill(dst + k * NR + cols, dst + (k + 1) * NR, S(0));
        }
        continue;
      }
      // Otherwise (a transposed matrix): a whole panel of contiguous source rows goes by square
      // tiles of the SIMD width, transposed in registers; the rest element by element, down
      // each column.
      if (cols < NR) std::fill(dst, dst + kc * NR, S(0));
      const int64_t k0 =
          row_stride == 1 && cols == NR ? PackTransposedTiles(src, col_stride, kc, dst) : 0;
      for (int64_t q = 0; q < cols; ++q) {
        const S* col = src + q * col_stride;
        for (int64_t k = k0; k < kc; ++k) dst[k * NR + q] = col[k * row_stride];
      }
    }
  }
}

namespace {

// A few rows against P panels at once: with one row and one panel the micro-kernel has two
// accumulators, and each k waits on the previous FMA (latency bound, a quarter of the FMA
// rate); P panels give 2·P independent chains. Each element's sum runs over k in the same
// order as in MicroKernel, so results are identical to it.
// Panel p's row k at panels + p·ps + k·ldb (packed: ps = kc·NR, ldb = NR; row-major B: ps = NR).
template <typename S, int MR, int P>
inline void MicroKernelWide(int64_t kc, const S* a, int64_t lda, const S* panels, int64_t ldb,
                            int64_t ps, S* c, int64_t ldc, bool store) {
  using T = Traits<S>;
  using V = typename T::Vec;
  constexpr int L = T::kLanes, NR = T::kNr;
  V acc[MR][P][2];
  for (int r = 0; r < MR; ++r) {
    for (int p = 0; p < P; ++p) acc[r][p][0] = acc[r][p][1] = V{};
  }
  for (int64_t k = 0; k < kc; ++k) {
    V b[P][2];
    for (int p = 0; p < P; ++p) {
      std::memcpy(&b[p][0], panels + p * ps + k * ldb, sizeof(V));
      std::memcpy(&b[p][1], panels + p * ps + k * ldb + L, sizeof(V));
    }
    for (int r = 0; r < MR; ++r) {
      const S x = a[r * lda + k];
      for (int p = 0; p < P; ++p) {
        acc[r][p][0] += x * b[p][0];
        acc[r][p][1] += x * b[p][1];
      }
    }
  }
  for (int r = 0; r < MR; ++r) {
    for (int p = 0; p < P; ++p) {
      S* row = c + r * ldc + p * NR;
      StoreOrAdd(row, acc[r][p][0], store);
      StoreOrAdd(row + L, acc[r][p][1], store);
    }
  }
}

// All M rows (a multiple of MR) against the P whole panels starting at `panels`.
template <typename S, int MR, int P>
inline void WideRows(int64_t M, int64_t kc, const S* a, int64_t lda, const S* panels, int64_t ldb,
                     int64_t ps, S* c, int64_t ldc, bool store) {
  for (int64_t i = 0; i + MR <= M; i += MR) {
    MicroKernelWide<S, MR, P>(kc, a + i * lda, lda, panels, ldb, ps, c + i * ldc, ldc, store);
  }
}

}  // namespace

template <typename S>
int64_t PanelWidth() {
  return Traits<S>::kNr;
}

namespace {

// Panel `panel`'s columns of w [K, 4H] in gate groups as runs of one gate of one group:
// (first column in the panel, source column, length); at most 8 runs. Returns their number.
template <typename S>
int PanelRuns(int64_t H, int64_t panel, int64_t runs[8][3]) {
  constexpr int NR = Traits<S>::kNr, U = kGateGroupUnits<S>;
  const int64_t c0 = panel * NR, c1 = std::min(c0 + NR, 4 * H);
  int n_runs = 0;
  for (int64_t q = c0 / (4 * U); q * 4 * U < c1; ++q) {
    const int64_t u = std::min<int64_t>(U, H - q * U);
    for (int64_t g = 0; g < 4; ++g) {
      const int64_t b = std::max(c0, q * 4 * U + g * u), e = std::min(c1, q * 4 * U + (g + 1) * u);
      if (b < e) {
        runs[n_runs][0] = b - c0;
        runs[n_runs][1] = g * H + q * U + (b - q * 4 * U - g * u);
        runs[n_runs][2] = e - b;
        ++n_runs;
      }
    }
  }
  return n_runs;
}

// One source row's runs into one packed row (zero-padded when the panel is narrow).
template <typename S>
inline void CopyRuns(const S* src, const int64_t runs[8][3], int n_runs, bool narrow, S* row) {
  constexpr int NR = Traits<S>::kNr, U = kGateGroupUnits<S>;
  if (narrow) std::fill(row, row + NR, S(0));
  for (int r = 0; r < n_runs; ++r) {
    if (runs[r][2] == U) {  // a whole gate of a whole group: a fixed-size copy, inlined
      std::memcpy(row + runs[r][0], src + runs[r][1], sizeof(S) * U);
    } else {
      std::memcpy(row + runs[r][0], src + runs[r][1], sizeof(S) * runs[r][2]);
    }
  }
}

}  // namespace

template <typename S>
void PackGateRows(const S* w, int64_t K, int64_t H, int64_t k0, int64_t k1, S* out) {
  constexpr int NR = Traits<S>::kNr;
  static_assert(NR == 2 * kGateGroupUnits<S>, "a gate group is two panels wide");
  constexpr int64_t kTile = 8;  // rows read together, each front to back across the panels
  const int64_t Np = RoundUp(4 * H, NR), panels = Np / NR;
  int64_t runs[8][3];
  for (int64_t t0 = k0; t0 < k1; t0 += kTile) {
    const int64_t t1 = std::min(k1, t0 + kTile);
    for (int64_t panel = 0; panel < panels; ++panel) {
      const int n_runs = PanelRuns<S>(H, panel, runs);
      const bool narrow = panel == panels - 1 && 4 * H < Np;
      for (int64_t k = t0; k < t1; ++k) {
        const int64_t pc = k / kKc * kKc, kc = std::min(kKc, K - pc);
        CopyRuns(w + k * 4 * H, runs, n_runs, narrow,
                 out + pc * Np + panel * NR * kc + (k - pc) * NR);
      }
    }
  }
}

namespace {

// B as the micro-kernels read it: packed by PackRhs (panels of a depth block contiguous), or
// row-major in place with leading dimension ld (ld = 0: packed).
template <typename S>
struct RhsView {
  const S* b;
  int64_t ld, Np;
  const S* Panel(int64_t pc, int64_t j, int64_t kc) const {
    return ld ? b + pc * ld + j : b + pc * Np + j * kc;
  }
  int64_t RowStride() const { return ld ? ld : Traits<S>::kNr; }
  int64_t PanelStride(int64_t kc) const { return ld ? Traits<S>::kNr : kc * Traits<S>::kNr; }
};

template <typename S>
void GemmCols(int64_t M, int64_t N, int64_t K, int64_t col_begin, int64_t col_end, const S* a,
              int64_t lda, const RhsView<S>& rhs, S* c, int64_t ldc, bool accumulate,
              bool backwards, bool six_rows) {
  constexpr int NR = Traits<S>::kNr;
  col_end = std::min(col_end, N);
  const int64_t ldb = rhs.RowStride();
  if (K == 0 && !accumulate) {
    for (int64_t i = 0; i < M; ++i) std::fill(c + i * ldc + col_begin, c + i * ldc + col_end, S(0));
  }
  // Columns in chunks: for few rows (small-batch inference) several panels per pass while whole
  // ones remain (M = 1 or 2 rows: 4 panels; 3 or 4 rows: 2), then one panel at a time.
  const int64_t wide = M <= 2 ? 4 * NR : M <= 4 || six_rows ? 2 * NR : 0;
  const int64_t n_wide = wide ? (col_end - col_begin) / wide : 0;
  const int64_t rest = col_begin + n_wide * wide, n_single = CeilDivI(col_end - rest, NR);
  // Chunk q's columns [j, j + w) against depth block pc.
  auto chunk = [&](int64_t pc, int64_t q) {
    const int64_t kc = std::min(kKc, K - pc), ps = rhs.PanelStride(kc);
    const S* ak = a + pc;
    const bool store = !accumulate && pc == 0;  // the first depth block writes C
    if (q < n_wide) {
      const int64_t j = col_begin + q * wide;
      const S* panel = rhs.Panel(pc, j, kc);
      switch (M) {
        case 1:
          return WideRows<S, 1, 4>(M, kc, ak, lda, panel, ldb, ps, c + j, ldc, store);
        case 2:
          return WideRows<S, 2, 4>(M, kc, ak, lda, panel, ldb, ps, c + j, ldc, store);
        case 3:
          return WideRows<S, 3, 2>(M, kc, ak, lda, panel, ldb, ps, c + j, ldc, store);
        case 4:
          return WideRows<S, 4, 2>(M, kc, ak, lda, panel, ldb, ps, c + j, ldc, store);
        default: {
          // Five rows or more: tiles of up to 6 rows × 2 panels (24 accumulators for 10 loads
          // per k, where 8 rows × 1 panel has 16 for 10), the rows split as evenly as that
          // allows (16 = 5 + 5 + 6): a tile of 3 to 6 rows has 12 to 24 independent sums, where
          // a short last tile (a row or two) would wait on each FMA's latency.
          const int64_t tiles = CeilDivI(M, 6);
          for (int64_t t = 0, i = 0; t < tiles; ++t) {
            const int64_t rows = (M - i) / (tiles - t);
            const S* ai = ak + i * lda;
            S* ci = c + i * ldc + j;
            switch (rows) {
              case 3:
                MicroKernelWide<S, 3, 2>(kc, ai, lda, panel, ldb, ps, ci, ldc, store);
                break;
              case 4:
                MicroKernelWide<S, 4, 2>(kc, ai, lda, panel, ldb, ps, ci, ldc, store);
                break;
              case 5:
                MicroKernelWide<S, 5, 2>(kc, ai, lda, panel, ldb, ps, ci, ldc, store);
                break;
              default:
                MicroKernelWide<S, 6, 2>(kc, ai, lda, panel, ldb, ps, ci, ldc, store);
            }
            i += rows;
          }
          return;
        }
      }
    }
    const int64_t j = rest + (q - n_wide) * NR, cols = std::min<int64_t>(NR, col_end - j);
    const S* panel = rhs.Panel(pc, j, kc);
    int64_t pld = ldb;
    alignas(64) S edge[kKc * NR];
    if (rhs.ld && cols < NR) {  // in place, a narrow last panel: zero-padded copy
      for (int64_t k = 0; k < kc; ++k) {
        std::memcpy(edge + k * NR, panel + k * ldb, sizeof(S) * cols);
        std::fill(edge + k * NR + cols, edge + (k + 1) * NR, S(0));
      }
      panel = edge;
      pld = NR;
    }
    int64_t i = 0;
    for (; i + kMr <= M; i += kMr) {
      MicroKernel<S, kMr>(kc, ak + i * lda, lda, panel, pld, c + i * ldc + j, ldc, cols, store);
    }
    Tail<S>(static_cast<int>(M - i), kc, ak + i * lda, lda, panel, pld, c + i * ldc + j, ldc, cols,
            store);
  };
  const int64_t chunks = n_wide + n_single;
  if (M >= kMr) {  // depth blocks outer: A's block stays in cache across the columns
    for (int64_t pc = 0; pc < K; pc += kKc) {
      for (int64_t q = 0; q < chunks; ++q) chunk(pc, q);
    }
    return;
  }
  // Few rows: B streams once, chunk by chunk (each over all its depth), first to last or last to
  // first. Alternating the two from one step to the next, a B larger than the cache finds its
  // most recently read part (a cache's worth) still there at the start of the next step; in
  // one direction every step would evict each part just before it is needed again.
  for (int64_t i = 0; i < chunks; ++i) {
    const int64_t q = backwards ? chunks - 1 - i : i;
    for (int64_t pc = 0; pc < K; pc += kKc) chunk(pc, q);
  }
}

}  // namespace

template <typename S>
void GemmPackedRhsCols(int64_t M, int64_t N, int64_t K, int64_t col_begin, int64_t col_end,
                       const S* a, int64_t lda, const S* packed_b, S* c, int64_t ldc,
                       bool accumulate, bool backwards, bool six_rows) {
  GemmCols<S>(M, N, K, col_begin, col_end, a, lda,
              RhsView<S>{packed_b, 0, RoundUp(N, Traits<S>::kNr)}, c, ldc, accumulate, backwards,
              six_rows);
}

template <typename S>
void GemmRowMajorRhsCols(int64_t M, int64_t N, int64_t K, int64_t col_begin, int64_t col_end,
                         const S* a, int64_t lda, const S* b, int64_t ldb, S* c, int64_t ldc,
                         bool accumulate) {
  GemmCols<S>(M, N, K, col_begin, col_end, a, lda, RhsView<S>{b, ldb, 0}, c, ldc, accumulate, false,
              true);
}

template <typename S>
void GemmPackedRhs(int64_t M, int64_t N, int64_t K, const S* a, int64_t lda, const S* packed_b,
                   S* c, int64_t ldc) {
  GemmPackedRhsCols<S>(M, N, K, 0, N, a, lda, packed_b, c, ldc);
}

#define FUSEDLSTM_INSTANTIATE(S)                                                              \
  template int64_t PackedRhsSize<S>(int64_t, int64_t);                                        \
  template void PackRhs<S>(const S*, int64_t, int64_t, int64_t, int64_t, S*);                 \
  template void GemmPackedRhs<S>(int64_t, int64_t, int64_t, const S*, int64_t, const S*, S*,  \
                                 int64_t);                                                    \
  template void GemmPackedRhsCols<S>(int64_t, int64_t, int64_t, int64_t, int64_t, const S*,   \
                                     int64_t, const S*, S*, int64_t, bool, bool, bool);       \
  template void GemmRowMajorRhsCols<S>(int64_t, int64_t, int64_t, int64_t, int64_t, const S*, \
                                       int64_t, const S*, int64_t, S*, int64_t, bool);        \
  template int64_t PanelWidth<S>();                                                           \
  template void PackGateRows<S>(const S*, int64_t, int64_t, int64_t, int64_t, S*);
FUSEDLSTM_INSTANTIATE(float)
FUSEDLSTM_INSTANTIATE(double)
#undef FUSEDLSTM_INSTANTIATE

}  // namespace fusedlstm
