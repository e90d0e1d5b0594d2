// fusedlstm._core.forward_cuda / backward_cuda / cuda_device_count: the CUDA kernels
// (fusedlstm/lstm.h) on NumPy arrays, copied to the GPU and back; the training cache stays on
// the GPU. Without a CUDA build only cuda_device_count exists (and answers 0).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "bindings.h"
#include "cache.h"
#include "checks.h"

#ifdef FUSEDLSTM_WITH_CUDA
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "fusedlstm/lstm.h"
#endif

namespace fusedlstm {

#ifdef FUSEDLSTM_WITH_CUDA
namespace {

void CudaCheck(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(e));
}

// Device memory owned by a cache or by a scope (temporaries).
class DeviceBuffer {
 public:
  DeviceBuffer(int64_t elems, size_t elem_size) : bytes_(size_t(elems) * elem_size) {
    if (bytes_ > 0) CudaCheck(cudaMalloc(&ptr_, bytes_), "cudaMalloc");
  }
  ~DeviceBuffer() {
    if (ptr_) cudaFree(ptr_);
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  template <typename S>
  S* get() const {
    return static_cast<S*>(ptr_);
  }
  size_t nbytes() const { return bytes_; }

 private:
  void* ptr_ = nullptr;
  size_t bytes_;
};

// A CUDA training cache (cache.h): GPU memory, freed by the backward that consumes it.
class CudaCache {
 public:
  CudaCache(const LstmShape& s, bool is_double, const int32_t* lengths, bool reverse)
      : mem_(new DeviceBuffer(CacheSize(s), is_double ? sizeof(double) : sizeof(float))),
        info_(s, is_double, lengths, reverse) {}
  const CacheInfo& info() const { return info_; }
  CacheInfo& mutable_info() { return info_; }
  bool used() const { return mem_ == nullptr; }
  int64_t nbytes() const { return mem_ ? static_cast<int64_t>(mem_->nbytes()) : 0; }
  template <typename S>
  S* get() const {
    return mem_->get<S>();
  }
  // Consumed (call with the GIL held, so no two backwards take it): the memory is the caller's
  // until it drops it.
  std::unique_ptr<DeviceBuffer> Take() {
    if (used()) throw py::value_error("cache: already used by a backward (good for one)");
    return std::move(mem_);
  }

 private:
  std::unique_ptr<DeviceBuffer> mem_;
  CacheInfo info_;
};

// One cuBLAS handle and stream per process; calls are serialized (the GPU is one device).
struct CudaRuntime {
  std::mutex mu;
  cublasHandle_t blas = nullptr;
  cudaStream_t stream = nullptr;
  CudaContext Context() {
    if (!blas) {
      CudaCheck(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "cudaStreamCreate");
      if (cublasCreate(&blas) != CUBLAS_STATUS_SUCCESS)
        throw std::runtime_error("cublasCreate failed");
    }
    CudaContext c;
    c.stream = stream;
    c.cublas = blas;
    return c;
  }
};
CudaRuntime& Runtime() {
  static CudaRuntime* rt = new CudaRuntime();  // never destroyed: no teardown order at exit
  return *rt;
}

int CudaDeviceCount() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear: no driver or no device is an answer, not an error
    return 0;
  }
  return n;
}

template <typename S>
const S* Upload(std::vector<std::unique_ptr<DeviceBuffer>>& keep, const void* host, int64_t elems,
                size_t elem_size, cudaStream_t st) {
  if (!host) return nullptr;
  keep.emplace_back(new DeviceBuffer(elems, elem_size));
  if (elems > 0) {
    CudaCheck(cudaMemcpyAsync(keep.back()->get<void>(), host, size_t(elems) * elem_size,
                              cudaMemcpyHostToDevice, st),
              "cudaMemcpy to device");
  }
  return keep.back()->get<S>();
}

