// Host emulation of fc_edge/codecs/cupy_rotated.cu: the same kernel bodies, compiled by g++ into
// a shared library that tests/codecs/test_cupy_rotated.py loads with ctypes. CUDA's qualifiers
// become nothing, blockIdx / threadIdx / blockDim are globals, and each host_<kernel> runs the
// grid a CuPy launch would use, block by block, warp by warp (so the `r >= N` guard of the last
// block runs too).
//
// A warp's 32 lanes run as fibers (ucontext), round-robin in lane order. A shuffle is a
// meeting point: the lane posts its value and yields; once every lane has posted (one round of
// the scheduler), each reads the value of its source lane. Values are posted into one of two
// slot arrays by the parity of the shuffle's count, so a lane that runs ahead to the next
// shuffle cannot overwrite what a later lane has still to read. Deterministic (no threads), and
// strict where a GPU would be undefined or wrong: a shuffle with a partial mask, lanes that meet
// at shuffles of different source lines, or lanes that returned while others still wait at a
// shuffle stop the launch; host_<kernel> then returns non-zero and host_error() says what.
//
// Build: g++ -std=c++17 -O1 -ffp-contract=off -shared -fPIC -I fc_edge/codecs
//   tests/codecs/cupy_host_shim.cpp
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <ucontext.h>

#define __global__
#define __device__
#define __forceinline__ inline

namespace {
struct HostDim3 {
  unsigned int x, y, z;
};
HostDim3 blockIdx, threadIdx, blockDim;

constexpr int kWarp = 32;
constexpr size_t kStack = 1 << 16;

struct Lane {
  ucontext_t context;
  bool done;
  long long shuffles;  // shuffles this lane has reached
  int line;            // source line of the last one
};

Lane lanes[kWarp];
char stacks[kWarp][kStack];
ucontext_t scheduler;
int current;                               // the lane running now
unsigned long long slots[2][kWarp];        // posted values, by shuffle parity
void (*lane_body)(void*);                  // the kernel call a lane runs
void* lane_arg;
char error[256];                           // the first violation of the launch, or ""

void fail(const char* what, int line) {
  if (!error[0])
    snprintf(error, sizeof error, "%s (line %d, block %u, thread %u)", what, line, blockIdx.x,
             threadIdx.x);
}

template <class T>
unsigned long long to_bits(T v) {
  static_assert(sizeof(T) <= 8, "shuffles move at most 64 bits");
  unsigned long long u = 0;
  memcpy(&u, &v, sizeof v);
  return u;
}

template <class T>
T from_bits(unsigned long long u) {
  T v;
  memcpy(&v, &u, sizeof v);
  return v;
}

// Post v, wait for every lane, return the value lane `src` posted.
template <class T>
T exchange(unsigned int mask, T v, int src, int line) {
  Lane& me = lanes[current];
  if (mask != 0xFFFFFFFFu) {
    fail("a shuffle without the full warp mask", line);
    swapcontext(&me.context, &scheduler);  // never resumed: the launch stops
  }
  int parity = (int)(me.shuffles & 1);
  slots[parity][current] = to_bits(v);
  ++me.shuffles;
  me.line = line;
  swapcontext(&me.context, &scheduler);
  return from_bits<T>(slots[parity][src]);
}

void lane_entry() {
  lane_body(lane_arg);
  lanes[current].done = true;  // returns to the scheduler (uc_link)
}

// Runs lanes 0..31 of warp `warp` of the current block until all return (or a violation).
void run_warp(unsigned int warp) {
  for (int l = 0; l < kWarp; ++l) {
    Lane& lane = lanes[l];
    lane.done = false;
    lane.shuffles = 0;
    lane.line = 0;
    getcontext(&lane.context);
    lane.context.uc_stack.ss_sp = stacks[l];
    lane.context.uc_stack.ss_size = kStack;
    lane.context.uc_link = &scheduler;
    makecontext(&lane.context, lane_entry, 0);
  }
  for (;;) {
    for (int l = 0; l < kWarp; ++l) {
      if (lanes[l].done) continue;
      current = l;
      threadIdx = {warp * kWarp + (unsigned int)l, 0, 0};
      swapcontext(&scheduler, &lanes[l].context);
      if (error[0]) return;
    }
    int done = 0;
    for (int l = 0; l < kWarp; ++l) done += lanes[l].done;
    if (done == kWarp) return;
    for (int l = 0; l < kWarp; ++l) {
      threadIdx = {warp * kWarp + (unsigned int)l, 0, 0};
      if (lanes[l].done) fail("a lane returned while others wait at a shuffle", lanes[l].line);
      else if (lanes[l].shuffles != lanes[0].shuffles || lanes[l].line != lanes[0].line)
        fail("lanes of one warp at different shuffles", lanes[l].line);
      if (error[0]) return;
    }
  }
}
}  // namespace

template <class T>
T fc_emu_shfl(unsigned int mask, T v, int src, int line) {
  return exchange(mask, v, src & (kWarp - 1), line);
}

template <class T>
T fc_emu_shfl_up(unsigned int mask, T v, unsigned int delta, int line) {
  int src = current - (int)delta;
  return exchange(mask, v, src >= 0 ? src : current, line);
}

