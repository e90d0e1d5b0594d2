// CpuDevice's parallel_for for the Python module: a pool of worker threads of our own, with
// OpenMP only telling the default thread count (OMP_NUM_THREADS, the cores).
//
// Why not an OpenMP team: a parallel region ends at a barrier that waits for every thread of
// the team, so a region started after the workers went to sleep costs their wake-up: an
// inference call of 0.5 ms took 8 ms when calls came 20 ms apart. Here the caller runs tasks
// itself from the start, sleeping workers join when they wake, and the call returns as soon
// as every task is done: a worker that wakes late finds nothing left and is not waited for.
// Workers are kept off the core of the calling thread (else a woken worker queued behind the
// busy caller: 15 ms instead of 5 ms at one row, H = 512), and spin briefly
// after a job so back-to-back regions (a call's projection, then its recurrence) do not pay a
// wake-up. One job runs at a time; a concurrent call (another Python thread) runs its tasks
// on its own thread. Which thread runs a task never changes its result.
#include <pthread.h>
#include <sched.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "fusedlstm/device.h"

#ifdef FUSEDLSTM_WITH_OPENMP
#include <omp.h>
#endif

namespace fusedlstm {
namespace {

inline void CpuRelax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

struct Job {
  TaskFn task;
  void* ctx;
  int64_t n;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  std::atomic<int> helpers;  // workers that may still join
  Job(TaskFn t, void* c, int64_t count, int max_helpers)
      : task(t), ctx(c), n(count), helpers(max_helpers) {}
  // Claims and runs tasks until none is left.
  void Drain() {
    for (int64_t i; (i = next.fetch_add(1, std::memory_order_relaxed)) < n;) {
      task(ctx, i);
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

class Pool {
 public:
  void Run(int num_threads, int64_t n, TaskFn task, void* ctx) {
    std::unique_lock<std::mutex> run(run_mu_, std::try_to_lock);
    if (!run.owns_lock() || num_threads <= 1) {  // busy (another caller) or one thread
      for (int64_t i = 0; i < n; ++i) task(ctx, i);
      return;
    }
    const int helpers = static_cast<int>(std::min<int64_t>(num_threads, n)) - 1;
    Start(helpers);
    KeepOffCallersCore();
    auto job = std::make_shared<Job>(task, ctx, n, helpers);
    {
      std::lock_guard<std::mutex> lk(mu_);
      job_ = job;
      generation_.fetch_add(1, std::memory_order_release);
    }
    cv_.notify_all();
    job->Drain();
    // Tasks a worker claimed may still be running: wait for those only.
    for (int spins = 0; job->done.load(std::memory_order_acquire) < n; ++spins) {
      if (spins < 1 << 14) {
        CpuRelax();
      } else {
        std::this_thread::yield();
      }
    }
    std::lock_guard<std::mutex> lk(mu_);
    job_.reset();  // a worker waking now finds no job; one holding it finds no task left
  }

  // After fork() the child has none of the parent's workers: forget them (never destroy them).
  static void ResetInChild() { instance_ = new Pool(); }
  static Pool& Get() {
    static std::once_flag once;
    std::call_once(once, [] {
      instance_ = new Pool();  // never destroyed: workers block in it until the process exits
      pthread_atfork(nullptr, nullptr, &Pool::ResetInChild);
    });
    return *instance_;
  }

 private:
  void Start(int helpers) {
    std::lock_guard<std::mutex> lk(mu_);
    while (static_cast<int>(workers_) < helpers) {
      std::thread t(&Pool::Work, this);
      pthread_setname_np(t.native_handle(), "fusedlstm-pool");  // in top, perf, /proc
      handles_.push_back(t.native_handle());
      t.detach();
      ++workers_;
      away_from_ = -1;  // the new worker is not kept off any core yet
    }
  }

  // Workers stay off the core the caller runs on now: woken there, a worker would wait behind
  // the caller (busy running tasks, or spinning on a step's barrier) until the scheduler moved
  // one of them; pinned once at start, a caller that later moved onto the workers' core shared
  // it with them (a (1, 100, 300, 512) call took 23 ms instead of 4.5). Re-pinned only when the
  // caller's core changed (a system call per worker).
  void KeepOffCallersCore() {
    const int here = sched_getcpu();
    if (here < 0 || here == away_from_) return;
    cpu_set_t allowed;
    if (sched_getaffinity(0, sizeof(allowed), &allowed) != 0 || CPU_COUNT(&allowed) < 2) {
      // A caller bound to one core: the workers may use every other (the kernel keeps them in
      // the process's cpuset).
      CPU_ZERO(&allowed);
      const unsigned n = std::thread::hardware_concurrency();
      for (unsigned c = 0; c < n && c < CPU_SETSIZE; ++c) CPU_SET(c, &allowed);
      if (CPU_COUNT(&allowed) < 2) return;
    }
    CPU_CLR(here, &allowed);
    std::lock_guard<std::mutex> lk(mu_);
    for (pthread_t h : handles_) pthread_setaffinity_np(h, sizeof(allowed), &allowed);
    away_from_ = here;
  }

  void Work() {
    uint64_t seen = generation_.load(std::memory_order_acquire);
    for (;;) {
      // Spin a little for the next job (back-to-back regions), then sleep.
      const auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(200);
      while (generation_.load(std::memory_order_acquire) == seen &&
             std::chrono::steady_clock::now() < until) {
        for (int i = 0; i < 64; ++i) CpuRelax();
      }
      std::shared_ptr<Job> job;
      {
        std::unique_lock<std::mutex> lk(mu_);
        cv_.wait(lk, [&] { return generation_.load(std::memory_order_relaxed) != seen; });
        seen = generation_.load(std::memory_order_relaxed);
        job = job_;
      }
      if (job && job->helpers.fetch_sub(1, std::memory_order_relaxed) > 0) job->Drain();
    }
  }

  static Pool* instance_;
  std::mutex run_mu_;  // one job at a time
  std::mutex mu_;      // guards job_ and the workers' sleep
  std::condition_variable cv_;
  std::shared_ptr<Job> job_;
  std::atomic<uint64_t> generation_{0};
  size_t workers_ = 0;
  std::vector<pthread_t> handles_;  // the workers (they never exit)
  int away_from_ = -1;              // the core they are kept off (guarded by run_mu_)
};

Pool* Pool::instance_ = nullptr;

void PoolParallelFor(void* /*impl*/, int num_threads, int64_t num_tasks, TaskFn task, void* ctx) {
#ifdef FUSEDLSTM_WITH_OPENMP
  Pool::Get().Run(num_threads, num_tasks, task, ctx);
#else
  (void)num_threads;
  for (int64_t i = 0; i < num_tasks; ++i) task(ctx, i);
#endif
}

}  // namespace

CpuDevice OpenMpDevice(int num_threads) {
  CpuDevice device;
  device.num_threads = num_threads < 1 ? 1 : num_threads;
  device.parallel_for = &PoolParallelFor;
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
