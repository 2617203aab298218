// Declarations of the C++ CPU kernels (see csrc/README.md for the exact semantics).
#pragma once
#include <torch/types.h>
#include <optional>
#include <tuple>

namespace evofast {

// evo_step_fused with the per-step options: confidence 0 prob / 1 margin / 2 entropy,
// top_k the sampling filter (0: none), STDD when stdd_params = [tau, lam_t, lam_s, tau_min,
// tau_max] is non-empty. Returns (ids, w, transfer, status, tp float32, q float64).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> evo_step_cpu_opt(
    const at::Tensor& logits, at::Tensor& x, at::Tensor& conf, const at::Tensor& num_transfer,
    const at::Tensor& block_start, const at::Tensor& block_end, const at::Tensor& prompt_len,
    int64_t row0, int64_t mask_id, int64_t k_soft, double alpha, double temperature,
    bool random_remask, double threshold, bool use_threshold, bool exclude_mask, int64_t seed,
    int64_t confidence, int64_t top_k, const std::optional<at::Tensor>& stdd_history,
    const std::optional<at::Tensor>& stdd_count, at::ArrayRef<double> stdd_params, int64_t stdd_radius);

at::Tensor soft_embed_fwd_cpu(const at::Tensor& weight, const at::Tensor& ids, const at::Tensor& w);

std::tuple<at::Tensor, at::Tensor> soft_embed_bwd_cpu(
    const at::Tensor& grad, const at::Tensor& weight, const at::Tensor& ids, const at::Tensor& w,
    bool need_weight, bool need_w);

}  // namespace evofast

// ---------------------------------------------------------------------------
// Parallel loop shared by the CPU kernels. at::parallel_for is header-inline: it
// only runs threads when this translation unit is compiled with OpenMP (setup.py
// passes -fopenmp, which defines _OPENMP and with it INTRA_OP_PARALLEL).
#include <ATen/Parallel.h>

#ifndef INTRA_OP_PARALLEL
#error "evofast's CPU kernels must be compiled with -fopenmp (see setup.py)"
#endif

namespace evofast {

// f(begin, end) over [begin, end) in pieces of at least `grain`; `work`, a rough
// cost of the whole loop in elementary operations, keeps small loops serial.
template <typename F>
inline void cpu_parallel_for(int64_t begin, int64_t end, int64_t grain, double work, const F& f) {
  if (begin >= end) return;
  if (work < 1e6) {
    f(begin, end);
    return;
  }
  at::parallel_for(begin, end, grain, f);
}

}  // namespace evofast
