// A small LRU of cuFFT plans for the spectral ops, leased to one host thread at a time. Torch-free.
//
// Each use of a plan rebinds its stream (cufftSetStream) and its work area (cufftSetWorkArea,
// memory the caller allocates: torch's caching allocator in ops.cpp) and then executes it. cuFFT
// allows a plan in one host thread at a time, and the rebind + exec sequence must not interleave
// with another thread's, so a plan is only reachable through a PlanLease, which holds the
// entry's own mutex for the whole sequence. See plan_cache.cu for why the scheme is correct.
#pragma once

#include <cuda_runtime_api.h>
#include <cufft.h>

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <tuple>

#include "spectral_layout.h"

namespace fc_edge {

enum class SpectralOp : int { Compress = 0, Decompress = 1 };

// No stream in the key: a plan is bound to the caller's stream at each use, so one plan serves
// every stream (a warm-up on one stream serves a CUDA-graph capture on another).
struct PlanKey {
  SpectralOp op;
  int64_t B, S, D, k_d;
  InputDType dtype;
  int device;
  bool operator<(const PlanKey& o) const {
    return std::tie(op, B, S, D, k_d, dtype, device) <
           std::tie(o.op, o.B, o.S, o.D, o.k_d, o.dtype, o.device);
  }
  bool operator==(const PlanKey& o) const { return !(*this < o) && !(o < *this); }
};

// The plans of one op call: along D (R2C or C2R) and, for S > 1, the C2C along S, made without
// a work area of their own (cufftSetAutoAllocation(0)); work_* are the bytes each needs at
// execution. Destroyed on the device that made them when the last holder lets go.
struct SpectralPlans {
  cufftHandle along_d = 0, along_s = 0;
  bool has_d = false, has_s = false;
  std::size_t work_d = 0, work_s = 0;
  int device = 0;
  SpectralPlans() = default;
  SpectralPlans(const SpectralPlans&) = delete;
  SpectralPlans& operator=(const SpectralPlans&) = delete;
  ~SpectralPlans();
};

// A cache entry: the plans and the mutex a lease holds while it uses them.
struct PlanEntry {
  PlanKey key;
  SpectralPlans plans;
  std::mutex in_use;
  bool pinned = false;  // used by a CUDA-graph capture: never evicted (guarded by the cache lock)
};

// Exclusive use of one entry's plans until destroyed (movable, not copyable). Keeps the entry
// alive even when the cache evicts it meanwhile.
class PlanLease {
 public:
  explicit PlanLease(std::shared_ptr<PlanEntry> entry);
  PlanLease(PlanLease&&) noexcept = default;
  // No move assignment: it would drop the old entry's reference before unlocking it.
  PlanLease& operator=(PlanLease&&) = delete;
  const PlanKey& key() const { return entry_->key; }
  SpectralPlans& plans() { return entry_->plans; }
  const SpectralPlans& plans() const { return entry_->plans; }

 private:
  // Declared in this order so the lock is released before the last reference can go.
  std::shared_ptr<PlanEntry> entry_;
  std::unique_lock<std::mutex> lock_;
};

// One rank-1 plan with cuFFT's advanced layout and no work area of its own; `*work_bytes` gets
// the work area its executions need.
cufftHandle make_plan(const FftLayout& layout, cufftType type, std::size_t* work_bytes);

// Whether `stream` is capturing a CUDA graph (throws for a query that is itself illegal, e.g. the
// legacy default stream while another thread captures in global mode).
bool stream_is_capturing(cudaStream_t stream);

// A lease on the plans for `key`, built by `build` (which fills a fresh SpectralPlans) on a miss.
// Blocks while another thread holds them. `stream` is the caller's: while it is capturing a
// CUDA graph a miss throws (plans cannot be made during capture) and a hit pins the entry.
PlanLease lease_plans(const PlanKey& key, cudaStream_t stream,
                      const std::function<void(SpectralPlans&)>& build);

}  // namespace fc_edge
