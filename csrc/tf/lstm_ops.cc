// TensorFlow adapter for the fused LSTM kernels: op signatures and shape functions
// (FusedLstm, FusedLstmGrad), OpKernels that check every input (rank before any dimension),
// allocate outputs and workspaces through TensorFlow, and run the kernels on TensorFlow's CPU
// thread pool adapted to CpuDevice. The gradient op is wired to FusedLstm by a registered
// Python gradient (fusedlstm/keras/ops.py).
// Optional inputs are empty 1-d tensors ([0]): lengths (then every step is valid, unless a step
// mask says otherwise), step_mask (Keras's [N, T] booleans, masks with holes; given instead of
// lengths) and recurrent_masks (Keras's recurrent dropout, training only).
// The attribute `precision` is fusedlstm::Precision's code: 0 float32 products, 1 bfloat16
// products (float32 tensors only, a CPU with AVX512_BF16); the gradient op takes its forward's.
#include <algorithm>
#include <atomic>
#include <cstring>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#include "../cpu/gemm_bf16.h"
#include "absl/status/status.h"
#include "fusedlstm/lstm.h"
#include "fusedlstm/validate.h"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tensorflow/core/platform/blocking_counter.h"
#include "tensorflow/core/platform/threadpool.h"

namespace tensorflow {
namespace {

using shape_inference::DimensionHandle;
using shape_inference::InferenceContext;
using shape_inference::ShapeHandle;

// The attribute values of fusedlstm::Activation, by Keras's names.
#define ACTIVATIONS "{'tanh', 'relu', 'linear', 'sigmoid', 'hard_sigmoid'}"

REGISTER_OP("FusedLstm")
    .Input("x: T")                 // [N, T, C] (the attr T is the dtype, not the steps)
    .Input("kernel: T")            // [C, 4H]
    .Input("recurrent_kernel: T")  // [H, 4H]
    .Input("bias: T")              // [4H]
    .Input("h0: T")                // [N, H]
    .Input("c0: T")                // [N, H]
    .Input("lengths: int32")       // [N], 0..T; or [0]: none
    .Input("step_mask: bool")      // [N, T]; or [0]: none (lengths apply)
    .Input("recurrent_masks: T")   // [4, N, H], training only; or [0]: none
    .Output("outputs: T")          // [N, T, H]; [N, 0, H] when return_sequences = false
    .Output("h_n: T")              // [N, H]
    .Output("c_n: T")              // [N, H]
    .Output("cache: T")            // opaque, 1-d; empty when training = false
    .Attr("T: {float, double}")
    .Attr("training: bool = true")
    .Attr("return_sequences: bool = true")  // false: the kernel writes no outputs
    .Attr("reverse: bool = false")  // each row's valid steps last to first (fusedlstm/lstm.h)
    .Attr("activation: " ACTIVATIONS " = 'tanh'")  // Keras's names (fusedlstm/lstm.h)
    .Attr("recurrent_activation: " ACTIVATIONS " = 'sigmoid'")
    .Attr("precision: int = 0")  // of the products: 0 float32, 1 bfloat16 (fusedlstm/lstm.h)
    .SetShapeFn([](InferenceContext* c) {
      ShapeHandle x, k, r, b, h0, c0, len;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 3, &x));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(1), 2, &k));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(2), 2, &r));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(3), 1, &b));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(4), 2, &h0));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(5), 2, &c0));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(6), 1, &len));
      DimensionHandle N = c->Dim(x, 0), T = c->Dim(x, 1), H = c->Dim(r, 0);
      bool return_sequences = true;
      TF_RETURN_IF_ERROR(c->GetAttr("return_sequences", &return_sequences));
      c->set_output(
          0, return_sequences ? c->MakeShape({N, T, H}) : c->MakeShape({N, c->MakeDim(0), H}));
      c->set_output(1, c->MakeShape({N, H}));
      c->set_output(2, c->MakeShape({N, H}));
      c->set_output(3, c->Vector(InferenceContext::kUnknownDim));
      return absl::OkStatus();
    });

