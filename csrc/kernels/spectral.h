// Torch-free entry points of the fused spectral ops, on raw device pointers and a CUDA stream.
// Shapes, layouts and the math are in spectral_layout.h; fc_edge/ops.py is the torch reference.
// Every failure throws: std::invalid_argument for a bad geometry or pointer, std::runtime_error
// (file, line, status name) for a CUDA or cuFFT error.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>

#include "plan_cache.h"
#include "spectral_layout.h"

namespace fc_edge {

// Each call takes three steps on the caller's stream:
//   PlanLease plans = lease_compress_plans(g, dtype, stream);   // exclusive use of the plans
//   workspace = allocate(spectral_compress_workspace_bytes(g, dtype, plans)) on `stream`;
//   spectral_compress(x, dtype, g, out, workspace, plans, stream);
// and keeps the lease and the workspace until spectral_compress returns (every kernel is then
// enqueued; memory freed afterwards to a stream-ordered allocator such as torch's is reused only
// by work ordered after them). The workspace holds the op's buffers and the cuFFT work areas.

// The cuFFT plans of spectral_compress for this geometry and dtype on the current device, made
// on a miss; blocks while another thread uses them. While `stream` is capturing a CUDA graph a
// miss throws std::runtime_error (warm up with the same shapes before capture). B >= 1.
PlanLease lease_compress_plans(const Geometry& g, InputDType dtype, cudaStream_t stream);

// Bytes of device memory spectral_compress needs as its workspace, with these plans.
std::size_t spectral_compress_workspace_bytes(const Geometry& g, InputDType dtype,
                                              const PlanLease& plans);

// x: (B, S, D) contiguous, dtype as named (float32 16-byte aligned); out: (B, R, k_d, 2) float32,
// (real, imaginary) interleaved like cufftComplex; workspace: at least
// spectral_compress_workspace_bytes, 256-byte aligned. Runs on `stream` of the current device.
void spectral_compress(const void* x, InputDType dtype, const Geometry& g, float* out,
                       void* workspace, PlanLease& plans, cudaStream_t stream);

// The same three steps for decompress.
PlanLease lease_decompress_plans(const Geometry& g, cudaStream_t stream);
std::size_t spectral_decompress_workspace_bytes(const Geometry& g, const PlanLease& plans);

// block: (B, R, k_d, 2) float32 contiguous, 8-byte aligned; out: (B, S, D) float32.
void spectral_decompress(const float* block, const Geometry& g, float* out, void* workspace,
                         PlanLease& plans, cudaStream_t stream);

// Throws std::invalid_argument unless 1 <= k_s <= S/2+1, 1 <= k_d <= D/2+1, B >= 0, S >= 1, D >= 2.
void check_geometry(const Geometry& g);

// cuFFT plans are cached per (op, B, S, D, k_d, dtype, device), least recently used evicted
// beyond the capacity (default 16); entries used during a CUDA-graph capture are pinned (kept
// for the graphs, outside the capacity). `stream` is the caller's: while it is capturing,
// evicted plans are kept and destroyed by a later call outside capture.
void set_plan_cache_capacity(std::size_t capacity, cudaStream_t stream);
std::size_t plan_cache_capacity();
std::size_t plan_cache_size();    // unpinned entries (at most the capacity)
std::size_t plan_cache_pinned();  // entries kept for captured graphs
void clear_plan_cache(cudaStream_t stream);  // every unpinned entry

}  // namespace fc_edge
