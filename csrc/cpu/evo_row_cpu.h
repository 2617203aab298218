// Row pass of the CPU evo_step kernel (csrc/README.md, evo_step_fused_opt, item 1).
//
// Each logits row is read once, in chunks of kChunk elements that stay in L1: per
// chunk the max (and a NaN flag), a running top-k (sorted, only touched when an
// element beats the current k-th), the float64 sum of exp(l - mx) against the
// running max (with sum exp(l - mx) (l - mx) beside it for the entropy), and at
// temperature > 0 either the Gumbel scores of every column or, with a top_k
// sampling filter, the running top-k of the sampled columns with their scores.
// The chunk sums are rescaled to the final max once at the end (one rounding
// per chunk) and added with compensation.
//
// Two orders over the rows: row after row (rows_pass), or, when STDD needs the
// spatial term, tiles of consecutive rows of one batch row visited chunk-major
// (tile_pass): for each column chunk, the rows of the tile in order, so that the
// chunks of the previous 2r rows are still in cache (a ring of 2r + 1 chunk
// buffers) and the Gram band <l_i, l_{i+d}>, d = 0..2r, is summed from them in
// the same pass. A tile also reads the chunks of the 2r rows after it (for the
// dot products of its last rows only); with one tile per batch row (one thread)
// nothing is read twice.
#pragma once

#include <vector>

#include "cpu/evo_cpu_math.h"

namespace evofast {
namespace cpu_detail {

constexpr int kMaxFilterK = 64;
enum Confidence : int { kProb = 0, kMargin = 1, kEntropy = 2 };

struct RowParams {
  const void* logits;
  int64_t s0, s1;  // element strides of logits' dims 0 and 1
  int64_t R, V, M, k, row0;
  bool excl;          // column M excluded from softmax / top-k / argmax (exclude_mask && T == 0)
  bool gumbel_excl;   // column M excluded from the Gumbel argmax (exclude_mask && T > 0)
  double T;
  bool random_remask;
  uint64_t seed;
  int conf;           // Confidence: what q measures
  int kk;             // entries of the running top-k: k, at least 2 for the margin
  int fk;             // top_k sampling filter (T > 0); 0: none
  int band;           // STDD spatial term: the Gram band width 2r; 0: none
  int64_t tile;       // rows per tile (band > 0)
  int64_t tiles_per_b;
  // outputs, flat row index i = b * R + r
  int64_t* x0;
  double* q;
  double* tp;       // (B*R, k)
  int64_t* ids;     // (B*R, k+1): the top-k ids go into the first k slots
  uint8_t* bad;
  double* gram;     // (B*R, band + 1): <l_i, l_{i+d}> without column M (band > 0)
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

EVO_INLINE bool better_score(double s, int64_t i, double bs, int64_t bi) {
  return s > bs || (s == bs && i < bi);
}

// The top_k sampling filter: the k largest sampled columns (ties: smaller index
// first) with their Gumbel scores, and the columns beyond them equal to the k-th
// value (the filter keeps ties): their count and best score.
template <typename vt>
struct FilterTopK {
  vt val[kMaxFilterK];
  int64_t idx[kMaxFilterK];
  double score[kMaxFilterK];
  int cnt = 0;
  int k = 1;
  int64_t ovf = 0;
  double ovf_score = -std::numeric_limits<double>::infinity();
  int64_t ovf_idx = -1;

