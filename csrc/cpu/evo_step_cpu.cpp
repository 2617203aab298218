// C++ CPU kernel of evofast::evo_step_fused (semantics: csrc/README.md).
//
// Two passes:
//  1. Row pass, parallel over the B*R window rows. Each logits row is read from
//     memory once, in chunks of kChunk elements that stay in L1: per chunk the
//     max (and a NaN flag), a running top-k (k <= 16, sorted, only touched when
//     an element beats the current k-th), the float64 sum of exp(l - mx) against
//     the running max (the hot loop: a branch-free polynomial exp on GCC vector
//     extensions, compiled for SSE2 / AVX2+FMA / AVX-512 and picked at run time;
//     EVOFAST_CPU_ISA=default|avx2 caps the choice), and with temperature > 0
//     the Gumbel scores from a counter-based RNG. The chunk sums are rescaled to
//     the final max once at the end (one rounding per chunk, no compounding) and
//     added with compensation, so q lies within ~1e-15 (relative) of the exactly
//     rounded softmax value.
//  2. Sequence pass, parallel over b: eligibility, transfer, revision, and the
//     new (ids, w) representation.
#include "cpu/kernels.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

// 32/64-byte vector types in always-inline helpers change no ABI here: they are
// only ever inlined into the functions compiled for AVX2 / AVX-512.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace evofast {
namespace {

constexpr int64_t kChunk = 2048;  // 8 KiB of fp32: one chunk stays in L1 for all its passes
constexpr int kMaxK = 16;

#if defined(__GNUC__)
#define EVO_INLINE inline __attribute__((always_inline))
#else
#define EVO_INLINE inline
#endif

// ----------------------------------------------------------------------------
// Branch-free scalar math, written so that `#pragma omp simd` loops vectorise.

EVO_INLINE uint64_t f64_bits(double x) {
  uint64_t u;
  std::memcpy(&u, &x, sizeof(u));
  return u;
}
EVO_INLINE double bits_f64(uint64_t u) {
  double x;
  std::memcpy(&x, &u, sizeof(x));
  return x;
}
EVO_INLINE float bits_f32(uint32_t u) {
  float x;
  std::memcpy(&x, &u, sizeof(x));
  return x;
}

// exp(r) for |r| <= ln2/2: the degree-13 Taylor polynomial in Horner form, for
// a double or a GCC vector of doubles (one algorithm for the scalar and SIMD paths).
template <typename T>
EVO_INLINE T exp_taylor13(T r) {
  T p = r * (1.0 / 6227020800.0) + 1.0 / 479001600.0;  // 1/13!, 1/12!
  p = p * r + 1.0 / 39916800.0;
  p = p * r + 1.0 / 3628800.0;
  p = p * r + 1.0 / 362880.0;
  p = p * r + 1.0 / 40320.0;
  p = p * r + 1.0 / 5040.0;
  p = p * r + 1.0 / 720.0;
  p = p * r + 1.0 / 120.0;
  p = p * r + 1.0 / 24.0;
  p = p * r + 1.0 / 6.0;
  p = p * r + 0.5;
  p = p * r + 1.0;
  return p * r + 1.0;
}

// exp(t) for t <= 0 in float64, about 1 ulp: Cody-Waite reduction
// t = n*ln2 + r, |r| <= ln2/2, degree-13 Taylor polynomial, 2^n built in the
// exponent bits. t < -708 gives 0 (the true value is below 2^-1021, nothing
// next to the sum's exp(0) = 1 term); -inf gives 0, NaN gives NaN.
EVO_INLINE double exp_nonpos(double t) {
  constexpr double kLog2e = 1.4426950408889634074;
  constexpr double kShift = 0x1.8p52;                       // round-to-integer shifter
  constexpr double kLn2Hi = 6.93147180369123816490e-01;     // 32 significant bits: n*kLn2Hi exact
  constexpr double kLn2Lo = 1.90821492927058770002e-10;
  const double tc = t < -708.0 ? -708.0 : t;                // NaN passes through
  double kd = tc * kLog2e + kShift;
  const uint64_t ki = f64_bits(kd);                         // low bits: n (two's complement)
  kd -= kShift;
  double r = tc - kd * kLn2Hi;
  r = r - kd * kLn2Lo;
  const double p = exp_taylor13(r);
  const double scale = bits_f64((ki + 1023) << 52);         // 2^n, n in [-1021, 0]
  const double res = p * scale;
  return t < -708.0 ? 0.0 : res;
}

// log(x) for positive normal x in float64 (a few ulp; used for the Gumbel noise).
EVO_INLINE double log_pos(double x) {
  constexpr double kLn2Hi = 6.93147180369123816490e-01;
  constexpr double kLn2Lo = 1.90821492927058770002e-10;
  const uint64_t bits = f64_bits(x);
  const uint64_t tt = bits - 0x3FE6A09E667F3BCDULL;         // bits of sqrt(1/2)
  // x = 2^k * m, m in [sqrt(1/2), sqrt(2)); k = the top 12 bits of tt read as a
  // signed number: flipping their top bit gives k + 2048 (no 64-bit arithmetic
  // shift needed, which AVX2 lacks)
  const double m = bits_f64(bits - (tt & 0xFFF0000000000000ULL));
  const double kd = bits_f64(((tt >> 52) ^ 0x800ULL) + 0x4338000000000000ULL) - (0x1.8p52 + 2048.0);
  const double f = m - 1.0;
  const double s = f / (2.0 + f);                           // log(m) = 2 atanh(s), |s| <= 0.1716
  const double z = s * s;
  double p = 1.0 / 23.0;
  p = p * z + 1.0 / 21.0;
  p = p * z + 1.0 / 19.0;
  p = p * z + 1.0 / 17.0;
  p = p * z + 1.0 / 15.0;
  p = p * z + 1.0 / 13.0;
  p = p * z + 1.0 / 11.0;
  p = p * z + 1.0 / 9.0;
  p = p * z + 1.0 / 7.0;
  p = p * z + 1.0 / 5.0;
  p = p * z + 1.0 / 3.0;
  const double two_s = 2.0 * s;
  const double lm = two_s + two_s * z * p;
  return kd * kLn2Hi + (lm + kd * kLn2Lo);
}

// splitmix64's output function: a bijective 64-bit mixer.
EVO_INLINE uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}
constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ULL;
constexpr uint64_t kStreamGumbel = 1;
constexpr uint64_t kStreamRemask = 2;

