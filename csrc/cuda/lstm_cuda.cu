// CUDA implementation of the fused LSTM contract (fusedlstm/lstm.h). Layouts are those of
// lstm.h, row-major; cuBLAS is column-major, so a row-major [m, n] matrix is passed as its
// column-major transpose [n, m] (leading dimension n) and every product below is written in
// that view, with the row-major equation it computes beside it.
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <climits>
#include <stdexcept>
#include <string>

#include "fusedlstm/lstm.h"
#include "fusedlstm/validate.h"

namespace fusedlstm {
namespace {

void Check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(e));
}
void Check(cublasStatus_t e, const char* what) {
  if (e != CUBLAS_STATUS_SUCCESS) {
    throw std::runtime_error(std::string(what) + ": cuBLAS status " + std::to_string(int(e)));
  }
}
#define FL_CUDA(call) Check((call), #call)
#define FL_LAUNCH(what) Check(cudaGetLastError(), what)

constexpr int kThreads = 256;
static_assert(kMaxCudaLaunchElements == int64_t(INT_MAX) * kThreads, "validate.h's launch limit");
// Blocks of a launch over n elements; ValidateCudaSizes keeps n within one grid's 2^31 - 1 blocks.
inline unsigned Blocks(int64_t n) {
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  if (blocks > INT_MAX) {
    throw std::invalid_argument("CUDA LSTM: " + std::to_string(n) +
                                " elements exceed one launch's grid");
  }
  return static_cast<unsigned>(blocks);
}

// cuBLAS takes int sizes: a larger one is refused, never truncated (adapters check the shape
// first with ValidateCudaSizes, validate.h; this is the last line).
inline int Int(int64_t v, const char* what) {
  if (v < 0 || v > INT_MAX) {
    throw std::invalid_argument(std::string("CUDA LSTM: ") + what + " = " + std::to_string(v) +
                                " exceeds INT_MAX, the largest size cuBLAS takes");
  }
  return static_cast<int>(v);
}

// Column-major GEMM, C = alpha·op(A)·op(B) + beta·C, in float or double.
void Gemm(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int64_t m, int64_t n,
          int64_t k, float beta, const float* a, int64_t lda, const float* b, int64_t ldb, float* c,
          int64_t ldc) {
  const float one = 1.0f;
  Check(cublasSgemm(h, ta, tb, Int(m, "m"), Int(n, "n"), Int(k, "k"), &one, a, Int(lda, "lda"), b,
                    Int(ldb, "ldb"), &beta, c, Int(ldc, "ldc")),
        "cublasSgemm");
}
void Gemm(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int64_t m, int64_t n,
          int64_t k, double beta, const double* a, int64_t lda, const double* b, int64_t ldb,
          double* c, int64_t ldc) {
  const double one = 1.0;
  Check(cublasDgemm(h, ta, tb, Int(m, "m"), Int(n, "n"), Int(k, "k"), &one, a, Int(lda, "lda"), b,
                    Int(ldb, "ldb"), &beta, c, Int(ldc, "ldc")),
        "cublasDgemm");
}

// The activations exactly as the CPU reference formulas (no fast-math): exp overflows to inf
// for very negative x and the sigmoid is then 0; NaN stays NaN.
__device__ inline float Sigm(float x) { return 1.0f / (1.0f + expf(-x)); }
__device__ inline double Sigm(double x) { return 1.0 / (1.0 + exp(-x)); }
__device__ inline float Tanh(float x) { return tanhf(x); }
__device__ inline double Tanh(double x) { return tanh(x); }

__device__ inline int64_t Len(const int32_t* lengths, int64_t n, int64_t T) {
  return lengths ? lengths[n] : T;
}

// Valid steps and positions (lstm.h: lengths or a step mask, reverse), as the CPU kernel's.
struct Steps {
  const int32_t* lengths;
  const uint8_t* mask;
  int64_t T;
  bool reverse;
  __device__ int64_t pos(int64_t n, int64_t t) const {
    if (!reverse) return t;
    if (mask) return T - 1 - t;
    const int64_t len = Len(lengths, n, T);
    return t < len ? len - 1 - t : t;
  }
  __device__ bool valid(int64_t n, int64_t t) const {
    return mask ? mask[n * T + pos(n, t)] != 0 : t < Len(lengths, n, T);
  }
};

