// Fused multi-tensor CPU kernels: norm, scale, fused clip and clip-by-value over a whole list of tensors.
//
// One parallel pass over all chunks of all tensors (at::parallel_for). Each chunk reduces into 16 lanes in a
// fixed order and writes one partial; partials combine in chunk order in double. The result therefore depends on
// the plan only, never on the thread count. The inner loops are compiled twice, for x86-64 and for AVX2+FMA+F16C,
// and the second is taken when the processor has it.
#include "clip_cpu.h"
#include "common/plan.h"
#include "common/rules.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

namespace gradclip {
namespace {

#define GC_INLINE inline __attribute__((always_inline))

// Element loads and stores in the accumulation type A, written so that the compiler vectorises them: bf16 by bit
// manipulation (round to nearest even, NaN kept quiet, as c10::BFloat16 does), fp16 through the compiler's
// _Float16 (one vcvtph2ps / vcvtps2ph per eight elements with F16C).
template <typename A, typename T>
GC_INLINE A load(const T* x, int64_t i) { return static_cast<A>(x[i]); }
template <typename T, typename A>
GC_INLINE void store(T* x, int64_t i, A v) { x[i] = static_cast<T>(v); }

template <>
GC_INLINE float load<float, c10::BFloat16>(const c10::BFloat16* x, int64_t i) {
  uint16_t b;
  std::memcpy(&b, x + i, 2);
  const uint32_t u = uint32_t(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
template <>
GC_INLINE void store<c10::BFloat16, float>(c10::BFloat16* x, int64_t i, float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  const uint16_t b = v != v ? uint16_t(0x7FC0) : uint16_t((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
  std::memcpy(x + i, &b, 2);
}

// Widening of a block of elements into the accumulation type, and narrowing back, per instruction set: the
// generic loops vectorise for bf16 (bit operations); fp16 needs F16C's vcvtph2ps / vcvtps2ph, which the compiler
// does not reach from scalar code, so the AVX2 build calls them (once per block: not inlined, since a function
// compiled for AVX2 cannot be inlined into the generic template code that calls it).
struct Base {};
struct Avx2 {};

template <class ISA, typename T>
struct Convert {
  using A = typename Acc<T>::type;
  static GC_INLINE void widen(const T* x, int64_t m, A* out) {
    for (int64_t j = 0; j < m; ++j) out[j] = load<A>(x, j);
  }
  static GC_INLINE void narrow(const A* in, int64_t m, T* x) {
    for (int64_t j = 0; j < m; ++j) store(x, j, in[j]);
  }
};

#if defined(__x86_64__) && defined(__GNUC__)
#define GC_AVX2 __attribute__((target("avx2,fma,f16c")))
template <>
struct Convert<Avx2, c10::Half> {
  GC_AVX2 static void widen(const c10::Half* x, int64_t m, float* out) {
    int64_t j = 0;
    for (; j + 8 <= m; j += 8)
      _mm256_storeu_ps(out + j, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x + j))));
    for (; j < m; ++j) out[j] = static_cast<float>(x[j]);
  }
  GC_AVX2 static void narrow(const float* in, int64_t m, c10::Half* x) {
    int64_t j = 0;
    for (; j + 8 <= m; j += 8)
      _mm_storeu_si128(reinterpret_cast<__m128i*>(x + j),
                       _mm256_cvtps_ph(_mm256_loadu_ps(in + j), _MM_FROUND_TO_NEAREST_INT));
    for (; j < m; ++j) x[j] = c10::Half(in[j]);
  }
};
#endif

constexpr int kLanes = 16;

constexpr int64_t kBlock = 32 * kLanes;  // elements widened at a time

// Folds v[0..m) into the lanes: element i goes to lane i % kLanes.
template <NormKind K, typename A>
GC_INLINE void fold_lanes(A* acc, const A* v, int64_t m, A p) {
  int64_t i = 0;
  for (; i + kLanes <= m; i += kLanes)
    for (int j = 0; j < kLanes; ++j) acc[j] = accumulate<K>(acc[j], v[i + j], p);
  for (int j = 0; i + j < m; ++j) acc[j] = accumulate<K>(acc[j], v[i + j], p);
}

// One chunk's partial of norm kind K, in the accumulation type of T. 16-bit inputs are first widened, a block at a
// time, into a float buffer (a loop the compiler vectorises reliably); block sizes are multiples of kLanes, so every
// element lands in the same lane either way.
template <NormKind K, class ISA, typename T>
GC_INLINE double reduce_chunk(const T* x, int64_t n, double p) {
  using A = typename Acc<T>::type;
  const A pa = static_cast<A>(p);
  A acc[kLanes];
  for (int j = 0; j < kLanes; ++j) acc[j] = identity<A>(K);
  if constexpr (std::is_same_v<T, A>) {
    fold_lanes<K>(acc, x, n, pa);
  } else {
    alignas(64) A buf[kBlock];
    for (int64_t b = 0; b < n; b += kBlock) {
      const int64_t m = std::min(kBlock, n - b);
      Convert<ISA, T>::widen(x + b, m, buf);
      fold_lanes<K>(acc, buf, m, pa);
    }
  }
  for (int w = kLanes / 2; w > 0; w /= 2)
    for (int j = 0; j < w; ++j) acc[j] = combine(K, acc[j], acc[j + w]);
  return static_cast<double>(acc[0]);
}

// Applies f to every element of x[0..n) in place, in the accumulation type.
template <class ISA, typename T, typename F>
GC_INLINE void map_chunk(T* x, int64_t n, F f) {
  using A = typename Acc<T>::type;
  if constexpr (std::is_same_v<T, A>) {
    for (int64_t i = 0; i < n; ++i) x[i] = f(x[i]);
  } else {
    alignas(64) A buf[kBlock];
    for (int64_t b = 0; b < n; b += kBlock) {
      const int64_t m = std::min(kBlock, n - b);
      Convert<ISA, T>::widen(x + b, m, buf);
      for (int64_t j = 0; j < m; ++j) buf[j] = f(buf[j]);
      Convert<ISA, T>::narrow(buf, m, x + b);
    }
  }
}

// Calls f(typed pointer to the chunk's first element, chunk size, chunk index) for chunks [b, e) of the plan,
// last chunk first when `backward`.
template <typename F>
GC_INLINE void each_chunk(const Plan& plan, int64_t b, int64_t e, F&& f, bool backward = false) {
  for (int64_t k = b; k < e; ++k) {
    const int64_t i = backward ? b + e - 1 - k : k;
    const Chunk& c = plan.chunks[i];
    const TensorRef& t = plan.tensors[c.tensor];
    switch (t.dtype) {
      case DType::F32: f(static_cast<float*>(t.data) + c.begin, c.size, i); break;
      case DType::F16: f(static_cast<c10::Half*>(t.data) + c.begin, c.size, i); break;
      case DType::BF16: f(static_cast<c10::BFloat16*>(t.data) + c.begin, c.size, i); break;
      case DType::F64: f(static_cast<double*>(t.data) + c.begin, c.size, i); break;
    }
  }
}

// The bodies of the three passes over chunks [b, e), written once and compiled for two targets below. The
// lambdas are forced inline so that they take the instruction set of the function they are compiled into.
#define GC_LAMBDA(...) [&](auto* x, int64_t n, int64_t i) __attribute__((always_inline)) { __VA_ARGS__; }

template <NormKind K, class ISA>
GC_INLINE void norm_kind_body(const Plan& plan, int64_t b, int64_t e, double p, double* out) {
  each_chunk(plan, b, e, GC_LAMBDA(out[i] = reduce_chunk<K, ISA>(x, n, p)));
}

template <class ISA>
GC_INLINE void norm_body(const Plan& plan, int64_t b, int64_t e, NormKind k, double p, double* out) {
  switch (k) {
    case NormKind::L2: return norm_kind_body<NormKind::L2, ISA>(plan, b, e, p, out);
    case NormKind::L1: return norm_kind_body<NormKind::L1, ISA>(plan, b, e, p, out);
    case NormKind::Inf: return norm_kind_body<NormKind::Inf, ISA>(plan, b, e, p, out);
    case NormKind::NegInf: return norm_kind_body<NormKind::NegInf, ISA>(plan, b, e, p, out);
    case NormKind::L0: return norm_kind_body<NormKind::L0, ISA>(plan, b, e, p, out);
    case NormKind::General: return norm_kind_body<NormKind::General, ISA>(plan, b, e, p, out);
  }
}

// x * coef in the element's accumulation type (float, or double for double), rounded back to the element type; coefs
// holds one coefficient, or one per tensor (per_tensor); a chunk whose coefficient is 1 is not written.
// Backward: each thread gets the same chunks as in the norm pass and starts with the ones it read last, which are
// still in its caches.
template <class ISA>
GC_INLINE void scale_body(const Plan& plan, int64_t b, int64_t e, const double* coefs, bool per_tensor) {
  each_chunk(plan, b, e, GC_LAMBDA(using A = typename Acc<std::remove_pointer_t<decltype(x)>>::type;
                                   const double coef = coefs[per_tensor ? plan.chunks[i].tensor : 0];
                                   if (coef == 1.0) return;
                                   const A c = static_cast<A>(coef);
                                   map_chunk<ISA>(x, n, [c](A v) __attribute__((always_inline)) { return v * c; })),
             /*backward=*/true);
}

// Calls f with the typed pointer of a tensor's data.
template <typename F>
GC_INLINE void typed(void* data, DType dt, F&& f) {
  switch (dt) {
    case DType::F32: return f(static_cast<float*>(data));
    case DType::F16: return f(static_cast<c10::Half*>(data));
    case DType::BF16: return f(static_cast<c10::BFloat16*>(data));
    case DType::F64: return f(static_cast<double*>(data));
  }
}

// One AGC unit of a gradient and its parameter, both contiguous (see AgcTensor below).
struct AgcTensor {
  void* grad;
  const void* param;
  DType gdt, pdt;
  int64_t outer, units, inner;
};

// The partial of norm kind K over a unit's elements: its segments (one per outer index) in order, each in pieces of
// at most kCpuChunk elements reduced by reduce_chunk, combined in double in that order.
template <NormKind K, class ISA>
GC_INLINE double unit_partial(const void* data, DType dt, const AgcTensor& t, int64_t u, double p) {
  double acc = identity<double>(K);
  typed(const_cast<void*>(data), dt, [&](auto* x) __attribute__((always_inline)) {
    for (int64_t o = 0; o < t.outer; ++o) {
      const int64_t off = (o * t.units + u) * t.inner;
      for (int64_t b = 0; b < t.inner; b += kCpuChunk)
        acc = combine(K, acc, reduce_chunk<K, ISA>(x + off + b, std::min(kCpuChunk, t.inner - b), p));
    }
  });
  return acc;
}

// AGC over units [b, e) of the list (units numbered tensor after tensor: unit_base[t] is tensor t's first): both
// norms of a unit, its coefficient (agc_coef, in the gradient's accumulation type), and, where that is not 1, the
// unit's gradient scaled, while it is still in this core's caches.
template <NormKind K, class ISA>
GC_INLINE void agc_kind_body(const std::vector<AgcTensor>& ts, const std::vector<int64_t>& unit_base, int64_t b,
                             int64_t e, double p, double clip_factor, double eps) {
  size_t t = std::upper_bound(unit_base.begin(), unit_base.end(), b) - unit_base.begin() - 1;
  for (int64_t k = b; k < e; ++k) {
    while (k >= unit_base[t + 1]) ++t;
    const AgcTensor& tt = ts[t];
    const int64_t u = k - unit_base[t];
    const double pn = finalize(K, unit_partial<K, ISA>(tt.param, tt.pdt, tt, u, p), p);
    const double gn = finalize(K, unit_partial<K, ISA>(tt.grad, tt.gdt, tt, u, p), p);
    typed(tt.grad, tt.gdt, [&](auto* x) __attribute__((always_inline)) {
      using A = typename Acc<std::remove_pointer_t<decltype(x)>>::type;
      const A c = agc_coef<A>(static_cast<A>(pn), static_cast<A>(gn), clip_factor, eps);
      if (c == A(1)) return;
      for (int64_t o = 0; o < tt.outer; ++o)
        map_chunk<ISA>(x + (o * tt.units + u) * tt.inner, tt.inner,
                       [c](A v) __attribute__((always_inline)) { return v * c; });
    });
  }
}

template <class ISA>
GC_INLINE void agc_body(const std::vector<AgcTensor>& ts, const std::vector<int64_t>& unit_base, int64_t b, int64_t e,
                        double p, double clip_factor, double eps) {
  switch (norm_kind(p)) {
    case NormKind::L2: return agc_kind_body<NormKind::L2, ISA>(ts, unit_base, b, e, p, clip_factor, eps);
    case NormKind::L1: return agc_kind_body<NormKind::L1, ISA>(ts, unit_base, b, e, p, clip_factor, eps);
    case NormKind::Inf: return agc_kind_body<NormKind::Inf, ISA>(ts, unit_base, b, e, p, clip_factor, eps);
    case NormKind::NegInf: return agc_kind_body<NormKind::NegInf, ISA>(ts, unit_base, b, e, p, clip_factor, eps);
    case NormKind::L0: return agc_kind_body<NormKind::L0, ISA>(ts, unit_base, b, e, p, clip_factor, eps);
    case NormKind::General: return agc_kind_body<NormKind::General, ISA>(ts, unit_base, b, e, p, clip_factor, eps);
  }
}

template <class ISA>
GC_INLINE void clamp_body(const Plan& plan, int64_t b, int64_t e, double v) {
  each_chunk(plan, b, e, GC_LAMBDA((void)i; using A = typename Acc<std::remove_pointer_t<decltype(x)>>::type;
                                   const A lo = static_cast<A>(-v), hi = static_cast<A>(v);
                                   map_chunk<ISA>(x, n, [lo, hi](A y) __attribute__((always_inline)) {
                                     return clamp_value(y, lo, hi);
                                   })));
}

#define GC_DEFINE_PASSES(SUFFIX, ATTR, ISA)                                                                  \
  ATTR void norm_##SUFFIX(const Plan& pl, int64_t b, int64_t e, NormKind k, double p, double* out) {          \
    norm_body<ISA>(pl, b, e, k, p, out);                                                                      \
  }                                                                                                           \
  ATTR void scale_##SUFFIX(const Plan& pl, int64_t b, int64_t e, const double* c, bool per) {                 \
    scale_body<ISA>(pl, b, e, c, per);                                                                        \
  }                                                                                                           \
  ATTR void clamp_##SUFFIX(const Plan& pl, int64_t b, int64_t e, double v) { clamp_body<ISA>(pl, b, e, v); }  \
  ATTR void agc_##SUFFIX(const std::vector<AgcTensor>& ts, const std::vector<int64_t>& ub, int64_t b, int64_t e, \
                         double p, double f, double eps) {                                                    \
    agc_body<ISA>(ts, ub, b, e, p, f, eps);                                                                   \
  }

