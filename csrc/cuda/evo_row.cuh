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

#include <cstring>

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
  double e;   // ENT: sum of exp(l - m) (l - m) over them (the entropy's numerator)
  TopK<K> top;
  double st;  // TABLE: sum of exp(v - kTableRef) over the columns the value table holds
  double as;  // SAMPLE: best Gumbel score, its logit and column
  float al;
  int ai;

  __device__ __forceinline__ void init() {
    m = -INFINITY;
    s = 0.0;
    e = 0.0;
    st = 0.0;
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

// (m, s, e) <- merged with (m2, s2, e2), e = sum exp(l - m) (l - m): moving a part
// from its max to mn multiplies s by f = exp(m - mn) and e by f after adding
// (m - mn) s. Empty parts (s == 0) add nothing.
__device__ __forceinline__ void combine_mse(float& m, double& s, double& e, float m2, double s2, double e2) {
  const float mn = m > m2 ? m : m2;
  const double d1 = static_cast<double>(m) - static_cast<double>(mn);
  const double d2 = static_cast<double>(m2) - static_cast<double>(mn);
  const double f1 = (s == 0.0) ? 0.0 : exp(d1);
  const double f2 = (s2 == 0.0) ? 0.0 : exp(d2);
  e = ((s == 0.0) ? 0.0 : f1 * (e + d1 * s)) + ((s2 == 0.0) ? 0.0 : f2 * (e2 + d2 * s2));
  s = ((s == 0.0) ? 0.0 : s * f1) + ((s2 == 0.0) ? 0.0 : s2 * f2);
  m = mn;
}

// 2^(j/16), j = 0..15, correctly rounded (the table of exp_nonpos).
static __constant__ double kExp2Sixteenths[16] = {
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
  const double* table;    // TABLE: the value table (shared memory)
};

// The value table (TABLE): for every bf16 value v with 2^-12 <= |v| < 2^8, one
// entry per bit pattern (sign, 20 binades, 7 mantissa bits: 5120 entries, 40 KB
// of shared memory, under the 48 KB a block may hold statically) holding
// exp(v - kTableRef) in float64. The range reaches down to 2^-12 because a warp
// step meets 256 columns: of N(0, 1.3) logits, one below 2^-8 about half the
// time, one below 2^-12 about 4 % of the time. It depends on no data, so a
// column in its range costs one shared-memory load and one float64 add instead
// of a float64 exp; kTableRef = 2^8 bounds every entry by 1 and keeps all of
// them normal (>= exp(-512)). The columns a thread sums this way (st) are
// brought to its running max once, after its scan (fold_table). Logits outside
// the range, -inf and NaN take the per-column exp.
constexpr int kTableLoExp = 127 - 12;
constexpr int kTableHalf = 20 * 128;  // entries of one sign
constexpr int kTableSize = 2 * kTableHalf;
constexpr double kTableRef = 256.0;

// The bf16 value of table entry j: sign * kTableHalf + (binade - kTableLoExp) * 128 + mantissa.
__device__ __forceinline__ float table_value(int j) {
  const unsigned neg = j >= kTableHalf ? 1u : 0u;
  const unsigned r = static_cast<unsigned>(j) - neg * kTableHalf;
  const unsigned u = (neg << 31) | (((r >> 7) + kTableLoExp) << 23) | ((r & 0x7fu) << 16);
  return __uint_as_float(u);
}

__device__ __forceinline__ double gumbel(uint64_t key, int col) {
  const double u = rng_unit(rng_bits(key, col));
  return -log(-log(u));
}

// Folds N consecutive columns base..base+N-1 (values f, already float) into a.
template <int N, int K, bool SAMPLE, bool ENT = false>
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
    const double dm = static_cast<double>(a.m) - static_cast<double>(vmax);
    if (ENT) a.e = (a.s == 0.0) ? 0.0 : exp(dm) * (a.e + dm * a.s);
    a.s *= exp(dm);
    a.m = vmax;
  }
  const double m = static_cast<double>(a.m);
  double t = 0.0, te = 0.0;
#pragma unroll
  for (int e = 0; e < N; ++e) {
    const double d = static_cast<double>(f[e]) - m;
    const double x = (f[e] == -INFINITY) ? 0.0 : exp_nonpos(d, c.exp_tab);
    t += x;
    if (ENT) te += (f[e] == -INFINITY) ? 0.0 : x * d;
  }
  a.s += t;
  if (ENT) a.e += te;
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