REGISTER_OP("FusedLstmGrad")
    .Input("x: T")                 // the forward's x (its shape; the cache holds the values)
    .Input("recurrent_kernel: T")  // the forward's recurrent_kernel (its shape)
    .Input("lengths: int32")       // the forward's
    .Input("step_mask: bool")      // the forward's
    .Input("recurrent_masks: T")   // the forward's
    .Input("cache: T")
    .Input("d_outputs: T")  // [N, T, H], or [N, 0, H]: none (return_sequences = false)
    .Input("d_h_n: T")      // [N, H]
    .Input("d_c_n: T")      // [N, H]
    .Output("dx: T")
    .Output("d_kernel: T")
    .Output("d_recurrent_kernel: T")
    .Output("d_bias: T")
    .Output("d_h0: T")
    .Output("d_c0: T")
    .Attr("T: {float, double}")
    .Attr("reverse: bool = false")                 // as the forward that wrote the cache ran
    .Attr("activation: " ACTIVATIONS " = 'tanh'")  // as the forward ran
    .Attr("recurrent_activation: " ACTIVATIONS " = 'sigmoid'")
    .Attr("precision: int = 0")  // as the forward ran
    .SetShapeFn([](InferenceContext* c) {
      ShapeHandle x, r;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 3, &x));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(1), 2, &r));
      DimensionHandle N = c->Dim(x, 0), C = c->Dim(x, 2), H = c->Dim(r, 0), G;
      TF_RETURN_IF_ERROR(c->Multiply(H, 4, &G));
      c->set_output(0, x);
      c->set_output(1, c->MakeShape({C, G}));
      c->set_output(2, c->MakeShape({H, G}));
      c->set_output(3, c->Vector(G));
      c->set_output(4, c->MakeShape({N, H}));
      c->set_output(5, c->MakeShape({N, H}));
      return absl::OkStatus();
    });

// TensorFlow's intra-op pool as a CpuDevice. The kernels call this once or twice per time step,
// so it must cost one wake-up, not one scheduled closure per task (TF's own ParallelFor
// schedules a closure per block and hops to the pool when there are more tasks than threads):
// the caller and up to num_threads - 1 pool threads take task indices from one atomic counter.
// A helper the pool starts late finds no work left and returns at once; the caller waits for
// every helper it scheduled, since they read this stack frame.
void TfParallelFor(void* impl, int num_threads, int64_t num_tasks, fusedlstm::TaskFn task,
                   void* ctx) {
  auto* workers = static_cast<thread::ThreadPool*>(impl);
  const int64_t helpers = std::min<int64_t>(num_tasks, num_threads) - 1;
  std::atomic<int64_t> next{0};
  auto drain = [&] {
    for (int64_t i = next.fetch_add(1, std::memory_order_relaxed); i < num_tasks;
         i = next.fetch_add(1, std::memory_order_relaxed)) {
      task(ctx, i);
    }
  };
  if (helpers <= 0) {
    drain();
    return;
  }
  BlockingCounter done(static_cast<int>(helpers));
  for (int64_t h = 0; h < helpers; ++h) {
    workers->Schedule([&] {
      drain();
      done.DecrementCount();
    });
  }
  drain();
  done.Wait();
}

fusedlstm::CpuDevice MakeDevice(OpKernelContext* ctx) {
  fusedlstm::CpuDevice d;
  auto* workers = ctx->device()->tensorflow_cpu_worker_threads()->workers;
  d.num_threads = workers->NumThreads();
  d.parallel_for = &TfParallelFor;
  d.impl = workers;
  return d;
}

std::vector<int64_t> Dims(const Tensor& t) {
  std::vector<int64_t> d;
  for (int i = 0; i < t.dims(); ++i) d.push_back(t.dim_size(i));
  return d;
}

