// Fixed-order products for kvverify's strict numerics (kvverify/reference/fixed_order.py).
//
// y[g][r][o] = the sum over k < n of x[g][r][k] * b[g][k][o], each product rounded to T, the sum taken as
// kvverify.reference.numerics.tree_sum takes it: the terms zero-padded to P, the power of two >= n, then the
// upper half added onto the lower until one is left. With H = P / 2 the first level gives
//   a[i] = p[i] + p[i + H]   (p[i + H] = +0 past n: one add of +0, as tree_sum's padding),
// and the levels after it add a[i] and a[i + H/2], and so on. Read in bit-reversed order, j -> a[rev(j)], those
// levels pair neighbours: the tree is the pairwise sum of contiguous halves, so the leaves can be streamed in
// that order into a binary counter (a stack of partial sums per level) over a block of outputs at once, as a
// GEMM microkernel streams its k loop. Every output's additions are fixed by n alone: never by the rows, the
// blocking, the thread count or the vector width. Built with -ffp-contract=off (no fused multiply-add) and
// without -ffast-math; vector lanes round as scalars do, so -march=native changes no bit.
#include "common.h"

namespace {

template <typename T, int R, int C>
inline Block<T, R, C> add(const Block<T, R, C>& a, const Block<T, R, C>& b) {
  Block<T, R, C> s;
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) s.v[r][c] = a.v[r][c] + b.v[r][c];
  return s;
}

// Where leaf j's NB values of b (at k = rev(j), and k + H) are: a packed panel [j][lo, hi][NB] ...
template <typename T> struct Panel {
  const T* panel;
  const T* lo(int64_t j) const { return panel + j * 2 * block_outputs<T>(); }
  const T* hi(int64_t j) const { return panel + (j * 2 + 1) * block_outputs<T>(); }
  void prefetch(int64_t) const {}  // streamed in order: the hardware prefetches it
  static constexpr int C = NV;
};

// ... or b itself, when its outputs are contiguous (values for the weighted sum) and the rows too few to pay
// for packing: CC vectors of outputs at once, so that each row of b read (in bit-reversed order) is read whole.
template <typename T, int CC> struct Direct {
  static constexpr int C = CC;
  const T* b;  // at the block's first output
  int64_t sbk, H, n;
  const int64_t* rev;
  const int64_t* idx;  // or null
  int64_t sik;
  int64_t row(int64_t k) const { return idx ? idx[k * sik] : k; }
  const T* lo(int64_t j) const { return b + row(rev[j]) * sbk; }
  const T* hi(int64_t j) const { return b + row(rev[j] + H) * sbk; }
  void prefetch(int64_t j) const {  // rows in bit-reversed order: no hardware prefetcher follows them
    if (j < H) {
      for (int c = 0; c < C; ++c) __builtin_prefetch(lo(j) + c * lanes<T>());
      if (rev[j] + H < n)
        for (int c = 0; c < C; ++c) __builtin_prefetch(hi(j) + c * lanes<T>());
    }
  }
};

// Leaf j: a[rev(j)] for R rows. xp: packed rows, [r][j][lo, hi] with row stride xs; bp: where b's values are.
// A leaf whose upper term is padding (k + H >= n) adds +0, as tree_sum does, without the product 0 * 0.
template <typename T, int R, typename S>
inline Block<T, R, S::C> leaf(const T* xp, int64_t xs, const S& bp, int64_t j, bool upper) {
  typedef typename Lanes<T>::U V;
  const V* lo = reinterpret_cast<const V*>(bp.lo(j));
  Block<T, R, S::C> out;
  if (upper) {
    const V* hi = reinterpret_cast<const V*>(bp.hi(j));
    for (int r = 0; r < R; ++r) {
      const T a = xp[r * xs + 2 * j], c = xp[r * xs + 2 * j + 1];
      for (int v = 0; v < S::C; ++v) out.v[r][v] = a * lo[v] + c * hi[v];
    }
  } else {
    for (int r = 0; r < R; ++r) {
      const T a = xp[r * xs + 2 * j];
      for (int v = 0; v < S::C; ++v) out.v[r][v] = a * lo[v] + T(0);
    }
  }
  return out;
}

