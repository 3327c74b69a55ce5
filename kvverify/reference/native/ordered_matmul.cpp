// The batch-invariant mode's products (kvverify/reference/fixed_order.py; kvverify/invariant/ordered.py).
#include "common.h"

namespace {

// The invariant mode's order (kvverify.invariant.ordered): y = (((+0 + p_0) + p_1) + ...) + p_{n-1}, each product
// rounded first. Blocks of NB outputs, RB rows at a time; b's block is copied k-major unless its outputs are
// contiguous already.
template <typename T, int R>
void ordered_rows(const Problem<T>& p, const T* x, const T* bk, int64_t bstride, T* y, int64_t valid) {
  typedef typename Lanes<T>::U V;
  Vec<T> acc[R];
  for (int r = 0; r < R; ++r) acc[r] = Vec<T>{};  // +0: the sum's start
  for (int64_t k = 0; k < p.n; ++k) {
    const Vec<T> column = *reinterpret_cast<const V*>(bk + k * bstride);
    for (int r = 0; r < R; ++r) acc[r] = acc[r] + x[r * p.sxr + k * p.sxk] * column;
  }
  for (int r = 0; r < R; ++r) {
    const T* lanes_ = reinterpret_cast<const T*>(&acc[r]);
    for (int64_t o = 0; o < valid; ++o) y[r * p.syr + o * p.syo] = lanes_[o];
  }
}

template <typename T, int K>
void ordered_tail(int64_t rows, const Problem<T>& p, const T* x, const T* bk, int64_t bstride, T* y, int64_t valid) {
  if constexpr (K >= 1) {
    if (rows == K) {
      ordered_rows<T, K>(p, x, bk, bstride, y, valid);
    } else {
      ordered_tail<T, K - 1>(rows, p, x, bk, bstride, y, valid);
    }
  }
}

template <typename T> void run_ordered(const Problem<T>& p, int64_t u0, int64_t u1) {
  constexpr int L = lanes<T>();
  const int64_t blocks = (p.N + L - 1) / L;
  Aligned tbuf(sizeof(T) * size_t(p.n * L));
  T* tile = static_cast<T*>(tbuf.p);
  for (int64_t u = u0; u < u1; ++u) {
    const int64_t g = u / blocks, o0 = (u % blocks) * L, valid = std::min<int64_t>(L, p.N - o0);
    const T* b = p.b + g * p.sbg + o0 * p.sbo;
    const T* bk = b;
    int64_t bstride = p.sbk;
    if (p.sbo != 1 || valid < L) {  // k-major copy of the block, zeros past the last output
      for (int64_t k = 0; k < p.n; ++k)
        for (int64_t c = 0; c < L; ++c) tile[k * L + c] = c < valid ? b[k * p.sbk + c * p.sbo] : T(0);
      bk = tile;
      bstride = L;
    }
    const T* x = p.x + g * p.sxg;
    T* y = p.y + g * p.syg + o0 * p.syo;
    int64_t r = 0;
    for (; r + RB <= p.R; r += RB) ordered_rows<T, RB>(p, x + r * p.sxr, bk, bstride, y + r * p.syr, valid);
    if (r < p.R) ordered_tail<T, RB - 1>(p.R - r, p, x + r * p.sxr, bk, bstride, y + r * p.syr, valid);
  }
}

template <typename T> int ordered_matmul(const Problem<T>& p, int threads) try {
  if (p.G < 0 || p.R < 0 || p.N < 0 || p.n < 0) return 1;
  if (p.G == 0 || p.R == 0 || p.N == 0) return 0;
  const int64_t units = p.G * ((p.N + lanes<T>() - 1) / lanes<T>());
  return split(units, thread_count<T>(threads, units, p.G * p.R * p.n * p.N),
               [&](int64_t u0, int64_t u1) { run_ordered<T>(p, u0, u1); });
} catch (...) {
  return 3;
}

}  // namespace

extern "C" {

int kv_ordered_matmul_f32(int64_t G, int64_t R, int64_t n, int64_t N, const float* x, int64_t sxg, int64_t sxr,
                          int64_t sxk, const float* b, int64_t sbg, int64_t sbk, int64_t sbo, float* y, int64_t syg,
                          int64_t syr, int64_t syo, int threads) {
  return ordered_matmul<float>({G, R, n, N, x, sxg, sxr, sxk, b, sbg, sbk, sbo, y, syg, syr, syo}, threads);
}

int kv_ordered_matmul_f64(int64_t G, int64_t R, int64_t n, int64_t N, const double* x, int64_t sxg, int64_t sxr,
                          int64_t sxk, const double* b, int64_t sbg, int64_t sbk, int64_t sbo, double* y,
                          int64_t syg, int64_t syr, int64_t syo, int threads) {
  return ordered_matmul<double>({G, R, n, N, x, sxg, sxr, sxk, b, sbg, sbk, sbo, y, syg, syr, syo}, threads);
}

}
