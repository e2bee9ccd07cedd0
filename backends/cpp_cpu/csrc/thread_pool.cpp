// A small thread pool for the row-parallel loops, built to stay fast on a busy machine.
//
// Why not an OpenMP parallel-for: its implicit barrier makes the caller wait until every
// team thread has at least *arrived*, so when another process holds the second core the
// call stalls for a scheduler tick (4 ms here) even if the caller could have done all the
// work itself.  Measured on the 2-core development box under load: a 0.25 ms GEMV took
// 12-24 ms with OpenMP.  Here the caller and the workers claim work items from one atomic
// counter; the caller waits only for items a worker has actually claimed, so a worker that
// was not scheduled in time simply finds nothing left to do.
//
// Claims carry the job's generation in the upper 32 bits of the counter, so a worker that
// wakes up late can never claim an item of a newer job with the old job's function.
#include <pthread.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <mutex>
#include <thread>
#include <vector>

#include "bitlab_cpu.h"

namespace bitlab_cpu {
namespace {

inline void cpu_relax() {
#if BITLAB_X86
  _mm_pause();
#endif
}

// How long an idle worker spins for the next job before it sleeps on the condition variable.
// Waking a sleeping worker costs more than a short job: on the 2-core development VM the
// futex wake-up arrived after the caller had done most of a 60 us GEMV alone, so in BitNet
// decode (torch's operations on one thread for 0.1-1 ms between the projections) every
// projection ran on one core.  A long spin only pays where nothing else needs the core: a
// decode loop that holds torch's operations to one thread sets it for its duration
// (backends/cpp_cpu/threads.py, pool_spin), since a worker spinning beside torch's own
// OpenMP threads stalls their parallel regions (a 16-token prefill's copies went from
// 5 us to 1.8 ms).  The default is short: ~40 us, what 4000 pauses took before.
// BITLAB_CPU_POOL_SPIN_US sets the default; cpu_set_pool_spin changes the setting.
constexpr int64_t kDefaultSpinUs = 40;

int64_t spin_from_env() {
  const char* v = std::getenv("BITLAB_CPU_POOL_SPIN_US");
  if (v == nullptr || *v == '\0') return kDefaultSpinUs;
  char* end = nullptr;
  const long long us = std::strtoll(v, &end, 10);
  return end != v && *end == '\0' && us >= 0 ? us : kDefaultSpinUs;
}

std::atomic<int64_t> g_spin_us{spin_from_env()};

class Pool {
 public:
  void run(int64_t items, int threads, void (*fn)(void*, int64_t), void* ctx) {
    const int helpers = threads - 1;
    if (helpers <= 0 || items <= 1) {
      for (int64_t i = 0; i < items; ++i) fn(ctx, i);
      return;
    }
    std::lock_guard<std::mutex> serial(call_mutex_);  // one parallel job at a time
    ensure_workers(helpers);
    uint64_t gen;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      gen = ++generation_;
      fn_ = fn;
      ctx_ = ctx;
      items_ = items;
      active_ = helpers;
      done_.store(0, std::memory_order_relaxed);
      next_.store(gen << 32, std::memory_order_release);
      published_.store(gen, std::memory_order_release);
    }
    cv_.notify_all();
    work(gen, fn, ctx, items);
    // Only items a worker claimed can be outstanding; yield if it was preempted mid-item.
    for (int spin = 0; done_.load(std::memory_order_acquire) < items; ++spin) {
      if (spin < 2000) cpu_relax(); else std::this_thread::yield();
    }
  }

 private:
  // Claim and run items of job `gen` until none are left; returns when the counter moved on.
  void work(uint64_t gen, void (*fn)(void*, int64_t), void* ctx, int64_t items) {
    for (;;) {
      uint64_t cur = next_.load(std::memory_order_acquire);
      if ((cur >> 32) != gen || static_cast<int64_t>(cur & 0xffffffffu) >= items) return;
      if (!next_.compare_exchange_weak(cur, cur + 1, std::memory_order_acq_rel)) continue;
      fn(ctx, static_cast<int64_t>(cur & 0xffffffffu));
      done_.fetch_add(1, std::memory_order_acq_rel);
    }
  }

  void ensure_workers(int helpers) {
    while (static_cast<int>(workers_.size()) < helpers) {
      const int index = static_cast<int>(workers_.size());
      workers_.emplace_back([this, index] { worker_loop(index); });
      workers_.back().detach();
    }
  }

  void worker_loop(int index) {
    uint64_t seen = 0;
    for (;;) {
      uint64_t gen;
      void (*fn)(void*, int64_t);
      void* ctx;
      int64_t items;
      {
        // Spin first (g_spin_us): the next projection finds the worker awake.
        spin_until_published(seen);
        std::unique_lock<std::mutex> lock(mutex_);
        cv_.wait(lock, [&] { return generation_ != seen; });
        gen = seen = generation_;
        if (index >= active_) continue;  // this job asked for fewer helpers
        fn = fn_;
        ctx = ctx_;
        items = items_;
      }
      work(gen, fn, ctx, items);
    }
  }

  // The setting is read again at every clock read, so lowering it (before torch's threads run
  // a parallel op) sends a spinning worker to sleep at once.
  void spin_until_published(uint64_t seen) const {
    const auto start = std::chrono::steady_clock::now();
    for (;;) {
      const int64_t us = g_spin_us.load(std::memory_order_relaxed);
      if (std::chrono::steady_clock::now() - start >= std::chrono::microseconds(us)) return;
      for (int i = 0; i < 64; ++i) {  // ~0.6 us of pauses between clock reads
        if (published_.load(std::memory_order_acquire) != seen) return;
        cpu_relax();
      }
    }
  }

  std::mutex call_mutex_;
  std::mutex mutex_;
  std::condition_variable cv_;
  std::vector<std::thread> workers_;
  uint64_t generation_ = 0;
  void (*fn_)(void*, int64_t) = nullptr;
  void* ctx_ = nullptr;
  int64_t items_ = 0;
  int active_ = 0;
  std::atomic<uint64_t> published_{0};  // generation_, readable without the mutex
  std::atomic<uint64_t> next_{0};
  std::atomic<int64_t> done_{0};
};

// Never destroyed: detached workers may outlive static destructors.  A forked child has
// none of the parent's workers (and maybe a mutex held by one), so it starts a fresh pool.
Pool* g_pool = nullptr;
std::once_flag g_pool_once;

Pool& pool() {
  std::call_once(g_pool_once, [] {
    g_pool = new Pool();
    pthread_atfork(nullptr, nullptr, [] { g_pool = new Pool(); });
  });
  return *g_pool;
}

}  // namespace

void parallel_items(int64_t items, int threads, void (*fn)(void*, int64_t), void* ctx) {
  pool().run(items, threads, fn, ctx);
}

int64_t set_pool_spin_us(int64_t us) {
  return g_spin_us.exchange(us < 0 ? spin_from_env() : us, std::memory_order_relaxed);
}

int64_t pool_spin_us() { return g_spin_us.load(std::memory_order_relaxed); }

}  // namespace bitlab_cpu