// A message from fusedlstm/validate.h as InvalidArgument: false (the error set) when not empty.
bool Valid(OpKernelContext* ctx, const std::string& error) {
  if (error.empty()) return true;
  ctx->CtxFailure(absl::InvalidArgumentError(error));
  return false;
}

// The problem shape from x [N, T, C] and recurrent_kernel [H, 4H]. False (with the error set)
// on bad input.
bool ReadShape(OpKernelContext* ctx, const Tensor& x, const Tensor& r, fusedlstm::LstmShape* s) {
  return Valid(ctx, fusedlstm::ValidateProblem(Dims(x), Dims(r), nullptr, s)) &&
         Valid(ctx, fusedlstm::ValidateSizes(*s));
}

// An optional input left out: an empty 1-d tensor.
bool Omitted(const Tensor& t) { return t.dims() == 1 && t.NumElements() == 0; }

// Which steps are valid, as the kernels take them: lengths [N] (values in 0..T), or a step mask
// [N, T] (bool), or neither (every step). A step mask that only pads on the right becomes
// lengths held in `own` (the kernels' faster path), so the forward and its gradient, given the
// same inputs, decide alike. False (with the error set) on bad input.
struct StepInputs {
  const int32_t* lengths = nullptr;
  const uint8_t* step_mask = nullptr;
  Tensor own;  // lengths converted from a right-padded step mask
};

bool ReadSteps(OpKernelContext* ctx, const Tensor& len, const Tensor& mask,
               const fusedlstm::LstmShape& s, StepInputs* out) {
  const bool has_len = !Omitted(len), has_mask = !Omitted(mask);
  if (has_len && has_mask) {
    ctx->CtxFailure(absl::InvalidArgumentError(
        "lengths and step_mask: give one of them (the other as an empty [0] tensor), not both"));
    return false;
  }
  if (has_len) {
    if (!Valid(ctx, fusedlstm::CheckShape("lengths", Dims(len), {{s.N, "N", "x's N"}}, "[N]"))) {
      return false;
    }
    out->lengths = len.flat<int32_t>().data();
    return Valid(ctx, fusedlstm::ValidateLengths(out->lengths, s));
  }
  if (!has_mask) return true;
  if (!Valid(ctx, fusedlstm::CheckShape("step_mask", Dims(mask),
                                        {{s.N, "N", "x's N"}, {s.T, "T", "x's T"}}, "[N, T]"))) {
    return false;
  }
  // TensorFlow's bool is one byte holding 0 or 1: the kernels' uint8 mask as it is.
  const uint8_t* m = reinterpret_cast<const uint8_t*>(mask.flat<bool>().data());
  absl::Status st = ctx->allocate_temp(DT_INT32, TensorShape({s.N}), &out->own);
  if (!st.ok()) {
    ctx->CtxFailure(st);
    return false;
  }
  int32_t* counts = out->own.flat<int32_t>().data();
  bool right_padded = true;
  for (int64_t n = 0; n < s.N; ++n) {
    const uint8_t* row = m + n * s.T;
    int64_t k = 0;
    while (k < s.T && row[k]) ++k;
    counts[n] = static_cast<int32_t>(k);
    for (int64_t t = k; t < s.T && right_padded; ++t) right_padded = row[t] == 0;
  }
  if (right_padded) {
    out->lengths = counts;
  } else {
    out->step_mask = m;
  }
  return true;
}

// recurrent_masks [4, N, H], or nullptr when omitted. False (with the error set) on bad input.
template <typename S>
bool ReadRecurrentMasks(OpKernelContext* ctx, const Tensor& masks, const fusedlstm::LstmShape& s,
                        const S** out) {
  *out = nullptr;
  if (Omitted(masks)) return true;
  if (!Valid(ctx, fusedlstm::CheckShape("recurrent_masks", Dims(masks),
                                        {{4, "4", "the four gates i, f, c, o"},
                                         {s.N, "N", "x's N"},
                                         {s.H, "H", "recurrent_kernel's H"}},
                                        "[4, N, H]"))) {
    return false;
  }
  *out = masks.flat<S>().data();
  return true;
}