template <class T>
T fc_emu_shfl_down(unsigned int mask, T v, unsigned int delta, int line) {
  int src = current + (int)delta;
  return exchange(mask, v, src < kWarp ? src : current, line);
}

template <class T>
T fc_emu_shfl_xor(unsigned int mask, T v, int lane_mask, int line) {
  return exchange(mask, v, (current ^ lane_mask) & (kWarp - 1), line);
}

#define __shfl_sync(mask, v, src) fc_emu_shfl((mask), (v), (src), __LINE__)
#define __shfl_up_sync(mask, v, delta) fc_emu_shfl_up((mask), (v), (delta), __LINE__)
#define __shfl_down_sync(mask, v, delta) fc_emu_shfl_down((mask), (v), (delta), __LINE__)
#define __shfl_xor_sync(mask, v, lane_mask) fc_emu_shfl_xor((mask), (v), (lane_mask), __LINE__)

#include "cupy_rotated.cu"

namespace {
// The grid of a launch of n_rows rows (one warp each) with `threads` threads per block; 0, or
// -1 after a violation (host_error() says which).
template <class Body>
int grid(fc_i64 n_rows, unsigned int threads, Body body) {
  error[0] = 0;
  if (threads == 0 || threads % kWarp) {
    fail("threads per block must be a multiple of 32", 0);
    return -1;
  }
  blockDim = {threads, 1, 1};
  unsigned int warps = threads / kWarp;
  unsigned int blocks = (unsigned int)((n_rows + warps - 1) / warps);
  lane_body = [](void* arg) { (*static_cast<Body*>(arg))(); };
  lane_arg = &body;
  for (unsigned int b = 0; b < blocks; ++b) {
    blockIdx = {b, 0, 0};
    for (unsigned int w = 0; w < warps && !error[0]; ++w) run_warp(w);
  }
  lane_arg = nullptr;  // `body` ends here
  return error[0] ? -1 : 0;
}

// Two kernels of the emulator's own self-test (not in cupy_rotated.cu): every shuffle of one
// lane's value, as CUDA defines them; and a shuffle only some lanes execute (a GPU deadlocks or
// reads garbage there), which the emulator must refuse.
__global__ void shim_shuffles(long long* out) {
  int lane = (int)(threadIdx.x & 31u);
  long long v = 1000 + lane;
  long long* o = out + 5 * lane;
  o[0] = __shfl_sync(0xFFFFFFFFu, v, 7);
  o[1] = __shfl_up_sync(0xFFFFFFFFu, v, 3);
  o[2] = __shfl_down_sync(0xFFFFFFFFu, v, 5);
  o[3] = __shfl_xor_sync(0xFFFFFFFFu, v, 6);
  double d = __shfl_sync(0xFFFFFFFFu, 0.5 * lane, 31 - lane);
  o[4] = (long long)(4 * d);
}

__global__ void shim_divergent(long long* out) {
  int lane = (int)(threadIdx.x & 31u);
  long long v = lane;
  if (lane < 16) v = __shfl_xor_sync(0xFFFFFFFFu, v, 1);
  out[lane] = v;
}
}  // namespace

extern "C" {
const char* host_error() { return error; }

int host_shim_shuffles(long long* out) {
  return grid(1, 32, [&] { shim_shuffles(out); });
}

int host_shim_divergent(long long* out) {
  return grid(1, 32, [&] { shim_divergent(out); });
}

int host_fc_row_sigma(fc_i64 n, unsigned int threads, const unsigned int* coefs, fc_i64 N, int K,
                      unsigned int* sigma) {
  return grid(n, threads, [&] { fc_row_sigma(coefs, N, K, sigma); });
}

int host_fc_row_bits(fc_i64 n, unsigned int threads, const unsigned int* coefs,
                     const unsigned int* sigma, fc_i64 N, int K, unsigned int alpha, int Q,
                     const int* code_lengths, fc_i64* row_bits) {
  return grid(n, threads,
              [&] { fc_row_bits(coefs, sigma, N, K, alpha, Q, code_lengths, row_bits); });
}

int host_fc_write_rows(fc_i64 n, unsigned int threads, const unsigned int* coefs,
                       const unsigned int* sigma, fc_i64 N, int K, unsigned int alpha, int Q,
                       const int* code_lengths, const unsigned int* codes, const fc_i64* offsets,
                       unsigned char* out) {
  return grid(n, threads, [&] {
    fc_write_rows(coefs, sigma, N, K, alpha, Q, code_lengths, codes, offsets, out);
  });
}

int host_fc_read_rows(fc_i64 n, unsigned int threads, const unsigned char* stream,
                      const fc_i64* starts, fc_i64 N, int K, const short* dec_symbol,
                      const unsigned char* dec_length, int max_len, short* symbols, int* bad) {
  return grid(n, threads, [&] {
    fc_read_rows(stream, starts, N, K, dec_symbol, dec_length, max_len, symbols, bad);
  });
}

int host_fc_dequantize(fc_i64 n, unsigned int threads, const short* symbols,
                       const unsigned int* sigma, fc_i64 N, int K, unsigned int alpha, int Q,
                       unsigned int* out) {
  return grid(n, threads, [&] { fc_dequantize(symbols, sigma, N, K, alpha, Q, out); });
}
}
