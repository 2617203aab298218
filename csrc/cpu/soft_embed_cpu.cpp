// C++ CPU kernels of evofast::soft_embed_fwd_fused / soft_embed_bwd_fused
// (semantics: csrc/README.md). Accumulation type `acc_t`: float, or double
// for float64 weights, as in evofast.ops.reference.
//
//   forward:  out[n] = sum_j wn[n, j] * weight[ids[n, j]]      (parallel over chunks of rows)
//             wn = product_weights(w) (torch's own ops, in the product dtype P); the products
//             are rounded to P and summed in torch's order (in registers for J <= 4, by
//             at::sum itself beyond), so the result is torch's
//             `(wn.unsqueeze(-1) * weight[ids]).sum(-2)` bit for bit
//   backward: grad_weight[v] = sum_{(n, j): ids[n, j] == v} wn[n, j] * grad[n]
//             (the (n, j) pairs sorted by id, then tasks = (id group, column block):
//              no two tasks write the same element, and the order of the sum is fixed)
//             grad_w[n, m] = [w >= 0] * (g_m / D - [S >= 1e-12] * sum_j g_j c_j / D^2),
//             g_j = <grad[n], weight[ids[n, j]]>                  (parallel over rows n)
#include "cpu/kernels.h"
#include "product_weights.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <type_traits>
#include <utility>
#include <vector>

namespace evofast {
namespace {

template <typename T>
struct Acc { using type = float; };
template <>
struct Acc<double> { using type = double; };

// Element load as the accumulation type: bf16 widened by a shift (vectorises),
// Half through c10's conversion, the rest by a plain conversion.
template <typename acc_t, typename T>
inline acc_t ld(const T* p, int64_t i) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    uint16_t b;
    std::memcpy(&b, p + i, sizeof(b));
    const uint32_t u = static_cast<uint32_t>(b) << 16;
    float f;
    std::memcpy(&f, &u, sizeof(f));
    return static_cast<acc_t>(f);
  } else if constexpr (std::is_same_v<T, c10::Half>) {
    return static_cast<acc_t>(static_cast<float>(p[i]));
  } else {
    return static_cast<acc_t>(p[i]);
  }
}

// wn[j] = clamp(w_j, 0) / max(sum_j clamp(w_j, 0), 1e-12) in acc_t (also returns c, S).
template <typename acc_t, typename w_t>
inline void normalise(const w_t* w, int64_t J, acc_t* c, acc_t* wn, acc_t& S) {
  S = acc_t(0);
  for (int64_t j = 0; j < J; ++j) {
    const acc_t v = ld<acc_t>(w, j);
    c[j] = v < acc_t(0) ? acc_t(0) : v;  // clamp_min(0) (NaN passes)
    S += c[j];
  }
  const acc_t D = S < acc_t(1e-12) ? acc_t(1e-12) : S;
  for (int64_t j = 0; j < J; ++j) wn[j] = c[j] / D;
}

void check_ids(const at::Tensor& ids, int64_t V, const char* op) {
  const int64_t* p = ids.data_ptr<int64_t>();
  const int64_t n = ids.numel();
  // branch-free range test over all ids, then a scan only on failure
  uint64_t bad = 0;
#pragma omp simd reduction(| : bad)
  for (int64_t i = 0; i < n; ++i) bad |= static_cast<uint64_t>(p[i]) >= static_cast<uint64_t>(V);
  if (bad) {
    for (int64_t i = 0; i < n; ++i)
      TORCH_CHECK(p[i] >= 0 && p[i] < V, op, ": ids must lie in [0, ", V, "), got ", p[i],
                  " at flat index ", i);
  }
}

void check_common(const at::Tensor& weight, const at::Tensor& ids, const at::Tensor& w, const char* op) {
  TORCH_CHECK(weight.device().is_cpu(), op, ": weight must be a CPU tensor, got ", weight.device());
  TORCH_CHECK(weight.dim() == 2, op, ": weight must have shape (V, d), got ", weight.sizes());
  const auto wdt = weight.scalar_type();
  TORCH_CHECK(wdt == at::kFloat || wdt == at::kHalf || wdt == at::kBFloat16 || wdt == at::kDouble, op,
              ": weight must be float32, float16, bfloat16 or float64, got ", wdt);
  TORCH_CHECK(ids.device().is_cpu(), op, ": ids must be a CPU tensor, got ", ids.device());
  TORCH_CHECK(ids.scalar_type() == at::kLong, op, ": ids must be int64, got ", ids.scalar_type());
  TORCH_CHECK(ids.dim() >= 1, op, ": ids must have at least one dimension (the soft-token axis)");
  TORCH_CHECK(w.device().is_cpu(), op, ": w must be a CPU tensor, got ", w.device());
  TORCH_CHECK(at::isFloatingType(w.scalar_type()), op, ": w must be floating, got ", w.scalar_type());
  TORCH_CHECK(w.sizes() == ids.sizes(), op, ": w must have ids' shape ", ids.sizes(), ", got ", w.sizes());
}