#if defined(__x86_64__) && defined(__GNUC__)
GC_DEFINE_PASSES(avx2, GC_AVX2, Avx2)
// GRADCLIP_CPU_GENERIC=1 (read once, at load) forces the generic kernels on a processor with AVX2, so that CI tests
// both builds of the inner loops on one machine.
const bool kHaveAvx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                       __builtin_cpu_supports("f16c") && !(std::getenv("GRADCLIP_CPU_GENERIC") &&
                                                           std::string(std::getenv("GRADCLIP_CPU_GENERIC")) == "1");
#else
const bool kHaveAvx2 = false;
#define norm_avx2 norm_base
#define scale_avx2 scale_base
#define clamp_avx2 clamp_base
#define agc_avx2 agc_base
#endif
GC_DEFINE_PASSES(base, , Base)

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
  std::vector<double> per_tensor;  // finalised (un-finalised: raw), only when asked for
};

NormResult compute_norm(const Plan& plan, double p, bool per_tensor, bool raw = false) {
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
    if (per_tensor) r.per_tensor[t] = raw ? acc : finalize(k, acc, p);
  }
  r.total = finalize(k, r.total, p);
  return r;
}

// Scales every tensor by its coefficient (coefs: one for all, or one per tensor); writes nothing (and returns
// false) when every coefficient is 1.
bool apply_scale(Plan& plan, const std::vector<double>& coefs) {
  if (std::all_of(coefs.begin(), coefs.end(), [](double c) { return c == 1.0; })) return false;
  drop_repeated_tensors(plan);
  const bool per = coefs.size() > 1;
  over_chunks(plan, [&](int64_t b, int64_t e) {
    (kHaveAvx2 ? scale_avx2 : scale_base)(plan, b, e, coefs.data(), per);
  });
  finish_writes(plan);
  return true;
}

