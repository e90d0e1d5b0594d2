// The only file with '#pragma omp': adapts an OpenMP thread team to CpuDevice's parallel_for.
// OpenMP keeps its team alive between regions, so a per-time-step parallel_for costs a wake-up,
// not a thread start.
#include "fusedlstm/device.h"

#ifdef FUSEDLSTM_WITH_OPENMP
#include <omp.h>
#endif

namespace fusedlstm {
namespace {

void OpenMpParallelFor(void* /*impl*/, int num_threads, int64_t num_tasks, TaskFn task, void* ctx) {
#ifdef FUSEDLSTM_WITH_OPENMP
  const int threads = static_cast<int>(num_tasks < num_threads ? num_tasks : num_threads);
// Dynamic: tasks differ in size; which thread runs a task never changes its result.
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
  for (int64_t i = 0; i < num_tasks; ++i) task(ctx, i);
#else
  (void)num_threads;
  for (int64_t i = 0; i < num_tasks; ++i) task(ctx, i);
#endif
}

}  // namespace

CpuDevice OpenMpDevice(int num_threads) {
  CpuDevice device;
  device.num_threads = num_threads < 1 ? 1 : num_threads;
  device.parallel_for = &OpenMpParallelFor;
  return device;
}

int OpenMpDefaultThreads() {
#ifdef FUSEDLSTM_WITH_OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

bool OpenMpEnabled() {
#ifdef FUSEDLSTM_WITH_OPENMP
  return true;
#else
  return false;
#endif
}

}  // namespace fusedlstm
