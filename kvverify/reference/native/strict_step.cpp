// A strict decode step's arithmetic between the transcendentals (kvverify/engine/native_step.py): the norms, the
// projections, RoPE, q·k, the softmax's shift and denominator, the weighted values, the gated MLP and the residual
// adds, each as kvverify.reference.numerics computes it: every elementwise operation in its dtype (a scalar operand
// rounded to it first, as torch does; an operation on the model's bfloat16 values computed in float32 and rounded
// to bfloat16, as torch's CPU kernels do), every sum through kv_tree_matmul (the same halving tree) in the compute
// dtype. exp, rsqrt and silu stay torch's: the caller runs them between these calls on buffers whose length is a
// multiple of the SIMD chunk, as numerics.lane_stable does, so the bits are the module path's.
// The model's dtype S is float32, float64 or bfloat16; T, the compute dtype, is float64 for float64 and float32 else.
// The residual stream x is held in T, rounded to S after every operation (S's values are T's exactly).
#include <cmath>
#include <type_traits>

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


// bfloat16, as torch holds it: the upper half of a float32.
struct BF16 {
  uint16_t bits;
};

// How the model's dtype S is read into the compute dtype T and rounded back.
template <typename S> struct Storage {  // float, double: the compute dtype itself
  typedef S T;
  static T load(S s) { return s; }
  static S store(T t) { return t; }
};
template <> struct Storage<BF16> {
  typedef float T;
  static float load(BF16 s) {
    const uint32_t u = uint32_t(s.bits) << 16;
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
  }
  static BF16 store(float f) {  // round to nearest even, as c10::BFloat16 does
    uint32_t u;
    std::memcpy(&u, &f, sizeof u);
    if (std::isnan(f)) return BF16{uint16_t((u >> 16) | 0x40)};  // quiet, sign kept
    u += 0x7fff + ((u >> 16) & 1);
    return BF16{uint16_t(u >> 16)};
  }
};
template <typename S> using ComputeOf = typename Storage<S>::T;

// t rounded to S (kept in T): what torch's result in the model's dtype holds.
template <typename S> inline ComputeOf<S> rd(ComputeOf<S> t) { return Storage<S>::load(Storage<S>::store(t)); }

template <typename T> struct Scratch {
  std::vector<T> a, b, c;
  static T* sized(std::vector<T>& v, size_t n) { return (v.size() < n ? v.resize(n) : void()), v.data(); }
  T* first(size_t n) { return sized(a, n); }
  T* second(size_t n) { return sized(b, n); }
};
template <typename T> Scratch<T>& scratch() {
  thread_local Scratch<T> s;
  return s;
}

// A (B, H, S, D) tensor of S at p with strides st, as the kernel reads it in T: p itself where S is T, else a
// contiguous copy in `copy` (st then set to its strides).
template <typename S>
const ComputeOf<S>* readable(const S* p, const int64_t* shape, int64_t* st, std::vector<ComputeOf<S>>& copy) {
  typedef ComputeOf<S> T;
  if constexpr (std::is_same_v<S, T>) {
    return p;
  } else {
    copy.resize(size_t(shape[0] * shape[1] * shape[2] * shape[3]));
    T* out = copy.data();
    for (int64_t b = 0; b < shape[0]; ++b)
      for (int64_t h = 0; h < shape[1]; ++h)
        for (int64_t s = 0; s < shape[2]; ++s)
          for (int64_t d = 0; d < shape[3]; ++d)
            *out++ = Storage<S>::load(p[b * st[0] + h * st[1] + s * st[2] + d * st[3]]);
    st[3] = 1;
    st[2] = shape[3];
    st[1] = shape[2] * shape[3];
    st[0] = shape[1] * shape[2] * shape[3];
    return copy.data();
  }
}

// What rsqrt takes, per row of x (rows, d): numerics.rms_norm's mean(h·h) + eps, layer_norm's mean(c·c) + eps
// with c = h - mean(h), in T. scratch: rows · d.
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

