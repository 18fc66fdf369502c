// CUDA kernels: multi-tensor norm (one launch), scale (one launch, nothing written when the coefficient is 1),
// clip-by-value, and a fused single-launch clip for sets that fit in L2.
//
// What is shared with the CPU kernels: the plan and its checks (common/plan.h), the launch tables and the chunk
// search (common/launch.h), and every per-element operation (common/arith.h). What is GPU-only is here: the block
// and warp reductions, the last-block ticket, the grid barrier, 16-byte vector access, and the host launchers.
//
// Determinism: each chunk's partial is reduced in a fixed order (per-thread strides, then a butterfly), by one
// block for a chunk of a larger tensor, or, for a pack of small tensors (launch.h), by one warp per member with the
// members' partials combined in member order; which of the two depends on the tensor's size alone. The total is a
// fixed-order reduction over all chunk partials. Neither depends on how the plan is cut into launches, nor on fused
// vs two-launch: the same tensors give bitwise the same norm.
#include "cuda/clip_cuda.h"

#include "cuda/device.cuh"
#include "common/launch.h"
#include "common/plan.h"
#include "common/policy.h"
#include "common/rules.h"
#include "cpu/clip_cpu.h"

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cooperative_groups.h>
#include <cuda_runtime.h>

#if CUDART_VERSION < 12010
#error "gradclip_cuda's CUDA kernels need CUDA 12.1 or newer (launch tables of up to 32 KB of kernel parameters)"
#endif

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <utility>