// ---------------------------------------------------------------- value table (bf16)
// A group of 8 bf16 columns as their bit patterns: column 2i in the low half of
// word i, column 2i + 1 in the high half.
template <bool VEC>
__device__ __forceinline__ void load_words(const __nv_bfloat16* __restrict__ p, unsigned (&w)[4]) {
  if (VEC) {
    const uint4 v = *reinterpret_cast<const uint4*>(p);
    w[0] = v.x;
    w[1] = v.y;
    w[2] = v.z;
    w[3] = v.w;
  } else {
    const unsigned short* q = reinterpret_cast<const unsigned short*>(p);
#pragma unroll
    for (int i = 0; i < 4; ++i) w[i] = static_cast<unsigned>(q[2 * i]) | (static_cast<unsigned>(q[2 * i + 1]) << 16);
  }
}

__device__ __forceinline__ void words_to_float(const unsigned (&w)[4], float (&f)[8]) {
#pragma unroll
  for (int i = 0; i < 4; ++i) {  // a bf16 is the high half of its float
    f[2 * i] = __uint_as_float(w[i] << 16);
    f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
  }
}

__device__ __forceinline__ __nv_bfloat162 as_bf162(unsigned u) {
  __nv_bfloat162 h;
  memcpy(&h, &u, sizeof(h));
  return h;
}

// A group of 8 bf16 columns under the value table, on their bit patterns. When
// every column is in the table's range and none is the skip column, the group
// adds its 8 entries to a.st and this returns true; no float64 exp, no float
// conversion. a.st is held against the fixed kTableRef, so a new running max
// rescales only a.s (one exp, as in consume()), and a group that may enter the
// top-k makes consume()'s insertions from its floats. Otherwise nothing changes
// and the caller takes consume(). The lanes of a warp decide alone and any lane
// on consume() holds the warp there, so only out-of-range values (zeros, |v| <
// 2^-12, |v| >= 2^8, inf, NaN) and the skip column leave this path: with new
// maxima and top-k candidates also sent to consume(), a CPU emulation of V =
// 126464 rows found consume() in ~98 % of warp steps. The table index of pattern
// b is r = (b & 0x7fff) - (kTableLoExp << 7) (binade and mantissa; in range iff
// r < kTableHalf) plus kTableHalf for a negative sign, table_value()'s layout.
template <int K, bool SAMPLE>
__device__ __forceinline__ bool consume_table(RowAcc<K, SAMPLE>& a, const unsigned (&w)[4], int base,
                                              const RowCtx& c) {
  unsigned out = 0u;  // the largest r (unsigned: below the range wraps around)
  unsigned bin[8];
#pragma unroll
  for (int e = 0; e < 8; ++e) {
    const unsigned b = (e & 1) ? (w[e >> 1] >> 16) : w[e >> 1];  // pattern in the low 16 bits
    const unsigned r = (b & 0x7fffu) - (static_cast<unsigned>(kTableLoExp) << 7);
    out = r > out ? r : out;
    bin[e] = r + ((b >> 15) & 1u) * static_cast<unsigned>(kTableHalf);
  }
  if (out >= static_cast<unsigned>(kTableHalf) || static_cast<unsigned>(c.skip_col - base) < 8u) return false;
  // every value is finite here, so the bf16 max is exact
  const __nv_bfloat162 m2 = __hmax2(__hmax2(as_bf162(w[0]), as_bf162(w[1])),
                                    __hmax2(as_bf162(w[2]), as_bf162(w[3])));
  const float vmax = fmaxf(__low2float(m2), __high2float(m2));
  if (vmax >= a.top.v[K - 1]) {  // as consume(): the group may change the top-k
    float f[8];
    words_to_float(w, f);
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      if (a.top.admits(f[e], base + e)) a.top.insert(f[e], base + e);
    }
  }
  if (vmax > a.m) {  // as consume(); a.st does not depend on the max
    a.s *= exp(static_cast<double>(a.m) - static_cast<double>(vmax));
    a.m = vmax;
  }
  double u[8];
#pragma unroll
  for (int e = 0; e < 8; ++e) u[e] = c.table[bin[e]];
#pragma unroll
  for (int d = 1; d < 8; d *= 2) {  // a tree: three dependent adds, not eight
#pragma unroll
    for (int e = 0; e + d < 8; e += 2 * d) u[e] += u[e + d];
  }
  a.st += u[0];
  return true;
}

template <int K, bool SAMPLE, bool VEC>
__device__ __forceinline__ void table_group(RowAcc<K, SAMPLE>& a, const unsigned (&w)[4], int base,
                                            const RowCtx& c) {
  if (consume_table(a, w, base, c)) return;
  float f[8];
  words_to_float(w, f);
  consume<8, K, SAMPLE>(a, f, base, c);
}

