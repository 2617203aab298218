// Row pass of evo_step_fused (csrc/README.md, "evo_step_fused"): torch-free.
//
// Each logits row is read once; every thread keeps an online
// (max, sum exp) in float64, its own sorted top-K in registers and, when
// sampling, the Gumbel-max argmax; a block then merges its warps (shuffles, then
// shared memory). Either one block owns a row (it finalises the row: x0, q,
// top-k probabilities) or several blocks own column chunks of it (split-V) and
// write partial records that evo_merge_kernel finalises. The sequence pass is in
// evo_seq.cuh.
#pragma once

#include "common.cuh"

namespace evofast {
namespace cuda {
namespace detail {

constexpr int kRowThreads = 256;
constexpr int kRowWarps = kRowThreads / kWarp;
constexpr int kMergeWarps = 4;
constexpr int kNoIndex = 0x7fffffff;

// Order of the top-k and of the argmax: larger value first, smaller index on ties.
__device__ __forceinline__ bool better(float a, int ia, float b, int ib) {
  return a > b || (a == b && ia < ib);
}
__device__ __forceinline__ bool better(double a, int ia, double b, int ib) {
  return a > b || (a == b && ia < ib);
}

// The K best (value, index) pairs seen by one thread, sorted, in registers
// (every index is static after unrolling). Empty slots hold (-inf, kNoIndex),
// which any real entry, -inf included, beats.
template <int K>
struct TopK {
  float v[K];
  int i[K];

  __device__ __forceinline__ void init() {
#pragma unroll
    for (int j = 0; j < K; ++j) {
      v[j] = -INFINITY;
      i[j] = kNoIndex;
    }
  }
  __device__ __forceinline__ bool admits(float nv, int ni) const {
    return better(nv, ni, v[K - 1], i[K - 1]);
  }
  // Sorted insertion of an entry that admits() accepted (the last one drops).
  __device__ __forceinline__ void insert(float nv, int ni) {
#pragma unroll
    for (int j = K - 1; j > 0; --j) {
      if (better(nv, ni, v[j - 1], i[j - 1])) {
        v[j] = v[j - 1];
        i[j] = i[j - 1];
      } else if (better(nv, ni, v[j], i[j])) {
        v[j] = nv;
        i[j] = ni;
      }
    }
    if (better(nv, ni, v[0], i[0])) {
      v[0] = nv;
      i[0] = ni;
    }
  }
  __device__ __forceinline__ void push(float nv, int ni) {
    if (admits(nv, ni)) insert(nv, ni);
  }
  __device__ __forceinline__ void pop() {
#pragma unroll
    for (int j = 0; j < K - 1; ++j) {
      v[j] = v[j + 1];
      i[j] = i[j + 1];
    }
    v[K - 1] = -INFINITY;
    i[K - 1] = kNoIndex;
  }
};

// Per-thread (later per-warp / per-block) state of the row pass.
template <int K, bool SAMPLE>
struct RowAcc {
  float m;    // max of the columns seen (logits are exact in float)
  double s;   // sum of exp(l - m) over them, float64
  TopK<K> top;
  double as;  // SAMPLE: best Gumbel score, its logit and column
  float al;
  int ai;