namespace gradclip {
namespace {

// Occupancy (__launch_bounds__ minimum blocks per SM), decided from `cuobjdump -res-usage` and the SASS of the sm_80
// and sm_90 builds (2026-11-29, nvcc 13.0). Before packs, the norm kernels of p = 2, 1, 0 took 42 registers (2 blocks
// of 512 per SM), and a minimum of 3 (40 registers) cost them no spill. With packs (a warp path beside the block
// path in every kernel), a minimum of 3 makes ptxas spill: norm p = 2 (4 stores / 7 loads, some inside the streaming
// loop), the fused kernels (14-28 / 35-64), scale (39 local accesses on sm_90) and clamp (9); a minimum of 4 (32
// registers) spills scale (16 / 41, a load inside a loop) and clamp (8 / 9). Spills inside the streaming loops cost
// more than a third block gains for kernels that already keep 4 x 16-byte loads in flight per thread, so every
// kernel keeps a minimum of 2 (64 registers, no spill; 50% occupancy, as before this decision). tests/test_cuda_host.py
// holds registers and stack frames (spills) to these limits. To revisit with a GPU profile (the benchmark).
constexpr int kNormMinBlocks = 2;
constexpr int kMapMinBlocks = 2;

// The last-block ticket of a norm is a counter word in the call's own scratch (NormArgs::ticket), zeroed by a
// cudaMemsetAsync on the call's stream (a memset node when captured into a graph) and advanced with atomicInc wrapping
// at gridDim.x - 1: the last block of a launch reads gridDim.x - 1 and leaves 0, ready for the call's next launch.
// No two calls, streams or graphs ever share one (a static array of slots would, once they outnumber it).

// One chunk's partial, reduced by the whole block (kBlock: every thread gets it) or by one warp (a pack member:
// every lane gets it). Both are fixed orders: a chunk's partial depends on the chunk alone.
template <NormKind K, bool kBlock, typename T>
__device__ __forceinline__ double chunk_partial_t(const ChunkRef& c, double p, double* smem) {
  using A = typename Acc<T>::type;
  const A pa = static_cast<A>(p);
  const T* x = static_cast<const T*>(c.data);
  if constexpr (kBlock)
    return static_cast<double>(block_combine(K, thread_partial<K>(x, c.size, pa, int(threadIdx.x), kThreads), smem));
  else
    return static_cast<double>(warp_combine(K, thread_partial<K>(x, c.size, pa, int(threadIdx.x & 31), 32)));
}

// One chunk's partial, in double (reduced in float, or double for double).
template <NormKind K, bool kBlock>
__device__ __forceinline__ double chunk_partial(const ChunkRef& c, double p, double* smem) {
  switch (c.dtype) {
    case DType::F32: return chunk_partial_t<K, kBlock, float>(c, p, smem);
    case DType::F16: return chunk_partial_t<K, kBlock, c10::Half>(c, p, smem);
    case DType::BF16: return chunk_partial_t<K, kBlock, c10::BFloat16>(c, p, smem);
    default: return chunk_partial_t<K, kBlock, double>(c, p, smem);
  }
}

// The partial of chunk k of a launch; every thread of the block gets it. A larger tensor's chunk is reduced by the
// block; a pack's members by a warp each (member partials stored to tensor_partials[slot] when it is given: they are
// the members' tensor partials), combined in warp order.
template <NormKind K>
__device__ double work_partial(const Slot* slots, int32_t n_tensors, int32_t k, double p, double* smem,
                               double* tensor_partials) {
  const int32_t owner = chunk_owner(slots, n_tensors, k);
  if (!slot_small(slots[owner], kCudaChunk))
    return chunk_partial<K, true>(owner_chunk(slots[owner], k, kCudaChunk), p, smem);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int32_t s = pack_member(slots, owner, k, warp, kCudaChunk);
  double part = identity<double>(K);
  if (s >= 0) {
    part = chunk_partial<K, false>(slot_chunk(slots[s]), p, smem);
    if (tensor_partials != nullptr && lane == 0) {
      tensor_partials[s] = part;
      __threadfence();  // visible device-wide before the block's ticket (the last block reads it)
    }
  }
  if (lane == 0) smem[warp] = part;
  __syncthreads();
  double acc = identity<double>(K);
  for (int w = 0; w < kWarps; ++w) acc = combine(K, acc, smem[w]);  // members first (warps 0 ..), then identities
  __syncthreads();  // smem is reused
  return acc;
}

__device__ __forceinline__ void scale_chunk(const ChunkRef& c, double coef, int tid, int threads) {
  const float m = static_cast<float>(coef);
  auto f = [m](float v) { return v * m; };
  switch (c.dtype) {
    case DType::F32: return map_chunk_t(static_cast<float*>(c.data), c.size, tid, threads, f);
    case DType::F16: return map_chunk_t(static_cast<c10::Half*>(c.data), c.size, tid, threads, f);
    case DType::BF16: return map_chunk_t(static_cast<c10::BFloat16*>(c.data), c.size, tid, threads, f);
    default:
      return map_chunk_t(static_cast<double*>(c.data), c.size, tid, threads, [coef](double v) { return v * coef; });
  }
}

__device__ __forceinline__ void clamp_chunk(const ChunkRef& c, double v, int tid, int threads) {
  const float lo = static_cast<float>(-v), hi = static_cast<float>(v);
  auto f = [lo, hi](float y) { return clamp_value(y, lo, hi); };
  switch (c.dtype) {
    case DType::F32: return map_chunk_t(static_cast<float*>(c.data), c.size, tid, threads, f);
    case DType::F16: return map_chunk_t(static_cast<c10::Half*>(c.data), c.size, tid, threads, f);
    case DType::BF16: return map_chunk_t(static_cast<c10::BFloat16*>(c.data), c.size, tid, threads, f);
    default:
      return map_chunk_t(static_cast<double*>(c.data), c.size, tid, threads,
                         [v](double y) { return clamp_value(y, -v, v); });
  }
}

// Applies f(chunk, slot, tid, threads) to what this thread takes of chunk k of a launch: with the whole block, a
// larger tensor's chunk; with its warp, one member of a pack (slot: the tensor's slot in the launch's table). Tensors
// flagged skip_writes are left alone.
template <typename F>
__device__ __forceinline__ void for_work(const Slot* slots, int32_t n_tensors, int32_t k, F f) {
  const int32_t owner = chunk_owner(slots, n_tensors, k);
  if (!slot_small(slots[owner], kCudaChunk)) {
    const ChunkRef c = owner_chunk(slots[owner], k, kCudaChunk);
    if (!c.skip_writes) f(c, owner, int(threadIdx.x), kThreads);
    return;
  }
  const int32_t s = pack_member(slots, owner, k, int(threadIdx.x >> 5), kCudaChunk);
  if (s >= 0 && !slot_skip_writes(slots[s])) f(slot_chunk(slots[s]), s, int(threadIdx.x & 31), 32);
}

__device__ __forceinline__ void store_as(void* out, DType dt, int64_t i, double v) {
  switch (dt) {
    case DType::F32: static_cast<float*>(out)[i] = static_cast<float>(v); break;
    case DType::F16: static_cast<c10::Half*>(out)[i] = c10::Half(static_cast<float>(v)); break;
    case DType::BF16: static_cast<c10::BFloat16*>(out)[i] = c10::BFloat16(static_cast<float>(v)); break;
    default: static_cast<double*>(out)[i] = v; break;
  }
}

__device__ __forceinline__ double load_as(const void* in, DType dt, int64_t i = 0) {
  switch (dt) {
    case DType::F32: return static_cast<const float*>(in)[i];
    case DType::F16: return static_cast<float>(static_cast<const c10::Half*>(in)[i]);
    case DType::BF16: return static_cast<float>(static_cast<const c10::BFloat16*>(in)[i]);
    default: return static_cast<const double*>(in)[i];
  }
}

// ---- kernels ----

struct NormArgs {
  double p;
  double* partials;         // plan-wide, one per chunk
  double* tensor_partials;  // plan-wide, one per tensor (when tensor_values)
  double* total_acc;        // the unrounded total, read by the scale pass of a clip
  void* total_out;          // 0-d, out_dtype
  void* per_tensor_out;     // one per tensor, out_dtype; nullptr when not asked for
  unsigned int* ticket;     // the call's last-block counter (zeroed by the launcher; unused by the fused kernel)
  int64_t plan_chunks;
  int32_t plan_tensors;
  DType out_dtype;
  bool tensor_values;       // combine partials per tensor (per-tensor norms asked for, or p = 0)
};

struct CoefArgs {
  const void* total;  // one value, or one per tensor of the plan (per_tensor), total_dtype
  double max_norm;
  double eps;
  DType total_dtype;
  bool f64;           // the coefficient in double (else float)
  bool per_tensor;    // tensor i of the plan takes total[i]
  bool direct;        // total holds the coefficients themselves (multi_tensor_mul_)
};

// Every kernel's parameters (its table and its other arguments, as the kernels below take them) fit what the driver
// accepts: 32,764 bytes from CUDA 12.1 on, and 4,096 for the small-table kernels (all an older driver gets:
// table_capacity).
template <typename T>
constexpr bool params_fit(size_t limit) {
  return param_bytes<T, NormArgs>() <= limit && param_bytes<T, CoefArgs>() <= limit &&
         param_bytes<T, double>() <= limit && param_bytes<T, NormArgs, double, double, bool>() <= limit;
}
static_assert(params_fit<Table<kLargeSlots>>(kMaxParamBytes), "a large-table kernel's parameters exceed 32,764 bytes");
static_assert(params_fit<Table<kSmallSlots>>(kMaxParamBytesOldDriver), "a small-table kernel's parameters exceed 4 KB");
static_assert(params_fit<DeviceTable>(kMaxParamBytesOldDriver), "a device-table kernel's parameters exceed 4 KB");

// The coefficient of the plan's tensor i (of every tensor unless per_tensor).
__device__ __forceinline__ double coefficient(const CoefArgs& c, int64_t i) {
  const double v = load_as(c.total, c.total_dtype, c.per_tensor ? i : 0);
  return c.direct ? v : coef_for(v, c.f64, c.max_norm, c.eps);
}

// The total over every chunk (or, for p = 0, every tensor) of the plan, in a fixed order; every thread gets it.
template <NormKind K>
__device__ double plan_total(const NormArgs& a, double* smem) {
  double acc = identity<double>(K);
  if constexpr (K == NormKind::L0) {
    for (int64_t t = threadIdx.x; t < a.plan_tensors; t += kThreads)
      acc += tensor_to_total(K, __ldcg(a.tensor_partials + t));
  } else {
    for (int64_t i = threadIdx.x; i < a.plan_chunks; i += kThreads) acc = combine(K, acc, __ldcg(a.partials + i));
  }
  return finalize(K, block_combine(K, acc, smem), a.p);
}

// Run by the last block of a launch: per-tensor values of this launch's tensors (a warp per tensor: a pack member's
// tensor partial was stored by the warp that reduced it, a larger tensor's combines its chunk partials), then, on
// the plan's last launch, the total.
template <NormKind K>
__device__ void finish_norm(const TableHeader& h, const Slot* slots, const NormArgs& a, double* smem) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (a.tensor_values) {
    for (int t = warp; t < h.n_tensors; t += kWarps) {
      double acc = identity<double>(K);
      const bool member = slot_small(slots[t], kCudaChunk);
      if (member) {
        acc = __ldcg(a.tensor_partials + h.tensor_base + t);
      } else {
        const double* first = a.partials + h.chunk_base + slot_first_chunk(slots[t]);
        const int64_t n = chunks_of(slot_numel(slots[t]), kCudaChunk);
        for (int64_t i = lane; i < n; i += 32) acc = combine(K, acc, __ldcg(first + i));
        acc = warp_combine(K, acc);
      }
      if (lane == 0) {
        if (!member) a.tensor_partials[h.tensor_base + t] = acc;
        if (a.per_tensor_out) store_as(a.per_tensor_out, a.out_dtype, h.tensor_base + t, finalize(K, acc, a.p));
      }
    }
    __syncthreads();
  }
  if (!h.last) return;
  const double total = plan_total<K>(a, smem);
  if (threadIdx.x == 0) {
    *a.total_acc = total;
    store_as(a.total_out, a.out_dtype, 0, total);
  }
}

// One block per chunk (a pack: a warp per member); the last block to finish (ticket) finishes the launch.
template <NormKind K, typename T>
__global__ void __launch_bounds__(kThreads, kNormMinBlocks)
    norm_kernel(const __grid_constant__ T tab, const NormArgs a) {
  __shared__ double smem[kWarps];
  __shared__ bool last_block;
  const int32_t k = static_cast<int32_t>(blockIdx.x);
  if (k < tab.h.n_chunks) {
    const double part = work_partial<K>(tab.slots, tab.h.n_tensors, k, a.p, smem,
                                        a.tensor_values ? a.tensor_partials + tab.h.tensor_base : nullptr);
    if (threadIdx.x == 0) a.partials[tab.h.chunk_base + k] = part;
  }
  if (threadIdx.x == 0) {
    __threadfence();  // this block's partial is visible device-wide before its ticket is
    // Wraps to 0 after the last block: the call's next launch finds the counter ready.
    last_block = atomicInc(a.ticket, gridDim.x - 1) == gridDim.x - 1;
  }
  __syncthreads();
  if (!last_block) return;
  __threadfence();  // every other block's partial (fenced before its ticket) is read after ours, from L2 (__ldcg)
  finish_norm<K>(tab.h, tab.slots, a, smem);
}

template <typename T>
__global__ void __launch_bounds__(kThreads, kMapMinBlocks)
    scale_kernel(const __grid_constant__ T tab, const CoefArgs c) {
  if (!c.per_tensor) {
    const double coef = coefficient(c, 0);
    if (coef == 1.0) return;  // nothing to write
    for_work(tab.slots, tab.h.n_tensors, static_cast<int32_t>(blockIdx.x),
             [coef](const ChunkRef& chunk, int32_t, int tid, int threads) { scale_chunk(chunk, coef, tid, threads); });
    return;
  }
  const int64_t base = tab.h.tensor_base;
  for_work(tab.slots, tab.h.n_tensors, static_cast<int32_t>(blockIdx.x),
           [&c, base](const ChunkRef& chunk, int32_t slot, int tid, int threads) {
             const double coef = coefficient(c, base + slot);  // the same for every thread of the block (or warp)
             if (coef != 1.0) scale_chunk(chunk, coef, tid, threads);
           });
}

// The clipping policies' step on one thread: the state stays on the device, the coefficient is written there.
__global__ void policy_step_kernel(double* state, const void* total, DType total_dtype, ClipPolicy policy,
                                   PolicyArgs a, void* coef, bool f64) {
  const double g = load_as(total, total_dtype);
  const double threshold = policy_step(state, policy, a, g);
  if (f64) *static_cast<double*>(coef) = policy_coef<double>(g, threshold, a.eps);
  else *static_cast<float*>(coef) = policy_coef<float>(static_cast<float>(g), threshold, a.eps);
}

template <typename T>
__global__ void __launch_bounds__(kThreads, kMapMinBlocks)
    clamp_kernel(const __grid_constant__ T tab, const double v) {
  for_work(tab.slots, tab.h.n_tensors, static_cast<int32_t>(blockIdx.x),
           [v](const ChunkRef& chunk, int32_t, int tid, int threads) { clamp_chunk(chunk, v, tid, threads); });
}

// The whole clip in one cooperative launch: each block reduces chunks (packs as in norm_kernel, so the partials are
// the two-launch path's) blockIdx.x, + gridDim.x, ...; the grid meets
// at a barrier; every block computes the same total from the partials, then scales the chunks it read, most recent
// first (they are the likeliest still in L2). Launched only when the grid is co-resident (cooperative launch).
template <NormKind K, typename T>
__global__ void __launch_bounds__(kThreads, kNormMinBlocks)
    fused_clip_kernel(const __grid_constant__ T tab, const NormArgs a, const double max_norm, const double eps,
                      const bool f64) {
  __shared__ double smem[kWarps];
  const int32_t n = tab.h.n_chunks, b = static_cast<int32_t>(blockIdx.x), g = static_cast<int32_t>(gridDim.x);
  for (int32_t k = b; k < n; k += g) {
    const double part = work_partial<K>(tab.slots, tab.h.n_tensors, k, a.p, smem, nullptr);
    if (threadIdx.x == 0) a.partials[k] = part;
  }
  cooperative_groups::this_grid().sync();
  const double total = plan_total<K>(a, smem);
  if (b == 0 && threadIdx.x == 0) {
    *a.total_acc = total;
    store_as(a.total_out, a.out_dtype, 0, total);
  }
  const double coef = coef_for(total, f64, max_norm, eps);
  if (coef == 1.0 || b >= n) return;
  for (int32_t k = b + (n - 1 - b) / g * g; k >= b; k -= g)
    for_work(tab.slots, tab.h.n_tensors, k,
             [coef](const ChunkRef& chunk, int32_t, int tid, int threads) { scale_chunk(chunk, coef, tid, threads); });
}

// ---- host side ----

thread_local CudaCallInfo t_info;

template <typename T>
const void* norm_fn(NormKind k) {
  switch (k) {
    case NormKind::L2: return reinterpret_cast<const void*>(norm_kernel<NormKind::L2, T>);
    case NormKind::L1: return reinterpret_cast<const void*>(norm_kernel<NormKind::L1, T>);
    case NormKind::Inf: return reinterpret_cast<const void*>(norm_kernel<NormKind::Inf, T>);
    case NormKind::NegInf: return reinterpret_cast<const void*>(norm_kernel<NormKind::NegInf, T>);
    case NormKind::L0: return reinterpret_cast<const void*>(norm_kernel<NormKind::L0, T>);
    default: return reinterpret_cast<const void*>(norm_kernel<NormKind::General, T>);
  }
}

template <typename T>
const void* fused_fn(NormKind k) {
  switch (k) {
    case NormKind::L2: return reinterpret_cast<const void*>(fused_clip_kernel<NormKind::L2, T>);
    case NormKind::L1: return reinterpret_cast<const void*>(fused_clip_kernel<NormKind::L1, T>);
    case NormKind::Inf: return reinterpret_cast<const void*>(fused_clip_kernel<NormKind::Inf, T>);
    case NormKind::NegInf: return reinterpret_cast<const void*>(fused_clip_kernel<NormKind::NegInf, T>);
    default: return reinterpret_cast<const void*>(fused_clip_kernel<NormKind::General, T>);  // never L0
  }
}

const void* pick(int capacity, const void* small, const void* large, const void* device) {
  return capacity == kSmallSlots ? small : capacity == kLargeSlots ? large : device;
}

struct DeviceInfo {
  int sms = 0;
  int64_t l2_bytes = 0;
  bool cooperative = false;
};

const DeviceInfo& device_info(int dev) {
  static std::mutex m;
  static std::map<int, DeviceInfo> cache;
  std::lock_guard<std::mutex> lock(m);
  auto it = cache.find(dev);
  if (it != cache.end()) return it->second;
  DeviceInfo d;
  int v = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&d.sms, cudaDevAttrMultiProcessorCount, dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrL2CacheSize, dev));
  d.l2_bytes = v;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrCooperativeLaunch, dev));
  d.cooperative = v != 0;
  return cache.emplace(dev, d).first->second;
}