template <typename S>
S* Scratch(std::vector<std::unique_ptr<DeviceBuffer>>& keep, int64_t elems) {
  keep.emplace_back(new DeviceBuffer(elems, sizeof(S)));
  return keep.back()->get<S>();
}

template <typename S>
void Download(py::array_t<S>& dst, const S* src, cudaStream_t st) {
  if (dst.size() > 0) {
    CudaCheck(cudaMemcpyAsync(dst.mutable_data(), src, sizeof(S) * dst.size(),
                              cudaMemcpyDeviceToHost, st),
              "cudaMemcpy to host");
  }
}

// The scope of one GPU call: the GIL released, the runtime locked (members initialize in this
// order), the context, and the temporaries freed at the end.
struct CudaCall {
  py::gil_scoped_release release;
  std::lock_guard<std::mutex> lock;
  CudaContext ctx;
  cudaStream_t stream;
  std::vector<std::unique_ptr<DeviceBuffer>> keep;
  CudaCall()
      : lock(Runtime().mu),
        ctx(Runtime().Context()),
        stream(static_cast<cudaStream_t>(ctx.stream)) {}
};

template <typename S>
py::tuple ForwardCuda(const py::array& x, const py::array& kernel, const py::array& rkernel,
                      const py::object& bias, const py::object& h0, const py::object& c0,
                      const py::object& lengths, bool training, bool reverse, int activation,
                      int recurrent_activation, const py::object& recurrent_masks,
                      const py::object& mask) {
  ForwardArgs<S> host;
  const LstmShape s = ReadForward<S>(x, kernel, rkernel, bias, h0, c0, lengths, &host);
  host.activation = ReadActivation(activation, "activation");
  host.recurrent_activation = ReadActivation(recurrent_activation, "recurrent_activation");
  if (!recurrent_masks.is_none()) {
    if (!training) {
      throw py::value_error("recurrent_masks: recurrent dropout applies in training only");
    }
    host.recurrent_masks = CheckedPtr<S>(recurrent_masks, "recurrent_masks", {4, s.N, s.H});
  }
  if (!mask.is_none()) {
    if (host.lengths) throw py::value_error("mask: give lengths or a mask, not both");
    host.step_mask = CheckedPtr<uint8_t>(mask, "mask", {s.N, s.T});
  }
  Require(ValidateCudaSizes(s));  // cuBLAS takes int sizes
  const int64_t G = 4 * s.H;
  py::array_t<S> outputs({s.N, s.T, s.H}), h_n({s.N, s.H}), c_n({s.N, s.H});
  std::shared_ptr<CudaCache> cache;
  if (training) {
    cache = std::make_shared<CudaCache>(s, std::is_same<S, double>::value, host.lengths, reverse);
    host.lengths = cache->info().lengths();  // the forward runs on the copy the backward sees
    CacheInfo& info = cache->mutable_info();
    info.activation = host.activation;
    info.recurrent_activation = host.recurrent_activation;
    info.set_step_mask(host.step_mask);
    host.step_mask = info.step_mask();
    if (host.recurrent_masks) {  // a private copy: the caller's array may change before backward
      py::array_t<S> m({int64_t(4), s.N, s.H});
      std::copy(host.recurrent_masks, host.recurrent_masks + 4 * s.N * s.H, m.mutable_data());
      info.recurrent_masks = m;
    }
  }
  {
    CudaCall call;  // GIL released, the runtime locked
    const CudaContext& ctx = call.ctx;
    cudaStream_t st = call.stream;
    auto& keep = call.keep;
    ForwardArgs<S> d;
    d.x = Upload<S>(keep, host.x, s.N * s.T * s.C, sizeof(S), st);
    d.kernel = Upload<S>(keep, host.kernel, s.C * G, sizeof(S), st);
    d.recurrent_kernel = Upload<S>(keep, host.recurrent_kernel, s.H * G, sizeof(S), st);
    d.bias = Upload<S>(keep, host.bias, G, sizeof(S), st);
    d.h0 = Upload<S>(keep, host.h0, s.N * s.H, sizeof(S), st);
    d.c0 = Upload<S>(keep, host.c0, s.N * s.H, sizeof(S), st);
    d.lengths = Upload<int32_t>(keep, host.lengths, s.N, sizeof(int32_t), st);
    d.step_mask = Upload<uint8_t>(keep, host.step_mask, s.N * s.T, sizeof(uint8_t), st);
    d.recurrent_masks = Upload<S>(keep, host.recurrent_masks, 4 * s.N * s.H, sizeof(S), st);
    d.activation = host.activation;
    d.recurrent_activation = host.recurrent_activation;
    d.outputs = Scratch<S>(keep, s.N * s.T * s.H);
    d.h_n = Scratch<S>(keep, s.N * s.H);
    d.c_n = Scratch<S>(keep, s.N * s.H);
    d.workspace = Scratch<S>(keep, CudaForwardWorkspaceSize(s, training, reverse));
    d.cache = training ? cache->get<S>() : nullptr;
    d.reverse = reverse;
    LstmForwardCuda<S>(ctx, s, d);
    Download(outputs, d.outputs, st);
    Download(h_n, d.h_n, st);
    Download(c_n, d.c_n, st);
    CudaCheck(cudaStreamSynchronize(st), "LSTM forward on the GPU");
  }
  py::object c = training ? py::cast(cache) : py::none();
  return py::make_tuple(outputs, h_n, c_n, c);
}

