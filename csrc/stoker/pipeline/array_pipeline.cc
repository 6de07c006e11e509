#include "stoker/pipeline/array_pipeline.h"

#include <unistd.h>

#include <algorithm>

#include "stoker/common/check.h"

namespace stoker {

ArrayPipeline::ArrayPipeline(std::shared_ptr<const ArraySource> source, std::shared_ptr<BufferPool> pool,
                             std::optional<IndexStream> stream, int64_t start_batch, int num_threads,
                             int depth)
    : source_(std::move(source)),
      pool_(std::move(pool)),
      stream_(std::move(stream)),
      start_batch_(start_batch),
      depth_(std::max(1, depth)),
      owner_(getpid()) {
  STOKER_CHECK_AS(ValueError, !stream_ || (start_batch >= 0 && start_batch <= stream_->num_batches()),
                  "start batch ", start_batch, " out of range [0, ", stream_ ? stream_->num_batches() : 0,
                  "]");
  const int n = std::max(1, num_threads);
  num_threads_ = n;
  threads_.reserve(n);
  for (int i = 0; i < n; ++i) threads_.emplace_back([this] { work(); });
}

ArrayPipeline::~ArrayPipeline() { stop(); }

bool ArrayPipeline::owned_here() const { return getpid() == owner_; }

void ArrayPipeline::stop() {
  if (!owned_here()) return;  // a forked child: there are no threads to stop
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  work_cv_.notify_all();
  done_cv_.notify_all();
  for (std::thread& t : threads_)
    if (t.joinable()) t.join();
  threads_.clear();
}

bool ArrayPipeline::has_task() const {
  if (stream_) return start_batch_ + next_seq_ < stream_->num_batches();
  return !queue_.empty();
}

bool ArrayPipeline::all_claimed() const {
  if (stream_) return start_batch_ + next_seq_ >= stream_->num_batches();
  return closed_ && queue_.empty();
}

void ArrayPipeline::submit(std::vector<int64_t> indices, int64_t number) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    STOKER_CHECK(!stream_ && !closed_, "submit() on a pipeline that takes no more batches");
    queue_.emplace_back(std::move(indices), number);
    ++submitted_;
  }
  work_cv_.notify_one();
}

void ArrayPipeline::close_submissions() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    closed_ = true;
  }
  work_cv_.notify_all();
}

void ArrayPipeline::deliver(GatheredBatch out) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    ready_.emplace(out.seq, std::move(out));
  }
  done_cv_.notify_all();
}

void ArrayPipeline::gather_parts(const std::shared_ptr<Split>& split) {
  for (;;) {
    int64_t part;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (split->next_part >= split->parts) return;
      part = split->next_part++;
      if (split->next_part == split->parts) {
        auto it = std::find(splits_.begin(), splits_.end(), split);
        if (it != splits_.end()) splits_.erase(it);
      }
    }
    // Rows whose indices were checked: copying them cannot fail.
    const int64_t begin = part * split->part_rows;
    const int64_t end = std::min(split->out.rows, begin + split->part_rows);
    source_->gather_part(split->indices.data(), begin, end, static_cast<uint8_t*>(split->out.block->data),
                         split->out.offsets);
    bool last;
    {
      std::lock_guard<std::mutex> lock(mu_);
      last = --split->unfinished == 0;
    }
    if (last) deliver(std::move(split->out));
  }
}

void ArrayPipeline::work() {
  std::vector<int64_t> indices;
  for (;;) {
    GatheredBatch out;
    int64_t number = 0;  // the batch's number in its epoch, for its errors
    std::shared_ptr<Split> help;
    {
      std::unique_lock<std::mutex> lock(mu_);
      work_cv_.wait(lock, [this] {
        return stop_ || !splits_.empty() || (all_claimed() && in_setup_ == 0) ||
               (has_task() && next_seq_ < consumed_ + depth_);
      });
      if (stop_) return;
      if (!splits_.empty()) {
        help = splits_.front();
      } else {
        if (!has_task()) return;
        ++in_setup_;
        out.seq = next_seq_++;
        number = start_batch_ + out.seq;
        if (!stream_) {
          indices = std::move(queue_.front().first);
          number = queue_.front().second;
          queue_.pop_front();
        }
      }
    }
    if (help) {
      gather_parts(help);
      continue;
    }
    std::shared_ptr<Split> split;
    try {
      if (stream_) {
        const int64_t b = start_batch_ + out.seq;
        indices.resize(static_cast<size_t>(stream_->batch_len(b)));
        stream_->batch_indices(b, indices.data());
      }
      out.rows = static_cast<int64_t>(indices.size());
      const size_t bytes = source_->batch_layout(out.rows, &out.offsets);
      const int64_t parts = std::min<int64_t>({num_threads_, static_cast<int64_t>(bytes / kPartBytes), out.rows});
      if (bytes >= kSplitBytes && parts > 1) {
        source_->normalize(indices.data(), out.rows);  // every index checked before any row is written
        out.block = pool_->acquire(bytes);
        split = std::make_shared<Split>();
        split->part_rows = (out.rows + parts - 1) / parts;
        split->parts = (out.rows + split->part_rows - 1) / split->part_rows;
        split->unfinished = split->parts;
        split->indices = std::move(indices);
        indices.clear();
        split->out = std::move(out);
      } else {
        out.block = pool_->acquire(bytes);
        source_->gather(indices.data(), out.rows, static_cast<uint8_t*>(out.block->data), out.offsets);
      }
    } catch (const IndexError& e) {
      out.block.reset();
      out.error = std::make_exception_ptr(
          IndexError(detail::concat(e.what(), " (in batch ", number, ")")));
    } catch (...) {
      out.block.reset();
      out.error = std::current_exception();
    }
    bool ending;
    {
      std::lock_guard<std::mutex> lock(mu_);
      --in_setup_;
      if (split) splits_.push_back(split);
      ending = all_claimed() && in_setup_ == 0;
    }
    if (split || ending) work_cv_.notify_all();  // idle threads take parts beside this one, or end
    if (split) {
      gather_parts(split);
      continue;
    }
    deliver(std::move(out));
  }
}

bool ArrayPipeline::next(GatheredBatch* out) {
  std::unique_lock<std::mutex> lock(mu_);
  for (;;) {
    auto it = ready_.find(consumed_);
    if (it != ready_.end()) {
      *out = std::move(it->second);
      ready_.erase(it);
      ++consumed_;
      lock.unlock();
      work_cv_.notify_all();
      if (out->error) std::rethrow_exception(out->error);
      return true;
    }
    if (stop_) return false;
    if (stream_ && start_batch_ + consumed_ >= stream_->num_batches()) return false;
    if (!stream_ && consumed_ >= submitted_) {
      if (closed_) return false;
      STOKER_CHECK(false, "next() with no batch submitted");
    }
    done_cv_.wait(lock);
  }
}

int64_t ArrayPipeline::delivered() const {
  std::lock_guard<std::mutex> lock(mu_);
  return consumed_;
}

}  // namespace stoker