// Groups g = tid, tid + nt, ... of N columns each (two loads in flight).
template <typename T, int K, bool SAMPLE, bool TABLE, bool VEC, bool ENT>
__device__ __forceinline__ void scan_groups(RowAcc<K, SAMPLE>& a, const T* __restrict__ p, int c0,
                                            int ngroups, const RowCtx& c) {
  constexpr int N = VecWidth<T>::value;
  const int nt = static_cast<int>(blockDim.x);
  int g = static_cast<int>(threadIdx.x);
  if constexpr (TABLE) {  // T is __nv_bfloat16 (launch_rows)
    for (; g + nt < ngroups; g += 2 * nt) {
      unsigned w0[4], w1[4];
      load_words<VEC>(p + g * N, w0);
      load_words<VEC>(p + (g + nt) * N, w1);
      table_group<K, SAMPLE, VEC>(a, w0, c0 + g * N, c);
      table_group<K, SAMPLE, VEC>(a, w1, c0 + (g + nt) * N, c);
    }
    if (g < ngroups) {
      unsigned w0[4];
      load_words<VEC>(p + g * N, w0);
      table_group<K, SAMPLE, VEC>(a, w0, c0 + g * N, c);
    }
  } else {
    for (; g + nt < ngroups; g += 2 * nt) {
      float f0[N], f1[N];
      load_group<T, N, VEC>(p + g * N, f0);
      load_group<T, N, VEC>(p + (g + nt) * N, f1);
      consume<N, K, SAMPLE, ENT>(a, f0, c0 + g * N, c);
      consume<N, K, SAMPLE, ENT>(a, f1, c0 + (g + nt) * N, c);
    }
    if (g < ngroups) {
      float f0[N];
      load_group<T, N, VEC>(p + g * N, f0);
      consume<N, K, SAMPLE, ENT>(a, f0, c0 + g * N, c);
    }
  }
}

// Columns [c0, c1) of a row, in groups of N = 16 / sizeof(T) columns counted
// from c0 (16-byte loads when the row is aligned, scalar loads otherwise) and a
// scalar tail done by thread 0. Which thread sees which column, and in which
// order, does not depend on the row's alignment, so identical rows give
// bit-identical results. A thread sees its columns in increasing order.
template <typename T, int K, bool SAMPLE, bool TABLE, bool ENT>
__device__ __forceinline__ void scan_range(RowAcc<K, SAMPLE>& a, const T* __restrict__ row, int c0,
                                           int c1, const RowCtx& c) {
  constexpr int N = VecWidth<T>::value;
  const T* p = row + c0;
  const int len = c1 - c0;
  if (len <= 0) return;
  const int ngroups = len / N;
  if (is_aligned16(p)) {
    scan_groups<T, K, SAMPLE, TABLE, true, ENT>(a, p, c0, ngroups, c);
  } else {
    scan_groups<T, K, SAMPLE, TABLE, false, ENT>(a, p, c0, ngroups, c);
  }
  if (threadIdx.x == 0) {
    for (int col = ngroups * N; col < len; ++col) {
      float f[1] = {to_float(p[col])};
      consume<1, K, SAMPLE, ENT>(a, f, c0 + col, c);
    }
  }
}

