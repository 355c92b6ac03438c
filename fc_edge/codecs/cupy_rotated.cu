// The entropy-coded uniform quantizer of `rotated` (fc_edge/codecs/entropy.py) as GPU kernels.
//
// One source, three compilers:
//   * NVRTC, at run time, through CuPy (fc_edge/codecs/cupy_rotated.py): no build step;
//   * nvcc --ptx / -c, in tests/codecs/test_cupy_rotated.py, so a syntax or type error fails CI;
//   * g++, with tests/codecs/cupy_host_shim.cpp defining __global__, blockIdx, ... and running
//     each warp's 32 lanes as fibers that meet at every shuffle, so the tests run the very same
//     kernel bodies on the host against the numba coder, byte for byte, without a GPU.
// Hence the rules: plain C in the bodies, one warp (32 lanes) per row, full-mask shuffles
// executed by all 32 lanes of a warp (no lane returns before the warp's last shuffle), no shared
// memory, no __syncthreads, no library calls but the FC_* arithmetic below.
//
// Work split (one warp per row; a block holds blockDim.x / 32 rows):
//   fc_row_sigma    lane 0 sums the row in order (the float64 sum must round as numba's loop
//                   does, so it stays sequential); the other lanes have nothing to do;
//   fc_row_bits     lane l quantizes values l, l+32, ...; the bit counts meet in a shuffle sum;
//   fc_write_rows   32 values per pass, one per lane; a shuffle scan gives each code word its bit
//                   offset and the last 32 bits of the stream up to its end, from which the lane
//                   writes every byte that ends inside its code word;
//   fc_read_rows    lane 0 decodes the row (a code word's start is known only once the previous
//                   one is decoded);
//   fc_dequantize   lane l writes values l, l+32, ...
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

#define FC_WARP 32
#define FC_FULL_MASK 0xFFFFFFFFu

// The row of this thread's warp (blockDim.x is a multiple of 32) and its lane.
__device__ __forceinline__ fc_i64 fc_warp_row() {
  return ((fc_i64)blockIdx.x * (fc_i64)blockDim.x + (fc_i64)threadIdx.x) / FC_WARP;
}

__device__ __forceinline__ int fc_lane() { return (int)(threadIdx.x & (FC_WARP - 1u)); }

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

// Two bit strings joined: each is (length << 32) | (its last 32 bits, right-aligned); the result
// is the same for the concatenation (its length, its last 32 bits). Associative, so a warp scan
// over one code word per lane gives each lane the stream's bit position and last 32 bits at the
// end of its code word. Lengths stay far below 2^31 (32 code words of at most 24 bits + 7).
__device__ __forceinline__ fc_u64 fc_concat(fc_u64 head, fc_u64 tail) {
  fc_u64 n_tail = tail >> 32;
  fc_u64 bits = tail & 0xFFFFFFFFull;
  if (n_tail < 32) bits = ((head << n_tail) | bits) & 0xFFFFFFFFull;
  return (((head >> 32) + n_tail) << 32) | bits;
}

