// A second thread that writes rows of the batch the calling thread is building, from the other end.
#pragma once

#include <sched.h>
#include <sys/types.h>

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <thread>

namespace stoker {

/// The core the calling thread runs on (-1 where unknown).
int current_cpu();

/// One helper thread for batches built on demand. run(n, fn, ctx) calls fn for rows 0..n-1: the caller takes
/// rows from the front, the helper from the back, and run returns once every row is written. Each core thus
/// writes about the same half of a reused block batch after batch (it stays in that core's cache; rows taken
/// alternately made the lines move between cores and were slower than one thread).
///
/// After a batch the helper polls for the next one for 0.1 ms (a batch is asked for every ~15 us in a tight
/// loop), yielding its core at every turn; then it naps on timers for up to 50 ms, then sleeps until a batch
/// wakes it. (A thread woken by another can be queued behind it on its core for milliseconds: seen on a 2-core
/// VM, where the helper then joined in only after ~400 batches.) A batch that finds it away starts alone.
/// Another batch while one is begun (a second thread building with the same helper), a batch of more than
/// 65535 rows, or a forked child (where the thread is not there) write every row on the calling thread.
///
/// On Linux the helper keeps off the core of the thread that calls run(): a new or woken thread is often
/// queued on the core of the thread that started or woke it, and on a 2-core VM stayed there for tens of
/// milliseconds while the other core idled. When it finds itself there it narrows its affinity to the other
/// cores it may use (then the scheduler moves the calling thread instead if it comes over).
class RowHelper {
 public:
  using RowFn = void (*)(void* ctx, int64_t row, bool first_of_thread, bool from_back);

  RowHelper();
  ~RowHelper();
  RowHelper(const RowHelper&) = delete;
  RowHelper& operator=(const RowHelper&) = delete;

  /// Writes rows 0..n-1 through fn: begin() then finish().
  void run(int64_t n, RowFn fn, void* ctx) { finish(n, fn, ctx, begin(n, fn, ctx)); }
  /// Hands rows 0..n-1 to the helper, which starts on them from the back at once; false when it cannot take
  /// them (busy, stopped, a forked child, more than 65535 rows), and then finish() writes every row.
  bool begin(int64_t n, RowFn fn, void* ctx);
  /// Writes the rows of begin() from the front on the calling thread and returns once every row is written;
  /// fn and ctx must stay valid until then. Between begin() and finish() the helper takes no other batch.
  void finish(int64_t n, RowFn fn, void* ctx, bool begun);
  /// Stops and joins the thread (idempotent); run() then writes every row on the calling thread.
  void stop();
  /// Whether this process started the thread (a forked child must leak the helper, not destroy it).
  bool owned_here() const;
  /// Rows the helper thread has written so far.
  int64_t rows_written() const { return rows_written_.load(std::memory_order_relaxed); }

 private:
  void work();
  void wait_for_batch(uint32_t seen);  // until a batch newer than `seen`, or stop
  void leave_the_callers_core();       // on the core run() was last called on: move off it (Linux)

  // (generation << 32) | (front << 16) | back: rows [front, back) are not taken yet.
  std::atomic<uint64_t> claim_{0};
  std::atomic<int64_t> done_{0};  // rows of the current batch written
  std::atomic<bool> busy_{false};
  std::atomic<bool> sleeping_{false};
  std::atomic<bool> stop_{false};
  std::atomic<int64_t> rows_written_{0};
  std::atomic<int> caller_cpu_{-1};  // the core of the newest run(), where known
  RowFn fn_ = nullptr;  // the current batch's, written before its generation is published
  void* ctx_ = nullptr;
  uint32_t generation_ = 0;
  pid_t owner_;
#ifdef __linux__
  cpu_set_t process_cpus_;  // the cores the creating thread could use
#endif
  std::mutex mu_;
  std::condition_variable cv_;
  std::thread thread_;
};

}  // namespace stoker