fusedlstm::Activation ReadActivation(const std::string& name) {
  if (name == "relu") return fusedlstm::Activation::kRelu;
  if (name == "linear") return fusedlstm::Activation::kLinear;
  if (name == "sigmoid") return fusedlstm::Activation::kSigmoid;
  if (name == "hard_sigmoid") return fusedlstm::Activation::kHardSigmoid;
  return fusedlstm::Activation::kTanh;  // the attribute's enum admits nothing else
}

// The activation attributes of either op.
absl::Status ReadActivations(OpKernelConstruction* c, fusedlstm::Activation* act,
                             fusedlstm::Activation* rec) {
  std::string a, r;
  TF_RETURN_IF_ERROR(c->GetAttr("activation", &a));
  TF_RETURN_IF_ERROR(c->GetAttr("recurrent_activation", &r));
  *act = ReadActivation(a);
  *rec = ReadActivation(r);
  return absl::OkStatus();
}

// The precision attribute of either op, checked against the dtype and this CPU (the op library
// detects the CPU's bfloat16 engine itself; the Python module's set_bf16_engine does not reach it).
template <typename S>
absl::Status ReadPrecision(OpKernelConstruction* c, fusedlstm::Precision* out) {
  int64_t code = 0;
  TF_RETURN_IF_ERROR(c->GetAttr("precision", &code));
  *out = fusedlstm::Precision::kFloat32;
  if (code == 0) return absl::OkStatus();
  if (code != 1) {
    return absl::InvalidArgumentError("precision: 0 (float32) or 1 (bfloat16), got " +
                                      std::to_string(code));
  }
  if (!std::is_same<S, float>::value) {
    return absl::InvalidArgumentError(
        "precision=1 (bfloat16) computes on float32 tensors (it rounds the products' operands "
        "itself); got float64 (use float32, or precision=0)");
  }
  if (fusedlstm::Bf16Active() == fusedlstm::Bf16Engine::kNone) {
    const std::string missing = fusedlstm::Bf16Missing();
    return absl::FailedPreconditionError("precision=1 (bfloat16) needs " +
                                         (missing.empty() ? std::string("AVX512_BF16") : missing) +
                                         "; use precision=0 (float32) on this machine");
  }
  *out = fusedlstm::Precision::kBfloat16;
  return absl::OkStatus();
}