// Merges the states of the 32 lanes of a warp. Afterwards every lane holds the
// warp's (m, s) and argmax, and lane j < rounds holds the warp's j-th best
// entry in (myv, myi) (rounds <= K). Each round is a shuffle argmax of the
// lanes' list heads; the lane owning the winner pops it.
template <int K, bool SAMPLE, bool ENT>
__device__ __forceinline__ void warp_reduce_row(RowAcc<K, SAMPLE>& a, int rounds, float& myv,
                                                int& myi) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) {
    const float m2 = __shfl_xor_sync(kFullMask, a.m, o);
    const double s2 = __shfl_xor_sync(kFullMask, a.s, o);
    if (ENT) {
      const double e2 = __shfl_xor_sync(kFullMask, a.e, o);
      combine_mse(a.m, a.s, a.e, m2, s2, e2);
    } else {
      combine_ms(a.m, a.s, m2, s2);
    }
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
template <int K, bool SAMPLE, bool ENT>
__device__ __forceinline__ void block_reduce_row(RowAcc<K, SAMPLE>& a, int rounds, float& myv,
                                                 int& myi) {
  __shared__ float sh_v[kRowWarps][K];
  __shared__ int sh_i[kRowWarps][K];
  __shared__ double sh_s[kRowWarps];
  __shared__ double sh_e[kRowWarps];
  __shared__ double sh_as[kRowWarps];
  __shared__ float sh_m[kRowWarps];
  __shared__ float sh_al[kRowWarps];
  __shared__ int sh_ai[kRowWarps];
  const int lane = lane_id();
  const int w = warp_id();
  warp_reduce_row<K, SAMPLE, ENT>(a, rounds, myv, myi);
  if (lane < rounds) {
    sh_v[w][lane] = myv;
    sh_i[w][lane] = myi;
  }
  if (lane == 0) {
    sh_m[w] = a.m;
    sh_s[w] = a.s;
    sh_e[w] = a.e;
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
    a.e = sh_e[lane];
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
  warp_reduce_row<K, SAMPLE, ENT>(a, rounds, myv, myi);
}

// Partial record of one column chunk of a row (split-V).
struct alignas(16) EvoPartial {
  double s;
  double e;
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
  int rounds;    // max(k, 1), 2 for the margin: the argmax at temperature 0 is the top-1
  int confidence;  // 0 p[x0], 1 the margin (top-1 minus top-2), 2 sum p log p
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
  const float v1 = __shfl_sync(kFullMask, myv, 1);  // the second largest value (margin)
  if (lane == 0) {
    if (!(isfinite(m) && isfinite(s))) {
      atomicMin(reinterpret_cast<unsigned long long*>(p.status), static_cast<unsigned long long>(row));
    }
    // temperature 0: the argmax is the top-1 (same exclusion, same tie rule)
    const int x0 = SAMPLE ? a.ai : myi;
    const float lx0 = SAMPLE ? a.al : myv;
    p.x0[row] = x0;
    double q = exp(static_cast<double>(lx0) - m) / s;
    if (p.confidence == 1) q = exp(static_cast<double>(myv) - m) / s - exp(static_cast<double>(v1) - m) / s;
    if (p.confidence == 2) q = a.e / s - log(s);
    p.q[row] = p.random_remask ? rng_unit(mix64(rng_key(p.seed, kStreamRemask, b, pos))) : q;
  }
  if (lane < p.k) {
    p.tp[row * p.k + lane] = exp(static_cast<double>(myv) - m) / s;
    p.ids[row * (p.k + 1) + lane] = myi;
  }
}

// Brings the value table's sum to the thread's running max (TABLE; per thread,
// after its scan): s += st * exp(kTableRef - m). st > 0 means some column was
// >= -2^8, so m >= -2^8 and the factor is at most exp(512): no overflow.
template <int K, bool SAMPLE>
__device__ __forceinline__ void fold_table(RowAcc<K, SAMPLE>& a) {
  if (a.st != 0.0) a.s += a.st * exp(kTableRef - static_cast<double>(a.m));
  a.st = 0.0;
}

template <typename T, int K, bool SAMPLE, bool TABLE, bool ENT>
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
  __shared__ double table[TABLE ? kTableSize : 1];
  if (threadIdx.x < 16) exp_tab[threadIdx.x] = kExp2Sixteenths[threadIdx.x];
  __syncthreads();
  if constexpr (TABLE) {  // 20 entries per thread; arguments in (-512, 0)
    for (int j = static_cast<int>(threadIdx.x); j < kTableSize; j += kRowThreads) {
      table[j] = exp_nonpos(static_cast<double>(table_value(j)) - kTableRef, exp_tab);
    }
    __syncthreads();
  }
  RowCtx c;
  c.exp_tab = exp_tab;
  c.table = table;
  c.skip_col = p.skip_col;
  c.temp = p.temp;
  c.key = SAMPLE ? rng_key(p.seed, kStreamGumbel, b, pos) : 0;
  RowAcc<K, SAMPLE> a;
  a.init();
  scan_range<T, K, SAMPLE, TABLE, ENT>(a, rp, static_cast<int>(c0), static_cast<int>(c1), c);
  if constexpr (TABLE) fold_table(a);
  float myv;
  int myi;
  block_reduce_row<K, SAMPLE, ENT>(a, p.rounds, myv, myi);
  if (warp_id() != 0) return;
  if (p.splits == 1) {
    finalize_row(p, row, b, pos, a, myv, myi);
    return;
  }
  EvoPartial* out = p.part + row * p.splits + split;
  const int lane = lane_id();
  if (lane == 0) {
    out->s = a.s;
    out->e = a.e;
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
template <int K, bool SAMPLE, bool ENT>
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
    if (ENT) {
      combine_mse(a.m, a.s, a.e, in->m, in->s, in->e);
    } else {
      combine_ms(a.m, a.s, in->m, in->s);
    }
    if (SAMPLE && better(in->as, in->ai, a.as, a.ai)) {
      a.as = in->as;
      a.al = in->al;
      a.ai = in->ai;
    }
    for (int j = 0; j < p.rounds; ++j) a.top.push(in->tv[j], in->ti[j]);
  }
  float myv;
  int myi;
  warp_reduce_row<K, SAMPLE, ENT>(a, p.rounds, myv, myi);
  finalize_row(p, row, b, pos, a, myv, myi);
}

}  // namespace detail
}  // namespace cuda
}  // namespace evofast