#define EVO_DISPATCH_W(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

}  // namespace

// wn_j * e in the product dtype P, rounded as torch's elementwise mul rounds it: a 16-bit P is
// multiplied in float (exact for two 16-bit operands) and rounded once to P.
template <typename P, typename WT>
inline P product(P f, const WT* row, int64_t t) {
  if constexpr (std::is_same_v<P, c10::BFloat16> || std::is_same_v<P, c10::Half>) {
    return static_cast<P>(static_cast<float>(f) * ld<float>(row, t));
  } else {
    return f * ld<P>(row, t);
  }
}

// Torch's CPU sum adds at most 4 terms in order j = 0..3 on every path of its reduction
// (its cascade and its 4-way interleaved partial sums both start that way); from 5 terms
// on, the order depends on d and on the CPU's vector width.
constexpr int64_t kInOrderTerms = 4;

// J <= kInOrderTerms: one pass, each row's sum in order in registers (the accumulation
// type of torch's sum of P: float for 16-bit P), rounded to P, then cast to the weight dtype.
template <typename p_t, typename wgt_t>
void weighted_sum_in_order(const wgt_t* W, const int64_t* I, const p_t* F, int64_t N, int64_t J, int64_t d,
                           wgt_t* O) {
  using acc_t = at::opmath_type<p_t>;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, d * J));
  cpu_parallel_for(0, N, grain, static_cast<double>(N) * J * d, [&](int64_t n0, int64_t n1) {
    std::vector<acc_t> acc(d);
    for (int64_t n = n0; n < n1; ++n) {
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (int64_t j = 0; j < J; ++j) {
        const p_t f = F[n * J + j];
        const wgt_t* row = W + I[n * J + j] * d;
        acc_t* a = acc.data();
_Pragma("omp simd")
        for (int64_t t = 0; t < d; ++t) a[t] += static_cast<acc_t>(product<p_t>(f, row, t));
      }
      wgt_t* o = O + n * d;
      for (int64_t t = 0; t < d; ++t) o[t] = static_cast<wgt_t>(static_cast<p_t>(acc[t]));
    }
  });
}

// Any J: the products of a cache-sized chunk of rows go to a buffer that at::sum reduces
// over j, so the order and roundings of the sum are torch's own for every d, J and CPU.
template <typename p_t, typename wgt_t>
void weighted_sum_by_torch(const wgt_t* W, const int64_t* I, const p_t* F, int64_t N, int64_t J, int64_t d,
                           const at::TensorOptions& p_options, at::Tensor& out2d) {
  const int64_t bytes_per_row = J * d * static_cast<int64_t>(sizeof(p_t));
  const int64_t rows = std::min(N, std::max<int64_t>(1, (int64_t(256) << 10) / std::max<int64_t>(1, bytes_per_row)));
  const int64_t chunks = (N + rows - 1) / rows;
  const bool cast = out2d.scalar_type() != p_options.dtype().toScalarType();
  cpu_parallel_for(0, chunks, 1, static_cast<double>(N) * J * d, [&](int64_t c0, int64_t c1) {
    at::Tensor prod = at::empty({rows, J, d}, p_options);
    at::Tensor sum = cast ? at::empty({rows, d}, p_options) : at::Tensor();
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t n0 = c * rows, n = std::min(rows, N - n0);
      p_t* pr = prod.data_ptr<p_t>();
      for (int64_t i = 0; i < n * J; ++i) {
        const p_t f = F[n0 * J + i];
        const wgt_t* row = W + I[n0 * J + i] * d;
        p_t* dst = pr + i * d;
_Pragma("omp simd")
        for (int64_t t = 0; t < d; ++t) dst[t] = product<p_t>(f, row, t);
      }
      at::Tensor dst = out2d.narrow(0, n0, n);
      if (cast) {
        at::Tensor s = sum.narrow(0, 0, n);
        at::sum_out(s, prod.narrow(0, 0, n), at::IntArrayRef{1});
        dst.copy_(s);  // P -> weight dtype as torch's .to() converts
      } else {
        at::sum_out(dst, prod.narrow(0, 0, n), at::IntArrayRef{1});
      }
    }
  });
}

