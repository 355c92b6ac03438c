// The entropy-coded uniform quantizer of `rotated` (fc_edge/codecs/entropy.py) as GPU kernels.
//
// One source, three compilers:
//   * NVRTC, at run time, through CuPy (fc_edge/codecs/cupy_rotated.py): no build step;
//   * nvcc --ptx / -c, in tests/codecs/test_cupy_rotated.py, so a syntax or type error fails CI;
//   * g++, with tests/codecs/cupy_host_shim.cpp defining __global__, blockIdx, ... and a launch
//     loop over the grid, so the tests run the very same kernel bodies on the host against the
//     numba coder, byte for byte, on a machine without a GPU.
// Hence the rules: plain C in the bodies, one thread per row, no shared memory, no
// __syncthreads, no library calls but the FC_* arithmetic below.
//
// Every result must equal the numba loops bit for bit (the payload is a wire format), so the
// arithmetic is spelled out: IEEE round-to-nearest float64 products, sums, quotients and square
// roots with no fused multiply-add (the host RMS is a float64 sum of float64 products), rint
// with ties to even. The float32 steps of the host (delta = alpha * sigma, c / delta, the
// dequantized product) are done in float64, where they are exact or correctly rounded, and
// rounded to float32 by hand: CuPy compiles every kernel with -ftz=true, which would flush
// float32 subnormals (rows with an RMS below ~1e-38) to zero; nothing here depends on it.
#ifndef FC_CUPY_ROTATED_CU
#define FC_CUPY_ROTATED_CU

#if defined(__CUDACC__)
#define FC_DMUL(a, b) __dmul_rn((a), (b))
#define FC_DADD(a, b) __dadd_rn((a), (b))
#define FC_DDIV(a, b) __ddiv_rn((a), (b))
#define FC_DSQRT(a) __dsqrt_rn(a)
#define FC_RINT(a) rint(a)
#define FC_RINTF(a) rintf(a)
#else  // the host emulation (compiled with -ffp-contract=off)
#define FC_DMUL(a, b) ((a) * (b))
#define FC_DADD(a, b) ((a) + (b))
#define FC_DDIV(a, b) ((a) / (b))
#define FC_DSQRT(a) sqrt(a)
#define FC_RINT(a) rint(a)
#define FC_RINTF(a) rintf(a)
#endif

// The largest finite bfloat16 (0x7F7F), the clamp for a row RMS (entropy.BF16_MAX).
#define FC_BF16_MAX 3.3895313892515355e38
#define FC_F32_MIN_NORMAL 1.1754943508222875e-38  // 2^-126
#define FC_TWO_P149 7.1362384635297994e44          // 2^149: float32 subnormal units per 1
#define FC_TWO_M149 1.4012984643248171e-45         // 2^-149: one float32 subnormal unit

typedef long long fc_i64;
typedef unsigned long long fc_u64;

__device__ __forceinline__ fc_i64 fc_row_index() {
  return (fc_i64)blockIdx.x * (fc_i64)blockDim.x + (fc_i64)threadIdx.x;
}

__device__ __forceinline__ unsigned int fc_float_bits(float f) {
  union {
    float f;
    unsigned int u;
  } v;
  v.f = f;
  return v.u;
}

__device__ __forceinline__ float fc_bits_float(unsigned int u) {
  union {
    float f;
    unsigned int u;
  } v;
  v.u = u;
  return v.f;
}

// float32 bits -> the exact float64 value, subnormals included.
__device__ __forceinline__ double fc_f32_to_f64(unsigned int u) {
  if (((u >> 23) & 0xFFu) == 0u) {
    double m = FC_DMUL((double)(u & 0x7FFFFFu), FC_TWO_M149);
    return (u >> 31) ? -m : m;
  }
  return (double)fc_bits_float(u);  // a normal float (or Inf): exact
}

// float64 -> bits of the nearest float32 (ties to even), subnormal results included; the sign
// of a zero is kept.
__device__ __forceinline__ unsigned int fc_f64_to_f32_bits(double d) {
  unsigned int sign = (d < 0.0 || (d == 0.0 && 1.0 / d < 0.0)) ? 0x80000000u : 0u;
  double a = d < 0.0 ? -d : d;
  if (a < FC_F32_MIN_NORMAL) return sign | (unsigned int)FC_RINT(FC_DMUL(a, FC_TWO_P149));
  return fc_float_bits((float)d);  // a normal result: no flushing can apply
}

