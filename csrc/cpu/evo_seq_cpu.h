// Sequence pass of the CPU evo_step kernel (csrc/README.md, evo_step_fused_opt,
// item 2), per batch row b over the window: eligibility, transfer (schedule,
// threshold or STDD), revision, and the new (ids, w) representation.
#pragma once

#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu/evo_cpu_math.h"

namespace evofast {
namespace cpu_detail {

struct StddParams {
  bool on = false;
  double tau = 0.0, lam_t = 0.0, lam_s = 0.0, tau_min = 0.0, tau_max = 0.0;
  int64_t window = 1, radius = 0;
  double* history = nullptr;  // (B, L, window)
  int64_t* count = nullptr;   // (B, L)
  const double* gram = nullptr;  // (B*R, 2 radius + 1) when lam_s != 0 and radius > 0
};

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
  StddParams stdd;
};

// TV: population std of the last `window` values of the ring (q appended),
// summed oldest first; 0 with fewer than two values.
inline double stdd_tv(const double* hist, int64_t cnt, int64_t W, double q) {
  const int64_t n = std::min(cnt + 1, W), first = cnt + 1 - n;
  if (n < 2) return 0.0;
  double acc = 0.0;
  for (int64_t s = first; s <= cnt; ++s) acc += s == cnt ? q : hist[s % W];
  const double mean = acc / static_cast<double>(n);
  double acc2 = 0.0;
  for (int64_t s = first; s <= cnt; ++s) {
    const double d = (s == cnt ? q : hist[s % W]) - mean;
    acc2 += d * d;
  }
  return std::sqrt(acc2 / static_cast<double>(n));
}

// SD of window row r from the Gram band g (rows of width 2 radius + 1): neighbour
// offsets ascending, pairs with the first offset outer (the reference's order).
inline double stdd_sd(const double* g, int64_t R, int64_t r, int64_t radius) {
  const int64_t width = 2 * radius + 1;
  auto G = [&](int64_t u, int64_t v) { return g[std::min(u, v) * width + (u > v ? u - v : v - u)]; };
  double dot = 0.0, nm = 0.0;
  bool has = false;
  for (int64_t a = -radius; a <= radius; ++a) {
    if (a == 0 || r + a < 0 || r + a >= R) continue;
    dot += G(r, r + a);
    has = true;
  }
  for (int64_t a = -radius; a <= radius; ++a) {
    if (a == 0 || r + a < 0 || r + a >= R) continue;
    for (int64_t c = -radius; c <= radius; ++c) {
      if (c == 0 || r + c < 0 || r + c >= R) continue;
      nm += G(r + a, r + c);
    }
  }
  const double ni = g[r * width];
  if (!has || !(ni > 0.0) || !(nm > 0.0) || !std::isfinite(ni) || !std::isfinite(nm)) return 0.0;
  const double cos = dot / (std::sqrt(ni) * std::sqrt(nm));
  if (!std::isfinite(cos)) return 0.0;
  return std::min(std::max(1.0 - cos, 0.0), 2.0);
}

// STDD transfer over the eligible rows `cand` of batch row b; appends q to their history.
inline void stdd_select(const SeqParams& P, int64_t b, const std::vector<int64_t>& cand, bool* tr) {
  const StddParams& S = P.stdd;
  const double* q = P.q + b * P.R;
  double* hist = S.history + (b * P.L + P.row0) * S.window;
  int64_t* cnt = S.count + b * P.L + P.row0;
  bool any = false;
  int64_t best = -1;
  double best_d = 0.0;
  for (int64_t r : cand) {
    const int64_t c = std::max<int64_t>(cnt[r], 0);
    const double tv = S.lam_t != 0.0 ? stdd_tv(hist + r * S.window, c, S.window, q[r]) : 0.0;
    const double sd = S.gram != nullptr ? stdd_sd(S.gram + b * P.R * (2 * S.radius + 1), P.R, r, S.radius) : 0.0;
    double tau = S.tau + S.lam_t * tv;
    tau = tau + S.lam_s * sd;
    tau = std::min(std::max(tau, S.tau_min), S.tau_max);
    if (q[r] >= tau) {
      tr[r] = true;
      any = true;
    }
    // fallback order: q - tau larger, then q larger, then the smaller position (cand ascends)
    const double d = q[r] - tau;
    if (best < 0 || d > best_d || (d == best_d && q[r] > q[best])) {
      best = r;
      best_d = d;
    }
  }
  if (!any && best >= 0) tr[best] = true;
  for (int64_t r : cand) {  // record q
    const int64_t c = std::max<int64_t>(cnt[r], 0);
    hist[r * S.window + c % S.window] = q[r];
    cnt[r] = c + 1;
  }
}

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
  if (P.stdd.on) {
    stdd_select(P, b, cand, tr);
  } else if (!cand.empty()) {
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

}  // namespace cpu_detail
}  // namespace evofast