template <typename S>
py::tuple BackwardCuda(CudaCache& cache, const py::object& d_outputs, const py::object& d_h_n,
                       const py::object& d_c_n, bool need_dx) {
  const LstmShape s = cache.info().shape();
  const int64_t G = 4 * s.H;
  if (cache.used()) throw py::value_error("cache: already used by a backward (good for one)");
  const int32_t* len = cache.info().lengths();
  const uint8_t* step_mask = cache.info().step_mask();
  const py::object& masks_obj = cache.info().recurrent_masks;
  const S* rmasks =
      masks_obj.is_none() ? nullptr : static_cast<const S*>(masks_obj.cast<py::array>().data());
  BackwardArgs<S> up;
  ReadUpstream<S>(s, d_outputs, d_h_n, d_c_n, &up);
  const S *dout = up.d_outputs, *dhn = up.d_h_n, *dcn = up.d_c_n;
  py::array_t<S> dx(need_dx ? std::vector<int64_t>{s.N, s.T, s.C} : std::vector<int64_t>{0}),
      dk({s.C, G}), dr({s.H, G}), db(std::vector<int64_t>{G}), dh0({s.N, s.H}), dc0({s.N, s.H});
  // Consumed, as on the CPU (the kernel overwrites it); freed once the GPU is done with it.
  std::unique_ptr<DeviceBuffer> mem = cache.Take();
  {
    CudaCall call;  // GIL released, the runtime locked
    const CudaContext& ctx = call.ctx;
    cudaStream_t st = call.stream;
    auto& keep = call.keep;
    BackwardArgs<S> d;
    d.cache = mem->get<S>();
    d.lengths = Upload<int32_t>(keep, len, s.N, sizeof(int32_t), st);
    d.d_outputs = Upload<S>(keep, dout, s.N * s.T * s.H, sizeof(S), st);
    d.d_h_n = Upload<S>(keep, dhn, s.N * s.H, sizeof(S), st);
    d.d_c_n = Upload<S>(keep, dcn, s.N * s.H, sizeof(S), st);
    d.dx = need_dx ? Scratch<S>(keep, s.N * s.T * s.C) : nullptr;
    d.d_kernel = Scratch<S>(keep, s.C * G);
    d.d_recurrent_kernel = Scratch<S>(keep, s.H * G);
    d.d_bias = Scratch<S>(keep, G);
    d.d_h0 = Scratch<S>(keep, s.N * s.H);
    d.d_c0 = Scratch<S>(keep, s.N * s.H);
    d.reverse = cache.info().reverse();
    d.activation = cache.info().activation;
    d.recurrent_activation = cache.info().recurrent_activation;
    d.step_mask = Upload<uint8_t>(keep, step_mask, s.N * s.T, sizeof(uint8_t), st);
    d.recurrent_masks = Upload<S>(keep, rmasks, 4 * s.N * s.H, sizeof(S), st);
    d.workspace = Scratch<S>(keep, CudaBackwardWorkspaceSize(s, rmasks != nullptr));
    LstmBackwardCuda<S>(ctx, s, d);
    if (need_dx) Download(dx, d.dx, st);
    Download(dk, d.d_kernel, st);
    Download(dr, d.d_recurrent_kernel, st);
    Download(db, d.d_bias, st);
    Download(dh0, d.d_h0, st);
    Download(dc0, d.d_c0, st);
    CudaCheck(cudaStreamSynchronize(st), "LSTM backward on the GPU");
    mem.reset();
  }
  py::object dx_out = need_dx ? py::object(dx) : py::none();
  return py::make_tuple(dx_out, dk, dr, db, dh0, dc0);
}

