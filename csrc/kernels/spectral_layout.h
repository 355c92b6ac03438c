// The geometry of the fused spectral ops: buffer layouts, cuFFT advanced-layout parameters and
// the index maps of the gather/expand kernels. Plain C++ (no CUDA, no torch), so the same code
// runs in the kernels and in the host emulation test (csrc/tests/layout_emulation.cpp), which
// checks every stride below against a float64 DFT without a GPU.
//
// Compress, x (B, S, D) real -> block (B, R, k_d) complex, H = D/2 + 1:
//   [cast]  x -> xf (B, S, D) float32            (only for float16 / bfloat16 inputs)
//   R2C     xf -> Y (B, S, H)                    batch B*S rows, contiguous
//   gather  Y[b, s, c < k_d] -> Z (S, B, k_d)    only the kept columns; S outermost so that
//   C2C     Z along S, in place                  one plan covers all B*k_d columns: stride B*k_d,
//                                                distance 1 (S == 1: no Z, no C2C)
//   gather  Z[rows(r), b, c] -> out (B, R, k_d)  the R kept token frequencies, FFT order
// Decompress mirrors it: expand block -> Z (zeros elsewhere), inverse C2C along S, expand
// Z -> Y (B, S, H) zero-padding columns and scaling by 1/(S*D), C2R Y -> out (B, S, D).
#pragma once

#include <cstddef>
#include <cstdint>

#if defined(__CUDACC__)
#define FC_HD __host__ __device__ __forceinline__
#else
#define FC_HD inline
#endif

