#include "stoker/packing/row_helper.h"

#include <pthread.h>
#include <sched.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>

namespace stoker {
namespace {

// After a batch the helper polls for the next for kPollFor, naps (kFirstNap doubling up to kLongestNap) until
// kNapFor has passed, then sleeps until woken.
constexpr auto kPollFor = std::chrono::microseconds(100);
constexpr auto kFirstNap = std::chrono::microseconds(50);
constexpr auto kLongestNap = std::chrono::microseconds(1000);
constexpr auto kNapFor = std::chrono::milliseconds(50);
constexpr int64_t kMaxRows = 0xFFFF;

inline uint32_t generation_of(uint64_t c) { return static_cast<uint32_t>(c >> 32); }
inline int64_t front_of(uint64_t c) { return static_cast<int64_t>((c >> 16) & 0xFFFF); }
inline int64_t back_of(uint64_t c) { return static_cast<int64_t>(c & 0xFFFF); }

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

}  // namespace

int current_cpu() {
#ifdef __linux__
  return sched_getcpu();
#else
  return -1;
#endif
}

RowHelper::RowHelper() : owner_(getpid()) {
#ifdef __linux__
  if (sched_getaffinity(0, sizeof(process_cpus_), &process_cpus_) != 0) CPU_ZERO(&process_cpus_);
#endif
  thread_ = std::thread([this] { work(); });
}

RowHelper::~RowHelper() { stop(); }

bool RowHelper::owned_here() const { return getpid() == owner_; }

void RowHelper::stop() {
  if (!owned_here() || !thread_.joinable()) return;
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_.store(true);
  }
  cv_.notify_all();
  thread_.join();
}

void RowHelper::leave_the_callers_core() {
#ifdef __linux__
  const int caller = caller_cpu_.load(std::memory_order_relaxed);
  if (caller < 0 || caller >= CPU_SETSIZE || sched_getcpu() != caller) return;
  // Every core this process may use but the caller's (those of the process, not this thread's narrowed set).
  cpu_set_t others = process_cpus_;
  CPU_CLR(caller, &others);
  if (CPU_COUNT(&others) == 0) return;
  pthread_setaffinity_np(pthread_self(), sizeof(others), &others);  // moves this thread at once
#endif
}

bool RowHelper::begin(int64_t n, RowFn fn, void* ctx) {
  if (n <= 0 || n > kMaxRows || stop_.load() || !owned_here() || busy_.exchange(true)) return false;
  caller_cpu_.store(current_cpu(), std::memory_order_relaxed);
  fn_ = fn;
  ctx_ = ctx;
  done_.store(0);
  const uint64_t gen = ++generation_;
  claim_.store((gen << 32) | static_cast<uint64_t>(n));  // front 0, back n; seq_cst: ordered before the check
  if (sleeping_.load()) {
    std::lock_guard<std::mutex> lock(mu_);
    cv_.notify_one();
  }
  return true;
}

void RowHelper::finish(int64_t n, RowFn fn, void* ctx, bool begun) {
  if (!begun) {
    for (int64_t i = 0; i < n; ++i) fn(ctx, i, i == 0, false);
    return;
  }
  bool first = true;
  for (;;) {
    uint64_t c = claim_.load(std::memory_order_acquire);
    const int64_t front = front_of(c);
    if (front >= back_of(c)) break;
    if (!claim_.compare_exchange_weak(c, c + (uint64_t{1} << 16), std::memory_order_acq_rel)) continue;
    fn(ctx, front, first, false);
    first = false;
    done_.fetch_add(1, std::memory_order_release);
  }
  // The helper writes at most the row it took last.
  for (unsigned spins = 0; done_.load(std::memory_order_acquire) < n; ++spins) {
    if (spins < 4096)
      cpu_relax();
    else
      sched_yield();  // it was descheduled: let it run here if it must
  }
  busy_.store(false);
}

void RowHelper::wait_for_batch(uint32_t seen) {
  auto fresh = [&] { return generation_of(claim_.load(std::memory_order_acquire)) != seen || stop_.load(); };
  // Polling yields the core at every turn: a woken thread can be queued on the core of the thread that woke
  // it, and must then not keep that thread from running.
  const auto start = std::chrono::steady_clock::now();
  while (std::chrono::steady_clock::now() - start < kPollFor) {
    if (fresh()) return;
    sched_yield();
  }
  // Then short sleeps, longer and longer: a timer wakes a thread on its own core, where a wake-up from the
  // building thread could queue it behind that thread for milliseconds (seen on a 2-core VM).
  auto nap = kFirstNap;
  while (std::chrono::steady_clock::now() - start < kNapFor) {
    std::this_thread::sleep_for(nap);
    if (fresh()) return;
    nap = std::min(nap * 2, kLongestNap);
  }
  // Idle for long: sleep until a batch comes (begin() wakes it).
  std::unique_lock<std::mutex> lock(mu_);
  sleeping_.store(true);  // seq_cst: run() either sees it or this sees the new generation
  cv_.wait(lock, fresh);
  sleeping_.store(false);
}

void RowHelper::work() {
#ifdef __linux__
  pthread_setname_np(pthread_self(), "stoker_rows");  // as ps and top show it
#endif
  uint32_t seen = 0;
  for (;;) {
    wait_for_batch(seen);
    if (stop_.load()) return;
    leave_the_callers_core();
    const uint32_t gen = generation_of(claim_.load(std::memory_order_acquire));
    seen = gen;
    bool first = true;
    for (;;) {
      uint64_t c = claim_.load(std::memory_order_acquire);
      if (generation_of(c) != gen) break;
      const int64_t back = back_of(c);
      if (front_of(c) >= back) break;
      if (!claim_.compare_exchange_weak(c, c - 1, std::memory_order_acq_rel)) continue;
      // Row back - 1 is ours and not written, so the batch is not finished and fn_/ctx_ are its own.
      fn_(ctx_, back - 1, first, true);
      first = false;
      rows_written_.fetch_add(1, std::memory_order_relaxed);
      done_.fetch_add(1, std::memory_order_release);
    }
  }
}

}  // namespace stoker
