// Eigen implementation of the fused LSTM contract (fusedlstm/lstm.h) for CpuDevice.
//
// Training forward: one parallel region for the input-projection GEMM over all steps, the packing
// of the recurrent weights and the cache's copies (nothing serial idles the other threads), then
// the recurrence, whose tasks each own a block of rows × hidden units: per step the task's slice of
// the recurrent GEMM (one GEMM: the weights are gate-interleaved per unit block, and packed once
// per call for gemm.h's kernel, not re-packed every step) followed at once by its fused
// gate/cell/output pass, with no barrier in between. Backward: per step a fused pass producing the
// gate gradients dZ_t, then the GEMM dh_{t-1} = dZ_t·Rᵀ; after the loop the weight, input and bias
// gradients are single GEMMs over all steps, tiled into one parallel_for. Two task grids
// (StepGrid): usually tasks are row blocks that run all T steps of their rows in one parallel_for
// (rows never interact in the recurrence); small batches with a large R split each step by hidden
// units, one parallel_for (backward: two) per step. Either way, a task whose rows are all past
// their length skips the step's GEMMs.
//
// Reproducibility: every partition is derived from the shape alone and each task's arithmetic
// is the same whichever thread runs it, so results are bit-identical for any thread count.
// Transcendentals are evaluated into 64-byte-aligned stack rows so Eigen's packet/scalar split
// depends on indices only, never on where NumPy allocated an array.
//
// Internal layout (batch-major; "interleaved" = for the unit block [u0, u1) of nu units, gate g
// of unit u0 + j sits at column 4·u0 + g·nu + j, so one block's four gates are contiguous):
//   cache:  Wp [C, 4H], Rp [H, 4H] (interleaved copies of kernel, recurrent_kernel),
//           x [N, T, C] (copy), gates [N, T, 4H] (interleaved; pre-activations, then activated
//           gates, then dZ during backward), hprev [N, T, H] (h_{t-1} of every step),
//           cstate [N, T+1, H] (c_{t-1} at t, c_t at t+1)
#include <algorithm>
#include <cmath>
#include <cstring>

#include <Eigen/Core>

#include "../common/activations.h"
#include "fusedlstm/lstm.h"
#include "fusedlstm/lstm_infer.h"
#include "gemm.h"
#include "gemm_bf16.h"

#include <atomic>
#include <thread>
#include <type_traits>

#ifndef EIGEN_DONT_PARALLELIZE
#error "Build with EIGEN_DONT_PARALLELIZE: threads come only through CpuDevice."
#endif

