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

// The position row n reads x from and writes its output to at its step t (lstm.h: reverse).
__device__ inline int64_t Pos(bool reverse, const int32_t* lengths, int64_t n, int64_t t,
                              int64_t T) {
  if (!reverse) return t;
  const int64_t len = Len(lengths, n, T);
  return t < len ? len - 1 - t : t;
}

// dst[n, t, :] = src[n, Pos(n, t), :] for rows of w: a reverse pass's x in step order, so the
// projection stays one GEMM and every cache array is in step order.
template <typename S>
__global__ void GatherSteps(const S* src, S* dst, int64_t N, int64_t T, int64_t w,
                            const int32_t* lengths) {
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i >= N * T * w) return;
  const int64_t row = i / w, k = i % w, n = row / T, t = row % T;
  dst[i] = src[(n * T + Pos(true, lengths, n, t, T)) * w + k];
}

// Reverses each row's valid steps in place (dX of a reverse pass back to x's layout).
template <typename S>
__global__ void ReverseValidSteps(S* a, int64_t N, int64_t T, int64_t w, const int32_t* lengths) {
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i >= N * T * w) return;
  const int64_t row = i / w, k = i % w, n = row / T, t = row % T;
  const int64_t len = Len(lengths, n, T);
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
                             const int32_t* lengths, bool training, S* hist_h, S* hist_c, S* hbuf,
                             S* c_run, S* h_n, S* outputs, bool reverse, int64_t out_ld) {
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
  S* out = outputs + (n * T + Pos(reverse, lengths, n, t, T)) * out_ld + u;
  if (t >= Len(lengths, n, T)) {
    const S cp = *c_prev, hp = *h_prev;
    *c_next = cp;
    *h_next = hp;
    *out = S(0);
    return;
  }
  const S gi = Sigm(z[u] + bias[u]);
  const S gf = Sigm(z[H + u] + bias[H + u]);
  const S gg = Tanh(z[2 * H + u] + bias[2 * H + u]);
  const S go = Sigm(z[3 * H + u] + bias[3 * H + u]);
  const S c = gf * *c_prev + gi * gg;
  const S h = go * Tanh(c);
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
                              const int32_t* lengths, const S* d_outputs, const S* dh_run,
                              S* dc_run, bool reverse, int64_t out_ld) {
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i >= N * H) return;
  const int64_t n = i / H, u = i % H, G = 4 * H;
  S* z = gates + (n * T + t) * G;
  if (t >= Len(lengths, n, T)) {
    z[u] = z[H + u] = z[2 * H + u] = z[3 * H + u] = S(0);
    return;
  }
  const S gi = z[u], gf = z[H + u], gg = z[2 * H + u], go = z[3 * H + u];
  const S c_prev = hist_c[(n * (T + 1) + t) * H + u];
  const S tc = Tanh(hist_c[(n * (T + 1) + t + 1) * H + u]);
  const S dh = d_outputs
                   ? dh_run[i] + d_outputs[(n * T + Pos(reverse, lengths, n, t, T)) * out_ld + u]
                   : dh_run[i];
  const S dc = dc_run[i] + dh * go * (S(1) - tc * tc);
  dc_run[i] = dc * gf;
  z[3 * H + u] = dh * tc * (go * (S(1) - go));
  z[H + u] = dc * c_prev * (gf * (S(1) - gf));
  z[u] = dc * gg * (gi * (S(1) - gi));
  z[2 * H + u] = dc * gi * (S(1) - gg * gg);
}

// dh_{t-1} = dZ_t·Rᵀ for rows valid at t; padded rows keep the dh they carry.
template <typename S>
__global__ void SelectDh(int64_t t, int64_t N, int64_t T, int64_t H, const int32_t* lengths,
                         const S* dh_new, S* dh_run) {
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i >= N * H) return;
  if (t < Len(lengths, i / H, T)) dh_run[i] = dh_new[i];
}

