// evofast._C_cuda: CUDA implementations of the ops whose schemas evofast._C
// defines (csrc/bindings.cpp). Thin: argument checks that name the argument,
// dtype dispatch, outputs / workspace allocated with torch, the current stream,
// then the torch-free launchers of evofast_cuda.h.
#include <Python.h>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdlib>
#include <optional>
#include <tuple>
#include <vector>

#include "cuda/evofast_cuda.h"
#include "product_weights.h"

// A Python module so that `import evofast._C_cuda` loads the library (and runs
// the registrations below); import evofast._C first, it defines the schemas.
extern "C" PyObject* PyInit__C_cuda(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C_cuda", nullptr, -1, nullptr,
                                   nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&def);
}

namespace evofast {
namespace {

namespace ec = evofast::cuda;

ec::DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return ec::DType::kFloat32;
    case at::kHalf:
      return ec::DType::kFloat16;
    case at::kBFloat16:
      return ec::DType::kBFloat16;
    default:
      return ec::DType::kFloat64;
  }
}

bool is_float_dtype(at::ScalarType t, bool allow_double) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || (allow_double && t == at::kDouble);
}

void check_on(const char* op, const at::Tensor& t, const char* name, const at::Device& dev) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got one on ", t.device());
  TORCH_CHECK(t.device() == dev, op, ": ", name, " must be on ", dev, " (like the other inputs), got ",
              t.device());
}

