// C++ CPU kernel of evofast::evo_step_fused_opt (semantics: csrc/README.md;
// evo_step_fused calls it without options, csrc/bindings.cpp).
//
// Two passes:
//  1. Row pass (cpu/evo_row_cpu.h), parallel over the B*R window rows (or over
//     tiles of rows when STDD needs its spatial term): each logits row is read
//     from memory once and gives x0, q, the top-k probabilities and, for STDD,
//     the Gram band of neighbouring rows. The hot loop is a branch-free
//     polynomial exp on GCC vector extensions, compiled for SSE2 / AVX2+FMA /
//     AVX-512 and picked at run time; EVOFAST_CPU_ISA=default|avx2 caps the
//     choice. q lies within ~1e-15 (relative) of the exactly rounded softmax value.
//  2. Sequence pass (cpu/evo_seq_cpu.h), parallel over b: eligibility, transfer,
//     revision, and the new (ids, w) representation.
#include "cpu/kernels.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "cpu/evo_row_cpu.h"
#include "cpu/evo_seq_cpu.h"

namespace evofast {
namespace cpu_detail {

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

}  // namespace cpu_detail

namespace {

void check_vec(const at::Tensor& t, const char* name, int64_t B) {
  TORCH_CHECK(t.device().is_cpu(), "evo_step_fused: ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kLong, "evo_step_fused: ", name, " must be int64, got ",
              t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == B, "evo_step_fused: ", name, " must have shape (", B,
              ",), got ", t.sizes());
}

// STDD's history tensors against the window (cheap shape checks).
void check_stdd(const std::optional<at::Tensor>& history, const std::optional<at::Tensor>& count,
                at::ArrayRef<double> params, int64_t radius, int64_t B, int64_t L) {
  TORCH_CHECK(params.size() == 5, "evo_step_fused_opt: stdd_params must be [tau, lam_t, lam_s, tau_min, "
              "tau_max], got ", params.size(), " values");
  TORCH_CHECK(history.has_value() && count.has_value(),
              "evo_step_fused_opt: stdd_history and stdd_count are required with stdd_params");
  const at::Tensor& h = *history;
  const at::Tensor& c = *count;
  TORCH_CHECK(h.device().is_cpu() && h.scalar_type() == at::kDouble && h.dim() == 3 && h.size(0) == B &&
                  h.size(1) == L && h.size(2) >= 1 && h.is_contiguous(),
              "evo_step_fused_opt: stdd_history must be a contiguous (B, L, W) float64 CPU tensor, got ",
              h.scalar_type(), " ", h.sizes());
  TORCH_CHECK(c.device().is_cpu() && c.scalar_type() == at::kLong && c.sizes() == at::IntArrayRef({B, L}) &&
                  c.is_contiguous(),
              "evo_step_fused_opt: stdd_count must be a contiguous (B, L) int64 CPU tensor, got ",
              c.scalar_type(), " ", c.sizes());
  TORCH_CHECK(radius >= 0 && radius <= 16, "evo_step_fused_opt: stdd_radius must lie in [0, 16], got ", radius);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> evo_step_cpu_opt(
    const at::Tensor& logits, at::Tensor& x, at::Tensor& conf, const at::Tensor& num_transfer,
    const at::Tensor& block_start, const at::Tensor& block_end, const at::Tensor& prompt_len,
    int64_t row0, int64_t mask_id, int64_t k_soft, double alpha, double temperature,
    bool random_remask, double threshold, bool use_threshold, bool exclude_mask, int64_t seed,
    int64_t confidence, int64_t top_k, const std::optional<at::Tensor>& stdd_history,
    const std::optional<at::Tensor>& stdd_count, at::ArrayRef<double> stdd_params, int64_t stdd_radius) {
  using namespace cpu_detail;
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
  TORCH_CHECK(confidence >= kProb && confidence <= kEntropy,
              "evo_step_fused_opt: confidence must be 0 (prob), 1 (margin) or 2 (entropy), got ", confidence);
  TORCH_CHECK(top_k >= 0 && top_k <= kMaxFilterK, "evo_step_fused_opt: top_k must lie in [0, ", kMaxFilterK,
              "] (0: no filter), got ", top_k);
  const bool stdd = !stdd_params.empty() || stdd_history.has_value();
  if (stdd) check_stdd(stdd_history, stdd_count, stdd_params, stdd_radius, B, L);

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
  at::Tensor tp = at::zeros({B, R, k}, logits.options().dtype(at::kDouble));
  at::Tensor q = at::zeros({B, R}, logits.options().dtype(at::kDouble));
  if (BR == 0) return {ids, w, transfer, status, tp.to(at::kFloat), q};

  // STDD's spatial term (a nonzero lam_s and a neighbourhood) needs the Gram band
  const double lam_s = stdd ? stdd_params[2] : 0.0;
  const int64_t band = (stdd && lam_s != 0.0 && stdd_radius > 0 && R > 1) ? 2 * stdd_radius : 0;
  std::vector<int64_t> x0(BR);
  std::vector<uint8_t> bad(BR);
  std::vector<double> gram(band > 0 ? BR * (band + 1) : 0);

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
  P.conf = static_cast<int>(confidence);
  P.fk = temperature > 0.0 ? static_cast<int>(top_k) : 0;
  P.kk = static_cast<int>(confidence == kMargin && P.fk == 0 ? std::max<int64_t>(k, 2) : k);
  P.band = static_cast<int>(band);
  P.x0 = x0.data();
  P.q = q.data_ptr<double>();
  P.tp = tp.data_ptr<double>();
  P.ids = ids.data_ptr<int64_t>();
  P.bad = bad.data();
  P.gram = gram.data();

  const double row_cost =
      static_cast<double>(V) * (temperature > 0 && P.fk == 0 ? 12.0 : 3.0) + static_cast<double>(V) * band;
  int64_t items = BR, grain = std::max<int64_t>(1, static_cast<int64_t>(65536.0 / row_cost));
  if (band > 0) {  // tiles: one per batch row, or split so that every thread has one
    const int64_t threads = at::get_num_threads();
    P.tiles_per_b = std::max<int64_t>(1, std::min<int64_t>((threads + B - 1) / B, R / (2 * band + 2)));
    P.tile = (R + P.tiles_per_b - 1) / P.tiles_per_b;
    items = B * P.tiles_per_b;
    grain = 1;
  }
  const double work = row_cost * static_cast<double>(BR);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, ldt, "evo_step_cpu", [&] {
    cpu_parallel_for(0, items, grain, work, [&](int64_t b0, int64_t b1) { run_row_pass<scalar_t>(P, b0, b1); });
  });

  for (int64_t i = 0; i < BR; ++i) {
    if (bad[i]) {
      status.fill_(i);
      ids.zero_();
      return {ids, w, transfer, status, tp.to(at::kFloat), q};  // x, conf (and the history) untouched
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
  S.q = P.q;
  S.tp = P.tp;
  S.ids = P.ids;
  S.transfer = transfer.data_ptr<bool>();
  if (stdd) {
    S.stdd.on = true;
    S.stdd.tau = stdd_params[0];
    S.stdd.lam_t = stdd_params[1];
    S.stdd.lam_s = stdd_params[2];
    S.stdd.tau_min = stdd_params[3];
    S.stdd.tau_max = stdd_params[4];
    S.stdd.window = stdd_history->size(2);
    S.stdd.radius = stdd_radius;
    S.stdd.history = stdd_history->data_ptr<double>();
    S.stdd.count = stdd_count->data_ptr<int64_t>();
    S.stdd.gram = band > 0 ? gram.data() : nullptr;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, ldt, "evo_step_cpu_seq", [&] {
    scalar_t* wp = w.data_ptr<scalar_t>();
    cpu_parallel_for(0, B, 1, static_cast<double>(BR) * (k + 8) * 4.0, [&](int64_t b0, int64_t b1) {
      std::vector<int64_t> cand;
      cand.reserve(R);
      for (int64_t b = b0; b < b1; ++b) sequence_pass<scalar_t>(S, b, wp, cand);
    });
  });
  return {ids, w, transfer, status, tp.to(at::kFloat), q};
}

}  // namespace evofast
