// bfloat16 GEMMs (gemm_bf16.h). Every function using AVX-512 or AMX carries its own target
// attribute, and only Bf16Active() lets a caller reach one, so the file is built with the
// library's baseline flags and the portable build still imports on any x86-64 CPU.
#include "gemm_bf16.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <new>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FUSEDLSTM_BF16_X86 1
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace fusedlstm {

namespace {

inline int64_t RoundUp(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// 64-byte-aligned storage (tile stores and aligned loads of partial sums).
template <typename T>
struct AlignedAllocator {
  using value_type = T;
  AlignedAllocator() = default;
  template <typename U>
  AlignedAllocator(const AlignedAllocator<U>&) {}
  T* allocate(size_t n) {
    return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(64)));
  }
  void deallocate(T* p, size_t) { ::operator delete(p, std::align_val_t(64)); }
  bool operator==(const AlignedAllocator&) const { return true; }
  bool operator!=(const AlignedAllocator&) const { return false; }
};

constexpr int64_t kPanel = 16;   // columns per packed panel (one vector of float32 sums)
constexpr int64_t kKBlock = 32;  // K rounding: one AMX tile's depth

uint32_t Bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  return u;
}

std::atomic<int32_t> g_engine{-1};  // the active engine, -1 until detected
std::once_flag g_detect_once;
Bf16Engine g_available = Bf16Engine::kNone;
const char* g_missing = "";

#ifdef FUSEDLSTM_BF16_X86
void Detect() {
  unsigned a, b, c, d;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) {
    g_missing = "AVX512_BF16 (no CPUID leaf 7)";
    return;
  }
  const bool avx512 = (b >> 16 & 1) && (b >> 17 & 1) && (b >> 30 & 1) && (b >> 31 & 1);
  const bool amx = (d >> 22 & 1) && (d >> 24 & 1);
  unsigned a1 = 0, b1, c1, d1;
  __get_cpuid_count(7, 1, &a1, &b1, &c1, &d1);
  const bool bf16 = a1 >> 5 & 1;
  unsigned ca, cb, cc, cd;
  __get_cpuid(1, &ca, &cb, &cc, &cd);
  uint64_t xcr0 = 0;
  if (cc >> 27 & 1) {  // OSXSAVE: the OS saves extended state, xgetbv is allowed
    uint32_t lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    xcr0 = (uint64_t(hi) << 32) | lo;
  }
  const bool os_zmm = (xcr0 & 0xE6) == 0xE6;
  if (!(avx512 && bf16)) {
    g_missing = "AVX512_BF16 (the CPU lacks the instruction set)";
    return;
  }
  if (!os_zmm) {
    g_missing = "AVX512_BF16 (the OS does not enable AVX-512 state)";
    return;
  }
  g_available = Bf16Engine::kAvx512;
  // AMX: tile state enabled in XCR0 and this process allowed to use it (Linux asks for it).
  constexpr long kReqXcompPerm = 0x1023, kXtileData = 18;
  if (amx && (xcr0 & 0x60000) == 0x60000 &&
      syscall(SYS_arch_prctl, kReqXcompPerm, kXtileData) == 0) {
    g_available = Bf16Engine::kAmx;
  }
}
#else
void Detect() { g_missing = "AVX512_BF16 (not an x86-64 build)"; }
#endif

void EnsureDetected() {
  std::call_once(g_detect_once, [] {
    Detect();
    g_engine.store(static_cast<int32_t>(g_available));
  });
}

}  // namespace

Bf16Engine Bf16Available() {
  EnsureDetected();
  return g_available;
}

Bf16Engine Bf16Active() {
  EnsureDetected();
  return static_cast<Bf16Engine>(g_engine.load(std::memory_order_relaxed));
}

bool SetBf16Engine(Bf16Engine e) {
  EnsureDetected();
  if (static_cast<int32_t>(e) > static_cast<int32_t>(g_available)) return false;
  g_engine.store(static_cast<int32_t>(e));
  return true;
}

const char* Bf16Missing() {
  EnsureDetected();
  return g_missing;
}

uint16_t FloatToBf16(float x) {
  const uint32_t u = Bits(x);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);  // quiet NaN
  if ((u & 0x7f800000u) == 0) return static_cast<uint16_t>((u >> 16) & 0x8000);  // denormal: ±0
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1)) >> 16);
}

int64_t PackedRhsBf16Size(int64_t K, int64_t N) { return RoundUp(K, kKBlock) * RoundUp(N, 32); }

