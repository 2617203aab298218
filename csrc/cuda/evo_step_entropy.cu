// The entropy variants of evo_step's row pass (confidence 2; evo_launch.cuh), in a
// translation unit of their own, with one top-k size for every k_soft <= 16.
#include "evo_launch.cuh"

namespace evofast {
namespace cuda {
namespace detail {

template <typename T>
cudaError_t launch_rows_entropy(const RowParams& rp, int64_t rows, bool sample, cudaStream_t stream) {
  return sample ? launch_rows<T, kEvoMaxK, true, true>(rp, rows, false, stream)
                : launch_rows<T, kEvoMaxK, false, true>(rp, rows, false, stream);
}

template cudaError_t launch_rows_entropy<float>(const RowParams&, int64_t, bool, cudaStream_t);
template cudaError_t launch_rows_entropy<__half>(const RowParams&, int64_t, bool, cudaStream_t);
template cudaError_t launch_rows_entropy<__nv_bfloat16>(const RowParams&, int64_t, bool, cudaStream_t);

}  // namespace detail
}  // namespace cuda
}  // namespace evofast
