// LRU cache of cuFFT plans. Building a plan costs far more than running it (milliseconds, and a
// cudaMalloc for its work area), so a stream of same-shaped calls must reuse plans.
#include "plan_cache.h"

#include <list>
#include <map>
#include <mutex>
#include <utility>

#include "cuda_check.h"
#include "spectral.h"

namespace fc_edge {

SpectralPlans::~SpectralPlans() {
  // No throwing from a destructor: errors here mean the context is already gone.
  int current = -1;
  const bool switched = cudaGetDevice(&current) == cudaSuccess && current != device &&
                        cudaSetDevice(device) == cudaSuccess;
  if (has_d) cufftDestroy(along_d);
  if (has_s) cufftDestroy(along_s);
  if (switched) cudaSetDevice(current);
}

namespace {

// Owns a handle until it is handed over, so a failing cufftMakePlanMany64 does not leak it.
struct HandleGuard {
  cufftHandle handle = 0;
  bool live = false;
  ~HandleGuard() {
    if (live) cufftDestroy(handle);
  }
};

class PlanCache {
 public:
  std::shared_ptr<SpectralPlans> acquire(const PlanKey& key,
                                         const std::function<void(SpectralPlans&)>& build) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto found = index_.find(key);
    if (found != index_.end()) {
      entries_.splice(entries_.begin(), entries_, found->second);  // most recent first
      return found->second->second;
    }
    auto plans = std::make_shared<SpectralPlans>();
    plans->device = key.device;
    build(*plans);  // throws on failure; nothing cached then
    if (capacity_ == 0) return plans;
    entries_.emplace_front(key, plans);
    index_[key] = entries_.begin();
    trim();
    return plans;
  }

  void set_capacity(std::size_t capacity) {
    std::lock_guard<std::mutex> lock(mutex_);
    capacity_ = capacity;
    trim();
  }
  std::size_t capacity() {
    std::lock_guard<std::mutex> lock(mutex_);
    return capacity_;
  }
  std::size_t size() {
    std::lock_guard<std::mutex> lock(mutex_);
    return entries_.size();
  }
  void clear() {
    std::lock_guard<std::mutex> lock(mutex_);
    index_.clear();
    entries_.clear();
  }

 private:
  void trim() {
    while (entries_.size() > capacity_) {
      index_.erase(entries_.back().first);
      entries_.pop_back();
    }
  }

  using Entry = std::pair<PlanKey, std::shared_ptr<SpectralPlans>>;
  std::mutex mutex_;
  std::size_t capacity_ = 16;
  std::list<Entry> entries_;
  std::map<PlanKey, std::list<Entry>::iterator> index_;
};

PlanCache& cache() {
  static PlanCache* instance = new PlanCache();  // never destroyed: no cuFFT calls at exit
  return *instance;
}

}  // namespace

cufftHandle make_plan(const FftLayout& l, cufftType type, cudaStream_t stream) {
  HandleGuard guard;
  FC_CUFFT_CHECK(cufftCreate(&guard.handle));
  guard.live = true;
  long long n[1] = {l.n};
  // inembed/onembed non-null selects the advanced layout; for rank 1 only the strides matter.
  long long inembed[1] = {l.n};
  long long onembed[1] = {l.n};
  std::size_t work_bytes = 0;
  FC_CUFFT_CHECK(cufftMakePlanMany64(guard.handle, 1, n, inembed, l.istride, l.idist, onembed,
                                     l.ostride, l.odist, type, l.batch, &work_bytes));
  FC_CUFFT_CHECK(cufftSetStream(guard.handle, stream));
  guard.live = false;
  return guard.handle;
}

std::shared_ptr<SpectralPlans> acquire_plans(const PlanKey& key,
                                             const std::function<void(SpectralPlans&)>& build) {
  return cache().acquire(key, build);
}

void set_plan_cache_capacity(std::size_t capacity) { cache().set_capacity(capacity); }
std::size_t plan_cache_capacity() { return cache().capacity(); }
std::size_t plan_cache_size() { return cache().size(); }
void clear_plan_cache() { cache().clear(); }

}  // namespace fc_edge
