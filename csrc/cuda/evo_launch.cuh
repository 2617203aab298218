// Host-side launch of evo_step's row pass (evo_row.cuh), shared by evo_step.cu and
// evo_step_entropy.cu (which holds the entropy variants: a translation unit of their own
// keeps each nvcc run about the size it had before them).
#pragma once

#include <type_traits>

#include "evo_row.cuh"

namespace evofast {
namespace cuda {
namespace detail {

template <typename T, int K, bool SAMPLE, bool ENT>
cudaError_t launch_rows(const RowParams& rp, int64_t rows, bool table, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(rows), static_cast<unsigned>(rp.splits));
  bool launched = false;
  (void)table;  // unused where the table cannot apply
  if constexpr (std::is_same<T, __nv_bfloat16>::value && !SAMPLE && !ENT) {  // the value table: bf16, greedy
    if (table) {
      evo_row_kernel<T, K, SAMPLE, true, false><<<grid, kRowThreads, 0, stream>>>(rp);
      launched = true;
    }
  }
  if (!launched) evo_row_kernel<T, K, SAMPLE, false, ENT><<<grid, kRowThreads, 0, stream>>>(rp);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || rp.splits == 1) return err;
  const unsigned mgrid = static_cast<unsigned>(ceil_div(rows, kMergeWarps));
  evo_merge_kernel<K, SAMPLE, ENT><<<mgrid, kMergeWarps * kWarp, 0, stream>>>(rp, rows);
  return cudaGetLastError();
}

// The entropy variants (confidence 2, any k <= 16: one top-k size), in evo_step_entropy.cu.
template <typename T>
cudaError_t launch_rows_entropy(const RowParams& rp, int64_t rows, bool sample, cudaStream_t stream);

}  // namespace detail
}  // namespace cuda
}  // namespace evofast
