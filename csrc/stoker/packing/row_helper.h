// A second thread that writes rows of the batch the calling thread is building, from the other end.
#pragma once

#include <sys/types.h>

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <thread>

namespace stoker {

/// One helper thread for batches built on demand. run(n, fn, ctx) calls fn for rows 0..n-1: the caller takes
/// rows from the front, the helper from the back, and run returns once every row is written. Each core thus
/// writes about the same half of a reused block batch after batch (it stays in that core's cache; rows taken
/// alternately made the lines move between cores and were slower than one thread).
///
/// After a batch the helper polls for the next one for a short while (a batch is asked for every ~15 us in a
/// tight loop, and waking a sleeping thread costs about that much on virtual machines), then sleeps; a batch
/// that finds it asleep wakes it and starts alone. Another run() at the same time (a second thread building
/// with the same helper), a batch of more than 65535 rows, or a forked child (where the thread is not there)
/// write every row on the calling thread.
class RowHelper {
 public:
  using RowFn = void (*)(void* ctx, int64_t row, bool first_of_thread, bool from_back);

  RowHelper();
  ~RowHelper();
  RowHelper(const RowHelper&) = delete;
  RowHelper& operator=(const RowHelper&) = delete;

  void run(int64_t n, RowFn fn, void* ctx);
  /// Stops and joins the thread (idempotent); run() then writes every row on the calling thread.
  void stop();
  /// Whether this process started the thread (a forked child must leak the helper, not destroy it).
  bool owned_here() const;

 private:
  void work();

  // (generation << 32) | (front << 16) | back: rows [front, back) are not taken yet.
  std::atomic<uint64_t> claim_{0};
  std::atomic<int64_t> done_{0};  // rows of the current batch written
  std::atomic<bool> busy_{false};
  std::atomic<bool> sleeping_{false};
  std::atomic<bool> stop_{false};
  RowFn fn_ = nullptr;  // the current batch's, written before its generation is published
  void* ctx_ = nullptr;
  uint32_t generation_ = 0;
  pid_t owner_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::thread thread_;
};

}  // namespace stoker