template <typename S>
class FusedLstmOp : public OpKernel {
 public:
  explicit FusedLstmOp(OpKernelConstruction* c) : OpKernel(c) {
    OP_REQUIRES_OK(c, c->GetAttr("training", &training_));
    OP_REQUIRES_OK(c, c->GetAttr("return_sequences", &return_sequences_));
    OP_REQUIRES_OK(c, c->GetAttr("reverse", &reverse_));
    OP_REQUIRES_OK(c, ReadActivations(c, &activation_, &recurrent_activation_));
    OP_REQUIRES_OK(c, ReadPrecision<S>(c, &precision_));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor &x = ctx->input(0), &k = ctx->input(1), &r = ctx->input(2), &b = ctx->input(3),
                 &h0 = ctx->input(4), &c0 = ctx->input(5), &len = ctx->input(6),
                 &mask = ctx->input(7), &rmasks = ctx->input(8);
    fusedlstm::LstmShape s;
    if (!ReadShape(ctx, x, r, &s)) return;
    const std::vector<int64_t> b_dims = Dims(b), h0_dims = Dims(h0), c0_dims = Dims(c0);
    if (!Valid(ctx, fusedlstm::ValidateForwardInputs(s, Dims(k), &b_dims, &h0_dims, &c0_dims))) {
      return;
    }
    StepInputs steps;
    if (!ReadSteps(ctx, len, mask, s, &steps)) return;
    const S* recurrent_masks;
    if (!ReadRecurrentMasks<S>(ctx, rmasks, s, &recurrent_masks)) return;
    OP_REQUIRES(
        ctx, training_ || recurrent_masks == nullptr,
        absl::InvalidArgumentError(
            "recurrent_masks: recurrent dropout applies in training only (training=false)"));
    Tensor *out, *hn, *cn, *cache;
    OP_REQUIRES_OK(
        ctx, ctx->allocate_output(0, TensorShape({s.N, return_sequences_ ? s.T : 0, s.H}), &out));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, TensorShape({s.N, s.H}), &hn));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(2, TensorShape({s.N, s.H}), &cn));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(
                            3, TensorShape({training_ ? fusedlstm::CacheSize(s) : 0}), &cache));
    Tensor workspace;
    OP_REQUIRES_OK(
        ctx, ctx->allocate_temp(
                 DataTypeToEnum<S>::value,
                 TensorShape({fusedlstm::ForwardWorkspaceSize(s, training_, reverse_, precision_)}),
                 &workspace));
    fusedlstm::ForwardArgs<S> a;
    a.x = x.flat<S>().data();
    a.kernel = k.flat<S>().data();
    a.recurrent_kernel = r.flat<S>().data();
    a.bias = b.flat<S>().data();
    a.h0 = h0.flat<S>().data();
    a.c0 = c0.flat<S>().data();
    a.lengths = steps.lengths;
    a.step_mask = steps.step_mask;
    a.outputs = return_sequences_ ? out->flat<S>().data() : nullptr;
    a.h_n = hn->flat<S>().data();
    a.c_n = cn->flat<S>().data();
    a.workspace = workspace.flat<S>().data();
    a.cache = training_ ? cache->flat<S>().data() : nullptr;
    a.reverse = reverse_;
    a.activation = activation_;
    a.recurrent_activation = recurrent_activation_;
    a.recurrent_masks = recurrent_masks;
    a.precision = precision_;
    fusedlstm::LstmForward<S>(MakeDevice(ctx), s, a);
  }

 private:
  bool training_;
  bool return_sequences_;
  bool reverse_;
  fusedlstm::Activation activation_, recurrent_activation_;
  fusedlstm::Precision precision_;
};

template <typename S>
class FusedLstmGradOp : public OpKernel {
 public:
  explicit FusedLstmGradOp(OpKernelConstruction* c) : OpKernel(c) {
    OP_REQUIRES_OK(c, c->GetAttr("reverse", &reverse_));
    OP_REQUIRES_OK(c, ReadActivations(c, &activation_, &recurrent_activation_));
    OP_REQUIRES_OK(c, ReadPrecision<S>(c, &precision_));
  }