// Resident blocks per SM of a kernel (for the cooperative grid), cached.
int blocks_per_sm(const void* fn, int dev) {
  static std::mutex m;
  static std::map<std::pair<const void*, int>, int> cache;
  std::lock_guard<std::mutex> lock(m);
  auto it = cache.find({fn, dev});
  if (it != cache.end()) return it->second;
  int nb = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&nb, fn, kThreads, 0));
  return cache.emplace(std::make_pair(fn, dev), nb).first->second;
}

// The driver's CUDA version (cudaDriverGetVersion), read once per process: below 12.1 kernel parameters are limited
// to 4 KB, so only the small table is launched (table_capacity).
}  // namespace

int driver_version() {
  static const int v = [] {
    int d = 0;
    C10_CUDA_CHECK(cudaDriverGetVersion(&d));
    return d;
  }();
  return v;
}

namespace {

// Devices on which an eager fused launch has succeeded (bit d for device d < 64): under graph capture the fused path
// is taken only there (take_fused).
std::atomic<uint64_t> g_eager_fused_ok{0};

bool eager_fused_ok(int dev) { return dev >= 0 && dev < 64 && ((g_eager_fused_ok.load() >> dev) & 1u); }

// The launch tables of a plan, built in the layout the kernels take (Table<capacity>, or DeviceTable for a set that
// would need several parameter tables: policy.h, use_device_table), cached per thread and reused while the tensors
// (data pointers, sizes, dtypes) are the ones of the last call, and, for a pass that writes, only if the cached
// tables carry the write-skip flags (tables built for a norm carry none; the norm kernels ignore the flags, so tables
// with them serve a norm too).
struct Launches {
  int device = -1;
  std::vector<TensorRef> key;
  int capacity = kSmallSlots;  // kSmallSlots, kLargeSlots, or kDeviceSlots
  bool skips = false;  // built with the plan's write-skip flags
  std::vector<std::vector<uint64_t>> tables;  // each: the bytes of one Table<capacity> (of one DeviceTable)
  int64_t plan_chunks = 0;
  int64_t bytes = 0;
  // Device tables: every launch's slots, uploaded once on `upload_stream`, which records `uploaded` after the copy.
  at::Tensor slots;
  cudaEvent_t uploaded = nullptr;
  cudaStream_t upload_stream = nullptr;
  bool upload_done = false;  // an eager call saw the copy complete: a capture may read the table
  bool captured = false;     // a captured graph reads the table: it is kept for the life of the process

