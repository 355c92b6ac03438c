// The entropy-coded uniform quantizer of `rotated` (fc_edge/codecs/entropy.py) as GPU kernels.
//
// One source, three compilers:
//   * NVRTC, at run time, through CuPy (fc_edge/codecs/cupy_rotated.py): no build step;
//   * nvcc --ptx / -c, in tests/codecs/test_cupy_rotated.py, so a syntax or type error fails CI;
//   * g++, with tests/codecs/cupy_host_shim.h defining __global__, blockIdx, ... and a launch
//     loop over the grid, so the tests run the very same kernel bodies on the host against the
//     numba coder, byte for byte, on a machine without a GPU.
// Hence the rules: plain C in the bodies, one thread per row, no shared memory, no
// __syncthreads, no library calls but the FC_* arithmetic below.
//
// Every result must equal the numba loops bit for bit (the payload is a wire format), so the
// arithmetic is spelled out: IEEE round-to-nearest products, sums and quotients with no fused
// multiply-add (the host RMS is a float64 sum of float64 products, never an FMA), rintf (ties
// to even), float32 quotients (numba divides float32 by float32 in float32).
#ifndef FC_CUPY_ROTATED_CU
#define FC_CUPY_ROTATED_CU

#if defined(__CUDACC__)
#define FC_DMUL(a, b) __dmul_rn((a), (b))
#define FC_DADD(a, b) __dadd_rn((a), (b))
#define FC_DDIV(a, b) __ddiv_rn((a), (b))
#define FC_DSQRT(a) __dsqrt_rn(a)
#define FC_FMUL(a, b) __fmul_rn((a), (b))
#define FC_FDIV(a, b) __fdiv_rn((a), (b))
#define FC_RINTF(a) rintf(a)
#else  // the host emulation (compiled with -ffp-contract=off)
#define FC_DMUL(a, b) ((a) * (b))
#define FC_DADD(a, b) ((a) + (b))
#define FC_DDIV(a, b) ((a) / (b))
#define FC_DSQRT(a) sqrt(a)
#define FC_FMUL(a, b) ((a) * (b))
#define FC_FDIV(a, b) ((a) / (b))
#define FC_RINTF(a) rintf(a)
#endif

// The largest finite bfloat16 (0x7F7F), the clamp for a row RMS (entropy.BF16_MAX).
#define FC_BF16_MAX 3.3895313892515355e38

typedef long long fc_i64;
typedef unsigned long long fc_u64;

__device__ __forceinline__ fc_i64 fc_row_index() {
  return (fc_i64)blockIdx.x * (fc_i64)blockDim.x + (fc_i64)threadIdx.x;
}

// Symbol of one coefficient: round(c / delta) clamped to -Q..Q, plus Q (entropy._quantize).
__device__ __forceinline__ int fc_symbol(float c, float delta, int Q) {
  float q = 0.0f;
  if (delta > 0.0f) {
    q = FC_RINTF(FC_FDIV(c, delta));
    if (q < (float)-Q) q = (float)-Q;  // Q <= 512: exact in float32
    if (q > (float)Q) q = (float)Q;
  }
  return (int)q + Q;
}

// sigma[r] = RMS of row r, summed in float64, clamped to BF16_MAX, rounded to bfloat16 (nearest,
// ties to even) and returned as float32 (entropy._row_sigma).
extern "C" __global__ void fc_row_sigma(const float* coefs, fc_i64 N, int K, float* sigma) {
  fc_i64 r = fc_row_index();
  if (r >= N) return;
  const float* row = coefs + r * (fc_i64)K;
  double acc = 0.0;
  for (int k = 0; k < K; ++k) {
    double v = (double)row[k];
    acc = FC_DADD(acc, FC_DMUL(v, v));
  }
  double rms = FC_DSQRT(FC_DDIV(acc, (double)K));
  if (FC_BF16_MAX < rms) rms = FC_BF16_MAX;
  union {
    float f;
    unsigned int u;
  } bits;
  bits.f = (float)rms;
  unsigned int u = bits.u;
  u = u + 0x7FFFu + ((u >> 16) & 1u);
  bits.u = u & 0xFFFF0000u;
  sigma[r] = bits.f;
}

