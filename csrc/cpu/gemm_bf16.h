// The GEMMs of the bfloat16 compute precision: operands rounded to bfloat16 (round to nearest
// even; NaN stays NaN; float32 denormals become signed zeros, as VCVTNEPS2BF16 does), products
// summed in float32. Two engines, chosen at run time: AVX512_BF16's VDPBF16PS and, where the
// CPU and OS have them, AMX tiles (TDPBF16PS). This file's code is compiled for those
// instruction sets only (function target attributes), so the library loads on any x86-64 CPU;
// nothing here may run unless Bf16Active() says so.
//
// Results depend only on the shape and the engine: each element's sum runs over k in the same
// order whatever the row or column blocking, so partitions (thread counts) cannot change them.
#ifndef FUSEDLSTM_CPU_GEMM_BF16_H_
#define FUSEDLSTM_CPU_GEMM_BF16_H_

#include <cstdint>

namespace fusedlstm {

enum class Bf16Engine : int32_t { kNone = 0, kAvx512 = 1, kAmx = 2 };

// The best engine this CPU and OS offer (AMX also needs the kernel's permission for tile data,
// requested once here).
Bf16Engine Bf16Available();
// The engine the kernels use: Bf16Available() unless lowered by SetBf16Engine.
Bf16Engine Bf16Active();
// Lowers (or restores) the engine; false, and no change, if `e` is not available.
bool SetBf16Engine(Bf16Engine e);
// What the CPU lacks for bfloat16 compute ("" when it has it).
const char* Bf16Missing();

// x rounded to bfloat16, as the kernels round (the upper 16 bits of a float32).
uint16_t FloatToBf16(float x);

// Packed right-hand sides: K rounded up to 32 (zero rows), columns in panels of 16, each panel
// [K/2][16][2] (pairs of consecutive k per column, the layout both engines read). Sizes are in
// bf16 elements; N is rounded up to 32 so gate panels (gemm.h, 32 columns) pack whole.
int64_t PackedRhsBf16Size(int64_t K, int64_t N);
// B(k, n) = b[k·rs + n·cs]; columns [n0, n1) only, n0 a multiple of 16 (a task's share; the
// whole matrix is n0 = 0, n1 = N). Fast when cs == 1 or rs == 1.
void PackRhsBf16(const float* b, int64_t rs, int64_t cs, int64_t K, int64_t N, int64_t n0,
                 int64_t n1, uint16_t* out);
// Panel `panel` (32 columns) of w [K, 4H] in gemm.h's gate groups of 16 units, as
// PackGateRows<float> orders it.
void PackGatePanelBf16(const float* w, int64_t K, int64_t H, int64_t panel, uint16_t* out);

// C[M, col_begin..col_end) = (accumulate: +=) A·B, A(m, k) = a[m·ars + k·acs] in float32
// (rounded here; fast when acs == 1 or ars == 1), B packed by PackRhsBf16 for this K and N;
// col_begin a multiple of 16; c points at column 0 of row 0. backwards: VDPBF16PS reads the
// panels last to first (the same sums; AMX ignores it).
void GemmBf16(Bf16Engine engine, int64_t M, int64_t N, int64_t K, int64_t col_begin,
              int64_t col_end, const float* a, int64_t ars, int64_t acs, const uint16_t* packed_b,
              float* c, int64_t ldc, bool accumulate, bool backwards = false);

// A packed right-hand side (N columns, packed for the product's K) and where its product goes.
struct Bf16Rhs {
  int64_t N;
  const uint16_t* packed;
  float* c;
  int64_t ldc;
  bool accumulate;
};
// Two products of one A (row-major, leading dimension lda) rounded once: C1 (+)= A·B1 and
// C2 (+)= A·B2, each as GemmBf16 of all its columns would compute it.
void GemmBf16Shared(Bf16Engine engine, int64_t M, int64_t K, const float* a, int64_t lda,
                    const Bf16Rhs& first, const Bf16Rhs& second);

// C[M, col_begin..col_end) = A1·B1 + A2·B2 (A row-major, leading dimensions lda1, lda2; B1, B2
// packed for K1, K2 and N), equal bit for bit to GemmBf16 of the first (written) then of the
// second (accumulating). With AMX both products' sums stay in the tiles between them (no round
// trip of C through memory) when both fit one depth block.
void GemmBf16Sum(Bf16Engine engine, int64_t M, int64_t N, int64_t K1, int64_t K2, int64_t col_begin,
                 int64_t col_end, const float* a1, int64_t lda1, const uint16_t* b1,
                 const float* a2, int64_t lda2, const uint16_t* b2, float* c, int64_t ldc,
                 bool backwards = false);

// Floating-point operations per second of a register-only VDPBF16PS loop on the calling thread
// (0 where the CPU lacks AVX512_BF16), and of TDPBF16PS tiles (0 without AMX); about `seconds`.
double Bf16DotPeakFlopsOneThread(double seconds);
double AmxPeakFlopsOneThread(double seconds);

}  // namespace fusedlstm

#endif  // FUSEDLSTM_CPU_GEMM_BF16_H_