namespace fusedlstm {
namespace {

constexpr int64_t kChunk = 64;  // units per fused-pass chunk (stack rows)

// The per-step passes visit each row's slice of the cache at one time step: slices a whole row of
// steps apart (T·4H floats), which the hardware prefetcher cannot predict, so every step would
// wait on memory. Each task asks for the slices its rows need at the next step while it works on
// this one (write = 1 for slices about to be written).
template <int Write = 0>
inline void PrefetchSpan(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(c + o, Write, 3);
}
constexpr int64_t kMaxUnitParts = 8;  // unit blocks per step, at most
constexpr int64_t kMinUnitsPerPart = 16;
constexpr double kStepTaskFlops = 2e6;  // recurrent-GEMM FLOPs worth one more task
constexpr int64_t kTileRows = 512;      // hoisted GEMMs: output tile size
constexpr int64_t kTileCols = 1024;

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
template <typename S>
using AMapA = Eigen::Map<VecA<S>, Eigen::Aligned64>;  // a 64-byte-aligned stack row

inline int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

struct Range {
  int64_t begin, end;
  int64_t size() const { return end - begin; }
};
// Part p of [0, n) split into k nearly equal parts.
inline Range Part(int64_t n, int64_t k, int64_t p) { return {n * p / k, n * (p + 1) / k}; }

// Parts for a dimension of n split into blocks of about `block`; more than one part is rounded
// up to a multiple of 4 so that 2 or 4 threads share tiles evenly.
inline int64_t Parts(int64_t n, int64_t block) {
  int64_t p = CeilDiv(n, block);
  if (p > 1) p = std::min<int64_t>(n, CeilDiv(p, 4) * 4);
  return std::max<int64_t>(1, p);
}

// Floats a bfloat16 pack of a K × N right-hand side takes (two elements per float).
inline int64_t Bf16PackFloats(int64_t K, int64_t N) { return (PackedRhsBf16Size(K, N) + 1) / 2; }

// The operand precision of one call's products: Scalar's own packed GEMM (gemm.h), or
// bfloat16 operands on the engine gemm_bf16.h chose. Packed right-hand sides live in buffers of
// Scalar either way (bfloat16 pairs reinterpreted).
struct Products {
  Bf16Engine engine = Bf16Engine::kNone;
  // rows: the batch of the call. One row keeps VDPBF16PS: an AMX tile (16 rows) would be all
  // padding, and the two are within 10% either way. From two rows the tiles win although mostly
  // padding, since on CPUs with AMX VDPBF16PS runs at half the FMA rate (prepared, one thread:
  // (2,100,300,512) 7.55 -> 5.15 ms, (3,50,300,256) 1.91 -> 0.63 ms). A choice from the shape,
  // so every task of a call uses one engine.
  template <typename S>
  static Products For(Precision p, int64_t rows = 1 << 30) {
    Products r;
    if (std::is_same<S, float>::value && p == Precision::kBfloat16) r.engine = Bf16Active();
    if (r.engine == Bf16Engine::kAmx && rows < 2) r.engine = Bf16Engine::kAvx512;
    return r;
  }
  bool bf16() const { return engine != Bf16Engine::kNone; }
  // Elements of S a packed K × N right-hand side takes.
  template <typename S>
  int64_t PackSize(int64_t K, int64_t N) const {
    return bf16() ? Bf16PackFloats(K, N) : PackedRhsSize<S>(K, N);
  }
  // B(k, n) = b[k·rs + n·cs], packed whole.
  template <typename S>
  void Pack(const S* b, int64_t rs, int64_t cs, int64_t K, int64_t N, S* out) const {
    if constexpr (std::is_same<S, float>::value) {
      if (bf16()) return PackRhsBf16(b, rs, cs, K, N, 0, N, reinterpret_cast<uint16_t*>(out));
    }
    PackRhs<S>(b, rs, cs, K, N, out);
  }
  // C[M, col0..col1) += A·B (A row-major, leading dimension lda), B packed by Pack or by
  // gate panels; col0 a multiple of the panel width.
  template <typename S>
  void Gemm(int64_t M, int64_t N, int64_t K, int64_t col0, int64_t col1, const S* a, int64_t lda,
            const S* packed, S* c, int64_t ldc, bool accumulate = true, bool backwards = false,
            bool six_rows = false) const {
    if constexpr (std::is_same<S, float>::value) {
      if (bf16()) {
        return GemmBf16(engine, M, N, K, col0, col1, a, lda, 1,
                        reinterpret_cast<const uint16_t*>(packed), c, ldc, accumulate, backwards);
      }
    }
    GemmPackedRhsCols<S>(M, N, K, col0, col1, a, lda, packed, c, ldc, accumulate, backwards,
                         six_rows);
  }
  // C[M, col0..col1) = A1·B1 + A2·B2, B1 and B2 packed by Pack or by gate panels: the two
  // products one after the other, or with bfloat16 products in one pass (gemm_bf16.h).
  template <typename S>
  void GemmSum(int64_t M, int64_t N, int64_t K1, int64_t K2, int64_t col0, int64_t col1,
               const S* a1, int64_t lda1, const S* packed1, const S* a2, int64_t lda2,
               const S* packed2, S* c, int64_t ldc, bool backwards, bool six_rows) const {
    if constexpr (std::is_same<S, float>::value) {
      if (bf16()) {
        return GemmBf16Sum(engine, M, N, K1, K2, col0, col1, a1, lda1,
                           reinterpret_cast<const uint16_t*>(packed1), a2, lda2,
                           reinterpret_cast<const uint16_t*>(packed2), c, ldc, backwards);
      }
    }
    Gemm<S>(M, N, K1, col0, col1, a1, lda1, packed1, c, ldc, false, backwards, six_rows);
    Gemm<S>(M, N, K2, col0, col1, a2, lda2, packed2, c, ldc, true, backwards, six_rows);
  }
  // bfloat16 only: C1 (+)= A·B1 and C2 (+)= A·B2 (all their N1, N2 columns), A rounded once.
  template <typename S>
  void GemmShared(int64_t M, int64_t K, const S* a, int64_t lda, int64_t N1, const S* packed1,
                  S* c1, int64_t ldc1, bool accumulate1, int64_t N2, const S* packed2, S* c2,
                  int64_t ldc2, bool accumulate2) const {
    if constexpr (std::is_same<S, float>::value) {
      GemmBf16Shared(
          engine, M, K, a, lda,
          Bf16Rhs{N1, reinterpret_cast<const uint16_t*>(packed1), c1, ldc1, accumulate1},
          Bf16Rhs{N2, reinterpret_cast<const uint16_t*>(packed2), c2, ldc2, accumulate2});
    }
  }
  // bfloat16 only, for the hoisted products. Columns [32·task, 32·task + 32) of B packed, a
  // task of a parallel region that packs the whole matrix:
  template <typename S>
  void PackTask(const S* b, int64_t rs, int64_t cs, int64_t K, int64_t N, int64_t task,
                S* out) const {
    if constexpr (std::is_same<S, float>::value) {
      PackRhsBf16(b, rs, cs, K, N, 32 * task, std::min(N, 32 * (task + 1)),
                  reinterpret_cast<uint16_t*>(out));
    }
  }
  // and C[M, N] = A·B, A(m, k) = a[m·ars + k·acs], B packed whole.
  template <typename S>
  void Product(int64_t M, int64_t N, int64_t K, const S* a, int64_t ars, int64_t acs,
               const S* packed, S* c, int64_t ldc) const {
    if constexpr (std::is_same<S, float>::value) {
      GemmBf16(engine, M, N, K, 0, N, a, ars, acs, reinterpret_cast<const uint16_t*>(packed), c,
               ldc, false);
    }
  }
};

// The per-step task grid (rows × unit blocks): a function of the shape alone, shared by forward
// and backward because the interleaved layout depends on the unit blocks.
//
// Rows of the batch never interact: the recurrence of a block of rows needs only that block's
// own h_{t-1} (forward) and dZ_t (backward). So the grid usually has row blocks only and each
// task runs all T steps of its rows ("whole-sequence" tasks): one parallel region per pass
// instead of one (two in backward) per step, and each core's rows stay in its own cache. Each
// task reads all of R every step, from L2 while it fits and from L3 beyond (measured on 2
// cores: faster than unit blocks at every size from H = 128 to 512, 1 and 2 threads). Small
// batches with large weights, too few rows for 4 blocks, split each step by hidden units
// instead, each task owning a slice of R, with a barrier per step.
constexpr double kWholeSequenceAnyRowsBytes = 512 * 1024;  // R as float, H·4H·4 bytes
constexpr int64_t kWholeSequenceRowBlock = 16;
struct StepGrid {
  int64_t row_parts = 1, unit_parts = 1;
  bool whole_sequence = false;  // tasks own rows for all steps (no per-step barrier)
  // rows_only: row-block tasks whatever the shape (recurrent masks need each gate's columns
  // contiguous, Keras's order, which a unit split interleaves).
  explicit StepGrid(const LstmShape& s, bool rows_only = false) {
    row_parts = CeilDiv(std::max<int64_t>(s.N, 1), kWholeSequenceRowBlock);
    if (row_parts > 1) row_parts = std::min<int64_t>(s.N, CeilDiv(row_parts, 4) * 4);
    if (rows_only || row_parts >= 4 ||
        16.0 * double(s.H) * double(s.H) <= kWholeSequenceAnyRowsBytes) {
      whole_sequence = true;
      return;
    }
    row_parts = 1;  // N <= 16 here
    const double step_flops = 2.0 * double(s.N) * double(s.H) * 4.0 * double(s.H);
    const int64_t want = static_cast<int64_t>(step_flops / kStepTaskFlops) + 1;
    const int64_t most = std::max<int64_t>(1, std::min(kMaxUnitParts, s.H / kMinUnitsPerPart));
    unit_parts = std::max<int64_t>(1, std::min(want, most));
    // As for tiles: more than one part is rounded up to a multiple of 4 (within the cap) so
    // 2 or 4 threads share a step evenly; 3 tasks on 2 threads would idle one a third of it.
    if (unit_parts > 1) unit_parts = std::min(most, CeilDiv(unit_parts, 4) * 4);
  }
  int64_t count() const { return row_parts * unit_parts; }
  Range rows(const LstmShape& s, int64_t task) const {
    return Part(s.N, row_parts, task / unit_parts);
  }
  Range units(const LstmShape& s, int64_t task) const {
    return Part(s.H, unit_parts, task % unit_parts);
  }
  int64_t unit_block(int64_t task) const { return task % unit_parts; }
};

// The backward's per-step GEMM, dh[rows, units] += dZ_t[rows, :]·Rp[units, :]ᵀ, has only the
// units as output columns: with the step grid's small unit blocks (16 units at H = 128) half of
// every 32-wide micro-tile would be padding. Its own grid gives each task whole micro-tile
// widths of units (32 floats), keeps the step grid's row blocks, and splits rows further when
// that leaves fewer than 4 tasks. Any partition gives the same sums (each output's K order is
// fixed), so results do not change. Whole-sequence tasks keep the step grid (all units).
inline StepGrid BackwardGemmGrid(const LstmShape& s, bool rows_only = false) {
  StepGrid g(s, rows_only);
  if (g.whole_sequence) return g;
  constexpr int64_t kWidth = 32;
  g.unit_parts = std::max<int64_t>(1, std::min<int64_t>(kMaxUnitParts, s.H / kWidth));
  while (g.row_parts * g.unit_parts < 4 && s.N / (2 * g.row_parts) >= 8) g.row_parts *= 2;
  return g;
}

// Weights packed once per call for the per-step GEMMs, one packed matrix per unit block.
// Forward packs Wp[:, block] (K = C) and Rp[:, block] (K = H), N = 4·nu each; backward packs
// Rp[units, :]ᵀ (K = 4H, N = nu). Sizes use float's panel width, an upper bound for double's.
struct PackedSteps {
  int64_t offset[kMaxUnitParts + 1];
  PackedSteps(const LstmShape& s, const StepGrid& grid, bool backward, int64_t K, bool bf16) {
    offset[0] = 0;
    for (int64_t k = 0; k < grid.unit_parts; ++k) {
      const int64_t nu = Part(s.H, grid.unit_parts, k).size();
      const int64_t rows = backward ? 4 * s.H : K, cols = backward ? nu : 4 * nu;
      offset[k + 1] =
          offset[k] + (bf16 ? Bf16PackFloats(rows, cols) : PackedRhsSize<float>(rows, cols));
    }
  }
  int64_t total(const StepGrid& grid) const { return offset[grid.unit_parts]; }
};

// The recurrent weights packed per gate, R[:, gate g] as its own [H, H] (recurrent masks).
inline int64_t PerGateSize(const LstmShape& s, bool bf16) {
  return 4 * (bf16 ? Bf16PackFloats(s.H, s.H) : PackedRhsSize<float>(s.H, s.H));
}

// Rows [0, count) of dst = src ⊙ mask (row strides ld_src, H, H).
template <typename S>
void MaskRows(const S* src, int64_t ld_src, const S* mask, int64_t count, int64_t H, S* dst) {
  for (int64_t r = 0; r < count; ++r) {
    MapA<S>(dst + r * H, H) = CMapA<S>(src + r * ld_src, H) * CMapA<S>(mask + r * H, H);
  }
}

// Packs unit block k of the interleaved weights w ([K, 4H] forward; R, [H, 4H], transposed per
// block backward).
template <typename S>
void PackStepBlock(const LstmShape& s, const StepGrid& grid, const PackedSteps& packed,
                   const Products& p, const S* w, int64_t K, bool backward, S* out, int64_t k) {
  const int64_t G = 4 * s.H;
  const Range u = Part(s.H, grid.unit_parts, k);
  if (backward) {  // B(j, n) = Rp[u0 + n, j]
    p.Pack<S>(w + u.begin * G, 1, G, G, u.size(), out + packed.offset[k]);
  } else {  // B(j, n) = w[j, 4·u0 + n]
    p.Pack<S>(w + 4 * u.begin, G, 1, K, 4 * u.size(), out + packed.offset[k]);
  }
}

// The hoisted GEMMs' tasks with bfloat16 products: blocks of whole rows (every column), 64
// rows each (two AMX tile rows, twice), so each block rounds its rows of A once.
struct RowBlocks {
  static constexpr int64_t kRows = 64;
  int64_t M;
  int64_t count() const { return CeilDiv(M, kRows); }
  Range rows(int64_t task) const { return {task * kRows, std::min(M, (task + 1) * kRows)}; }
};

inline int64_t PackTasks(int64_t N) { return CeilDiv(N, 32); }  // Products::PackTask's count

// A fixed grid of output tiles for a GEMM of M × Nc.
struct TileGrid {
  int64_t row_parts, col_parts, M, Nc;
  TileGrid(int64_t m, int64_t nc)
      : row_parts(Parts(m, kTileRows)), col_parts(Parts(nc, kTileCols)), M(m), Nc(nc) {}
  int64_t count() const { return M > 0 && Nc > 0 ? row_parts * col_parts : 0; }
  Range rows(int64_t task) const { return Part(M, row_parts, task / col_parts); }
  Range cols(int64_t task) const { return Part(Nc, col_parts, task % col_parts); }
};

// Keras layout [rows, 4H] <-> interleaved layout [rows, 4H]; `to_interleaved` picks the direction.
template <typename S>
void Interleave(const LstmShape& s, const StepGrid& grid, const S* src, S* dst, int64_t rows,
                bool to_interleaved) {
  const int64_t H = s.H, G = 4 * H;
  if (grid.unit_parts == 1) {  // one block: the layouts coincide
    if (rows * G > 0) std::memcpy(dst, src, sizeof(S) * rows * G);
    return;
  }
  for (int64_t k = 0; k < grid.unit_parts; ++k) {
    const Range u = Part(H, grid.unit_parts, k);
    for (int64_t g = 0; g < 4; ++g) {
      const int64_t keras = g * H + u.begin, inter = 4 * u.begin + g * u.size();
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t from = r * G + (to_interleaved ? keras : inter);
        const int64_t to = r * G + (to_interleaved ? inter : keras);
        std::memcpy(dst + to, src + from, sizeof(S) * u.size());
      }
    }
  }
}

template <typename S>
struct CacheView {
  S *kernel, *rkernel, *x, *gates, *hprev, *cstate;
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

// Which of a row's steps are valid, and the time position each step reads x from and writes
// its output to. Right-padded lengths: steps t < length, at t, or in a reverse pass at
// length-1-t (the padded steps stay where they are). A step mask: any steps; a reverse pass
// reads positions T-1 ... 0. Steps are counted in the order they run.
struct Steps {
  const int32_t* lengths;
  const uint8_t* mask;
  int64_t T;
  bool reverse;
  int64_t pos(int64_t n, int64_t t) const {
    if (!reverse) return t;
    if (mask) return T - 1 - t;
    const int64_t len = Length(lengths, n, T);
    return t < len ? len - 1 - t : t;
  }
  bool valid(int64_t n, int64_t t) const {
    return mask ? mask[n * T + pos(n, t)] != 0 : t < Length(lengths, n, T);
  }
  bool any_invalid() const { return lengths != nullptr || mask != nullptr; }
  // Steps [0, active) hold a valid step for at least one of the rows; past it every row only
  // carries its state, and the steps' GEMMs can be skipped.
  int64_t active(Range rows) const {
    if (mask) {
      int64_t active = 0;
      for (int64_t n = rows.begin; n < rows.end; ++n) {
        for (int64_t t = T; t > active; --t) {
          if (valid(n, t - 1)) {
            active = t;
            break;
          }
        }
      }
      return active;
    }
    if (!lengths) return T;
    int64_t active = 0;
    for (int64_t n = rows.begin; n < rows.end; ++n) active = std::max<int64_t>(active, lengths[n]);
    return std::min(active, T);
  }
};

// dst[n, t] = src[n, pos(n, t)] for rows of `width` elements: a reverse pass's inputs in the
// order its steps read them, so every per-step product stays one strided GEMM over a row block.
template <typename S>
void GatherSteps(const CpuDevice& device, const LstmShape& s, const Steps& steps, const S* src,
                 S* dst, int64_t width) {
  ParallelFor(device, s.N, double(s.T) * width * s.N, [&](int64_t n) {
    for (int64_t t = 0; t < s.T; ++t) {
      std::memcpy(dst + (n * s.T + t) * width, src + (n * s.T + steps.pos(n, t)) * width,
                  sizeof(S) * width);
    }
  });
}

template <typename S>
bool AllFinite(const S* p, int64_t count) {
  // x·0 is 0 for a finite x and NaN for ±Inf and NaN, and a NaN survives the sum: one
  // vectorized pass (Eigen's allFinite() tests element by element, 6× slower at H = 128).
  return !std::isnan((CMapA<S>(p, count) * S(0)).sum());
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

// The activations of one call: the classic pair (tanh, sigmoid) keeps its own code path.
struct Acts {
  Activation act = Activation::kTanh, rec = Activation::kSigmoid;
  bool classic() const { return act == Activation::kTanh && rec == Activation::kSigmoid; }
};

// What a training forward and its backward derive alike from their arguments (ForwardArgs or
// BackwardArgs): the task grid, the output stride, the activations, the step map.
template <typename S>
struct Setup {
  bool masked;  // recurrent masks: each gate its own product, row-block tasks
  StepGrid grid;
  Products products;
  int64_t ld, gate_pack;
  Acts acts;
  Steps steps;
  template <typename Args>
  Setup(const LstmShape& s, const Args& a, int threads)
      : masked(a.recurrent_masks != nullptr),
        grid(s, masked),
        products(Products::For<S>(a.precision, s.N)),
        ld(a.out_ld ? a.out_ld : s.H),
        gate_pack(products.PackSize<S>(s.H, s.H)),
        acts{a.activation, a.recurrent_activation},
        steps{a.lengths, a.step_mask, s.T, a.reverse} {
    if (products.bf16()) Bf16RowBlocks(s, threads, &grid);
  }
  // bfloat16 whole-sequence tasks: as few row blocks as keep every thread busy (each streams
  // the packed R once per step; a row's sums are the same in any block, so results do not
  // depend on the thread count).
  static void Bf16RowBlocks(const LstmShape& s, int threads, StepGrid* g) {
    if (!g->whole_sequence) return;
    g->row_parts =
        std::max<int64_t>(1, std::min<int64_t>(s.N, std::max<int64_t>(threads, CeilDiv(s.N, 128))));
  }
};

// The LSTM cell on m units, the step's one piece of arithmetic, shared by the training forward
// and inference: z[g] the pre-activations of gate g (without bias), b[g] its bias, c_prev the
// previous cell state. Writes the activated gates to gate[g], the new cell state to cell and
// the output to hid (64-byte-aligned rows). Size: m when fixed (one SIMD register per gate).
template <typename S, int Size = Eigen::Dynamic>
inline void Cell(const S* const z[4], const S* const b[4], const S* c_prev, int64_t m,
                 S* const gate[4], S* cell, S* hid, Acts acts = Acts()) {
  using Arr = Eigen::Array<S, Size, 1>;
  using In = Eigen::Map<const Arr>;
  using Out = Eigen::Map<Arr, Eigen::Aligned64>;
  Out i(gate[0], m), f(gate[1], m), g(gate[2], m), o(gate[3], m), cn(cell, m), hn(hid, m);
  if (acts.classic()) {
    i = Sigmoid(In(z[0], m) + In(b[0], m));
    f = Sigmoid(In(z[1], m) + In(b[1], m));
    g = Tanh(In(z[2], m) + In(b[2], m));
    o = Sigmoid(In(z[3], m) + In(b[3], m));
    cn = f * In(c_prev, m) + i * g;
    hn = o * Tanh(cn);
    return;
  }
  ApplyActivation(acts.rec, In(z[0], m) + In(b[0], m), i);
  ApplyActivation(acts.rec, In(z[1], m) + In(b[1], m), f);
  ApplyActivation(acts.act, In(z[2], m) + In(b[2], m), g);
  ApplyActivation(acts.rec, In(z[3], m) + In(b[3], m), o);
  cn = f * In(c_prev, m) + i * g;
  ApplyActivation(acts.act, cn, hn);  // activation(c), then the output gate
  hn = o * hn;
}

}  // namespace

// ---- Inference (lstm_infer.h) ----
//
// Weights are packed in gate groups (gemm.h): a task's share of the hidden units is a range of
// packed panels, and each gate of a group is one SIMD register wide, so the gate pass reads
// the GEMM's output in place. The input projection is hoisted out of the recurrence whenever
// its result fits a budget: Zx = X·W for all steps in one GEMM on W packed once (for one row
// that turns T passes over W, each a GEMV streaming all of W, into one pass), and each step
// adds h_{t-1}·R onto its slice. Past the budget (large batches, where each task has rows
// enough to reuse W from registers) x_t·W runs inside the step. The choice depends on the
// shape alone.
//
// Tasks are row blocks running every step of their rows (rows never interact), or, when there
// are too few rows to give every thread a block worth the micro-kernel, unit blocks of all rows
// pipelined step by step: a worker claims (step, block) items in order and starts one only
// once the previous step is complete. Every element's arithmetic is the same in any partition
// (unit blocks are whole groups), so the grid may follow the thread count.
namespace {

constexpr double kHoistElements = 16.0 * 1024 * 1024;  // Zx for all steps: 64 MiB of float
constexpr int64_t kMinRowsPerTask = 8;                 // the micro-kernel's row tile
constexpr int64_t kInferRowBlock = 32;
constexpr int64_t kAmxTileRows = 16;
// Step FLOPs a pipelined unit block must carry to pay for waiting on the previous step.
constexpr double kMinPipelineBlockFlops = 1.0e5;

// bfloat16 products hoist the projection only below one AMX tile of rows (16): there a step's
// product would stream W for a mostly empty tile. From 16 rows a step's product of x_t with W
// is as fast as the hoisted one, and skipping the [N, T, 4H] round trip through memory wins
// (measured: (64,50,300,128) 2.46 -> 2.02 ms, (128,100,256,512) 88 -> 50 ms on one thread;
// 8 rows 102 -> 111 us the other way).
inline bool HoistProjection(const LstmShape& s, Precision precision = Precision::kFloat32) {
  if (precision == Precision::kBfloat16 && s.N >= kAmxTileRows) return false;
  const double budget = precision == Precision::kBfloat16 ? 2 * kHoistElements : kHoistElements;
  return double(s.N) * double(s.T) * 4.0 * double(s.H) <= budget;
}

// A plain inference call packs the weights, a read and a write of each, for products that read
// them N·T times. Read in place (rows a row's length apart) a product runs about 1.5× slower
// than on packed panels (measured at B = 1, H = 128 and 256), so in place pays only when each
// weight is read once or twice: a step or two of a small batch (token-by-token streaming).
inline bool InPlaceWeights(const LstmShape& s, Precision precision) {
  if (precision != Precision::kFloat32) return false;  // bfloat16 converts while it packs
  return s.N < kMinRowsPerTask && s.T <= 2;
}

template <typename S>
struct PreparedView {
  const S *wpack = nullptr, *rpack = nullptr, *b = nullptr;
  PreparedView() = default;
  PreparedView(const S* base, int64_t C, int64_t H, const Products& p) {
    const int64_t G = 4 * H;
    wpack = base;
    rpack = wpack + p.PackSize<S>(C, G);
    b = rpack + p.PackSize<S>(H, G);
  }
};

// Panel `panel` of w in gate groups as bfloat16 (float weights only: bfloat16 packs panel by
// panel, converting as it copies).
template <typename S>
void PackGroupsBf16(const S* w, int64_t K, int64_t H, int64_t panel, S* out) {
  if constexpr (std::is_same<S, float>::value) {
    PackGatePanelBf16(w, K, H, panel, reinterpret_cast<uint16_t*>(out));
  }
}

// What copying one weight costs next to a flop, for ParallelFor's threshold (packing streams
// the weights from memory: (1,50,300,256)'s 2.3 MB took 190 us on one thread, 110 on two).
constexpr double kCopyFlops = 16;

// Packing tasks: W's and R's panels and the bias (Keras order: the gate pass reads it so).
template <typename S>
void PrepareInto(const CpuDevice& device, int64_t C, int64_t H, const S* kernel,
                 const S* recurrent_kernel, const S* bias, S* prepared, const Products& p) {
  const int64_t G = 4 * H, panels = CeilDiv(G, PanelWidth<S>());
  const PreparedView<S> pv(prepared, C, H, p);
  S* wpack = const_cast<S*>(pv.wpack);
  S* rpack = const_cast<S*>(pv.rpack);
  if (!p.bf16()) {  // by rows: each row of the weights read front to back
    constexpr int64_t kRows = 64;
    const int64_t r_tasks = CeilDiv(H, kRows), w_tasks = CeilDiv(C, kRows);
    ParallelFor(device, r_tasks + w_tasks + 1, kCopyFlops * double(C + H) * G, [&](int64_t task) {
      if (task < r_tasks) {
        return PackGateRows<S>(recurrent_kernel, H, H, task * kRows,
                               std::min(H, (task + 1) * kRows), rpack);
      }
      task -= r_tasks;
      if (task < w_tasks) {
        return PackGateRows<S>(kernel, C, H, task * kRows, std::min(C, (task + 1) * kRows), wpack);
      }
      CopyOrZero(const_cast<S*>(pv.b), bias, G);
    });
    return;
  }
  const int64_t n_w = C > 0 ? panels : 0;
  ParallelFor(device, panels + n_w + 1, kCopyFlops * double(C + H) * G, [&](int64_t task) {
    if (task < panels) return PackGroupsBf16<S>(recurrent_kernel, H, H, task, rpack);
    task -= panels;
    if (task < n_w) return PackGroupsBf16<S>(kernel, C, H, task, wpack);
    CopyOrZero(const_cast<S*>(pv.b), bias, G);
  });
}

struct InferGrid {
  int64_t row_parts = 1, unit_parts = 1;  // unit_parts > 1: pipelined unit blocks, all rows
  InferGrid(const LstmShape& s, int threads, bool hoisted, int64_t group, bool bf16) {
    if (threads <= 1) return;
    // Row blocks of up to kInferRowBlock rows, a multiple of the threads: the more rows a block
    // has, the more of them share each panel of R a step streams from L2 (rows are independent,
    // so any partition gives the same results).
    row_parts = CeilDiv(s.N, kInferRowBlock);
    if (row_parts > 1) row_parts = CeilDiv(row_parts, threads) * threads;
    // bfloat16: one row block per thread, each streaming the packed weights once per step
    // (rows are independent and each one's sums are the same in any block).
    if (bf16) row_parts = std::min<int64_t>(row_parts, threads);
    row_parts = std::max<int64_t>(row_parts, std::min<int64_t>(threads, s.N / kMinRowsPerTask));
    row_parts = std::max<int64_t>(1, std::min<int64_t>(row_parts, s.N));
    if (row_parts >= threads) return;
    const double step_flops = 2.0 * s.N * double(s.H + (hoisted ? 0 : s.C)) * 4.0 * s.H;
    const int64_t k = std::min<int64_t>(
        {int64_t(threads), CeilDiv(s.H, group), int64_t(step_flops / kMinPipelineBlockFlops)});
    if (k >= 2) {
      unit_parts = k;
      row_parts = 1;
    }
  }
};

// The gate pass of one group of u units for one row: z holds its gates i, f, c, o zs apart (u
// in gate groups, H in Keras order), b is the bias (Keras order, H apart), c and h the group's
// slices of the state.
template <typename S, int U>
inline void GroupGates(const S* z, int64_t zs, const S* b, int64_t H, int64_t u, S* c, S* h, S* out,
                       Acts acts) {
  alignas(64) S gate[4][U], cell[U], hid[U];
  const S* const zg[4] = {z, z + zs, z + 2 * zs, z + 3 * zs};
  const S* const bg[4] = {b, b + H, b + 2 * H, b + 3 * H};
  S* const gates[4] = {gate[0], gate[1], gate[2], gate[3]};
  if (u == U) {  // copies of a constant size: inlined as register moves, not memcpy calls
    Cell<S, U>(zg, bg, c, U, gates, cell, hid, acts);
    std::memcpy(c, cell, sizeof(cell));
    std::memcpy(h, hid, sizeof(hid));
    if (out) std::memcpy(out, hid, sizeof(hid));
    return;
  }
  Cell<S>(zg, bg, c, u, gates, cell, hid, acts);
  std::memcpy(c, cell, sizeof(S) * u);
  std::memcpy(h, hid, sizeof(S) * u);
  if (out) std::memcpy(out, hid, sizeof(S) * u);
}

template <typename S>
void LstmInferImpl(const CpuDevice& device, const LstmShape& s, const InferArgs<S>& a) {
  const int64_t T = s.T, N = s.N, H = s.H, C = s.C, G = 4 * H;
  if (N == 0) return;
  if (T == 0 || H == 0) {
    CopyOrZero(a.h_n, a.h0, N * H);
    CopyOrZero(a.c_n, a.c0, N * H);
    return;
  }
  constexpr int U = kGateGroupUnits<S>;
  const int64_t NR = PanelWidth<S>(), panels = CeilDiv(G, NR);
  const Products products = Products::For<S>(a.precision, s.N);
  // Weights prepared (packed in gate groups, gates in that order in z) or, without `prepared`,
  // read in place in Keras layout (z in Keras order too).
  const bool in_place = a.prepared == nullptr;
  const PreparedView<S> pv =
      in_place ? PreparedView<S>() : PreparedView<S>(a.prepared, C, H, products);
  const S* bias = in_place ? a.bias : pv.b;
  const bool hoisted = HoistProjection(s, a.precision);
  const int64_t ld = a.out_ld ? a.out_ld : H;
  const Acts acts{a.activation, a.recurrent_activation};
  const Steps steps{a.lengths, a.step_mask, T, a.reverse};
  // Gates of step t for row n: z + n·z_ld + t·z_t. Hoisted: every step's, [N, T, 4H], the
  // projection's output; else one step's, [N, 4H], zeroed each step.
  S* z = a.workspace;
  const int64_t z_ld = hoisted ? T * G : G, z_t = hoisted ? G : 0;
  S* hbuf = z + (hoisted ? N * T * G : N * G);  // h_{t-1} and h_t, [2, N, H]
  CopyOrZero(hbuf, a.h0, N * H);
  CopyOrZero(a.c_n, a.c0, N * H);
  // C[M, col0..col1) (+)= A·(W or R): packed, or in place.
  auto product = [&](bool recurrent, int64_t M, int64_t col0, int64_t col1, const S* A, int64_t lda,
                     S* c, int64_t ldc, bool accumulate, bool backwards = false) {
    const int64_t K = recurrent ? H : C;
    if (in_place) {
      return GemmRowMajorRhsCols<S>(M, G, K, col0, col1, A, lda,
                                    recurrent ? a.recurrent_kernel : a.kernel, G, c, ldc,
                                    accumulate);
    }
    products.Gemm<S>(M, G, K, col0, col1, A, lda, recurrent ? pv.rpack : pv.wpack, c, ldc,
                     accumulate, backwards, true);
  };
  // The columns of z a block of unit groups owns: one range in gate groups (or all of z), four
  // (one per gate) in Keras order.
  auto for_columns = [&](Range groups, auto&& f) {
    const int64_t u0 = groups.begin * U, u1 = std::min(H, groups.end * U);
    if (!in_place) return f(groups.begin * 4 * U, std::min(G, groups.end * 4 * U));
    if (u0 == 0 && u1 == H) return f(0, G);
    for (int64_t g = 0; g < 4; ++g) f(g * H + u0, g * H + u1);
  };
  const S* x = a.x;  // in step order
  if (a.reverse && C > 0) {
    S* xs = hbuf + 2 * N * H;
    GatherSteps(device, s, steps, a.x, xs, C);
    x = xs;
  }
  if (hoisted) {  // Zx = X·W, in tiles of rows × panels (any tiling gives the same sums)
    const int64_t M = N * T, row_parts = CeilDiv(M, 256);
    const double flops = 2.0 * M * C * G;
    const int64_t col_parts = flops < 2e6 ? 1 : std::min<int64_t>(panels, 2 * device.num_threads);
    ParallelFor(device, row_parts * col_parts, flops, [&](int64_t task) {
      const Range r = Part(M, row_parts, task / col_parts);
      const Range c = Part(panels, col_parts, task % col_parts);
      const int64_t col0 = c.begin * NR, col1 = std::min(G, c.end * NR);
      if (C == 0) {
        for (int64_t i = r.begin; i < r.end; ++i)
          std::fill(z + i * G + col0, z + i * G + col1, S(0));
      } else {  // written, not added to zeros: a pass over Zx less
        product(false, r.size(), col0, col1, x + r.begin * C, C, z + r.begin * G, G, false);
      }
    });
  }

  // Step t for rows × groups [q0, q1): the step's products, then the gate pass.
  auto step = [&](int64_t t, Range rows, Range groups) {
    const S* h_in = hbuf + (t % 2) * N * H;
    S* h_out = hbuf + ((t + 1) % 2) * N * H;
    S* zrows = z + rows.begin * z_ld + t * z_t;
    for_columns(groups, [&](int64_t col0, int64_t col1) {
      if (!hoisted && C > 0 && !in_place && products.bf16()) {
        return products.GemmSum<S>(rows.size(), G, C, H, col0, col1, x + (rows.begin * T + t) * C,
                                   T * C, pv.wpack, h_in + rows.begin * H, H, pv.rpack, zrows, z_ld,
                                   t % 2 == 1, true);
      }
      if (!hoisted && C > 0) {
        product(false, rows.size(), col0, col1, x + (rows.begin * T + t) * C, T * C, zrows, z_ld,
                false);
      }
      // R's panels in alternate directions from step to step (GemmCols: what a step read last
      // is what the next one reads first, still in cache when R is not).
      product(true, rows.size(), col0, col1, h_in + rows.begin * H, H, zrows, z_ld,
              hoisted || C > 0, t % 2 == 1);
    });
    for (int64_t n = rows.begin; n < rows.end; ++n) {
      if (!steps.valid(n, t)) {  // padded: carry h (c stays); output zeroed later
        const int64_t u0 = groups.begin * U, u1 = std::min(H, groups.end * U);
        std::memcpy(h_out + n * H + u0, h_in + n * H + u0, sizeof(S) * (u1 - u0));
        continue;
      }
      const S* zrow = z + n * z_ld + t * z_t;
      for (int64_t q = groups.begin; q < groups.end; ++q) {
        const int64_t u0 = q * U, u = std::min<int64_t>(U, H - u0);
        S* out = a.outputs ? a.outputs + (n * T + steps.pos(n, t)) * ld + u0 : nullptr;
        const S* zq = in_place ? zrow + u0 : zrow + q * 4 * U;
        GroupGates<S, U>(zq, in_place ? H : u, bias + u0, H, u, a.c_n + n * H + u0,
                         h_out + n * H + u0, out, acts);
      }
    }
  };
  // Outputs of padded steps are zero; h_n is h after a block's last active step.
  auto finish = [&](Range rows, Range groups, int64_t active) {
    const int64_t u0 = groups.begin * U, u1 = std::min(H, groups.end * U);
    for (int64_t n = rows.begin; n < rows.end; ++n) {
      std::memcpy(a.h_n + n * H + u0, hbuf + (active % 2) * N * H + n * H + u0,
                  sizeof(S) * (u1 - u0));
      if (!a.outputs) continue;
      for (int64_t t = 0; t < T; ++t) {
        if (t < active && steps.valid(n, t)) continue;
        S* out = a.outputs + (n * T + steps.pos(n, t)) * ld;
        std::fill(out + u0, out + u1, S(0));
      }
    }
  };

  const int64_t n_groups = CeilDiv(H, U);
  const InferGrid grid(s, device.num_threads, hoisted, U, products.bf16());
  const double flops = 2.0 * N * T * double(H + (hoisted ? 0 : C)) * G;
  if (grid.unit_parts == 1) {
    ParallelFor(device, grid.row_parts, flops, [&](int64_t task) {
      const Range rows = Part(N, grid.row_parts, task), groups{0, n_groups};
      const int64_t active = steps.active(rows);
      for (int64_t t = 0; t < active; ++t) step(t, rows, groups);
      finish(rows, groups, active);
    });
    return;
  }
  const int64_t K = grid.unit_parts, active = steps.active(Range{0, N});
  const int64_t items = active * K;
  std::atomic<int64_t> next{0}, done{0};
  ParallelFor(device, K, flops, [&](int64_t) {
    for (;;) {
      const int64_t item = next.fetch_add(1, std::memory_order_relaxed);
      if (item >= items) break;
      const int64_t t = item / K;
      // Items are claimed in order, so all of step t-1 is done once `done` reaches t·K. A
      // worker run after another has drained the queue never waits: no deadlock on one thread.
      for (int spins = 0; done.load(std::memory_order_acquire) < t * K; ++spins) {
        if (spins < 4096) {
          __builtin_ia32_pause();
        } else {
          std::this_thread::yield();
        }
      }
      step(t, Range{0, N}, Part(n_groups, K, item % K));
      done.fetch_add(1, std::memory_order_release);
    }
  });
  for (int64_t k = 0; k < K; ++k) finish(Range{0, N}, Part(n_groups, K, k), active);
}

}  // namespace

template <typename S>
int64_t PreparedWeightsSize(int64_t C, int64_t H, Precision precision) {
  const int64_t G = 4 * H;
  const Products p = Products::For<S>(precision);
  return p.PackSize<S>(C, G) + p.PackSize<S>(H, G) + G;
}

template <typename S>
void PrepareWeights(const CpuDevice& device, int64_t C, int64_t H, const S* kernel,
                    const S* recurrent_kernel, const S* bias, S* prepared, Precision precision) {
  PrepareInto(device, C, H, kernel, recurrent_kernel, bias, prepared, Products::For<S>(precision));
}

template <typename S>
int64_t InferWorkspaceSize(const LstmShape& s, bool reverse, Precision precision) {
  const int64_t G = 4 * s.H;
  return (HoistProjection(s, precision) ? s.N * s.T * G : s.N * G) + 2 * s.N * s.H +
         (reverse ? s.N * s.T * s.C : 0);
}

template <typename S>
void LstmInfer(const CpuDevice& device, const LstmShape& s, const InferArgs<S>& a) {
  LstmInferImpl(device, s, a);
}

int64_t ForwardWorkspaceSize(const LstmShape& s, bool training, bool reverse, Precision precision) {
  const int64_t G = 4 * s.H;
  const StepGrid grid(s);
  const bool bf16 = precision == Precision::kBfloat16;
  // Training: the interleaved bias, the packed R (per unit block, or per gate with recurrent
  // masks), the masked-h rows and, for bfloat16, the packed W; everything else is in the cache.
  // Inference: prepared weights and LstmInfer's scratch (float's sizes bound double's).
  if (training) {
    return G + std::max(PackedSteps(s, grid, false, s.H, bf16).total(grid), PerGateSize(s, bf16)) +
           s.N * s.H + (bf16 ? Bf16PackFloats(s.C, G) : 0);
  }
  return PreparedWeightsSize<float>(s.C, s.H, precision) +
         InferWorkspaceSize<float>(s, reverse, precision);
}

int64_t CacheSize(const LstmShape& s) {
  const int64_t G = 4 * s.H;
  return s.C * G + s.H * G + s.N * s.T * (s.C + G + s.H) + s.N * (s.T + 1) * s.H;
}

int64_t BackwardWorkspaceSize(const LstmShape& s, bool recurrent_masks, Precision precision) {
  const StepGrid bgrid = BackwardGemmGrid(s, recurrent_masks);
  const bool bf16 = precision == Precision::kBfloat16;
  const int64_t packs = recurrent_masks ? PerGateSize(s, bf16)
                                        : PackedSteps(s, bgrid, true, 4 * s.H, bf16).total(bgrid);
  // With masks: a step's product per gate [N, H] and h_{t-1} ⊙ mask for every step [N·T, H].
  // bfloat16: dZ [N·T, 4H] and Wᵀ packed for the hoisted products.
  const int64_t G = 4 * s.H;
  return (s.C + s.H + 1) * G + packs + (recurrent_masks ? s.N * s.H * (1 + s.T) : 0) +
         (bf16 ? Bf16PackFloats(s.N * s.T, G) + Bf16PackFloats(G, s.C) : 0);
}

template <typename S>
void LstmForward(const CpuDevice& device, const LstmShape& s, const ForwardArgs<S>& a) {
  const int64_t T = s.T, N = s.N, H = s.H, C = s.C, G = 4 * H;
  if (a.cache == nullptr) {  // inference: the weights packed for this call, or read in place
    S* prepared = a.workspace;
    InferArgs<S> ia;
    if (InPlaceWeights(s, a.precision)) {
      CopyOrZero(prepared, a.bias, G);
      ia.kernel = a.kernel;
      ia.recurrent_kernel = a.recurrent_kernel;
      ia.bias = prepared;
    } else {
      // Packed where it is read: a recurrence run as one task reads every panel from the
      // calling thread, which should not fetch half of them from another core's cache
      // ((1,20,50,128) on two threads: 61 -> 65 us when packed by both).
      const InferGrid grid(s, device.num_threads, HoistProjection(s, a.precision),
                           kGateGroupUnits<S>, Products::For<S>(a.precision, s.N).bf16());
      const bool one_task = grid.row_parts * grid.unit_parts == 1;
      PrepareInto<S>(one_task ? CpuDevice() : device, C, H, a.kernel, a.recurrent_kernel, a.bias,
                     prepared, Products::For<S>(a.precision));
      ia.prepared = prepared;
    }
    ia.x = a.x;
    ia.h0 = a.h0;
    ia.c0 = a.c0;
    ia.lengths = a.lengths;
    ia.step_mask = a.step_mask;
    ia.outputs = a.outputs;
    ia.h_n = a.h_n;
    ia.c_n = a.c_n;
    ia.workspace = prepared + PreparedWeightsSize<S>(C, H, a.precision);
    ia.precision = a.precision;
    ia.reverse = a.reverse;
    ia.out_ld = a.out_ld;
    ia.activation = a.activation;
    ia.recurrent_activation = a.recurrent_activation;
    return LstmInferImpl<S>(device, s, ia);
  }
  if (N == 0) return;
  if (T == 0 || H == 0) {
    CopyOrZero(a.h_n, a.h0, N * H);
    CopyOrZero(a.c_n, a.c0, N * H);
    return;  // backward of an empty problem reads nothing from the cache
  }
  const Setup<S> setup(s, a, device.num_threads);
  const bool masked = setup.masked;
  const StepGrid& grid = setup.grid;
  const int64_t ld = setup.ld, gate_pack = setup.gate_pack;
  const Acts acts = setup.acts;
  const Steps& steps = setup.steps;
  const Products& products = setup.products;
  const bool bf16 = products.bf16();

  // Storage: weights and history in the cache (h_{t-1} at hprev[n, t], c at cstate[n, t]).
  CacheView<S> cv(a.cache, s);
  S* wp = cv.kernel;
  S* rp = cv.rkernel;
  S* bp = a.workspace;
  S* rpack = bp + G;
  S* hmask =
      rpack + std::max(PackedSteps(s, grid, false, H, bf16).total(grid), PerGateSize(s, bf16));
  S* wpack = hmask + N * H;  // bfloat16: W packed for the input projection
  S* x_cache = cv.x;
  S* gates = cv.gates;
  S* h_hist = cv.hprev;
  S* c_hist = cv.cstate;
  for (int64_t n = 0; n < N; ++n) {
    CopyOrZero(h_hist + n * T * H, a.h0 ? a.h0 + n * H : nullptr, H);
    CopyOrZero(c_hist + n * (T + 1) * H, a.c0 ? a.c0 + n * H : nullptr, H);
  }
  // With one unit block the interleaved layout is Keras's: packing and the projection read the
  // caller's weights, and the training cache's copies of them are tasks of the region below.
  // Otherwise the interleaved copies come first.
  const bool keras_order = grid.unit_parts == 1;
  const S* w_src = a.kernel;
  const S* r_src = a.recurrent_kernel;
  if (!keras_order) {
    Interleave(s, grid, a.kernel, wp, C, true);
    Interleave(s, grid, a.recurrent_kernel, rp, H, true);
    w_src = wp;
    r_src = rp;
  }
  if (a.bias) {
    Interleave(s, grid, a.bias, bp, 1, true);
  } else {
    std::fill(bp, bp + G, S(0));
  }

  const PackedSteps packed(s, grid, false, H, bf16);
  // Everything before the recurrence, independent tasks of one parallel region (a serial copy
  // or pack would idle the other threads): the input projection Z = X·Wp in row × column
  // tiles (every step's gates are kept in the cache anyway: one GEMM over all steps is the
  // most parallel form), each row tile also copying its rows of x into the cache; packing R
  // per unit block; the cache's copies of W and R.
  // (bfloat16: W is packed first, and the projection's tasks are whole-row blocks.)
  const TileGrid tiles(C > 0 ? N * T : 0, G);
  const RowBlocks blocks{C > 0 ? N * T : 0};
  const int64_t n_tiles = bf16 ? blocks.count() : tiles.count();
  const int64_t n_rpack = masked ? 4 : grid.unit_parts;
  const int64_t n_copies = keras_order ? 2 : 0;
  if (C == 0) std::fill(gates, gates + N * T * G, S(0));
  // The cache keeps x in step order; a reverse pass gathers it there first and projects that.
  if (a.reverse && C > 0) GatherSteps(device, s, steps, a.x, x_cache, C);
  CMapRM<S> X(a.reverse ? x_cache : a.x, N * T, C, Eigen::OuterStride<>(C));
  CMapRM<S> W(w_src, C, G, Eigen::OuterStride<>(G));
  MapRM<S> Z(gates, N * T, G, Eigen::OuterStride<>(G));
  if (bf16 && C > 0) {
    ParallelFor(device, PackTasks(G), double(C) * G,
                [&](int64_t task) { products.PackTask<S>(w_src, G, 1, C, G, task, wpack); });
  }
  ParallelFor(device, n_tiles + n_rpack + n_copies, 2.0 * N * T * C * G + double(C + H) * G,
              [&](int64_t task) {
                if (task < n_tiles) {
                  const Range r = bf16 ? blocks.rows(task) : tiles.rows(task);
                  const Range c = bf16 ? Range{0, G} : tiles.cols(task);
                  if (c.begin == 0 && !a.reverse) {
                    std::memcpy(x_cache + r.begin * C, a.x + r.begin * C, sizeof(S) * r.size() * C);
                  }
                  if (bf16) {
                    return products.Product<S>(r.size(), G, C, X.data() + r.begin * C, C, 1, wpack,
                                               gates + r.begin * G, G);
                  }
                  Z.block(r.begin, c.begin, r.size(), c.size()).noalias() =
                      X.middleRows(r.begin, r.size()) * W.middleCols(c.begin, c.size());
                  return;
                }
                task -= n_tiles;
                if (task < n_rpack && masked) {  // gate `task`'s columns (Keras's order here)
                  return products.Pack<S>(r_src + task * H, G, 1, H, H, rpack + task * gate_pack);
                }
                if (task < n_rpack)
                  return PackStepBlock(s, grid, packed, products, r_src, H, false, rpack, task);
                task -= n_rpack;
                if (task == 0) {
                  CopyOrZero(wp, a.kernel, C * G);
                } else {
                  CopyOrZero(rp, a.recurrent_kernel, H * G);
                }
              });
  const int64_t z_ld = T * G;  // gates of step t: rows T·G apart in the cache
  const double step_flops = 2.0 * N * H * G;
  // Step t of one task: its GEMM slice, then the fused pass over its rows × units. `active`:
  // the task's rows are all padded from that step on (no GEMM needed, only carries).
  auto step = [&](int64_t t, int64_t task, int64_t active) {
    const S* h_in = h_hist + t * H;
    const int64_t h_in_ld = T * H;
    S* zstep = gates + t * G;
    const Range rows = grid.rows(s, task), units = grid.units(s, task);
    const int64_t u0 = units.begin, nu = units.size(), col0 = 4 * u0;
    const int64_t block = grid.unit_block(task);
    // Z[rows, t, block] += h_{t-1}[rows] · Rp[:, block]; the step's gates stay in cache for
    // the fused pass.
    S* zblock = zstep + rows.begin * z_ld + col0;
    if (t + 1 < T) {  // step t+1's slices of these rows
      for (int64_t n = rows.begin; n < rows.end; ++n) {
        PrefetchSpan<1>(zstep + n * z_ld + G + col0, sizeof(S) * 4 * nu);
        PrefetchSpan<1>(c_hist + (n * (T + 1) + t + 2) * H + u0, sizeof(S) * nu);
        if (a.outputs) {
          PrefetchSpan<1>(a.outputs + (n * T + steps.pos(n, t + 1)) * ld + u0, sizeof(S) * nu);
        }
      }
    }
    if (t < active && masked) {  // per gate: (h_{t-1} ⊙ mask_g)·R_g (whole rows, all units)
      S* hm = hmask + rows.begin * H;
      for (int64_t g = 0; g < 4; ++g) {
        MaskRows(h_in + rows.begin * h_in_ld, h_in_ld, a.recurrent_masks + (g * N + rows.begin) * H,
                 rows.size(), H, hm);
        products.Gemm<S>(rows.size(), H, H, 0, H, hm, H, rpack + g * gate_pack, zblock + g * H,
                         z_ld);
      }
    } else if (t < active) {
      products.Gemm<S>(rows.size(), 4 * nu, H, 0, 4 * nu, h_in + rows.begin * h_in_ld, h_in_ld,
                       rpack + packed.offset[block], zblock, z_ld);
    }
    // Fused pass over the block, in chunks of kChunk units.
    alignas(64) S gate[4][kChunk], cell[kChunk], hid[kChunk];
    for (int64_t n = rows.begin; n < rows.end; ++n) {
      const bool valid = steps.valid(n, t);
      S* zrow = zstep + n * z_ld + col0;
      S* out_row = a.outputs ? a.outputs + (n * T + steps.pos(n, t)) * ld : nullptr;
      for (int64_t j0 = 0; j0 < nu; j0 += kChunk) {
        const int64_t m = std::min(kChunk, nu - j0), u = u0 + j0;
        const S* c_prev = c_hist + (n * (T + 1) + t) * H + u;
        S* c_next = c_hist + (n * (T + 1) + t + 1) * H + u;
        const S* h_prev = h_in + n * h_in_ld + u;
        S* h_next = t + 1 < T ? h_hist + (n * T + t + 1) * H + u : a.h_n + n * H + u;
        S* out = out_row ? out_row + u : nullptr;
        if (!valid) {  // padded step: carry the state, output zero
          std::memcpy(c_next, c_prev, sizeof(S) * m);
          std::memcpy(h_next, h_prev, sizeof(S) * m);
          if (out) std::fill(out, out + m, S(0));
          continue;
        }
        S* z = zrow + j0;
        const S* b = bp + col0 + j0;
        const S* const zg[4] = {z, z + nu, z + 2 * nu, z + 3 * nu};
        const S* const bg[4] = {b, b + nu, b + 2 * nu, b + 3 * nu};
        S* const gates[4] = {gate[0], gate[1], gate[2], gate[3]};
        if (m == kChunk) {  // a fixed size: whole registers, no remainder loops
          Cell<S, kChunk>(zg, bg, c_prev, m, gates, cell, hid, acts);
        } else {
          Cell<S>(zg, bg, c_prev, m, gates, cell, hid, acts);
        }
        for (int64_t k = 0; k < 4; ++k) std::memcpy(z + k * nu, gate[k], sizeof(S) * m);
        std::memcpy(c_next, cell, sizeof(S) * m);
        std::memcpy(h_next, hid, sizeof(S) * m);
        if (out) std::memcpy(out, hid, sizeof(S) * m);
      }
    }
  };
  if (grid.whole_sequence) {  // one region: each task runs every step of its rows
    ParallelFor(device, grid.count(), step_flops * T, [&](int64_t task) {
      const int64_t active = steps.active(grid.rows(s, task));
      for (int64_t t = 0; t < T; ++t) step(t, task, active);
    });
  } else {
    for (int64_t t = 0; t < T; ++t) {
      ParallelFor(device, grid.count(), step_flops,
                  [&](int64_t task) { step(t, task, steps.active(grid.rows(s, task))); });
    }
  }

  for (int64_t n = 0; n < N; ++n) {
    std::memcpy(a.c_n + n * H, c_hist + (n * (T + 1) + T) * H, sizeof(S) * H);
  }
}

template <typename S>
void LstmBackward(const CpuDevice& device, const LstmShape& s, const BackwardArgs<S>& a) {
  const int64_t T = s.T, N = s.N, H = s.H, C = s.C, G = 4 * H;
  // The running dh and dc live in the d_h0 / d_c0 outputs: that is where they end.
  CopyOrZero(a.d_h0, a.d_h_n, N * H);
  CopyOrZero(a.d_c0, a.d_c_n, N * H);
  if (N * T == 0 || H == 0) {
    if (a.dx) std::fill(a.dx, a.dx + N * T * C, S(0));
    std::fill(a.d_kernel, a.d_kernel + C * G, S(0));
    std::fill(a.d_recurrent_kernel, a.d_recurrent_kernel + H * G, S(0));
    std::fill(a.d_bias, a.d_bias + G, S(0));
    return;
  }
  CacheView<S> cv(a.cache, s);
  const Setup<S> setup(s, a, device.num_threads);
  const bool masked = setup.masked;
  const StepGrid& grid = setup.grid;
  const int64_t ld = setup.ld, gate_pack = setup.gate_pack;
  const Acts acts = setup.acts;
  const Steps& steps = setup.steps;
  const Products& products = setup.products;
  const bool bf16 = products.bf16();
  // d_outputs of row n's step t (the cache and dZ are in step order, d_outputs in x's).
  auto d_out = [&](int64_t n, int64_t t) { return a.d_outputs + (n * T + steps.pos(n, t)) * ld; };
  S* dz_all = cv.gates;  // activated gates are overwritten by dZ, step by step
  const double step_flops = 2.0 * N * H * G;
  // With one unit block the interleaved layout is Keras's own: the gradients go straight to
  // the outputs. Otherwise they are interleaved in the workspace and put back at the end.
  const bool keras_order = grid.unit_parts == 1;
  S* dwp = keras_order ? a.d_kernel : a.workspace;
  S* drp = keras_order ? a.d_recurrent_kernel : a.workspace + C * G;
  S* dbp = keras_order ? a.d_bias : a.workspace + (C + H) * G;
  S* rtpack = a.workspace + (C + H + 1) * G;
  StepGrid bgrid = BackwardGemmGrid(s, masked);
  if (bf16) Setup<S>::Bf16RowBlocks(s, device.num_threads, &bgrid);
  const PackedSteps packed(s, bgrid, true, 4 * H, bf16);
  const int64_t packs = masked ? PerGateSize(s, bf16) : packed.total(bgrid);
  S* dh_gate = rtpack + (masked ? packs : 0);  // [N, H]: one gate's dZ_t·R_gᵀ
  S* hprev_masked = dh_gate + N * H;           // [N·T, H]: h_{t-1} ⊙ mask_g
  // bfloat16: dZ [N·T, 4H] and Wᵀ packed for the hoisted products.
  S* dzpack = rtpack + packs + (masked ? N * H * (1 + T) : 0);
  S* wtpack = dzpack + Bf16PackFloats(N * T, G);
  if (masked) {  // R_gᵀ per gate: B(j, n) = R[n, g·H + j]
    ParallelFor(device, 4, double(H) * G, [&](int64_t g) {
      products.Pack<S>(cv.rkernel + g * H, 1, G, H, H, rtpack + g * gate_pack);
    });
  } else {
    ParallelFor(device, bgrid.unit_parts, double(H) * G, [&](int64_t k) {
      PackStepBlock(s, bgrid, packed, products, cv.rkernel, H, true, rtpack, k);
    });
  }
  // Padded steps contribute nothing, even when the data there is NaN or Inf (0 · Inf is NaN):
  // the padded rows of the cached x and h_{t-1} are zeroed (the cache is consumed anyway), dX's
  // padded rows are zeroed after its GEMM, and when R holds a non-finite value the per-step dh
  // GEMM skips padded rows instead of adding 0 · R to them.
  bool any_padded = false;
  for (int64_t n = 0; steps.any_invalid() && n < N; ++n) {
    for (int64_t t = 0; t < T; ++t) {
      if (steps.valid(n, t)) continue;
      any_padded = true;
      std::fill(cv.x + (n * T + t) * C, cv.x + (n * T + t + 1) * C, S(0));
      std::fill(cv.hprev + (n * T + t) * H, cv.hprev + (n * T + t + 1) * H, S(0));
    }
  }
  const bool skip_padded_rows = any_padded && !AllFinite(cv.rkernel, H * G);
  // bfloat16: dX_t = dZ_t·Wᵀ with each step's dh product, on the same rounded dZ_t (rounding dZ
  // again for one hoisted dX product cost a pass over all of it).
  const bool dx_steps =
      bf16 && a.dx && C > 0 && !masked && !skip_padded_rows && bgrid.unit_parts == 1;
  if (dx_steps) {
    ParallelFor(device, PackTasks(C), double(C) * G,
                [&](int64_t task) { products.PackTask<S>(cv.kernel, 1, G, G, C, task, wtpack); });
  }

  // (a) Fused pass of step t over a task's rows × units: dZ_t from dh = d_out_t + dh_next and
  // dc_next; dc becomes dc_{t-1}.
  auto gate_pass = [&](int64_t t, int64_t task) {
    const Range rows = grid.rows(s, task), units = grid.units(s, task);
    const int64_t u0 = units.begin, nu = units.size(), col0 = 4 * u0;
    alignas(64) S dh_buf[kChunk], dc_buf[kChunk], tc_buf[kChunk], i_buf[kChunk], d_buf[kChunk];
    for (int64_t n = rows.begin; n < rows.end; ++n) {
      S* zrow = dz_all + (n * T + t) * G + col0;
      if (t > 0 && steps.valid(n, t - 1)) {  // step t-1's slices of this row
        PrefetchSpan<1>(zrow - G, sizeof(S) * 4 * nu);
        PrefetchSpan(cv.cstate + (n * (T + 1) + t - 1) * H + u0, sizeof(S) * nu);
        if (a.d_outputs) PrefetchSpan(d_out(n, t - 1) + u0, sizeof(S) * nu);
      }
      if (!steps.valid(n, t)) {
        // Padded step: no gradient into this step's gates; dh and dc pass through unchanged.
        std::fill(zrow, zrow + 4 * nu, S(0));
        continue;
      }
      for (int64_t j0 = 0; j0 < nu; j0 += kChunk) {
        const int64_t m = std::min(kChunk, nu - j0), u = u0 + j0;
        S* z = zrow + j0;
        AMapA<S> dh(dh_buf, m), dc(dc_buf, m), tc(tc_buf, m), gi(i_buf, m);
        MapA<S> i(z, m), f(z + nu, m), gg(z + 2 * nu, m), o(z + 3 * nu, m);
        MapA<S> dh_run(a.d_h0 + n * H + u, m), dc_run(a.d_c0 + n * H + u, m);
        const CMapA<S> c_prev(cv.cstate + (n * (T + 1) + t) * H + u, m);
        const CMapA<S> c_t(cv.cstate + (n * (T + 1) + t + 1) * H + u, m);
        if (a.d_outputs) {
          dh = dh_run + CMapA<S>(d_out(n, t) + u, m);
        } else {
          dh = dh_run;
        }
        if (acts.classic()) {
          tc = Tanh(c_t);
          // The rest is + and × only: identical in packet and scalar code (no FMA contraction).
          dc = dc_run + dh * o * TanhGradFromOutput(tc);
          dc_run = dc * f;                             // dc_{t-1}
          o = dh * tc * SigmoidGradFromOutput(o);      // dz_o
          f = dc * c_prev * SigmoidGradFromOutput(f);  // dz_f
          gi = i;
          i = dc * gg * SigmoidGradFromOutput(gi);  // dz_i
          gg = dc * gi * TanhGradFromOutput(gg);    // dz_c
        } else {
          AMapA<S> d(d_buf, m);  // each activation's derivative in turn
          ApplyActivation(acts.act, c_t, tc);
          ActivationGradFromOutput(acts.act, tc, d);
          dc = dc_run + dh * o * d;
          dc_run = dc * f;
          ActivationGradFromOutput(acts.rec, o, d);
          o = dh * tc * d;
          ActivationGradFromOutput(acts.rec, f, d);
          f = dc * c_prev * d;
          gi = i;
          ActivationGradFromOutput(acts.rec, gi, d);
          i = dc * gg * d;
          ActivationGradFromOutput(acts.act, gg, d);
          gg = dc * gi * d;
        }
        dh_run.setZero();  // (b) adds dZ_t·Rᵀ; padded rows keep their carried dh
      }
    }
  };
  // (b) dh_{t-1}[rows, units] += dZ_t[rows, :] · Rp[units, :]ᵀ (both interleaved alike), for a
  // task of bgrid; nothing to add when all its rows are padded at t (dZ_t is zero there).
  auto dh_gemm = [&](int64_t t, int64_t task, int64_t active) {
    if (t >= active) return;
    const Range rows = bgrid.rows(s, task), units = bgrid.units(s, task);
    if (masked) {  // dh_{t-1} = Σ_g (dZ_{t,g}·R_gᵀ) ⊙ mask_g, on the rows valid at t
      S* tmp = dh_gate + rows.begin * H;
      for (int64_t g = 0; g < 4; ++g) {
        std::fill(tmp, tmp + rows.size() * H, S(0));
        products.Gemm<S>(rows.size(), H, H, 0, H, dz_all + (rows.begin * T + t) * G + g * H, T * G,
                         rtpack + g * gate_pack, tmp, H);
        for (int64_t n = rows.begin; n < rows.end; ++n) {
          if (!steps.valid(n, t)) continue;
          MapA<S>(a.d_h0 + n * H, H) += CMapA<S>(tmp + (n - rows.begin) * H, H) *
                                        CMapA<S>(a.recurrent_masks + (g * N + n) * H, H);
        }
      }
      return;
    }
    const S* rt = rtpack + packed.offset[bgrid.unit_block(task)];
    if (dx_steps) {
      return products.GemmShared<S>(rows.size(), G, dz_all + (rows.begin * T + t) * G, T * G, H, rt,
                                    a.d_h0 + rows.begin * H, H, true, C, wtpack,
                                    a.dx + (rows.begin * T + t) * C, T * C, false);
    }
    if (!skip_padded_rows) {
      products.Gemm<S>(rows.size(), units.size(), G, 0, units.size(),
                       dz_all + (rows.begin * T + t) * G, T * G, rt,
                       a.d_h0 + rows.begin * H + units.begin, H);
      return;
    }
    for (int64_t n0 = rows.begin; n0 < rows.end;) {  // runs of rows that are valid at t
      if (!steps.valid(n0, t)) {
        ++n0;
        continue;
      }
      int64_t n1 = n0 + 1;
      while (n1 < rows.end && steps.valid(n1, t)) ++n1;
      products.Gemm<S>(n1 - n0, units.size(), G, 0, units.size(), dz_all + (n0 * T + t) * G, T * G,
                       rt, a.d_h0 + n0 * H + units.begin, H);
      n0 = n1;
    }
  };
  if (grid.whole_sequence) {  // one region: each task runs every step of its rows (bgrid = grid)
    ParallelFor(device, grid.count(), 3.0 * step_flops * T, [&](int64_t task) {
      const int64_t active = steps.active(grid.rows(s, task));
      for (int64_t t = T - 1; t >= 0; --t) {
        gate_pass(t, task);
        dh_gemm(t, task, active);
      }
    });
  } else {
    for (int64_t t = T - 1; t >= 0; --t) {
      ParallelFor(device, grid.count(), 20.0 * N * G, [&](int64_t task) { gate_pass(t, task); });
      ParallelFor(device, bgrid.count(), step_flops,
                  [&](int64_t task) { dh_gemm(t, task, steps.active(bgrid.rows(s, task))); });
    }
  }

  // Hoisted gradients over all steps, every tile in one parallel_for:
  //   dX = dZ·Wpᵀ [NT, C],  dWp = Xᵀ·dZ [C, G],  dRp = Hprevᵀ·dZ [H, G],  dbp = Σ_rows dZ [G];
  // then the interleaved dWp, dRp, dbp are put back into Keras order.
  const int64_t M = N * T;
  CMapRM<S> dZ(dz_all, M, G, Eigen::OuterStride<>(G));
  CMapRM<S> X(cv.x, M, C, Eigen::OuterStride<>(C));
  CMapRM<S> W(cv.kernel, C, G, Eigen::OuterStride<>(G));
  CMapRM<S> Hp(cv.hprev, M, H, Eigen::OuterStride<>(H));
  // dX is skipped when the caller does not want it (a frozen input such as fixed embeddings).
  MapRM<S> dX(a.dx, a.dx ? M : 0, C, Eigen::OuterStride<>(C));
  MapRM<S> dW(dwp, C, G, Eigen::OuterStride<>(G));
  MapRM<S> dR(drp, H, G, Eigen::OuterStride<>(G));
  const TileGrid tx(M, C), tw(C, G), tr(H, G), tb(1, G);
  // bfloat16: whole-row blocks on dZ and Wᵀ packed first.
  const RowBlocks bx{M}, bw{C}, br{H};
  if (bf16) {
    const int64_t nz = PackTasks(G), nwt = a.dx && !dx_steps ? PackTasks(C) : 0;
    ParallelFor(device, nz + nwt, double(M + C) * G, [&](int64_t task) {
      if (task < nz) return products.PackTask<S>(dz_all, G, 1, M, G, task, dzpack);
      products.PackTask<S>(cv.kernel, 1, G, G, C, task - nz, wtpack);
    });
  }
  // With recurrent masks dR is one product per gate, on h_{t-1} ⊙ mask_g (below).
  const int64_t nx = a.dx && !dx_steps ? (bf16 ? bx.count() : tx.count()) : 0;
  const int64_t nw = bf16 ? bw.count() : tw.count();
  const int64_t nr = masked ? 0 : (bf16 ? br.count() : tr.count());
  // The largest tiles (dW, dR: K = N·T) first, so dynamic scheduling balances the rest.
  ParallelFor(device, nw + nr + nx + tb.count(), 6.0 * M * (C + H) * G, [&](int64_t task) {
    if (task < nw) {
      if (bf16) {  // A = Xᵀ: A(c, m) = x[m·C + c]
        const Range r = bw.rows(task);
        return products.Product<S>(r.size(), G, M, cv.x + r.begin, 1, C, dzpack, dwp + r.begin * G,
                                   G);
      }
      const Range r = tw.rows(task), c = tw.cols(task);
      dW.block(r.begin, c.begin, r.size(), c.size()).noalias() =
          X.middleCols(r.begin, r.size()).transpose() * dZ.middleCols(c.begin, c.size());
      return;
    }
    task -= nw;
    if (task < nr) {
      if (bf16) {
        const Range r = br.rows(task);
        return products.Product<S>(r.size(), G, M, cv.hprev + r.begin, 1, H, dzpack,
                                   drp + r.begin * G, G);
      }
      const Range r = tr.rows(task), c = tr.cols(task);
      dR.block(r.begin, c.begin, r.size(), c.size()).noalias() =
          Hp.middleCols(r.begin, r.size()).transpose() * dZ.middleCols(c.begin, c.size());
      return;
    }
    task -= nr;
    if (task < nx) {
      if (bf16) {
        const Range r = bx.rows(task);
        return products.Product<S>(r.size(), C, G, dz_all + r.begin * G, G, 1, wtpack,
                                   a.dx + r.begin * C, C);
      }
      const Range r = tx.rows(task), c = tx.cols(task);
      dX.block(r.begin, c.begin, r.size(), c.size()).noalias() =
          dZ.middleRows(r.begin, r.size()) * W.middleRows(c.begin, c.size()).transpose();
      return;
    }
    task -= nx;
    // A plain loop: every column summed over rows in the same order, however it vectorizes.
    const Range c = tb.cols(task);
    S* db = dbp + c.begin;
    std::fill(db, db + c.size(), S(0));
    for (int64_t r = 0; r < M; ++r) {
      const S* row = dz_all + r * G + c.begin;
      for (int64_t k = 0; k < c.size(); ++k) db[k] += row[k];
    }
  });
  if (masked) {
    const TileGrid tg(H, H);
    CMapRM<S> Hm(hprev_masked, M, H, Eigen::OuterStride<>(H));
    for (int64_t g = 0; g < 4; ++g) {
      ParallelFor(device, N, double(M) * H, [&](int64_t n) {  // one mask row for all T steps
        for (int64_t t = 0; t < T; ++t) {
          MaskRows(cv.hprev + (n * T + t) * H, H, a.recurrent_masks + (g * N + n) * H, 1, H,
                   hprev_masked + (n * T + t) * H);
        }
      });
      if (bf16) {  // dZ's gate g packed, then row blocks of dR's gate g
        ParallelFor(device, PackTasks(H), double(M) * H, [&](int64_t task) {
          products.PackTask<S>(dz_all + g * H, G, 1, M, H, task, dzpack);
        });
        ParallelFor(device, br.count(), 2.0 * M * H * H, [&](int64_t task) {
          const Range r = br.rows(task);
          products.Product<S>(r.size(), H, M, hprev_masked + r.begin, 1, H, dzpack,
                              drp + r.begin * G + g * H, G);
        });
        continue;
      }
      ParallelFor(device, tg.count(), 2.0 * M * H * H, [&](int64_t task) {
        const Range r = tg.rows(task), c = tg.cols(task);
        dR.block(r.begin, g * H + c.begin, r.size(), c.size()).noalias() =
            Hm.middleCols(r.begin, r.size()).transpose() * dZ.middleCols(g * H + c.begin, c.size());
      });
    }
  }
  for (int64_t n = 0; any_padded && a.dx && n < N; ++n) {  // dX in step order
    for (int64_t t = 0; t < T; ++t) {
      if (!steps.valid(n, t)) std::fill(a.dx + (n * T + t) * C, a.dx + (n * T + t + 1) * C, S(0));
    }
  }
  if (a.reverse && a.dx && C > 0) {  // dX back in x's order: the steps' positions reversed
    ParallelFor(device, N, double(N) * T * C, [&](int64_t n) {
      const int64_t len = a.step_mask ? T : Length(a.lengths, n, T);
      for (int64_t t = 0; t < len / 2; ++t) {
        std::swap_ranges(a.dx + (n * T + t) * C, a.dx + (n * T + t + 1) * C,
                         a.dx + (n * T + len - 1 - t) * C);
      }
    });
  }
  if (!keras_order) {
    Interleave(s, grid, dwp, a.d_kernel, C, false);
    Interleave(s, grid, drp, a.d_recurrent_kernel, H, false);
    Interleave(s, grid, dbp, a.d_bias, 1, false);
  }
}

bool RunDirectionsConcurrently(const CpuDevice& device, const LstmShape& s) {
  if (device.num_threads < 2 || device.parallel_for == nullptr) return false;
  return device.num_threads == 2 || CeilDiv(s.N, kWholeSequenceRowBlock) < device.num_threads;
}

#define FUSEDLSTM_INSTANTIATE(S)                                                             \
  template void LstmForward<S>(const CpuDevice&, const LstmShape&, const ForwardArgs<S>&);   \
  template void LstmBackward<S>(const CpuDevice&, const LstmShape&, const BackwardArgs<S>&); \
  template int64_t PreparedWeightsSize<S>(int64_t, int64_t, Precision);                      \
  template void PrepareWeights<S>(const CpuDevice&, int64_t, int64_t, const S*, const S*,    \
                                  const S*, S*, Precision);                                  \
  template int64_t InferWorkspaceSize<S>(const LstmShape&, bool, Precision);                 \
  template void LstmInfer<S>(const CpuDevice&, const LstmShape&, const InferArgs<S>&);
FUSEDLSTM_INSTANTIATE(float)
FUSEDLSTM_INSTANTIATE(double)
#undef FUSEDLSTM_INSTANTIATE

}  // namespace fusedlstm
