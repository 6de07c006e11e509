// The array pipeline: index stream -> gather into a pooled block, on native threads, delivered in order.
#pragma once

#include <sys/types.h>

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <exception>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <thread>
#include <vector>

#include "stoker/pool/buffer_pool.h"
#include "stoker/sampler/index_stream.h"
#include "stoker/source/array_source.h"

namespace stoker {

/// One batch as the pipeline delivers it: a block holding every column (at `offsets`), or an error.
struct GatheredBatch {
  int64_t seq = 0;
  int64_t rows = 0;
  std::shared_ptr<Block> block;
  std::vector<size_t> offsets;
  std::exception_ptr error;
};

/// Runs `num_threads` threads that gather batches ahead of the consumer, at most `depth` beyond the last
/// one taken. Batches come either from a native IndexStream (from batch `start_batch` on) or, when none is
/// given, from index lists the caller submits. Delivery follows the stream order whatever the thread count.
/// An error in a batch is re-thrown by next() at that batch's place; the batches after it still come.
/// The destructor stops and joins the threads; blocks already delivered stay valid.
class ArrayPipeline {
 public:
  ArrayPipeline(std::shared_ptr<const ArraySource> source, std::shared_ptr<BufferPool> pool,
                std::optional<IndexStream> stream, int64_t start_batch, int num_threads, int depth);
  ~ArrayPipeline();
  ArrayPipeline(const ArrayPipeline&) = delete;
  ArrayPipeline& operator=(const ArrayPipeline&) = delete;

  /// Queues one batch of indices (only without a native stream).
  void submit(std::vector<int64_t> indices);
  /// Says no more batches will be submitted.
  void close_submissions();
  /// Blocks until the next batch in order is ready; false once every batch has been delivered.
  bool next(GatheredBatch* out);
  /// Number of batches delivered so far.
  int64_t delivered() const;
  /// Stops the threads and joins them (idempotent; nothing to do in a forked child).
  void stop();
  /// Whether this process started the threads. A forked child must leak the pipeline, not destroy it: the
  /// threads are not there to join, and its copies of their mutex and condition variables may be taken.
  bool owned_here() const;

 private:
  void work();
  bool has_task() const;     // under mu_
  bool all_claimed() const;  // under mu_

  std::shared_ptr<const ArraySource> source_;
  std::shared_ptr<BufferPool> pool_;
  std::optional<IndexStream> stream_;
  int64_t start_batch_;
  int64_t depth_;
  pid_t owner_;  // the process that started the threads

  mutable std::mutex mu_;
  std::condition_variable work_cv_;
  std::condition_variable done_cv_;
  int64_t next_seq_ = 0;   // next batch a thread claims
  int64_t consumed_ = 0;   // batches delivered
  int64_t submitted_ = 0;
  bool closed_ = false;
  bool stop_ = false;
  std::deque<std::vector<int64_t>> queue_;
  std::map<int64_t, GatheredBatch> ready_;
  std::vector<std::thread> threads_;
};

}  // namespace stoker