// Key of the counter-based RNG for (seed, stream, b, pos); element v of the row
// is the v-th output of a splitmix64 sequence started at this key.
inline uint64_t rng_key(uint64_t seed, uint64_t stream, int64_t b, int64_t pos) {
  uint64_t k = mix64(seed + stream * 0xD1B54A32D192ED03ULL);
  k = mix64(k ^ (static_cast<uint64_t>(b) * kGolden + 0x632BE59BD9B4E019ULL));
  return mix64(k ^ (static_cast<uint64_t>(pos) * 0xC2B2AE3D27D4EB4FULL + 0x165667B19E3779F9ULL));
}

// ----------------------------------------------------------------------------
// Element conversion to the compute type (float for fp32/fp16/bf16, double for fp64).

template <typename scalar_t>
struct ComputeType { using type = float; };
template <>
struct ComputeType<double> { using type = double; };

EVO_INLINE float half_bits_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t em = h & 0x7FFFu;
  // normal and subnormal halves: shift into float position and rebias by 2^112
  const float fin = bits_f32(em << 13) * 0x1p112f;
  const float nonfin = bits_f32((em << 13) | 0x7F800000u);  // inf / NaN
  const float mag = em >= 0x7C00u ? nonfin : fin;
  uint32_t ub;
  std::memcpy(&ub, &mag, sizeof(ub));
  return bits_f32(ub | sign);
}

template <typename scalar_t>
EVO_INLINE void convert_chunk(const scalar_t* __restrict src, int64_t n,
                              typename ComputeType<scalar_t>::type* __restrict dst) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) dst[i] = bits_f32(static_cast<uint32_t>(s[i]) << 16);
  } else if constexpr (std::is_same_v<scalar_t, c10::Half>) {
    const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) dst[i] = half_bits_to_float(s[i]);
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) dst[i] = src[i];
  }
}

