// Host test of the cuFFT plan cache (csrc/kernels/plan_cache.cu) with the CUDA runtime and cuFFT
// replaced by recording stubs, so the leasing, eviction and CUDA-graph rules are checked without
// a GPU. tests/test_csrc_compile.py compiles plan_cache.cu as host C++ (it has no kernels), links
// it with this file and runs it. Prints one line per violation, exits non-zero on any.
//
// Checked: a plan is never inside two threads' leases at once (8 threads, 5 shapes, capacity 2,
// so entries are evicted while leased), never destroyed while leased, destroyed exactly once and
// none leaked; every plan is made with cufftSetAutoAllocation(0) before cufftMakePlanMany64;
// plans are made and destroyed only in relaxed capture mode; a capturing stream never makes a
// plan (a miss throws "Warm up"), pins what it leases, and destroys nothing.
#include <cuda_runtime_api.h>
#include <cufft.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "../kernels/plan_cache.h"
#include "../kernels/spectral.h"

namespace {

constexpr int kMaxHandles = 1 << 16;

struct HandleState {
  std::atomic<bool> alive{false}, auto_alloc{true}, planned{false};
  std::atomic<int> users{0};
};

HandleState g_handles[kMaxHandles];
std::atomic<int> g_next{1}, g_created{0}, g_destroyed{0}, g_violations{0};
thread_local cudaStreamCaptureMode t_mode = cudaStreamCaptureModeGlobal;
const cudaStream_t kCapturing = reinterpret_cast<cudaStream_t>(0xCAFE);

void violation(const std::string& what) {
  ++g_violations;
  std::printf("VIOLATION: %s\n", what.c_str());
}

}  // namespace

// ---- stubs: the CUDA runtime and cuFFT calls plan_cache.cu makes
extern "C" {
cudaError_t CUDARTAPI cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
cudaError_t CUDARTAPI cudaSetDevice(int) { return cudaSuccess; }
cudaError_t CUDARTAPI cudaGetLastError(void) { return cudaSuccess; }
const char* CUDARTAPI cudaGetErrorName(cudaError_t) { return "cudaErrorStub"; }
const char* CUDARTAPI cudaGetErrorString(cudaError_t) { return "stub"; }
cudaError_t CUDARTAPI cudaThreadExchangeStreamCaptureMode(enum cudaStreamCaptureMode* mode) {
  std::swap(*mode, t_mode);
  return cudaSuccess;
}
cudaError_t CUDARTAPI cudaStreamIsCapturing(cudaStream_t stream,
                                            enum cudaStreamCaptureStatus* status) {
  *status = stream == kCapturing ? cudaStreamCaptureStatusActive : cudaStreamCaptureStatusNone;
  return cudaSuccess;
}

cufftResult CUFFTAPI cufftCreate(cufftHandle* plan) {
  if (t_mode != cudaStreamCaptureModeRelaxed) violation("cufftCreate outside relaxed mode");
  const int h = g_next++;
  if (h >= kMaxHandles) std::abort();
  g_handles[h].alive = true;
  ++g_created;
  *plan = h;
  return CUFFT_SUCCESS;
}
cufftResult CUFFTAPI cufftSetAutoAllocation(cufftHandle plan, int autoAllocate) {
  if (g_handles[plan].planned) violation("cufftSetAutoAllocation after planning");
  g_handles[plan].auto_alloc = autoAllocate != 0;
  return CUFFT_SUCCESS;
}
cufftResult CUFFTAPI cufftMakePlanMany64(cufftHandle plan, int, long long int*, long long int*,
                                         long long int, long long int, long long int*,
                                         long long int, long long int, cufftType, long long int,
                                         size_t* workSize) {
  if (g_handles[plan].auto_alloc) violation("plan made with cuFFT's own work area");
  g_handles[plan].planned = true;
  *workSize = 1 << 20;  // an estimate; cufftGetSize gives the final size
  return CUFFT_SUCCESS;
}
cufftResult CUFFTAPI cufftGetSize(cufftHandle plan, size_t* workSize) {
  *workSize = 1000 + static_cast<size_t>(plan);
  return CUFFT_SUCCESS;
}
cufftResult CUFFTAPI cufftDestroy(cufftHandle plan) {
  if (t_mode != cudaStreamCaptureModeRelaxed) violation("cufftDestroy outside relaxed mode");
  if (g_handles[plan].users != 0) violation("plan destroyed while leased");
  if (!g_handles[plan].alive.exchange(false)) violation("plan destroyed twice");
  ++g_destroyed;
  return CUFFT_SUCCESS;
}
}  // extern "C"