// The pairwise sum of leaves j0 .. j0 + W - 1 (W a power of two).
template <typename T, int R, int W, typename S>
inline Block<T, R, S::C> subtree(const T* xp, int64_t xs, const S& bp, const bool* upper, int64_t j0) {
  if constexpr (W == 1) {
    return leaf<T, R, S>(xp, xs, bp, j0, upper[j0]);
  } else {
    return add(subtree<T, R, W / 2, S>(xp, xs, bp, upper, j0), subtree<T, R, W / 2, S>(xp, xs, bp, upper, j0 + W / 2));
  }
}

// R rows against one panel: the H leaves in groups of W, each group's subtree carried into the counter.
template <typename T, int R, int W, typename S>
void micro(const T* xp, int64_t xs, const S& bp, const bool* upper, int64_t H, T* y, int64_t syr, int64_t syo,
           int64_t valid) {
  Block<T, R, S::C> stack[64];
  const int64_t groups = H / W;
  int top = 0;
  for (int64_t m = 0; m < groups; ++m) {
    for (int w = 0; w < W; ++w) bp.prefetch((m + AHEAD) * W + w);
    Block<T, R, S::C> t = subtree<T, R, W, S>(xp, xs, bp, upper, m * W);
    int level = 0;
    while ((m >> level) & 1) {
      t = add(stack[level], t);
      ++level;
    }
    stack[level] = t;
    top = level;
  }
  const Block<T, R, S::C>& sum = stack[top];
  for (int r = 0; r < R; ++r) {
    const T* lanes = reinterpret_cast<const T*>(&sum.v[r][0]);
    for (int64_t o = 0; o < valid; ++o) y[r * syr + o * syo] = lanes[o];
  }
}

template <typename T, int R, typename S>
void micro_rows(const T* xp, int64_t xs, const S& bp, const bool* upper, int64_t H, T* y, int64_t syr, int64_t syo,
                int64_t valid) {
  if (H >= U && S::C * R <= 8) {  // wider blocks would spill a subtree's registers
    micro<T, R, U, S>(xp, xs, bp, upper, H, y, syr, syo, valid);
  } else if (H >= 2) {
    micro<T, R, 2, S>(xp, xs, bp, upper, H, y, syr, syo, valid);
  } else {
    micro<T, R, 1, S>(xp, xs, bp, upper, H, y, syr, syo, valid);
  }
}

// The last rows < RB of a chunk, one call for all of them.
template <typename T, int K, typename S>
void tail(int64_t rows, const T* xp, int64_t xs, const S& bp, const bool* upper, int64_t H, T* y, int64_t syr,
          int64_t syo, int64_t valid) {
  if constexpr (K >= 1) {
    if (rows == K) {
      micro_rows<T, K, S>(xp, xs, bp, upper, H, y, syr, syo, valid);
    } else {
      tail<T, K - 1, S>(rows, xp, xs, bp, upper, H, y, syr, syo, valid);
    }
  }
}

// Rows of packed x against one block of outputs, RB at a time.
template <typename T, typename S>
void rows_against(const S& bp, const T* xp, int64_t xs, const bool* upper, int64_t H, int64_t rows, T* y,
                  int64_t syr, int64_t syo, int64_t valid) {
  int64_t r = 0;
  for (; r + RB <= rows; r += RB) micro_rows<T, RB, S>(xp + r * xs, xs, bp, upper, H, y + r * syr, syr, syo, valid);
  if (r < rows) tail<T, RB - 1, S>(rows - r, xp + r * xs, xs, bp, upper, H, y + r * syr, syr, syo, valid);
}



// The row kernel, for b whose k is contiguous (b[k][o] = W[o][k]: a linear layer's weight, keys for q·k) and few
// rows (a decode step): no panel is packed. Each output's products run along its row of W in vectors of L lanes,
// the first level and the levels between vectors are vector adds (a[i] += a[i + w], w >= L), and the last
// log2(L) levels, inside one vector, are taken for L outputs at once by a butterfly: two vectors' groups of 2g
// lanes are split into lower and upper halves and added, g = L/2 .. 1, so lane i meets lane i + g as in the tree.
template <typename T> struct Index;
template <> struct Index<float> { typedef int32_t I __attribute__((vector_size(VBYTES))); };
template <> struct Index<double> { typedef int64_t I __attribute__((vector_size(VBYTES))); };


