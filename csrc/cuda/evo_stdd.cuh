// STDD on CUDA (csrc/README.md, evo_step_fused_opt; the definition in
// evofast/ops/stdd.py): torch-free.
//
// The spatial term's Gram band G[i][d] = <l_i, l_{i+d}>, d = 0..2r, over the
// columns except the mask column, comes from a separate kernel before the
// sequence kernel (evo_stdd_gram_kernel, one block per window row: it reads its
// row and the 2r rows after it, so the window is read 2r + 1 times, mostly from
// L2, on top of the row pass). The thresholds, the selection and the history
// update run in the sequence kernel (evo_seq.cuh) with the helpers below.
#pragma once

#include "evo_row.cuh"

namespace evofast {
namespace cuda {
namespace detail {

constexpr int kGramThreads = 256;

// Grid (B * R): block `row` sums G[row][d] for d = 0..band into gram.
template <typename T>
__global__ void __launch_bounds__(kGramThreads) evo_stdd_gram_kernel(const RowParams p, int64_t mask_id,
                                                                     int band, double* gram) {
  __shared__ double sh[kGramThreads / kWarp];
  const int64_t row = blockIdx.x;
  const int64_t b = row / p.R;
  const int64_t r = row - b * p.R;
  const T* base = static_cast<const T*>(p.logits) + b * p.stride_b;
  const T* li = base + r * p.stride_r;
  for (int d = 0; d <= band; ++d) {  // block-uniform loop
    double acc = 0.0;
    if (r + d < p.R) {
      const T* lj = base + (r + d) * p.stride_r;
      for (int64_t v = threadIdx.x; v < p.V; v += kGramThreads) {
        if (v == mask_id) continue;
        acc += static_cast<double>(to_float(li[v])) * static_cast<double>(to_float(lj[v]));
      }
    }
    acc = warp_sum(acc);
    if (lane_id() == 0) sh[warp_id()] = acc;
    __syncthreads();
    if (threadIdx.x == 0) {
      double t = 0.0;
      for (int w = 0; w < kGramThreads / kWarp; ++w) t += sh[w];
      gram[row * (band + 1) + d] = t;
    }
    __syncthreads();
  }
}

struct StddArgs {
  bool on;
  double tau, lam_t, lam_s, tau_min, tau_max;
  int window, radius, band;  // band: 2r with the spatial term, else 0
  double* history;           // (B, L, window)
  int64_t* count;            // (B, L)
  double* gram;              // (B*R, band + 1)
};

// TV: population std of the last `window` values of the ring with q appended,
// summed oldest first (the reference's order); 0 with fewer than two values.
__device__ __forceinline__ double stdd_tv(const double* hist, int64_t cnt, int W, double q) {
  const int64_t n = cnt + 1 < W ? cnt + 1 : W;
  if (n < 2) return 0.0;
  const int64_t first = cnt + 1 - n;
  double acc = 0.0;
  for (int64_t s = first; s <= cnt; ++s) acc = __dadd_rn(acc, s == cnt ? q : hist[s % W]);
  const double mean = acc / static_cast<double>(n);
  double acc2 = 0.0;
  for (int64_t s = first; s <= cnt; ++s) {
    const double d = (s == cnt ? q : hist[s % W]) - mean;
    acc2 = __dadd_rn(acc2, __dmul_rn(d, d));
  }
  return sqrt(acc2 / static_cast<double>(n));
}

// SD of window row r (of R) from the Gram band g of its batch row.
__device__ __forceinline__ double stdd_sd(const double* g, int64_t R, int64_t r, int radius) {
  const int width = 2 * radius + 1;
  double dot = 0.0, nm = 0.0;
  bool has = false;
  for (int a = -radius; a <= radius; ++a) {
    if (a == 0 || r + a < 0 || r + a >= R) continue;
    const int64_t u = r + a;
    dot = __dadd_rn(dot, g[(u < r ? u : r) * width + (a < 0 ? -a : a)]);
    has = true;
  }
  for (int a = -radius; a <= radius; ++a) {
    if (a == 0 || r + a < 0 || r + a >= R) continue;
    for (int c = -radius; c <= radius; ++c) {
      if (c == 0 || r + c < 0 || r + c >= R) continue;
      const int64_t lo = r + (a < c ? a : c);
      nm = __dadd_rn(nm, g[lo * width + (a < c ? c - a : a - c)]);
    }
  }
  const double ni = g[r * width];
  if (!has || !(ni > 0.0) || !(nm > 0.0) || !isfinite(ni) || !isfinite(nm)) return 0.0;
  const double cos = dot / (sqrt(ni) * sqrt(nm));
  if (!isfinite(cos)) return 0.0;
  const double sd = 1.0 - cos;
  return sd < 0.0 ? 0.0 : (sd > 2.0 ? 2.0 : sd);
}

// tau of window row r of batch row b (count / history at sequence position pos).
__device__ __forceinline__ double stdd_threshold(const StddArgs& a, int64_t b, int64_t R, int64_t L, int64_t r,
                                                 int64_t pos, double q) {
  double t = a.tau;
  if (a.lam_t != 0.0) {
    const int64_t c = a.count[b * L + pos];
    t = __dadd_rn(t, __dmul_rn(a.lam_t, stdd_tv(a.history + (b * L + pos) * a.window, c > 0 ? c : 0, a.window, q)));
  }
  if (a.band > 0) t = __dadd_rn(t, __dmul_rn(a.lam_s, stdd_sd(a.gram + b * R * (a.band + 1), R, r, a.radius)));
  t = t > a.tau_min ? t : a.tau_min;
  return t < a.tau_max ? t : a.tau_max;
}

// Order of STDD's fallback: q - tau larger, then q larger, then the smaller list index.
__device__ __forceinline__ bool stdd_better(double d, double q, int j, double bd, double bq, int bj) {
  return d > bd || (d == bd && (q > bq || (q == bq && j < bj)));
}

}  // namespace detail
}  // namespace cuda
}  // namespace evofast
