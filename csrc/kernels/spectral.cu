// Fused spectral compress / decompress: cuFFT along D on every row, then along S on the k_d kept
// columns only, with small gather/expand kernels between the plans (layouts: spectral_layout.h).
#include "spectral.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <cufft.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "cuda_check.h"
#include "plan_cache.h"

namespace fc_edge {
namespace {

constexpr int kThreads = 256;

// Grid-stride launches: enough blocks to fill any current GPU, never more than the work.
unsigned int blocks_for(int64_t n) {
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min<int64_t>(blocks, 65536)));
}

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <class T>
__global__ void to_float32_kernel(const T* __restrict__ src, float* __restrict__ dst, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    dst[i] = to_float(src[i]);
  }
}

__global__ void gather_kernel(GatherSpec g, const float2* __restrict__ src,
                              float2* __restrict__ dst) {
  const int64_t n = g.count();
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    int64_t s, d;
    gather_index(g, i, &s, &d);
    dst[d] = src[s];
  }
}

__global__ void expand_kernel(ExpandSpec e, const float2* __restrict__ src,
                              float2* __restrict__ dst) {
  const int64_t n = e.count();
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    int64_t d;
    const int64_t s = expand_index(e, i, &d);
    float2 v = make_float2(0.0f, 0.0f);
    if (s >= 0) {
      const float2 w = src[s];
      v = make_float2(w.x * e.scale, w.y * e.scale);
    }
    dst[d] = v;
  }
}

void launch_gather(const GatherSpec& g, const float2* src, float2* dst, cudaStream_t stream) {
  if (g.count() == 0) return;
  gather_kernel<<<blocks_for(g.count()), kThreads, 0, stream>>>(g, src, dst);
  FC_CUDA_CHECK_LAUNCH();
}

void launch_expand(const ExpandSpec& e, const float2* src, float2* dst, cudaStream_t stream) {
  if (e.count() == 0) return;
  expand_kernel<<<blocks_for(e.count()), kThreads, 0, stream>>>(e, src, dst);
  FC_CUDA_CHECK_LAUNCH();
}

void launch_to_float32(const void* x, InputDType dtype, float* dst, int64_t n,
                       cudaStream_t stream) {
  switch (dtype) {
    case InputDType::Float32:
      to_float32_kernel<<<blocks_for(n), kThreads, 0, stream>>>(static_cast<const float*>(x),
                                                                dst, n);
      break;
    case InputDType::Float16:
      to_float32_kernel<<<blocks_for(n), kThreads, 0, stream>>>(static_cast<const __half*>(x),
                                                                dst, n);
      break;
    case InputDType::BFloat16:
      to_float32_kernel<<<blocks_for(n), kThreads, 0, stream>>>(
          static_cast<const __nv_bfloat16*>(x), dst, n);
      break;
  }
  FC_CUDA_CHECK_LAUNCH();
}

int current_device() {
  int device = 0;
  FC_CUDA_CHECK(cudaGetDevice(&device));
  return device;
}

void require_aligned(const void* p, std::uintptr_t alignment, const char* what) {
  if (reinterpret_cast<std::uintptr_t>(p) % alignment != 0) {
    throw std::invalid_argument(std::string("fc_edge: ") + what + " must be " +
                                std::to_string(alignment) + "-byte aligned");
  }
}

template <class T>
T* at_offset(void* workspace, std::size_t offset) {
  return reinterpret_cast<T*>(static_cast<char*>(workspace) + offset);
}

// The cuFFT work areas follow the op's own buffers in one workspace, one per plan: cuFFT wants
// the work areas of different plans not to overlap.
struct WorkAreas {
  std::size_t off_d, off_s, total;
};

WorkAreas work_areas(std::size_t scratch_bytes, const SpectralPlans& p) {
  WorkAreas w{};
  w.off_d = align_up(scratch_bytes);
  w.off_s = w.off_d + align_up(p.work_d);
  w.total = w.off_s + align_up(p.work_s);
  return w;
}

// Binds a leased plan to this call's stream and work area; the lease keeps other threads off
// the plan until its executions are enqueued.
void bind(cufftHandle plan, void* work_area, cudaStream_t stream) {
  FC_CUFFT_CHECK(cufftSetStream(plan, stream));
  FC_CUFFT_CHECK(cufftSetWorkArea(plan, work_area));
}

PlanKey plan_key(SpectralOp op, const Geometry& g, InputDType dtype) {
  return PlanKey{op, g.B, g.S, g.D, g.k_d, dtype, current_device()};
}

void require_lease(const PlanLease& plans, const PlanKey& key) {
  if (!(plans.key() == key)) {
    throw std::invalid_argument("fc_edge: the plan lease is for another op, shape or device");
  }
}

void require_batch(const Geometry& g) {
  check_geometry(g);
  if (g.B < 1) throw std::invalid_argument("fc_edge: no cuFFT plans for an empty batch (B = 0)");
}

}  // namespace

void check_geometry(const Geometry& g) {
  auto fail = [&](const std::string& what) {
    throw std::invalid_argument("fc_edge: " + what + " (B=" + std::to_string(g.B) +
                                ", S=" + std::to_string(g.S) + ", D=" + std::to_string(g.D) +
                                ", k_s=" + std::to_string(g.k_s) +
                                ", k_d=" + std::to_string(g.k_d) + ")");
  };
  if (g.B < 0) fail("B must be >= 0");
  if (g.S < 1) fail("S must be >= 1");
  if (g.D < 2) fail("D must be >= 2 for the cuFFT path");
  if (g.k_s < 1 || g.k_s > g.S / 2 + 1) fail("k_s must be in 1..S/2+1");
  if (g.k_d < 1 || g.k_d > g.D / 2 + 1) fail("k_d must be in 1..D/2+1");
}