// The norm applied with its rsqrt r (one per row) -> h (rows, d): rms w·(h·r), layer (c·r)·w + bias, each product
// and sum in the model's dtype past the one in T.
template <typename S>
int norm_apply(int64_t rows, int64_t d, const ComputeOf<S>* x, const ComputeOf<S>* r, const S* w, const S* bias,
               ComputeOf<S>* h, int threads) {
  typedef ComputeOf<S> T;
  if (bias == nullptr) {
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t k = 0; k < d; ++k) h[i * d + k] = rd<S>(Storage<S>::load(w[k]) * rd<S>(x[i * d + k] * r[i]));
    return 0;
  }
  std::vector<T> sums(static_cast<size_t>(rows));
  if (int status = row_sums<T>(rows, d, x, sums.data(), threads)) return status;
  const T n = T(d);
  for (int64_t i = 0; i < rows; ++i) {
    const T mean = sums[i] / n;
    for (int64_t k = 0; k < d; ++k)
      h[i * d + k] = rd<S>(rd<S>(rd<S>((x[i * d + k] - mean) * r[i]) * Storage<S>::load(w[k])) +
                           Storage<S>::load(bias[k]));
  }
  return 0;
}

// numerics.apply_rope on `heads` heads of D at the start of each row of y (row stride sy), in the model's dtype:
// x·cos + rotate_half(x)·sin.
template <typename S>
void rope(int64_t rows, int64_t sy, int64_t heads, int64_t D, const S* cos, const S* sin, ComputeOf<S>* y) {
  typedef ComputeOf<S> T;
  const int64_t half = D / 2, first = D - half;  // rotate_half: cat(-x[half:], x[:half])
  std::vector<T> t(static_cast<size_t>(D));
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t h = 0; h < heads; ++h) {
      T* head = y + i * sy + h * D;
      std::memcpy(t.data(), head, sizeof(T) * size_t(D));
      for (int64_t j = 0; j < D; ++j) {
        const T rotated = j < first ? -t[half + j] : t[j - first];
        head[j] = rd<S>(rd<S>(t[j] * Storage<S>::load(cos[j])) + rd<S>(rotated * Storage<S>::load(sin[j])));
      }
    }
}

// The norm of x (rows, d), then x·W.T (W (N, d), in T) rounded to the model's dtype -> y (rows, N) of S; RoPE on
// its first rope_heads heads when cos is given; with split > 0, columns [0, split) to y (S) and [split, N) to y2
// (T, rounded), each contiguous.
template <typename S>
int norm_linear(int64_t rows, int64_t d, const ComputeOf<S>* x, const ComputeOf<S>* r, const S* w, const S* bias,
                const ComputeOf<S>* W, int64_t N, S* y, const S* cos, const S* sin, int64_t rope_heads, int64_t D,
                int64_t split, ComputeOf<S>* y2, int threads) {
  typedef ComputeOf<S> T;
  Scratch<T>& s = scratch<T>();
  T* h = s.first(size_t(rows * d));
  if (int status = norm_apply<S>(rows, d, x, r, w, bias, h, threads)) return status;
  T* out = s.second(size_t(rows * N));
  if (int status = linear<T>(rows, d, h, W, N, out, threads)) return status;
  for (int64_t i = 0; i < rows * N; ++i) out[i] = rd<S>(out[i]);
  if (cos != nullptr) rope<S>(rows, N, rope_heads, D, cos, sin, out);
  const int64_t stored = split > 0 ? split : N;
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t o = 0; o < stored; ++o) y[i * stored + o] = Storage<S>::store(out[i * N + o]);
    for (int64_t o = stored; o < N; ++o) y2[i * (N - stored) + o - stored] = out[i * N + o];
  }
  return 0;
}