  __device__ __forceinline__ void init() {
    m = -INFINITY;
    s = 0.0;
    top.init();
    as = -INFINITY;
    al = -INFINITY;
    ai = kNoIndex;
  }
};

// (m, s) <- (m, s) merged with (m2, s2); commutative bit for bit. A part with
// s == 0 is empty (or all -inf) and adds nothing; NaN propagates.
__device__ __forceinline__ void combine_ms(float& m, double& s, float m2, double s2) {
  const float mn = m > m2 ? m : m2;
  const double t1 = (s == 0.0) ? 0.0 : s * exp(static_cast<double>(m) - static_cast<double>(mn));
  const double t2 = (s2 == 0.0) ? 0.0 : s2 * exp(static_cast<double>(m2) - static_cast<double>(mn));
  m = mn;
  s = t1 + t2;
}

// 2^(j/16), j = 0..15, correctly rounded (the table of exp_nonpos).
__constant__ double kExp2Sixteenths[16] = {
    0x1.0000000000000p+0, 0x1.0b5586cf9890fp+0, 0x1.172b83c7d517bp+0, 0x1.2387a6e756238p+0,
    0x1.306fe0a31b715p+0, 0x1.3dea64c123422p+0, 0x1.4bfdad5362a27p+0, 0x1.5ab07dd485429p+0,
    0x1.6a09e667f3bcdp+0, 0x1.7a11473eb0187p+0, 0x1.8ace5422aa0dbp+0, 0x1.9c49182a3f090p+0,
    0x1.ae89f995ad3adp+0, 0x1.c199bdd85529cp+0, 0x1.d5818dcfba487p+0, 0x1.ea4afa2a490dap+0};

// exp(x) in float64 for x <= 0, within about 2 ulp: the per-column exp of the
// row pass, which libdevice's general exp made compute-bound (float64 is the
// one expensive unit here). x = (16 n + j) ln2/16 + r with |r| <= ln2/32, so
// exp(x) = 2^n * 2^(j/16) * e^r: a two-constant reduction, a degree-7 Taylor
// polynomial (truncation < 2e-18), a table in shared memory (16 doubles fill
// the 32 banks once: conflict-free) and an exponent add. -inf, NaN and results
// near the subnormal range take libdevice's exp.
__device__ __forceinline__ double exp_nonpos(double x, const double* __restrict__ tab) {
  if (!(x >= -708.0)) return exp(x);
  constexpr double kMagic = 0x1.8p52;                  // round-to-integer by addition
  const double t = fma(x, 0x1.71547652b82fep+4, kMagic);  // x * 16 / ln2
  const int k = __double2loint(t);
  const double kd = t - kMagic;
  double r = fma(kd, -0x1.62e42fefa0000p-5, x);      // ln2/16, high 38 bits: k * hi is exact
  r = fma(kd, -0x1.cf79abc9e3b3ap-44, r);            // ln2/16, the rest
  double e = fma(r, 0x1.a01a01a01a01ap-13, 0x1.6c16c16c16c17p-10);
  e = fma(e, r, 0x1.1111111111111p-7);
  e = fma(e, r, 0x1.5555555555555p-5);
  e = fma(e, r, 0x1.5555555555555p-3);
  e = fma(e, r, 0x1.0000000000000p-1);
  e = fma(e, r, 1.0);
  e = fma(e, r, 1.0);
  const double v = tab[k & 15] * e;                   // in [0.97, 2.05]: normal
  return __longlong_as_double(__double_as_longlong(v) + (static_cast<long long>(k >> 4) << 52));
}

struct RowCtx {
  int skip_col;   // !SAMPLE: column read as -inf; SAMPLE: column the argmax skips; -1: none
  double temp;    // temperature (SAMPLE)
  uint64_t key;   // RNG key of the row (SAMPLE)
  const double* exp_tab;  // kExp2Sixteenths in shared memory
  unsigned* hist;         // HIST: the block's value histogram (shared memory)
};

// The value histogram (HIST): bf16 values with 2^-8 <= |v| < 2^8, one bin per
// bit pattern (sign, 16 binades, 7 mantissa bits: 4096 bins, 16 KB of shared
// memory). Logits outside that range, -inf and NaN take the per-column exp.
constexpr int kHistLoExp = 127 - 8;
constexpr int kHistBins = 2 * 16 * 128;

// Bin of a float that came from a bf16 (its low 16 bits are zero), or -1.
__device__ __forceinline__ int hist_bin(float v) {
  const unsigned u = __float_as_uint(v);
  const unsigned e = ((u >> 23) & 0xffu) - static_cast<unsigned>(kHistLoExp);
  return e < 16u ? static_cast<int>(((u >> 31) << 11) | (e << 7) | ((u >> 16) & 0x7fu)) : -1;
}

// The value of bin j.
__device__ __forceinline__ float hist_value(int j) {
  const unsigned u = (static_cast<unsigned>(j >> 11) << 31) |
                     ((static_cast<unsigned>((j >> 7) & 15) + kHistLoExp) << 23) |
                     (static_cast<unsigned>(j & 0x7f) << 16);
  return __uint_as_float(u);
}

__device__ __forceinline__ double gumbel(uint64_t key, int col) {
  const double u = rng_unit(rng_bits(key, col));
  return -log(-log(u));
}

// Folds N consecutive columns base..base+N-1 (values f, already float) into a.
template <int N, int K, bool SAMPLE, bool HIST>
__device__ __forceinline__ void consume(RowAcc<K, SAMPLE>& a, float (&f)[N], int base,
                                        const RowCtx& c) {
  if (!SAMPLE && static_cast<unsigned>(c.skip_col - base) < static_cast<unsigned>(N)) {
#pragma unroll
    for (int e = 0; e < N; ++e) {  // static indices: f stays in registers
      if (base + e == c.skip_col) f[e] = -INFINITY;
    }
  }
  float vmax = -INFINITY;
#pragma unroll
  for (int e = 0; e < N; ++e) vmax = f[e] > vmax ? f[e] : vmax;  // NaN never becomes the max; it reaches s below
  // The top-k changes only when the group's best reaches its last entry (ties
  // too: the index decides), which soon becomes rare: test the group once.
  if (vmax >= a.top.v[K - 1]) {
#pragma unroll
    for (int e = 0; e < N; ++e) {
      if (a.top.admits(f[e], base + e)) a.top.insert(f[e], base + e);
    }
  }
  if (vmax > a.m) {
    a.s *= exp(static_cast<double>(a.m) - static_cast<double>(vmax));
    a.m = vmax;
  }
  const double m = static_cast<double>(a.m);
  double t = 0.0;
  if (HIST) {
    // a.s holds the columns outside the histogram only; the bins are added
    // against the block's max once the block has seen all its columns.
#pragma unroll
    for (int e = 0; e < N; ++e) {
      const int bin = hist_bin(f[e]);
      if (bin >= 0) {
        atomicAdd(c.hist + bin, 1u);
      } else if (f[e] != -INFINITY) {  // -inf adds nothing (and m may be -inf: -inf - -inf is NaN)
        t += exp_nonpos(static_cast<double>(f[e]) - m, c.exp_tab);
      }
    }
  } else {
#pragma unroll
    for (int e = 0; e < N; ++e) {
      t += (f[e] == -INFINITY) ? 0.0 : exp_nonpos(static_cast<double>(f[e]) - m, c.exp_tab);
    }
  }
  a.s += t;
  if (SAMPLE) {
#pragma unroll
    for (int e = 0; e < N; ++e) {
      const int col = base + e;
      if (col == c.skip_col) continue;
      const double sc = static_cast<double>(f[e]) + c.temp * gumbel(c.key, col);
      if (better(sc, col, a.as, a.ai)) {
        a.as = sc;
        a.al = f[e];
        a.ai = col;
      }
    }
  }
}

// N consecutive columns as floats: one 16-byte load, or N scalar loads.
template <typename T, int N, bool VEC>
__device__ __forceinline__ void load_group(const T* __restrict__ p, float (&f)[N]) {
  if (VEC) {
    const Pack<T, N> x = *reinterpret_cast<const Pack<T, N>*>(p);
#pragma unroll
    for (int e = 0; e < N; ++e) f[e] = to_float(x.v[e]);
  } else {
#pragma unroll
    for (int e = 0; e < N; ++e) f[e] = to_float(p[e]);
  }
}

// Groups g = tid, tid + nt, ... of N columns each (two loads in flight).
template <typename T, int K, bool SAMPLE, bool HIST, bool VEC>
__device__ __forceinline__ void scan_groups(RowAcc<K, SAMPLE>& a, const T* __restrict__ p, int c0,
                                            int ngroups, const RowCtx& c) {
  constexpr int N = VecWidth<T>::value;
  const int nt = static_cast<int>(blockDim.x);
  int g = static_cast<int>(threadIdx.x);
  for (; g + nt < ngroups; g += 2 * nt) {
    float f0[N], f1[N];
    load_group<T, N, VEC>(p + g * N, f0);
    load_group<T, N, VEC>(p + (g + nt) * N, f1);
    consume<N, K, SAMPLE, HIST>(a, f0, c0 + g * N, c);
    consume<N, K, SAMPLE, HIST>(a, f1, c0 + (g + nt) * N, c);
  }
  if (g < ngroups) {
    float f0[N];
    load_group<T, N, VEC>(p + g * N, f0);
    consume<N, K, SAMPLE, HIST>(a, f0, c0 + g * N, c);
  }
}

// Columns [c0, c1) of a row, in groups of N = 16 / sizeof(T) columns counted
// from c0 (16-byte loads when the row is aligned, scalar loads otherwise) and a
// scalar tail done by thread 0. Which thread sees which column, and in which
// order, does not depend on the row's alignment, so identical rows give
// bit-identical results. A thread sees its columns in increasing order.
template <typename T, int K, bool SAMPLE, bool HIST>
__device__ __forceinline__ void scan_range(RowAcc<K, SAMPLE>& a, const T* __restrict__ row, int c0,
                                           int c1, const RowCtx& c) {
  constexpr int N = VecWidth<T>::value;
  const T* p = row + c0;
  const int len = c1 - c0;
  if (len <= 0) return;
  const int ngroups = len / N;
  if (is_aligned16(p)) {
    scan_groups<T, K, SAMPLE, HIST, true>(a, p, c0, ngroups, c);
  } else {
    scan_groups<T, K, SAMPLE, HIST, false>(a, p, c0, ngroups, c);
  }
  if (threadIdx.x == 0) {
    for (int col = ngroups * N; col < len; ++col) {
      float f[1] = {to_float(p[col])};
      consume<1, K, SAMPLE, HIST>(a, f, c0 + col, c);
    }
  }
}

// Merges the states of the 32 lanes of a warp. Afterwards every lane holds the
// warp's (m, s) and argmax, and lane j < rounds holds the warp's j-th best
// entry in (myv, myi) (rounds <= K). Each round is a shuffle argmax of the
// lanes' list heads; the lane owning the winner pops it.
template <int K, bool SAMPLE>
__device__ __forceinline__ void warp_reduce_row(RowAcc<K, SAMPLE>& a, int rounds, float& myv,
                                                int& myi) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) {
    const float m2 = __shfl_xor_sync(kFullMask, a.m, o);
    const double s2 = __shfl_xor_sync(kFullMask, a.s, o);
    combine_ms(a.m, a.s, m2, s2);
  }
  if (SAMPLE) {
#pragma unroll
    for (int o = kWarp / 2; o > 0; o >>= 1) {
      const double as2 = __shfl_xor_sync(kFullMask, a.as, o);
      const float al2 = __shfl_xor_sync(kFullMask, a.al, o);
      const int ai2 = __shfl_xor_sync(kFullMask, a.ai, o);
      if (better(as2, ai2, a.as, a.ai)) {
        a.as = as2;
        a.al = al2;
        a.ai = ai2;
      }
    }
  }
  const int lane = lane_id();
  myv = -INFINITY;
  myi = kNoIndex;
  for (int t = 0; t < rounds; ++t) {
    float hv = a.top.v[0];
    int hi = a.top.i[0];
#pragma unroll
    for (int o = kWarp / 2; o > 0; o >>= 1) {
      const float v2 = __shfl_xor_sync(kFullMask, hv, o);
      const int i2 = __shfl_xor_sync(kFullMask, hi, o);
      if (better(v2, i2, hv, hi)) {
        hv = v2;
        hi = i2;
      }
    }
    // Real columns are unique across lanes; lanes whose head is an empty slot
    // may all pop when an empty slot wins, which changes nothing.
    if (a.top.i[0] == hi) a.top.pop();
    if (lane == t) {
      myv = hv;
      myi = hi;
    }
  }
}

// Block-wide merge (blockDim.x == kRowThreads): warps, then warp 0 over the
// warps' results. The result is valid in warp 0 only (as warp_reduce_row).
template <int K, bool SAMPLE>
__device__ __forceinline__ void block_reduce_row(RowAcc<K, SAMPLE>& a, int rounds, float& myv,
                                                 int& myi) {
  __shared__ float sh_v[kRowWarps][K];
  __shared__ int sh_i[kRowWarps][K];
  __shared__ double sh_s[kRowWarps];
  __shared__ double sh_as[kRowWarps];
  __shared__ float sh_m[kRowWarps];
  __shared__ float sh_al[kRowWarps];
  __shared__ int sh_ai[kRowWarps];
  const int lane = lane_id();
  const int w = warp_id();
  warp_reduce_row(a, rounds, myv, myi);
  if (lane < rounds) {
    sh_v[w][lane] = myv;
    sh_i[w][lane] = myi;
  }
  if (lane == 0) {
    sh_m[w] = a.m;
    sh_s[w] = a.s;
    sh_as[w] = a.as;
    sh_al[w] = a.al;
    sh_ai[w] = a.ai;
  }
  __syncthreads();
  if (w != 0) return;
  a.init();
  if (lane < kRowWarps) {
    a.m = sh_m[lane];
    a.s = sh_s[lane];
    a.as = sh_as[lane];
    a.al = sh_al[lane];
    a.ai = sh_ai[lane];
#pragma unroll
    for (int j = 0; j < K; ++j) {
      if (j < rounds) {
        a.top.v[j] = sh_v[lane][j];
        a.top.i[j] = sh_i[lane][j];
      }
    }
  }
  warp_reduce_row(a, rounds, myv, myi);
}

// Partial record of one column chunk of a row (split-V).
struct alignas(16) EvoPartial {
  double s;
  double as;
  float m;
  float al;
  int ai;
  int pad;
  float tv[kEvoMaxK];
  int ti[kEvoMaxK];
};

struct RowParams {
  const void* logits;
  int64_t R, V, stride_b, stride_r, row0;
  int skip_col;  // exclude_mask && 0 <= mask_id < V ? mask_id : -1
  int k;         // k_soft
  int rounds;    // max(k, 1): the argmax at temperature 0 is the top-1
  double temp;
  bool random_remask;
  uint64_t seed;
  int chunk;     // columns per split
  int splits;
  int* x0;       // (rows,)
  double* q;     // (rows,)
  double* tp;    // (rows, k)
  int64_t* ids;  // (rows, k + 1): entries 0..k-1 written here
  int64_t* status;
  EvoPartial* part;  // (rows, splits) when splits > 1
};

// Finalises a row from warp-merged state (whole warp calls it).
template <int K, bool SAMPLE>
__device__ __forceinline__ void finalize_row(const RowParams& p, int64_t row, int64_t b, int64_t pos,
                                             const RowAcc<K, SAMPLE>& a, float myv, int myi) {
  const int lane = lane_id();
  const double m = static_cast<double>(a.m);
  const double s = a.s;
  if (lane == 0) {
    if (!(isfinite(m) && isfinite(s))) {
      atomicMin(reinterpret_cast<unsigned long long*>(p.status), static_cast<unsigned long long>(row));
    }
    // temperature 0: the argmax is the top-1 (same exclusion, same tie rule)
    const int x0 = SAMPLE ? a.ai : myi;
    const float lx0 = SAMPLE ? a.al : myv;
    p.x0[row] = x0;
    p.q[row] = p.random_remask ? rng_unit(mix64(rng_key(p.seed, kStreamRemask, b, pos)))
                               : exp(static_cast<double>(lx0) - m) / s;
  }
  if (lane < p.k) {
    p.tp[row * p.k + lane] = exp(static_cast<double>(myv) - m) / s;
    p.ids[row * (p.k + 1) + lane] = myi;
  }
}

// Adds the histogram's bins to every thread's (m, s), against the block's max
// (HIST; all threads call it after their scan).
template <int K, bool SAMPLE>
__device__ __forceinline__ void add_histogram(RowAcc<K, SAMPLE>& a, const unsigned* hist,
                                              const double* tab) {
  __shared__ float sh_max[kRowWarps];
  float m = a.m;
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) {
    const float m2 = __shfl_xor_sync(kFullMask, m, o);
    m = m2 > m ? m2 : m;
  }
  if (lane_id() == 0) sh_max[warp_id()] = m;
  __syncthreads();  // also: every histogram count is in
  m = sh_max[0];
#pragma unroll
  for (int w = 1; w < kRowWarps; ++w) m = sh_max[w] > m ? sh_max[w] : m;
  if (m == -INFINITY) return;  // no finite column (the bins are empty too)
  if (a.s != 0.0) a.s *= exp(static_cast<double>(a.m) - static_cast<double>(m));
  a.m = m;
  const double md = static_cast<double>(m);
  double t = 0.0;
  for (int j = static_cast<int>(threadIdx.x); j < kHistBins; j += kRowThreads) {
    const unsigned n = hist[j];
    if (n != 0u) t += static_cast<double>(n) * exp_nonpos(static_cast<double>(hist_value(j)) - md, tab);
  }
  a.s += t;
}

