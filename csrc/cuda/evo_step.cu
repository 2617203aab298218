// Launcher of evo_step_fused's CUDA kernels (evo_row.cuh, evo_stdd.cuh, evo_seq.cuh).
#include "evo_launch.cuh"
#include "evo_row.cuh"
#include "evo_seq.cuh"
#include "evo_stdd.cuh"
#include "evofast_cuda.h"

#include <type_traits>

namespace evofast {
namespace cuda {

namespace {

using detail::ceil_div;

constexpr int64_t kMinSplitCols = 4096;  // smallest column chunk worth its own block
constexpr int kMaxSplits = 64;
constexpr int kBlocksPerSm = 4;  // row-pass blocks per SM the split-V shape aims at
// The value table costs a block 5120 float64 exps to build: worth it only when
// the block's chunk of columns is much longer than that.
constexpr int64_t kTableMinCols = 32768;

struct Geometry {
  int splits;
  int chunk;
};

// Column chunks of a row: a multiple of 256 columns each, none empty.
Geometry split_geometry(int64_t V, int splits) {
  if (splits <= 1 || V <= 256) return {1, static_cast<int>(V)};
  int64_t chunk = ceil_div(ceil_div(V, splits), 256) * 256;
  const int64_t n = ceil_div(V, chunk);
  if (n <= 1) return {1, static_cast<int>(V)};
  return {static_cast<int>(n), static_cast<int>(chunk)};
}

size_t align_up(size_t x) { return (x + 255) & ~static_cast<size_t>(255); }

struct Layout {
  size_t x0, q, tp, list_r, list_q, list_tau, gram, part, total;
};

Layout layout(int64_t B, int64_t R, int k, int splits, int band) {
  const size_t rows = static_cast<size_t>(B) * static_cast<size_t>(R);
  const size_t kk = static_cast<size_t>(k > 0 ? k : 1);
  Layout l{};
  size_t off = 0;
  l.x0 = off;
  off = align_up(off + rows * sizeof(int));
  l.q = off;
  off = align_up(off + rows * sizeof(double));
  l.tp = off;
  off = align_up(off + rows * kk * sizeof(double));
  l.list_r = off;
  off = align_up(off + rows * sizeof(int));
  l.list_q = off;
  off = align_up(off + rows * sizeof(double));
  l.list_tau = off;
  off = align_up(off + rows * sizeof(double));
  l.gram = off;
  if (band > 0) off = align_up(off + rows * static_cast<size_t>(band + 1) * sizeof(double));
  l.part = off;
  if (splits > 1) off = align_up(off + rows * static_cast<size_t>(splits) * sizeof(detail::EvoPartial));
  l.total = off;
  return l;
}

template <typename T, int K>
cudaError_t launch_rows_k(const detail::RowParams& rp, int64_t rows, bool sample, bool table,
                          cudaStream_t stream) {
  return sample ? detail::launch_rows<T, K, true, false>(rp, rows, false, stream)
                : detail::launch_rows<T, K, false, false>(rp, rows, table, stream);
}

template <typename T>
cudaError_t launch_typed(const EvoStepArgs& a, const detail::RowParams& rp,
                         const detail::SeqParams& sp, int64_t rows, cudaStream_t stream) {
  const bool sample = a.temperature > 0.0;
  const bool ent = a.confidence == 2;
  // the value table: bf16 only (its entries are bf16 bit patterns), greedy only, long chunks only
  const bool table = a.value_table && !sample && !ent && std::is_same<T, __nv_bfloat16>::value &&
                    rp.chunk >= kTableMinCols;
  cudaError_t err = ent ? detail::launch_rows_entropy<T>(rp, rows, sample, stream)
                   : a.k_soft <= 4 ? launch_rows_k<T, 4>(rp, rows, sample, table, stream)
                                   : launch_rows_k<T, 16>(rp, rows, sample, table, stream);
  if (err != cudaSuccess) return err;
  if (sp.stdd.band > 0) {  // STDD's Gram band, a separate pass over the window
    detail::evo_stdd_gram_kernel<T><<<static_cast<unsigned>(rows), detail::kGramThreads, 0, stream>>>(
        rp, a.mask_id, sp.stdd.band, sp.stdd.gram);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  detail::evo_seq_kernel<T><<<static_cast<unsigned>(a.B), detail::kSeqThreads, 0, stream>>>(sp);
  return cudaGetLastError();
}

}  // namespace

int evo_step_choose_splits(int64_t rows, int64_t V, int num_sms) {
  if (rows <= 0 || V <= kMinSplitCols) return 1;
  const int64_t blocks = kBlocksPerSm * static_cast<int64_t>(num_sms > 0 ? num_sms : 1);
  if (rows >= blocks) return 1;  // enough rows to fill the device one block each
  const int64_t want = ceil_div(blocks, rows);
  const int64_t by_cols = V / kMinSplitCols;
  int64_t s = want < by_cols ? want : by_cols;
  s = s < kMaxSplits ? s : kMaxSplits;
  return s > 1 ? static_cast<int>(s) : 1;
}

size_t evo_step_workspace_bytes(int64_t B, int64_t R, int64_t V, int k_soft, int splits, int stdd_band) {
  if (B <= 0 || R <= 0 || V <= 0) return 0;
  return layout(B, R, k_soft, split_geometry(V, splits).splits, stdd_band).total;
}

cudaError_t evo_step_launch(const EvoStepArgs& a, void* workspace, size_t workspace_bytes,
                            cudaStream_t stream) {
  if (a.status == nullptr || a.B < 0 || a.R < 0 || a.V < 0 || a.k_soft < 0 || a.k_soft > kEvoMaxK ||
      a.V > 0x7fffffffLL || a.B * a.R > 0x7fffffffLL || a.R > 0x7fffffffLL || a.row0 < 0 ||
      a.row0 + a.R > a.L || !(a.temperature >= 0.0) || a.confidence < 0 || a.confidence > 2 ||
      (a.stdd_history != nullptr && (a.stdd_count == nullptr || a.stdd_window < 1 || a.stdd_radius < 0))) {
    return cudaErrorInvalidValue;
  }
  cudaError_t err = cudaMemsetAsync(a.status, 0xff, sizeof(int64_t), stream);  // -1
  if (err != cudaSuccess) return err;
  const int64_t rows = a.B * a.R;
  if (rows == 0) return cudaSuccess;
  if (a.V == 0 || a.k_soft > a.V) return cudaErrorInvalidValue;

  const Geometry g = split_geometry(a.V, a.splits);
  const int band = stdd_band(a);
  const Layout l = layout(a.B, a.R, a.k_soft, g.splits, band);
  if (workspace == nullptr || workspace_bytes < l.total) return cudaErrorInvalidValue;
  char* ws = static_cast<char*>(workspace);

  detail::RowParams rp{};
  rp.logits = a.logits;
  rp.R = a.R;
  rp.V = a.V;
  rp.stride_b = a.stride_b;
  rp.stride_r = a.stride_r;
  rp.row0 = a.row0;
  rp.skip_col = (a.exclude_mask && a.mask_id >= 0 && a.mask_id < a.V) ? static_cast<int>(a.mask_id) : -1;
  rp.k = a.k_soft;
  rp.rounds = a.k_soft > 1 ? a.k_soft : (a.confidence == 1 ? 2 : 1);  // the margin needs the top-2
  rp.confidence = a.confidence;
  rp.temp = a.temperature;
  rp.random_remask = a.random_remask;
  rp.seed = a.seed;
  rp.chunk = g.chunk;
  rp.splits = g.splits;
  rp.x0 = reinterpret_cast<int*>(ws + l.x0);
  rp.q = a.q_out != nullptr ? a.q_out : reinterpret_cast<double*>(ws + l.q);
  rp.tp = a.tp_out != nullptr ? a.tp_out : reinterpret_cast<double*>(ws + l.tp);
  rp.ids = a.ids;
  rp.status = a.status;
  rp.part = g.splits > 1 ? reinterpret_cast<detail::EvoPartial*>(ws + l.part) : nullptr;

  detail::SeqParams sp{};
  sp.R = a.R;
  sp.L = a.L;
  sp.row0 = a.row0;
  sp.mask_id = a.mask_id;
  sp.k = a.k_soft;
  sp.alpha = a.alpha;
  sp.use_threshold = a.use_threshold;
  sp.threshold = a.threshold;
  sp.exclude_mask = a.exclude_mask;
  sp.x = a.x;
  sp.conf = a.conf;
  sp.num_transfer = a.num_transfer;
  sp.block_start = a.block_start;
  sp.block_end = a.block_end;
  sp.prompt_len = a.prompt_len;
  sp.x0 = rp.x0;
  sp.q = rp.q;
  sp.tp = rp.tp;
  sp.list_r = reinterpret_cast<int*>(ws + l.list_r);
  sp.list_q = reinterpret_cast<double*>(ws + l.list_q);
  sp.list_tau = reinterpret_cast<double*>(ws + l.list_tau);
  sp.stdd.on = a.stdd_history != nullptr;
  sp.stdd.tau = a.stdd_tau;
  sp.stdd.lam_t = a.stdd_lam_t;
  sp.stdd.lam_s = a.stdd_lam_s;
  sp.stdd.tau_min = a.stdd_tau_min;
  sp.stdd.tau_max = a.stdd_tau_max;
  sp.stdd.window = a.stdd_window;
  sp.stdd.radius = a.stdd_radius;
  sp.stdd.band = band;
  sp.stdd.history = a.stdd_history;
  sp.stdd.count = a.stdd_count;
  sp.stdd.gram = band > 0 ? reinterpret_cast<double*>(ws + l.gram) : nullptr;
  sp.ids = a.ids;
  sp.w = a.w;
  sp.transfer = a.transfer;
  sp.status = a.status;

  switch (a.dtype) {
    case DType::kFloat32:
      return launch_typed<float>(a, rp, sp, rows, stream);
    case DType::kFloat16:
      return launch_typed<__half>(a, rp, sp, rows, stream);
    case DType::kBFloat16:
      return launch_typed<__nv_bfloat16>(a, rp, sp, rows, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace cuda
}  // namespace evofast
