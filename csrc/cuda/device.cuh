// Device helpers shared by the CUDA kernel families (clip_cuda.cu, agc_cuda.cu): fixed-order warp and block
// reductions, 16-byte vector visits of a span of elements, a thread's share of a span's norm partial, and in-place
// maps. Included once per kernel file (everything is inline, in an anonymous namespace).
#pragma once

#include "common/arith.h"
#include "common/launch.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace gradclip {
namespace {

constexpr int kThreads = kCudaThreads;
constexpr int kWarps = kThreads / 32;
constexpr int kUnroll = kCudaUnroll;  // 16-byte loads in flight per thread

// ---- device helpers ----

template <typename T>
__device__ __forceinline__ typename Acc<T>::type widen(T v) {
  return static_cast<typename Acc<T>::type>(v);
}

template <typename T>
constexpr int kVec = 16 / int(sizeof(T));

static_assert(kWarps == kPackTensors, "a pack has a warp per member");

// Combines v over a warp (a butterfly: a fixed order); every lane gets the result.
template <typename A>
__device__ __forceinline__ A warp_combine(NormKind k, A v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = combine(k, v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Combines v over the block of W warps; every thread gets the result. smem: W doubles.
template <int W = kWarps, typename A>
__device__ __forceinline__ A block_combine(NormKind k, A v, double* smem) {
  static_assert(W >= 1 && W <= 32, "a block of 1 to 32 warps");
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_combine(k, v);
  if (lane == 0) smem[warp] = static_cast<double>(v);
  __syncthreads();
  v = lane < W ? static_cast<A>(smem[lane]) : identity<A>(k);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = combine(k, v, __shfl_xor_sync(0xffffffffu, v, o));
  __syncthreads();
  return v;
}

// Visits x[0..n) with `threads` threads (the block's, or a warp's for a pack member; this one is `tid`): a scalar
// head up to 16-byte alignment and a scalar tail go through elem(T&), the 16-byte vectors between them through
// vec(uint4&), kUnroll loads in flight per thread. kWrite: what the visitors change is stored back.
// The index arithmetic (which thread visits which element or vector) is visit_parts (common/launch.h), swept on
// the host by the CPU tests for every misalignment of every element size.
// x is in global memory (gradients, parameters): said so because a pointer read from a device launch table (not
// from the kernel's parameters) otherwise leaves the compiler issuing generic loads and stores (ld.v4, not
// ld.global.v4; tests/test_cuda_host.py reads the PTX of every kernel variant for ld.global.v4).
template <bool kWrite, typename T, typename Elem, typename Vec>
__device__ __forceinline__ void visit_chunk(T* x, int64_t n, int tid, int threads, Elem elem, Vec vec) {
  __builtin_assume(__isGlobal(x));
  const ChunkParts c = chunk_parts(reinterpret_cast<uintptr_t>(x), n, int(sizeof(T)));
  uint4* v = reinterpret_cast<uint4*>(x + c.head);
  auto scalar = [&](int64_t j) {
    T e = x[j];
    elem(e);
    if (kWrite) x[j] = e;
  };
  auto group = [&](int64_t i) {
    uint4 r[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) r[u] = v[i + u * threads];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      vec(r[u]);
      if (kWrite) v[i + u * threads] = r[u];
    }
  };
  auto one = [&](int64_t i) {
    uint4 r = v[i];
    vec(r);
    if (kWrite) v[i] = r;
  };
  visit_parts<kUnroll>(c, tid, threads, scalar, group, one);
}

// g(T&) applied to each of the V elements packed in a 16-byte vector.
template <typename T, typename G>
__device__ __forceinline__ void each_in_vec(uint4& r, G g) {
  T e[kVec<T>];
  memcpy(e, &r, 16);
#pragma unroll
  for (int j = 0; j < kVec<T>; ++j) g(e[j]);
  memcpy(&r, e, 16);
}

// This thread's share of one chunk's partial.
template <NormKind K, typename T>
__device__ __forceinline__ typename Acc<T>::type thread_partial(const T* x, int64_t n, typename Acc<T>::type p,
                                                                int tid, int threads) {
  using A = typename Acc<T>::type;
  A acc = identity<A>(K);
  auto one = [&](T& e) { acc = accumulate<K>(acc, widen(e), p); };
  visit_chunk<false>(const_cast<T*>(x), n, tid, threads, one, [&](uint4& r) { each_in_vec<T>(r, one); });
  return acc;
}

// x[i] = f(x[i]) over one chunk with `threads` threads (this one `tid`), in the accumulation type, 16 bytes at a time.
template <typename T, typename F>
__device__ __forceinline__ void map_chunk_t(T* x, int64_t n, int tid, int threads, F f) {
  auto one = [&](T& e) { e = T(f(widen(e))); };
  visit_chunk<true>(x, n, tid, threads, one, [&](uint4& r) { each_in_vec<T>(r, one); });
}

}  // namespace
}  // namespace gradclip