template <typename scalar_t>
EVO_INLINE typename ComputeType<scalar_t>::type to_compute(scalar_t v) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    uint16_t b;
    std::memcpy(&b, &v, sizeof(b));
    return bits_f32(static_cast<uint32_t>(b) << 16);
  } else if constexpr (std::is_same_v<scalar_t, c10::Half>) {
    uint16_t b;
    std::memcpy(&b, &v, sizeof(b));
    return half_bits_to_float(b);
  } else {
    return v;
  }
}

// ----------------------------------------------------------------------------
// Per-chunk loops (vectorised).

template <typename vt>
EVO_INLINE vt chunk_max(const vt* __restrict p, int64_t n, int& has_nan) {
  vt m = -std::numeric_limits<vt>::infinity();
  int nan = 0;
#pragma omp simd reduction(max : m) reduction(| : nan)
  for (int64_t i = 0; i < n; ++i) {
    const vt v = p[i];
    m = v > m ? v : m;
    nan |= (v != v);
  }
  has_nan |= nan;
  return m;
}

// sum_i exp(double(p[i]) - mx): the hot loop, written with GCC vector
// extensions on W float64 lanes (W = 2 SSE2, 4 AVX2, 8 AVX-512) and inlined into
// the per-ISA row-pass clones: GCC 12 does not reliably vectorise an
// `omp simd reduction` over exp_nonpos once it is inlined into a function with
// other target options. The sum runs in blocks of kSumBlock elements (each
// lane adds at most kSumBlock / (2 W) terms) whose sums are added with
// compensation: q then lies within ~1e-15 of the exactly rounded value for
// every ISA (a plain float64 torch softmax is off by up to ~1e-13 at V = 126464).
constexpr int64_t kSumBlock = 64;

// total + comp += v, compensated (Neumaier).
EVO_INLINE void neumaier_add(double& total, double& comp, double v) {
  const double t = total + v;
  comp += std::fabs(total) >= std::fabs(v) ? (total - t) + v : (v - t) + total;
  total = t;
}

template <int W>
struct Vec {
  typedef double d __attribute__((vector_size(8 * W)));
  typedef uint64_t u __attribute__((vector_size(8 * W)));
  typedef float f __attribute__((vector_size(4 * W)));
};

// exp_nonpos on W lanes (same algorithm and constants).
template <int W>
EVO_INLINE typename Vec<W>::d vexp_nonpos(typename Vec<W>::d t) {
  using vd = typename Vec<W>::d;
  using vu = typename Vec<W>::u;
  const vd tc = t < -708.0 ? vd{} - 708.0 : t;
  vd kd = tc * 1.4426950408889634074 + 0x1.8p52;
  const vu ki = reinterpret_cast<vu>(kd);
  kd -= 0x1.8p52;
  vd r = tc - kd * 6.93147180369123816490e-01;
  r = r - kd * 1.90821492927058770002e-10;
  const vd p = exp_taylor13(r);
  const vd res = p * reinterpret_cast<vd>((ki + 1023) << 52);
  return t < -708.0 ? vd{} : res;
}

template <int W, typename vt>
EVO_INLINE double chunk_expsum(const vt* __restrict p, int64_t n, double mx) {
  using vd = typename Vec<W>::d;
  using vf = typename Vec<W>::f;
  double total = 0.0, comp = 0.0;
  for (int64_t b0 = 0; b0 < n; b0 += kSumBlock) {
    const int64_t b1 = std::min(n, b0 + kSumBlock);
    vd a0 = {}, a1 = {};
    int64_t i = b0;
    for (; i + 2 * W <= b1; i += 2 * W) {
      vd x0, x1;
      if constexpr (std::is_same_v<vt, float>) {
        vf f0, f1;
        std::memcpy(&f0, p + i, sizeof(f0));
        std::memcpy(&f1, p + i + W, sizeof(f1));
        x0 = __builtin_convertvector(f0, vd);
        x1 = __builtin_convertvector(f1, vd);
      } else {
        std::memcpy(&x0, p + i, sizeof(x0));
        std::memcpy(&x1, p + i + W, sizeof(x1));
      }
      a0 += vexp_nonpos<W>(x0 - mx);
      a1 += vexp_nonpos<W>(x1 - mx);
    }
    a0 += a1;
    double s = 0.0;
    for (int l = 0; l < W; ++l) s += a0[l];
    for (; i < b1; ++i) s += exp_nonpos(static_cast<double>(p[i]) - mx);
    neumaier_add(total, comp, s);
  }
  return total + comp;
}

