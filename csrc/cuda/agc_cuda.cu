// CUDA kernel of unit-wise adaptive gradient clipping (AGC): one launch per table of tensors, one block per unit.
//
// A unit is a slice of a gradient along its unit axis (the whole tensor for one dimension or none; common/plan.h,
// UnitShape): `outer` segments of `inner` contiguous elements, `units * inner` elements apart. Each block finds its
// tensor (a binary search over the table's first-unit indices), reduces the parameter's and the gradient's unit norms
// (per-thread partials over the segments in order, 16-byte vector loads where aligned, then a fixed-order block
// reduction), computes the unit's coefficient (common/arith.h, agc_coef, in the gradient's accumulation type), and,
// where that is not 1, scales the gradient's unit while it is likely still in L1/L2. Units are independent, so a set
// larger than one table takes several launches with no ordering between them, and the result does not depend on how
// the set is cut. Deterministic: fixed thread count and reduction order.
//
// Decision: the table travels in the kernel parameters (like the clip kernels' tables), not in device memory, so a
// call needs no host-to-device copy and is capturable in a CUDA graph. A very long unit (a one-dimensional tensor of
// millions of elements) is reduced by one block; for the parameter sets AGC is used on (convolution and linear
// weights, whose units are rows of at most a few thousand elements) a block per unit keeps every SM busy. Units of
// one element per segment (unit_axis=-1 on a linear weight: inner = 1) leave all but one thread idle; to revisit with
// a GPU profile.
#include "cuda/clip_cuda.h"

#include "cuda/device.cuh"
#include "common/plan.h"
#include "common/policy.h"

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <climits>
#include <utility>
#include <vector>