void check_bound(const char* op, const at::Tensor& t, const char* name, int64_t B, const at::Device& dev) {
  check_on(op, t, name, dev);
  TORCH_CHECK(t.scalar_type() == at::kLong, op, ": ", name, " must be int64, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == B, op, ": ", name, " must have shape (", B, ",), got ",
              t.sizes());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

int num_sms(c10::DeviceIndex device) {
  int n = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
  return n;
}

// EVOFAST_CUDA_EVO_SPLITS=<n> forces the launch shape (1: one block per row,
// n > 1: split-V with n column chunks); tests use it to cover both shapes.
int forced_splits() {
  const char* s = std::getenv("EVOFAST_CUDA_EVO_SPLITS");
  if (s == nullptr || *s == '\0') return 0;
  const long v = std::strtol(s, nullptr, 10);
  return v > 0 ? static_cast<int>(v < 1024 ? v : 1024) : 0;
}

bool env_flag(const char* name) {
  const char* s = std::getenv(name);
  return s != nullptr && *s != '\0' && *s != '0';
}

// STDD's history tensors (cheap shape checks).
void check_stdd(const char* op, const std::optional<at::Tensor>& history, const std::optional<at::Tensor>& count,
                at::ArrayRef<double> params, int64_t radius, int64_t B, int64_t L, const at::Device& dev) {
  TORCH_CHECK(params.size() == 5, op, ": stdd_params must be [tau, lam_t, lam_s, tau_min, tau_max], got ",
              params.size(), " values");
  TORCH_CHECK(history.has_value() && count.has_value(), op,
              ": stdd_history and stdd_count are required with stdd_params");
  check_on(op, *history, "stdd_history", dev);
  check_on(op, *count, "stdd_count", dev);
  const at::Tensor& h = *history;
  const at::Tensor& c = *count;
  TORCH_CHECK(h.scalar_type() == at::kDouble && h.dim() == 3 && h.size(0) == B && h.size(1) == L &&
                  h.size(2) >= 1 && h.is_contiguous(),
              op, ": stdd_history must be a contiguous (B, L, W) float64 tensor, got ", h.scalar_type(), " ",
              h.sizes());
  TORCH_CHECK(c.scalar_type() == at::kLong && c.sizes() == at::IntArrayRef({B, L}) && c.is_contiguous(), op,
              ": stdd_count must be a contiguous (B, L) int64 tensor, got ", c.scalar_type(), " ", c.sizes());
  TORCH_CHECK(radius >= 0 && radius <= 16, op, ": stdd_radius must lie in [0, 16], got ", radius);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> evo_step_cuda_opt(
    const at::Tensor& logits, at::Tensor& x, at::Tensor& conf, const at::Tensor& num_transfer,
    const at::Tensor& block_start, const at::Tensor& block_end, const at::Tensor& prompt_len,
    int64_t row0, int64_t mask_id, int64_t k_soft, double alpha, double temperature,
    bool random_remask, double threshold, bool use_threshold, bool exclude_mask, int64_t seed,
    int64_t confidence, int64_t top_k, const std::optional<at::Tensor>& stdd_history,
    const std::optional<at::Tensor>& stdd_count, at::ArrayRef<double> stdd_params, int64_t stdd_radius) {
  constexpr const char* op = "evo_step_fused";
  TORCH_CHECK(logits.is_cuda(), op, ": logits must be a CUDA tensor, got one on ", logits.device());
  const at::Device dev = logits.device();
  TORCH_CHECK(logits.dim() == 3, op, ": logits must have shape (B, R, V), got ", logits.sizes());
  TORCH_CHECK(is_float_dtype(logits.scalar_type(), false), op,
              ": logits must be float32, float16 or bfloat16, got ", logits.scalar_type());
  const int64_t B = logits.size(0), R = logits.size(1), V = logits.size(2);
  TORCH_CHECK(logits.stride(2) == 1 || V <= 1, op, ": logits must have a contiguous last dim, got strides ",
              logits.strides());
  TORCH_CHECK(V >= 1 && V <= 0x7fffffffLL, op, ": logits vocabulary size must be in [1, 2^31), got ", V);
  TORCH_CHECK(B * R <= 0x7fffffffLL, op, ": B * R must be below 2^31, got ", B * R);
  check_on(op, x, "x", dev);
  TORCH_CHECK(x.scalar_type() == at::kLong, op, ": x must be int64, got ", x.scalar_type());
  TORCH_CHECK(x.dim() == 2 && x.size(0) == B, op, ": x must have shape (", B, ", L), got ", x.sizes());
  TORCH_CHECK(x.is_contiguous(), op, ": x must be contiguous");
  const int64_t L = x.size(1);
  check_on(op, conf, "conf", dev);
  TORCH_CHECK(conf.scalar_type() == at::kDouble, op, ": conf must be float64, got ", conf.scalar_type());
  TORCH_CHECK(conf.sizes() == x.sizes(), op, ": conf must have the shape of x ", x.sizes(), ", got ",
              conf.sizes());
  TORCH_CHECK(conf.is_contiguous(), op, ": conf must be contiguous");
  check_bound(op, num_transfer, "num_transfer", B, dev);
  check_bound(op, block_start, "block_start", B, dev);
  check_bound(op, block_end, "block_end", B, dev);
  check_bound(op, prompt_len, "prompt_len", B, dev);
  TORCH_CHECK(row0 >= 0 && row0 + R <= L, op, ": row0 must satisfy 0 <= row0 and row0 + R <= L (R=", R,
              ", L=", L, "), got ", row0);
  TORCH_CHECK(k_soft >= 1 && k_soft <= ec::kEvoMaxK, op, ": k_soft must lie in [1, ", ec::kEvoMaxK,
              "], got ", k_soft);
  TORCH_CHECK(k_soft < V, op, ": k_soft (", k_soft, ") must be smaller than the vocabulary size ", V);
  TORCH_CHECK(mask_id >= 0 && mask_id < V, op, ": mask_id must lie in [0, ", V, "), got ", mask_id);
  TORCH_CHECK(alpha >= 0.0 && alpha < 1.0, op, ": alpha must lie in [0, 1), got ", alpha);
  TORCH_CHECK(temperature >= 0.0, op, ": temperature must be >= 0, got ", temperature);
  TORCH_CHECK(confidence >= 0 && confidence <= 2, op,
              ": confidence must be 0 (prob), 1 (margin) or 2 (entropy), got ", confidence);
  TORCH_CHECK(top_k == 0 || temperature == 0.0, op,
              ": the CUDA kernels have no top_k filter (evofast.ops.evo_step runs it on the reference), got ",
              top_k);
  const bool stdd = !stdd_params.empty() || stdd_history.has_value();
  if (stdd) check_stdd(op, stdd_history, stdd_count, stdd_params, stdd_radius, B, L, dev);

  const c10::cuda::CUDAGuard guard(dev);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  auto ids = at::empty({B, R, k_soft + 1}, logits.options().dtype(at::kLong));
  auto w = at::empty({B, R, k_soft + 1}, logits.options());
  auto transfer = at::empty({B, R}, logits.options().dtype(at::kBool));
  auto status = at::empty({1}, logits.options().dtype(at::kLong));
  auto q = at::empty({B, R}, logits.options().dtype(at::kDouble));
  auto tp = at::empty({B, R, k_soft}, logits.options().dtype(at::kDouble));

  ec::EvoStepArgs a;
  a.confidence = static_cast<int>(confidence);
  a.q_out = q.data_ptr<double>();
  a.tp_out = tp.data_ptr<double>();
  if (stdd) {
    a.stdd_history = stdd_history->data_ptr<double>();
    a.stdd_count = stdd_count->data_ptr<int64_t>();
    a.stdd_window = static_cast<int>(stdd_history->size(2));
    a.stdd_radius = static_cast<int>(stdd_radius);
    a.stdd_tau = stdd_params[0];
    a.stdd_lam_t = stdd_params[1];
    a.stdd_lam_s = stdd_params[2];
    a.stdd_tau_min = stdd_params[3];
    a.stdd_tau_max = stdd_params[4];
  }
  a.R = R;  // stdd_band() reads it
  const int forced = forced_splits();
  const int splits = forced > 0 ? forced : ec::evo_step_choose_splits(B * R, V, num_sms(dev.index()));
  const size_t ws_bytes =
      ec::evo_step_workspace_bytes(B, R, V, static_cast<int>(k_soft), splits, ec::stdd_band(a));
  at::Tensor ws;
  if (ws_bytes > 0) ws = at::empty({static_cast<int64_t>(ws_bytes)}, logits.options().dtype(at::kByte));

  a.logits = logits.data_ptr();
  a.dtype = to_dtype(logits.scalar_type());
  a.B = B;
  a.R = R;
  a.V = V;
  a.stride_b = logits.stride(0);
  a.stride_r = logits.stride(1);
  a.x = x.data_ptr<int64_t>();
  a.conf = conf.data_ptr<double>();
  a.L = L;
  a.num_transfer = num_transfer.data_ptr<int64_t>();
  a.block_start = block_start.data_ptr<int64_t>();
  a.block_end = block_end.data_ptr<int64_t>();
  a.prompt_len = prompt_len.data_ptr<int64_t>();
  a.row0 = row0;
  a.mask_id = mask_id;
  a.k_soft = static_cast<int>(k_soft);
  a.alpha = alpha;
  a.temperature = temperature;
  a.random_remask = random_remask;
  a.threshold = threshold;
  a.use_threshold = use_threshold;
  a.exclude_mask = exclude_mask;
  a.seed = static_cast<uint64_t>(seed);
  a.ids = ids.data_ptr<int64_t>();
  a.w = w.data_ptr();
  a.transfer = transfer.data_ptr<bool>();
  a.status = status.data_ptr<int64_t>();
  a.splits = splits;
  a.value_table = env_flag("EVOFAST_CUDA_VALUE_TABLE");
  C10_CUDA_CHECK(ec::evo_step_launch(a, ws_bytes > 0 ? ws.data_ptr() : nullptr, ws_bytes, stream));
  return {ids, w, transfer, status, tp.to(at::kFloat), q};
}

// ids (..., J): the number of soft tokens, prod(ids.shape[:-1]).
int64_t rows_of(const at::Tensor& ids) {
  int64_t n = 1;
  for (int64_t i = 0; i + 1 < ids.dim(); ++i) n *= ids.size(i);
  return n;
}

// ids.shape[:-1] + (d,)
std::vector<int64_t> embed_shape(const at::Tensor& ids, int64_t d) {
  auto s = ids.sizes().vec();
  s.back() = d;
  return s;
}

void check_ids_w(const char* op, const at::Tensor& ids, const at::Tensor& w, const at::Device& dev) {
  check_on(op, ids, "ids", dev);
  check_on(op, w, "w", dev);
  TORCH_CHECK(ids.scalar_type() == at::kLong, op, ": ids must be int64, got ", ids.scalar_type());
  TORCH_CHECK(ids.dim() >= 1, op, ": ids must have at least one dimension (the soft-token axis)");
  TORCH_CHECK(w.sizes() == ids.sizes(), op, ": w must have the shape of ids ", ids.sizes(), ", got ",
              w.sizes());
  TORCH_CHECK(is_float_dtype(w.scalar_type(), true), op, ": w must be floating point, got ",
              w.scalar_type());
  TORCH_CHECK(ids.size(-1) <= ec::kSoftEmbedMaxJ, op, ": ids last dim must be at most ",
              ec::kSoftEmbedMaxJ, " on CUDA, got ", ids.size(-1));
  TORCH_CHECK(rows_of(ids) <= 0x7fffffffLL, op, ": ids must have fewer than 2^31 rows, got ",
              rows_of(ids));
}

void check_weight(const char* op, const at::Tensor& weight) {
  TORCH_CHECK(weight.is_cuda(), op, ": weight must be a CUDA tensor, got one on ", weight.device());
  TORCH_CHECK(weight.dim() == 2, op, ": weight must have shape (V, d), got ", weight.sizes());
  TORCH_CHECK(is_float_dtype(weight.scalar_type(), true), op,
              ": weight must be float32, float16, bfloat16 or float64, got ", weight.scalar_type());
  TORCH_CHECK(weight.is_contiguous(), op, ": weight must be contiguous");
}

at::Tensor soft_embed_fwd_cuda(const at::Tensor& weight, const at::Tensor& ids, const at::Tensor& w) {
  constexpr const char* op = "soft_embed_fwd_fused";
  check_weight(op, weight);
  check_ids_w(op, ids, w, weight.device());
  const c10::cuda::CUDAGuard guard(weight.device());
  const auto ids_c = ids.contiguous();
  // the normalised weights by torch's own CUDA ops, in the product dtype
  const auto wn = evofast::product_weights(w.contiguous(), weight.scalar_type()).contiguous();
  const int64_t V = weight.size(0), d = weight.size(1);
  const int64_t rows = rows_of(ids), J = ids.size(-1);
  auto out = at::empty(embed_shape(ids, d), weight.options());
  if (out.numel() == 0) return out;
  // ids outside [0, V) are not checked here (that needs a device sync): they add nothing
  C10_CUDA_CHECK(ec::soft_embed_fwd_launch(weight.data_ptr(), to_dtype(weight.scalar_type()), V, d,
                                           ids_c.data_ptr<int64_t>(), wn.data_ptr(),
                                           to_dtype(wn.scalar_type()), rows, J, out.data_ptr(),
                                           at::cuda::getCurrentCUDAStream()));
  return out;
}

std::tuple<at::Tensor, at::Tensor> soft_embed_bwd_cuda(const at::Tensor& grad, const at::Tensor& weight,
                                                       const at::Tensor& ids, const at::Tensor& w,
                                                       bool need_weight, bool need_w) {
  constexpr const char* op = "soft_embed_bwd_fused";
  check_weight(op, weight);
  check_ids_w(op, ids, w, weight.device());
  check_on(op, grad, "grad", weight.device());
  const int64_t V = weight.size(0), d = weight.size(1);
  const int64_t rows = rows_of(ids), J = ids.size(-1);
  const auto gshape = embed_shape(ids, d);
  TORCH_CHECK(grad.sizes() == at::IntArrayRef(gshape), op, ": grad must have shape ",
              at::IntArrayRef(gshape), ", got ", grad.sizes());
  TORCH_CHECK(grad.is_floating_point(), op, ": grad must be floating point, got ", grad.scalar_type());
  const c10::cuda::CUDAGuard guard(weight.device());
  auto grad_weight = need_weight ? at::empty({V, d}, weight.options()) : at::empty({0}, weight.options());
  auto grad_w = need_w ? at::empty(ids.sizes(), w.options()) : at::empty({0}, w.options());
  if (!need_weight && !need_w) return {grad_weight, grad_w};
  // the kernels read grad in weight's dtype (autograd hands it over in that dtype)
  const auto grad_c = grad.to(weight.scalar_type()).contiguous();
  const auto ids_c = ids.contiguous();
  const auto w_c = w.contiguous();
  const ec::DType wdt = to_dtype(weight.scalar_type());
  const size_t ws_bytes = ec::soft_embed_bwd_workspace_bytes(wdt, V, d, need_weight);
  at::Tensor ws;
  if (ws_bytes > 0) ws = at::empty({static_cast<int64_t>(ws_bytes)}, weight.options().dtype(at::kByte));
  C10_CUDA_CHECK(ec::soft_embed_bwd_launch(
      grad_c.data_ptr(), weight.data_ptr(), wdt, V, d, ids_c.data_ptr<int64_t>(), w_c.data_ptr(),
      to_dtype(w.scalar_type()), rows, J, need_weight ? grad_weight.data_ptr() : nullptr,
      need_w ? grad_w.data_ptr() : nullptr, ws_bytes > 0 ? ws.data_ptr() : nullptr, ws_bytes,
      at::cuda::getCurrentCUDAStream()));
  return {grad_weight, grad_w};
}

}  // namespace
}  // namespace evofast

TORCH_LIBRARY_IMPL(evofast, CUDA, m) {
  m.impl("evo_step_fused_opt", &evofast::evo_step_cuda_opt);
  m.impl("soft_embed_fwd_fused", &evofast::soft_embed_fwd_cuda);
  m.impl("soft_embed_bwd_fused", &evofast::soft_embed_bwd_cuda);
}