void RegisterCudaKernels(py::module_& m) {
  py::class_<CudaCache, std::shared_ptr<CudaCache>> cache(
      m, "CudaCache",
      "A training forward's cache in GPU memory, with its shape, dtype and lengths.");
  DefCacheProperties(cache);
  m.def(
      "forward_cuda",
      [](const py::array& x, const py::array& kernel, const py::array& rkernel,
         const py::object& bias, const py::object& h0, const py::object& c0,
         const py::object& lengths, bool training, bool reverse, int activation,
         int recurrent_activation, const py::object& recurrent_masks, const py::object& mask) {
        if (IsDtype(x, py::dtype::of<float>()))
          return ForwardCuda<float>(x, kernel, rkernel, bias, h0, c0, lengths, training, reverse,
                                    activation, recurrent_activation, recurrent_masks, mask);
        if (IsDtype(x, py::dtype::of<double>()))
          return ForwardCuda<double>(x, kernel, rkernel, bias, h0, c0, lengths, training, reverse,
                                     activation, recurrent_activation, recurrent_masks, mask);
        throw py::type_error("x: dtype must be float32 or float64, got " +
                             std::string(py::str(x.dtype())));
      },
      py::arg("x"), py::arg("kernel"), py::arg("recurrent_kernel"), py::arg("bias"), py::arg("h0"),
      py::arg("c0"), py::arg("lengths"), py::arg("training"), py::arg("reverse") = false,
      py::arg("activation") = 0, py::arg("recurrent_activation") = 3,
      py::arg("recurrent_masks") = py::none(), py::arg("mask") = py::none());
  m.def(
      "backward_cuda",
      [](CudaCache& cache, const py::object& d_outputs, const py::object& d_h_n,
         const py::object& d_c_n, bool need_dx) {
        if (cache.info().is_double())
          return BackwardCuda<double>(cache, d_outputs, d_h_n, d_c_n, need_dx);
        return BackwardCuda<float>(cache, d_outputs, d_h_n, d_c_n, need_dx);
      },
      py::arg("cache"), py::arg("d_outputs"), py::arg("d_h_n"), py::arg("d_c_n"),
      py::arg("need_dx") = true,
      "Gradients from a training forward_cuda's CudaCache, which it consumes (one backward each).");
}
}  // namespace

void RegisterCuda(py::module_& m) {
  RegisterCudaKernels(m);
  m.def("cuda_device_count", &CudaDeviceCount, "CUDA devices visible (0 without a driver).");
}
#else
void RegisterCuda(py::module_& m) {
  m.def("cuda_device_count", []() { return 0; }, "CUDA devices visible (this build has no CUDA).");
}
#endif  // FUSEDLSTM_WITH_CUDA

}  // namespace fusedlstm