  void reset(int kf) {
    cnt = 0;
    k = kf;
    ovf = 0;
    ovf_score = -std::numeric_limits<double>::infinity();
    ovf_idx = -1;
  }
  EVO_INLINE void add_ovf(double s, int64_t i) {
    ++ovf;
    if (better_score(s, i, ovf_score, ovf_idx)) {
      ovf_score = s;
      ovf_idx = i;
    }
  }
  EVO_INLINE void insert(vt v, int64_t i, double s) {  // cnt < k; i beyond every held index
    int j = cnt++;
    while (j > 0 && val[j - 1] < v) {
      val[j] = val[j - 1];
      idx[j] = idx[j - 1];
      score[j] = score[j - 1];
      --j;
    }
    val[j] = v;
    idx[j] = i;
    score[j] = s;
  }
  // Column i (increasing) of value v; score(i) gives its Gumbel score on demand.
  template <typename F>
  EVO_INLINE void offer(vt v, int64_t i, const F& score_of) {
    if (cnt < k) return insert(v, i, score_of());
    const vt t = val[k - 1];
    if (v > t) {
      const double es = score[k - 1];
      const int64_t ei = idx[k - 1];
      --cnt;
      insert(v, i, score_of());
      if (val[k - 1] == t) {
        add_ovf(es, ei);  // still tied with the new k-th value: kept
      } else {
        ovf = 0;  // the k-th value rose: the old ties drop out
        ovf_score = -std::numeric_limits<double>::infinity();
        ovf_idx = -1;
      }
    } else if (v == t) {
      add_ovf(score_of(), i);
    }
  }
};

template <typename vt>
struct RowState {
  TopK<vt> tk;
  double mx;
  int has_nan;
  double gbest;     // Gumbel argmax over every column (T > 0 without a filter)
  int64_t gidx;
  FilterTopK<vt> ft;
  std::vector<double> csum, cmax, cent;  // per chunk: sums against the running max, that max

