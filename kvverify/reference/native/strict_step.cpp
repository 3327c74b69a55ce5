// A strict decode step's arithmetic between the transcendentals (kvverify/engine/native_step.py): the norms, the
// projections, RoPE, q·k, the softmax's shift and denominator, the weighted values, the gated MLP and the residual
// adds, each as kvverify.reference.numerics computes it: every elementwise operation in the model's dtype (a
// scalar operand rounded to it first, as torch does), every sum through kv_tree_matmul (the same halving tree).
// exp, rsqrt and silu stay torch's: the caller runs them between these calls on buffers whose length is a
// multiple of the SIMD chunk, as numerics.lane_stable does, so the bits are the module path's.
// float32 and float64 models only: the compute dtype is then the model's, and no cast rounds in between.
#include <cmath>

#include "common.h"

extern "C" {
int kv_tree_matmul_f32(int64_t, int64_t, int64_t, int64_t, const float*, int64_t, int64_t, int64_t, const float*,
                       int64_t, int64_t, int64_t, float*, int64_t, int64_t, int64_t, const int64_t*, int64_t,
                       int64_t, int);
int kv_tree_matmul_f64(int64_t, int64_t, int64_t, int64_t, const double*, int64_t, int64_t, int64_t,
                       const double*, int64_t, int64_t, int64_t, double*, int64_t, int64_t, int64_t, const int64_t*,
                       int64_t, int64_t, int);
}

namespace {

inline int tree_call(const Problem<float>& p, int threads) {
  return kv_tree_matmul_f32(p.G, p.R, p.n, p.N, p.x, p.sxg, p.sxr, p.sxk, p.b, p.sbg, p.sbk, p.sbo, p.y, p.syg,
                            p.syr, p.syo, nullptr, 0, 0, threads);
}
inline int tree_call(const Problem<double>& p, int threads) {
  return kv_tree_matmul_f64(p.G, p.R, p.n, p.N, p.x, p.sxg, p.sxr, p.sxk, p.b, p.sbg, p.sbk, p.sbo, p.y, p.syg,
                            p.syr, p.syo, nullptr, 0, 0, threads);
}

// fixed_order.tree_matmul: y = the tree sum over k of x·b; a sum of one term is that product (no tree).
template <typename T> int tree(const Problem<T>& p, int threads) {
  if (p.n >= 2) return tree_call(p, threads);
  for (int64_t g = 0; g < p.G; ++g)
    for (int64_t r = 0; r < p.R; ++r)
      for (int64_t o = 0; o < p.N; ++o)
        p.y[g * p.syg + r * p.syr + o * p.syo] =
            p.n ? p.x[g * p.sxg + r * p.sxr] * p.b[g * p.sbg + o * p.sbo] : T(0);
  return 0;
}

// x (rows, d) @ W.T, W (N, d) contiguous -> y (rows, N) contiguous: numerics.linear.
template <typename T> int linear(int64_t rows, int64_t d, const T* x, const T* W, int64_t N, T* y, int threads) {
  return tree<T>({1, rows, d, N, x, 0, d, 1, W, 0, 1, d, y, 0, N, 1}, threads);
}

// The sum of each row of x (rows, d) contiguous: fixed_order.tree_sum, a row of ones against the rows.
template <typename T> int row_sums(int64_t rows, int64_t d, const T* x, T* sums, int threads) {
  static const T one = T(1);
  return tree<T>({1, 1, d, rows, &one, 0, 0, 0, x, 0, 1, d, sums, 0, 0, 1}, threads);
}

// What rsqrt takes, per row of x (rows, d): numerics.rms_norm's mean(h·h) + eps, layer_norm's mean(c·c) + eps
// with c = h - mean(h). scratch: rows · d.
template <typename T>
int norm_stats(int64_t rows, int64_t d, const T* x, bool layer, double eps, T* stats, T* scratch, int threads) {
  const T e = T(eps), n = T(d);
  if (layer) {
    if (int status = row_sums<T>(rows, d, x, stats, threads)) return status;
    for (int64_t r = 0; r < rows; ++r) {
      const T mean = stats[r] / n;
      for (int64_t k = 0; k < d; ++k) {
        const T c = x[r * d + k] - mean;
        scratch[r * d + k] = c * c;
      }
    }
  } else {
    for (int64_t i = 0; i < rows * d; ++i) scratch[i] = x[i] * x[i];
  }
  if (int status = row_sums<T>(rows, d, scratch, stats, threads)) return status;
  for (int64_t r = 0; r < rows; ++r) stats[r] = stats[r] / n + e;
  return 0;
}

// The norm applied with its rsqrt r (one per row): rms w·(h·r), layer (c·r)·w + bias. h (rows, d) out.
template <typename T>
int norm_apply(int64_t rows, int64_t d, const T* x, const T* r, const T* w, const T* bias, T* h, int threads) {
  if (bias == nullptr) {
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t k = 0; k < d; ++k) h[i * d + k] = w[k] * (x[i * d + k] * r[i]);
    return 0;
  }
  std::vector<T> sums(static_cast<size_t>(rows));
  if (int status = row_sums<T>(rows, d, x, sums.data(), threads)) return status;
  const T n = T(d);
  for (int64_t i = 0; i < rows; ++i) {
    const T mean = sums[i] / n;
    for (int64_t k = 0; k < d; ++k) h[i * d + k] = ((x[i * d + k] - mean) * r[i]) * w[k] + bias[k];
  }
  return 0;
}

