// Packed batches built ahead of the consumer on native threads, delivered in order.
#pragma once

#include <sys/types.h>

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "stoker/packing/materialize.h"

namespace stoker {

/// The settings every batch of one epoch is materialised with.
struct PackBatchSpec {
  int64_t batch_size = 1;
  int64_t pad_id = 0;
  bool doc_ids = false;
  bool shift_labels = false;
};

/// Runs `num_threads` threads that materialise batches `start_batch, start_batch + 1, ...` of `rows` (batch b
/// is rows [b * batch_size, (b + 1) * batch_size), the last one shorter) up to `depth` ahead of the consumer.
/// next() hands them over in order; a batch that failed re-throws its error at its place, later ones still
/// come. The caller keeps the token memory of `source` alive until the pipeline is destroyed; the destructor
/// stops and joins the threads (blocks already handed over stay valid).
///
/// The consumer first waits by polling (yielding the core to any other runnable thread) and only then on a
/// condition variable: a batch takes ~15 us to build, and waking a sleeping thread costs that much again on
/// virtual machines, so a consumer faster than the builders would otherwise pay a wake-up per batch.
class PackPipeline {
 public:
  PackPipeline(std::shared_ptr<const PackPlan> plan, const TokenSource& source, std::vector<int64_t> rows,
               PackBatchSpec spec, int64_t start_batch, int64_t num_batches, std::shared_ptr<BufferPool> pool,
               int num_threads, int depth);
  ~PackPipeline();
  PackPipeline(const PackPipeline&) = delete;
  PackPipeline& operator=(const PackPipeline&) = delete;

  /// Blocks until the next batch is built; false once every batch has been handed over, or after stop().
  bool next(PackedBatch* out);
  /// Batches handed over so far.
  int64_t delivered() const;
  /// Stops the threads and joins them (idempotent).
  void stop();
  /// Whether this process started the threads. A forked child must leak the pipeline, not destroy it: the
  /// threads are not there to join, and its copies of their mutex and condition variables may be taken.
  bool owned_here() const;

 private:
  struct Slot {
    std::atomic<int64_t> ready{-1};  // the batch (counted from start_batch) the slot holds, once built
    PackedBatch batch;
    std::exception_ptr error;
  };

  void work();
  bool slot_ready(int64_t seq) const;

  std::shared_ptr<const PackPlan> plan_;
  TokenSource source_;
  std::vector<int64_t> rows_;
  PackBatchSpec spec_;
  int64_t start_batch_;
  int64_t num_batches_;  // batches of the whole epoch, from batch 0
  std::shared_ptr<BufferPool> pool_;
  std::vector<Slot> slots_;  // batch seq lives in slots_[seq % depth]
  pid_t owner_;              // the process that started the threads

  mutable std::mutex mu_;
  std::condition_variable work_cv_;  // builders: a slot was freed, or stop
  std::condition_variable done_cv_;  // consumer: a batch was built, or stop
  int64_t next_seq_ = 0;             // next batch a builder claims
  std::atomic<int64_t> consumed_{0};  // batches handed over
  std::atomic<bool> stop_{false};
  std::vector<std::thread> threads_;
};

}  // namespace stoker