// Groups of 2g lanes of a and b -> groups of g: [a0, b0, a1, b1, ...], each the sum of its group's two halves.
template <typename T, int g> inline Vec<T> halve(Vec<T> a, Vec<T> b) {
  constexpr int L = lanes<T>();
#if defined(__clang__)  // no __builtin_shuffle: the same lanes picked one by one
  Vec<T> lo, hi;
  for (int l = 0; l < L; ++l) {
    const int m = l / g, q = m / 2;
    lo[l] = (m % 2 ? b : a)[q * 2 * g + l % g];
    hi[l] = (m % 2 ? b : a)[q * 2 * g + l % g + g];
  }
  return lo + hi;
#else
  typename Index<T>::I lo, hi;
  for (int l = 0; l < L; ++l) {
    const int m = l / g, q = m / 2;
    lo[l] = (m % 2 ? L : 0) + q * 2 * g + l % g;
    hi[l] = lo[l] + g;
  }
  return __builtin_shuffle(a, b, lo) + __builtin_shuffle(a, b, hi);
#endif
}

template <typename T, int g> inline void butterfly(Vec<T>* v, int count) {
  if constexpr (g >= 1) {
    for (int m = 0; m < count / 2; ++m) v[m] = halve<T, g>(v[2 * m], v[2 * m + 1]);
    butterfly<T, g / 2>(v, count / 2);
  }
}

// Lane l of the butterfly's result holds output order[l] of its L inputs.
template <typename T> std::vector<int> butterfly_order() {
  constexpr int L = lanes<T>();
  std::vector<std::vector<int>> groups(L);  // per vector, the output of each group of lanes
  for (int o = 0; o < L; ++o) groups[o] = {o};
  for (int count = L; count > 1; count /= 2) {
    for (int m = 0; m < count / 2; ++m) {
      std::vector<int> merged;
      for (size_t q = 0; q < groups[2 * m].size(); ++q) {
        merged.push_back(groups[2 * m][q]);
        merged.push_back(groups[2 * m + 1][q]);
      }
      groups[m] = merged;
    }
  }
  return groups[0];
}

// Outputs o0 .. o0 + valid - 1 of one row. xpad: the row of x, zero from n to P; a: scratch of H / L vectors.
template <typename T>
void row_block(const T* xpad, const T* b, int64_t sbo, int64_t n, int64_t H, int64_t o0, int64_t valid, T* y,
               int64_t syo, Vec<T>* a, const int* order) {
  constexpr int L = lanes<T>();
  const int64_t C = H / L;
  Vec<T> v[L];
  for (int c = 0; c < L; ++c) {
    if (c >= valid) {
      v[c] = Vec<T>{};
      continue;
    }
    const T* row = b + (o0 + c) * sbo;
    for (int64_t i = 0; i < C; ++i) {
      const int64_t k = i * L, kh = H + i * L;
      const Vec<T> lo = *reinterpret_cast<const VecU<T>*>(row + k) * *reinterpret_cast<const VecU<T>*>(xpad + k);
      Vec<T> hi{};  // +0: the padding's products
      if (kh + L <= n) {
        hi = *reinterpret_cast<const VecU<T>*>(row + kh) * *reinterpret_cast<const VecU<T>*>(xpad + kh);
      } else if (kh < n) {  // the row's last lanes, the rest +0 (never read past the row)
        Vec<T> part{};
        std::memcpy(&part, row + kh, sizeof(T) * size_t(n - kh));
        hi = part * *reinterpret_cast<const VecU<T>*>(xpad + kh);
      }
      a[i] = lo + hi;
    }
    for (int64_t w = C / 2; w >= 1; w /= 2)
      for (int64_t i = 0; i < w; ++i) a[i] = a[i] + a[i + w];
    v[c] = a[0];
  }
  butterfly<T, L / 2>(v, L);
  const T* sums = reinterpret_cast<const T*>(&v[0]);
  for (int l = 0; l < L; ++l)
    if (order[l] < valid) y[order[l] * syo] = sums[l];
}


