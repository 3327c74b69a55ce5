// What kvverify's native kernels share (kvverify/reference/fixed_order.py compiles them together): vector types,
// the problem's shape and strides, aligned scratch memory, the split across threads. Built with
// -ffp-contract=off (no fused multiply-add) and without -ffast-math; vector lanes round as scalars do, so
// -march=native changes no bit.
#pragma once
#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <thread>
#include <vector>

namespace {

// The vector width of the machine's widest registers: 64 bytes with AVX-512, else 32 (AVX2, NEON pairs). A wider
// type than the registers is split by the compiler and spilled through memory; the order of the additions is
// the tree's whatever the width, so the width changes no bit.
#if defined(__AVX512F__)
constexpr int VBYTES = 64;
#else
constexpr int VBYTES = 32;
#endif

template <typename T> struct Lanes;
template <> struct Lanes<float> {
  typedef float V __attribute__((vector_size(VBYTES)));
  typedef float U __attribute__((vector_size(VBYTES), aligned(4)));  // for unaligned loads
};
template <> struct Lanes<double> {
  typedef double V __attribute__((vector_size(VBYTES)));
  typedef double U __attribute__((vector_size(VBYTES), aligned(8)));
};

// Blocking (measured on a Zen 4 core, AVX-512): RB rows × NV vectors of outputs per microkernel call, leaves
// summed U at a time in registers before entering the counter; ROWS rows packed at a time.
constexpr int NV = 1;
constexpr int RB = 6;
constexpr int U = 4;
constexpr int64_t ROWS = 64;
constexpr int64_t MIN_WORK = 1 << 21;  // products per thread below which fewer threads are used
constexpr int64_t ROW_KERNEL_ROWS = 4;  // rows up to which the row kernel runs (see run_rows)
constexpr int64_t AHEAD = 8;  // groups of leaves ahead whose rows of b are prefetched (direct path)

template <typename T> constexpr int64_t block_outputs() { return NV * int64_t(VBYTES / sizeof(T)); }

template <typename T, int R, int C> struct Block {  // R rows × C vectors of outputs
  typename Lanes<T>::V v[R][C];
};

template <typename T> using Vec = typename Lanes<T>::V;
template <typename T> using VecU = typename Lanes<T>::U;

template <typename T> constexpr int lanes() { return int(VBYTES / sizeof(T)); }

struct Aligned {
  void* p = nullptr;
  explicit Aligned(size_t bytes) {
    p = std::aligned_alloc(64, (bytes + 63) / 64 * 64 + 64);
    if (p == nullptr) throw std::bad_alloc();
  }
  ~Aligned() { std::free(p); }
  Aligned(const Aligned&) = delete;
  Aligned& operator=(const Aligned&) = delete;
};

template <typename T> struct Problem {
  int64_t G, R, n, N;
  const T* x;
  int64_t sxg, sxr, sxk;
  const T* b;
  int64_t sbg, sbk, sbo;
  T* y;
  int64_t syg, syr, syo;
  const int64_t* idx = nullptr;  // when given, term k reads b's row idx[g * sig + k * sik] (keys in a query's order)
  int64_t sig = 0, sik = 0;
};

// Splits the units of work across threads: each thread takes a contiguous range; a range whose thread could not
// be started runs here. Every output is computed whole by one thread, so the split changes no bit.
template <typename F> int split(int64_t units, int64_t count, const F& run) {
  std::vector<std::thread> pool;
  std::atomic<bool> failed{false};
  auto part = [&](int64_t t) {
    try {
      run(units * t / count, units * (t + 1) / count);
    } catch (...) {
      failed = true;
    }
  };
  int64_t started = 1;
  try {
    for (; started < count; ++started) pool.emplace_back(part, started);
  } catch (...) {
  }
  part(0);
  for (int64_t t = started; t < count; ++t) part(t);
  for (auto& thread : pool) thread.join();
  return failed ? 2 : 0;
}

template <typename T> int64_t thread_count(int threads, int64_t units, int64_t products) {
  return std::max<int64_t>(1, std::min<int64_t>({int64_t(threads), units, products / MIN_WORK}));
}

}  // namespace
