// Sequence pass of evo_step_fused (csrc/README.md, "evo_step_fused", item 2):
// torch-free. One block per batch row: compacts the eligible rows of the window,
// picks the transfers (rank by q, ties by position; the threshold rule; or STDD,
// which also appends q to the history of every eligible row),
// applies the revision and writes ids[..., k], w, transfer, x and conf. Reads the
// row pass's x0 / q / top-k probabilities from the workspace and its status
// flag: nothing is written when a row was not finite.
#pragma once

#include "evo_row.cuh"
#include "evo_stdd.cuh"

namespace evofast {
namespace cuda {
namespace detail {

constexpr int kSeqThreads = 256;
constexpr int kSeqWarps = kSeqThreads / kWarp;
constexpr int kSeqCap = 2048;  // eligible rows kept in shared memory (else global)

struct SeqParams {
  int64_t R, L, row0, mask_id;
  int k;
  double alpha;
  bool use_threshold;
  double threshold;
  bool exclude_mask;
  int64_t* x;
  double* conf;
  const int64_t* num_transfer;
  const int64_t* block_start;
  const int64_t* block_end;
  const int64_t* prompt_len;
  const int* x0;
  const double* q;
  const double* tp;
  int* list_r;     // (B, R) scratch: eligible rows of each batch row, in order
  double* list_q;  // (B, R) scratch: their q
  double* list_tau;  // (B, R) scratch: their STDD thresholds
  StddArgs stdd;
  int64_t* ids;
  void* w;
  bool* transfer;
  const int64_t* status;
};

// The list position first in the order (q - t larger, then q larger, then the
// smaller position) over the block; every thread gets it (kNoIndex when n == 0).
// lt == nullptr: t = 0, the order (q desc, position asc) of the threshold rule.
__device__ __forceinline__ int block_best(const double* lq, const double* lt, int n) {
  __shared__ double sd[kSeqWarps], sq[kSeqWarps];
  __shared__ int sj[kSeqWarps];
  double bd = -INFINITY, bq = -INFINITY;
  int bj = kNoIndex;
  for (int j = static_cast<int>(threadIdx.x); j < n; j += kSeqThreads) {
    const double d = lt != nullptr ? lq[j] - lt[j] : lq[j];
    if (bj == kNoIndex || stdd_better(d, lq[j], j, bd, bq, bj)) {
      bd = d;
      bq = lq[j];
      bj = j;
    }
  }
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) {
    const double d2 = __shfl_xor_sync(kFullMask, bd, o);
    const double q2 = __shfl_xor_sync(kFullMask, bq, o);
    const int j2 = __shfl_xor_sync(kFullMask, bj, o);
    if (j2 != kNoIndex && (bj == kNoIndex || stdd_better(d2, q2, j2, bd, bq, bj))) {
      bd = d2;
      bq = q2;
      bj = j2;
    }
  }
  if (lane_id() == 0) {
    sd[warp_id()] = bd;
    sq[warp_id()] = bq;
    sj[warp_id()] = bj;
  }
  __syncthreads();
  bd = -INFINITY;
  bq = -INFINITY;
  bj = kNoIndex;
#pragma unroll
  for (int w = 0; w < kSeqWarps; ++w) {
    if (sj[w] != kNoIndex && (bj == kNoIndex || stdd_better(sd[w], sq[w], sj[w], bd, bq, bj))) {
      bd = sd[w];
      bq = sq[w];
      bj = sj[w];
    }
  }
  return bj;
}

// STDD: thresholds, the transfers, then q appended to every eligible row's history.
__device__ __forceinline__ void stdd_transfer(const SeqParams& p, int64_t b, const int* lr, const double* lq,
                                              int n, bool* tr) {
  const int tid = static_cast<int>(threadIdx.x);
  double* lt = p.list_tau + b * p.R;
  int any = 0;
  for (int j = tid; j < n; j += kSeqThreads) {
    const int r = lr[j];
    const double t = stdd_threshold(p.stdd, b, p.R, p.L, r, p.row0 + r, lq[j]);
    lt[j] = t;
    if (lq[j] >= t) {
      tr[r] = true;
      any = 1;
    }
  }
  any = __syncthreads_or(any);
  if (!any && n > 0) {
    const int best = block_best(lq, lt, n);
    if (tid == 0) tr[lr[best]] = true;
  }
  __syncthreads();
  const int W = p.stdd.window;
  for (int j = tid; j < n; j += kSeqThreads) {
    const int64_t at = b * p.L + p.row0 + lr[j];
    const int64_t c = p.stdd.count[at] > 0 ? p.stdd.count[at] : 0;
    p.stdd.history[at * W + c % W] = lq[j];
    p.stdd.count[at] = c + 1;
  }
}

template <typename T>
__global__ void __launch_bounds__(kSeqThreads) evo_seq_kernel(const SeqParams p) {
  __shared__ double s_q[kSeqCap];
  __shared__ int s_r[kSeqCap];
  __shared__ int s_cnt[kSeqWarps];

  if (*p.status != -1) return;  // a row was not finite: x / conf stay untouched

  const int64_t b = blockIdx.x;
  const int tid = static_cast<int>(threadIdx.x);
  const int lane = lane_id();
  const int wid = warp_id();
  const int R = static_cast<int>(p.R);
  const int64_t M = p.mask_id;
  const int64_t be = p.block_end[b];
  const int64_t bs = p.block_start[b];
  const int64_t pl = p.prompt_len[b];
  const int64_t lo = bs > pl ? bs : pl;
  int64_t* xb = p.x + b * p.L;
  double* cb = p.conf + b * p.L;
  const int64_t rbase = b * p.R;
  int* g_r = p.list_r + rbase;
  double* g_q = p.list_q + rbase;
  bool* tr = p.transfer + rbase;

  // 1. Compact the eligible rows (x == M, pos < block_end), in order of r.
  int n = 0;
  for (int t0 = 0; t0 < R; t0 += kSeqThreads) {
    const int r = t0 + tid;
    bool elig = false;
    if (r < R) {
      const int64_t pos = p.row0 + r;
      elig = xb[pos] == M && pos < be;
      tr[r] = false;
    }
    const unsigned bal = __ballot_sync(kFullMask, elig);
    if (lane == 0) s_cnt[wid] = __popc(bal);
    __syncthreads();
    int off = 0, tot = 0;
#pragma unroll
    for (int w = 0; w < kSeqWarps; ++w) {
      off += w < wid ? s_cnt[w] : 0;
      tot += s_cnt[w];
    }
    if (elig) {
      const int j = n + off + __popc(bal & ((1u << lane) - 1u));
      const double qv = p.q[rbase + r];
      g_r[j] = r;
      g_q[j] = qv;
      if (j < kSeqCap) {
        s_r[j] = r;
        s_q[j] = qv;
      }
    }
    n += tot;
    __syncthreads();
  }
  const bool in_smem = n <= kSeqCap;
  const double* lq = in_smem ? s_q : g_q;
  const int* lr = in_smem ? s_r : g_r;

  // 2. Transfer selection (writes transfer[] = true; rows were reset above).
  if (p.stdd.on) {
    stdd_transfer(p, b, lr, lq, n, tr);
  } else if (!p.use_threshold) {
    const int64_t want = p.num_transfer[b];
    const int take = want <= 0 ? 0 : (want >= n ? n : static_cast<int>(want));
    if (take == n) {
      for (int j = tid; j < n; j += kSeqThreads) tr[lr[j]] = true;
    } else if (take > 0) {
      // rank of j = #{i : q_i > q_j or (q_i == q_j and i < j)}; the list is in
      // increasing pos, so i < j is "smaller pos first" on ties.
      for (int j = tid; j < n; j += kSeqThreads) {
        const double qj = lq[j];
        int rank = 0;
        for (int i = 0; i < n && rank < take; ++i) {
          const double qi = lq[i];
          rank += (qi > qj || (qi == qj && i < j)) ? 1 : 0;
        }
        if (rank < take) tr[lr[j]] = true;
      }
    }
  } else if (n > 0) {
    const int best = block_best(lq, nullptr, n);
    for (int j = tid; j < n; j += kSeqThreads) {
      if (j == best || lq[j] >= p.threshold) tr[lr[j]] = true;
    }
  }
  __syncthreads();

  // 3. Per row: transfer, revision, new representation.
  const int k = p.k;
  T* wout = static_cast<T*>(p.w);
  for (int r = tid; r < R; r += kSeqThreads) {
    const int64_t pos = p.row0 + r;
    const int64_t flat = rbase + r;
    int64_t xv = xb[pos];
    double cv = cb[pos];
    const int64_t x0 = p.x0[flat];
    const double q = p.q[flat];
    bool changed = false;
    if (tr[r]) {
      xv = x0;
      cv = q;
      changed = true;
    }
    if (pos >= lo && xv != M && q > cv && (!p.exclude_mask || x0 != M)) {
      xv = x0;
      cv = q;
      changed = true;
    }
    if (changed) {
      xb[pos] = xv;
      cb[pos] = cv;
    }
    p.ids[flat * (k + 1) + k] = xv;
    T* wr = wout + flat * (k + 1);
    if (pos < lo) {
      for (int j = 0; j < k; ++j) wr[j] = from_double<T>(0.0);
      wr[k] = from_double<T>(1.0);
    } else {
      const double* tpr = p.tp + flat * k;
      double ssum = 0.0;
      for (int j = 0; j < k; ++j) ssum += tpr[j];
      const double e = xv == M ? ssum / (1.0 - p.alpha) * p.alpha : 0.0;
      const double tot = ssum + e;
      for (int j = 0; j < k; ++j) wr[j] = from_double<T>(tpr[j] / tot);
      wr[k] = from_double<T>(e / tot);
    }
  }
}

}  // namespace detail
}  // namespace cuda
}  // namespace evofast