PlanLease lease_compress_plans(const Geometry& g, InputDType dtype, cudaStream_t stream) {
  require_batch(g);
  const CompressLayout L = compress_layout(g, dtype);
  return lease_plans(plan_key(SpectralOp::Compress, g, dtype), stream, [&](SpectralPlans& p) {
    p.along_d = make_plan(L.r2c, CUFFT_R2C, &p.work_d);
    p.has_d = true;
    if (L.along_s) {
      p.along_s = make_plan(L.c2c, CUFFT_C2C, &p.work_s);
      p.has_s = true;
    }
  });
}

std::size_t spectral_compress_workspace_bytes(const Geometry& g, InputDType dtype,
                                              const PlanLease& plans) {
  return work_areas(compress_layout(g, dtype).workspace_bytes, plans.plans()).total;
}

PlanLease lease_decompress_plans(const Geometry& g, cudaStream_t stream) {
  require_batch(g);
  const DecompressLayout L = decompress_layout(g);
  return lease_plans(plan_key(SpectralOp::Decompress, g, InputDType::Float32), stream,
                     [&](SpectralPlans& p) {
                       p.along_d = make_plan(L.c2r, CUFFT_C2R, &p.work_d);
                       p.has_d = true;
                       if (L.along_s) {
                         p.along_s = make_plan(L.c2c, CUFFT_C2C, &p.work_s);
                         p.has_s = true;
                       }
                     });
}

std::size_t spectral_decompress_workspace_bytes(const Geometry& g, const PlanLease& plans) {
  return work_areas(decompress_layout(g).workspace_bytes, plans.plans()).total;
}

void spectral_compress(const void* x, InputDType dtype, const Geometry& g, float* out,
                       void* workspace, PlanLease& plans, cudaStream_t stream) {
  require_batch(g);
  require_lease(plans, plan_key(SpectralOp::Compress, g, dtype));
  const CompressLayout L = compress_layout(g, dtype);
  require_aligned(workspace, 256, "the workspace");
  require_aligned(out, 8, "the output block");
  if (!L.cast) require_aligned(x, 16, "a float32 input");

  const float* xf = static_cast<const float*>(x);
  if (L.cast) {
    float* staged = at_offset<float>(workspace, L.off_xf);
    launch_to_float32(x, dtype, staged, g.B * g.S * g.D, stream);
    xf = staged;
  }
  float2* Y = at_offset<float2>(workspace, L.off_y);
  float2* Z = at_offset<float2>(workspace, L.off_z);

  SpectralPlans& p = plans.plans();
  const WorkAreas w = work_areas(L.workspace_bytes, p);
  bind(p.along_d, at_offset<char>(workspace, w.off_d), stream);
  if (L.along_s) bind(p.along_s, at_offset<char>(workspace, w.off_s), stream);

  // Out-of-place R2C leaves its input intact, so x is read in place.
  FC_CUFFT_CHECK(cufftExecR2C(p.along_d, const_cast<cufftReal*>(xf),
                              reinterpret_cast<cufftComplex*>(Y)));
  float2* block = reinterpret_cast<float2*>(out);
  if (L.along_s) {
    launch_gather(L.to_columns, Y, Z, stream);
    FC_CUFFT_CHECK(cufftExecC2C(p.along_s, reinterpret_cast<cufftComplex*>(Z),
                                reinterpret_cast<cufftComplex*>(Z), CUFFT_FORWARD));
    launch_gather(L.to_block, Z, block, stream);
  } else {
    launch_gather(L.to_block, Y, block, stream);
  }
}

void spectral_decompress(const float* block, const Geometry& g, float* out, void* workspace,
                         PlanLease& plans, cudaStream_t stream) {
  require_batch(g);
  require_lease(plans, plan_key(SpectralOp::Decompress, g, InputDType::Float32));
  const DecompressLayout L = decompress_layout(g);
  require_aligned(workspace, 256, "the workspace");
  require_aligned(block, 8, "the input block");
  require_aligned(out, 16, "the output");

  float2* Y = at_offset<float2>(workspace, L.off_y);
  float2* Z = at_offset<float2>(workspace, L.off_z);
  const float2* coef = reinterpret_cast<const float2*>(block);

  SpectralPlans& p = plans.plans();
  const WorkAreas w = work_areas(L.workspace_bytes, p);
  bind(p.along_d, at_offset<char>(workspace, w.off_d), stream);
  if (L.along_s) bind(p.along_s, at_offset<char>(workspace, w.off_s), stream);

  if (L.along_s) {
    launch_expand(L.to_rows, coef, Z, stream);
    FC_CUFFT_CHECK(cufftExecC2C(p.along_s, reinterpret_cast<cufftComplex*>(Z),
                                reinterpret_cast<cufftComplex*>(Z), CUFFT_INVERSE));
    launch_expand(L.to_half, Z, Y, stream);
  } else {
    launch_expand(L.to_half, coef, Y, stream);
  }
  // C2R overwrites its input; Y is scratch.
  FC_CUFFT_CHECK(cufftExecC2R(p.along_d, reinterpret_cast<cufftComplex*>(Y), out));
}

}  // namespace fc_edge
