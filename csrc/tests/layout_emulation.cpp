// Host emulation of the fused spectral ops: runs the exact plan layouts and gather/expand index
// maps of csrc/kernels/spectral_layout.h with a float64 DFT standing in for cuFFT (cuFFT's
// advanced-layout rule: element j of transform t at t*dist + j*stride), and compares with a
// direct 2-D DFT. Needs no GPU and no CUDA: tests/test_csrc_compile.py builds it with the host
// compiler and runs it, so a wrong stride fails CI. Prints one line per failure, exits non-zero.
#include <cmath>
#include <complex>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "../kernels/spectral_layout.h"

using fc_edge::FftLayout;
using fc_edge::Geometry;
using cd = std::complex<double>;

namespace {

const double kPi = 3.14159265358979323846;

cd twiddle(int64_t a, int64_t n, double sign) { return std::polar(1.0, sign * 2.0 * kPi * double(a % n) / double(n)); }

void r2c(const FftLayout& p, const std::vector<double>& in, std::vector<cd>& out) {
  for (int64_t t = 0; t < p.batch; ++t)
    for (int64_t k = 0; k <= p.n / 2; ++k) {
      cd acc = 0;
      for (int64_t j = 0; j < p.n; ++j) acc += in[t * p.idist + j * p.istride] * twiddle(j * k, p.n, -1);
      out[t * p.odist + k * p.ostride] = acc;
    }
}

void c2c(const FftLayout& p, std::vector<cd>& buf, double sign) {  // in place, like the plans
  std::vector<cd> line(p.n);
  for (int64_t t = 0; t < p.batch; ++t) {
    for (int64_t k = 0; k < p.n; ++k) {
      cd acc = 0;
      for (int64_t j = 0; j < p.n; ++j) acc += buf[t * p.idist + j * p.istride] * twiddle(j * k, p.n, sign);
      line[k] = acc;
    }
    for (int64_t k = 0; k < p.n; ++k) buf[t * p.odist + k * p.ostride] = line[k];
  }
}

// Unnormalised C2R of a half spectrum; the imaginary parts of DC (and Nyquist) are ignored.
double c2r_at(const cd* X, int64_t stride, int64_t n, int64_t j) {
  double acc = X[0].real();
  for (int64_t k = 1; k <= (n - 1) / 2; ++k) acc += 2.0 * (X[k * stride] * twiddle(j * k, n, +1)).real();
  if (n % 2 == 0) acc += X[(n / 2) * stride].real() * ((j % 2) ? -1.0 : 1.0);
  return acc;
}

void c2r(const FftLayout& p, const std::vector<cd>& in, std::vector<double>& out) {
  for (int64_t t = 0; t < p.batch; ++t)
    for (int64_t j = 0; j < p.n; ++j) out[t * p.odist + j * p.ostride] = c2r_at(&in[t * p.idist], p.istride, p.n, j);
}

void gather(const fc_edge::GatherSpec& g, const std::vector<cd>& src, std::vector<cd>& dst) {
  for (int64_t i = 0; i < g.count(); ++i) {
    int64_t s, d;
    fc_edge::gather_index(g, i, &s, &d);
    dst.at(d) = src.at(s);
  }
}

void expand(const fc_edge::ExpandSpec& e, const std::vector<cd>& src, std::vector<cd>& dst) {
  for (int64_t i = 0; i < e.count(); ++i) {
    int64_t d;
    const int64_t s = fc_edge::expand_index(e, i, &d);
    dst.at(d) = s < 0 ? cd(0) : src.at(s) * double(e.scale);
  }
}

// The pipeline of spectral.cu, buffer for buffer (workspace offsets aside).
std::vector<cd> emulate_compress(const Geometry& g, const std::vector<double>& x) {
  const auto L = fc_edge::compress_layout(g, fc_edge::InputDType::Float32);
  std::vector<cd> Y(g.B * g.S * g.half()), Z(g.S * g.B * g.k_d), out(g.B * g.rows() * g.k_d);
  r2c(L.r2c, x, Y);
  if (L.along_s) {
    gather(L.to_columns, Y, Z);
    c2c(L.c2c, Z, -1);
    gather(L.to_block, Z, out);
  } else {
    gather(L.to_block, Y, out);
  }
  return out;
}

std::vector<double> emulate_decompress(const Geometry& g, const std::vector<cd>& block) {
  const auto L = fc_edge::decompress_layout(g);
  std::vector<cd> Y(g.B * g.S * g.half()), Z(g.S * g.B * g.k_d);
  std::vector<double> out(g.B * g.S * g.D);
  if (L.along_s) {
    expand(L.to_rows, block, Z);
    c2c(L.c2c, Z, +1);
    expand(L.to_half, Z, Y);
  } else {
    expand(L.to_half, block, Y);
  }
  c2r(L.c2r, Y, out);
  return out;
}

std::vector<int64_t> kept_rows(int64_t S, int64_t k_s) {  // ops.block_rows, written out
  std::vector<int64_t> rows;
  for (int64_t u = 0; u < k_s; ++u) rows.push_back(u);
  for (int64_t u = S - k_s + 1; u < S; ++u) if (u >= k_s) rows.push_back(u);
  return rows;
}

// Direct 2-D DFT, kept rows and columns only.
std::vector<cd> oracle_compress(const Geometry& g, const std::vector<double>& x) {
  const auto rows = kept_rows(g.S, g.k_s);
  std::vector<cd> out;
  for (int64_t b = 0; b < g.B; ++b)
    for (int64_t u : rows)
      for (int64_t c = 0; c < g.k_d; ++c) {
        cd acc = 0;
        for (int64_t s = 0; s < g.S; ++s)
          for (int64_t d = 0; d < g.D; ++d)
            acc += x[(b * g.S + s) * g.D + d] * twiddle(u * s, g.S, -1) * twiddle(c * d, g.D, -1);
        out.push_back(acc);
      }
  return out;
}

// irfft2(s=(S, D)) of the zero-padded block: inverse along S over the kept rows, then C2R along D.
std::vector<double> oracle_decompress(const Geometry& g, const std::vector<cd>& block) {
  const auto rows = kept_rows(g.S, g.k_s);
  const int64_t H = g.half(), R = int64_t(rows.size());
  std::vector<double> out(g.B * g.S * g.D);
  std::vector<cd> half(H);
  for (int64_t b = 0; b < g.B; ++b)
    for (int64_t s = 0; s < g.S; ++s) {
      for (int64_t c = 0; c < H; ++c) {
        cd acc = 0;
        if (c < g.k_d)
          for (int64_t r = 0; r < R; ++r) acc += block[(b * R + r) * g.k_d + c] * twiddle(rows[r] * s, g.S, +1);
        half[c] = acc / double(g.S);
      }
      for (int64_t d = 0; d < g.D; ++d) out[(b * g.S + s) * g.D + d] = c2r_at(half.data(), 1, g.D, d) / double(g.D);
    }
  return out;
}

template <class T>
double rel_err(const std::vector<T>& a, const std::vector<T>& b) {
  double num = 0, den = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    num += std::norm(cd(a[i]) - cd(b[i]));
    den += std::norm(cd(b[i]));
  }
  return std::sqrt(num / (den > 0 ? den : 1));
}

}  // namespace