  int32_t chunks(size_t i) const { return reinterpret_cast<const TableHeader*>(tables[i].data())->n_chunks; }
};

bool same_tensors(const std::vector<TensorRef>& a, const std::vector<TensorRef>& b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i)
    if (a[i].data != b[i].data || a[i].numel != b[i].numel || a[i].dtype != b[i].dtype) return false;
  return true;
}

template <typename T>
std::vector<uint64_t> table_words(const T& t) {
  static_assert(sizeof(T) % sizeof(uint64_t) == 0, "tables are 64-bit words");
  std::vector<uint64_t> words(sizeof(T) / sizeof(uint64_t), 0);
  std::memcpy(words.data(), &t, sizeof(T));
  return words;
}

template <int N>
std::vector<uint64_t> table_bytes(const LaunchSpec& l) {
  std::vector<uint64_t> words(sizeof(Table<N>) / sizeof(uint64_t), 0);
  auto* t = reinterpret_cast<Table<N>*>(words.data());
  t->h = l.h;
  std::copy(l.slots.begin(), l.slots.end(), t->slots);
  return words;
}

// Lets this thread make CUDA calls that a graph capture in global mode (torch's default) prohibits on every thread,
// for the guard's lifetime: an event query and the upload, which touch no capturing stream (torch's caching
// allocator does the same for its own queries).
struct RelaxedCapture {
  cudaStreamCaptureMode mode = cudaStreamCaptureModeRelaxed;
  RelaxedCapture() { C10_CUDA_CHECK(cudaThreadExchangeStreamCaptureMode(&mode)); }
  ~RelaxedCapture() { (void)cudaThreadExchangeStreamCaptureMode(&mode); }
  RelaxedCapture(const RelaxedCapture&) = delete;
  RelaxedCapture& operator=(const RelaxedCapture&) = delete;
};