namespace gradclip {
namespace {

struct AgcSlot {
  void* grad;
  const void* param;
  int64_t outer, units, inner;
  int64_t unit_base;  // the tensor's first unit in its launch
  uint32_t gdt, pdt;  // DType codes
};

struct AgcHeader {
  int32_t n_tensors;
  int32_t pad;
};

template <int N>
struct AgcTable {
  AgcHeader h;
  AgcSlot slots[N];
};

struct AgcArgs {
  double p, clip_factor, eps;
};

static_assert(sizeof(AgcSlot) == 56 && sizeof(AgcSlot) % 8 == 0, "AgcSlot layout");
constexpr int kAgcLargeSlots = 560;  // 31,392 bytes of parameters: drivers of CUDA 12.1 and newer
constexpr int kAgcSmallSlots = 64;   // 3,616 bytes: older drivers
static_assert(param_bytes<AgcTable<kAgcLargeSlots>, AgcArgs>() <= kMaxParamBytes, "AGC table over 32,764 bytes");
static_assert(param_bytes<AgcTable<kAgcSmallSlots>, AgcArgs>() <= kMaxParamBytesOldDriver, "AGC table over 4 KB");

// Blocks of 256 threads, at least 3 per SM (85 registers a thread): units are a few thousand elements (a block of 512
// would leave most threads a vector or two), and at 2 blocks of 512 (64 registers) ptxas spilled 8-24 bytes in every
// kernel but general p (sm_80 and sm_90, nvcc 13.0; tests/test_cuda_host.py holds the limits).
constexpr int kAgcThreads = 256;
constexpr int kAgcWarps = kAgcThreads / 32;
constexpr int kAgcMinBlocks = 3;

// The p-norm of unit u of a tensor of dtype T; every thread of the block gets it.
template <NormKind K, typename T>
__device__ __forceinline__ double unit_norm_t(const T* x, const AgcSlot& s, int64_t u, double p, double* smem) {
  using A = typename Acc<T>::type;
  const A pa = static_cast<A>(p);
  A acc = identity<A>(K);
  for (int64_t o = 0; o < s.outer; ++o)
    acc = combine(K, acc,
                  thread_partial<K>(x + (o * s.units + u) * s.inner, s.inner, pa, int(threadIdx.x), kAgcThreads));
  return finalize(K, static_cast<double>(block_combine<kAgcWarps>(K, acc, smem)), p);
}

template <NormKind K>
__device__ __forceinline__ double unit_norm(const void* x, DType dt, const AgcSlot& s, int64_t u, double p,
                                            double* smem) {
  switch (dt) {
    case DType::F32: return unit_norm_t<K>(static_cast<const float*>(x), s, u, p, smem);
    case DType::F16: return unit_norm_t<K>(static_cast<const c10::Half*>(x), s, u, p, smem);
    case DType::BF16: return unit_norm_t<K>(static_cast<const c10::BFloat16*>(x), s, u, p, smem);
    default: return unit_norm_t<K>(static_cast<const double*>(x), s, u, p, smem);
  }
}

// Scales unit u of the gradient (dtype T) by the unit's coefficient, unless it is 1.
template <typename T>
__device__ __forceinline__ void scale_unit(T* x, const AgcSlot& s, int64_t u, double pn, double gn, const AgcArgs& a) {
  using A = typename Acc<T>::type;
  const A c = agc_coef<A>(static_cast<A>(pn), static_cast<A>(gn), a.clip_factor, a.eps);
  if (c == A(1)) return;
  for (int64_t o = 0; o < s.outer; ++o)
    map_chunk_t(x + (o * s.units + u) * s.inner, s.inner, int(threadIdx.x), kAgcThreads, [c](A v) { return v * c; });
}

template <NormKind K, int N>
__global__ void __launch_bounds__(kAgcThreads, kAgcMinBlocks)
    agc_kernel(const __grid_constant__ AgcTable<N> tab, const AgcArgs a) {
  __shared__ double smem[kAgcWarps];
  const int64_t k = blockIdx.x;
  int32_t lo = 0, hi = tab.h.n_tensors - 1;  // the last slot whose first unit is at most k
  while (lo < hi) {
    const int32_t mid = (lo + hi + 1) / 2;
    if (tab.slots[mid].unit_base <= k) lo = mid;
    else hi = mid - 1;
  }
  const AgcSlot& s = tab.slots[lo];
  const int64_t u = k - s.unit_base;
  const double pn = unit_norm<K>(s.param, static_cast<DType>(s.pdt), s, u, a.p, smem);
  const double gn = unit_norm<K>(s.grad, static_cast<DType>(s.gdt), s, u, a.p, smem);
  switch (static_cast<DType>(s.gdt)) {
    case DType::F32: return scale_unit(static_cast<float*>(s.grad), s, u, pn, gn, a);
    case DType::F16: return scale_unit(static_cast<c10::Half*>(s.grad), s, u, pn, gn, a);
    case DType::BF16: return scale_unit(static_cast<c10::BFloat16*>(s.grad), s, u, pn, gn, a);
    default: return scale_unit(static_cast<double*>(s.grad), s, u, pn, gn, a);
  }
}

template <int N>
const void* agc_fn(NormKind k) {
  switch (k) {
    case NormKind::L2: return reinterpret_cast<const void*>(agc_kernel<NormKind::L2, N>);
    case NormKind::L1: return reinterpret_cast<const void*>(agc_kernel<NormKind::L1, N>);
    case NormKind::Inf: return reinterpret_cast<const void*>(agc_kernel<NormKind::Inf, N>);
    case NormKind::NegInf: return reinterpret_cast<const void*>(agc_kernel<NormKind::NegInf, N>);
    case NormKind::L0: return reinterpret_cast<const void*>(agc_kernel<NormKind::L0, N>);
    default: return reinterpret_cast<const void*>(agc_kernel<NormKind::General, N>);
  }
}

// Launches the AGC kernel over `slots` in tables of N, each launch starting a new unit count.
template <int N>
void launch_agc(std::vector<AgcSlot>& slots, const AgcArgs& args, NormKind kind, cudaStream_t stream) {
  const void* fn = agc_fn<N>(kind);
  size_t i = 0;
  while (i < slots.size()) {
    AgcTable<N> tab{};
    int64_t units = 0;
    int32_t n = 0;
    while (i < slots.size() && n < N && units + slots[i].units <= INT_MAX) {
      tab.slots[n] = slots[i];
      tab.slots[n].unit_base = units;
      units += slots[i].units;
      ++n;
      ++i;
    }
    tab.h.n_tensors = n;
    AgcArgs a = args;
    void* kargs[] = {&tab, &a};
    C10_CUDA_CHECK(cudaLaunchKernel(fn, dim3(static_cast<unsigned int>(units)), dim3(kAgcThreads), kargs, 0, stream));
  }
}

}  // namespace

void adaptive_clip_grad_cuda(at::TensorList grads, at::TensorList params, double clip_factor, double eps, double p,
                             int64_t unit_axis) {
  AgcInputs in = prepare_agc(grads, params, unit_axis);
  if (in.items.empty()) return;
  c10::cuda::CUDAGuard guard(grads[0].device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(grads[0].device().index()).stream();
  std::vector<AgcSlot> slots;
  for (const auto& it : in.items)
    slots.push_back({it.grad.data_ptr(), it.param.data_ptr(), it.shape.outer, it.shape.units, it.shape.inner, 0,
                     static_cast<uint32_t>(dtype_of(it.grad.scalar_type())),
                     static_cast<uint32_t>(dtype_of(it.param.scalar_type()))});
  const AgcArgs args{p, clip_factor, eps};
  if (driver_version() >= kLargeParamsDriver) launch_agc<kAgcLargeSlots>(slots, args, norm_kind(p), stream);
  else launch_agc<kAgcSmallSlots>(slots, args, norm_kind(p), stream);
  finish_agc(in);
  bump_versions(grads);
}

}  // namespace gradclip