// numerics.apply_rope on `heads` heads of D at the start of each row of y (row stride sy): x·cos + rotate_half(x)·sin.
template <typename T> void rope(int64_t rows, int64_t sy, int64_t heads, int64_t D, const T* cos, const T* sin, T* y) {
  const int64_t half = D / 2, first = D - half;  // rotate_half: cat(-x[half:], x[:half])
  std::vector<T> t(static_cast<size_t>(D));
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t h = 0; h < heads; ++h) {
      T* head = y + i * sy + h * D;
      std::memcpy(t.data(), head, sizeof(T) * size_t(D));
      for (int64_t j = 0; j < D; ++j) {
        const T rotated = j < first ? -t[half + j] : t[j - first];
        head[j] = t[j] * cos[j] + rotated * sin[j];
      }
    }
}

template <typename T> struct Scratch {
  std::vector<T> a, b;
  T* first(size_t n) { return (a.size() < n ? a.resize(n) : void()), a.data(); }
  T* second(size_t n) { return (b.size() < n ? b.resize(n) : void()), b.data(); }
};
template <typename T> Scratch<T>& scratch() {
  thread_local Scratch<T> s;
  return s;
}

// The norm of x (rows, d), then x·W.T (W (N, d)) -> y (rows, N); RoPE on its first rope_heads heads when cos is
// given; with split > 0, columns [0, split) to y and [split, N) to y2 (each contiguous) instead.
template <typename T>
int norm_linear(int64_t rows, int64_t d, const T* x, const T* r, const T* w, const T* bias, const T* W, int64_t N,
                T* y, const T* cos, const T* sin, int64_t rope_heads, int64_t D, int64_t split, T* y2, int threads) {
  Scratch<T>& s = scratch<T>();
  T* h = s.first(size_t(rows * d));
  if (int status = norm_apply<T>(rows, d, x, r, w, bias, h, threads)) return status;
  T* out = split > 0 ? s.second(size_t(rows * N)) : y;
  if (int status = linear<T>(rows, d, h, W, N, out, threads)) return status;
  if (cos != nullptr) rope<T>(rows, N, rope_heads, D, cos, sin, out);
  if (split > 0)
    for (int64_t i = 0; i < rows; ++i) {
      std::memcpy(y + i * split, out + i * N, sizeof(T) * size_t(split));
      std::memcpy(y2 + i * (N - split), out + i * N + split, sizeof(T) * size_t(N - split));
    }
  return 0;
}

// Scores of each query head against the keys of its group, scaled, minus the row's max -> y (B, H, S) contiguous:
// numerics.attention_to_every_key before its exp. q: row b at q + b·sqb, heads (H, D) contiguous; k: (B, Hkv, S, D)
// with strides.
template <typename T>
int shifted_scores(int64_t B, int64_t H, int64_t Hkv, int64_t D, int64_t S, const T* q, int64_t sqb, const T* k,
                   int64_t skb, int64_t skh, int64_t sks, int64_t skd, double scale, T* y, int threads) {
  const int64_t group = H / Hkv;
  for (int64_t b = 0; b < B; ++b) {
    const Problem<T> p{Hkv, group, D, S, q + b * sqb, group * D, D, 1, k + b * skb, skh, skd, sks,
                       y + b * H * S, group * S, S, 1};
    if (int status = tree<T>(p, threads)) return status;
  }
  const T c = T(scale);
  for (int64_t row = 0; row < B * H; ++row) {
    T* s = y + row * S;
    T top = s[0] * c;
    for (int64_t j = 0; j < S; ++j) {
      s[j] = s[j] * c;
      if (std::isnan(s[j]) || s[j] > top) top = std::isnan(top) ? top : s[j];  // amax: a NaN wins
    }
    for (int64_t j = 0; j < S; ++j) s[j] = s[j] - top;
  }
  return 0;
}