#if defined(__x86_64__) && defined(__GNUC__)
#define EVOFAST_X86_CLONES 1
#define EVO_TARGET_AVX2 __attribute__((target("avx2,fma")))
#define EVO_TARGET_AVX512 __attribute__((target("avx512f,avx512dq,avx512vl,avx512bw,avx2,fma")))
#endif

enum class Isa { kDefault = 0, kAvx2 = 1, kAvx512 = 2 };

// float64 lanes of the vector code of each instruction set
constexpr int lanes(Isa isa) { return isa == Isa::kAvx512 ? 8 : isa == Isa::kAvx2 ? 4 : 2; }

// out[i] = l[i] - T * log(-log(u_i)), u_i in (0, 1) from the key's sequence at v0 + i.
template <typename vt>
EVO_INLINE void chunk_gumbel(const vt* __restrict p, int64_t n, uint64_t key, int64_t v0, double T,
                             double* __restrict out) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const uint64_t z = mix64(key + static_cast<uint64_t>(v0 + i + 1) * kGolden);
    const double u = (bits_f64((z >> 12) | 0x3FF0000000000000ULL) - 1.0) + 0x1p-53;  // (0, 1)
    const double e = -log_pos(u);                                                   // Exp(1) > 0
    out[i] = static_cast<double>(p[i]) - T * log_pos(e);
  }
}

// ----------------------------------------------------------------------------
// Row pass.

struct RowParams {
  const void* logits;
  int64_t s0, s1;  // element strides of logits' dims 0 and 1
  int64_t R, V, M, k, row0;
  bool excl;          // column M excluded from softmax / top-k / argmax (exclude_mask && T == 0)
  bool gumbel_excl;   // column M excluded from the Gumbel argmax (exclude_mask && T > 0)
  double T;
  bool random_remask;
  uint64_t seed;
  // outputs, flat row index i = b * R + r
  int64_t* x0;
  double* q;
  double* tp;       // (B*R, k)
  int64_t* ids;     // (B*R, k+1): the top-k ids go into the first k slots
  uint8_t* bad;
};

template <typename vt>
struct TopK {
  vt val[kMaxK];
  int64_t idx[kMaxK];
  int cnt = 0;
  int k = 1;
  // (v, i) with i larger than every index already held: equal values stay behind.
  EVO_INLINE void insert(vt v, int64_t i) {
    int j = cnt < k ? cnt : k - 1;  // slot freed (or the dropped last one)
    if (cnt < k) ++cnt;
    while (j > 0 && val[j - 1] < v) {
      val[j] = val[j - 1];
      idx[j] = idx[j - 1];
      --j;
    }
    val[j] = v;
    idx[j] = i;
  }
};