at::Tensor soft_embed_fwd_cpu(const at::Tensor& weight_in, const at::Tensor& ids_in, const at::Tensor& w) {
  const char* op = "soft_embed_fwd_fused";
  check_common(weight_in, ids_in, w, op);
  const at::Tensor weight = weight_in.contiguous(), ids = ids_in.contiguous();
  const int64_t d = weight.size(1);
  const int64_t J = ids.size(-1);
  const int64_t N = J > 0 ? ids.numel() / J : 0;
  auto out_shape = ids.sizes().vec();
  out_shape.back() = d;
  // an empty soft-token axis sums nothing: zeros, as the formula gives
  at::Tensor out = J == 0 ? at::zeros(out_shape, weight.options()) : at::empty(out_shape, weight.options());
  if (out.numel() == 0 || J == 0) return out;
  check_ids(ids, weight.size(0), op);
  const at::Tensor wn = product_weights(w.contiguous(), weight.scalar_type()).contiguous();
  at::Tensor out2d = out.view({N, d});
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "soft_embed_fwd_cpu", [&] {
    using wgt_t = scalar_t;
    const wgt_t* W = weight.data_ptr<wgt_t>();
    const int64_t* I = ids.data_ptr<int64_t>();
    EVO_DISPATCH_W(wn.scalar_type(), "soft_embed_fwd_cpu_wn", [&] {
      using p_t = scalar_t;
      const p_t* F = wn.data_ptr<p_t>();
      if (J <= kInOrderTerms) {
        weighted_sum_in_order<p_t, wgt_t>(W, I, F, N, J, d, out2d.data_ptr<wgt_t>());
      } else {
        weighted_sum_by_torch<p_t, wgt_t>(W, I, F, N, J, d, wn.options(), out2d);
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> soft_embed_bwd_cpu(const at::Tensor& grad_in, const at::Tensor& weight_in,
                                                      const at::Tensor& ids_in, const at::Tensor& w_in,
                                                      bool need_weight, bool need_w) {
  const char* op = "soft_embed_bwd_fused";
  check_common(weight_in, ids_in, w_in, op);
  const at::Tensor weight = weight_in.contiguous(), ids = ids_in.contiguous(), w = w_in.contiguous();
  const int64_t V = weight.size(0), d = weight.size(1);
  const int64_t J = ids.size(-1);
  const int64_t N = J > 0 ? ids.numel() / J : 0;
  TORCH_CHECK(grad_in.device().is_cpu(), op, ": grad must be a CPU tensor, got ", grad_in.device());
  TORCH_CHECK(at::isFloatingType(grad_in.scalar_type()), op, ": grad must be floating, got ",
              grad_in.scalar_type());
  auto gshape = ids.sizes().vec();
  gshape.back() = d;
  TORCH_CHECK(grad_in.sizes() == at::IntArrayRef(gshape), op, ": grad must have shape ", at::IntArrayRef(gshape),
              ", got ", grad_in.sizes());
  if (N * J > 0) check_ids(ids, V, op);

  const auto wdt = weight.scalar_type();
  const auto acc_dt = wdt == at::kDouble ? at::kDouble : at::kFloat;
  // grad read as weight.dtype, or converted once to the accumulation type otherwise
  const at::Tensor grad = grad_in.scalar_type() == wdt ? grad_in.contiguous() : grad_in.to(acc_dt).contiguous();
  const bool grad_is_acc = grad.scalar_type() != wdt;

  at::Tensor grad_weight = need_weight ? at::zeros({V, d}, weight.options()) : at::empty({0}, weight.options());
  at::Tensor grad_w = need_w ? at::zeros(w.sizes(), w.options()) : at::empty({0}, w.options());
  if (N == 0 || d == 0 || J == 0) return {grad_weight, grad_w};

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, wdt, "soft_embed_bwd_cpu", [&] {
    using wgt_t = scalar_t;
    using acc_t = typename Acc<wgt_t>::type;
    const wgt_t* W = weight.data_ptr<wgt_t>();
    const int64_t* I = ids.data_ptr<int64_t>();
    EVO_DISPATCH_W(w.scalar_type(), "soft_embed_bwd_cpu_w", [&] {
      using w_t = scalar_t;
      const w_t* Wt = w.data_ptr<w_t>();
      auto body = [&](auto grad_tag) {
        using g_t = decltype(grad_tag);
        const g_t* G = grad.data_ptr<g_t>();
        if (need_weight) {
          // normalised weights of every (n, j)
          std::vector<acc_t> wn(N * J);
          cpu_parallel_for(0, N, 4096, static_cast<double>(N) * J * 4, [&](int64_t n0, int64_t n1) {
            std::vector<acc_t> c(J);
            for (int64_t n = n0; n < n1; ++n) {
              acc_t S;
              normalise<acc_t>(Wt + n * J, J, c.data(), wn.data() + n * J, S);
            }
          });
          // (n, j) pairs grouped by id, in flat order inside a group (fixed summation order)
          std::vector<int64_t> order(N * J);
          std::iota(order.begin(), order.end(), int64_t(0));
          std::stable_sort(order.begin(), order.end(), [I](int64_t a, int64_t b) { return I[a] < I[b]; });
          std::vector<int64_t> group_start;
          for (int64_t t = 0; t < N * J; ++t)
            if (t == 0 || I[order[t]] != I[order[t - 1]]) group_start.push_back(t);
          const int64_t ngroups = static_cast<int64_t>(group_start.size());
          group_start.push_back(N * J);
          constexpr int64_t kCols = 512;
          const int64_t ncb = (d + kCols - 1) / kCols;
          wgt_t* GW = grad_weight.data_ptr<wgt_t>();
          cpu_parallel_for(0, ngroups * ncb, 1, static_cast<double>(N) * J * d, [&](int64_t t0, int64_t t1) {
            acc_t acc[kCols];
            for (int64_t task = t0; task < t1; ++task) {
              const int64_t g = task / ncb, cb = task % ncb;
              const int64_t lo = cb * kCols, len = std::min(kCols, d - lo);
              std::fill(acc, acc + len, acc_t(0));
              for (int64_t e = group_start[g]; e < group_start[g + 1]; ++e) {
                const int64_t nj = order[e];
                const acc_t f = wn[nj];
                const g_t* gr = G + (nj / J) * d + lo;
_Pragma("omp simd")
                for (int64_t t = 0; t < len; ++t) acc[t] += f * ld<acc_t>(gr, t);
              }
              wgt_t* dst = GW + I[order[group_start[g]]] * d + lo;
_Pragma("omp simd")
              for (int64_t t = 0; t < len; ++t) dst[t] = static_cast<wgt_t>(acc[t]);
            }
          });
        }
        if (need_w) {
          w_t* GWt = grad_w.data_ptr<w_t>();
          cpu_parallel_for(0, N, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, d * J)),
                           static_cast<double>(N) * J * d, [&](int64_t n0, int64_t n1) {
            std::vector<acc_t> c(J), wn(J), gj(J);
            for (int64_t n = n0; n < n1; ++n) {
              acc_t S;
              normalise<acc_t>(Wt + n * J, J, c.data(), wn.data(), S);
              const acc_t D = S < acc_t(1e-12) ? acc_t(1e-12) : S;
              const g_t* gr = G + n * d;
              acc_t through = acc_t(0);
              for (int64_t j = 0; j < J; ++j) {
                const wgt_t* row = W + I[n * J + j] * d;
                acc_t dot = acc_t(0);
_Pragma("omp simd reduction(+ : dot)")
                for (int64_t t = 0; t < d; ++t) dot += ld<acc_t>(row, t) * ld<acc_t>(gr, t);
                gj[j] = dot;
                through += dot * c[j];
              }
              through = through / (D * D) * (S >= acc_t(1e-12) ? acc_t(1) : acc_t(0));
              for (int64_t j = 0; j < J; ++j) {
                const acc_t pass = ld<acc_t>(Wt + n * J, j) >= acc_t(0) ? acc_t(1) : acc_t(0);
                GWt[n * J + j] = static_cast<w_t>((gj[j] / D - through) * pass);
              }
            }
          });
        }
      };
      if (grad_is_acc) body(acc_t{});
      else body(wgt_t{});
    });
  });
  return {grad_weight, grad_w};
}

}  // namespace evofast