// Symbol of one coefficient: round(float32(c / delta)) clamped to -Q..Q, plus Q
// (entropy._quantize). The float64 quotient of two float32 values rounded to float32 is the
// float32 quotient (53 >= 2 * 24 + 2); a quotient too small for a normal float32 rounds to
// 0 either way.
__device__ __forceinline__ int fc_symbol(unsigned int c_bits, double delta, int Q) {
  if (!(delta > 0.0)) return Q;
  float q = FC_RINTF((float)FC_DDIV(fc_f32_to_f64(c_bits), delta));
  if (q < (float)-Q) q = (float)-Q;  // Q <= 512: exact in float32
  if (q > (float)Q) q = (float)Q;
  return (int)q + Q;
}

// delta = float32(alpha * sigma) as float64 (the product of two float32 values is exact in
// float64; then one rounding to float32).
__device__ __forceinline__ double fc_delta(unsigned int alpha_bits, unsigned int sigma_bits) {
  return fc_f32_to_f64(
      fc_f64_to_f32_bits(FC_DMUL(fc_f32_to_f64(alpha_bits), fc_f32_to_f64(sigma_bits))));
}

// sigma[r] = RMS of row r, summed in float64, clamped to BF16_MAX, rounded to bfloat16 (nearest,
// ties to even) and stored as float32 bits (entropy._row_sigma).
extern "C" __global__ void fc_row_sigma(const unsigned int* coefs, fc_i64 N, int K,
                                        unsigned int* sigma) {
  fc_i64 r = fc_row_index();
  if (r >= N) return;
  const unsigned int* row = coefs + r * (fc_i64)K;
  double acc = 0.0;
  for (int k = 0; k < K; ++k) {
    double v = fc_f32_to_f64(row[k]);
    acc = FC_DADD(acc, FC_DMUL(v, v));
  }
  double rms = FC_DSQRT(FC_DDIV(acc, (double)K));
  if (FC_BF16_MAX < rms) rms = FC_BF16_MAX;
  unsigned int u = fc_f64_to_f32_bits(rms);
  u = u + 0x7FFFu + ((u >> 16) & 1u);
  sigma[r] = u & 0xFFFF0000u;
}

// row_bits[r] = Huffman bits of row r at this step (entropy._quantize's count). alpha: the
// float32 bits of entropy.step_alpha(step).
extern "C" __global__ void fc_row_bits(const unsigned int* coefs, const unsigned int* sigma,
                                       fc_i64 N, int K, unsigned int alpha, int Q,
                                       const int* code_lengths, fc_i64* row_bits) {
  fc_i64 r = fc_row_index();
  if (r >= N) return;
  const unsigned int* row = coefs + r * (fc_i64)K;
  double delta = fc_delta(alpha, sigma[r]);
  fc_i64 bits = 0;
  for (int k = 0; k < K; ++k) bits += code_lengths[fc_symbol(row[k], delta, Q)];
  row_bits[r] = bits;
}

// Row r's code words, MSB first, from byte offsets[r], the last byte padded with zero bits
// (entropy._encode). Writes every byte of the row, so `out` needs no clearing.
extern "C" __global__ void fc_write_rows(const unsigned int* coefs, const unsigned int* sigma,
                                         fc_i64 N, int K, unsigned int alpha, int Q,
                                         const int* code_lengths, const unsigned int* codes,
                                         const fc_i64* offsets, unsigned char* out) {
  fc_i64 r = fc_row_index();
  if (r >= N) return;
  const unsigned int* row = coefs + r * (fc_i64)K;
  double delta = fc_delta(alpha, sigma[r]);
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

// out[r, k] = float32(symbol - Q) * float32(alpha * sigma[r]) as float32 bits
// (entropy._dequantize; the product is exact in float64, then rounded once).
extern "C" __global__ void fc_dequantize(const short* symbols, const unsigned int* sigma,
                                         fc_i64 N, int K, unsigned int alpha, int Q,
                                         unsigned int* out) {
  fc_i64 r = fc_row_index();
  if (r >= N) return;
  double delta = fc_delta(alpha, sigma[r]);
  const short* in = symbols + r * (fc_i64)K;
  unsigned int* dst = out + r * (fc_i64)K;
  for (int k = 0; k < K; ++k) dst[k] = fc_f64_to_f32_bits(FC_DMUL((double)(in[k] - Q), delta));
}

#endif  // FC_CUPY_ROTATED_CU