template <typename scalar_t, Isa isa>
EVO_INLINE void row_pass_impl(const RowParams& P, int64_t begin, int64_t end) {
  using vt = typename ComputeType<scalar_t>::type;
  constexpr bool kDirect = std::is_same_v<scalar_t, vt>;  // read fp32 / fp64 rows in place
  alignas(64) vt buf[kChunk];
  std::vector<double> gbuf(P.T > 0 ? kChunk : 0);
  std::vector<double> csum, cmax;  // per chunk: sum of exp(l - running max) and that max
  const int64_t nchunks = (P.V + kChunk - 1) / kChunk;
  csum.reserve(nchunks);
  cmax.reserve(nchunks);
  const scalar_t* base_ptr = static_cast<const scalar_t*>(P.logits);
  const double ninf = -std::numeric_limits<double>::infinity();
  const int k = static_cast<int>(P.k);

  for (int64_t i = begin; i < end; ++i) {
    const int64_t b = i / P.R, r = i % P.R, pos = P.row0 + r;
    const scalar_t* row = base_ptr + b * P.s0 + r * P.s1;
    const uint64_t gkey = P.T > 0 ? rng_key(P.seed, kStreamGumbel, b, pos) : 0;
    TopK<vt> tk;
    tk.k = k;
    double mx = ninf;
    int has_nan = 0;
    double gbest = ninf;
    int64_t gidx = -1;
    csum.clear();
    cmax.clear();

    for (int64_t c0 = 0; c0 < P.V; c0 += kChunk) {
      const int64_t n = std::min(kChunk, P.V - c0);
      const bool has_m = P.M >= c0 && P.M < c0 + n;
      const vt* p;
      if (kDirect && !(P.excl && has_m)) {
        p = reinterpret_cast<const vt*>(row + c0);
      } else {
        convert_chunk<scalar_t>(row + c0, n, buf);
        if (P.excl && has_m) buf[P.M - c0] = -std::numeric_limits<vt>::infinity();
        p = buf;
      }
      const vt cm = chunk_max<vt>(p, n, has_nan);

      // top-k: fill the first k (column M skipped when excluded), then only
      // elements beating the current k-th (strictly: earlier index wins ties).
      int64_t j = 0;
      for (; j < n && tk.cnt < k; ++j) {
        if (P.excl && c0 + j == P.M) continue;
        tk.insert(p[j], c0 + j);
      }
      if (j < n) {
        vt thr = tk.val[k - 1];
        if (cm > thr) {
          for (; j < n; ++j) {
            if (p[j] > thr) {
              tk.insert(p[j], c0 + j);
              thr = tk.val[k - 1];
            }
          }
        }
      }

      // float64 exp-sum against the running max (rescaled at the end)
      const double cmd = static_cast<double>(cm);
      if (cmd > mx) mx = cmd;
      if (mx > ninf) {
        csum.push_back(chunk_expsum<lanes(isa), vt>(p, n, mx));
        cmax.push_back(mx);
      }

      if (P.T > 0) {
        chunk_gumbel<vt>(p, n, gkey, c0, P.T, gbuf.data());
        if (P.gumbel_excl && has_m) gbuf[P.M - c0] = ninf;
        double gm = ninf;
#pragma omp simd reduction(max : gm)
        for (int64_t t = 0; t < n; ++t) gm = gbuf[t] > gm ? gbuf[t] : gm;
        if (gm > gbest) {
          int64_t t = 0;
          while (t < n && !(gbuf[t] == gm)) ++t;
          gbest = gm;
          gidx = c0 + t;
        }
      }
    }

    bool bad = has_nan || !std::isfinite(mx);
    double s = 0.0;
    if (!bad) {
      double comp = 0.0;
      for (size_t c = 0; c < csum.size(); ++c)
        neumaier_add(s, comp, cmax[c] == mx ? csum[c] : csum[c] * std::exp(cmax[c] - mx));
      s += comp;
      bad = !std::isfinite(s) || !(s > 0.0);
    }
    P.bad[i] = bad ? 1 : 0;
    double* tpi = P.tp + i * P.k;
    int64_t* idsi = P.ids + i * (P.k + 1);
    if (bad) {
      P.x0[i] = 0;
      P.q[i] = 0.0;
      for (int t = 0; t < k; ++t) {
        tpi[t] = 0.0;
        idsi[t] = 0;
      }
      continue;
    }
    for (int t = 0; t < k; ++t) {
      tpi[t] = std::exp(static_cast<double>(tk.val[t]) - mx) / s;
      idsi[t] = tk.idx[t];
    }
    int64_t x0;
    double qx0;
    if (P.T > 0) {
      // gidx < 0 only if every score is -inf (only column M finite, and excluded):
      // index 0, like torch.argmax over an all -inf row
      x0 = gidx >= 0 ? gidx : 0;
      qx0 = std::exp(static_cast<double>(to_compute<scalar_t>(row[x0])) - mx) / s;
    } else {
      x0 = tk.idx[0];  // argmax (M excluded when exclude_mask), first index on ties
      qx0 = tpi[0];
    }
    if (P.random_remask) {
      const uint64_t z = mix64(rng_key(P.seed, kStreamRemask, b, pos));
      qx0 = (static_cast<double>(z >> 11) + 0.5) * 0x1p-53;  // (0, 1)
    }
    P.x0[i] = x0;
    P.q[i] = qx0;
  }
}

