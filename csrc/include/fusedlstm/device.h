// How the kernels get threads. The kernel library never starts threads of its own: the caller
// injects a parallel_for through CpuDevice (OpenMP in the Python module, TensorFlow's thread pool
// in the op). Kernels split work into a fixed set of tasks chosen from the problem shape alone, so
// results never depend on how many threads run them.
#ifndef FUSEDLSTM_DEVICE_H_
#define FUSEDLSTM_DEVICE_H_

#include <cstdint>
#include <type_traits>

namespace fusedlstm {

// Runs task(ctx, i) for every i in [0, num_tasks) and returns when all have finished. Tasks are
// independent; any thread may run any task, in any order.
using TaskFn = void (*)(void* ctx, int64_t i);
using ParallelForFn = void (*)(void* device_impl, int num_threads, int64_t num_tasks, TaskFn task,
                               void* ctx);

struct CpuDevice {
  int num_threads = 1;                   // upper bound on threads a parallel_for may use
  ParallelForFn parallel_for = nullptr;  // nullptr: run every task inline, in order
  void* impl = nullptr;                  // opaque handle passed back to parallel_for
};

// The OpenMP-backed device (csrc/cpu/openmp_device.cc). Without OpenMP it runs inline.
CpuDevice OpenMpDevice(int num_threads);
// Threads OpenMP would use by default (OMP_NUM_THREADS respected); 1 without OpenMP.
int OpenMpDefaultThreads();
bool OpenMpEnabled();

// Below this many floating-point operations in all, waking other threads costs more than it saves.
constexpr double kMinParallelFlops = 1e6;

// Calls f(i) for i in [0, n) through the device. f must be callable as f(int64_t). `flops`
// estimates the whole job; small jobs run inline (the same tasks, so the same results).
template <typename F>
void ParallelFor(const CpuDevice& device, int64_t n, double flops, F&& f) {
  if (n <= 0) return;
  if (n == 1 || device.num_threads <= 1 || device.parallel_for == nullptr ||
      flops < kMinParallelFlops) {
    for (int64_t i = 0; i < n; ++i) f(i);
    return;
  }
  using Fn = typename std::remove_reference<F>::type;
  device.parallel_for(
      device.impl, device.num_threads, n, [](void* ctx, int64_t i) { (*static_cast<Fn*>(ctx))(i); },
      const_cast<void*>(static_cast<const void*>(&f)));
}

}  // namespace fusedlstm

#endif  // FUSEDLSTM_DEVICE_H_