// Keras's activations by lstm.h's codes, and their derivatives from their outputs (the CPU's
// formulas; relu and hard_sigmoid have derivative 0 at their kinks).
template <typename S>
__device__ inline S Act(int a, S x) {
  switch (a) {
    case 0:
      return Tanh(x);
    case 1:
      return x > S(0) ? x : S(0);
    case 2:
      return x;
    case 3:
      return Sigm(x);
    default: {
      const S v = x + S(3);
      return (v < S(0) ? S(0) : (v > S(6) ? S(6) : v)) / S(6);
    }
  }
}
template <typename S>
__device__ inline S ActGrad(int a, S y) {
  switch (a) {
    case 0:
      return S(1) - y * y;
    case 1:
      return y > S(0) ? S(1) : S(0);
    case 2:
      return S(1);
    case 3:
      return y * (S(1) - y);
    default:
      return (y > S(0) && y < S(1)) ? S(1) / S(6) : S(0);
  }
}

// dst[n, t, :] = src[n, pos(n, t), :] for rows of w: a reverse pass's x in step order, so the
// projection stays one GEMM and every cache array is in step order.
template <typename S>
__global__ void GatherSteps(const S* src, S* dst, int64_t N, int64_t T, int64_t w, Steps steps) {
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i >= N * T * w) return;
  const int64_t row = i / w, k = i % w, n = row / T, t = row % T;
  dst[i] = src[(n * T + steps.pos(n, t)) * w + k];
}

// Reverses each row's step positions in place (dX of a reverse pass back to x's layout).
template <typename S>
__global__ void ReverseValidSteps(S* a, int64_t N, int64_t T, int64_t w, Steps steps) {
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i >= N * T * w) return;
  const int64_t row = i / w, k = i % w, n = row / T, t = row % T;
  const int64_t len = steps.mask ? T : Len(steps.lengths, n, T);
  if (t >= len / 2) return;
  S* p = a + (n * T + t) * w + k;
  S* q = a + (n * T + len - 1 - t) * w + k;
  const S tmp = *p;
  *p = *q;
  *q = tmp;
}

// dst[n, 0:w] = src ? src[n, 0:w] : 0 for rows with pitch dst_ld (a strided state init).
template <typename S>
__global__ void InitRows(S* dst, int64_t dst_ld, const S* src, int64_t N, int64_t w) {
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i >= N * w) return;
  const int64_t n = i / w, k = i % w;
  dst[n * dst_ld + k] = src ? src[i] : S(0);
}

// One time step: gates from z + b, cell and hidden update, output; padded rows carry the state.
template <typename S>
__global__ void GatesForward(int64_t t, int64_t N, int64_t T, int64_t H, S* gates, const S* bias,
                             Steps steps, bool training, S* hist_h, S* hist_c, S* hbuf, S* c_run,
                             S* h_n, S* outputs, int64_t out_ld, int act, int rec) {
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i >= N * H) return;
  const int64_t n = i / H, u = i % H, G = 4 * H;
  S* z = gates + (n * T + t) * G;
  const S* c_prev;
  S* c_next;
  const S* h_prev;
  S* h_next;
  if (training) {  // h_{t-1} at hist_h[n, t], c_{t-1} at hist_c[n, t]
    c_prev = hist_c + (n * (T + 1) + t) * H + u;
    c_next = hist_c + (n * (T + 1) + t + 1) * H + u;
    h_prev = hist_h + (n * T + t) * H + u;
    h_next = t + 1 < T ? hist_h + (n * T + t + 1) * H + u : h_n + n * H + u;
  } else {  // h ping-pongs in hbuf, c is updated in place in c_run
    c_prev = c_next = c_run + n * H + u;
    h_prev = hbuf + (t % 2) * N * H + n * H + u;
    h_next = hbuf + ((t + 1) % 2) * N * H + n * H + u;
  }
  S* out = outputs + (n * T + steps.pos(n, t)) * out_ld + u;
  if (!steps.valid(n, t)) {
    const S cp = *c_prev, hp = *h_prev;
    *c_next = cp;
    *h_next = hp;
    *out = S(0);
    return;
  }
  const S gi = Act(rec, z[u] + bias[u]);
  const S gf = Act(rec, z[H + u] + bias[H + u]);
  const S gg = Act(act, z[2 * H + u] + bias[2 * H + u]);
  const S go = Act(rec, z[3 * H + u] + bias[3 * H + u]);
  const S c = gf * *c_prev + gi * gg;
  const S h = go * Act(act, c);
  if (training) {
    z[u] = gi;
    z[H + u] = gf;
    z[2 * H + u] = gg;
    z[3 * H + u] = go;
  }
  *c_next = c;
  *h_next = h;
  *out = h;
}