// Scores of each query head against the keys of its group, scaled, minus the row's max -> y (B, H, S) contiguous,
// in T: numerics.attention_to_every_key before its exp. q: row b at q + b·sqb, heads (H, D) contiguous; k:
// (B, Hkv, S, D) with strides.
template <typename S>
int shifted_scores(int64_t B, int64_t H, int64_t Hkv, int64_t D, int64_t L, const S* q_stored, int64_t sqb,
                   const S* k_stored, int64_t skb, int64_t skh, int64_t sks, int64_t skd, double scale,
                   ComputeOf<S>* y, int threads) {
  typedef ComputeOf<S> T;
  const int64_t group = H / Hkv;
  Scratch<T>& s = scratch<T>();
  int64_t qshape[4] = {B, 1, 1, H * D}, qst[4] = {sqb, 0, 0, 1};
  const T* q = readable<S>(q_stored, qshape, qst, s.a);
  sqb = qst[0];
  int64_t kshape[4] = {B, Hkv, L, D}, kst[4] = {skb, skh, sks, skd};
  const T* k = readable<S>(k_stored, kshape, kst, s.b);
  for (int64_t b = 0; b < B; ++b) {
    const Problem<T> p{Hkv, group, D, L, q + b * sqb, group * D, D, 1, k + b * kst[0], kst[1], kst[3], kst[2],
                       y + b * H * L, group * L, L, 1};
    if (int status = tree<T>(p, threads)) return status;
  }
  const T c = T(scale);
  for (int64_t row = 0; row < B * H; ++row) {
    T* r = y + row * L;
    T top = r[0] * c;
    for (int64_t j = 0; j < L; ++j) {
      r[j] = r[j] * c;
      if (std::isnan(r[j]) || r[j] > top) top = std::isnan(top) ? top : r[j];  // amax: a NaN wins
    }
    for (int64_t j = 0; j < L; ++j) r[j] = r[j] - top;
  }
  return 0;
}

// After exp: weights (B, H, L) in T over their row's tree sum, against the values of their group (B, Hkv, L, D) of
// S with strides -> heads (B, H·D) rounded to the model's dtype, projected by Wo (dm, H·D) and added to x (B, dm)
// in place; then the next norm's stats.
template <typename S>
int attend(int64_t B, int64_t H, int64_t Hkv, int64_t D, int64_t L, const ComputeOf<S>* weights,
           const S* v_stored, int64_t svb, int64_t svh, int64_t svs, int64_t svd, const ComputeOf<S>* Wo, int64_t dm,
           ComputeOf<S>* x, bool layer, double eps, ComputeOf<S>* stats, int threads) {
  typedef ComputeOf<S> T;
  const int64_t group = H / Hkv, rows = B * H;
  Scratch<T>& s = scratch<T>();
  int64_t vshape[4] = {B, Hkv, L, D}, vst[4] = {svb, svh, svs, svd};
  const T* v = readable<S>(v_stored, vshape, vst, s.c);
  T* probs = s.first(size_t(rows * L + rows * D + B * dm + rows));
  T* heads = probs + rows * L;  // (B, H·D)
  T* o = heads + rows * D;  // (B, dm)
  T* sums = o + B * dm;  // (B·H)
  if (int status = row_sums<T>(rows, L, weights, sums, threads)) return status;
  for (int64_t row = 0; row < rows; ++row)
    for (int64_t j = 0; j < L; ++j) probs[row * L + j] = weights[row * L + j] / sums[row];
  for (int64_t b = 0; b < B; ++b) {
    const Problem<T> p{Hkv, group, L, D, probs + b * H * L, group * L, L, 1, v + b * vst[0], vst[1], vst[2], vst[3],
                       heads + b * H * D, group * D, D, 1};
    if (int status = tree<T>(p, threads)) return status;
  }
  for (int64_t i = 0; i < rows * D; ++i) heads[i] = rd<S>(heads[i]);
  if (int status = linear<T>(B, H * D, heads, Wo, dm, o, threads)) return status;
  for (int64_t i = 0; i < B * dm; ++i) x[i] = rd<S>(x[i] + rd<S>(o[i]));
  return norm_stats<T>(B, dm, x, layer, eps, stats, s.second(size_t(B * dm)), threads);
}