// The values of a total or coefficient tensor (one, or one per tensor of xs), as doubles: the CPU kernels read them
// on the host (they are CPU tensors: no device sync).
std::vector<double> host_values(at::TensorList xs, const at::Tensor& v, const char* what) {
  TORCH_CHECK(v.numel() == 1 || v.numel() == static_cast<int64_t>(xs.size()), "gradclip_cuda: ", what,
              " must hold one value or one per tensor (", xs.size(), "), got ", v.numel());
  const at::Tensor d = v.to(at::kDouble).contiguous();
  return std::vector<double>(d.data_ptr<double>(), d.data_ptr<double>() + d.numel());
}

at::Tensor scalar_of(double v, at::ScalarType dtype) {
  return at::scalar_tensor(v, at::TensorOptions().dtype(at::kDouble)).to(dtype);
}

}  // namespace

const char* cpu_kernel_isa() { return kHaveAvx2 ? "avx2" : "generic"; }

std::tuple<at::Tensor, at::Tensor> multi_tensor_norm_cpu(at::TensorList xs, double p, bool per_tensor) {
  Plan plan = make_plan(xs, kCpuChunk, {true, p});
  NormResult r = compute_norm(plan, p, per_tensor);
  const auto out = plan.result_dtype;
  at::Tensor each = at::empty({per_tensor ? static_cast<int64_t>(xs.size()) : 0},
                              at::TensorOptions().dtype(at::kDouble));
  if (per_tensor) std::copy(r.per_tensor.begin(), r.per_tensor.end(), each.data_ptr<double>());
  return {scalar_of(r.total, out), each.to(out)};
}

