// Kernels of soft_embed_fwd_fused / soft_embed_bwd_fused (csrc/README.md):
// torch-free. One block per (b, r) row; the row's J ids and normalised weights
// wn_j live in shared memory: the forward receives them normalised, the backward
// computes wn_j = clamp(w_j, 0) / max(sum_j clamp(w_j, 0), 1e-12) itself.
// Accumulation type A: float, or double for a float64 weight (backward) or
// product dtype (forward).
#pragma once

#include "common.cuh"

namespace evofast {
namespace cuda {
namespace detail {

constexpr int kEmbedThreads = 256;

template <typename A>
__device__ __forceinline__ A clamp0(A v) { return v < A(0) ? A(0) : v; }  // NaN stays NaN

// Shared-memory view of a row: ids, c = clamp(w, 0), wn = c / D, g (backward).
template <typename A>
struct RowSmem {
  int64_t* id;
  A* c;
  A* wn;
  A* g;
  A S;  // sum_j c_j (set in shared memory by thread 0, see load_row)
  A D;  // max(S, 1e-12)
};

template <typename A>
__host__ __device__ __forceinline__ size_t row_smem_bytes(int64_t J) {
  return static_cast<size_t>(J) * (sizeof(int64_t) + 3 * sizeof(A)) + 2 * sizeof(A);
}

// Loads ids / w of one row and normalises w (thread 0 sums in order j = 0..J-1).
// Ends with a barrier.
template <typename A, typename WW>
__device__ __forceinline__ RowSmem<A> load_row(const int64_t* __restrict__ ids,
                                               const WW* __restrict__ w, int64_t row, int J) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  RowSmem<A> s;
  s.id = reinterpret_cast<int64_t*>(smem_raw);
  s.c = reinterpret_cast<A*>(s.id + J);
  s.wn = s.c + J;
  s.g = s.wn + J;
  A* sd = s.g + J;  // [S, D]
  for (int j = static_cast<int>(threadIdx.x); j < J; j += static_cast<int>(blockDim.x)) {
    s.id[j] = ids[row * J + j];
    s.c[j] = clamp0(to_acc<A>(w[row * J + j]));
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    A S = A(0);
    for (int j = 0; j < J; ++j) S += s.c[j];
    const A eps = static_cast<A>(1e-12);
    sd[0] = S;
    sd[1] = S > eps ? S : eps;  // max(S, 1e-12); NaN S gives NaN weights either way
    if (S != S) sd[1] = S;
  }
  __syncthreads();
  s.S = sd[0];
  s.D = sd[1];
  for (int j = static_cast<int>(threadIdx.x); j < J; j += static_cast<int>(blockDim.x)) {
    s.wn[j] = s.c[j] / s.D;
  }
  __syncthreads();
  return s;
}

// wn * e rounded as torch's elementwise mul rounds it in the product dtype P: an IEEE
// multiply without contraction into an add (__fmul_rn / __dmul_rn), and for a 16-bit P
// (exact in float for two 16-bit operands) one more rounding to P.
template <typename P>
__device__ __forceinline__ float product(float f, float e) {
  return to_acc<float>(from_float<P>(__fmul_rn(f, e)));
}
template <>
__device__ __forceinline__ float product<float>(float f, float e) { return __fmul_rn(f, e); }
template <typename P>
__device__ __forceinline__ double product(double f, double e) { return __dmul_rn(f, e); }

// Forward: one block per (b, r) row. `wn` arrives normalised in the product dtype P
// (computed by torch in evofast.ops.soft_embed); the products are summed in order
// j = 0..J-1 in A (float, double for a float64 P) with IEEE adds, then cast to WT
// (a double through float, as torch's .to() casts).
template <typename WT, typename P, typename A, int N>
__global__ void __launch_bounds__(kEmbedThreads)
    soft_embed_fwd_kernel(const WT* __restrict__ weight, int64_t V, int64_t d,
                          const int64_t* __restrict__ ids, const P* __restrict__ wn, int J,
                          WT* __restrict__ out) {
  using Pk = Pack<WT, N>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  int64_t* sid = reinterpret_cast<int64_t*>(smem_raw);
  A* swn = reinterpret_cast<A*>(sid + J);
  const int64_t row = blockIdx.x;
  for (int j = static_cast<int>(threadIdx.x); j < J; j += static_cast<int>(blockDim.x)) {
    sid[j] = ids[row * J + j];
    swn[j] = to_acc<A>(wn[row * J + j]);
  }
  __syncthreads();
  WT* orow = out + row * d;
  for (int64_t c = static_cast<int64_t>(threadIdx.x) * N; c < d; c += static_cast<int64_t>(blockDim.x) * N) {
    A acc[N];
#pragma unroll
    for (int e = 0; e < N; ++e) acc[e] = A(0);
    for (int j = 0; j < J; ++j) {
      const int64_t id = sid[j];
      if (id < 0 || id >= V) continue;
      const A f = swn[j];
      const Pk x = *reinterpret_cast<const Pk*>(weight + id * d + c);
#pragma unroll
      for (int e = 0; e < N; ++e) acc[e] = acc[e] + product<P>(f, to_acc<A>(x.v[e]));
    }
    Pk y;
#pragma unroll
    for (int e = 0; e < N; ++e) y.v[e] = from_acc<WT>(acc[e]);
    *reinterpret_cast<Pk*>(orow + c) = y;
  }
}

// atomicAdd into the accumulator of grad_weight (float, or double for fp64).
__device__ __forceinline__ void acc_add(float* p, float v) { atomicAdd(p, v); }
__device__ __forceinline__ void acc_add(double* p, double v) { atomicAdd(p, v); }

template <typename WT, typename WW, typename A, int N>
__global__ void __launch_bounds__(kEmbedThreads)
    soft_embed_bwd_kernel(const WT* __restrict__ grad, const WT* __restrict__ weight, int64_t V,
                          int64_t d, const int64_t* __restrict__ ids, const WW* __restrict__ w,
                          int J, A* __restrict__ gw, WW* __restrict__ grad_w) {
  using P = Pack<WT, N>;
  const int64_t row = blockIdx.x;
  const RowSmem<A> s = load_row<A>(ids, w, row, J);
  const WT* grow = grad + row * d;

  // grad_weight[ids_j] += wn_j * grad (zero weights add nothing and are skipped)
  if (gw != nullptr) {
    for (int64_t c = static_cast<int64_t>(threadIdx.x) * N; c < d; c += static_cast<int64_t>(blockDim.x) * N) {
      const P gx = *reinterpret_cast<const P*>(grow + c);
      A gv[N];
#pragma unroll
      for (int e = 0; e < N; ++e) gv[e] = to_acc<A>(gx.v[e]);
      for (int j = 0; j < J; ++j) {
        const int64_t id = s.id[j];
        const A wj = s.wn[j];
        if (id < 0 || id >= V || wj == A(0)) continue;
        A* dst = gw + id * d + c;
#pragma unroll
        for (int e = 0; e < N; ++e) acc_add(dst + e, wj * gv[e]);
      }
    }
  }

  // grad_w_m = [w_m >= 0] * (g_m / D - [S >= 1e-12] * sum_j g_j c_j / D^2),
  // g_j = <grad, weight[ids_j]>: one warp per j.
  if (grad_w != nullptr) {
    const int lane = lane_id();
    const int nwarps = static_cast<int>(blockDim.x) / kWarp;
    for (int j = warp_id(); j < J; j += nwarps) {
      const int64_t id = s.id[j];
      A part = A(0);
      if (id >= 0 && id < V) {
        const WT* wrow = weight + id * d;
        for (int64_t c = static_cast<int64_t>(lane) * N; c < d; c += static_cast<int64_t>(kWarp) * N) {
          const P gx = *reinterpret_cast<const P*>(grow + c);
          const P wx = *reinterpret_cast<const P*>(wrow + c);
#pragma unroll
          for (int e = 0; e < N; ++e) part += to_acc<A>(gx.v[e]) * to_acc<A>(wx.v[e]);
        }
      }
      part = warp_sum(part);
      if (lane == 0) s.g[j] = part;
    }
    __syncthreads();
    __shared__ A sgc_sh;
    if (threadIdx.x == 0) {
      A sgc = A(0);
      for (int j = 0; j < J; ++j) sgc += s.g[j] * s.c[j];
      sgc_sh = sgc;
    }
    __syncthreads();
    const A eps = static_cast<A>(1e-12);
    const A corr = s.S >= eps ? sgc_sh / (s.D * s.D) : A(0);
    for (int j = static_cast<int>(threadIdx.x); j < J; j += static_cast<int>(blockDim.x)) {
      const A wv = to_acc<A>(w[row * J + j]);
      const A gm = wv >= A(0) ? s.g[j] / s.D - corr : A(0);
      grad_w[row * J + j] = from_acc<WW>(gm);
    }
  }
}

// fp32 accumulator -> weight dtype.
template <typename WT>
__global__ void __launch_bounds__(kEmbedThreads)
    cast_from_float_kernel(const float* __restrict__ src, WT* __restrict__ dst, int64_t n) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    dst[i] = from_float<WT>(src[i]);
  }
}

}  // namespace detail
}  // namespace cuda
}  // namespace evofast