// One backward step: dZ_t (written over the cached gates), dc carried to t-1; dh_run is left for
// the recurrent product (SelectDh). Padded rows: dZ = 0, dh and dc pass through.
template <typename S>
__global__ void GatesBackward(int64_t t, int64_t N, int64_t T, int64_t H, S* gates, const S* hist_c,
                              Steps steps, const S* d_outputs, const S* dh_run, S* dc_run,
                              int64_t out_ld, int act, int rec) {
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i >= N * H) return;
  const int64_t n = i / H, u = i % H, G = 4 * H;
  S* z = gates + (n * T + t) * G;
  if (!steps.valid(n, t)) {
    z[u] = z[H + u] = z[2 * H + u] = z[3 * H + u] = S(0);
    return;
  }
  const S gi = z[u], gf = z[H + u], gg = z[2 * H + u], go = z[3 * H + u];
  const S c_prev = hist_c[(n * (T + 1) + t) * H + u];
  const S tc = Act(act, hist_c[(n * (T + 1) + t + 1) * H + u]);
  const S dh =
      d_outputs ? dh_run[i] + d_outputs[(n * T + steps.pos(n, t)) * out_ld + u] : dh_run[i];
  const S dc = dc_run[i] + dh * go * ActGrad(act, tc);
  dc_run[i] = dc * gf;
  z[3 * H + u] = dh * tc * ActGrad(rec, go);
  z[H + u] = dc * c_prev * ActGrad(rec, gf);
  z[u] = dc * gg * ActGrad(rec, gi);
  z[2 * H + u] = dc * gi * ActGrad(act, gg);
}

// dh_{t-1} = dZ_t·Rᵀ for rows valid at t; padded rows keep the dh they carry.
template <typename S>
__global__ void SelectDh(int64_t t, int64_t N, int64_t T, int64_t H, Steps steps, const S* dh_new,
                         S* dh_run) {
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i >= N * H) return;
  if (steps.valid(i / H, t)) dh_run[i] = dh_new[i];
}

// Zero rows [n, t, 0:w] of a [N, T, w] array (in step order) at invalid steps.
template <typename S>
__global__ void ZeroPadded(S* a, int64_t N, int64_t T, int64_t w, Steps steps) {
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i >= N * T * w) return;
  const int64_t row = i / w, n = row / T, t = row % T;
  if (!steps.valid(n, t)) a[i] = S(0);
}

// dst[n, t, :] = src[n, t, :] ⊙ mask[n, :] for T steps of rows of H (src's step pitch src_ld):
// h_{t-1} as one gate's recurrent product reads it under recurrent dropout.
template <typename S>
__global__ void MaskRows(const S* src, int64_t src_ld, const S* mask, int64_t N, int64_t T,
                         int64_t H, S* dst) {
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i >= N * T * H) return;
  const int64_t row = i / H, u = i % H, n = row / T;
  dst[i] = src[row * src_ld + u] * mask[n * H + u];
}

// dst (+)= src ⊙ mask over count elements (accumulate false: the first gate sets it).
template <typename S>
__global__ void AddMasked(const S* src, const S* mask, int64_t count, bool accumulate, S* dst) {
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i >= count) return;
  dst[i] = (accumulate ? dst[i] : S(0)) + src[i] * mask[i];
}

// db[j] = Σ_rows dZ[r, j], each column summed in row order by one thread: no atomics.
template <typename S>
__global__ void ColumnSums(const S* dz, int64_t rows, int64_t G, S* db) {
  const int64_t j = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (j >= G) return;
  S acc = S(0);
  for (int64_t r = 0; r < rows; ++r) acc += dz[r * G + j];
  db[j] = acc;
}

template <typename S>
void CopyOrZero(S* dst, const S* src, int64_t count, cudaStream_t st) {
  if (count <= 0) return;
  if (src) {
    FL_CUDA(cudaMemcpyAsync(dst, src, sizeof(S) * count, cudaMemcpyDeviceToDevice, st));
  } else {
    FL_CUDA(cudaMemsetAsync(dst, 0, sizeof(S) * count, st));
  }
}