at::Tensor partials_of_plan(const Plan& plan, double p) {
  const NormResult r = compute_norm(plan, p, true, true);
  at::Tensor out = at::empty({static_cast<int64_t>(plan.tensors.size())}, at::TensorOptions().dtype(at::kDouble));
  std::copy(r.per_tensor.begin(), r.per_tensor.end(), out.data_ptr<double>());
  return out;
}

void scale_plan(Plan& plan, at::TensorList xs, const at::Tensor& total, double max_norm, double eps) {
  std::vector<double> coefs = host_values(xs, total, "total_norm");
  const bool f64 = total.scalar_type() == at::kDouble;
  for (double& c : coefs) c = coef_for(c, f64, max_norm, eps);
  if (apply_scale(plan, coefs)) bump_versions(xs);
}

at::Tensor multi_tensor_partials_cpu(at::TensorList xs, double p) {
  return partials_of_plan(make_plan(xs, kCpuChunk, {true, p}), p);
}

void multi_tensor_scale_cpu(at::TensorList xs, const at::Tensor& total, double max_norm, double eps) {
  Plan plan = make_plan(xs, kCpuChunk, {false, 2.0, true});
  scale_plan(plan, xs, total, max_norm, eps);
}

void multi_tensor_mul_cpu(at::TensorList xs, const at::Tensor& coef) {
  const std::vector<double> coefs = host_values(xs, coef, "coef");
  Plan plan = make_plan(xs, kCpuChunk, {false, 2.0, true});
  if (apply_scale(plan, coefs)) bump_versions(xs);
}