// Drops a cached set's tables. Device slots a captured graph reads are kept for the life of the process, with their
// event; otherwise the event is destroyed (legal while its copy is pending), except during a capture.
void retire(Launches& L, bool capturing) {
  if (L.captured && L.slots.defined()) {
    static std::mutex m;
    static auto* kept = new std::vector<at::Tensor>();  // never destroyed: graphs may replay until exit
    std::lock_guard<std::mutex> lock(m);
    kept->push_back(L.slots);
  }
  if (L.uploaded != nullptr && !L.captured && !capturing) (void)cudaEventDestroy(L.uploaded);
  L = Launches();
}

// Fills L with the parameter tables (capacity slots each) of `specs`.
void fill_param_tables(Launches& L, const std::vector<LaunchSpec>& specs, int capacity) {
  L.capacity = capacity;
  L.tables.clear();
  for (const LaunchSpec& l : specs)
    L.tables.push_back(capacity == kSmallSlots ? table_bytes<kSmallSlots>(l) : table_bytes<kLargeSlots>(l));
}

// Fills L with device tables of `specs`: their slots copied to the device from pinned memory without blocking the
// host, on `stream`, which records L.uploaded after the copy.
void fill_device_tables(Launches& L, const std::vector<LaunchSpec>& specs, int dev, const c10::cuda::CUDAStream& stream) {
  RelaxedCapture relaxed;  // a pinned allocation may call cudaHostAlloc while another thread captures
  size_t n = 0;
  for (const LaunchSpec& l : specs) n += l.slots.size();
  const int64_t words = static_cast<int64_t>(std::max<size_t>(n, 1) * sizeof(Slot) / sizeof(uint64_t));
  at::Tensor host = at::empty({words}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  auto* out = reinterpret_cast<Slot*>(host.data_ptr<int64_t>());
  for (const LaunchSpec& l : specs) out = std::copy(l.slots.begin(), l.slots.end(), out);
  L.slots = at::empty({words}, at::TensorOptions().dtype(at::kLong).device(at::kCUDA, dev));
  L.slots.copy_(host, /*non_blocking=*/true);  // on the current stream, `stream`; torch keeps `host` until it is done
  C10_CUDA_CHECK(cudaEventCreateWithFlags(&L.uploaded, cudaEventDisableTiming));  // on `dev`, the current device
  C10_CUDA_CHECK(cudaEventRecord(L.uploaded, stream.stream()));
  L.upload_stream = stream.stream();
  L.capacity = kDeviceSlots;
  L.tables.clear();
  const auto* slots = reinterpret_cast<const Slot*>(L.slots.data_ptr<int64_t>());
  for (const LaunchSpec& l : specs) {
    L.tables.push_back(table_words(DeviceTable{l.h, slots}));
    slots += l.slots.size();
  }
}

// Whether a set's device tables may be read by this call (policy.h, read_device_table), and, eagerly on another
// stream than the upload's, that stream ordered after the copy and the slots marked as used on it.
bool device_tables_ready(Launches& L, const c10::cuda::CUDAStream& stream, bool capturing) {
  if (!L.upload_done) {
    RelaxedCapture relaxed;  // a query of uncaptured work: legal beside (and during) a capture in relaxed mode
    const cudaError_t e = cudaEventQuery(L.uploaded);
    if (e == cudaErrorNotReady) (void)cudaGetLastError();  // not an error: the copy is still queued
    else C10_CUDA_CHECK(e);
    L.upload_done = e == cudaSuccess;
  }
  if (!read_device_table(capturing, L.upload_done)) return false;
  if (capturing) {
    L.captured = true;
  } else if (stream.stream() != L.upload_stream) {
    if (!L.upload_done) C10_CUDA_CHECK(cudaStreamWaitEvent(stream.stream(), L.uploaded, 0));
    L.slots.record_stream(stream);
  }
  return true;
}

const Launches& launches_for(const Plan& plan, int dev, const c10::cuda::CUDAStream& stream, bool capturing) {
  // Heap objects never destroyed: a cached device tensor must not be freed at thread exit, after CUDA is torn down.
  thread_local Launches* const cache = new Launches();
  thread_local Launches* const params = new Launches();  // parameter tables of a set whose device table waits
  const char* small_env = std::getenv("GRADCLIP_CUDA_SMALL_TABLES");  // per call: tests cut a set with it
  const bool force_small = small_env != nullptr && std::strcmp(small_env, "1") == 0;
  const int capacity = table_capacity(static_cast<int64_t>(plan.tensors.size()), driver_version(), force_small);
  Launches& L = *cache;
  const bool same = plan.copies.empty() && L.device == dev && (L.skips || !plan.writes) &&
                    same_tensors(L.key, plan.tensors);
  if (same && L.capacity == capacity) {
    t_info.cached = true;
    return L;
  }
  if (same && L.capacity == kDeviceSlots && !force_small && device_tables_ready(L, stream, capturing)) {
    t_info.cached = true;
    return L;
  }
  const std::vector<char> no_skips;
  const auto build = [&](int cap) {
    return build_launches(plan.tensors, plan.writes ? plan.skips.skip : no_skips, kCudaChunk, cap);
  };
  std::vector<LaunchSpec> specs = build(capacity);
  const bool device_table = use_device_table(specs.size(), force_small, plan.copies.empty());
  // Built aside and moved in only once complete: an upload that throws leaves no table of another set reachable.
  Launches next;
  next.device = plan.copies.empty() ? dev : -1;  // tensors processed through copies: never reused
  next.key = plan.tensors;
  next.skips = plan.writes;
  if (device_table && !capturing) {  // a new set: uploaded now (under capture: its parameter tables, never cached)
    specs = build(static_cast<int>(std::min<size_t>(plan.tensors.size(), INT32_MAX)));
    fill_device_tables(next, specs, dev, stream);
  } else {
    fill_param_tables(next, specs, capacity);
  }
  next.plan_chunks = specs.back().h.chunk_base + specs.back().h.n_chunks;
  for (const TensorRef& t : plan.tensors) next.bytes += t.numel * dtype_size(t.dtype);
  // The parameter tables of a set whose device table this call may not read (or a set that would take one, under
  // capture) stand in for this call only; the cache keeps its device table.
  const bool stand_in = (same && L.capacity == kDeviceSlots) || (device_table && capturing);
  Launches& out = stand_in ? *params : L;
  if (&out == &L) retire(L, capturing);
  out = std::move(next);
  if (stand_in) out.device = -1;
  return out;
}

void launch(const void* fn, int32_t blocks, void** args, cudaStream_t stream) {
  C10_CUDA_CHECK(cudaLaunchKernel(fn, dim3(blocks > 0 ? blocks : 1), dim3(kThreads), args, 0, stream));
  t_info.launches += 1;
}

// Everything a call needs: the plan (checked; for a pass that writes, with its write skips, so partial overlaps raise
// before anything is written), its launch tables, the device, the stream, whether the stream is capturing a graph.
struct Call {
  c10::cuda::CUDAGuard guard;
  Plan plan;
  cudaStream_t stream;
  int dev;
  bool capturing;
  const Launches* launches;
  at::TensorOptions opts;

  static const at::Tensor& first(at::TensorList xs) {
    TORCH_CHECK(!xs.empty(), "gradclip_cuda: expected at least one tensor");
    return xs[0];
  }

  Call(at::TensorList xs, const PlanCheck& check)
      : guard(first(xs).device()), plan(make_plan(xs, 0, check)) {
    t_info = {};
    dev = xs[0].device().index();
    const c10::cuda::CUDAStream current = c10::cuda::getCurrentCUDAStream(dev);
    stream = current.stream();
    cudaStreamCaptureStatus cs = cudaStreamCaptureStatusNone;
    C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &cs));
    capturing = cs != cudaStreamCaptureStatusNone;
    launches = &launches_for(plan, dev, current, capturing);
    t_info.device_table = launches->capacity == kDeviceSlots;
    opts = at::TensorOptions().device(xs[0].device());
  }
};