int main() {
  // (B, S, D, k_s, k_d): odd and even sizes, S == 1, full rows (R == S), full columns, B > 1.
  const int64_t cases[][5] = {
      {1, 1, 8, 1, 3},  {3, 1, 7, 1, 4},   {2, 5, 6, 2, 2},   {2, 6, 9, 3, 5},  {1, 7, 7, 4, 4},
      {3, 8, 10, 5, 6}, {2, 9, 5, 3, 1},   {1, 2, 4, 1, 3},   {2, 2, 3, 2, 2},  {4, 11, 12, 1, 7},
      {1, 16, 16, 9, 9}, {2, 13, 14, 7, 8}, {3, 4, 2, 3, 2},
  };
  int failures = 0, n = 0;
  uint64_t state = 12345;
  for (const auto& c : cases) {
    const Geometry g{c[0], c[1], c[2], c[3], c[4]};
    std::vector<double> x(g.B * g.S * g.D);
    for (auto& v : x) {
      state = state * 6364136223846793005ULL + 1442695040888963407ULL;
      v = double(state >> 11) / double(1ULL << 53) - 0.5;
    }
    const auto block = emulate_compress(g, x);
    const double e_c = rel_err(block, oracle_compress(g, x));
    const auto y = emulate_decompress(g, block);
    const double e_d = rel_err(y, oracle_decompress(g, block));
    const double e_p = rel_err(emulate_compress(g, y), block);  // projection: compress(decompress(b)) == b
    ++n;
    // Decompress scales by a float 1/(S*D), as the kernel does: 1e-6 leaves room for that, while a
    // wrong index shows up as an O(1) error.
    if (!(e_c < 1e-10 && e_d < 1e-6 && e_p < 1e-6)) {
      ++failures;
      std::printf("FAIL B=%lld S=%lld D=%lld k_s=%lld k_d=%lld: compress %.3g decompress %.3g projection %.3g\n",
                  (long long)g.B, (long long)g.S, (long long)g.D, (long long)g.k_s, (long long)g.k_d, e_c, e_d, e_p);
    }
  }
  std::printf("layout emulation: %d of %d geometries ok\n", n - failures, n);
  return failures == 0 ? 0 : 1;
}
