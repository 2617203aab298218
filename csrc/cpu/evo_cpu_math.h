// Scalar and vector math of the CPU evo_step kernel (csrc/cpu/evo_step_cpu.cpp):
// float64 exp / log written to vectorise, the counter-based RNG, element
// conversions and the per-chunk loops of the row pass. Included by one
// translation unit only; everything is inline.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

// 32/64-byte vector types in always-inline helpers change no ABI here: they are
// only ever inlined into the functions compiled for AVX2 / AVX-512.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace evofast {
namespace cpu_detail {

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

// The Gumbel score of one column (chunk_gumbel's formula): the sampling filter
// only scores the columns that enter its running top-k.
EVO_INLINE double gumbel_score(double l, uint64_t key, int64_t v, double T) {
  const uint64_t z = mix64(key + static_cast<uint64_t>(v + 1) * kGolden);
  const double u = (bits_f64((z >> 12) | 0x3FF0000000000000ULL) - 1.0) + 0x1p-53;
  return l - T * log_pos(-log_pos(u));
}

// chunk_expsum, also returning ent = sum_i exp(d_i) * d_i with d_i = p[i] - mx
// (the entropy's numerator; exp(d) d is 0 where exp(d) is, -inf included).
template <int W, typename vt>
EVO_INLINE double chunk_expsum_ent(const vt* __restrict p, int64_t n, double mx, double& ent) {
  using vd = typename Vec<W>::d;
  using vf = typename Vec<W>::f;
  double total = 0.0, comp = 0.0, etotal = 0.0, ecomp = 0.0;
  for (int64_t b0 = 0; b0 < n; b0 += kSumBlock) {
    const int64_t b1 = std::min(n, b0 + kSumBlock);
    vd a0 = {}, e0 = {};
    int64_t i = b0;
    for (; i + W <= b1; i += W) {
      vd x0;
      if constexpr (std::is_same_v<vt, float>) {
        vf f0;
        std::memcpy(&f0, p + i, sizeof(f0));
        x0 = __builtin_convertvector(f0, vd);
      } else {
        std::memcpy(&x0, p + i, sizeof(x0));
      }
      const vd d = x0 - mx;
      const vd e = vexp_nonpos<W>(d);
      a0 += e;
      e0 += d < -708.0 ? vd{} : e * d;
    }
    double s = 0.0, se = 0.0;
    for (int l = 0; l < W; ++l) {
      s += a0[l];
      se += e0[l];
    }
    for (; i < b1; ++i) {
      const double d = static_cast<double>(p[i]) - mx;
      const double e = exp_nonpos(d);
      s += e;
      se += d < -708.0 ? 0.0 : e * d;
    }
    neumaier_add(total, comp, s);
    neumaier_add(etotal, ecomp, se);
  }
  ent = etotal + ecomp;
  return total + comp;
}

// Dot products of one chunk of the current row `a` with itself and with NB earlier
// rows' chunks, in float64 over [0, n) without index `skip` (the mask column; -1:
// none): out[0] += <a, a>, out[1 + j] += <a, prev[j]>. One pass: each value is
// loaded and converted once (float * float is exact in float64).
template <typename vt, int NB>
EVO_INLINE void chunk_dots(const vt* __restrict a, const vt* const* prev, int64_t n, int64_t skip, double* out) {
  const vt* p0 = NB > 0 ? prev[0] : a;
  const vt* p1 = NB > 1 ? prev[1] : a;
  const vt* p2 = NB > 2 ? prev[2] : a;
  const vt* p3 = NB > 3 ? prev[3] : a;
  const int64_t cut = skip >= 0 && skip < n ? skip : n;
  double s = 0.0, c0 = 0.0, c1 = 0.0, c2 = 0.0, c3 = 0.0;
  for (int part = 0; part < 2; ++part) {
    const int64_t lo = part == 0 ? 0 : cut + 1, hi = part == 0 ? cut : n;
#pragma omp simd reduction(+ : s, c0, c1, c2, c3)
    for (int64_t i = lo; i < hi; ++i) {
      const double x = static_cast<double>(a[i]);
      s += x * x;
      if constexpr (NB > 0) c0 += x * static_cast<double>(p0[i]);
      if constexpr (NB > 1) c1 += x * static_cast<double>(p1[i]);
      if constexpr (NB > 2) c2 += x * static_cast<double>(p2[i]);
      if constexpr (NB > 3) c3 += x * static_cast<double>(p3[i]);
    }
  }
  out[0] += s;
  if constexpr (NB > 0) out[1] += c0;
  if constexpr (NB > 1) out[2] += c1;
  if constexpr (NB > 2) out[3] += c2;
  if constexpr (NB > 3) out[4] += c3;
}

// out[0] = <a, a>, out[d] = <a, prev[d - 1]> for d = 1..nprev, in passes of up to
// four earlier rows.
template <typename vt>
EVO_INLINE void chunk_band(const vt* a, const vt* const* prev, int nprev, int64_t n, int64_t skip, double* out) {
  for (int d = 0; d <= nprev; ++d) out[d] = 0.0;
  double part[5];
  for (int d = 0; d == 0 || d < nprev; d += 4) {
    for (double& v : part) v = 0.0;
    switch (nprev - d < 4 ? nprev - d : 4) {
      case 0: chunk_dots<vt, 0>(a, prev + d, n, skip, part); break;
      case 1: chunk_dots<vt, 1>(a, prev + d, n, skip, part); break;
      case 2: chunk_dots<vt, 2>(a, prev + d, n, skip, part); break;
      case 3: chunk_dots<vt, 3>(a, prev + d, n, skip, part); break;
      default: chunk_dots<vt, 4>(a, prev + d, n, skip, part); break;
    }
    if (d == 0) out[0] = part[0];
    for (int j = 1; j <= 4 && d + j <= nprev; ++j) out[d + j] = part[j];
  }
}

}  // namespace cpu_detail
}  // namespace evofast