// Units [u0, u1) of the flattened (g, output block) list.
template <typename T>
void run_units(const Problem<T>& p, const std::vector<int64_t>& rev, const bool* upper, int64_t u0, int64_t u1) {
  const int64_t NB = block_outputs<T>();
  const int64_t H = int64_t(rev.size()), n = p.n;
  const int64_t blocks = (p.N + NB - 1) / NB;
  const int64_t xs = 2 * H;
  Aligned xbuf(sizeof(T) * size_t(std::min(p.R, ROWS) * xs));
  Aligned bbuf(sizeof(T) * size_t(H * 2 * NB));
  T* xp = static_cast<T*>(xbuf.p);
  T* bp = static_cast<T*>(bbuf.p);
  Aligned tbuf(sizeof(T) * size_t(n * NB));
  T* tile = static_cast<T*>(tbuf.p);
  for (int64_t u = u0; u < u1;) {
    const int64_t g = u / blocks, ob0 = u % blocks;
    const int64_t ob1 = std::min(blocks, ob0 + (u1 - u));
    const T* x = p.x + g * p.sxg;
    const T* b = p.b + g * p.sbg;
    T* y = p.y + g * p.syg;
    const int64_t* ix = p.idx ? p.idx + g * p.sig : nullptr;
    for (int64_t r0 = 0; r0 < p.R; r0 += ROWS) {
      const int64_t rows = std::min(ROWS, p.R - r0);
      for (int64_t r = 0; r < rows; ++r) {
        const T* xr = x + (r0 + r) * p.sxr;
        T* out = xp + r * xs;
        for (int64_t j = 0; j < H; ++j) {
          const int64_t k = rev[j];
          out[2 * j] = xr[k * p.sxk];
          out[2 * j + 1] = k + H < n ? xr[(k + H) * p.sxk] : T(0);
        }
      }
      int64_t ob = ob0;
      if (p.sbo == 1 && p.R <= ROW_KERNEL_ROWS) {  // whole blocks read in place, up to 8 at once
        for (const int64_t end = std::min(ob1, p.N / NB); ob < end;) {
          const int64_t take = end - ob >= 8 ? 8 : end - ob >= 4 ? 4 : end - ob >= 2 ? 2 : 1;
          const T* bo = b + ob * NB;
          T* yo = y + r0 * p.syr + ob * NB * p.syo;
          const int64_t valid = take * NB;
          if (take == 8) {
            rows_against(Direct<T, 8>{bo, p.sbk, H, n, rev.data(), ix, p.sik}, xp, xs, upper, H, rows, yo, p.syr,
                         p.syo, valid);
          } else if (take == 4) {
            rows_against(Direct<T, 4>{bo, p.sbk, H, n, rev.data(), ix, p.sik}, xp, xs, upper, H, rows, yo, p.syr,
                         p.syo, valid);
          } else if (take == 2) {
            rows_against(Direct<T, 2>{bo, p.sbk, H, n, rev.data(), ix, p.sik}, xp, xs, upper, H, rows, yo, p.syr,
                         p.syo, valid);
          } else {
            rows_against(Direct<T, 1>{bo, p.sbk, H, n, rev.data(), ix, p.sik}, xp, xs, upper, H, rows, yo, p.syr,
                         p.syo, valid);
          }
          ob += take;
        }
      }
      for (; ob < ob1; ++ob) {
        const int64_t o0 = ob * NB, valid = std::min(NB, p.N - o0);
        T* yo = y + r0 * p.syr + o0 * p.syo;
        // the panel's columns k-major (tile[k][c]), then its rows in leaf order
        if (p.sbo == 1) {
          for (int64_t k = 0; k < n; ++k) {
            const T* bk = b + (ix ? ix[k * p.sik] : k) * p.sbk + o0;
            T* tk = tile + k * NB;
            for (int64_t c = 0; c < NB; ++c) tk[c] = c < valid ? bk[c] : T(0);
          }
        } else {
          for (int64_t c = 0; c < NB; ++c) {
            const T* bc = b + (o0 + c) * p.sbo;
            for (int64_t k = 0; k < n; ++k)
              tile[k * NB + c] = c < valid ? bc[(ix ? ix[k * p.sik] : k) * p.sbk] : T(0);
          }
        }
        for (int64_t j = 0; j < H; ++j) {
          const int64_t k = rev[j];
          std::memcpy(bp + 2 * j * NB, tile + k * NB, sizeof(T) * NB);
          if (k + H < n) {
            std::memcpy(bp + (2 * j + 1) * NB, tile + (k + H) * NB, sizeof(T) * NB);
          } else {
            std::memset(bp + (2 * j + 1) * NB, 0, sizeof(T) * NB);
          }
        }
        rows_against(Panel<T>{bp}, xp, xs, upper, H, rows, yo, p.syr, p.syo, valid);
      }
    }
    u += ob1 - ob0;
  }
}



