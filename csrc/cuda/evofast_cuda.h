// Torch-free declarations of evofast's CUDA launchers (see csrc/README.md for the
// exact semantics of the ops they implement).
//
// Every launcher takes raw device pointers, sizes / strides in elements and a
// cudaStream_t, enqueues its kernels on that stream and returns the first
// cudaError_t it meets (cudaErrorInvalidValue for bad sizes or a too small
// workspace). Nothing here allocates: buffers the kernels need are passed in,
// their size given by the matching *_workspace_bytes query. The only header this
// needs is the CUDA runtime API, so a plain C++ compiler can include it.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace evofast {
namespace cuda {

// Element types of the tensors the launchers read and write.
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

// ---------------------------------------------------------------- evo_step
// Largest k_soft the CUDA kernel supports (top-k lives in registers).
constexpr int kEvoMaxK = 16;

struct EvoStepArgs {
  // logits (B, R, V), element (b, r, v) at logits[b * stride_b + r * stride_r + v];
  // dtype kFloat32, kFloat16 or kBFloat16.
  const void* logits = nullptr;
  DType dtype = DType::kFloat32;
  int64_t B = 0, R = 0, V = 0;
  int64_t stride_b = 0, stride_r = 0;
  // x (B, L) int64 and conf (B, L) float64, contiguous, updated in place.
  int64_t* x = nullptr;
  double* conf = nullptr;
  int64_t L = 0;
  // (B,) int64 each.
  const int64_t* num_transfer = nullptr;
  const int64_t* block_start = nullptr;
  const int64_t* block_end = nullptr;
  const int64_t* prompt_len = nullptr;
  int64_t row0 = 0;      // window row r is sequence position row0 + r
  int64_t mask_id = 0;
  int k_soft = 3;        // 0 <= k_soft <= min(kEvoMaxK, V)
  double alpha = 0.7;
  double temperature = 0.0;
  bool random_remask = false;
  double threshold = 0.0;
  bool use_threshold = false;
  bool exclude_mask = true;
  uint64_t seed = 0;
  // Outputs: ids (B, R, k+1) int64, w (B, R, k+1) in `dtype`, transfer (B, R)
  // bool, status (1,) int64 (set to -1 by the launcher, then to the smallest
  // flat row index b * R + r whose logits are not finite).
  int64_t* ids = nullptr;
  void* w = nullptr;
  bool* transfer = nullptr;
  int64_t* status = nullptr;
  // Launch shape: 1 = one block per row; > 1 = the split-V variant with that many
  // column chunks per row (rounded so that no chunk is empty). Pick it with
  // evo_step_choose_splits() and pass the same value to the workspace query.
  int splits = 1;
  // bf16 logits at temperature 0, rows (or split-V chunks) of >= 32768 columns:
  // a column whose value v has 2^-12 <= |v| < 2^8 adds exp(v - 2^8) from a
  // 5120-entry float64 table in shared memory (one load and one add) instead of
  // a float64 exp; the sum is rescaled to the running max once per thread.
  // false: one exp per column, as for float32 / float16. Off by default until it
  // has run on a GPU (EVOFAST_CUDA_VALUE_TABLE=1 turns it on; tests/test_cuda.py
  // covers both). Not with confidence 2 (the entropy needs every exp(d) d).
  bool value_table = false;

  // ---- per-step options (csrc/README.md, evo_step_fused_opt)
  // What q measures (random_remask aside): 0 p[x0], 1 the top-1 minus the top-2
  // probability of p, 2 sum_v p_v log p_v.
  int confidence = 0;
  // float64 outputs of the row pass, q (B, R) and the top-k probabilities tp
  // (B, R, k); nullptr: they stay in the workspace.
  double* q_out = nullptr;
  double* tp_out = nullptr;
  // STDD replaces the transfer rule when stdd_history != nullptr: history (B, L,
  // stdd_window) float64 and count (B, L) int64, read and updated in place (q is
  // appended at every eligible row of a finite step); thresholds
  // clamp(tau + lam_t * TV + lam_s * SD, tau_min, tau_max). The spatial term
  // (lam_s != 0, radius > 0, R > 1) sums the Gram band of the window in a separate
  // kernel: pass the same stdd_band() to the workspace query.
  double* stdd_history = nullptr;
  int64_t* stdd_count = nullptr;
  int stdd_window = 1;
  int stdd_radius = 0;
  double stdd_tau = 0.0, stdd_lam_t = 0.0, stdd_lam_s = 0.0, stdd_tau_min = 0.0, stdd_tau_max = 0.0;
};

// Width - 1 of STDD's Gram band (2 * radius) when the spatial term is on, else 0.
inline int stdd_band(const EvoStepArgs& a) {
  return (a.stdd_history != nullptr && a.stdd_lam_s != 0.0 && a.stdd_radius > 0 && a.R > 1) ? 2 * a.stdd_radius
                                                                                              : 0;
}

// The launch shape the kernels use by default for `rows = B * R` rows of `V`
// columns on a device with `num_sms` multiprocessors.
int evo_step_choose_splits(int64_t rows, int64_t V, int num_sms);

// Bytes of device workspace evo_step_launch needs (256-byte aligned pointer);
// stdd_band: stdd_band(args) (0 without STDD's spatial term).
size_t evo_step_workspace_bytes(int64_t B, int64_t R, int64_t V, int k_soft, int splits, int stdd_band = 0);

// Enqueues the whole step: status reset, row pass (one block per row, or split-V
// row pass + merge), then the sequence pass (one block per batch row). When a
// row is not finite the sequence pass leaves x and conf untouched (it reads
// status on the device; no host synchronisation).
cudaError_t evo_step_launch(const EvoStepArgs& args, void* workspace, size_t workspace_bytes,
                            cudaStream_t stream);

// ---------------------------------------------------------------- soft_embed
// Largest J (ids / w last dim) the soft_embed kernels accept.
constexpr int64_t kSoftEmbedMaxJ = 1024;

// out[row] = sum_j wn_j * weight[ids[row, j]]; weight (V, d) contiguous in
// `weight_dtype`, ids / wn (rows, J) contiguous, wn already normalised, in the
// product dtype `wn_dtype` (at least as wide as weight_dtype), out (rows, d) in
// `weight_dtype`. Each product is rounded to wn_dtype, the sum runs in order
// j = 0..J-1 in fp32 (fp64 for an fp64 wn_dtype). ids outside [0, V) contribute
// nothing.
cudaError_t soft_embed_fwd_launch(const void* weight, DType weight_dtype, int64_t V, int64_t d,
                                  const int64_t* ids, const void* wn, DType wn_dtype, int64_t rows,
                                  int64_t J, void* out, cudaStream_t stream);

// Workspace of soft_embed_bwd_launch: an fp32 (V, d) accumulator when
// grad_weight is asked for and the weight is fp16 / bf16, else 0.
size_t soft_embed_bwd_workspace_bytes(DType weight_dtype, int64_t V, int64_t d, bool need_weight);

// grad (rows, d) in `weight_dtype`. grad_weight (V, d) in `weight_dtype` or
// nullptr; grad_w (rows, J) in `w_dtype` or nullptr. Both fully written.
cudaError_t soft_embed_bwd_launch(const void* grad, const void* weight, DType weight_dtype,
                                  int64_t V, int64_t d, const int64_t* ids, const void* w,
                                  DType w_dtype, int64_t rows, int64_t J, void* grad_weight,
                                  void* grad_w, void* workspace, size_t workspace_bytes,
                                  cudaStream_t stream);

}  // namespace cuda
}  // namespace evofast
