// Fused multi-tensor CPU kernels: norm, scale, fused clip and clip-by-value over a whole list of tensors.
//
// One parallel pass over all chunks of all tensors (at::parallel_for). Each chunk reduces into 16 lanes in a
// fixed order and writes one partial; partials combine in chunk order in double. The result therefore depends on
// the plan only, never on the thread count. The inner loops are compiled twice, for x86-64 and for AVX2+FMA+F16C,
// and the second is taken when the processor has it.
#include "clip_cpu.h"
#include "common/plan.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstring>
#include <vector>

namespace gradclip {
namespace {

#define GC_INLINE inline __attribute__((always_inline))

template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

template <typename A, typename T>
GC_INLINE A load(const T* x, int64_t i) { return static_cast<A>(x[i]); }
template <>
GC_INLINE float load<float, c10::BFloat16>(const c10::BFloat16* x, int64_t i) {
  uint16_t b;
  std::memcpy(&b, x + i, 2);
  uint32_t u = uint32_t(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

constexpr int kLanes = 16;

// One chunk's partial of norm kind K, in the accumulation type of T.
template <NormKind K, typename T>
GC_INLINE double reduce_chunk(const T* x, int64_t n, double p) {
  using A = typename Acc<T>::type;
  const A pa = static_cast<A>(p);
  A acc[kLanes];
  for (int j = 0; j < kLanes; ++j) acc[j] = identity<A>(K);
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) acc[j] = accumulate<K>(acc[j], load<A>(x, i + j), pa);
  for (int j = 0; i + j < n; ++j) acc[j] = accumulate<K>(acc[j], load<A>(x, i + j), pa);
  for (int w = kLanes / 2; w > 0; w /= 2)
    for (int j = 0; j < w; ++j) acc[j] = combine(K, acc[j], acc[j + w]);
  return static_cast<double>(acc[0]);
}

template <typename T>
GC_INLINE void scale_chunk(T* x, int64_t n, double coef) {
  using A = typename Acc<T>::type;
  const A c = static_cast<A>(coef);
  for (int64_t i = 0; i < n; ++i) x[i] = static_cast<T>(load<A>(x, i) * c);
}

template <typename T>
GC_INLINE void clamp_chunk(T* x, int64_t n, double v) {
  using A = typename Acc<T>::type;
  const A lo = static_cast<A>(-v), hi = static_cast<A>(v);
  for (int64_t i = 0; i < n; ++i) x[i] = static_cast<T>(clamp_value(load<A>(x, i), lo, hi));
}

template <NormKind K>
GC_INLINE double reduce_any(const TensorRef& t, const Chunk& c, double p) {
  switch (t.dtype) {
    case DType::F32: return reduce_chunk<K>(static_cast<const float*>(t.data) + c.begin, c.size, p);
    case DType::F16: return reduce_chunk<K>(static_cast<const c10::Half*>(t.data) + c.begin, c.size, p);
    case DType::BF16: return reduce_chunk<K>(static_cast<const c10::BFloat16*>(t.data) + c.begin, c.size, p);
    case DType::F64: return reduce_chunk<K>(static_cast<const double*>(t.data) + c.begin, c.size, p);
  }
  return 0;
}

// The bodies of the three passes over chunks [b, e), written once and compiled for two targets below.
GC_INLINE void norm_body(const Plan& plan, int64_t b, int64_t e, NormKind k, double p, double* out) {
  for (int64_t i = b; i < e; ++i) {
    const Chunk& c = plan.chunks[i];
    const TensorRef& t = plan.tensors[c.tensor];
    switch (k) {
      case NormKind::L2: out[i] = reduce_any<NormKind::L2>(t, c, p); break;
      case NormKind::L1: out[i] = reduce_any<NormKind::L1>(t, c, p); break;
      case NormKind::Inf: out[i] = reduce_any<NormKind::Inf>(t, c, p); break;
      case NormKind::NegInf: out[i] = reduce_any<NormKind::NegInf>(t, c, p); break;
      case NormKind::L0: out[i] = reduce_any<NormKind::L0>(t, c, p); break;
      case NormKind::General: out[i] = reduce_any<NormKind::General>(t, c, p); break;
    }
  }
}

GC_INLINE void scale_body(const Plan& plan, int64_t b, int64_t e, double coef) {
  for (int64_t i = b; i < e; ++i) {
    const Chunk& c = plan.chunks[i];
    const TensorRef& t = plan.tensors[c.tensor];
    switch (t.dtype) {
      case DType::F32: scale_chunk(static_cast<float*>(t.data) + c.begin, c.size, coef); break;
      case DType::F16: scale_chunk(static_cast<c10::Half*>(t.data) + c.begin, c.size, coef); break;
      case DType::BF16: scale_chunk(static_cast<c10::BFloat16*>(t.data) + c.begin, c.size, coef); break;
      case DType::F64: scale_chunk(static_cast<double*>(t.data) + c.begin, c.size, coef); break;
    }
  }
}

GC_INLINE void clamp_body(const Plan& plan, int64_t b, int64_t e, double v) {
  for (int64_t i = b; i < e; ++i) {
    const Chunk& c = plan.chunks[i];
    const TensorRef& t = plan.tensors[c.tensor];
    switch (t.dtype) {
      case DType::F32: clamp_chunk(static_cast<float*>(t.data) + c.begin, c.size, v); break;
      case DType::F16: clamp_chunk(static_cast<c10::Half*>(t.data) + c.begin, c.size, v); break;
      case DType::BF16: clamp_chunk(static_cast<c10::BFloat16*>(t.data) + c.begin, c.size, v); break;
      case DType::F64: clamp_chunk(static_cast<double*>(t.data) + c.begin, c.size, v); break;
    }
  }
}

#define GC_DEFINE_PASSES(SUFFIX, ATTR)                                                                       \
  ATTR void norm_##SUFFIX(const Plan& pl, int64_t b, int64_t e, NormKind k, double p, double* out) {          \
    norm_body(pl, b, e, k, p, out);                                                                           \
  }                                                                                                           \
  ATTR void scale_##SUFFIX(const Plan& pl, int64_t b, int64_t e, double c) { scale_body(pl, b, e, c); }      \
  ATTR void clamp_##SUFFIX(const Plan& pl, int64_t b, int64_t e, double v) { clamp_body(pl, b, e, v); }

#if defined(__x86_64__) && defined(__GNUC__)
GC_DEFINE_PASSES(avx2, __attribute__((target("avx2,fma,f16c"))))
const bool kHaveAvx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                       __builtin_cpu_supports("f16c");
#else
const bool kHaveAvx2 = false;
#define norm_avx2 norm_base
#define scale_avx2 scale_base
#define clamp_avx2 clamp_base
#endif
GC_DEFINE_PASSES(base, )

// Below this many elements a pass runs on the calling thread: starting the pool costs more than it saves.
constexpr int64_t kSerialElems = int64_t(1) << 15;

template <typename F>
void over_chunks(const Plan& plan, F&& f) {
  const int64_t n = static_cast<int64_t>(plan.chunks.size());
  if (n == 0) return;
  if (plan.total_elems < kSerialElems) return f(0, n);
  at::parallel_for(0, n, 1, f);
}

// Combined partials of every chunk, in chunk order, for the total and (optionally) each tensor.
struct NormResult {
  double total;
  std::vector<double> per_tensor;  // finalised, only when asked for
};

NormResult compute_norm(const Plan& plan, double p, bool per_tensor) {
  const NormKind k = norm_kind(p);
  std::vector<double> partial(plan.chunks.size());
  over_chunks(plan, [&](int64_t b, int64_t e) {
    (kHaveAvx2 ? norm_avx2 : norm_base)(plan, b, e, k, p, partial.data());
  });
  NormResult r{identity<double>(k), {}};
  const size_t nt = plan.tensors.size();
  if (per_tensor) r.per_tensor.resize(nt);
  for (size_t t = 0; t < nt; ++t) {
    double acc = identity<double>(k);
    for (int64_t i = plan.first_chunk[t]; i < plan.first_chunk[t + 1]; ++i) acc = combine(k, acc, partial[i]);
    r.total = combine(k, r.total, tensor_to_total(k, acc));
    if (per_tensor) r.per_tensor[t] = finalize(k, acc, p);
  }
  r.total = finalize(k, r.total, p);
  return r;
}

// The coefficient in the precision torch would use for this total: double for a float64 total, else float.
double coef_for(double total, bool f64, double max_norm) {
  return f64 ? clip_coef<double>(total, max_norm)
             : static_cast<double>(clip_coef<float>(static_cast<float>(total), max_norm));
}

// Scales every tensor by coef; writes nothing (and returns false) when coef is 1.
bool apply_scale(Plan& plan, double coef) {
  if (coef == 1.0) return false;
  over_chunks(plan, [&](int64_t b, int64_t e) { (kHaveAvx2 ? scale_avx2 : scale_base)(plan, b, e, coef); });
  finish_writes(plan);
  return true;
}

at::Tensor scalar_of(double v, at::ScalarType dtype) {
  return at::scalar_tensor(v, at::TensorOptions().dtype(at::kDouble)).to(dtype);
}

// In-place writes through raw pointers: tell autograd the tensors changed, as an in-place torch op would.
void bump_versions(at::TensorList xs) {
  for (const auto& x : xs)
    if (!x.is_inference()) x.unsafeGetTensorImpl()->bump_version();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> multi_tensor_norm_cpu(at::TensorList xs, double p, bool per_tensor) {
  Plan plan = make_plan(xs, kCpuChunk, {true, p});
  NormResult r = compute_norm(plan, p, per_tensor);
  const auto out = plan.result_dtype;
  at::Tensor each = at::empty({per_tensor ? static_cast<int64_t>(xs.size()) : 0},
                              at::TensorOptions().dtype(at::kDouble));
  if (per_tensor) std::copy(r.per_tensor.begin(), r.per_tensor.end(), each.data_ptr<double>());
  return {scalar_of(r.total, out), each.to(out)};
}

void multi_tensor_scale_cpu(at::TensorList xs, const at::Tensor& total, double max_norm) {
  TORCH_CHECK(total.numel() == 1, "gradclip_cuda: total_norm must hold one value, got ", total.numel());
  Plan plan = make_plan(xs, kCpuChunk, {});
  const double coef = coef_for(total.item<double>(), total.scalar_type() == at::kDouble, max_norm);
  if (apply_scale(plan, coef)) bump_versions(xs);
}

at::Tensor clip_grad_norm_cpu(at::TensorList xs, double max_norm, double p) {
  Plan plan = make_plan(xs, kCpuChunk, {true, p});
  NormResult r = compute_norm(plan, p, false);
  if (apply_scale(plan, coef_for(r.total, plan.any_f64, max_norm))) bump_versions(xs);
  return scalar_of(r.total, plan.result_dtype);
}

void clip_grad_value_cpu(at::TensorList xs, double clip_value) {
  Plan plan = make_plan(xs, kCpuChunk, {});
  over_chunks(plan, [&](int64_t b, int64_t e) { (kHaveAvx2 ? clamp_avx2 : clamp_base)(plan, b, e, clip_value); });
  finish_writes(plan);
  bump_versions(xs);
}

}  // namespace gradclip
