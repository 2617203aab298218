// The normalised weights of soft_embed's forward, computed exactly as the authors'
// model computes them: torch's own ops in w's dtype (its reductions and roundings;
// one ulp in the divisor is enough to change a sharp model's later tokens), then
// promoted to the product dtype promote(w.dtype, weight.dtype) (exact: it only widens).
// Shared by the CPU kernel and the CUDA binding, so both see torch's values.
#pragma once
#include <ATen/ATen.h>

namespace evofast {

inline at::Tensor product_weights(const at::Tensor& w, at::ScalarType weight_dtype) {
  const at::Tensor c = w.clamp_min(0);
  const at::Tensor wn = c / c.sum(-1, /*keepdim=*/true).clamp_min(1e-12);
  return wn.to(at::promote_types(w.scalar_type(), weight_dtype));
}

}  // namespace evofast