namespace fc_edge {

enum class InputDType : int { Float32 = 0, Float16 = 1, BFloat16 = 2 };

inline std::size_t dtype_bytes(InputDType t) { return t == InputDType::Float32 ? 4 : 2; }

struct Geometry {
  int64_t B, S, D, k_s, k_d;
  int64_t half() const { return D / 2 + 1; }                        // H, rfft columns
  int64_t rows() const { return 2 * k_s - 1 < S ? 2 * k_s - 1 : S; }  // R, kept rows
};

// Row r of the block holds token frequency 0..k_s-1 for r < k_s, else S - R + r (the mirrors
// S-k_s+1..S-1, or k_s..S-1 when the block covers every row). Same order as ops.block_rows.
FC_HD int64_t block_row_to_freq(int64_t r, int64_t S, int64_t R, int64_t k_s) {
  return r < k_s ? r : S - R + r;
}

// Inverse of block_row_to_freq: the block row of token frequency s, or -1 where s is dropped.
FC_HD int64_t freq_to_block_row(int64_t s, int64_t S, int64_t R, int64_t k_s) {
  if (s < k_s) return s;
  if (s >= S - R + k_s) return s - S + R;
  return -1;
}

// One cufftMakePlanMany64 call, rank 1: element j of transform t lives at t*dist + j*stride
// (in real elements on the real side of an R2C/C2R, complex elements elsewhere).
struct FftLayout {
  int64_t n, batch, istride, idist, ostride, odist;
};

// Copies a (B, rows, k_d) box of complex elements: dst[b*dst_b + r*dst_r + c] =
// src[b*src_b + row*src_r + c] with row = block_row_to_freq(r) when block_map, else r.
struct GatherSpec {
  int64_t B, rows, k_d;
  int64_t src_b, src_r, dst_b, dst_r;
  int64_t S, R, k_s;
  bool block_map;
  FC_HD int64_t count() const { return B * rows * k_d; }
};

FC_HD void gather_index(const GatherSpec& g, int64_t i, int64_t* src, int64_t* dst) {
  const int64_t c = i % g.k_d;
  const int64_t t = i / g.k_d;
  const int64_t r = t % g.rows;
  const int64_t b = t / g.rows;
  const int64_t row = g.block_map ? block_row_to_freq(r, g.S, g.R, g.k_s) : r;
  *src = b * g.src_b + row * g.src_r + c;
  *dst = b * g.dst_b + r * g.dst_r + c;
}

// Fills a (B, rows, cols) box of complex elements, every one written: dst[b*dst_b + s*dst_r + c]
// = scale * src[b*src_b + r*src_r + c] where c < k_d and the row is kept (r =
// freq_to_block_row(s) when block_map, else s), zero elsewhere.
struct ExpandSpec {
  int64_t B, rows, cols, k_d;
  int64_t src_b, src_r, dst_b, dst_r;
  int64_t S, R, k_s;
  bool block_map;
  float scale;
  FC_HD int64_t count() const { return B * rows * cols; }
};

// Returns the source index, or -1 for a zero.
FC_HD int64_t expand_index(const ExpandSpec& e, int64_t i, int64_t* dst) {
  const int64_t c = i % e.cols;
  const int64_t t = i / e.cols;
  const int64_t s = t % e.rows;
  const int64_t b = t / e.rows;
  *dst = b * e.dst_b + s * e.dst_r + c;
  if (c >= e.k_d) return -1;
  const int64_t r = e.block_map ? freq_to_block_row(s, e.S, e.R, e.k_s) : s;
  if (r < 0) return -1;
  return b * e.src_b + r * e.src_r + c;
}

// Workspace carving: each buffer starts on a 256-byte boundary (cuFFT and vector loads like it).
inline std::size_t align_up(std::size_t n) { return (n + 255) / 256 * 256; }

struct CompressLayout {
  Geometry g;
  bool cast;      // float16/bfloat16 input: convert into xf first
  bool along_s;   // S > 1: C2C along S over Z
  std::size_t off_xf, off_y, off_z, workspace_bytes;  // byte offsets into one workspace
  FftLayout r2c, c2c;
  GatherSpec to_columns;  // Y -> Z (along_s only)
  GatherSpec to_block;    // Z (or Y when S == 1) -> out
};

inline CompressLayout compress_layout(const Geometry& g, InputDType dtype) {
  const int64_t B = g.B, S = g.S, D = g.D, H = g.half(), R = g.rows(), k = g.k_d;
  CompressLayout L{};
  L.g = g;
  L.cast = dtype != InputDType::Float32;
  L.along_s = S > 1;
  std::size_t at = 0;
  L.off_xf = at;
  if (L.cast) at += align_up(sizeof(float) * B * S * D);
  L.off_y = at;
  at += align_up(2 * sizeof(float) * B * S * H);
  L.off_z = at;
  if (L.along_s) at += align_up(2 * sizeof(float) * S * B * k);
  L.workspace_bytes = at;
  L.r2c = FftLayout{D, B * S, 1, D, 1, H};
  L.c2c = FftLayout{S, B * k, B * k, 1, B * k, 1};
  L.to_columns = GatherSpec{B, S, k, S * H, H, k, B * k, S, R, g.k_s, false};
  if (L.along_s) {
    L.to_block = GatherSpec{B, R, k, k, B * k, R * k, k, S, R, g.k_s, true};
  } else {
    L.to_block = GatherSpec{B, R, k, S * H, H, R * k, k, S, R, g.k_s, true};
  }
  return L;
}

struct DecompressLayout {
  Geometry g;
  bool along_s;
  std::size_t off_y, off_z, workspace_bytes;
  FftLayout c2c, c2r;
  ExpandSpec to_rows;  // block -> Z (along_s only)
  ExpandSpec to_half;  // Z (or the block when S == 1) -> Y, scaled by 1/(S*D)
};

inline DecompressLayout decompress_layout(const Geometry& g) {
  const int64_t B = g.B, S = g.S, D = g.D, H = g.half(), R = g.rows(), k = g.k_d;
  DecompressLayout L{};
  L.g = g;
  L.along_s = S > 1;
  std::size_t at = 0;
  L.off_y = at;
  at += align_up(2 * sizeof(float) * B * S * H);
  L.off_z = at;
  if (L.along_s) at += align_up(2 * sizeof(float) * S * B * k);
  L.workspace_bytes = at;
  L.c2c = FftLayout{S, B * k, B * k, 1, B * k, 1};
  L.c2r = FftLayout{D, B * S, 1, H, 1, D};
  const float scale = 1.0f / static_cast<float>(S * D);
  L.to_rows = ExpandSpec{B, S, k, k, R * k, k, k, B * k, S, R, g.k_s, true, 1.0f};
  if (L.along_s) {
    L.to_half = ExpandSpec{B, S, H, k, k, B * k, S * H, H, S, R, g.k_s, false, scale};
  } else {
    L.to_half = ExpandSpec{B, S, H, k, R * k, k, S * H, H, S, R, g.k_s, true, scale};
  }
  return L;
}

}  // namespace fc_edge