// Launches fn once per launch table, with the table and `arg` as its parameters; tables without chunks are skipped
// unless `empty_too` (the norm's last launch writes the total even when there is nothing to reduce).
void launch_tables(const Call& c, const void* fn, void* arg, bool empty_too) {
  const Launches& L = *c.launches;
  for (size_t i = 0; i < L.tables.size(); ++i) {
    if (L.chunks(i) == 0 && !empty_too) continue;
    void* args[] = {const_cast<uint64_t*>(L.tables[i].data()), arg};
    launch(fn, L.chunks(i), args, c.stream);
  }
}

struct NormOut {
  at::Tensor total, per_tensor, scratch;
  double* total_acc;
};

// The outputs and scratch of a norm (chunk partials, tensor partials, the unrounded total, the ticket word), and its
// kernel arguments. The ticket word is zeroed by launch_norm only (the fused kernel takes no ticket).
NormArgs prepare_norm(const Call& c, double p, bool per_tensor, NormOut& o, bool tensor_partials = false) {
  const Launches& L = *c.launches;
  const int64_t nt = static_cast<int64_t>(c.plan.tensors.size());
  o.scratch = at::empty({L.plan_chunks + nt + 2}, c.opts.dtype(at::kDouble));
  o.total = at::empty({}, c.opts.dtype(c.plan.result_dtype));
  o.per_tensor = at::empty({per_tensor ? nt : 0}, c.opts.dtype(c.plan.result_dtype));
  double* s = o.scratch.data_ptr<double>();
  o.total_acc = s + L.plan_chunks + nt;
  return {p, s, s + L.plan_chunks, o.total_acc, o.total.data_ptr(), per_tensor ? o.per_tensor.data_ptr() : nullptr,
          reinterpret_cast<unsigned int*>(o.total_acc + 1), L.plan_chunks, static_cast<int32_t>(nt),
          dtype_of(c.plan.result_dtype), per_tensor || tensor_partials || norm_kind(p) == NormKind::L0};
}

