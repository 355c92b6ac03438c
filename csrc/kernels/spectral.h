// Torch-free entry points of the fused spectral ops, on raw device pointers and a CUDA stream.
// Shapes, layouts and the math are in spectral_layout.h; fc_edge/ops.py is the torch reference.
// Every failure throws: std::invalid_argument for a bad geometry or pointer, std::runtime_error
// (file, line, status name) for a CUDA or cuFFT error.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>

#include "spectral_layout.h"

namespace fc_edge {

// Bytes of scratch device memory spectral_compress needs for this geometry and input dtype.
std::size_t spectral_compress_workspace_bytes(const Geometry& g, InputDType dtype);

// x: (B, S, D) contiguous, dtype as named (float32 16-byte aligned); out: (B, R, k_d, 2) float32,
// (real, imaginary) interleaved like cufftComplex; workspace: at least
// spectral_compress_workspace_bytes, 256-byte aligned. Runs on `stream` of the current device.
void spectral_compress(const void* x, InputDType dtype, const Geometry& g, float* out,
                       void* workspace, cudaStream_t stream);

std::size_t spectral_decompress_workspace_bytes(const Geometry& g);

// block: (B, R, k_d, 2) float32 contiguous, 8-byte aligned; out: (B, S, D) float32.
void spectral_decompress(const float* block, const Geometry& g, float* out, void* workspace,
                         cudaStream_t stream);

// Throws std::invalid_argument unless 1 <= k_s <= S/2+1, 1 <= k_d <= D/2+1, B >= 0, S >= 1, D >= 2.
void check_geometry(const Geometry& g);

// cuFFT plans are cached per (op, B, S, D, k_d, dtype, device, stream), least recently used
// evicted beyond the capacity (default 16). Each plan holds its own cuFFT work area.
void set_plan_cache_capacity(std::size_t capacity);
std::size_t plan_cache_capacity();
std::size_t plan_cache_size();
void clear_plan_cache();

}  // namespace fc_edge
