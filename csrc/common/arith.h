// Per-element arithmetic shared by the CPU and CUDA kernels.
//
// Everything here is a __host__ __device__ inline function so that the CPU kernels (and their tests) run the
// very arithmetic the GPU runs: how an element is accumulated for each norm type, how two partials combine,
// how a partial is finalised, and how the clipping coefficient is computed from a total.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define GC_HD __host__ __device__ __forceinline__
#else
#define GC_HD inline
#endif

namespace gradclip {

// The accumulation type of an element type: float for float and the 16-bit types, double for double.
template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

// Which reduction a norm order p needs. The total of every kind is torch's composition: the p-norm of the
// vector of per-tensor p-norms. For every p except 0 that equals the p-norm of all elements together; for
// p = 0 torch's composition counts the tensors that hold a nonzero element, and so do we (drop-in).
enum class NormKind : uint8_t { L2 = 0, L1 = 1, Inf = 2, NegInf = 3, L0 = 4, General = 5 };

GC_HD NormKind norm_kind(double p) {
  if (p == 2.0) return NormKind::L2;
  if (p == 1.0) return NormKind::L1;
  if (std::isinf(p)) return p > 0 ? NormKind::Inf : NormKind::NegInf;
  if (p == 0.0) return NormKind::L0;
  return NormKind::General;
}

// max / min that propagate NaN from either side, as torch's max-norm does. Written as nested selects: this is the
// form GCC vectorises (a `||` of two comparisons it leaves scalar).
template <typename A>
GC_HD A max_nan(A a, A b) { return (a != a) ? a : ((b != b) ? b : (b > a ? b : a)); }
template <typename A>
GC_HD A min_nan(A a, A b) { return (a != a) ? a : ((b != b) ? b : (b < a ? b : a)); }

// The value a partial starts from: neutral for the combine of that kind.
template <typename A>
GC_HD A identity(NormKind k) {
  return k == NormKind::NegInf ? A(INFINITY) : A(0);
}

// Fold one element (already converted to the accumulation type A) into a partial.
template <NormKind K, typename A>
GC_HD A accumulate(A acc, A x, A p) {
  A ax = std::fabs(x);  // |x| with the sign bit cleared: -0.0 gives +0.0 (so pow(|-0|, p < 0) is +inf); NaN stays NaN
  if constexpr (K == NormKind::L2) return acc + x * x;
  else if constexpr (K == NormKind::L1) return acc + ax;
  else if constexpr (K == NormKind::Inf) return max_nan(acc, ax);
  else if constexpr (K == NormKind::NegInf) return min_nan(acc, ax);
  else if constexpr (K == NormKind::L0) return acc + A(x != A(0));
  else return acc + std::pow(ax, p);
}

// Combine two partials of the same kind.
template <typename A>
GC_HD A combine(NormKind k, A a, A b) {
  switch (k) {
    case NormKind::Inf: return max_nan(a, b);
    case NormKind::NegInf: return min_nan(a, b);
    default: return a + b;
  }
}

// Turn a combined partial into a norm.
template <typename A>
GC_HD A finalize(NormKind k, A acc, A p) {
  switch (k) {
    case NormKind::L2: return std::sqrt(acc);
    case NormKind::General: return std::pow(acc, A(1) / p);
    default: return acc;
  }
}

// What one tensor's norm contributes to the total's partial (torch composes per-tensor norms; for every kind
// but L0 this is the tensor's partial itself, for L0 it is whether that tensor's count is nonzero).
template <typename A>
GC_HD A tensor_to_total(NormKind k, A tensor_partial) {
  return k == NormKind::L0 ? A(tensor_partial != A(0)) : tensor_partial;
}

// The clipping coefficient, computed the way torch computes it in the total's precision A:
// clamp(max_norm / (total + eps), max=1) with torch's eps = 1e-6 by default, where torch evaluates `scalar / t` as
// `t.reciprocal() * scalar`. eps = 0 gives TensorFlow's exact cap (a total of 0 gives 1). NaN propagates (torch's
// clamp keeps NaN), so a NaN total turns the gradients into NaN as torch does.
template <typename A>
GC_HD A clip_coef(A total, double max_norm, double eps) {
  A r = A(1) / (total + A(eps));
  A c = r * A(max_norm);
  return (c < A(1) || c != c) ? c : A(1);
}

// The coefficient in the precision torch would use for this total: double when the total is float64 (`f64`),
// else float (returned widened to double, exactly).
GC_HD double coef_for(double total, bool f64, double max_norm, double eps) {
  return f64 ? clip_coef<double>(total, max_norm, eps)
             : static_cast<double>(clip_coef<float>(static_cast<float>(total), max_norm, eps));
}

// AGC's coefficient for one unit, in the gradient's accumulation type A (timm's adaptive_clip_grad): the unit's
// limit is max(param_norm, eps) * clip_factor; a gradient unit whose norm reaches the limit is scaled by
// limit / max(grad_norm, 1e-6) (an IEEE division), any other is left alone (coefficient 1). NaN propagates.
template <typename A>
GC_HD A agc_coef(A param_norm, A grad_norm, double clip_factor, double eps) {
  const A e = A(eps);
  const A limit = (param_norm < e ? e : param_norm) * A(clip_factor);
  if (grad_norm < limit) return A(1);
  return limit / (grad_norm < A(1e-6) ? A(1e-6) : grad_norm);
}

// clip_grad_value_: torch applies clamp_min(-v) and then clamp_max(v), both NaN-preserving.
template <typename A>
GC_HD A clamp_value(A x, A lo, A hi) {
  x = x < lo ? lo : x;
  return x > hi ? hi : x;
}

}  // namespace gradclip