at::Tensor clip_grad_norm_cpu(at::TensorList xs, double max_norm, double p, double eps) {
  Plan plan = make_plan(xs, kCpuChunk, {true, p, true});
  NormResult r = compute_norm(plan, p, false);
  if (apply_scale(plan, {coef_for(r.total, plan.any_f64, max_norm, eps)})) bump_versions(xs);
  return scalar_of(r.total, plan.result_dtype);
}

void clip_grad_value_cpu(at::TensorList xs, double clip_value) {
  Plan plan = make_plan(xs, kCpuChunk, {false, 2.0, true});
  drop_repeated_tensors(plan);
  over_chunks(plan, [&](int64_t b, int64_t e) { (kHaveAvx2 ? clamp_avx2 : clamp_base)(plan, b, e, clip_value); });
  finish_writes(plan);
  bump_versions(xs);
}

void adaptive_clip_grad_cpu(at::TensorList grads, at::TensorList params, double clip_factor, double eps, double p,
                            int64_t unit_axis) {
  AgcInputs in = prepare_agc(grads, params, unit_axis);
  std::vector<AgcTensor> ts;
  std::vector<int64_t> unit_base{0};
  int64_t elems = 0;
  for (const auto& it : in.items) {
    ts.push_back({it.grad.data_ptr(), it.param.data_ptr(), dtype_of(it.grad.scalar_type()),
                  dtype_of(it.param.scalar_type()), it.shape.outer, it.shape.units, it.shape.inner});
    unit_base.push_back(unit_base.back() + it.shape.units);
    elems += it.grad.numel();
  }
  const int64_t n = unit_base.back();
  if (n == 0) return;
  auto body = [&](int64_t b, int64_t e) { (kHaveAvx2 ? agc_avx2 : agc_base)(ts, unit_base, b, e, p, clip_factor, eps); };
  if (elems < kSerialElems) {
    body(0, n);
  } else {
    at::parallel_for(0, n, std::max<int64_t>(1, n * 8192 / elems), body);  // about 8,192 elements a task at least
  }
  finish_agc(in);
  bump_versions(grads);
}

