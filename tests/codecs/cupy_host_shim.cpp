// Host emulation of fc_edge/codecs/cupy_rotated.cu: the same kernel bodies, compiled by g++ into
// a shared library that tests/codecs/test_cupy_rotated.py loads with ctypes. CUDA's qualifiers
// become nothing, blockIdx / threadIdx / blockDim are globals, and each host_<kernel> runs the
// kernel once per thread of the grid a CuPy launch would use (so the `r >= N` guard of the last
// block runs too). Build: g++ -std=c++17 -O1 -ffp-contract=off -shared -fPIC
//   -I fc_edge/codecs tests/codecs/cupy_host_shim.cpp
#include <math.h>

#define __global__
#define __device__
#define __forceinline__ inline

namespace {
struct HostDim3 {
  unsigned int x, y, z;
};
HostDim3 blockIdx, threadIdx, blockDim;
}  // namespace

#include "cupy_rotated.cu"

namespace {
template <class Body>
void grid(fc_i64 n_rows, unsigned int threads, Body body) {
  blockDim = {threads, 1, 1};
  unsigned int blocks = (unsigned int)((n_rows + threads - 1) / threads);
  for (unsigned int b = 0; b < blocks; ++b)
    for (unsigned int t = 0; t < threads; ++t) {
      blockIdx = {b, 0, 0};
      threadIdx = {t, 0, 0};
      body();
    }
}
}  // namespace

extern "C" {
void host_fc_row_sigma(fc_i64 n, unsigned int threads, const unsigned int* coefs, fc_i64 N, int K,
                       unsigned int* sigma) {
  grid(n, threads, [&] { fc_row_sigma(coefs, N, K, sigma); });
}

void host_fc_row_bits(fc_i64 n, unsigned int threads, const unsigned int* coefs, const unsigned int* sigma,
                      fc_i64 N, int K, unsigned int alpha, int Q, const int* code_lengths,
                      fc_i64* row_bits) {
  grid(n, threads, [&] { fc_row_bits(coefs, sigma, N, K, alpha, Q, code_lengths, row_bits); });
}

void host_fc_write_rows(fc_i64 n, unsigned int threads, const unsigned int* coefs, const unsigned int* sigma,
                        fc_i64 N, int K, unsigned int alpha, int Q, const int* code_lengths,
                        const unsigned int* codes, const fc_i64* offsets, unsigned char* out) {
  grid(n, threads, [&] {
    fc_write_rows(coefs, sigma, N, K, alpha, Q, code_lengths, codes, offsets, out);
  });
}

void host_fc_read_rows(fc_i64 n, unsigned int threads, const unsigned char* stream,
                       const fc_i64* starts, fc_i64 N, int K, const short* dec_symbol,
                       const unsigned char* dec_length, int max_len, short* symbols, int* bad) {
  grid(n, threads, [&] {
    fc_read_rows(stream, starts, N, K, dec_symbol, dec_length, max_len, symbols, bad);
  });
}

void host_fc_dequantize(fc_i64 n, unsigned int threads, const short* symbols, const unsigned int* sigma,
                        fc_i64 N, int K, unsigned int alpha, int Q, unsigned int* out) {
  grid(n, threads, [&] { fc_dequantize(symbols, sigma, N, K, alpha, Q, out); });
}
}
