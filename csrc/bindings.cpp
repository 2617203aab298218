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

TORCH_LIBRARY_IMPL(evofast, CPU, m) {
  m.impl("evo_step_fused", &evofast::evo_step_cpu);
  m.impl("evo_step_fused_opt", &evofast::evo_step_cpu_opt);
  m.impl("soft_embed_fwd_fused", &evofast::soft_embed_fwd_cpu);
  m.impl("soft_embed_bwd_fused", &evofast::soft_embed_bwd_cpu);
}
