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
#include <utility>
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
/// A batch of at least kSplitBytes is cut into parts (rows ranges of at least kPartBytes, one per thread at
/// most) that idle threads gather beside the one that took it: large batches, which the depth bound keeps
/// few in flight, still use every thread.
/// An error in a batch is re-thrown by next() at that batch's place; the batches after it still come.
/// The destructor stops and joins the threads; blocks already delivered stay valid.
class ArrayPipeline {
 public:
  static constexpr size_t kSplitBytes = 4u << 20;
  static constexpr size_t kPartBytes = 1u << 20;

  ArrayPipeline(std::shared_ptr<const ArraySource> source, std::shared_ptr<BufferPool> pool,
                std::optional<IndexStream> stream, int64_t start_batch, int num_threads, int depth);
  ~ArrayPipeline();
  ArrayPipeline(const ArrayPipeline&) = delete;
  ArrayPipeline& operator=(const ArrayPipeline&) = delete;

  /// Queues one batch of indices (only without a native stream), batch `number` of its epoch (its errors
  /// name it).
  void submit(std::vector<int64_t> indices, int64_t number);
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
  // A batch being gathered in parts: its rows, layout and block, the parts not yet taken, those not done.
  struct Split {
    GatheredBatch out;
    std::vector<int64_t> indices;  // normalised
    int64_t part_rows = 0;
    int64_t parts = 0;
    int64_t next_part = 0;   // under mu_
    int64_t unfinished = 0;  // under mu_
  };

  void work();
  bool has_task() const;     // under mu_
  bool all_claimed() const;  // under mu_
  // Gathers parts of `split` while any is left untaken; the thread finishing its last part delivers it.
  void gather_parts(const std::shared_ptr<Split>& split);
  void deliver(GatheredBatch out);

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
  std::deque<std::pair<std::vector<int64_t>, int64_t>> queue_;  // submitted: indices, batch number
  std::map<int64_t, GatheredBatch> ready_;
  std::deque<std::shared_ptr<Split>> splits_;  // batches with parts left to take
  int64_t in_setup_ = 0;  // batches taken whose parts are not offered yet (a thread waits for them to help)
  int num_threads_ = 1;
  std::vector<std::thread> threads_;
};

}  // namespace stoker