#ifdef FUSEDLSTM_BF16_X86

#define FUSEDLSTM_AVX512BF16 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))
#define FUSEDLSTM_AMX \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,amx-tile,amx-bf16")))

namespace {

// 16 floats at rows k and k + 1 → 16 (k, k+1) pairs, k's value in the low half.
FUSEDLSTM_AVX512BF16 inline __m512i Pairs(__m512 lo, __m512 hi) {
  const __m256i l = (__m256i)_mm512_cvtneps_pbh(lo), h = (__m256i)_mm512_cvtneps_pbh(hi);
  return _mm512_or_si512(_mm512_cvtepu16_epi32(l), _mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// r[i] lane j → r[j] lane i, for 16 vectors of 16 32-bit lanes.
FUSEDLSTM_AVX512BF16 inline void Transpose16(__m512i r[16]) {
  __m512i t[16], u[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    u[4 * i + 0] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    u[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  // u[4q + e], 128-bit lane L: rows 4q..4q+3 of column 4L + e.
  for (int e = 0; e < 4; ++e) {
    const __m512i v0 = _mm512_shuffle_i32x4(u[e], u[4 + e], 0x88);
    const __m512i v1 = _mm512_shuffle_i32x4(u[e], u[4 + e], 0xDD);
    const __m512i v2 = _mm512_shuffle_i32x4(u[8 + e], u[12 + e], 0x88);
    const __m512i v3 = _mm512_shuffle_i32x4(u[8 + e], u[12 + e], 0xDD);
    r[e] = _mm512_shuffle_i32x4(v0, v2, 0x88);
    r[e + 8] = _mm512_shuffle_i32x4(v0, v2, 0xDD);
    r[e + 4] = _mm512_shuffle_i32x4(v1, v3, 0x88);
    r[e + 12] = _mm512_shuffle_i32x4(v1, v3, 0xDD);
  }
}

// One panel of 16 columns of B, column j's source at src_col[j] (-1: zero), B(k, col) =
// b[k·rs + col·cs], into out ([Kp/2][16][2]).
FUSEDLSTM_AVX512BF16 void PackPanel(const float* b, int64_t rs, int64_t cs, int64_t K,
                                    const int64_t* src_col, uint16_t* out) {
  const int64_t Kp = RoundUp(K, kKBlock);
  bool contiguous = src_col[0] >= 0;
  for (int j = 1; j < 16 && contiguous; ++j) contiguous = src_col[j] == src_col[0] + j;
  int64_t k = 0;
  if (contiguous && cs == 1) {  // rows of 16 floats: pairs of rows interleaved
    for (; k + 2 <= K; k += 2) {
      const __m512 lo = _mm512_loadu_ps(b + k * rs + src_col[0]);
      const __m512 hi = _mm512_loadu_ps(b + (k + 1) * rs + src_col[0]);
      _mm512_storeu_si512(out + k * 16, Pairs(lo, hi));
    }
  } else if (contiguous && rs == 1) {  // columns of K floats: 32 k of 16 columns, transposed
    for (; k + 32 <= K; k += 32) {
      __m512i r[16];
      for (int j = 0; j < 16; ++j) {
        const float* col = b + (src_col[0] + j) * cs + k;
        r[j] = (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(col + 16), _mm512_loadu_ps(col));
      }
      Transpose16(r);  // r[p]: pair p of each column
      for (int p = 0; p < 16; ++p) _mm512_storeu_si512(out + (k + 2 * p) * 16, r[p]);
    }
  }
  for (; k < Kp; k += 2) {  // the rest, element by element; zero past K and at -1 columns
    for (int j = 0; j < 16; ++j) {
      const int64_t col = src_col[j];
      const bool ok = col >= 0;
      out[k * 16 + 2 * j] = ok && k < K ? FloatToBf16(b[k * rs + col * cs]) : 0;
      out[k * 16 + 2 * j + 1] = ok && k + 1 < K ? FloatToBf16(b[(k + 1) * rs + col * cs]) : 0;
    }
  }
}

// The first `valid` of 16 lanes.
inline __mmask16 ColMask(int64_t valid) {
  return valid >= 16 ? __mmask16(0xffff) : __mmask16((1u << std::max<int64_t>(valid, 0)) - 1);
}

// Where A's element (m, k) sits in its pack: rows of Kp (the VDPBF16PS engine), or, tiled for
// AMX, blocks of 32 rows (16 in a last half block) whose 32-column slices are contiguous, so each
// A tile is 1 KiB in one piece and a block's tiles follow one another along k (a stream the
// hardware prefetcher follows; rows Kp apart were 16 separate streams).
struct ALayout {
  int64_t Kp, Mp;
  bool tiled;
  int64_t Height(int64_t m) const { return std::min<int64_t>(32, Mp - m / 32 * 32); }
  int64_t Offset(int64_t m, int64_t k) const {
    if (!tiled) return m * Kp + k;
    const int64_t b = m / 32 * 32;
    return b * Kp + (k / 32) * Height(m) * 32 + (m - b) * 32 + k % 32;
  }
};

// Rows [0, M) of A (A(m, k) = a[m·ars + k·acs]) as bfloat16 in layout `L`, rows up to L.Mp zero.
FUSEDLSTM_AVX512BF16 void PackLhs(int64_t M, const ALayout& L, int64_t K, const float* a,
                                  int64_t ars, int64_t acs, uint16_t* out) {
  const int64_t Kp = L.Kp;
  int64_t m = 0;
  if (ars == 1 && acs != 1) {  // columns of A contiguous: blocks of 16 rows × 32 k, transposed
    for (; m + 16 <= M; m += 16) {
      int64_t k = 0;
      for (; k + 32 <= K; k += 32) {
        __m512i r[16];
        for (int p = 0; p < 16; ++p) {
          r[p] = Pairs(_mm512_loadu_ps(a + m + (k + 2 * p) * acs),
                       _mm512_loadu_ps(a + m + (k + 2 * p + 1) * acs));
        }
        Transpose16(r);  // r[i]: row m + i's 16 pairs
        for (int i = 0; i < 16; ++i) _mm512_storeu_si512(out + L.Offset(m + i, k), r[i]);
      }
      for (int i = 0; i < 16; ++i) {
        for (int64_t kk = k; kk < Kp; ++kk) {
          out[L.Offset(m + i, kk)] = kk < K ? FloatToBf16(a[(m + i) + kk * acs]) : 0;
        }
      }
    }
  }
  for (; m < M; ++m) {
    const float* src = a + m * ars;
    int64_t k = 0;
    if (acs == 1) {
      for (; k < Kp; k += 32) {  // the last slice masked: zeros past K
        const __mmask16 lo = ColMask(K - k), hi = ColMask(K - k - 16);
        _mm512_storeu_si512(out + L.Offset(m, k),
                            (__m512i)_mm512_cvtne2ps_pbh(_mm512_maskz_loadu_ps(hi, src + k + 16),
                                                         _mm512_maskz_loadu_ps(lo, src + k)));
      }
    }
    for (; k < Kp; ++k) out[L.Offset(m, k)] = k < K ? FloatToBf16(src[k * acs]) : 0;
  }
  for (; m < L.Mp; ++m) {  // padding rows (AMX tiles are 16 rows)
    for (int64_t k = 0; k < Kp; k += 32) std::memset(out + L.Offset(m, k), 0, 64);
  }
}

FUSEDLSTM_AVX512BF16 inline void StoreSums(__m512 sum, float* c, __mmask16 mask, bool accumulate) {
  if (accumulate) sum = _mm512_add_ps(_mm512_maskz_loadu_ps(mask, c), sum);
  _mm512_mask_storeu_ps(c, mask, sum);
}

// VDPBF16PS: rows [0, MR) of the packed A (rows Kp apart) × NP panels from `panel` (Kp·16
// apart), into c (column 0 of the first panel), `valid` columns from there.
template <int MR, int NP>
FUSEDLSTM_AVX512BF16 void DotBlock(int64_t Kp, const uint16_t* ap, const uint16_t* panel, float* c,
                                   int64_t ldc, int64_t valid, bool accumulate) {
  __m512 acc[MR][NP];
  for (int r = 0; r < MR; ++r) {
    for (int p = 0; p < NP; ++p) acc[r][p] = _mm512_setzero_ps();
  }
  for (int64_t k = 0; k < Kp; k += 2) {
    __m512bh bv[NP];
    for (int p = 0; p < NP; ++p) bv[p] = (__m512bh)_mm512_loadu_si512(panel + p * Kp * 16 + k * 16);
    for (int r = 0; r < MR; ++r) {
      int32_t pair;
      std::memcpy(&pair, ap + r * Kp + k, 4);
      const __m512bh av = (__m512bh)_mm512_set1_epi32(pair);
      for (int p = 0; p < NP; ++p) acc[r][p] = _mm512_dpbf16_ps(acc[r][p], av, bv[p]);
    }
  }
  for (int r = 0; r < MR; ++r) {
    for (int p = 0; p < NP; ++p) {
      StoreSums(acc[r][p], c + r * ldc + p * 16, ColMask(valid - p * 16), accumulate);
    }
  }
}

using DotFn = void (*)(int64_t, const uint16_t*, const uint16_t*, float*, int64_t, int64_t, bool);

template <int MR>
DotFn DotFor(int np) {
  switch (np) {
    case 1:
      return DotBlock<MR, 1>;
    case 2:
      return DotBlock<MR, 2>;
    case 3:
      return DotBlock<MR, 3>;
    case 4:
      return DotBlock<MR, 4>;
    default:
      return nullptr;
  }
}

DotFn DotKernel(int mr, int np) {
  switch (mr) {
    case 1:
      return DotFor<1>(np);
    case 2:
      return DotFor<2>(np);
    case 3:
      return DotFor<3>(np);
    case 4:
      return DotFor<4>(np);
    case 5:
      return DotFor<5>(np);
    case 6:
      return DotFor<6>(np);
    default:
      return nullptr;
  }
}

// Panels [q0, q1) for all M rows of the packed A: blocks of 6 rows × 2 panels (12 sums in
// registers), or, with fewer rows, more panels per pass (independent accumulation chains).
// backwards: the panel chunks last to first (each column's sum is the same; see gemm.h's
// GemmPackedRhsCols for why a step alternates).
FUSEDLSTM_AVX512BF16 void DotGemm(int64_t M, int64_t Kp, const uint16_t* ap, const uint16_t* bp,
                                  int64_t q0, int64_t q1, int64_t N, float* c, int64_t ldc,
                                  bool accumulate, bool backwards) {
  for (int64_t m = 0; m < M; m += 6) {
    const int mr = static_cast<int>(std::min<int64_t>(6, M - m));
    const int np_max = mr <= 2 ? 4 : 2;
    const int64_t chunks = (q1 - q0 + np_max - 1) / np_max;
    for (int64_t i = 0; i < chunks; ++i) {
      const int64_t q = q0 + (backwards ? chunks - 1 - i : i) * np_max;
      const int np = static_cast<int>(std::min<int64_t>(np_max, q1 - q));
      DotKernel(mr, np)(Kp, ap + m * Kp, bp + q * Kp * 16, c + m * ldc + q * 16, ldc, N - q * 16,
                        accumulate);
    }
  }
}

struct TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Tiles of B (and rows of A) are prefetched this many depth steps ahead of their loads: a tile
// load waits on its register's previous products (tiles are not renamed), so a miss to L2 is
// never hidden otherwise.
constexpr int64_t kPrefetch = 2;
// The products of depth [k0, k1) of one block (TileBlock's), added to tiles 0-3: A's tiles
// from ap (h rows high), B's from panel (and the next panel, Kp·16 on).
template <int RT, int CT>
FUSEDLSTM_AMX inline __attribute__((always_inline)) void DepthSteps(int64_t Kp, int64_t h,
                                                                    int64_t k0, int64_t k1,
                                                                    const uint16_t* ap,
                                                                    const uint16_t* panel) {
  for (int64_t k = k0; k < k1; k += kKBlock) {
    {
      const int64_t kn = k + kPrefetch * kKBlock;
      if (kn < k1) {
        for (int l = 0; l < 16; ++l) {
          _mm_prefetch(reinterpret_cast<const char*>(panel + kn * 16 + l * 32), _MM_HINT_T0);
          if (CT > 1) {
            _mm_prefetch(reinterpret_cast<const char*>(panel + Kp * 16 + kn * 16 + l * 32),
                         _MM_HINT_T0);
          }
          _mm_prefetch(reinterpret_cast<const char*>(ap + kn * h + l * 32), _MM_HINT_T0);
          if (RT > 1) {
            _mm_prefetch(reinterpret_cast<const char*>(ap + kn * h + 512 + l * 32), _MM_HINT_T0);
          }
        }
      }
    }
    // Each load just before its first product, so loads overlap products on other tiles.
    _tile_loadd(4, ap + k * h, 64);
    _tile_loadd(6, panel + k * 16, 64);
    _tile_dpbf16ps(0, 4, 6);
    if (CT > 1) {
      _tile_loadd(7, panel + Kp * 16 + k * 16, 64);
      _tile_dpbf16ps(1, 4, 7);
    }
    if (RT > 1) {
      _tile_loadd(5, ap + k * h + 512, 64);
      _tile_dpbf16ps(2, 5, 6);
      if (CT > 1) _tile_dpbf16ps(3, 5, 7);
    }
  }
}

// A second product for the same block: its A (the block's first tile) and its pair of panels,
// Kp deep. Its sums continue in the tiles the first left them in.
struct SecondProduct {
  int64_t Kp;
  const uint16_t *a, *b;
};

// AMX: blocks of 32 rows (2 A tiles) × 32 columns (2 B tiles), 4 accumulator tiles, over
// depth [k0, k1). The first depth block starts from zero or, accumulating, from C itself; a
// later one from `part`, where the previous block left its sums (stored exactly as float32, so
// blocking the depth cannot change a result). The last block writes C. A whole block moves
// between C and the tiles directly; one at the edges (fewer rows or columns) goes through
// `part`, masked, with the same arithmetic, so how rows are split into calls changes nothing.
template <int RT, int CT>
FUSEDLSTM_AMX void TileBlock(int64_t Kp, int64_t h, int64_t k0, int64_t k1, const uint16_t* ap,
                             const uint16_t* panel, float* part, bool first, bool last, float* c,
                             int64_t ldc, int64_t rows, int64_t valid, bool accumulate,
                             const SecondProduct* second = nullptr) {
  const bool direct = rows >= 16 * RT && valid >= 16 * CT;
  const int64_t c_stride = ldc * 4;
  if (first && accumulate && !direct) {  // C's block into part, zeros past its edges
    for (int rt = 0; rt < RT; ++rt) {
      for (int64_t r = 0; r < 16; ++r) {
        for (int ct = 0; ct < CT; ++ct) {
          float* dst = part + (2 * rt + ct) * 256 + r * 16;
          const __mmask16 m = r < rows - 16 * rt ? ColMask(valid - 16 * ct) : __mmask16(0);
          _mm512_store_ps(dst, _mm512_maskz_loadu_ps(m, c + (16 * rt + r) * ldc + 16 * ct));
        }
      }
    }
  }
  if (first && !accumulate) {
    _tile_zero(0);
    if (CT > 1) _tile_zero(1);
    if (RT > 1) _tile_zero(2);
    if (RT > 1 && CT > 1) _tile_zero(3);
  } else if (first && direct) {
    _tile_loadd(0, c, c_stride);
    if (CT > 1) _tile_loadd(1, c + 16, c_stride);
    if (RT > 1) _tile_loadd(2, c + 16 * ldc, c_stride);
    if (RT > 1 && CT > 1) _tile_loadd(3, c + 16 * ldc + 16, c_stride);
  } else {
    _tile_loadd(0, part, 64);
    if (CT > 1) _tile_loadd(1, part + 256, 64);
    if (RT > 1) _tile_loadd(2, part + 512, 64);
    if (RT > 1 && CT > 1) _tile_loadd(3, part + 768, 64);
  }
  DepthSteps<RT, CT>(Kp, h, k0, k1, ap, panel);
  if (second) DepthSteps<RT, CT>(second->Kp, h, 0, second->Kp, second->a, second->b);
  if (last && direct) {
    _tile_stored(0, c, c_stride);
    if (CT > 1) _tile_stored(1, c + 16, c_stride);
    if (RT > 1) _tile_stored(2, c + 16 * ldc, c_stride);
    if (RT > 1 && CT > 1) _tile_stored(3, c + 16 * ldc + 16, c_stride);
    return;
  }
  _tile_stored(0, part, 64);
  if (CT > 1) _tile_stored(1, part + 256, 64);
  if (RT > 1) _tile_stored(2, part + 512, 64);
  if (RT > 1 && CT > 1) _tile_stored(3, part + 768, 64);
  if (!last) return;
  for (int rt = 0; rt < RT; ++rt) {
    for (int64_t r = 0; r < std::min<int64_t>(16, rows - 16 * rt); ++r) {
      for (int ct = 0; ct < CT; ++ct) {
        StoreSums(_mm512_load_ps(part + (2 * rt + ct) * 256 + r * 16),
                  c + (16 * rt + r) * ldc + 16 * ct, ColMask(valid - 16 * ct), false);
      }
    }
  }
}

// Depth blocks: as deep as A's share of one (all M rows) fits in half of L2, up to
// kTileDepth. Each further block sends every sum through memory and back, which costs more than
// shallower blocks save in L1 misses (a (128,100,256,512) backward's per-step products, K =
// 2048: 197 ms at depth 512, 172 at 4096). Within a block, while A's share fits, each pair of
// panels meets every row block of A in turn: B streams from memory once, A is re-read from L2
// (the gradients' products, K = N·T, read B from memory once per row block otherwise: 24 times
// for dW and dR at (128,100,256,512)). A longer A (the hoisted projection's) meets every pair
// of panels one row block at a time, B staying in L2.
constexpr int64_t kTileDepth = 4096;
constexpr int64_t kMinTileDepth = 512;
constexpr int64_t kRowsOuterBytes = 1 << 20;

// The depth of TileGemm's blocks for M rows.
inline int64_t TileDepth(int64_t M) {
  const int64_t Mp = RoundUp(M, 16);
  return std::clamp<int64_t>(kRowsOuterBytes / (Mp * 2) / kKBlock * kKBlock, kMinTileDepth,
                             kTileDepth);
}

// second_a, second_b: a second product (A packed as the first, second_kp deep), its sums added
// in the tiles (one depth block in all: second_kp + Kp at most TileDepth(M)).
FUSEDLSTM_AMX void TileGemm(int64_t M, int64_t Kp, const uint16_t* ap, const uint16_t* bp,
                            int64_t q0, int64_t q1, int64_t N, float* c, int64_t ldc,
                            bool accumulate, int64_t second_kp = 0,
                            const uint16_t* second_a = nullptr,
                            const uint16_t* second_b = nullptr) {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
  _tile_loadconfig(&cfg);
  const int64_t m_blocks = (M + 31) / 32, q_pairs = (q1 - q0 + 1) / 2;
  const int64_t Mp = RoundUp(M, 16), depth = TileDepth(M);
  const bool rows_outer = Mp * std::min(Kp + second_kp, depth) * 2 > kRowsOuterBytes;
  // One depth block: each block's sums pass through one buffer that stays in L1.
  const bool one_pass = Kp <= depth;
  alignas(64) float local[1024];
  thread_local std::vector<float, AlignedAllocator<float>> parts;
  const int64_t need = one_pass ? 0 : m_blocks * q_pairs * 1024;
  if (static_cast<int64_t>(parts.size()) < need) parts.resize(need);
  for (int64_t k0 = 0; k0 < Kp; k0 += depth) {
    const int64_t k1 = std::min(Kp, k0 + depth);
    const bool first = k0 == 0, last = k1 == Kp;
    for (int64_t it = 0; it < q_pairs * m_blocks; ++it) {
      const int64_t pq = rows_outer ? it % q_pairs : it / m_blocks;
      const int64_t mb = rows_outer ? it / q_pairs : it % m_blocks;
      const int64_t q = q0 + 2 * pq;
      const uint16_t* b = bp + q * Kp * 16;
      const int64_t valid = N - q * 16;
      const bool two_cols = q + 1 < q1;
      {
        const int64_t m = 32 * mb, rows = std::min<int64_t>(32, M - m);
        const uint16_t* a = ap + m * Kp;  // the block's first tile (ALayout, tiled)
        const int64_t h = std::min<int64_t>(32, RoundUp(M, 16) - m);
        float* cb = c + m * ldc + q * 16;
        float* part = one_pass ? local : parts.data() + (mb * q_pairs + pq) * 1024;
        const SecondProduct sp{second_kp, second_a + m * second_kp, second_b + q * second_kp * 16};
        const SecondProduct* second = second_kp > 0 ? &sp : nullptr;
        if (rows > 16 && two_cols) {
          TileBlock<2, 2>(Kp, h, k0, k1, a, b, part, first, last, cb, ldc, rows, valid, accumulate,
                          second);
        } else if (rows > 16) {
          TileBlock<2, 1>(Kp, h, k0, k1, a, b, part, first, last, cb, ldc, rows, valid, accumulate,
                          second);
        } else if (two_cols) {
          TileBlock<1, 2>(Kp, h, k0, k1, a, b, part, first, last, cb, ldc, rows, valid, accumulate,
                          second);
        } else {
          TileBlock<1, 1>(Kp, h, k0, k1, a, b, part, first, last, cb, ldc, rows, valid, accumulate,
                          second);
        }
      }
    }
  }
  _tile_release();
}

}  // namespace

void PackRhsBf16(const float* b, int64_t rs, int64_t cs, int64_t K, int64_t N, int64_t n0,
                 int64_t n1, uint16_t* out) {
  const int64_t Kp = RoundUp(K, kKBlock), end = RoundUp(std::min(n1, RoundUp(N, 32)), kPanel);
  for (int64_t q = n0 / kPanel; q * kPanel < end; ++q) {
    int64_t cols[16];
    for (int j = 0; j < 16; ++j) cols[j] = q * kPanel + j < N ? q * kPanel + j : -1;
    PackPanel(b, rs, cs, K, cols, out + q * Kp * kPanel);
  }
}

void PackGatePanelBf16(const float* w, int64_t K, int64_t H, int64_t panel, uint16_t* out) {
  constexpr int64_t U = 16;  // gemm.h's kGateGroupUnits<float>
  const int64_t Kp = RoundUp(K, kKBlock), G = 4 * H;
  for (int64_t half = 0; half < 2; ++half) {
    int64_t cols[16];
    for (int j = 0; j < 16; ++j) {
      const int64_t col = panel * 32 + half * 16 + j;  // column in the grouped order
      const int64_t q = col / (4 * U), u = std::min<int64_t>(U, H - q * U);
      const int64_t within = col - q * 4 * U, g = u > 0 ? within / u : 4;
      cols[j] = col < G && g < 4 ? g * H + q * U + (within - g * u) : -1;
    }
    PackPanel(w, G, 1, K, cols, out + (panel * 2 + half) * Kp * kPanel);
  }
}

namespace {
// This thread's buffer for packed left-hand sides, at least `size` elements (the GEMMs below
// never nest, so they share it).
uint16_t* LhsBuffer(int64_t size) {
  thread_local std::vector<uint16_t> buffer;
  if (static_cast<int64_t>(buffer.size()) < size) buffer.resize(size);
  return buffer.data();
}
}  // namespace

void GemmBf16(Bf16Engine engine, int64_t M, int64_t N, int64_t K, int64_t col_begin,
              int64_t col_end, const float* a, int64_t ars, int64_t acs, const uint16_t* packed_b,
              float* c, int64_t ldc, bool accumulate, bool backwards) {
  col_end = std::min(col_end, N);
  if (M <= 0 || col_end <= col_begin) return;
  const int64_t Kp = RoundUp(K, kKBlock);
  const bool amx = engine == Bf16Engine::kAmx;
  const int64_t Mp = amx ? RoundUp(M, 16) : M;
  uint16_t* apack = LhsBuffer(Mp * Kp);
  PackLhs(M, ALayout{Kp, Mp, amx}, K, a, ars, acs, apack);
  const int64_t q0 = col_begin / kPanel, q1 = (col_end + kPanel - 1) / kPanel;
  if (amx) {
    TileGemm(M, Kp, apack, packed_b, q0, q1, col_end, c, ldc, accumulate);
  } else {
    DotGemm(M, Kp, apack, packed_b, q0, q1, col_end, c, ldc, accumulate, backwards);
  }
}

void GemmBf16Shared(Bf16Engine engine, int64_t M, int64_t K, const float* a, int64_t lda,
                    const Bf16Rhs& first, const Bf16Rhs& second) {
  if (M <= 0) return;
  const int64_t Kp = RoundUp(K, kKBlock);
  const bool amx = engine == Bf16Engine::kAmx;
  const int64_t Mp = amx ? RoundUp(M, 16) : M;
  uint16_t* apack = LhsBuffer(Mp * Kp);
  PackLhs(M, ALayout{Kp, Mp, amx}, K, a, lda, 1, apack);
  for (const Bf16Rhs* r : {&first, &second}) {
    if (r->N <= 0) continue;
    const int64_t q1 = (r->N + kPanel - 1) / kPanel;
    if (amx) {
      TileGemm(M, Kp, apack, r->packed, 0, q1, r->N, r->c, r->ldc, r->accumulate);
    } else {
      DotGemm(M, Kp, apack, r->packed, 0, q1, r->N, r->c, r->ldc, r->accumulate, false);
    }
  }
}

void GemmBf16Sum(Bf16Engine engine, int64_t M, int64_t N, int64_t K1, int64_t K2, int64_t col_begin,
                 int64_t col_end, const float* a1, int64_t lda1, const uint16_t* b1,
                 const float* a2, int64_t lda2, const uint16_t* b2, float* c, int64_t ldc,
                 bool backwards) {
  col_end = std::min(col_end, N);
  if (M <= 0 || col_end <= col_begin) return;
  const int64_t Kp1 = RoundUp(K1, kKBlock), Kp2 = RoundUp(K2, kKBlock);
  if (engine != Bf16Engine::kAmx || K1 == 0 || Kp1 + Kp2 > TileDepth(M)) {
    GemmBf16(engine, M, N, K1, col_begin, col_end, a1, lda1, 1, b1, c, ldc, false, backwards);
    return GemmBf16(engine, M, N, K2, col_begin, col_end, a2, lda2, 1, b2, c, ldc, true, backwards);
  }
  const int64_t Mp = RoundUp(M, 16);
  uint16_t* ap1 = LhsBuffer(Mp * (Kp1 + Kp2));
  uint16_t* ap2 = ap1 + Mp * Kp1;
  PackLhs(M, ALayout{Kp1, Mp, true}, K1, a1, lda1, 1, ap1);
  PackLhs(M, ALayout{Kp2, Mp, true}, K2, a2, lda2, 1, ap2);
  const int64_t q0 = col_begin / kPanel, q1 = (col_end + kPanel - 1) / kPanel;
  TileGemm(M, Kp1, ap1, b1, q0, q1, col_end, c, ldc, false, Kp2, ap2, b2);
}

namespace {

FUSEDLSTM_AVX512BF16 double DotPeak(double seconds) {
  constexpr int kAcc = 16;
  __m512 acc[kAcc];
  for (int i = 0; i < kAcc; ++i) acc[i] = _mm512_set1_ps(1e-3f * i);
  const __m512bh a = (__m512bh)_mm512_set1_epi32(0x3f803f80), b = a;  // pairs of 1.0
  int64_t iters = 0;
  const auto start = std::chrono::steady_clock::now();
  double elapsed = 0;
  do {
    for (int64_t k = 0; k < (1 << 20); ++k) {
      for (int i = 0; i < kAcc; ++i) acc[i] = _mm512_dpbf16_ps(acc[i], a, b);
      __asm__ volatile("" : "+v"(acc[0]));  // keep the chains live
    }
    iters += 1 << 20;
    elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  } while (elapsed < seconds);
  float sink = 0;
  for (int i = 0; i < kAcc; ++i) sink += _mm512_reduce_add_ps(acc[i]);
  volatile float keep = sink;
  (void)keep;
  return 2.0 * 32 * kAcc * double(iters) / elapsed;  // 32 products per instruction
}

FUSEDLSTM_AMX double TilePeak(double seconds) {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
  _tile_loadconfig(&cfg);
  alignas(64) static const uint16_t zeros[16 * 32] = {};
  _tile_loadd(4, zeros, 64);
  _tile_loadd(6, zeros, 64);
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  int64_t iters = 0;
  const auto start = std::chrono::steady_clock::now();
  double elapsed = 0;
  do {
    for (int64_t k = 0; k < (1 << 16); ++k) {
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(1, 4, 6);
      _tile_dpbf16ps(2, 4, 6);
      _tile_dpbf16ps(3, 4, 6);
    }
    iters += 4 << 16;
    elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  } while (elapsed < seconds);
  _tile_release();
  return 2.0 * 16 * 16 * 32 * double(iters) / elapsed;
}

}  // namespace

double Bf16DotPeakFlopsOneThread(double seconds) {
  return Bf16Available() == Bf16Engine::kNone ? 0.0 : DotPeak(seconds);
}

double AmxPeakFlopsOneThread(double seconds) {
  return Bf16Available() == Bf16Engine::kAmx ? TilePeak(seconds) : 0.0;
}

#else  // not x86-64: no engine; nothing below can be reached (Bf16Active() is kNone)

void PackRhsBf16(const float*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, uint16_t*) {}
void PackGatePanelBf16(const float*, int64_t, int64_t, int64_t, uint16_t*) {}
void GemmBf16(Bf16Engine, int64_t, int64_t, int64_t, int64_t, int64_t, const float*, int64_t,
              int64_t, const uint16_t*, float*, int64_t, bool, bool) {}
void GemmBf16Shared(Bf16Engine, int64_t, int64_t, const float*, int64_t, const Bf16Rhs&,
                    const Bf16Rhs&) {}
void GemmBf16Sum(Bf16Engine, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, const float*,
                 int64_t, const uint16_t*, const float*, int64_t, const uint16_t*, float*, int64_t,
                 bool) {}
double Bf16DotPeakFlopsOneThread(double) { return 0.0; }
double AmxPeakFlopsOneThread(double) { return 0.0; }

#endif

}  // namespace fusedlstm