// row_bits[r] = Huffman bits of row r at this step (entropy._quantize's count).
extern "C" __global__ void fc_row_bits(const float* coefs, const float* sigma, fc_i64 N, int K,
                                       float alpha, int Q, const int* code_lengths,
                                       fc_i64* row_bits) {
  fc_i64 r = fc_row_index();
  if (r >= N) return;
  const float* row = coefs + r * (fc_i64)K;
  float delta = FC_FMUL(alpha, sigma[r]);
  fc_i64 bits = 0;
  for (int k = 0; k < K; ++k) bits += code_lengths[fc_symbol(row[k], delta, Q)];
  row_bits[r] = bits;
}

// Row r's code words, MSB first, from byte offsets[r], the last byte padded with zero bits
// (entropy._encode). Writes every byte of the row, so `out` needs no clearing.
extern "C" __global__ void fc_write_rows(const float* coefs, const float* sigma, fc_i64 N, int K,
                                         float alpha, int Q, const int* code_lengths,
                                         const unsigned int* codes, const fc_i64* offsets,
                                         unsigned char* out) {
  fc_i64 r = fc_row_index();
  if (r >= N) return;
  const float* row = coefs + r * (fc_i64)K;
  float delta = FC_FMUL(alpha, sigma[r]);
  unsigned char* dst = out + offsets[r];
  fc_u64 acc = 0;
  int nbits = 0;
  for (int k = 0; k < K; ++k) {
    int s = fc_symbol(row[k], delta, Q);
    int n = code_lengths[s];
    acc = (acc << n) | (fc_u64)codes[s];
    nbits += n;
    while (nbits >= 8) {
      nbits -= 8;
      *dst++ = (unsigned char)((acc >> nbits) & 0xFFu);
    }
    acc &= (((fc_u64)1) << nbits) - 1u;
  }
  if (nbits) *dst = (unsigned char)((acc << (8 - nbits)) & 0xFFu);
}

// Decode K symbols of row r from stream[starts[r] .. starts[r+1]) (entropy._decode). bad[r] = 1
// when the code words run past the row's end, leave a whole spare byte or leave padding bits
// that are not zero; bits past the end read as 0, so a row never reads another row's bytes.
extern "C" __global__ void fc_read_rows(const unsigned char* stream, const fc_i64* starts,
                                        fc_i64 N, int K, const short* dec_symbol,
                                        const unsigned char* dec_length, int max_len,
                                        short* symbols, int* bad) {
  fc_i64 r = fc_row_index();
  if (r >= N) return;
  fc_i64 i = starts[r], end = starts[r + 1];
  fc_i64 budget = (end - i) * 8;
  fc_u64 mask = (((fc_u64)1) << max_len) - 1u;
  fc_u64 acc = 0;
  int nbits = 0;
  fc_i64 used = 0;
  short* out = symbols + r * (fc_i64)K;
  bad[r] = 0;
  for (int k = 0; k < K; ++k) {
    while (nbits < max_len) {
      fc_u64 b = 0;
      if (i < end) b = stream[i];
      ++i;
      acc = ((acc << 8) | b) & 0xFFFFFFFFull;
      nbits += 8;
    }
    fc_u64 window = (acc >> (nbits - max_len)) & mask;
    int n = dec_length[window];
    used += n;
    if (used > budget) {
      bad[r] = 1;
      return;
    }
    out[k] = dec_symbol[window];
    nbits -= n;
  }
  fc_i64 pad = budget - used;
  if (pad >= 8 || (pad && (stream[end - 1] & ((1u << pad) - 1u)))) bad[r] = 1;
}

// out[r, k] = float32(symbol - Q) * float32(alpha * sigma[r]) (entropy._dequantize).
extern "C" __global__ void fc_dequantize(const short* symbols, const float* sigma, fc_i64 N,
                                         int K, float alpha, int Q, float* out) {
  fc_i64 r = fc_row_index();
  if (r >= N) return;
  float delta = FC_FMUL(alpha, sigma[r]);
  const short* in = symbols + r * (fc_i64)K;
  float* dst = out + r * (fc_i64)K;
  for (int k = 0; k < K; ++k) dst[k] = FC_FMUL((float)(in[k] - Q), delta);
}

#endif  // FC_CUPY_ROTATED_CU
