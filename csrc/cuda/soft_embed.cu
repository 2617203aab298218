// Launchers of soft_embed_fwd_fused / soft_embed_bwd_fused (soft_embed_kernels.cuh).
#include "evofast_cuda.h"
#include "soft_embed_kernels.cuh"

namespace evofast {
namespace cuda {

namespace {

using detail::ceil_div;

// Accumulation type of a weight (backward) or product (forward) type.
template <typename WT>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

// 16-byte vectors along d when every row start of the given pointers is aligned.
template <typename WT>
bool can_vectorize(int64_t d, const void* a, const void* b) {
  constexpr int N = detail::VecWidth<WT>::value;
  return d % N == 0 && detail::is_aligned16(a) && (b == nullptr || detail::is_aligned16(b));
}

int threads_for(int64_t cols) {
  const int64_t t = ceil_div(cols, detail::kWarp) * detail::kWarp;
  return static_cast<int>(t < detail::kEmbedThreads ? (t > 0 ? t : detail::kWarp) : detail::kEmbedThreads);
}

template <typename WT, typename P>
cudaError_t fwd_typed(const void* weight, int64_t V, int64_t d, const int64_t* ids, const void* wn,
                      int64_t rows, int J, void* out, cudaStream_t stream) {
  using A = typename AccOf<P>::type;
  constexpr int N = detail::VecWidth<WT>::value;
  const size_t smem = static_cast<size_t>(J) * (sizeof(int64_t) + sizeof(A));
  const WT* wt = static_cast<const WT*>(weight);
  const P* wp = static_cast<const P*>(wn);
  WT* o = static_cast<WT*>(out);
  if (can_vectorize<WT>(d, weight, out)) {
    detail::soft_embed_fwd_kernel<WT, P, A, N>
        <<<static_cast<unsigned>(rows), threads_for(d / N), smem, stream>>>(wt, V, d, ids, wp, J, o);
  } else {
    detail::soft_embed_fwd_kernel<WT, P, A, 1>
        <<<static_cast<unsigned>(rows), threads_for(d), smem, stream>>>(wt, V, d, ids, wp, J, o);
  }
  return cudaGetLastError();
}

template <typename WT, typename WW>
cudaError_t bwd_typed(const void* grad, const void* weight, int64_t V, int64_t d, const int64_t* ids,
                      const void* w, int64_t rows, int J, void* grad_weight, void* grad_w,
                      void* workspace, cudaStream_t stream) {
  using A = typename AccOf<WT>::type;
  constexpr int N = detail::VecWidth<WT>::value;
  constexpr bool kDirect = sizeof(WT) == sizeof(A);  // fp32 / fp64: accumulate in the output
  A* gw = nullptr;
  cudaError_t err = cudaSuccess;
  const int64_t n = V * d;
  if (grad_weight != nullptr) {
    gw = kDirect ? static_cast<A*>(grad_weight) : static_cast<A*>(workspace);
    err = cudaMemsetAsync(gw, 0, static_cast<size_t>(n) * sizeof(A), stream);
    if (err != cudaSuccess) return err;
  }
  if (rows > 0 && d > 0 && (gw != nullptr || grad_w != nullptr)) {
    const size_t smem = detail::row_smem_bytes<A>(J);
    const WT* g = static_cast<const WT*>(grad);
    const WT* wt = static_cast<const WT*>(weight);
    const WW* ww = static_cast<const WW*>(w);
    WW* gww = static_cast<WW*>(grad_w);
    if (can_vectorize<WT>(d, grad, weight)) {
      detail::soft_embed_bwd_kernel<WT, WW, A, N>
          <<<static_cast<unsigned>(rows), detail::kEmbedThreads, smem, stream>>>(g, wt, V, d, ids, ww, J, gw, gww);
    } else {
      detail::soft_embed_bwd_kernel<WT, WW, A, 1>
          <<<static_cast<unsigned>(rows), detail::kEmbedThreads, smem, stream>>>(g, wt, V, d, ids, ww, J, gw, gww);
    }
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  } else if (grad_w != nullptr && rows > 0) {
    // d == 0: every dot product is 0, so grad_w is 0 too
    err = cudaMemsetAsync(grad_w, 0, static_cast<size_t>(rows * J) * sizeof(WW), stream);
    if (err != cudaSuccess) return err;
  }
  if (!kDirect && grad_weight != nullptr && n > 0) {
    const int64_t blocks64 = ceil_div(n, detail::kEmbedThreads);
    const unsigned blocks = static_cast<unsigned>(blocks64 < 65536 ? blocks64 : 65536);
    detail::cast_from_float_kernel<WT><<<blocks, detail::kEmbedThreads, 0, stream>>>(
        reinterpret_cast<const float*>(gw), static_cast<WT*>(grad_weight), n);
    err = cudaGetLastError();
  }
  return err;
}

// Calls F<WT, WW>::run(args...) for the runtime dtypes.
template <template <typename, typename> class F, typename WT, typename... Args>
cudaError_t dispatch_w(DType w_dtype, Args... args) {
  switch (w_dtype) {
    case DType::kFloat32:
      return F<WT, float>::run(args...);
    case DType::kFloat16:
      return F<WT, __half>::run(args...);
    case DType::kBFloat16:
      return F<WT, __nv_bfloat16>::run(args...);
    case DType::kFloat64:
      return F<WT, double>::run(args...);
  }
  return cudaErrorInvalidValue;
}

template <template <typename, typename> class F, typename... Args>
cudaError_t dispatch(DType weight_dtype, DType w_dtype, Args... args) {
  switch (weight_dtype) {
    case DType::kFloat32:
      return dispatch_w<F, float>(w_dtype, args...);
    case DType::kFloat16:
      return dispatch_w<F, __half>(w_dtype, args...);
    case DType::kBFloat16:
      return dispatch_w<F, __nv_bfloat16>(w_dtype, args...);
    case DType::kFloat64:
      return dispatch_w<F, double>(w_dtype, args...);
  }
  return cudaErrorInvalidValue;
}

template <typename WT, typename WW>
struct Fwd {
  static cudaError_t run(const void* weight, int64_t V, int64_t d, const int64_t* ids, const void* wn,
                         int64_t rows, int J, void* out, cudaStream_t stream) {
    return fwd_typed<WT, WW>(weight, V, d, ids, wn, rows, J, out, stream);
  }
};

template <typename WT, typename WW>
struct Bwd {
  static cudaError_t run(const void* grad, const void* weight, int64_t V, int64_t d,
                         const int64_t* ids, const void* w, int64_t rows, int J, void* grad_weight,
                         void* grad_w, void* workspace, cudaStream_t stream) {
    return bwd_typed<WT, WW>(grad, weight, V, d, ids, w, rows, J, grad_weight, grad_w, workspace,
                             stream);
  }
};

bool bad_sizes(int64_t V, int64_t d, int64_t rows, int64_t J) {
  return V < 0 || d < 0 || rows < 0 || rows > 0x7fffffffLL || J < 0 || J > kSoftEmbedMaxJ;
}

}  // namespace

cudaError_t soft_embed_fwd_launch(const void* weight, DType weight_dtype, int64_t V, int64_t d,
                                  const int64_t* ids, const void* wn, DType wn_dtype, int64_t rows,
                                  int64_t J, void* out, cudaStream_t stream) {
  if (bad_sizes(V, d, rows, J)) return cudaErrorInvalidValue;
  if (rows == 0 || d == 0) return cudaSuccess;
  return dispatch<Fwd>(weight_dtype, wn_dtype, weight, V, d, ids, wn, rows, static_cast<int>(J), out,
                       stream);
}

size_t soft_embed_bwd_workspace_bytes(DType weight_dtype, int64_t V, int64_t d, bool need_weight) {
  if (!need_weight || V <= 0 || d <= 0) return 0;
  if (weight_dtype != DType::kFloat16 && weight_dtype != DType::kBFloat16) return 0;
  return static_cast<size_t>(V) * static_cast<size_t>(d) * sizeof(float);
}

cudaError_t soft_embed_bwd_launch(const void* grad, const void* weight, DType weight_dtype,
                                  int64_t V, int64_t d, const int64_t* ids, const void* w,
                                  DType w_dtype, int64_t rows, int64_t J, void* grad_weight,
                                  void* grad_w, void* workspace, size_t workspace_bytes,
                                  cudaStream_t stream) {
  if (bad_sizes(V, d, rows, J)) return cudaErrorInvalidValue;
  const size_t need = soft_embed_bwd_workspace_bytes(weight_dtype, V, d, grad_weight != nullptr);
  if (need > 0 && (workspace == nullptr || workspace_bytes < need)) return cudaErrorInvalidValue;
  return dispatch<Bwd>(weight_dtype, w_dtype, grad, weight, V, d, ids, w, rows, static_cast<int>(J),
                       grad_weight, grad_w, workspace, stream);
}

}  // namespace cuda
}  // namespace evofast