// sigma[r] = RMS of row r, summed in float64 in the order of the row (lane 0 alone: numba's
// loop rounds after every addition, and a tree sum would round differently), clamped to
// BF16_MAX, rounded to bfloat16 (nearest, ties to even) and stored as float32 bits
// (entropy._row_sigma).
extern "C" __global__ void fc_row_sigma(const unsigned int* coefs, fc_i64 N, int K,
                                        unsigned int* sigma) {
  fc_i64 r = fc_warp_row();
  if (r >= N || fc_lane() != 0) return;
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
// float32 bits of entropy.step_alpha(step). Lane l counts values l, l+32, ...; a shuffle sum
// (integers: any order) adds the lanes up.
extern "C" __global__ void fc_row_bits(const unsigned int* coefs, const unsigned int* sigma,
                                       fc_i64 N, int K, unsigned int alpha, int Q,
                                       const int* code_lengths, fc_i64* row_bits) {
  fc_i64 r = fc_warp_row();
  if (r >= N) return;  // the whole warp: r is the warp's
  int lane = fc_lane();
  const unsigned int* row = coefs + r * (fc_i64)K;
  double delta = fc_delta(alpha, sigma[r]);
  long long bits = 0;
  for (int k = lane; k < K; k += FC_WARP) bits += code_lengths[fc_symbol(row[k], delta, Q)];
  for (int d = FC_WARP / 2; d > 0; d >>= 1) bits += __shfl_xor_sync(FC_FULL_MASK, bits, d);
  if (lane == 0) row_bits[r] = bits;
}

// Row r's code words, MSB first, from byte offsets[r], the last byte padded with zero bits
// (entropy._encode). 32 values per pass, one per lane: lane 0's string carries the (< 8) bits
// left over from the previous pass in front of its code word; a shuffle scan of fc_concat gives
// each lane its code word's end e (bits from the pass's first byte) and the stream's last 32
// bits there, and the lane writes each byte whose last bit lies in its code word: every byte of
// the row is written exactly once (so `out` needs no clearing), by the lane that completes it.
// Code words are at most 24 bits (entropy: 15), so a byte's bits all lie in those 32.
extern "C" __global__ void fc_write_rows(const unsigned int* coefs, const unsigned int* sigma,
                                         fc_i64 N, int K, unsigned int alpha, int Q,
                                         const int* code_lengths, const unsigned int* codes,
                                         const fc_i64* offsets, unsigned char* out) {
  fc_i64 r = fc_warp_row();
  if (r >= N) return;  // the whole warp
  int lane = fc_lane();
  const unsigned int* row = coefs + r * (fc_i64)K;
  double delta = fc_delta(alpha, sigma[r]);
  unsigned char* dst = out + offsets[r];  // the pass's first byte
  fc_u64 carry = 0;                      // bits not yet written, right-aligned ...
  fc_u64 n_carry = 0;                    // ... and how many (0..7); the same in every lane
  for (int base = 0; base < K; base += FC_WARP) {
    int k = base + lane;
    fc_u64 n = 0, word = 0;
    if (k < K) {
      int s = fc_symbol(row[k], delta, Q);
      n = (fc_u64)code_lengths[s];
      word = (fc_u64)codes[s];
    }
    if (lane == 0) {
      word |= carry << n;
      n += n_carry;
    }
    fc_u64 x = (n << 32) | word;
    for (int d = 1; d < FC_WARP; d <<= 1) {
      fc_u64 before = __shfl_up_sync(FC_FULL_MASK, x, d);
      if (lane >= d) x = fc_concat(before, x);
    }
    fc_u64 e = x >> 32, last = x & 0xFFFFFFFFull;
    for (fc_u64 p = (e - n) | 7u; p < e; p += 8) dst[p >> 3] = (unsigned char)(last >> (e - 1 - p));
    fc_u64 total = __shfl_sync(FC_FULL_MASK, x, FC_WARP - 1);
    fc_u64 end = total >> 32;
    dst += end >> 3;
    n_carry = end & 7u;
    carry = total & ((((fc_u64)1) << n_carry) - 1u);
  }
  if (lane == 0 && n_carry) *dst = (unsigned char)(carry << (8 - n_carry));
}

// Decode K symbols of row r from stream[starts[r] .. starts[r+1]) (entropy._decode). bad[r] = 1
// when the code words run past the row's end, leave a whole spare byte or leave padding bits
// that are not zero; bits past the end read as 0, so a row never reads another row's bytes.
// Lane 0 alone: where a code word starts is known only once the one before it is decoded.
extern "C" __global__ void fc_read_rows(const unsigned char* stream, const fc_i64* starts,
                                        fc_i64 N, int K, const short* dec_symbol,
                                        const unsigned char* dec_length, int max_len,
                                        short* symbols, int* bad) {
  fc_i64 r = fc_warp_row();
  if (r >= N || fc_lane() != 0) return;
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
// (entropy._dequantize; the product is exact in float64, then rounded once). Lane l writes
// values l, l+32, ...
extern "C" __global__ void fc_dequantize(const short* symbols, const unsigned int* sigma,
                                         fc_i64 N, int K, unsigned int alpha, int Q,
                                         unsigned int* out) {
  fc_i64 r = fc_warp_row();
  if (r >= N) return;
  double delta = fc_delta(alpha, sigma[r]);
  const short* in = symbols + r * (fc_i64)K;
  unsigned int* dst = out + r * (fc_i64)K;
  for (int k = fc_lane(); k < K; k += FC_WARP)
    dst[k] = fc_f64_to_f32_bits(FC_DMUL((double)(in[k] - Q), delta));
}

#endif  // FC_CUPY_ROTATED_CU
