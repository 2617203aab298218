// Declarations of the C++ CPU kernels (see csrc/README.md for the exact semantics).
#pragma once
#include <torch/types.h>
#include <tuple>

namespace evofast {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> evo_step_cpu(
    const at::Tensor& logits, at::Tensor& x, at::Tensor& conf, const at::Tensor& num_transfer,
    const at::Tensor& block_start, const at::Tensor& block_end, const at::Tensor& prompt_len,
    int64_t row0, int64_t mask_id, int64_t k_soft, double alpha, double temperature,
    bool random_remask, double threshold, bool use_threshold, bool exclude_mask, int64_t seed);

at::Tensor soft_embed_fwd_cpu(const at::Tensor& weight, const at::Tensor& ids, const at::Tensor& w);

std::tuple<at::Tensor, at::Tensor> soft_embed_bwd_cpu(
    const at::Tensor& grad, const at::Tensor& weight, const at::Tensor& ids, const at::Tensor& w,
    bool need_weight, bool need_w);

}  // namespace evofast
