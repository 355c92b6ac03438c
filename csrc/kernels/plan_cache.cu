// LRU cache of cuFFT plans. Building a plan costs far more than running it (milliseconds), so a
// stream of same-shaped calls must reuse plans.
//
// Why this is correct with many host threads and with CUDA-graph capture:
// - Exclusive use. cuFFT lets one host thread at a time use a plan, and each use here is a
//   sequence (cufftSetStream, cufftSetWorkArea, cufftExec*) that must not interleave with another
//   thread's. A plan is reachable only through a PlanLease, which holds its entry's `in_use`
//   mutex from before the sequence until after the last kernel of the op call is enqueued. Two
//   threads with the same shape take turns on the host (the GPU work stays asynchronous); two
//   shapes never wait on each other.
// - No deadlock. The cache mutex guards the map, the LRU order, the pinned flags and the retired
//   list, and is never held while waiting for an entry's mutex: lease_plans copies the entry's
//   shared_ptr under the cache mutex, releases it, then locks the entry. An op holds one lease.
// - Lifetime. The cache and every lease hold a shared_ptr to the entry; evicting drops only the
//   cache's, so a plan in use by another thread is destroyed when that thread's lease ends.
// - CUDA graphs. A graph captured with a plan keeps pointers into the plan's own device memory
//   (twiddle tables), so that plan must outlive the graph, and no plan may be made or destroyed
//   on a capturing stream (cudaMalloc/cudaFree there invalidate the capture). A miss on a
//   capturing stream throws before any CUDA call; a hit pins the entry in the same critical
//   section as the lookup, and pinned entries are never evicted (kept until exit; they do not
//   count against the capacity). Evicted entries go to a retired list that only a call from a
//   non-capturing stream empties, so a thread that is capturing never destroys a plan: nor can it
//   drop the last reference of a leased one, since the entries it leases are pinned.
// - Work areas are not the cache's business: plans are made with cufftSetAutoAllocation(0) and
//   each use binds memory the caller allocated on its stream (torch's caching allocator in
//   ops.cpp, which hands out graph-private memory during capture).
#include "plan_cache.h"

#include <list>
#include <map>
#include <sstream>
#include <stdexcept>
#include <utility>
#include <vector>

#include "cuda_check.h"
#include "spectral.h"

namespace fc_edge {

namespace {

// Plan creation and destruction call cudaMalloc / cudaFree. In relaxed capture mode those calls
// are allowed from this thread while another thread captures a graph in global mode (torch's
// default), as torch's caching allocator does for its own cudaMalloc; the calling thread's own
// stream is never capturing here (see above).
class RelaxedCaptureMode {
 public:
  RelaxedCaptureMode() : ok_(cudaThreadExchangeStreamCaptureMode(&mode_) == cudaSuccess) {}
  ~RelaxedCaptureMode() {
    if (ok_) cudaThreadExchangeStreamCaptureMode(&mode_);
  }
  RelaxedCaptureMode(const RelaxedCaptureMode&) = delete;
  RelaxedCaptureMode& operator=(const RelaxedCaptureMode&) = delete;

 private:
  cudaStreamCaptureMode mode_ = cudaStreamCaptureModeRelaxed;
  bool ok_;
};

}  // namespace

SpectralPlans::~SpectralPlans() {
  // No throwing from a destructor: errors here mean the context is already gone.
  int current = -1;
  const bool switched = cudaGetDevice(&current) == cudaSuccess && current != device &&
                        cudaSetDevice(device) == cudaSuccess;
  {
    const RelaxedCaptureMode relaxed;
    if (has_d) cufftDestroy(along_d);
    if (has_s) cufftDestroy(along_s);
  }
  if (switched) cudaSetDevice(current);
}

PlanLease::PlanLease(std::shared_ptr<PlanEntry> entry)
    : entry_(std::move(entry)), lock_(entry_->in_use) {}

namespace {

// Owns a handle until it is handed over, so a failing cufftMakePlanMany64 does not leak it.
struct HandleGuard {
  cufftHandle handle = 0;
  bool live = false;
  ~HandleGuard() {
    if (live) cufftDestroy(handle);
  }
};

const char* op_name(SpectralOp op) {
  return op == SpectralOp::Compress ? "spectral_compress" : "spectral_decompress";
}

const char* dtype_name(InputDType t) {
  switch (t) {
    case InputDType::Float32: return "float32";
    case InputDType::Float16: return "float16";
    case InputDType::BFloat16: return "bfloat16";
  }
  return "?";
}

[[noreturn]] void throw_miss_during_capture(const PlanKey& key, std::size_t capacity) {
  std::ostringstream msg;
  msg << "fc_edge::" << op_name(key.op) << ": no cached cuFFT plan for B=" << key.B
      << ", S=" << key.S << ", D=" << key.D << ", k_d=" << key.k_d << ", "
      << dtype_name(key.dtype) << " on cuda:" << key.device
      << ", and plans cannot be made while the stream is capturing a CUDA graph. Warm up: run "
         "the op once with the same shapes and dtype before capture";
  if (capacity == 0) {
    msg << " (the plan cache capacity is 0: raise it with "
           "torch.ops.fc_edge.set_plan_cache_capacity)";
  } else {
    msg << ", warming up at most " << capacity
        << " shapes (the plan cache capacity; torch.ops.fc_edge.set_plan_cache_capacity)";
  }
  throw std::runtime_error(msg.str());
}

class PlanCache {
 public:
  PlanLease lease(const PlanKey& key, cudaStream_t stream,
                  const std::function<void(SpectralPlans&)>& build) {
    const bool capturing = stream_is_capturing(stream);
    std::vector<std::shared_ptr<PlanEntry>> dropped;  // released after the cache lock
    std::shared_ptr<PlanEntry> entry;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto found = index_.find(key);
      if (found != index_.end()) {
        entries_.splice(entries_.begin(), entries_, found->second);  // most recent first
        entry = *found->second;
        if (capturing && !entry->pinned) {
          entry->pinned = true;
          ++pinned_;
        }
      } else {
        if (capturing) throw_miss_during_capture(key, capacity_);
        entry = std::make_shared<PlanEntry>();
        entry->key = key;
        entry->plans.device = key.device;
        {
          // Under the cache lock: other threads' lookups wait for this once-per-shape build,
          // and two threads missing on one shape build it once.
          const RelaxedCaptureMode relaxed;
          build(entry->plans);  // throws on failure; nothing cached then
        }
        if (capacity_ > 0) {
          entries_.push_front(entry);
          index_[key] = entries_.begin();
          trim();
        }
      }
      if (!capturing) dropped.swap(retired_);
    }
    dropped.clear();  // destroys retired plans no lease holds, before waiting for the entry
    return PlanLease(std::move(entry));  // blocks while another thread holds the entry
  }

