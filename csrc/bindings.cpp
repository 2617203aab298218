// Schemas of evofast's compiled ops and their CPU implementations.
// The CUDA implementations live in the optional evofast._C_cuda extension
// (csrc/cuda/bindings_cuda.cpp), registered against these same schemas.
#include <Python.h>
#include <torch/library.h>

#include "cpu/kernels.h"

// A Python module so that `import evofast._C` loads the library (and runs the
// registrations below); it has no Python-level functions.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&def);
}

TORCH_LIBRARY(evofast, m) {
  m.def(
      "evo_step_fused(Tensor logits, Tensor(a!) x, Tensor(b!) conf, Tensor num_transfer, "
      "Tensor block_start, Tensor block_end, Tensor prompt_len, int row0, int mask_id, int k_soft, "
      "float alpha, float temperature, bool random_remask, float threshold, bool use_threshold, "
      "bool exclude_mask, int seed) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "evo_step_fused_opt(Tensor logits, Tensor(a!) x, Tensor(b!) conf, Tensor num_transfer, "
      "Tensor block_start, Tensor block_end, Tensor prompt_len, int row0, int mask_id, int k_soft, "
      "float alpha, float temperature, bool random_remask, float threshold, bool use_threshold, "
      "bool exclude_mask, int seed, int confidence, int top_k, Tensor(c!)? stdd_history, "
      "Tensor(d!)? stdd_count, float[] stdd_params, int stdd_radius) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("soft_embed_fwd_fused(Tensor weight, Tensor ids, Tensor w) -> Tensor");
  m.def(
      "soft_embed_bwd_fused(Tensor grad, Tensor weight, Tensor ids, Tensor w, bool need_weight, "
      "bool need_w) -> (Tensor, Tensor)");
}

namespace {

// evo_step_fused is evo_step_fused_opt without options, on whatever backend the tensors
// select (CPU here, CUDA in evofast._C_cuda): one definition for both.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> evo_step_without_options(
    const at::Tensor& logits, at::Tensor& x, at::Tensor& conf, const at::Tensor& num_transfer,
    const at::Tensor& block_start, const at::Tensor& block_end, const at::Tensor& prompt_len,
    int64_t row0, int64_t mask_id, int64_t k_soft, double alpha, double temperature,
    bool random_remask, double threshold, bool use_threshold, bool exclude_mask, int64_t seed) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("evofast::evo_step_fused_opt", "")
                             .typed<decltype(evofast::evo_step_cpu_opt)>();
  auto out = op.call(logits, x, conf, num_transfer, block_start, block_end, prompt_len, row0, mask_id, k_soft,
                     alpha, temperature, random_remask, threshold, use_threshold, exclude_mask, seed, 0, 0,
                     std::nullopt, std::nullopt, {}, 0);
  return {std::get<0>(out), std::get<1>(out), std::get<2>(out), std::get<3>(out)};
}

}  // namespace

TORCH_LIBRARY_IMPL(evofast, CompositeExplicitAutograd, m) {
  m.impl("evo_step_fused", &evo_step_without_options);
}

TORCH_LIBRARY_IMPL(evofast, CPU, m) {
  m.impl("evo_step_fused_opt", &evofast::evo_step_cpu_opt);
  m.impl("soft_embed_fwd_fused", &evofast::soft_embed_fwd_cpu);
  m.impl("soft_embed_bwd_fused", &evofast::soft_embed_bwd_cpu);
}