// tensor_partials: every tensor's partial is combined into the scratch (o.scratch[plan_chunks, plan_chunks + nt)).
NormOut launch_norm(Call& c, double p, bool per_tensor, bool tensor_partials = false) {
  NormOut o;
  NormArgs a = prepare_norm(c, p, per_tensor, o, tensor_partials);
  C10_CUDA_CHECK(cudaMemsetAsync(a.ticket, 0, sizeof(unsigned int), c.stream));
  t_info.memsets += 1;
  const NormKind k = norm_kind(p);
  launch_tables(c, pick(c.launches->capacity, norm_fn<Table<kSmallSlots>>(k), norm_fn<Table<kLargeSlots>>(k),
                         norm_fn<DeviceTable>(k)), &a, true);
  return o;
}

void launch_scale(Call& c, CoefArgs coef) {
  launch_tables(c, pick(c.launches->capacity, reinterpret_cast<const void*>(scale_kernel<Table<kSmallSlots>>),
                        reinterpret_cast<const void*>(scale_kernel<Table<kLargeSlots>>),
                        reinterpret_cast<const void*>(scale_kernel<DeviceTable>)), &coef, false);
}

// The fused single launch, when take_fused says so and the grid fits the device.
bool try_fused(Call& c, double p, double max_norm, double eps, NormOut& o) {
  const Launches& L = *c.launches;
  const NormKind k = norm_kind(p);
  const DeviceInfo& d = device_info(c.dev);
  if (!take_fused(c.capturing, eager_fused_ok(c.dev), L.tables.size() == 1, L.bytes,
                  fused_max_bytes(d.l2_bytes, std::getenv("GRADCLIP_CUDA_FUSED_MAX_BYTES")), k == NormKind::L0,
                  d.cooperative))
    return false;
  const void* fn = pick(L.capacity, fused_fn<Table<kSmallSlots>>(k), fused_fn<Table<kLargeSlots>>(k),
                        fused_fn<DeviceTable>(k));
  const int resident = blocks_per_sm(fn, c.dev) * d.sms;
  if (resident <= 0) return false;
  NormArgs a = prepare_norm(c, p, false, o);
  bool f64 = c.plan.any_f64;
  void* args[] = {const_cast<uint64_t*>(L.tables[0].data()), &a, &max_norm, &eps, &f64};
  const int blocks = static_cast<int>(std::min<int64_t>(L.plan_chunks, resident));
  if (cudaLaunchCooperativeKernel(fn, dim3(blocks), dim3(kThreads), args, 0, c.stream) != cudaSuccess) {
    // Not co-schedulable after all (say, under MPS limits): two launches instead. Never reached under capture
    // unless an eager fused launch succeeded on this device before (take_fused).
    (void)cudaGetLastError();
    return false;
  }
  if (!c.capturing && c.dev >= 0 && c.dev < 64) g_eager_fused_ok.fetch_or(uint64_t(1) << c.dev);
  t_info.launches += 1;
  t_info.fused = true;
  return true;
}

}  // namespace