// The gated MLP's second half: silu(gate) (B, dff) of S times up (T, rounded), projected by Wd (dm, dff) and added
// to x (B, dm) in place; then the next norm's stats.
template <typename S>
int gated_down(int64_t B, int64_t dff, const S* gate, const ComputeOf<S>* up, const ComputeOf<S>* Wd, int64_t dm,
               ComputeOf<S>* x, bool layer, double eps, ComputeOf<S>* stats, int threads) {
  typedef ComputeOf<S> T;
  Scratch<T>& s = scratch<T>();
  T* h = s.first(size_t(B * dff + B * dm));
  T* o = h + B * dff;
  for (int64_t i = 0; i < B * dff; ++i) h[i] = rd<S>(Storage<S>::load(gate[i]) * up[i]);
  if (int status = linear<T>(B, dff, h, Wd, dm, o, threads)) return status;
  for (int64_t i = 0; i < B * dm; ++i) x[i] = rd<S>(x[i] + rd<S>(o[i]));
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

// S: the model's dtype; T: the compute dtype (the residual stream x, the norms' statistics, scores, weights).
#define KV_STEP_FUNCTIONS(S, SUFFIX)                                                                                  \
  int kv_step_norm_stats_##SUFFIX(int64_t rows, int64_t d, const ComputeOf<S>* x, int layer, double eps,            \
                                  ComputeOf<S>* stats, int threads) {                                               \
    return guarded([&] {                                                                                            \
      return norm_stats<ComputeOf<S>>(rows, d, x, layer != 0, eps, stats,                                           \
                                      scratch<ComputeOf<S>>().second(size_t(rows * d)), threads);                   \
    });                                                                                                             \
  }                                                                                                                 \
  int kv_step_norm_linear_##SUFFIX(int64_t rows, int64_t d, const ComputeOf<S>* x, const ComputeOf<S>* r,          \
                                   const S* w, const S* bias, const ComputeOf<S>* W, int64_t N, S* y, const S* cos, \
                                   const S* sin, int64_t rope_heads, int64_t D, int64_t split, ComputeOf<S>* y2,    \
                                   int threads) {                                                                   \
    return guarded([&] {                                                                                            \
      return norm_linear<S>(rows, d, x, r, w, bias, W, N, y, cos, sin, rope_heads, D, split, y2, threads);          \
    });                                                                                                             \
  }                                                                                                                 \
  int kv_step_scores_##SUFFIX(int64_t B, int64_t H, int64_t Hkv, int64_t D, int64_t L, const S* q, int64_t sqb,     \
                              const S* k, int64_t skb, int64_t skh, int64_t sks, int64_t skd, double scale,         \
                              ComputeOf<S>* y, int threads) {                                                       \
    return guarded([&] { return shifted_scores<S>(B, H, Hkv, D, L, q, sqb, k, skb, skh, sks, skd, scale, y, threads); }); \
  }                                                                                                                 \
  int kv_step_attend_##SUFFIX(int64_t B, int64_t H, int64_t Hkv, int64_t D, int64_t L,                              \
                              const ComputeOf<S>* weights, const S* v, int64_t svb, int64_t svh, int64_t svs,       \
                              int64_t svd, const ComputeOf<S>* Wo, int64_t dm, ComputeOf<S>* x, int layer,          \
                              double eps, ComputeOf<S>* stats, int threads) {                                       \
    return guarded([&] {                                                                                            \
      return attend<S>(B, H, Hkv, D, L, weights, v, svb, svh, svs, svd, Wo, dm, x, layer != 0, eps, stats, threads); \
    });                                                                                                             \
  }                                                                                                                 \
  int kv_step_gated_down_##SUFFIX(int64_t B, int64_t dff, const S* gate, const ComputeOf<S>* up,                    \
                                  const ComputeOf<S>* Wd, int64_t dm, ComputeOf<S>* x, int layer, double eps,       \
                                  ComputeOf<S>* stats, int threads) {                                               \
    return guarded([&] { return gated_down<S>(B, dff, gate, up, Wd, dm, x, layer != 0, eps, stats, threads); });    \
  }

extern "C" {
KV_STEP_FUNCTIONS(float, f32)
KV_STEP_FUNCTIONS(double, f64)
KV_STEP_FUNCTIONS(BF16, bf16)
}