template <typename T, int K, bool SAMPLE, bool HIST>
__global__ void __launch_bounds__(kRowThreads) evo_row_kernel(const RowParams p) {
  const int64_t row = blockIdx.x;
  const int split = static_cast<int>(blockIdx.y);
  const int64_t b = row / p.R;
  const int64_t r = row - b * p.R;
  const int64_t pos = p.row0 + r;
  const T* rp = static_cast<const T*>(p.logits) + b * p.stride_b + r * p.stride_r;
  const int64_t c0 = static_cast<int64_t>(split) * p.chunk;
  const int64_t c1 = c0 + p.chunk < p.V ? c0 + p.chunk : p.V;
  __shared__ double exp_tab[16];
  __shared__ unsigned hist[HIST ? kHistBins : 1];
  if (threadIdx.x < 16) exp_tab[threadIdx.x] = kExp2Sixteenths[threadIdx.x];
  if (HIST) {
    for (int j = static_cast<int>(threadIdx.x); j < kHistBins; j += kRowThreads) hist[j] = 0u;
  }
  __syncthreads();
  RowCtx c;
  c.exp_tab = exp_tab;
  c.hist = hist;
  c.skip_col = p.skip_col;
  c.temp = p.temp;
  c.key = SAMPLE ? rng_key(p.seed, kStreamGumbel, b, pos) : 0;
  RowAcc<K, SAMPLE> a;
  a.init();
  scan_range<T, K, SAMPLE, HIST>(a, rp, static_cast<int>(c0), static_cast<int>(c1), c);
  if (HIST) add_histogram(a, hist, exp_tab);
  float myv;
  int myi;
  block_reduce_row(a, p.rounds, myv, myi);
  if (warp_id() != 0) return;
  if (p.splits == 1) {
    finalize_row(p, row, b, pos, a, myv, myi);
    return;
  }
  EvoPartial* out = p.part + row * p.splits + split;
  const int lane = lane_id();
  if (lane == 0) {
    out->s = a.s;
    out->as = a.as;
    out->m = a.m;
    out->al = a.al;
    out->ai = a.ai;
    out->pad = 0;
  }
  if (lane < p.rounds) {
    out->tv[lane] = myv;
    out->ti[lane] = myi;
  }
}

// Split-V merge: one warp per row folds the row's `splits` partial records.
template <int K, bool SAMPLE>
__global__ void __launch_bounds__(kMergeWarps* kWarp) evo_merge_kernel(const RowParams p,
                                                                        int64_t rows) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kMergeWarps + warp_id();
  if (row >= rows) return;  // whole warp leaves together
  const int64_t b = row / p.R;
  const int64_t pos = p.row0 + (row - b * p.R);
  RowAcc<K, SAMPLE> a;
  a.init();
  for (int sp = lane_id(); sp < p.splits; sp += kWarp) {
    const EvoPartial* in = p.part + row * p.splits + sp;
    combine_ms(a.m, a.s, in->m, in->s);
    if (SAMPLE && better(in->as, in->ai, a.as, a.ai)) {
      a.as = in->as;
      a.al = in->al;
      a.ai = in->ai;
    }
    for (int j = 0; j < p.rounds; ++j) a.top.push(in->tv[j], in->ti[j]);
  }
  float myv;
  int myi;
  warp_reduce_row(a, p.rounds, myv, myi);
  finalize_row(p, row, b, pos, a, myv, myi);
}

}  // namespace detail
}  // namespace cuda
}  // namespace evofast
