// A caching CPU allocator for large blocks: torch's CPU tensors of min_block_bytes or more are served from
// blocks freed earlier instead of fresh memory. Opt-in: convret.enable_cpu_caching_allocator().
//
// Why: glibc either keeps activation-sized blocks in its heap, where a training step's forward / backward
// orders fragment it (up to 0.9 GB of holes in the CSIT benchmark), or maps them fresh on every allocation,
// where every page is faulted and zero-filled again. A training step allocates the same few sizes again and
// again, so reusing freed blocks avoids both.
//
// Policy:
//   * sizes are rounded up to classes of 8 per power of two (at most 12.5 % slack);
//   * a request takes the most recently freed block (warm in cache and TLB) of its own size class or of the
//     next one (a block at most 1/8 larger than the request's class), never a larger one: lending a block
//     twice the request's size would let the mapped memory grow to twice the live bytes;
//   * on a miss the least recently freed cached blocks are unmapped first, until as many bytes as the
//     request went back or no more than slack_bytes stay cached, and only then is a new block mapped.
//   Bound: a miss either maps no more than it unmapped, or leaves at most slack_bytes cached, so the mapped
//   bytes never exceed the peak of the live blocks' bytes + slack_bytes. A live block is at most 9/8 of its
//   request's class, and a class at most 9/8 of the request (for requests of 32 KiB or more; below that
//   classes are whole pages), so: peak mapped <= (81/64) * peak of the requested live bytes + slack_bytes.
//   * blocks come straight from mmap and go back with munmap, never through malloc.
// Smaller requests go to the allocator that was installed before (torch's default).
#include <sys/mman.h>

#include <atomic>
#include <cstdint>
#include <list>
#include <map>
#include <mutex>
#include <unordered_map>
#include <vector>

#include <pthread.h>
#include <torch/library.h>

#include <c10/core/CPUAllocator.h>

namespace convret {
namespace {

constexpr size_t kPage = 4096;

size_t size_class(size_t bytes) {
  // 8 classes per power of two: step = 2^(floor(log2(bytes)) - 3), at least one page
  const int log2_floor = 63 - __builtin_clzll(static_cast<unsigned long long>(bytes));
  const size_t step = std::max<size_t>(kPage, size_t(1) << std::max(0, log2_floor - 3));
  return (bytes + step - 1) / step * step;
}

class CachingCPUAllocator final : public c10::Allocator {
 public:
  static CachingCPUAllocator& instance() {
    static auto* allocator = new CachingCPUAllocator();  // never destroyed: tensors may outlive static teardown
    return *allocator;
  }

  // Installs this allocator as torch's CPU allocator (idempotent). Returns false if it was already active.
  bool enable(int64_t min_block_bytes, int64_t slack_bytes) {
    std::lock_guard<std::mutex> guard(mutex_);
    min_block_bytes_ = static_cast<size_t>(std::max<int64_t>(min_block_bytes, kPage));
    slack_bytes_ = static_cast<size_t>(std::max<int64_t>(slack_bytes, 0));
    if (active_) return false;
    fallback_ = c10::GetCPUAllocator();
    TORCH_CHECK(fallback_ != this, "convret caching CPU allocator: installed while marked inactive");
    c10::SetCPUAllocator(this, kPriority);
    TORCH_CHECK(c10::GetCPUAllocator() == this, "convret caching CPU allocator: torch kept its CPU allocator");
    active_ = true;
    return true;
  }

  // Puts the previous allocator back; live blocks stay valid and are unmapped when freed.
  void disable() {
    std::lock_guard<std::mutex> guard(mutex_);
    if (!active_) return;
    active_ = false;
    c10::SetCPUAllocator(fallback_, kPriority);
    TORCH_CHECK(c10::GetCPUAllocator() == fallback_, "convret caching CPU allocator: could not restore torch's");
    release_locked(SIZE_MAX);
  }

  // Unmaps every cached block and restarts the peak from what is mapped now.
  int64_t empty_cache() {
    std::lock_guard<std::mutex> guard(mutex_);
    const size_t released = release_locked(SIZE_MAX);
    peak_mapped_bytes_ = mapped_bytes_;
    return static_cast<int64_t>(released);
  }

  std::vector<int64_t> stats() {
    std::lock_guard<std::mutex> guard(mutex_);
    return {static_cast<int64_t>(live_bytes_), static_cast<int64_t>(cached_bytes_),
            static_cast<int64_t>(peak_mapped_bytes_), hits_, misses_, static_cast<int64_t>(released_bytes_),
            active_ ? 1 : 0};
  }