// One instantiation per instruction set; the always-inline body is compiled
// with the wrapper's target options.
template <typename scalar_t>
void row_pass_default(const RowParams& P, int64_t begin, int64_t end) {
  row_pass_impl<scalar_t, Isa::kDefault>(P, begin, end);
}
#ifdef EVOFAST_X86_CLONES
template <typename scalar_t>
EVO_TARGET_AVX2 void row_pass_avx2(const RowParams& P, int64_t begin, int64_t end) {
  row_pass_impl<scalar_t, Isa::kAvx2>(P, begin, end);
}
template <typename scalar_t>
EVO_TARGET_AVX512 void row_pass_avx512(const RowParams& P, int64_t begin, int64_t end) {
  row_pass_impl<scalar_t, Isa::kAvx512>(P, begin, end);
}
#endif

// The best supported instruction set; EVOFAST_CPU_ISA=default|avx2|avx512 caps it
// (for tests and benchmarks of every variant).
Isa cpu_isa() {
  static const Isa isa = [] {
    Isa best = Isa::kDefault;
#ifdef EVOFAST_X86_CLONES
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = Isa::kAvx2;
    if (best == Isa::kAvx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw"))
      best = Isa::kAvx512;
#endif
    if (const char* env = std::getenv("EVOFAST_CPU_ISA")) {
      const std::string want(env);
      Isa cap = best;
      if (want == "default" || want == "sse2") cap = Isa::kDefault;
      else if (want == "avx2") cap = Isa::kAvx2;
      if (static_cast<int>(cap) < static_cast<int>(best)) best = cap;
    }
    return best;
  }();
  return isa;
}

template <typename scalar_t>
void run_row_pass(const RowParams& P, int64_t begin, int64_t end) {
#ifdef EVOFAST_X86_CLONES
  switch (cpu_isa()) {
    case Isa::kAvx512:
      return row_pass_avx512<scalar_t>(P, begin, end);
    case Isa::kAvx2:
      return row_pass_avx2<scalar_t>(P, begin, end);
    default:
      break;
  }
#endif
  row_pass_default<scalar_t>(P, begin, end);
}

// ----------------------------------------------------------------------------
// Sequence pass for batch row b.

struct SeqParams {
  int64_t R, L, M, k, row0;
  double alpha, threshold;
  bool use_threshold, exclude_mask;
  const int64_t *num_transfer, *block_start, *block_end, *prompt_len;
  int64_t* x;       // (B, L)
  double* conf;     // (B, L)
  const int64_t* x0;
  const double* q;
  const double* tp;
  int64_t* ids;     // (B, R, k+1)
  bool* transfer;   // (B, R)
};

template <typename wt>
void sequence_pass(const SeqParams& P, int64_t b, wt* w_out, std::vector<int64_t>& cand) {
  const int64_t R = P.R, M = P.M, k = P.k;
  int64_t* xb = P.x + b * P.L + P.row0;  // xb[r]: window row r
  double* cb = P.conf + b * P.L + P.row0;
  const int64_t* x0 = P.x0 + b * R;
  const double* q = P.q + b * R;
  bool* tr = P.transfer + b * R;
  const int64_t be = P.block_end[b];
  const int64_t frozen = std::max(P.block_start[b], P.prompt_len[b]);

  // eligible rows
  cand.clear();
  for (int64_t r = 0; r < R; ++r) {
    tr[r] = false;
    if (xb[r] == M && P.row0 + r < be) cand.push_back(r);
  }
  // (q desc, pos asc): a strict total order
  auto better = [q](int64_t a, int64_t c) { return q[a] > q[c] || (q[a] == q[c] && a < c); };
  if (!cand.empty()) {
    if (P.use_threshold) {
      const int64_t best = *std::min_element(cand.begin(), cand.end(), better);
      for (int64_t r : cand)
        if (r == best || q[r] >= P.threshold) tr[r] = true;
    } else {
      const int64_t ne = static_cast<int64_t>(cand.size());
      const int64_t n = std::min(std::max<int64_t>(P.num_transfer[b], 0), ne);
      if (n < ne) std::nth_element(cand.begin(), cand.begin() + n, cand.end(), better);
      for (int64_t t = 0; t < n; ++t) tr[cand[t]] = true;
    }
  }
  for (int64_t r = 0; r < R; ++r) {
    if (tr[r]) {
      xb[r] = x0[r];
      cb[r] = q[r];
    }
  }
  // revision (after the transfer)
  for (int64_t r = 0; r < R; ++r) {
    if (P.row0 + r >= frozen && xb[r] != M && q[r] > cb[r] && !(P.exclude_mask && x0[r] == M)) {
      xb[r] = x0[r];
      cb[r] = q[r];
    }
  }
  // new representation
  const double a = P.alpha;
  for (int64_t r = 0; r < R; ++r) {
    const int64_t i = b * R + r;
    int64_t* idsi = P.ids + i * (k + 1);
    wt* wi = w_out + i * (k + 1);
    idsi[k] = xb[r];
    if (P.row0 + r < frozen) {
      for (int64_t t = 0; t < k; ++t) wi[t] = static_cast<wt>(0.0);
      wi[k] = static_cast<wt>(1.0);
      continue;
    }
    const double* tpi = P.tp + i * k;
    double sum = 0.0;
    for (int64_t t = 0; t < k; ++t) sum += tpi[t];
    const double e = xb[r] == M ? sum / (1.0 - a) * a : 0.0;
    const double tot = sum + e;
    for (int64_t t = 0; t < k; ++t) wi[t] = static_cast<wt>(tpi[t] / tot);
    wi[k] = static_cast<wt>(e / tot);
  }
}

void check_vec(const at::Tensor& t, const char* name, int64_t B) {
  TORCH_CHECK(t.device().is_cpu(), "evo_step_fused: ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kLong, "evo_step_fused: ", name, " must be int64, got ",
              t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == B, "evo_step_fused: ", name, " must have shape (", B,
              ",), got ", t.sizes());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> evo_step_cpu(
    const at::Tensor& logits, at::Tensor& x, at::Tensor& conf, const at::Tensor& num_transfer,
    const at::Tensor& block_start, const at::Tensor& block_end, const at::Tensor& prompt_len,
    int64_t row0, int64_t mask_id, int64_t k_soft, double alpha, double temperature,
    bool random_remask, double threshold, bool use_threshold, bool exclude_mask, int64_t seed) {
  // ---- argument checks (cheap; the Python layer has validated already)
  TORCH_CHECK(logits.device().is_cpu(), "evo_step_fused: logits must be a CPU tensor, got ", logits.device());
  TORCH_CHECK(logits.dim() == 3, "evo_step_fused: logits must have shape (B, R, V), got ", logits.sizes());
  const auto ldt = logits.scalar_type();
  TORCH_CHECK(ldt == at::kFloat || ldt == at::kHalf || ldt == at::kBFloat16 || ldt == at::kDouble,
              "evo_step_fused: logits must be float32, float16, bfloat16 (or float64), got ", ldt);
  const int64_t B = logits.size(0), R = logits.size(1), V = logits.size(2);
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kLong && x.dim() == 2,
              "evo_step_fused: x must be a (B, L) int64 CPU tensor, got ", x.scalar_type(), " ",
              x.sizes(), " on ", x.device());
  TORCH_CHECK(x.size(0) == B, "evo_step_fused: x has batch size ", x.size(0), ", logits ", B);
  TORCH_CHECK(x.is_contiguous(), "evo_step_fused: x must be contiguous (it is updated in place)");
  TORCH_CHECK(conf.device().is_cpu() && conf.scalar_type() == at::kDouble,
              "evo_step_fused: conf must be a float64 CPU tensor, got ", conf.scalar_type(), " on ",
              conf.device());
  TORCH_CHECK(conf.sizes() == x.sizes(), "evo_step_fused: conf must have x's shape ", x.sizes(), ", got ",
              conf.sizes());
  TORCH_CHECK(conf.is_contiguous(), "evo_step_fused: conf must be contiguous (it is updated in place)");
  check_vec(num_transfer, "num_transfer", B);
  check_vec(block_start, "block_start", B);
  check_vec(block_end, "block_end", B);
  check_vec(prompt_len, "prompt_len", B);
  const int64_t L = x.size(1);
  TORCH_CHECK(k_soft >= 1 && k_soft <= kMaxK, "evo_step_fused: k_soft must lie in [1, 16], got ", k_soft);
  TORCH_CHECK(k_soft < V, "evo_step_fused: k_soft (", k_soft, ") must be smaller than the vocabulary size ", V);
  TORCH_CHECK(mask_id >= 0 && mask_id < V, "evo_step_fused: mask_id must lie in [0, ", V, "), got ", mask_id);
  TORCH_CHECK(row0 >= 0, "evo_step_fused: row0 must be >= 0, got ", row0);
  TORCH_CHECK(row0 + R <= L, "evo_step_fused: row0 + R = ", row0 + R, " exceeds the sequence length ", L);
  TORCH_CHECK(alpha >= 0.0 && alpha < 1.0, "evo_step_fused: alpha must lie in [0, 1), got ", alpha);
  TORCH_CHECK(temperature >= 0.0, "evo_step_fused: temperature must be >= 0, got ", temperature);

  at::Tensor lg = logits;
  if (V > 1 && lg.stride(2) != 1) lg = lg.contiguous();
  const auto nt = num_transfer.contiguous(), bs = block_start.contiguous(), be = block_end.contiguous(),
             pl = prompt_len.contiguous();

  const int64_t k = k_soft, BR = B * R;
  auto opt_long = logits.options().dtype(at::kLong);
  at::Tensor ids = at::zeros({B, R, k + 1}, opt_long);
  at::Tensor w = at::zeros({B, R, k + 1}, logits.options());
  at::Tensor transfer = at::zeros({B, R}, logits.options().dtype(at::kBool));
  at::Tensor status = at::full({1}, -1, opt_long);
  if (BR == 0) return {ids, w, transfer, status};

  std::vector<int64_t> x0(BR);
  std::vector<double> q(BR), tp(BR * k);
  std::vector<uint8_t> bad(BR);

  RowParams P;
  P.logits = lg.data_ptr();
  P.s0 = lg.stride(0);
  P.s1 = lg.stride(1);
  P.R = R;
  P.V = V;
  P.M = mask_id;
  P.k = k;
  P.row0 = row0;
  P.excl = exclude_mask && temperature == 0.0;
  P.gumbel_excl = exclude_mask && temperature > 0.0;
  P.T = temperature;
  P.random_remask = random_remask;
  P.seed = static_cast<uint64_t>(seed);
  P.x0 = x0.data();
  P.q = q.data();
  P.tp = tp.data();
  P.ids = ids.data_ptr<int64_t>();
  P.bad = bad.data();

  const double row_cost = static_cast<double>(V) * (temperature > 0 ? 12.0 : 3.0);
  const int64_t grain = std::max<int64_t>(1, static_cast<int64_t>(65536.0 / row_cost));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, ldt, "evo_step_cpu", [&] {
    cpu_parallel_for(0, BR, grain, row_cost * static_cast<double>(BR),
                     [&](int64_t b0, int64_t b1) { run_row_pass<scalar_t>(P, b0, b1); });
  });

  for (int64_t i = 0; i < BR; ++i) {
    if (bad[i]) {
      status.fill_(i);
      ids.zero_();
      return {ids, w, transfer, status};  // x and conf untouched
    }
  }

  SeqParams S;
  S.R = R;
  S.L = L;
  S.M = mask_id;
  S.k = k;
  S.row0 = row0;
  S.alpha = alpha;
  S.threshold = threshold;
  S.use_threshold = use_threshold;
  S.exclude_mask = exclude_mask;
  S.num_transfer = nt.data_ptr<int64_t>();
  S.block_start = bs.data_ptr<int64_t>();
  S.block_end = be.data_ptr<int64_t>();
  S.prompt_len = pl.data_ptr<int64_t>();
  S.x = x.data_ptr<int64_t>();
  S.conf = conf.data_ptr<double>();
  S.x0 = x0.data();
  S.q = q.data();
  S.tp = tp.data();
  S.ids = P.ids;
  S.transfer = transfer.data_ptr<bool>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, ldt, "evo_step_cpu_seq", [&] {
    scalar_t* wp = w.data_ptr<scalar_t>();
    cpu_parallel_for(0, B, 1, static_cast<double>(BR) * (k + 8) * 4.0, [&](int64_t b0, int64_t b1) {
      std::vector<int64_t> cand;
      cand.reserve(R);
      for (int64_t b = b0; b < b1; ++b) sequence_pass<scalar_t>(S, b, wp, cand);
    });
  });
  return {ids, w, transfer, status};
}

}  // namespace evofast
