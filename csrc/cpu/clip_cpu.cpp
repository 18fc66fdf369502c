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

#include <algorithm>
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

// x * coef in the element's accumulation type (float, or double for double), rounded back to the element type.
// Backward: each thread gets the same chunks as in the norm pass and starts with the ones it read last, which are
// still in its caches.
template <class ISA>
GC_INLINE void scale_body(const Plan& plan, int64_t b, int64_t e, double coef) {
  each_chunk(plan, b, e, GC_LAMBDA((void)i; using A = typename Acc<std::remove_pointer_t<decltype(x)>>::type;
                                   const A c = static_cast<A>(coef);
                                   map_chunk<ISA>(x, n, [c](A v) __attribute__((always_inline)) { return v * c; })),
             /*backward=*/true);
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
  ATTR void scale_##SUFFIX(const Plan& pl, int64_t b, int64_t e, double c) { scale_body<ISA>(pl, b, e, c); } \
  ATTR void clamp_##SUFFIX(const Plan& pl, int64_t b, int64_t e, double v) { clamp_body<ISA>(pl, b, e, v); }

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

// Scales every tensor by coef; writes nothing (and returns false) when coef is 1.
bool apply_scale(Plan& plan, double coef) {
  if (coef == 1.0) return false;
  drop_repeated_tensors(plan);
  over_chunks(plan, [&](int64_t b, int64_t e) { (kHaveAvx2 ? scale_avx2 : scale_base)(plan, b, e, coef); });
  finish_writes(plan);
  return true;
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

void multi_tensor_scale_cpu(at::TensorList xs, const at::Tensor& total, double max_norm) {
  TORCH_CHECK(total.numel() == 1, "gradclip_cuda: total_norm must hold one value, got ", total.numel());
  Plan plan = make_plan(xs, kCpuChunk, {false, 2.0, true});
  const double coef = coef_for(total.item<double>(), total.scalar_type() == at::kDouble, max_norm);
  if (apply_scale(plan, coef)) bump_versions(xs);
}

at::Tensor clip_grad_norm_cpu(at::TensorList xs, double max_norm, double p) {
  Plan plan = make_plan(xs, kCpuChunk, {true, p, true});
  NormResult r = compute_norm(plan, p, false);
  if (apply_scale(plan, coef_for(r.total, plan.any_f64, max_norm))) bump_versions(xs);
  return scalar_of(r.total, plan.result_dtype);
}

void clip_grad_value_cpu(at::TensorList xs, double clip_value) {
  Plan plan = make_plan(xs, kCpuChunk, {false, 2.0, true});
  drop_repeated_tensors(plan);
  over_chunks(plan, [&](int64_t b, int64_t e) { (kHaveAvx2 ? clamp_avx2 : clamp_base)(plan, b, e, clip_value); });
  finish_writes(plan);
  bump_versions(xs);
}

}  // namespace gradclip