// After exp: weights (B, H, S) over their row's tree sum, against the values of their group (B, Hkv, S, D) with
// strides -> (B, H·D), projected by Wo (dm, H·D) and added to x (B, dm) in place; then the next norm's stats.
template <typename T>
int attend(int64_t B, int64_t H, int64_t Hkv, int64_t D, int64_t S, const T* weights, const T* v, int64_t svb,
           int64_t svh, int64_t svs, int64_t svd, const T* Wo, int64_t dm, T* x, bool layer, double eps, T* stats,
           int threads) {
  const int64_t group = H / Hkv, rows = B * H;
  Scratch<T>& s = scratch<T>();
  T* probs = s.first(size_t(rows * S + rows * D + B * dm + rows));
  T* heads = probs + rows * S;  // (B, H·D)
  T* o = heads + rows * D;  // (B, dm)
  T* sums = o + B * dm;  // (B·H)
  if (int status = row_sums<T>(rows, S, weights, sums, threads)) return status;
  for (int64_t row = 0; row < rows; ++row)
    for (int64_t j = 0; j < S; ++j) probs[row * S + j] = weights[row * S + j] / sums[row];
  for (int64_t b = 0; b < B; ++b) {
    const Problem<T> p{Hkv, group, S, D, probs + b * H * S, group * S, S, 1, v + b * svb, svh, svs, svd,
                       heads + b * H * D, group * D, D, 1};
    if (int status = tree<T>(p, threads)) return status;
  }
  if (int status = linear<T>(B, H * D, heads, Wo, dm, o, threads)) return status;
  for (int64_t i = 0; i < B * dm; ++i) x[i] = x[i] + o[i];
  return norm_stats<T>(B, dm, x, layer, eps, stats, s.second(size_t(B * dm)), threads);
}

// The gated MLP's second half: silu(gate) (B, dff) times up, projected by Wd (dm, dff) and added to x (B, dm) in
// place; then the next norm's stats.
template <typename T>
int gated_down(int64_t B, int64_t dff, const T* gate, const T* up, const T* Wd, int64_t dm, T* x, bool layer,
               double eps, T* stats, int threads) {
  Scratch<T>& s = scratch<T>();
  T* h = s.first(size_t(B * dff + B * dm));
  T* o = h + B * dff;
  for (int64_t i = 0; i < B * dff; ++i) h[i] = gate[i] * up[i];
  if (int status = linear<T>(B, dff, h, Wd, dm, o, threads)) return status;
  for (int64_t i = 0; i < B * dm; ++i) x[i] = x[i] + o[i];
  return norm_stats<T>(B, dm, x, layer, eps, stats, s.second(size_t(B * dm)), threads);
}

template <typename F> int guarded(const F& f) {
  try {
    return f();
  } catch (...) {  // memory for scratch: report, never unwind into the caller
    return 3;
  }
}

}  // namespace

#define KV_STEP_FUNCTIONS(T, SUFFIX)                                                                                  \
  int kv_step_norm_stats_##SUFFIX(int64_t rows, int64_t d, const T* x, int layer, double eps, T* stats,             \
                                  int threads) {                                                                    \
    return guarded([&] {                                                                                            \
      return norm_stats<T>(rows, d, x, layer != 0, eps, stats, scratch<T>().second(size_t(rows * d)), threads);     \
    });                                                                                                             \
  }                                                                                                                 \
  int kv_step_norm_linear_##SUFFIX(int64_t rows, int64_t d, const T* x, const T* r, const T* w, const T* bias,      \
                                   const T* W, int64_t N, T* y, const T* cos, const T* sin, int64_t rope_heads,     \
                                   int64_t D, int64_t split, T* y2, int threads) {                                  \
    return guarded([&] {                                                                                            \
      return norm_linear<T>(rows, d, x, r, w, bias, W, N, y, cos, sin, rope_heads, D, split, y2, threads);          \
    });                                                                                                             \
  }                                                                                                                 \
  int kv_step_scores_##SUFFIX(int64_t B, int64_t H, int64_t Hkv, int64_t D, int64_t S, const T* q, int64_t sqb,     \
                              const T* k, int64_t skb, int64_t skh, int64_t sks, int64_t skd, double scale, T* y,   \
                              int threads) {                                                                        \
    return guarded([&] { return shifted_scores<T>(B, H, Hkv, D, S, q, sqb, k, skb, skh, sks, skd, scale, y, threads); }); \
  }                                                                                                                 \
  int kv_step_attend_##SUFFIX(int64_t B, int64_t H, int64_t Hkv, int64_t D, int64_t S, const T* weights,            \
                              const T* v, int64_t svb, int64_t svh, int64_t svs, int64_t svd, const T* Wo,          \
                              int64_t dm, T* x, int layer, double eps, T* stats, int threads) {                     \
    return guarded([&] {                                                                                            \
      return attend<T>(B, H, Hkv, D, S, weights, v, svb, svh, svs, svd, Wo, dm, x, layer != 0, eps, stats, threads); \
    });                                                                                                             \
  }                                                                                                                 \
  int kv_step_gated_down_##SUFFIX(int64_t B, int64_t dff, const T* gate, const T* up, const T* Wd, int64_t dm,      \
                                  T* x, int layer, double eps, T* stats, int threads) {                             \
    return guarded([&] { return gated_down<T>(B, dff, gate, up, Wd, dm, x, layer != 0, eps, stats, threads); });    \
  }

extern "C" {
KV_STEP_FUNCTIONS(float, f32)
KV_STEP_FUNCTIONS(double, f64)
}