  void set_capacity(std::size_t capacity, cudaStream_t stream) {
    std::vector<std::shared_ptr<PlanEntry>> dropped;
    const bool capturing = stream_is_capturing(stream);
    std::lock_guard<std::mutex> lock(mutex_);
    capacity_ = capacity;
    trim();
    if (!capturing) dropped.swap(retired_);
  }

  void clear(cudaStream_t stream) {
    std::vector<std::shared_ptr<PlanEntry>> dropped;
    const bool capturing = stream_is_capturing(stream);
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto it = entries_.begin(); it != entries_.end();) {
      if ((*it)->pinned) {
        ++it;
      } else {
        index_.erase((*it)->key);
        retired_.push_back(*it);
        it = entries_.erase(it);
      }
    }
    if (!capturing) dropped.swap(retired_);
  }

  std::size_t capacity() {
    std::lock_guard<std::mutex> lock(mutex_);
    return capacity_;
  }
  std::size_t size() {
    std::lock_guard<std::mutex> lock(mutex_);
    return entries_.size() - pinned_;
  }
  std::size_t pinned() {
    std::lock_guard<std::mutex> lock(mutex_);
    return pinned_;
  }

 private:
  // Evicts least recently used unpinned entries beyond the capacity into retired_ (destroyed by
  // a later call outside capture, or by the last lease holder). Cache lock held.
  void trim() {
    std::size_t unpinned = entries_.size() - pinned_;
    for (auto it = entries_.end(); unpinned > capacity_ && it != entries_.begin();) {
      --it;
      if ((*it)->pinned) continue;
      index_.erase((*it)->key);
      retired_.push_back(*it);
      it = entries_.erase(it);
      --unpinned;
    }
  }

  std::mutex mutex_;
  std::size_t capacity_ = 16;
  std::size_t pinned_ = 0;
  std::list<std::shared_ptr<PlanEntry>> entries_;  // most recently used first
  std::map<PlanKey, std::list<std::shared_ptr<PlanEntry>>::iterator> index_;
  std::vector<std::shared_ptr<PlanEntry>> retired_;
};

PlanCache& cache() {
  static PlanCache* instance = new PlanCache();  // never destroyed: no cuFFT calls at exit
  return *instance;
}

}  // namespace

bool stream_is_capturing(cudaStream_t stream) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  const cudaError_t err = cudaStreamIsCapturing(stream, &status);
  if (err != cudaSuccess) {
    cudaGetLastError();  // not sticky: clear it so a later launch check does not report it
    FC_CUDA_CHECK(err);
  }
  return status != cudaStreamCaptureStatusNone;
}

cufftHandle make_plan(const FftLayout& l, cufftType type, std::size_t* work_bytes) {
  HandleGuard guard;
  FC_CUFFT_CHECK(cufftCreate(&guard.handle));
  guard.live = true;
  // Before planning: cuFFT then allocates no work area; each use binds one (cufftSetWorkArea).
  FC_CUFFT_CHECK(cufftSetAutoAllocation(guard.handle, 0));
  long long n[1] = {l.n};
  // inembed/onembed non-null selects the advanced layout; for rank 1 only the strides matter.
  long long inembed[1] = {l.n};
  long long onembed[1] = {l.n};
  std::size_t bytes = 0;
  FC_CUFFT_CHECK(cufftMakePlanMany64(guard.handle, 1, n, inembed, l.istride, l.idist, onembed,
                                     l.ostride, l.odist, type, l.batch, &bytes));
  // The size of the finished plan (cufftMakePlanMany64's is an estimate made before planning).
  FC_CUFFT_CHECK(cufftGetSize(guard.handle, &bytes));
  *work_bytes = bytes;
  guard.live = false;
  return guard.handle;
}

PlanLease lease_plans(const PlanKey& key, cudaStream_t stream,
                      const std::function<void(SpectralPlans&)>& build) {
  return cache().lease(key, stream, build);
}

void set_plan_cache_capacity(std::size_t capacity, cudaStream_t stream) {
  cache().set_capacity(capacity, stream);
}
std::size_t plan_cache_capacity() { return cache().capacity(); }
std::size_t plan_cache_size() { return cache().size(); }
std::size_t plan_cache_pinned() { return cache().pinned(); }
void clear_plan_cache(cudaStream_t stream) { cache().clear(stream); }

}  // namespace fc_edge
