// Small device helpers shared by evofast's CUDA kernels: element conversions,
// 16-byte vector loads, the counter-based RNG, warp helpers. CUDA headers only.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "evofast_cuda.h"

namespace evofast {
namespace cuda {
namespace detail {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kWarp = 32;

// ---------------------------------------------------------------- conversions
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

// Accumulator conversions (A = float or double).
template <typename A>
__device__ __forceinline__ A to_acc(float v) { return static_cast<A>(v); }
template <typename A>
__device__ __forceinline__ A to_acc(double v) { return static_cast<A>(v); }
template <typename A>
__device__ __forceinline__ A to_acc(__half v) { return static_cast<A>(__half2float(v)); }
template <typename A>
__device__ __forceinline__ A to_acc(__nv_bfloat16 v) { return static_cast<A>(__bfloat162float(v)); }

// Casts to a storage type. A double goes through float first, as torch's
// double -> half / bfloat16 casts do (c10::Half / c10::BFloat16 take a float).
template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ double from_float<double>(float v) { return static_cast<double>(v); }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

template <typename T>
__device__ __forceinline__ T from_double(double v) { return from_float<T>(static_cast<float>(v)); }
template <>
__device__ __forceinline__ double from_double<double>(double v) { return v; }

template <typename T>
__device__ __forceinline__ T from_acc(float v) { return from_float<T>(v); }
template <typename T>
__device__ __forceinline__ T from_acc(double v) { return from_double<T>(v); }

// ---------------------------------------------------------------- vectors
// N elements of T in one aligned load / store (16 bytes when N = 16 / sizeof(T)).
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <typename T>
struct VecWidth {
  static constexpr int value = 16 / static_cast<int>(sizeof(T));
};

__host__ __device__ __forceinline__ bool is_aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

// ---------------------------------------------------------------- RNG
// Counter-based: every random number is a pure function of (seed, stream, b,
// pos[, v]), so results do not depend on the launch shape.
//   key(seed, stream, b, pos) = mix(mix(mix(seed ^ stream * G) + b) + pos)
//   bits(key, v)              = mix(key + (v + 1) * G)    (splitmix64's sequence)
//   unit(bits)                = ((bits >> 12) + 0.5) * 2^-52, in [2^-53, 1 - 2^-53]
// with mix the splitmix64 finaliser and G = 0x9E3779B97F4A7C15.
constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ull;
constexpr uint64_t kStreamGumbel = 1;  // per-column Gumbel noise (temperature > 0)
constexpr uint64_t kStreamRemask = 2;  // per-row uniform of random remasking

__host__ __device__ __forceinline__ uint64_t mix64(uint64_t z) {
  z += kGolden;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

__host__ __device__ __forceinline__ uint64_t rng_key(uint64_t seed, uint64_t stream, int64_t b,
                                                     int64_t pos) {
  uint64_t k = mix64(seed ^ (stream * kGolden));
  k = mix64(k + static_cast<uint64_t>(b));
  return mix64(k + static_cast<uint64_t>(pos));
}

__host__ __device__ __forceinline__ uint64_t rng_bits(uint64_t key, int64_t v) {
  return mix64(key + static_cast<uint64_t>(v + 1) * kGolden);
}

__host__ __device__ __forceinline__ double rng_unit(uint64_t bits) {
  return (static_cast<double>(bits >> 12) + 0.5) * 0x1.0p-52;
}

// ---------------------------------------------------------------- warp helpers
__device__ __forceinline__ int lane_id() { return static_cast<int>(threadIdx.x) & (kWarp - 1); }
__device__ __forceinline__ int warp_id() { return static_cast<int>(threadIdx.x) / kWarp; }

template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace detail
}  // namespace cuda
}  // namespace evofast