namespace {

using fc_edge::PlanKey;

PlanKey key_for(int64_t B) {
  return PlanKey{fc_edge::SpectralOp::Compress, B, 8, 16, 3, fc_edge::InputDType::Float32, 0};
}

fc_edge::PlanLease lease(const PlanKey& key, cudaStream_t stream) {
  return fc_edge::lease_plans(key, stream, [&](fc_edge::SpectralPlans& p) {
    p.along_d = fc_edge::make_plan(fc_edge::FftLayout{16, key.B * 8, 1, 16, 1, 9}, CUFFT_R2C,
                                   &p.work_d);
    p.has_d = true;
  });
}

// A lease in use: marks the plan busy for the time a real call would bind and run it.
void use(fc_edge::PlanLease& held, int spin) {
  HandleState& h = g_handles[held.plans().along_d];
  if (held.plans().work_d != 1000 + static_cast<size_t>(held.plans().along_d)) {
    violation("work size is not cufftGetSize's");
  }
  if (h.users.fetch_add(1) != 0) violation("two threads inside one plan");
  for (int i = 0; i < spin; ++i) {
    if (!h.alive) violation("leased plan destroyed");
    std::this_thread::yield();
  }
  h.users.fetch_sub(1);
}

void check(bool ok, const char* what) {
  if (!ok) violation(what);
}

void threads_share_and_evict() {
  fc_edge::set_plan_cache_capacity(2, nullptr);
  std::vector<std::thread> threads;
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([t] {
      unsigned state = 1234u + 77u * static_cast<unsigned>(t);
      const cudaStream_t stream = reinterpret_cast<cudaStream_t>(static_cast<intptr_t>(t % 3));
      for (int i = 0; i < 3000; ++i) {
        state = state * 1103515245u + 12345u;
        fc_edge::PlanLease held = lease(key_for(1 + (state >> 16) % 5), stream);
        use(held, 1 + static_cast<int>((state >> 8) % 4));
      }
    });
  }
  for (auto& t : threads) t.join();
  check(fc_edge::plan_cache_size() <= 2, "more entries than the capacity");
  check(g_created > 5, "no eviction happened (the test lost its point)");
  fc_edge::set_plan_cache_capacity(0, nullptr);
  check(fc_edge::plan_cache_size() == 0, "capacity 0 left entries");
  check(g_created == g_destroyed, "plans leaked after the cache was emptied");
}

void capture_rules() {
  fc_edge::set_plan_cache_capacity(4, nullptr);
  { auto warm = lease(key_for(11), nullptr); use(warm, 1); }  // warm-up on another stream
  { auto warm = lease(key_for(12), nullptr); use(warm, 1); }
  const int created = g_created, destroyed = g_destroyed;
  {
    auto captured = lease(key_for(11), kCapturing);  // a hit during capture pins the entry
    use(captured, 1);
  }
  check(fc_edge::plan_cache_pinned() == 1, "a plan used during capture is not pinned");
  check(fc_edge::plan_cache_size() == 1, "a pinned entry counts against the capacity");
  bool threw = false;
  try {
    auto miss = lease(key_for(13), kCapturing);
  } catch (const std::runtime_error& e) {
    threw = std::string(e.what()).find("Warm up") != std::string::npos;
  }
  check(threw, "a miss during capture did not refuse with a warm-up hint");
  fc_edge::set_plan_cache_capacity(0, kCapturing);  // evicts entry 12 but must not destroy it
  fc_edge::clear_plan_cache(kCapturing);
  check(g_created == created, "a plan was made during capture");
  check(g_destroyed == destroyed, "a plan was destroyed during capture");
  check(fc_edge::plan_cache_size() == 0, "eviction did not take the entry out of the cache");
  fc_edge::clear_plan_cache(nullptr);  // outside capture: the deferred plan goes now
  check(g_destroyed == destroyed + 1, "the deferred eviction was not carried out after capture");
  check(fc_edge::plan_cache_pinned() == 1, "clearing the cache dropped a pinned plan");
  {
    auto again = lease(key_for(11), kCapturing);  // still there for a second capture
    use(again, 1);
  }
  check(g_created == created, "the pinned plan was rebuilt");
  threw = false;
  try {
    auto miss = lease(key_for(14), kCapturing);
  } catch (const std::runtime_error& e) {
    threw = std::string(e.what()).find("capacity is 0") != std::string::npos;
  }
  check(threw, "a miss during capture with capacity 0 does not name the capacity");
}

}  // namespace

int main() {
  try {
    threads_share_and_evict();
    capture_rules();
  } catch (const std::exception& e) {
    violation(std::string("unexpected exception: ") + e.what());
  }
  std::printf("plan cache emulation: %d plans made, %d destroyed, %d violations\n",
              g_created.load(), g_destroyed.load(), g_violations.load());
  return g_violations == 0 ? 0 : 1;
}
