// A small LRU of cuFFT plans for the spectral ops. Torch-free.
#pragma once

#include <cuda_runtime_api.h>
#include <cufft.h>

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <tuple>

#include "spectral_layout.h"

namespace fc_edge {

enum class SpectralOp : int { Compress = 0, Decompress = 1 };

struct PlanKey {
  SpectralOp op;
  int64_t B, S, D, k_d;
  InputDType dtype;
  int device;
  std::uintptr_t stream;
  bool operator<(const PlanKey& o) const {
    return std::tie(op, B, S, D, k_d, dtype, device, stream) <
           std::tie(o.op, o.B, o.S, o.D, o.k_d, o.dtype, o.device, o.stream);
  }
};

// The plans of one op call: along D (R2C or C2R) and, for S > 1, the C2C along S. Destroyed on
// the device that made them, when the last user lets go (an evicted entry in use stays alive).
struct SpectralPlans {
  cufftHandle along_d = 0, along_s = 0;
  bool has_d = false, has_s = false;
  int device = 0;
  SpectralPlans() = default;
  SpectralPlans(const SpectralPlans&) = delete;
  SpectralPlans& operator=(const SpectralPlans&) = delete;
  ~SpectralPlans();
};

// One rank-1 plan with cuFFT's advanced layout, bound to `stream`.
cufftHandle make_plan(const FftLayout& layout, cufftType type, cudaStream_t stream);

// The cached plans for `key`, built by `build` (which fills a fresh SpectralPlans) on a miss.
std::shared_ptr<SpectralPlans> acquire_plans(const PlanKey& key,
                                             const std::function<void(SpectralPlans&)>& build);

}  // namespace fc_edge
