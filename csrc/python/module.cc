// pybind11 glue for the fused kernels: check every array (dtype, rank, shape, contiguity), turn
// them into raw pointers, allocate outputs and the opaque cache, release the GIL, call the
// kernel. The friendly argument handling (conversion, defaults, messages naming user arguments)
// lives in python/fusedlstm/lstm.py; these checks are the last line that keeps a direct _core
// call from ever reaching the kernel with a bad pointer.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <Eigen/Core>
#include <atomic>
#include <cmath>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "../cpu/peak.h"
#include "fusedlstm/device.h"
#include "fusedlstm/adam.h"
#include "fusedlstm/embedding.h"
#include "fusedlstm/lstm.h"

#ifdef FUSEDLSTM_WITH_CUDA
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <memory>
#include <mutex>

#include "fusedlstm/lstm_cuda.h"
#endif

namespace py = pybind11;

namespace fusedlstm {
namespace {

std::atomic<int> g_num_threads{0};  // 0: not set yet, use OpenMP's default

int NumThreads() {
  const int n = g_num_threads.load();
  return n > 0 ? n : OpenMpDefaultThreads();
}

std::string ShapeStr(const std::vector<int64_t>& dims) {
  std::ostringstream os;
  os << "(";
  for (size_t i = 0; i < dims.size(); ++i) os << (i ? ", " : "") << dims[i];
  if (dims.size() == 1) os << ",";
  os << ")";
  return os.str();
}

std::vector<int64_t> Dims(const py::array& a) {
  return std::vector<int64_t>(a.shape(), a.shape() + a.ndim());
}

// Checks an array argument: exact dtype, C-contiguous, exact shape. Rank first, then dimensions.
template <typename S>
const S* CheckedPtr(const py::handle& obj, const char* name, const std::vector<int64_t>& shape) {
  if (!py::isinstance<py::array>(obj)) {
    throw py::type_error(std::string(name) + ": expected a numpy array");
  }
  py::array a = py::reinterpret_borrow<py::array>(obj);
  if (!py::isinstance<py::array_t<S>>(a) || !a.dtype().is(py::dtype::of<S>())) {
    throw py::type_error(std::string(name) + ": expected dtype " +
                         std::string(py::str(py::dtype::of<S>())) + ", got " +
                         std::string(py::str(a.dtype())));
  }
  if (a.ndim() != static_cast<py::ssize_t>(shape.size())) {
    throw py::value_error(std::string(name) + ": expected " + std::to_string(shape.size()) +
                          "-d array of shape " + ShapeStr(shape) + ", got shape " +
                          ShapeStr(Dims(a)));
  }
  if (Dims(a) != shape) {
    throw py::value_error(std::string(name) + ": expected shape " + ShapeStr(shape) + ", got " +
                          ShapeStr(Dims(a)));
  }
  if (!(a.flags() & py::array::c_style)) {
    throw py::value_error(std::string(name) + ": array must be C-contiguous");
  }
  return static_cast<const S*>(a.data());
}

template <typename S>
const S* OptionalPtr(const py::object& obj, const char* name, const std::vector<int64_t>& shape) {
  return obj.is_none() ? nullptr : CheckedPtr<S>(obj, name, shape);
}

const int32_t* CheckedLengths(const py::object& obj, int64_t N, int64_t T) {
  if (obj.is_none()) return nullptr;
  const int32_t* p = CheckedPtr<int32_t>(obj, "lengths", {N});
  for (int64_t n = 0; n < N; ++n) {
    if (p[n] < 0 || p[n] > T) {
      throw py::value_error("lengths[" + std::to_string(n) + "] = " + std::to_string(p[n]) +
                            " is outside [0, T=" + std::to_string(T) + "]");
    }
  }
  return p;
}

template <typename S>
S* MutablePtr(py::array_t<S>& a) {
  return a.mutable_data();
}

// A caller-provided scratch array when it is big enough (dtype, 1-d, contiguous, writeable):
// its first `size` elements, else a fresh one. The Python layer recycles big buffers so a
// steady training loop does not page-fault through a new mmap every call, even when the
// sequence length changes from batch to batch (bucketing).
template <typename S>
py::array_t<S> ReuseOrAllocate(const py::object& spare, int64_t size) {
  if (!spare.is_none() && py::isinstance<py::array_t<S>>(spare)) {
    py::array a = py::reinterpret_borrow<py::array>(spare);
    if (a.dtype().is(py::dtype::of<S>()) && a.ndim() == 1 && a.shape(0) >= size &&
        (a.flags() & py::array::c_style) && a.writeable()) {
      if (a.shape(0) == size) return py::reinterpret_borrow<py::array_t<S>>(spare);
      return py::reinterpret_borrow<py::array_t<S>>(a[py::slice(0, size, 1)]);
    }
  }
  return py::array_t<S>(std::vector<int64_t>{size});
}

// The shape and the checked input pointers of a forward call (outputs not set).
template <typename S>
LstmShape ReadForward(const py::array& x, const py::array& kernel, const py::array& rkernel,
                      const py::object& bias, const py::object& h0, const py::object& c0,
                      const py::object& lengths, ForwardArgs<S>* args) {
  if (x.ndim() != 3) throw py::value_error("x: expected a 3-d array [B, T, E], got shape " + ShapeStr(Dims(x)));
  if (rkernel.ndim() != 2) throw py::value_error("recurrent_kernel: expected a 2-d array [H, 4H], got shape " + ShapeStr(Dims(rkernel)));
  LstmShape s;
  s.N = x.shape(0);
  s.T = x.shape(1);
  s.C = x.shape(2);
  s.H = rkernel.shape(0);
  const int64_t G = 4 * s.H;
  args->x = CheckedPtr<S>(x, "x", {s.N, s.T, s.C});
  args->kernel = CheckedPtr<S>(kernel, "kernel", {s.C, G});
  args->recurrent_kernel = CheckedPtr<S>(rkernel, "recurrent_kernel", {s.H, G});
  args->bias = OptionalPtr<S>(bias, "bias", {G});
  args->h0 = OptionalPtr<S>(h0, "h0", {s.N, s.H});
  args->c0 = OptionalPtr<S>(c0, "c0", {s.N, s.H});
  args->lengths = CheckedLengths(lengths, s.N, s.T);
  return s;
}

// The shape of a backward call from (T, N, C, H).
LstmShape ReadShapeTNCH(const std::vector<int64_t>& shape_tnch) {
  if (shape_tnch.size() != 4) throw py::value_error("shape: expected (T, N, C, H)");
  LstmShape s;
  s.T = shape_tnch[0];
  s.N = shape_tnch[1];
  s.C = shape_tnch[2];
  s.H = shape_tnch[3];
  if (s.T < 0 || s.N < 0 || s.C < 0 || s.H < 0) throw py::value_error("shape: negative dimension");
  return s;
}

template <typename S>
py::tuple Forward(const py::array& x, const py::array& kernel, const py::array& rkernel,
                  const py::object& bias, const py::object& h0, const py::object& c0,
                  const py::object& lengths, bool training, const py::object& spare,
                  bool return_sequences) {
  ForwardArgs<S> args;
  const LstmShape s = ReadForward<S>(x, kernel, rkernel, bias, h0, c0, lengths, &args);

  py::array_t<S> h_n({s.N, s.H}), c_n({s.N, s.H});
  // Without return_sequences the kernel writes no outputs and None stands in their place.
  py::object outputs = py::none();
  if (return_sequences) {
    py::array_t<S> o({s.N, s.T, s.H});
    args.outputs = MutablePtr(o);
    outputs = o;
  }
  // The spare (if any) serves as the cache in training, as the (large) workspace in inference.
  py::array_t<S> workspace = training
      ? py::array_t<S>(std::vector<int64_t>{ForwardWorkspaceSize(s, true)})
      : ReuseOrAllocate<S>(spare, ForwardWorkspaceSize(s, false));
  py::object cache = py::none();
  args.h_n = MutablePtr(h_n);
  args.c_n = MutablePtr(c_n);
  args.workspace = MutablePtr(workspace);
  if (training) {
    py::array_t<S> c = ReuseOrAllocate<S>(spare, CacheSize(s));
    args.cache = MutablePtr(c);
    cache = c;
  } else {
    cache = workspace;  // handed back so the caller can recycle it
  }
  {
    py::gil_scoped_release release;
    LstmForward<S>(OpenMpDevice(NumThreads()), s, args);
  }
  return py::make_tuple(outputs, h_n, c_n, cache);
}

template <typename S>
py::tuple Backward(const py::array& cache, const std::vector<int64_t>& shape_tnch,
                   const py::object& lengths, const py::object& d_outputs,
                   const py::object& d_h_n, const py::object& d_c_n, bool need_dx) {
  const LstmShape s = ReadShapeTNCH(shape_tnch);
  const int64_t G = 4 * s.H;
  BackwardArgs<S> args;
  if (!cache.writeable()) throw py::value_error("cache: must be writeable");
  args.cache = const_cast<S*>(CheckedPtr<S>(cache, "cache", {CacheSize(s)}));
  args.lengths = CheckedLengths(lengths, s.N, s.T);
  args.d_outputs = OptionalPtr<S>(d_outputs, "d_outputs", {s.N, s.T, s.H});
  args.d_h_n = OptionalPtr<S>(d_h_n, "d_h_n", {s.N, s.H});
  args.d_c_n = OptionalPtr<S>(d_c_n, "d_c_n", {s.N, s.H});
  py::array_t<S> dx(need_dx ? std::vector<int64_t>{s.N, s.T, s.C} : std::vector<int64_t>{0}),
      dk({s.C, G}), dr({s.H, G}), db(std::vector<int64_t>{G}), dh0({s.N, s.H}), dc0({s.N, s.H});
  py::array_t<S> workspace(std::vector<int64_t>{BackwardWorkspaceSize(s)});
  args.dx = need_dx ? MutablePtr(dx) : nullptr;
  args.d_kernel = MutablePtr(dk);
  args.d_recurrent_kernel = MutablePtr(dr);
  args.d_bias = MutablePtr(db);
  args.d_h0 = MutablePtr(dh0);
  args.d_c0 = MutablePtr(dc0);
  args.workspace = MutablePtr(workspace);
  {
    py::gil_scoped_release release;
    LstmBackward<S>(OpenMpDevice(NumThreads()), s, args);
  }
  py::object dx_out = need_dx ? py::object(dx) : py::none();
  return py::make_tuple(dx_out, dk, dr, db, dh0, dc0);
}

bool IsDtype(const py::array& a, const py::dtype& d) { return a.dtype().is(d); }

#ifdef FUSEDLSTM_WITH_CUDA
// -- CUDA: NumPy arrays copied to the GPU and back; the training cache stays on the GPU --------

void CudaCheck(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(e));
}

// Device memory owned by a Python object (the training cache) or by a scope (temporaries).
class DeviceBuffer {
 public:
  DeviceBuffer(int64_t elems, size_t elem_size, bool is_double)
      : elems_(elems), bytes_(size_t(elems) * elem_size), is_double_(is_double) {
    if (bytes_ > 0) CudaCheck(cudaMalloc(&ptr_, bytes_), "cudaMalloc");
  }
  ~DeviceBuffer() { Release(); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  void Release() {
    if (ptr_) cudaFree(ptr_);
    ptr_ = nullptr;
    elems_ = 0;
    bytes_ = 0;
  }
  template <typename S>
  S* get() const { return static_cast<S*>(ptr_); }
  int64_t elems() const { return elems_; }
  size_t nbytes() const { return bytes_; }
  bool is_double() const { return is_double_; }
  bool released() const { return ptr_ == nullptr && elems_ == 0; }

 private:
  void* ptr_ = nullptr;
  int64_t elems_;
  size_t bytes_;
  bool is_double_;
};

// One cuBLAS handle and stream per process; calls are serialized (the GPU is one device).
struct CudaRuntime {
  std::mutex mu;
  cublasHandle_t blas = nullptr;
  cudaStream_t stream = nullptr;
  CudaContext Context() {
    if (!blas) {
      CudaCheck(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "cudaStreamCreate");
      if (cublasCreate(&blas) != CUBLAS_STATUS_SUCCESS) throw std::runtime_error("cublasCreate failed");
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
  keep.emplace_back(new DeviceBuffer(elems, elem_size, false));
  if (elems > 0) {
    CudaCheck(cudaMemcpyAsync(keep.back()->get<void>(), host, size_t(elems) * elem_size,
                              cudaMemcpyHostToDevice, st), "cudaMemcpy to device");
  }
  return keep.back()->get<S>();
}

template <typename S>
S* Scratch(std::vector<std::unique_ptr<DeviceBuffer>>& keep, int64_t elems) {
  keep.emplace_back(new DeviceBuffer(elems, sizeof(S), std::is_same<S, double>::value));
  return keep.back()->get<S>();
}

template <typename S>
void Download(py::array_t<S>& dst, const S* src, cudaStream_t st) {
  if (dst.size() > 0) {
    CudaCheck(cudaMemcpyAsync(dst.mutable_data(), src, sizeof(S) * dst.size(),
                              cudaMemcpyDeviceToHost, st), "cudaMemcpy to host");
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
      : lock(Runtime().mu), ctx(Runtime().Context()),
        stream(static_cast<cudaStream_t>(ctx.stream)) {}
};

template <typename S>
py::tuple ForwardCuda(const py::array& x, const py::array& kernel, const py::array& rkernel,
                      const py::object& bias, const py::object& h0, const py::object& c0,
                      const py::object& lengths, bool training) {
  ForwardArgs<S> host;
  const LstmShape s = ReadForward<S>(x, kernel, rkernel, bias, h0, c0, lengths, &host);
  const int64_t G = 4 * s.H;
  py::array_t<S> outputs({s.N, s.T, s.H}), h_n({s.N, s.H}), c_n({s.N, s.H});
  std::shared_ptr<DeviceBuffer> cache;
  if (training) {
    cache = std::make_shared<DeviceBuffer>(CacheSize(s), sizeof(S), std::is_same<S, double>::value);
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
    d.outputs = Scratch<S>(keep, s.N * s.T * s.H);
    d.h_n = Scratch<S>(keep, s.N * s.H);
    d.c_n = Scratch<S>(keep, s.N * s.H);
    d.workspace = Scratch<S>(keep, CudaForwardWorkspaceSize(s, training));
    d.cache = training ? cache->get<S>() : nullptr;
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
py::tuple BackwardCuda(DeviceBuffer& cache, const std::vector<int64_t>& shape_tnch,
                       const py::object& lengths, const py::object& d_outputs,
                       const py::object& d_h_n, const py::object& d_c_n, bool need_dx) {
  const LstmShape s = ReadShapeTNCH(shape_tnch);
  const int64_t G = 4 * s.H;
  if (cache.released()) throw py::value_error("cache: already used by a backward");
  if (cache.elems() != CacheSize(s) || cache.is_double() != std::is_same<S, double>::value) {
    throw py::value_error("cache: does not match the shape or dtype given");
  }
  const int32_t* len = CheckedLengths(lengths, s.N, s.T);
  const S* dout = OptionalPtr<S>(d_outputs, "d_outputs", {s.N, s.T, s.H});
  const S* dhn = OptionalPtr<S>(d_h_n, "d_h_n", {s.N, s.H});
  const S* dcn = OptionalPtr<S>(d_c_n, "d_c_n", {s.N, s.H});
  py::array_t<S> dx(need_dx ? std::vector<int64_t>{s.N, s.T, s.C} : std::vector<int64_t>{0}),
      dk({s.C, G}), dr({s.H, G}), db(std::vector<int64_t>{G}), dh0({s.N, s.H}), dc0({s.N, s.H});
  {
    CudaCall call;  // GIL released, the runtime locked
    const CudaContext& ctx = call.ctx;
    cudaStream_t st = call.stream;
    auto& keep = call.keep;
    BackwardArgs<S> d;
    d.cache = cache.get<S>();
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
    d.workspace = Scratch<S>(keep, CudaBackwardWorkspaceSize(s));
    LstmBackwardCuda<S>(ctx, s, d);
    if (need_dx) Download(dx, d.dx, st);
    Download(dk, d.d_kernel, st);
    Download(dr, d.d_recurrent_kernel, st);
    Download(db, d.d_bias, st);
    Download(dh0, d.d_h0, st);
    Download(dc0, d.d_c0, st);
    CudaCheck(cudaStreamSynchronize(st), "LSTM backward on the GPU");
    cache.Release();  // consumed, as on the CPU
  }
  py::object dx_out = need_dx ? py::object(dx) : py::none();
  return py::make_tuple(dx_out, dk, dr, db, dh0, dc0);
}

void RegisterCuda(py::module_& m) {
  py::class_<DeviceBuffer, std::shared_ptr<DeviceBuffer>>(m, "DeviceBuffer")
      .def_property_readonly("nbytes", &DeviceBuffer::nbytes)
      .def_property_readonly("released", &DeviceBuffer::released);
  m.def(
      "forward_cuda",
      [](const py::array& x, const py::array& kernel, const py::array& rkernel,
         const py::object& bias, const py::object& h0, const py::object& c0,
         const py::object& lengths, bool training) {
        if (IsDtype(x, py::dtype::of<float>()))
          return ForwardCuda<float>(x, kernel, rkernel, bias, h0, c0, lengths, training);
        if (IsDtype(x, py::dtype::of<double>()))
          return ForwardCuda<double>(x, kernel, rkernel, bias, h0, c0, lengths, training);
        throw py::type_error("x: dtype must be float32 or float64, got " +
                             std::string(py::str(x.dtype())));
      },
      py::arg("x"), py::arg("kernel"), py::arg("recurrent_kernel"), py::arg("bias"),
      py::arg("h0"), py::arg("c0"), py::arg("lengths"), py::arg("training"));
  m.def(
      "backward_cuda",
      [](DeviceBuffer& cache, const std::vector<int64_t>& shape, const py::object& lengths,
         const py::object& d_outputs, const py::object& d_h_n, const py::object& d_c_n,
         bool need_dx) {
        if (cache.is_double())
          return BackwardCuda<double>(cache, shape, lengths, d_outputs, d_h_n, d_c_n, need_dx);
        return BackwardCuda<float>(cache, shape, lengths, d_outputs, d_h_n, d_c_n, need_dx);
      },
      py::arg("cache"), py::arg("shape"), py::arg("lengths"), py::arg("d_outputs"),
      py::arg("d_h_n"), py::arg("d_c_n"), py::arg("need_dx") = true);
}
#endif  // FUSEDLSTM_WITH_CUDA

// Adam's one-pass updates on NumPy arrays (fusedlstm.optim.Adam): every array checked (dtype,
// C order, shape, writeable) and row indices checked in range before anything is written.
template <typename S>
S* WritableData(const py::array& a, const char* name) {
  if (!a.writeable()) throw py::value_error(std::string(name) + ": array is read-only");
  return static_cast<S*>(const_cast<void*>(a.data()));
}

AdamCoefficients Coefficients(double lr_t, double eps_t, double beta1, double beta2,
                              double grad_scale, double average_keep = 0) {
  if (!std::isfinite(grad_scale)) throw py::value_error("grad_scale must be finite");
  if (!(average_keep >= 0 && average_keep < 1)) {
    throw py::value_error("average_keep must be in [0, 1), got " + std::to_string(average_keep));
  }
  AdamCoefficients c;
  c.lr_t = lr_t;
  c.eps_t = eps_t;
  c.beta1 = beta1;
  c.beta2 = beta2;
  c.grad_scale = grad_scale;
  c.average_keep = average_keep;
  return c;
}

template <typename S>
void AdamDenseChecked(const py::array& p, const py::array& g, const py::array& m,
                      const py::array& v, const py::object& average, const AdamCoefficients& c) {
  const std::vector<int64_t> shape = Dims(p);
  CheckedPtr<S>(p, "param", shape);
  const S* gp = CheckedPtr<S>(g, "grad", shape);
  CheckedPtr<S>(m, "m", shape);
  CheckedPtr<S>(v, "v", shape);
  S* ap = nullptr;
  if (!average.is_none()) {
    if (!py::isinstance<py::array>(average)) throw py::type_error("average: expected an array or None");
    const py::array a = py::reinterpret_borrow<py::array>(average);
    CheckedPtr<S>(a, "average", shape);
    ap = WritableData<S>(a, "average");
  }
  S *pp = WritableData<S>(p, "param"), *mp = WritableData<S>(m, "m"), *vp = WritableData<S>(v, "v");
  py::gil_scoped_release release;
  AdamDense<S>(p.size(), pp, gp, mp, vp, c, ap);
}

template <typename S>
void AdamRowsChecked(const py::array& p, const py::array& m, const py::array& v,
                     const py::array& rows, const py::array& g, const AdamCoefficients& c) {
  if (p.ndim() != 2) throw py::value_error("param: expected a 2-d table, got shape " + ShapeStr(Dims(p)));
  const std::vector<int64_t> shape = Dims(p);
  CheckedPtr<S>(p, "param", shape);
  CheckedPtr<S>(m, "m", shape);
  CheckedPtr<S>(v, "v", shape);
  if (rows.ndim() != 1) throw py::value_error("rows: expected a 1-d array, got shape " + ShapeStr(Dims(rows)));
  const int64_t n = rows.shape(0);
  const int64_t* rp = CheckedPtr<int64_t>(rows, "rows", {n});
  const S* gp = CheckedPtr<S>(g, "row grads", {n, shape[1]});
  for (int64_t r = 0; r < n; ++r) {
    if (rp[r] < 0 || rp[r] >= shape[0]) {
      throw py::value_error("rows[" + std::to_string(r) + "] = " + std::to_string(rp[r]) +
                            " is outside [0, " + std::to_string(shape[0]) + ")");
    }
  }
  S *pp = WritableData<S>(p, "param"), *mp = WritableData<S>(m, "m"), *vp = WritableData<S>(v, "v");
  py::gil_scoped_release release;
  AdamRows<S>(n, shape[1], rp, gp, pp, mp, vp, c);
}

// The sparse gradient of an embedding lookup (fusedlstm/embedding.h) as (rows, grads) arrays.
template <typename S>
py::tuple EmbeddingRowGradsChecked(const py::array& ids, const py::object& lengths,
                                   const py::array& dx) {
  if (ids.ndim() != 2) throw py::value_error("ids: expected a 2-d array [B, T], got shape " + ShapeStr(Dims(ids)));
  if (dx.ndim() != 3) throw py::value_error("d_x: expected a 3-d array [B, T, D], got shape " + ShapeStr(Dims(dx)));
  const int64_t B = ids.shape(0), T = ids.shape(1), D = dx.shape(2);
  const int64_t* ip = CheckedPtr<int64_t>(ids, "ids", {B, T});
  const S* gp = CheckedPtr<S>(dx, "d_x", {B, T, D});
  const int32_t* lp = CheckedLengths(lengths, B, T);
  py::array_t<int64_t> rows(std::vector<int64_t>{B * T});
  py::array_t<S> grads(std::vector<int64_t>{B * T, D});
  int64_t r;
  {
    py::gil_scoped_release release;
    r = EmbeddingRowGrads<S>(B, T, D, ip, lp, gp, rows.mutable_data(), grads.mutable_data());
  }
  // The first r entries (views of C-contiguous prefixes, so still C-contiguous).
  py::slice first(0, r, 1);
  return py::make_tuple(rows[first], grads[py::make_tuple(first, py::ellipsis())]);
}

}  // namespace
}  // namespace fusedlstm

PYBIND11_MODULE(_core, m) {
  using namespace fusedlstm;
  m.doc() = "Compiled fused LSTM kernels (use the fusedlstm package, not this module).";
  m.def(
      "forward",
      [](const py::array& x, const py::array& kernel, const py::array& rkernel,
         const py::object& bias, const py::object& h0, const py::object& c0,
         const py::object& lengths, bool training, const py::object& spare,
         bool return_sequences) {
        if (IsDtype(x, py::dtype::of<float>()))
          return Forward<float>(x, kernel, rkernel, bias, h0, c0, lengths, training, spare,
                                return_sequences);
        if (IsDtype(x, py::dtype::of<double>()))
          return Forward<double>(x, kernel, rkernel, bias, h0, c0, lengths, training, spare,
                                 return_sequences);
        throw py::type_error("x: dtype must be float32 or float64, got " +
                             std::string(py::str(x.dtype())));
      },
      py::arg("x"), py::arg("kernel"), py::arg("recurrent_kernel"), py::arg("bias"),
      py::arg("h0"), py::arg("c0"), py::arg("lengths"), py::arg("training"),
      py::arg("spare") = py::none(), py::arg("return_sequences") = true);
  m.def(
      "backward",
      [](const py::array& cache, const std::vector<int64_t>& shape, const py::object& lengths,
         const py::object& d_outputs, const py::object& d_h_n, const py::object& d_c_n,
         bool need_dx) {
        if (IsDtype(cache, py::dtype::of<float>()))
          return Backward<float>(cache, shape, lengths, d_outputs, d_h_n, d_c_n, need_dx);
        if (IsDtype(cache, py::dtype::of<double>()))
          return Backward<double>(cache, shape, lengths, d_outputs, d_h_n, d_c_n, need_dx);
        throw py::type_error("cache: dtype must be float32 or float64");
      },
      py::arg("cache"), py::arg("shape"), py::arg("lengths"), py::arg("d_outputs"),
      py::arg("d_h_n"), py::arg("d_c_n"), py::arg("need_dx") = true);
  m.def(
      "adam_dense",
      [](const py::array& p, const py::array& g, const py::array& m, const py::array& v,
         double lr_t, double eps_t, double beta1, double beta2, double grad_scale,
         const py::object& average, double average_keep) {
        const AdamCoefficients c = Coefficients(lr_t, eps_t, beta1, beta2, grad_scale, average_keep);
        if (IsDtype(p, py::dtype::of<float>())) return AdamDenseChecked<float>(p, g, m, v, average, c);
        if (IsDtype(p, py::dtype::of<double>())) return AdamDenseChecked<double>(p, g, m, v, average, c);
        throw py::type_error("param: dtype must be float32 or float64, got " +
                             std::string(py::str(p.dtype())));
      },
      py::arg("param"), py::arg("grad"), py::arg("m"), py::arg("v"), py::arg("lr_t"),
      py::arg("eps_t"), py::arg("beta1"), py::arg("beta2"), py::arg("grad_scale") = 1.0,
      py::arg("average") = py::none(), py::arg("average_keep") = 0.0,
      "One Adam step on a whole array, in place (see fusedlstm/adam.h): the gradient read as "
      "grad_scale * grad; with `average`, that moving average of the weights is updated too.");
  m.def(
      "adam_rows",
      [](const py::array& p, const py::array& m, const py::array& v, const py::array& rows,
         const py::array& g, double lr_t, double eps_t, double beta1, double beta2,
         double grad_scale) {
        const AdamCoefficients c = Coefficients(lr_t, eps_t, beta1, beta2, grad_scale);
        if (IsDtype(p, py::dtype::of<float>())) return AdamRowsChecked<float>(p, m, v, rows, g, c);
        if (IsDtype(p, py::dtype::of<double>())) return AdamRowsChecked<double>(p, m, v, rows, g, c);
        throw py::type_error("param: dtype must be float32 or float64, got " +
                             std::string(py::str(p.dtype())));
      },
      py::arg("param"), py::arg("m"), py::arg("v"), py::arg("rows"), py::arg("row_grads"),
      py::arg("lr_t"), py::arg("eps_t"), py::arg("beta1"), py::arg("beta2"),
      py::arg("grad_scale") = 1.0,
      "Lazy Adam on the given distinct rows of a table, in place; other rows untouched.");
  m.def(
      "embedding_row_grads",
      [](const py::array& ids, const py::object& lengths, const py::array& dx) {
        if (IsDtype(dx, py::dtype::of<float>())) return EmbeddingRowGradsChecked<float>(ids, lengths, dx);
        if (IsDtype(dx, py::dtype::of<double>())) return EmbeddingRowGradsChecked<double>(ids, lengths, dx);
        throw py::type_error("d_x: dtype must be float32 or float64, got " +
                             std::string(py::str(dx.dtype())));
      },
      py::arg("ids"), py::arg("lengths"), py::arg("d_x"),
      "(rows, grads): the distinct valid ids, increasing, and each one's summed d_x rows.");
  m.def(
      "fma_peak_gflops",
      [](int threads, double seconds) {
        if (threads < 1) throw py::value_error("threads must be >= 1");
        // One probe per thread, all at once (std::thread: each probe must own a core).
        std::vector<double> flops(threads, 0.0);
        {
          py::gil_scoped_release release;
          std::vector<std::thread> pool;
          for (int i = 1; i < threads; ++i) {
            pool.emplace_back([&flops, i, seconds] { flops[i] = FmaPeakFlopsOneThread(seconds); });
          }
          flops[0] = FmaPeakFlopsOneThread(seconds);
          for (auto& th : pool) th.join();
        }
        double total = 0;
        for (double f : flops) total += f;
        return total / 1e9;
      },
      py::arg("threads"), py::arg("seconds") = 0.3,
      "float32 GFLOP/s of a register-only FMA loop on `threads` threads (the machine's ceiling).");
#ifdef FUSEDLSTM_WITH_CUDA
  RegisterCuda(m);
  m.def("cuda_device_count", &CudaDeviceCount, "CUDA devices visible (0 without a driver).");
#else
  m.def("cuda_device_count", []() { return 0; }, "CUDA devices visible (this build has no CUDA).");
#endif
  m.def("set_num_threads", [](int n) {
    if (n < 1) throw py::value_error("set_num_threads: n must be >= 1, got " + std::to_string(n));
    g_num_threads.store(n);
  });
  m.def("get_num_threads", []() { return NumThreads(); });
  m.def("build_info", []() {
    py::dict d;
#if defined(__clang__)
    d["compiler"] = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
    d["compiler"] = std::string("gcc ") + __VERSION__;
#else
    d["compiler"] = "unknown";
#endif
    d["simd"] = std::string(Eigen::SimdInstructionSetsInUse());
    d["native"] = bool(FUSEDLSTM_NATIVE_BUILD);
    d["compile_flags"] = std::string(FUSEDLSTM_COMPILE_FLAGS);
    d["openmp"] = OpenMpEnabled();
    d["num_threads"] = NumThreads();
    d["eigen"] = std::to_string(EIGEN_WORLD_VERSION) + "." + std::to_string(EIGEN_MAJOR_VERSION) +
                 "." + std::to_string(EIGEN_MINOR_VERSION);
#ifdef FUSEDLSTM_WITH_CUDA
    d["cuda"] = true;
#else
    d["cuda"] = false;
#endif
    d["sanitizers"] = std::string(FUSEDLSTM_SANITIZERS);
    return d;
  });
}