struct Bound {
  cudaStream_t stream;
  cublasHandle_t blas;
  explicit Bound(const CudaContext& ctx)
      : stream(static_cast<cudaStream_t>(ctx.stream)),
        blas(static_cast<cublasHandle_t>(ctx.cublas)) {
    if (!blas) throw std::runtime_error("CudaContext.cublas is null");
    Check(cublasSetStream(blas, stream), "cublasSetStream");
    // Full-precision float32 products (no TF32), as on the CPU.
    Check(cublasSetMathMode(blas, CUBLAS_DEFAULT_MATH), "cublasSetMathMode");
  }
};

}  // namespace

int64_t CudaForwardWorkspaceSize(const LstmShape& s, bool training, bool reverse) {
  const int64_t G = 4 * s.H;
  // Training: the bias and h_{t-1} ⊙ a recurrent mask [N, H]. Inference keeps a reverse pass's
  // x in step order here (training: in the cache).
  return training ? G + s.N * s.H
                  : G + s.N * s.T * G + 2 * s.N * s.H + (reverse ? s.N * s.T * s.C : 0);
}

int64_t CudaBackwardWorkspaceSize(const LstmShape& s, bool recurrent_masks) {
  // dh_new [N, H]; with recurrent masks one gate's product [N, H] and h_{t-1} ⊙ mask [N·T, H].
  return s.N * s.H + (recurrent_masks ? s.N * s.H + s.N * s.T * s.H : 0);
}

template <typename S>
void LstmForwardCuda(const CudaContext& ctx, const LstmShape& s, const ForwardArgs<S>& a) {
  const std::string too_large = ValidateCudaSizes(s);
  if (!too_large.empty()) throw std::invalid_argument(too_large);
  const int64_t T = s.T, N = s.N, H = s.H, C = s.C, G = 4 * H;
  const bool training = a.cache != nullptr;
  if (N == 0) return;
  Bound b(ctx);
  if (T == 0 || H == 0) {
    CopyOrZero(a.h_n, a.h0, N * H, b.stream);
    CopyOrZero(a.c_n, a.c0, N * H, b.stream);
    return;
  }
  S* bias = a.workspace;
  CopyOrZero(bias, a.bias, G, b.stream);
  const int64_t out_ld = a.out_ld ? a.out_ld : H;
  const Steps steps{a.lengths, a.step_mask, T, a.reverse};
  const int act = static_cast<int>(a.activation), rec = static_cast<int>(a.recurrent_activation);
  S *kernel, *rkernel, *gates, *hist_h = nullptr, *hist_c = nullptr, *hbuf = nullptr;
  const S* x = a.x;
  if (training) {  // the cache: kernel, rkernel, x, gates, h history, c history (lstm_cpu.cc)
    kernel = a.cache;
    rkernel = kernel + C * G;
    S* xc = rkernel + H * G;
    gates = xc + N * T * C;
    hist_h = gates + N * T * G;
    hist_c = hist_h + N * T * H;
    CopyOrZero(kernel, a.kernel, C * G, b.stream);
    CopyOrZero(rkernel, a.recurrent_kernel, H * G, b.stream);
    if (a.reverse && N * T * C > 0) {
      GatherSteps<S><<<Blocks(N * T * C), kThreads, 0, b.stream>>>(a.x, xc, N, T, C, steps);
      FL_LAUNCH("GatherSteps");
    } else {
      CopyOrZero(xc, a.x, N * T * C, b.stream);
    }
    x = xc;
    InitRows<S><<<Blocks(N * H), kThreads, 0, b.stream>>>(hist_h, T * H, a.h0, N, H);
    InitRows<S><<<Blocks(N * H), kThreads, 0, b.stream>>>(hist_c, (T + 1) * H, a.c0, N, H);
    FL_LAUNCH("InitRows");
  } else {
    kernel = const_cast<S*>(a.kernel);
    rkernel = const_cast<S*>(a.recurrent_kernel);
    gates = bias + G;
    hbuf = gates + N * T * G;
    CopyOrZero(hbuf, a.h0, N * H, b.stream);
    CopyOrZero(a.c_n, a.c0, N * H, b.stream);
    if (a.reverse && N * T * C > 0) {
      S* xs = hbuf + 2 * N * H;
      GatherSteps<S><<<Blocks(N * T * C), kThreads, 0, b.stream>>>(a.x, xs, N, T, C, steps);
      FL_LAUNCH("GatherSteps");
      x = xs;
    }
  }
  // Z[NT, G] = X[NT, C]·W[C, G]  (column-major: Zᵀ[G, NT] = Wᵀ[G, C]·Xᵀ[C, NT])
  if (C > 0) {
    Gemm(b.blas, CUBLAS_OP_N, CUBLAS_OP_N, G, N * T, C, S(0), kernel, G, x, C, gates, G);
  } else {
    FL_CUDA(cudaMemsetAsync(gates, 0, sizeof(S) * N * T * G, b.stream));
  }
  for (int64_t t = 0; t < T; ++t) {
    const S* h_in = training ? hist_h + t * H : hbuf + (t % 2) * N * H;
    const int64_t h_ld = training ? T * H : H;
    if (a.recurrent_masks && training) {
      // Z[:, t, gate g] += (h_{t-1} ⊙ mask_g)[N, H]·R[H, gate g]  (recurrent dropout)
      S* hm = bias + G;
      for (int64_t g = 0; g < 4; ++g) {
        MaskRows<S><<<Blocks(N * H), kThreads, 0, b.stream>>>(
            h_in, h_ld, a.recurrent_masks + g * N * H, N, 1, H, hm);
        FL_LAUNCH("MaskRows");
        Gemm(b.blas, CUBLAS_OP_N, CUBLAS_OP_N, H, N, H, S(1), rkernel + g * H, G, hm, H,
             gates + t * G + g * H, T * G);
      }
    } else {
      // Z[:, t, :] += h_{t-1}[N, H]·R[H, G]  (rows of Z_t are T·G apart)
      Gemm(b.blas, CUBLAS_OP_N, CUBLAS_OP_N, G, N, H, S(1), rkernel, G, h_in, h_ld, gates + t * G,
           T * G);
    }
    GatesForward<S><<<Blocks(N * H), kThreads, 0, b.stream>>>(t, N, T, H, gates, bias, steps,
                                                              training, hist_h, hist_c, hbuf, a.c_n,
                                                              a.h_n, a.outputs, out_ld, act, rec);
    FL_LAUNCH("GatesForward");
  }
  if (training) {  // c_n[n] = c history [n, T]
    FL_CUDA(cudaMemcpy2DAsync(a.c_n, sizeof(S) * H, hist_c + T * H, sizeof(S) * (T + 1) * H,
                              sizeof(S) * H, N, cudaMemcpyDeviceToDevice, b.stream));
  } else {
    FL_CUDA(cudaMemcpyAsync(a.h_n, hbuf + (T % 2) * N * H, sizeof(S) * N * H,
                            cudaMemcpyDeviceToDevice, b.stream));
  }
}