// Zero rows [n, t, 0:w] of a [N, T, w] array at padded steps (t >= lengths[n]).
template <typename S>
__global__ void ZeroPadded(S* a, int64_t N, int64_t T, int64_t w, const int32_t* lengths) {
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i >= N * T * w) return;
  const int64_t row = i / w, n = row / T, t = row % T;
  if (t >= Len(lengths, n, T)) a[i] = S(0);
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
  // Inference keeps a reverse pass's x in step order here (training: in the cache).
  return training ? G : G + s.N * s.T * G + 2 * s.N * s.H + (reverse ? s.N * s.T * s.C : 0);
}

int64_t CudaBackwardWorkspaceSize(const LstmShape& s) { return s.N * s.H; }

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
      GatherSteps<S><<<Blocks(N * T * C), kThreads, 0, b.stream>>>(a.x, xc, N, T, C, a.lengths);
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
      GatherSteps<S><<<Blocks(N * T * C), kThreads, 0, b.stream>>>(a.x, xs, N, T, C, a.lengths);
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
    // Z[:, t, :] += h_{t-1}[N, H]·R[H, G]  (rows of Z_t are T·G apart)
    Gemm(b.blas, CUBLAS_OP_N, CUBLAS_OP_N, G, N, H, S(1), rkernel, G, h_in, h_ld, gates + t * G,
         T * G);
    GatesForward<S><<<Blocks(N * H), kThreads, 0, b.stream>>>(t, N, T, H, gates, bias, a.lengths,
                                                              training, hist_h, hist_c, hbuf, a.c_n,
                                                              a.h_n, a.outputs, a.reverse, out_ld);
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
  const int64_t out_ld = a.out_ld ? a.out_ld : H;
  if (a.lengths) {  // padded steps contribute nothing, even NaN/Inf data there
    if (C > 0) ZeroPadded<S><<<Blocks(M * C), kThreads, 0, b.stream>>>(x, N, T, C, a.lengths);
    ZeroPadded<S><<<Blocks(M * H), kThreads, 0, b.stream>>>(hist_h, N, T, H, a.lengths);
    FL_LAUNCH("ZeroPadded");
  }
  for (int64_t t = T - 1; t >= 0; --t) {
    GatesBackward<S><<<Blocks(N * H), kThreads, 0, b.stream>>>(
        t, N, T, H, gates, hist_c, a.lengths, a.d_outputs, a.d_h0, a.d_c0, a.reverse, out_ld);
    FL_LAUNCH("GatesBackward");
    // dh_new[N, H] = dZ_t[N, G]·Rᵀ[G, H]  (column-major: dh_newᵀ[H, N] = (Rᵀ)ᵀ... = R[H, G]·dZ_tᵀ)
    Gemm(b.blas, CUBLAS_OP_T, CUBLAS_OP_N, H, N, G, S(0), rkernel, G, gates + t * G, T * G, dh_new,
         H);
    SelectDh<S><<<Blocks(N * H), kThreads, 0, b.stream>>>(t, N, T, H, a.lengths, dh_new, a.d_h0);
    FL_LAUNCH("SelectDh");
  }
  if (C > 0 && a.dx) {
    // dX[M, C] = dZ[M, G]·Wᵀ[G, C]
    Gemm(b.blas, CUBLAS_OP_T, CUBLAS_OP_N, C, M, G, S(0), kernel, G, gates, G, a.dx, C);
    if (a.lengths) {
      ZeroPadded<S><<<Blocks(M * C), kThreads, 0, b.stream>>>(a.dx, N, T, C, a.lengths);
      FL_LAUNCH("ZeroPadded");
    }
    if (a.reverse) {  // dX came out in step order
      ReverseValidSteps<S><<<Blocks(M * C), kThreads, 0, b.stream>>>(a.dx, N, T, C, a.lengths);
      FL_LAUNCH("ReverseValidSteps");
    }
  }
  if (C > 0) {
    // dW[C, G] = Xᵀ[C, M]·dZ[M, G]
    Gemm(b.blas, CUBLAS_OP_N, CUBLAS_OP_T, G, C, M, S(0), gates, G, x, C, a.d_kernel, G);
  }
  // dR[H, G] = Hprevᵀ[H, M]·dZ[M, G]
  Gemm(b.blas, CUBLAS_OP_N, CUBLAS_OP_T, G, H, M, S(0), gates, G, hist_h, H, a.d_recurrent_kernel,
       G);
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