// The row kernel over units [u0, u1) of the flattened (g, block of L outputs) list.
template <typename T> void run_rows(const Problem<T>& p, int64_t P, int64_t u0, int64_t u1) {
  constexpr int L = lanes<T>();
  const int64_t blocks = (p.N + L - 1) / L, H = P / 2;
  static const std::vector<int> order = butterfly_order<T>();  // built once (thread-safe static)
  Aligned xbuf(sizeof(T) * size_t(p.R * P));
  Aligned abuf(sizeof(Vec<T>) * size_t(H / L));
  T* xpad = static_cast<T*>(xbuf.p);
  Vec<T>* a = static_cast<Vec<T>*>(abuf.p);
  int64_t packed = -1;  // the group whose rows xpad holds
  for (int64_t u = u0; u < u1; ++u) {
    const int64_t g = u / blocks, o0 = (u % blocks) * L;
    if (g != packed) {
      for (int64_t r = 0; r < p.R; ++r) {
        const T* xr = p.x + g * p.sxg + r * p.sxr;
        for (int64_t k = 0; k < P; ++k) xpad[r * P + k] = k < p.n ? xr[k * p.sxk] : T(0);
      }
      packed = g;
    }
    for (int64_t r = 0; r < p.R; ++r)
      row_block<T>(xpad + r * P, p.b + g * p.sbg, p.sbo, p.n, H, o0, std::min<int64_t>(L, p.N - o0),
                   p.y + g * p.syg + r * p.syr + o0 * p.syo, p.syo, a, order.data());
  }
}



template <typename T> int tree_matmul(const Problem<T>& p, int threads) try {
  if (p.n < 2 || p.G < 0 || p.R < 0 || p.N < 0) return 1;  // n = 1 has no tree: the caller multiplies
  if (p.G == 0 || p.R == 0 || p.N == 0) return 0;
  int64_t P = 1;
  int bits = 0;
  while (P < p.n) {
    P *= 2;
    ++bits;
  }
  const int64_t H = P / 2;
  std::vector<int64_t> rev(size_t(H), 0);
  for (int64_t j = 0; j < H; ++j) {
    int64_t r = 0;
    for (int bit = 0; bit < bits - 1; ++bit) r |= ((j >> bit) & 1) << (bits - 2 - bit);
    rev[j] = r;
  }
  std::unique_ptr<bool[]> upper(new bool[size_t(H)]);
  for (int64_t j = 0; j < H; ++j) upper[j] = rev[j] + H < p.n;
  // Few rows against a b whose k is contiguous: the row kernel, which packs nothing; else the panels.
  const bool by_rows = p.sbk == 1 && p.idx == nullptr && p.R <= ROW_KERNEL_ROWS && H >= lanes<T>();
  const int64_t NB = by_rows ? lanes<T>() : block_outputs<T>();
  const int64_t units = p.G * ((p.N + NB - 1) / NB);
  const int64_t products = p.G * p.R * P * p.N;
  return split(units, thread_count<T>(threads, units, products), [&](int64_t u0, int64_t u1) {
    if (by_rows) {
      run_rows<T>(p, P, u0, u1);
    } else {
      run_units<T>(p, rev, upper.get(), u0, u1);
    }
  });
} catch (...) {  // memory for the tables: report, never unwind into the caller
  return 3;
}

}  // namespace

extern "C" {

int kv_tree_matmul_f32(int64_t G, int64_t R, int64_t n, int64_t N, const float* x, int64_t sxg, int64_t sxr,
                       int64_t sxk, const float* b, int64_t sbg, int64_t sbk, int64_t sbo, float* y, int64_t syg,
                       int64_t syr, int64_t syo, const int64_t* idx, int64_t sig, int64_t sik, int threads) {
  return tree_matmul<float>({G, R, n, N, x, sxg, sxr, sxk, b, sbg, sbk, sbo, y, syg, syr, syo, idx, sig, sik},
                            threads);
}

int kv_tree_matmul_f64(int64_t G, int64_t R, int64_t n, int64_t N, const double* x, int64_t sxg, int64_t sxr,
                       int64_t sxk, const double* b, int64_t sbg, int64_t sbk, int64_t sbo, double* y, int64_t syg,
                       int64_t syr, int64_t syo, const int64_t* idx, int64_t sig, int64_t sik, int threads) {
  return tree_matmul<double>({G, R, n, N, x, sxg, sxr, sxk, b, sbg, sbk, sbo, y, syg, syr, syo, idx, sig, sik},
                             threads);
}

}