  c10::DataPtr allocate(size_t nbytes) override {
    if (nbytes < min_block_bytes_.load(std::memory_order_relaxed) || !active_) {
      return fallback_->allocate(nbytes);
    }
    const size_t bytes = size_class(nbytes);
    void* data = nullptr;
    {
      std::lock_guard<std::mutex> guard(mutex_);
      // best fit: the request's class, else the next one up (at most bytes / 8 larger; see the bound above)
      size_t block_bytes = bytes;
      const size_t largest_lent = bytes + bytes / 8;
      for (auto it = free_by_class_.lower_bound(bytes); it != free_by_class_.end() && it->first <= largest_lent;
           ++it) {
        if (it->second.empty()) continue;
        auto block = it->second.back();  // most recently freed
        it->second.pop_back();
        data = block->data;
        block_bytes = block->bytes;
        lru_.erase(block);
        cached_bytes_ -= block_bytes;
        ++hits_;
        break;
      }
      if (data == nullptr) {
        ++misses_;
        release_locked(bytes, slack_bytes_);
        data = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        TORCH_CHECK(data != MAP_FAILED, "convret caching CPU allocator: out of memory mapping ", bytes, " bytes");
        mapped_bytes_ += bytes;
        peak_mapped_bytes_ = std::max(peak_mapped_bytes_, mapped_bytes_);
      }
      block_size_[data] = block_bytes;
      live_bytes_ += block_bytes;
    }
    return {data, data, &CachingCPUAllocator::deleter, c10::Device(c10::DeviceType::CPU)};
  }

  // raw_allocate / raw_deallocate: one deleter for both kinds of block (it hands small ones to the fallback)
  c10::DeleterFnPtr raw_deleter() const override { return &CachingCPUAllocator::deleter; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  // pthread_atfork: a fork in another thread must not leave the child with the mutex held
  static void lock_for_fork() { instance().mutex_.lock(); }
  static void unlock_after_fork() { instance().mutex_.unlock(); }

 private:
  struct Block {
    void* data;
    size_t bytes;
  };
  using BlockList = std::list<Block>;

  CachingCPUAllocator() { pthread_atfork(&lock_for_fork, &unlock_after_fork, &unlock_after_fork); }

  static void deleter(void* data) { instance().free_block(data); }

  void free_block(void* data) {
    std::unique_lock<std::mutex> guard(mutex_);
    auto found = block_size_.find(data);
    if (found == block_size_.end()) {  // a small block from raw_allocate: the fallback allocated it
      guard.unlock();
      c10::DeleterFnPtr fallback_deleter = fallback_->raw_deleter();
      TORCH_INTERNAL_ASSERT(fallback_deleter != nullptr, "convret caching CPU allocator: foreign block");
      fallback_deleter(data);
      return;
    }
    const size_t bytes = found->second;
    block_size_.erase(found);
    live_bytes_ -= bytes;
    if (!active_) {
      munmap(data, bytes);
      mapped_bytes_ -= bytes;
      return;
    }
    lru_.push_back({data, bytes});
    free_by_class_[bytes].push_back(std::prev(lru_.end()));
    cached_bytes_ += bytes;
  }

  // Unmaps the least recently freed cached blocks until at least `wanted` bytes went back, or no more than
  // `keep` bytes stay cached.
  size_t release_locked(size_t wanted, size_t keep = 0) {
    size_t released = 0;
    while (released < wanted && cached_bytes_ > keep && !lru_.empty()) {
      const Block block = lru_.front();
      auto& same_class = free_by_class_[block.bytes];
      // the oldest block of a class sits at the front of its vector (blocks are pushed in free order)
      same_class.erase(same_class.begin());
      lru_.pop_front();
      munmap(block.data, block.bytes);
      cached_bytes_ -= block.bytes;
      mapped_bytes_ -= block.bytes;
      released += block.bytes;
    }
    released_bytes_ += released;
    return released;
  }

  std::mutex mutex_;
  c10::Allocator* fallback_ = nullptr;
  std::atomic<size_t> min_block_bytes_{size_t(1) << 20};
  std::atomic<bool> active_{false};
  size_t slack_bytes_ = 0;  // cached bytes a miss may leave in place (above the live peak)
  // c10 keeps an allocator only if its priority is >= the installed one's and offers no getter: enable and
  // disable both use the highest priority, so any number of cycles works (a counter wraps after 255).
  static constexpr uint8_t kPriority = 255;
  BlockList lru_;                                                 // cached blocks, least recently freed first
  std::map<size_t, std::vector<BlockList::iterator>> free_by_class_;  // ordered: best fit upwards
  std::unordered_map<void*, size_t> block_size_;                  // live blocks
  size_t live_bytes_ = 0, cached_bytes_ = 0, mapped_bytes_ = 0, peak_mapped_bytes_ = 0, released_bytes_ = 0;
  int64_t hits_ = 0, misses_ = 0;
};

bool caching_allocator_enable(int64_t min_block_bytes, int64_t slack_bytes) {
  return CachingCPUAllocator::instance().enable(min_block_bytes, slack_bytes);
}
void caching_allocator_disable() { CachingCPUAllocator::instance().disable(); }
int64_t caching_allocator_empty_cache() { return CachingCPUAllocator::instance().empty_cache(); }
std::vector<int64_t> caching_allocator_stats() { return CachingCPUAllocator::instance().stats(); }

}  // namespace
}  // namespace convret

TORCH_LIBRARY_FRAGMENT(convret_cpu, m) {
  m.def("caching_allocator_enable(int min_block_bytes, int slack_bytes) -> bool", &convret::caching_allocator_enable);
  m.def("caching_allocator_disable() -> ()", &convret::caching_allocator_disable);
  m.def("caching_allocator_empty_cache() -> int", &convret::caching_allocator_empty_cache);
  m.def("caching_allocator_stats() -> int[]", &convret::caching_allocator_stats);
}
