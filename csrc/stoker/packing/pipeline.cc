#include "stoker/packing/pipeline.h"

#include <sched.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>

#include "stoker/common/check.h"

namespace stoker {
namespace {

// How long the consumer polls for the next batch before sleeping: a few batches' building time.
constexpr auto kPollFor = std::chrono::microseconds(200);

}  // namespace

PackPipeline::PackPipeline(std::shared_ptr<const PackPlan> plan, const TokenSource& source,
                           std::vector<int64_t> rows, PackBatchSpec spec, int64_t start_batch, int64_t num_batches,
                           std::shared_ptr<BufferPool> pool, int num_threads, int depth)
    : plan_(std::move(plan)),
      source_(source),
      rows_(std::move(rows)),
      spec_(spec),
      start_batch_(start_batch),
      num_batches_(num_batches),
      pool_(std::move(pool)),
      slots_(static_cast<size_t>(std::max(1, depth))),
      owner_(getpid()) {
  STOKER_CHECK_AS(ValueError, spec_.batch_size >= 1, "batch_size must be positive, got ", spec_.batch_size);
  const auto num_rows = static_cast<int64_t>(rows_.size());
  STOKER_CHECK_AS(ValueError, num_batches >= 0 && (num_batches - 1) * spec_.batch_size < std::max<int64_t>(num_rows, 1),
                  num_batches, " batches of ", spec_.batch_size, " rows out of range for ", num_rows, " rows");
  STOKER_CHECK_AS(ValueError, start_batch >= 0 && start_batch <= num_batches, "start batch ", start_batch,
                  " out of range [0, ", num_batches, "]");
  const int n = std::max(1, num_threads);
  threads_.reserve(static_cast<size_t>(n));
  for (int i = 0; i < n; ++i) threads_.emplace_back([this] { work(); });
}

PackPipeline::~PackPipeline() { stop(); }

bool PackPipeline::owned_here() const { return getpid() == owner_; }

void PackPipeline::stop() {
  if (!owned_here()) return;  // a forked child: there are no threads to stop
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_.store(true);
  }
  work_cv_.notify_all();
  done_cv_.notify_all();
  for (std::thread& t : threads_)
    if (t.joinable()) t.join();
  threads_.clear();
}

void PackPipeline::work() {
  const int64_t total = num_batches_ - start_batch_;
  const auto depth = static_cast<int64_t>(slots_.size());
  for (;;) {
    int64_t seq;
    {
      std::unique_lock<std::mutex> lock(mu_);
      work_cv_.wait(lock,
                    [&] { return stop_.load() || next_seq_ >= total || next_seq_ < consumed_.load() + depth; });
      if (stop_.load() || next_seq_ >= total) return;
      seq = next_seq_++;
    }
    Slot& slot = slots_[static_cast<size_t>(seq % depth)];
    const int64_t b = start_batch_ + seq;
    const int64_t first = b * spec_.batch_size;
    const int64_t count = std::min<int64_t>(spec_.batch_size, static_cast<int64_t>(rows_.size()) - first);
    try {
      slot.batch = materialize(*plan_, source_, rows_.data() + first, count, spec_.pad_id, spec_.doc_ids,
                               spec_.shift_labels, *pool_);
      slot.error = nullptr;
    } catch (...) {
      slot.batch = PackedBatch{};
      slot.error = std::current_exception();
    }
    slot.ready.store(seq, std::memory_order_release);
    {
      std::lock_guard<std::mutex> lock(mu_);  // orders the store before a sleeping consumer's check
    }
    done_cv_.notify_one();
  }
}

bool PackPipeline::slot_ready(int64_t seq) const {
  return slots_[static_cast<size_t>(seq % static_cast<int64_t>(slots_.size()))].ready.load(
             std::memory_order_acquire) == seq;
}

bool PackPipeline::next(PackedBatch* out) {
  STOKER_CHECK(owned_here(), "a packing pipeline cannot be used in a forked child process");
  const int64_t seq = consumed_.load();
  if (seq >= num_batches_ - start_batch_ || stop_.load()) return false;
  if (!slot_ready(seq)) {
    const auto until = std::chrono::steady_clock::now() + kPollFor;
    do {
      sched_yield();
    } while (!slot_ready(seq) && !stop_.load() && std::chrono::steady_clock::now() < until);
    if (!slot_ready(seq)) {
      std::unique_lock<std::mutex> lock(mu_);
      done_cv_.wait(lock, [&] { return stop_.load() || slot_ready(seq); });
      if (!slot_ready(seq)) return false;
    }
  }
  Slot& slot = slots_[static_cast<size_t>(seq % static_cast<int64_t>(slots_.size()))];
  std::exception_ptr error = std::move(slot.error);
  *out = std::move(slot.batch);
  slot.batch = PackedBatch{};
  slot.error = nullptr;
  slot.ready.store(-1, std::memory_order_relaxed);
  {
    std::lock_guard<std::mutex> lock(mu_);
    consumed_.store(seq + 1);
  }
  work_cv_.notify_one();
  if (error) std::rethrow_exception(error);
  return true;
}

int64_t PackPipeline::delivered() const { return consumed_.load(); }

}  // namespace stoker