template <typename S>
void LstmBackwardCuda(const CudaContext& ctx, const LstmShape& s, const BackwardArgs<S>& a) {
  const std::string too_large = ValidateCudaSizes(s);
  if (!too_large.empty()) throw std::invalid_argument(too_large);
  const int64_t T = s.T, N = s.N, H = s.H, C = s.C, G = 4 * H, M = N * T;
  Bound b(ctx);
  // The running dh and dc live in d_h0 / d_c0: that is where they end.
  CopyOrZero(a.d_h0, a.d_h_n, N * H, b.stream);
  CopyOrZero(a.d_c0, a.d_c_n, N * H, b.stream);
  if (M == 0 || H == 0) {
    if (a.dx) CopyOrZero<S>(a.dx, nullptr, M * C, b.stream);
    CopyOrZero<S>(a.d_kernel, nullptr, C * G, b.stream);
    CopyOrZero<S>(a.d_recurrent_kernel, nullptr, H * G, b.stream);
    CopyOrZero<S>(a.d_bias, nullptr, G, b.stream);
    return;
  }
  S* kernel = a.cache;
  S* rkernel = kernel + C * G;
  S* x = rkernel + H * G;
  S* gates = x + M * C;
  S* hist_h = gates + M * G;
  S* hist_c = hist_h + M * H;
  S* dh_new = a.workspace;
  S* dh_gate = dh_new + N * H;       // recurrent masks: one gate's product
  S* hist_masked = dh_gate + N * H;  // recurrent masks: h_{t-1} ⊙ mask_g, [M, H]
  const int64_t out_ld = a.out_ld ? a.out_ld : H;
  const Steps steps{a.lengths, a.step_mask, T, a.reverse};
  const int act = static_cast<int>(a.activation), rec = static_cast<int>(a.recurrent_activation);
  if (a.lengths || a.step_mask) {  // invalid steps contribute nothing, even NaN/Inf data there
    if (C > 0) ZeroPadded<S><<<Blocks(M * C), kThreads, 0, b.stream>>>(x, N, T, C, steps);
    ZeroPadded<S><<<Blocks(M * H), kThreads, 0, b.stream>>>(hist_h, N, T, H, steps);
    FL_LAUNCH("ZeroPadded");
  }
  for (int64_t t = T - 1; t >= 0; --t) {
    GatesBackward<S><<<Blocks(N * H), kThreads, 0, b.stream>>>(
        t, N, T, H, gates, hist_c, steps, a.d_outputs, a.d_h0, a.d_c0, out_ld, act, rec);
    FL_LAUNCH("GatesBackward");
    if (a.recurrent_masks) {  // dh_new = Σ_g (dZ_{t,g}·R_gᵀ) ⊙ mask_g
      for (int64_t g = 0; g < 4; ++g) {
        Gemm(b.blas, CUBLAS_OP_T, CUBLAS_OP_N, H, N, H, S(0), rkernel + g * H, G,
             gates + t * G + g * H, T * G, dh_gate, H);
        AddMasked<S><<<Blocks(N * H), kThreads, 0, b.stream>>>(
            dh_gate, a.recurrent_masks + g * N * H, N * H, g > 0, dh_new);
        FL_LAUNCH("AddMasked");
      }
    } else {
      // dh_new[N, H] = dZ_t[N, G]·Rᵀ[G, H]  (column-major: dh_newᵀ[H, N] = R[H, G]·dZ_tᵀ)
      Gemm(b.blas, CUBLAS_OP_T, CUBLAS_OP_N, H, N, G, S(0), rkernel, G, gates + t * G, T * G,
           dh_new, H);
    }
    SelectDh<S><<<Blocks(N * H), kThreads, 0, b.stream>>>(t, N, T, H, steps, dh_new, a.d_h0);
    FL_LAUNCH("SelectDh");
  }
  if (C > 0 && a.dx) {
    // dX[M, C] = dZ[M, G]·Wᵀ[G, C]
    Gemm(b.blas, CUBLAS_OP_T, CUBLAS_OP_N, C, M, G, S(0), kernel, G, gates, G, a.dx, C);
    if (a.lengths || a.step_mask) {
      ZeroPadded<S><<<Blocks(M * C), kThreads, 0, b.stream>>>(a.dx, N, T, C, steps);
      FL_LAUNCH("ZeroPadded");
    }
    if (a.reverse) {  // dX came out in step order
      ReverseValidSteps<S><<<Blocks(M * C), kThreads, 0, b.stream>>>(a.dx, N, T, C, steps);
      FL_LAUNCH("ReverseValidSteps");
    }
  }
  if (C > 0) {
    // dW[C, G] = Xᵀ[C, M]·dZ[M, G]
    Gemm(b.blas, CUBLAS_OP_N, CUBLAS_OP_T, G, C, M, S(0), gates, G, x, C, a.d_kernel, G);
  }
  if (a.recurrent_masks) {  // dR[:, gate g] = (Hprev ⊙ mask_g)ᵀ·dZ[:, gate g]
    for (int64_t g = 0; g < 4; ++g) {
      MaskRows<S><<<Blocks(M * H), kThreads, 0, b.stream>>>(
          hist_h, H, a.recurrent_masks + g * N * H, N, T, H, hist_masked);
      FL_LAUNCH("MaskRows");
      Gemm(b.blas, CUBLAS_OP_N, CUBLAS_OP_T, H, H, M, S(0), gates + g * H, G, hist_masked, H,
           a.d_recurrent_kernel + g * H, G);
    }
  } else {
    // dR[H, G] = Hprevᵀ[H, M]·dZ[M, G]
    Gemm(b.blas, CUBLAS_OP_N, CUBLAS_OP_T, G, H, M, S(0), gates, G, hist_h, H, a.d_recurrent_kernel,
         G);
  }
  ColumnSums<S><<<Blocks(G), kThreads, 0, b.stream>>>(gates, M, G, a.d_bias);
  FL_LAUNCH("ColumnSums");
}

template void LstmForwardCuda<float>(const CudaContext&, const LstmShape&,
                                     const ForwardArgs<float>&);
template void LstmForwardCuda<double>(const CudaContext&, const LstmShape&,
                                      const ForwardArgs<double>&);
template void LstmBackwardCuda<float>(const CudaContext&, const LstmShape&,
                                      const BackwardArgs<float>&);
template void LstmBackwardCuda<double>(const CudaContext&, const LstmShape&,
                                       const BackwardArgs<double>&);

}  // namespace fusedlstm