void check_policy_state(const at::Tensor& state, const at::Tensor& total, int64_t policy, at::ArrayRef<double> args) {
  TORCH_CHECK(args.size() == size_t(kPolicyArgs), "gradclip_cuda: clip_policy_step_ takes ", kPolicyArgs,
              " arguments, got ", args.size());
  TORCH_CHECK(policy >= 0 && policy <= 2, "gradclip_cuda: unknown clipping policy ", policy);
  const PolicyArgs a = policy_args(args.data());
  if (policy != int64_t(ClipPolicy::Fixed))
    TORCH_CHECK(args[7] >= 1 && args[7] == std::floor(args[7]) && args[7] < 2147483648.0,
                "gradclip_cuda: a clipping policy's buffer size must be a whole number >= 1, got ", args[7]);
  if (policy == int64_t(ClipPolicy::AutoClip))
    TORCH_CHECK(a.q >= 0 && a.q <= 1, "gradclip_cuda: AutoClip's quantile must be in [0, 1], got ", a.q);
  const int64_t data = policy == int64_t(ClipPolicy::AutoClip) ? 2 * a.size : policy == int64_t(ClipPolicy::ZClip) ? a.size : 0;
  TORCH_CHECK(state.scalar_type() == at::kDouble && state.dim() == 1 && state.is_contiguous() &&
                  state.numel() == kStateData + data,
              "gradclip_cuda: a clipping policy's state is a contiguous float64 vector of ", kStateData + data,
              " values");
  TORCH_CHECK(total.numel() == 1 && at::isFloatingType(total.scalar_type()),
              "gradclip_cuda: clip_policy_step_ takes a floating-point total of one value");
  TORCH_CHECK(total.device() == state.device(), "gradclip_cuda: the total and the policy state are on ",
              total.device(), " and ", state.device());
  if (state.is_cpu()) {  // on a device, reading it would be a host sync
    const double count = state.data_ptr<double>()[kStateCount];
    TORCH_CHECK(count >= 0 && count < 9007199254740992.0 && count == std::floor(count),
                "gradclip_cuda: a clipping policy's state holds a count of ", count);
  }
}

at::Tensor clip_policy_step_cpu(const at::Tensor& state, const at::Tensor& total, int64_t policy,
                                at::ArrayRef<double> args) {
  check_policy_state(state, total, policy, args);
  const PolicyArgs a = policy_args(args.data());
  const double g = total.to(at::kDouble).item<double>();  // a CPU tensor: read on the host, no device sync
  const double threshold = policy_step(state.data_ptr<double>(), static_cast<ClipPolicy>(policy), a, g);
  bump_versions({state});
  if (total.scalar_type() == at::kDouble) return scalar_of(policy_coef<double>(g, threshold, a.eps), at::kDouble);
  return scalar_of(policy_coef<float>(static_cast<float>(g), threshold, a.eps), at::kFloat);
}

}  // namespace gradclip