  void start(const RowParams& P, int64_t nchunks) {
    tk.cnt = 0;
    tk.k = P.kk;
    mx = -std::numeric_limits<double>::infinity();
    has_nan = 0;
    gbest = -std::numeric_limits<double>::infinity();
    gidx = -1;
    if (P.fk > 0) ft.reset(P.fk);
    csum.clear();
    cmax.clear();
    cent.clear();
    csum.reserve(nchunks);
    cmax.reserve(nchunks);
    if (P.conf == kEntropy) cent.reserve(nchunks);
  }
};

// Chunk [c0, c0 + n) of a row as compute-type values: in place for fp32 (unless
// column M must read -inf), else converted into buf.
template <typename scalar_t>
EVO_INLINE const typename ComputeType<scalar_t>::type* load_chunk(
    const RowParams& P, const scalar_t* row, int64_t c0, int64_t n,
    typename ComputeType<scalar_t>::type* buf) {
  using vt = typename ComputeType<scalar_t>::type;
  const bool has_m = P.M >= c0 && P.M < c0 + n;
  if (std::is_same_v<scalar_t, vt> && !(P.excl && has_m)) return reinterpret_cast<const vt*>(row + c0);
  convert_chunk<scalar_t>(row + c0, n, buf);
  if (P.excl && has_m) buf[P.M - c0] = -std::numeric_limits<vt>::infinity();
  return buf;
}

// Offers the sampled columns of a chunk to the filter's running top-k. Once it
// is full, blocks of kSumBlock columns whose max is below its k-th value are
// skipped (nearly all of them on a long row).
template <typename vt>
EVO_INLINE void filter_chunk(const RowParams& P, FilterTopK<vt>& ft, const vt* p, int64_t c0, int64_t n,
                             vt cm, uint64_t gkey) {
  const int64_t skip = P.gumbel_excl ? P.M - c0 : -1;
  auto offer = [&](int64_t t) {
    const vt x = p[t];
    ft.offer(x, c0 + t, [&] { return gumbel_score(static_cast<double>(x), gkey, c0 + t, P.T); });
  };
  int64_t t = 0;
  for (; t < n && ft.cnt < ft.k; ++t)
    if (t != skip) offer(t);
  if (t == n || cm < ft.val[ft.k - 1]) return;
  for (int64_t b0 = t; b0 < n; b0 += kSumBlock) {
    const int64_t b1 = std::min(n, b0 + kSumBlock);
    int nan = 0;
    if (chunk_max<vt>(p + b0, b1 - b0, nan) < ft.val[ft.k - 1]) continue;
    for (int64_t u = b0; u < b1; ++u)
      if (p[u] >= ft.val[ft.k - 1] && u != skip) offer(u);
  }
}

template <typename vt, Isa isa>
EVO_INLINE void consume_chunk(const RowParams& P, RowState<vt>& st, const vt* p, int64_t c0, int64_t n,
                              double* gbuf, uint64_t gkey) {
  const double ninf = -std::numeric_limits<double>::infinity();
  const bool has_m = P.M >= c0 && P.M < c0 + n;
  const vt cm = chunk_max<vt>(p, n, st.has_nan);

  // top-k: fill the first k (column M skipped when excluded), then only
  // elements beating the current k-th (strictly: earlier index wins ties).
  TopK<vt>& tk = st.tk;
  const int k = tk.k;
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
  if (cmd > st.mx) st.mx = cmd;
  if (st.mx > ninf) {
    if (P.conf == kEntropy && P.fk == 0) {
      double e = 0.0;
      st.csum.push_back(chunk_expsum_ent<lanes(isa), vt>(p, n, st.mx, e));
      st.cent.push_back(e);
    } else {
      st.csum.push_back(chunk_expsum<lanes(isa), vt>(p, n, st.mx));
    }
    st.cmax.push_back(st.mx);
  }

  if (P.T > 0 && P.fk > 0) {  // the filter's running top-k; nothing to do below its k-th value
    filter_chunk(P, st.ft, p, c0, n, cm, gkey);
  } else if (P.T > 0) {
    chunk_gumbel<vt>(p, n, gkey, c0, P.T, gbuf);
    if (P.gumbel_excl && has_m) gbuf[P.M - c0] = ninf;
    double gm = ninf;
#pragma omp simd reduction(max : gm)
    for (int64_t t = 0; t < n; ++t) gm = gbuf[t] > gm ? gbuf[t] : gm;
    if (gm > st.gbest) {
      int64_t t = 0;
      while (t < n && !(gbuf[t] == gm)) ++t;
      st.gbest = gm;
      st.gidx = c0 + t;
    }
  }
}

// x0 and q of a row under the top_k filter: the Gumbel argmax over the kept
// columns, and q measured on the filtered distribution at temperature T.
template <typename vt>
EVO_INLINE void finish_filtered(const RowParams& P, const FilterTopK<vt>& f, int64_t& x0, double& q) {
  const double T = P.T, mxf = static_cast<double>(f.val[0]);
  double sf = 0.0, ef = 0.0, best = f.score[0], lx0 = mxf;
  x0 = f.idx[0];
  auto weigh = [&](double v, double times) {
    const double a = (v - mxf) / T;
    const double w = std::exp(a);
    sf += times * w;
    ef += w > 0.0 ? times * (w * a) : 0.0;
    return w;
  };
  double w2 = 0.0;
  for (int t = 0; t < f.cnt; ++t) {
    const double w = weigh(static_cast<double>(f.val[t]), 1.0);
    if (t == 1) w2 = w;
    if (better_score(f.score[t], f.idx[t], best, x0)) {
      best = f.score[t];
      x0 = f.idx[t];
      lx0 = static_cast<double>(f.val[t]);
    }
  }
  if (f.ovf > 0) {
    const double tv = static_cast<double>(f.val[f.cnt - 1]);
    const double w = weigh(tv, static_cast<double>(f.ovf));
    if (f.cnt == 1) w2 = w;
    if (better_score(f.ovf_score, f.ovf_idx, best, x0)) {
      x0 = f.ovf_idx;
      lx0 = tv;
    }
  }
  if (P.conf == kMargin) q = 1.0 / sf - w2 / sf;
  else if (P.conf == kEntropy) q = ef / sf - std::log(sf);
  else q = std::exp((lx0 - mxf) / T) / sf;
}

template <typename scalar_t, typename vt>
EVO_INLINE void finish_row(const RowParams& P, RowState<vt>& st, int64_t i, const scalar_t* row) {
  const int64_t b = i / P.R, pos = P.row0 + i % P.R;
  const int k = static_cast<int>(P.k);
  const double mx = st.mx;
  bool bad = st.has_nan || !std::isfinite(mx);
  double s = 0.0, ent = 0.0;
  if (!bad) {
    double comp = 0.0, ecomp = 0.0;
    for (size_t c = 0; c < st.csum.size(); ++c) {
      const double f = st.cmax[c] == mx ? 1.0 : std::exp(st.cmax[c] - mx);
      neumaier_add(s, comp, st.cmax[c] == mx ? st.csum[c] : st.csum[c] * f);
      if (!st.cent.empty()) neumaier_add(ent, ecomp, f * (st.cent[c] + (st.cmax[c] - mx) * st.csum[c]));
    }
    s += comp;
    ent += ecomp;
    bad = !std::isfinite(s) || !(s > 0.0);
  }
  const bool filtered = P.T > 0 && P.fk > 0;
  if (filtered && !bad) bad = st.ft.cnt == 0 || !(static_cast<double>(st.ft.val[0]) > -INFINITY);
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
    return;
  }
  const TopK<vt>& tk = st.tk;
  for (int t = 0; t < k; ++t) {
    tpi[t] = std::exp(static_cast<double>(tk.val[t]) - mx) / s;
    idsi[t] = tk.idx[t];
  }
  int64_t x0;
  double q;
  if (filtered) {
    finish_filtered(P, st.ft, x0, q);
  } else {
    if (P.T > 0) {
      // gidx < 0 only if every score is -inf (only column M finite, and excluded):
      // index 0, like torch.argmax over an all -inf row
      x0 = st.gidx >= 0 ? st.gidx : 0;
      q = std::exp(static_cast<double>(to_compute<scalar_t>(row[x0])) - mx) / s;
    } else {
      x0 = tk.idx[0];  // argmax (M excluded when exclude_mask), first index on ties
      q = tpi[0];
    }
    if (P.conf == kMargin) {
      const double p2 = tk.cnt > 1 ? std::exp(static_cast<double>(tk.val[1]) - mx) / s : 0.0;
      q = std::exp(static_cast<double>(tk.val[0]) - mx) / s - p2;
    } else if (P.conf == kEntropy) {
      q = ent / s - std::log(s);
    }
  }
  if (P.random_remask) {
    const uint64_t z = mix64(rng_key(P.seed, kStreamRemask, b, pos));
    q = (static_cast<double>(z >> 11) + 0.5) * 0x1p-53;  // (0, 1)
  }
  P.x0[i] = x0;
  P.q[i] = q;
}

// Flat rows [begin, end), one after the other.
template <typename scalar_t, Isa isa>
EVO_INLINE void rows_pass(const RowParams& P, int64_t begin, int64_t end) {
  using vt = typename ComputeType<scalar_t>::type;
  alignas(64) vt buf[kChunk];
  std::vector<double> gbuf(P.T > 0 && P.fk == 0 ? kChunk : 0);
  const int64_t nchunks = (P.V + kChunk - 1) / kChunk;
  const scalar_t* base = static_cast<const scalar_t*>(P.logits);
  RowState<vt> st;
  for (int64_t i = begin; i < end; ++i) {
    const int64_t b = i / P.R, r = i % P.R;
    const scalar_t* row = base + b * P.s0 + r * P.s1;
    const uint64_t gkey = P.T > 0 ? rng_key(P.seed, kStreamGumbel, b, P.row0 + r) : 0;
    st.start(P, nchunks);
    for (int64_t c0 = 0; c0 < P.V; c0 += kChunk) {
      const int64_t n = std::min(kChunk, P.V - c0);
      consume_chunk<vt, isa>(P, st, load_chunk<scalar_t>(P, row, c0, n, buf), c0, n, gbuf.data(), gkey);
    }
    finish_row<scalar_t, vt>(P, st, i, row);
  }
}

// Tiles [begin, end) (tile t: batch row t / tiles_per_b, rows [r0, r1)), chunk-major,
// with the Gram band of the tile's rows (see the file comment).
template <typename scalar_t, Isa isa>
EVO_INLINE void tile_pass(const RowParams& P, int64_t begin, int64_t end) {
  using vt = typename ComputeType<scalar_t>::type;
  const int64_t D = P.band, slots = D + 1;
  std::vector<vt> ring(static_cast<size_t>(slots * kChunk));
  std::vector<const vt*> rp(static_cast<size_t>(slots));
  std::vector<double> gbuf(P.T > 0 && P.fk == 0 ? kChunk : 0);
  const int64_t nchunks = (P.V + kChunk - 1) / kChunk;
  const scalar_t* base = static_cast<const scalar_t*>(P.logits);
  std::vector<RowState<vt>> states;
  std::vector<uint64_t> keys;
  std::vector<const vt*> prev(static_cast<size_t>(D));
  std::vector<double> dots(static_cast<size_t>(D + 1));
  for (int64_t t = begin; t < end; ++t) {
    const int64_t b = t / P.tiles_per_b;
    const int64_t r0 = (t % P.tiles_per_b) * P.tile;
    const int64_t r1 = std::min(P.R, r0 + P.tile);
    if (r0 >= r1) continue;
    const int64_t rend = std::min(P.R, r1 + D);  // rows after the tile: dot products only
    states.resize(static_cast<size_t>(r1 - r0));
    keys.resize(static_cast<size_t>(r1 - r0));
    for (int64_t r = r0; r < r1; ++r) {
      states[r - r0].start(P, nchunks);
      keys[r - r0] = P.T > 0 ? rng_key(P.seed, kStreamGumbel, b, P.row0 + r) : 0;
      double* g = P.gram + (b * P.R + r) * slots;
      for (int64_t d = 0; d <= D; ++d) g[d] = 0.0;
    }
    for (int64_t c0 = 0; c0 < P.V; c0 += kChunk) {
      const int64_t n = std::min(kChunk, P.V - c0);
      const int64_t skip = P.M - c0;  // column M, in chunk coordinates
      for (int64_t r = r0; r < rend; ++r) {
        const int64_t slot = (r - r0) % slots;
        const vt* p = load_chunk<scalar_t>(P, base + b * P.s0 + r * P.s1, c0, n, ring.data() + slot * kChunk);
        rp[slot] = p;
        if (r < r1) consume_chunk<vt, isa>(P, states[r - r0], p, c0, n, gbuf.data(), keys[r - r0]);
        // this chunk's products with itself and the previous rows' chunks (still in cache)
        const int nprev = static_cast<int>(std::min(D, r - r0));
        for (int d = 1; d <= nprev; ++d) prev[d - 1] = rp[(r - d - r0) % slots];
        chunk_band<vt>(p, prev.data(), nprev, n, skip, dots.data());
        if (r < r1) P.gram[(b * P.R + r) * slots] += dots[0];
        for (int d = 1; d <= nprev; ++d)
          if (r - d < r1) P.gram[(b * P.R + r - d) * slots + d] += dots[d];
      }
    }
    for (int64_t r = r0; r < r1; ++r)
      finish_row<scalar_t, vt>(P, states[r - r0], b * P.R + r, base + b * P.s0 + r * P.s1);
  }
}

template <typename scalar_t, Isa isa>
EVO_INLINE void row_pass_impl(const RowParams& P, int64_t begin, int64_t end) {
  if (P.band > 0) tile_pass<scalar_t, isa>(P, begin, end);
  else rows_pass<scalar_t, isa>(P, begin, end);
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

Isa cpu_isa();

// The row pass over work items [begin, end): rows, or tiles when band > 0.
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

}  // namespace cpu_detail
}  // namespace evofast