  void Compute(OpKernelContext* ctx) override {
    constexpr int kCache = 5;
    const Tensor &x = ctx->input(0), &r = ctx->input(1), &len = ctx->input(2),
                 &mask = ctx->input(3), &rmasks = ctx->input(4), &cache = ctx->input(kCache),
                 &dout = ctx->input(6), &dhn = ctx->input(7), &dcn = ctx->input(8);
    fusedlstm::LstmShape s;
    if (!ReadShape(ctx, x, r, &s)) return;
    StepInputs steps;
    if (!ReadSteps(ctx, len, mask, s, &steps)) return;
    const S* recurrent_masks;
    if (!ReadRecurrentMasks<S>(ctx, rmasks, s, &recurrent_masks)) return;
    const int64_t G = 4 * s.H;
    if (!Valid(ctx, fusedlstm::CheckShape("cache (run the forward with training=True)", Dims(cache),
                                          {{fusedlstm::CacheSize(s), "CacheSize(T, N, C, H)",
                                            "the size for x's and recurrent_kernel's shape"}},
                                          "[CacheSize]"))) {
      return;
    }
    // A forward without return_sequences has [N, 0, H] outputs, so their gradient is empty.
    const bool no_dout = dout.shape() == TensorShape({s.N, 0, s.H}) && s.T > 0;
    const std::vector<int64_t> dout_dims = Dims(dout), dhn_dims = Dims(dhn), dcn_dims = Dims(dcn);
    if (!Valid(ctx, fusedlstm::ValidateUpstream(s, no_dout ? nullptr : &dout_dims, &dhn_dims,
                                                &dcn_dims))) {
      return;
    }
    // Backward consumes its cache in place. When this op holds the only reference to the cache
    // buffer (the usual case: nothing else reads the forward's cache), TensorFlow lets it take the
    // buffer over; otherwise (a persistent tape may take the gradient twice, or the cache is
    // fetched) the input must stay intact and the kernel works on a copy.
    std::unique_ptr<Tensor> owned = ctx->forward_input(
        kCache, OpKernelContext::Params::kNoReservation, DataTypeToEnum<S>::value, cache.shape(),
        DEVICE_MEMORY, AllocatorAttributes());
    Tensor work_cache;
    if (owned != nullptr) {
      work_cache = *owned;
    } else {
      OP_REQUIRES_OK(ctx, ctx->allocate_temp(DataTypeToEnum<S>::value, cache.shape(), &work_cache));
      if (cache.NumElements() > 0) {
        std::memcpy(work_cache.flat<S>().data(), cache.flat<S>().data(),
                    sizeof(S) * cache.NumElements());
      }
    }
    Tensor *dx, *dk, *dr, *db, *dh0, *dc0;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, x.shape(), &dx));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, TensorShape({s.C, G}), &dk));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(2, TensorShape({s.H, G}), &dr));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(3, TensorShape({G}), &db));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(4, TensorShape({s.N, s.H}), &dh0));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(5, TensorShape({s.N, s.H}), &dc0));
    Tensor workspace;
    OP_REQUIRES_OK(ctx, ctx->allocate_temp(DataTypeToEnum<S>::value,
                                           TensorShape({fusedlstm::BackwardWorkspaceSize(
                                               s, recurrent_masks != nullptr, precision_)}),
                                           &workspace));
    fusedlstm::BackwardArgs<S> a;
    a.cache = work_cache.flat<S>().data();
    a.lengths = steps.lengths;
    a.step_mask = steps.step_mask;
    a.d_outputs = no_dout ? nullptr : dout.flat<S>().data();
    a.d_h_n = dhn.flat<S>().data();
    a.d_c_n = dcn.flat<S>().data();
    a.dx = dx->flat<S>().data();
    a.d_kernel = dk->flat<S>().data();
    a.d_recurrent_kernel = dr->flat<S>().data();
    a.d_bias = db->flat<S>().data();
    a.d_h0 = dh0->flat<S>().data();
    a.d_c0 = dc0->flat<S>().data();
    a.workspace = workspace.flat<S>().data();
    a.reverse = reverse_;
    a.activation = activation_;
    a.recurrent_activation = recurrent_activation_;
    a.recurrent_masks = recurrent_masks;
    a.precision = precision_;
    fusedlstm::LstmBackward<S>(MakeDevice(ctx), s, a);
  }

 private:
  bool reverse_;
  fusedlstm::Activation activation_, recurrent_activation_;
  fusedlstm::Precision precision_;
};

#define REGISTER(S)                                                                        \
  REGISTER_KERNEL_BUILDER(Name("FusedLstm").Device(DEVICE_CPU).TypeConstraint<S>("T"),     \
                          FusedLstmOp<S>);                                                 \
  REGISTER_KERNEL_BUILDER(Name("FusedLstmGrad").Device(DEVICE_CPU).TypeConstraint<S>("T"), \
                          FusedLstmGradOp<S>);
REGISTER(float)
REGISTER(double)
#undef REGISTER
#undef ACTIVATIONS

}  // namespace
}  // namespace tensorflow