CudaCallInfo last_cuda_call() { return t_info; }

std::tuple<at::Tensor, at::Tensor> multi_tensor_norm_cuda(at::TensorList xs, double p, bool per_tensor) {
  Call c(xs, {true, p});
  NormOut o = launch_norm(c, p, per_tensor);
  return {o.total, o.per_tensor};
}

at::Tensor multi_tensor_partials_cuda(at::TensorList xs, double p) {
  Call c(xs, {true, p});
  NormOut o = launch_norm(c, p, false, true);
  return o.scratch.narrow(0, c.launches->plan_chunks, static_cast<int64_t>(xs.size()));
}

// A total or coefficient tensor (one value, or one per tensor) on the tensors' device, in a dtype the kernels read.
at::Tensor device_values(at::TensorList xs, const at::Tensor& v, const char* what) {
  TORCH_CHECK(v.numel() == 1 || v.numel() == static_cast<int64_t>(xs.size()), "gradclip_cuda: ", what,
              " must hold one value or one per tensor (", xs.size(), "), got ", v.numel());
  at::Tensor t = v.to(xs[0].device()).reshape({-1}).contiguous();  // no copy when it is there already
  const auto st = t.scalar_type();
  if (st != at::kFloat && st != at::kDouble && st != at::kHalf && st != at::kBFloat16) t = t.to(at::kDouble);
  return t;
}

void scale_with(at::TensorList xs, const at::Tensor& values, double max_norm, double eps, bool direct) {
  const at::Tensor t = device_values(xs, values, direct ? "coef" : "total_norm");
  Call c(xs, {false, 2.0, true});
  if (c.launches->plan_chunks == 0) return;
  const DType dt = dtype_of(t.scalar_type());
  launch_scale(c, {t.data_ptr(), max_norm, eps, dt, dt == DType::F64, t.numel() > 1, direct});
  finish_writes(c.plan);
  bump_versions(xs);
}

void multi_tensor_scale_cuda(at::TensorList xs, const at::Tensor& total, double max_norm, double eps) {
  scale_with(xs, total, max_norm, eps, false);
}

void multi_tensor_mul_cuda(at::TensorList xs, const at::Tensor& coef) { scale_with(xs, coef, 1.0, 0.0, true); }

at::Tensor clip_grad_norm_cuda(at::TensorList xs, double max_norm, double p, double eps) {
  Call c(xs, {true, p, true});
  NormOut o;
  if (!try_fused(c, p, max_norm, eps, o)) {
    o = launch_norm(c, p, false);
    if (c.launches->plan_chunks > 0)
      launch_scale(c, {o.total_acc, max_norm, eps, DType::F64, c.plan.any_f64, false, false});
  }
  finish_writes(c.plan);
  bump_versions(xs);
  return o.total;
}

void clip_grad_value_cuda(at::TensorList xs, double clip_value) {
  Call c(xs, {false, 2.0, true});
  launch_tables(c, pick(c.launches->capacity, reinterpret_cast<const void*>(clamp_kernel<Table<kSmallSlots>>),
                        reinterpret_cast<const void*>(clamp_kernel<Table<kLargeSlots>>),
                        reinterpret_cast<const void*>(clamp_kernel<DeviceTable>)), &clip_value, false);
  finish_writes(c.plan);
  bump_versions(xs);
}

at::Tensor clip_policy_step_cuda(const at::Tensor& state, const at::Tensor& total, int64_t policy,
                                 at::ArrayRef<double> args) {
  check_policy_state(state, total, policy, args);
  c10::cuda::CUDAGuard guard(state.device());
  at::Tensor t = total;
  if (t.scalar_type() != at::kFloat && t.scalar_type() != at::kDouble && t.scalar_type() != at::kHalf &&
      t.scalar_type() != at::kBFloat16)
    t = t.to(at::kDouble);
  const bool f64 = total.scalar_type() == at::kDouble;
  at::Tensor coef = at::empty({}, state.options().dtype(f64 ? at::kDouble : at::kFloat));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(state.device().index()).stream();
  policy_step_kernel<<<1, 1, 0, stream>>>(state.data_ptr<double>(), t.data_ptr(), dtype_of(t.scalar_type()),
                                          static_cast<ClipPolicy>(policy), policy_args(args.data()), coef.data_ptr(),
                                          f64);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  bump_versions({state});
  return coef;
}

}  // namespace gradclip
