// Launch tables: the plan cut into kernel launches whose whole chunk map travels by value in the kernel's
// parameters (no host-to-device copy per call, so CUDA-graph capture records everything a launch needs).
//
// A launch's table holds one 16-byte slot per tensor: its data pointer, dtype and a "do not write" flag in the first
// word, its element count and the launch-local index of its first chunk in the second. Block k of a launch finds
// its chunk by a binary search over the slots' first-chunk indices (locate_chunk); chunk j of a tensor covers
// elements [j * chunk_elems, min((j + 1) * chunk_elems, numel)). A plan spills into another launch only when a
// table is full (its slots, or 2^24 - 1 chunks); launches split on tensor boundaries.
//
// The builder is host C++ compiled into every build, so the CPU tests cover it (and locate_chunk, which the GPU
// runs) for every boundary: more tensors than a table holds, tensors over 2^31 elements, empty tensors, mixed dtypes.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "arith.h"

namespace gradclip {

enum class DType : uint8_t { F32 = 0, F16 = 1, BF16 = 2, F64 = 3 };

GC_HD int dtype_size(DType d) { return d == DType::F64 ? 8 : d == DType::F32 ? 4 : 2; }

struct TensorRef {
  void* data;     // first element of a dense, non-overlapping span of `numel` elements
  int64_t numel;
  DType dtype;
};

struct Slot {
  uint64_t a;  // bits 0-55: data pointer; 56-57: dtype; 58: skip writes (a repeat of an earlier tensor)
  uint64_t b;  // bits 0-39: numel; 40-63: launch-local index of the tensor's first chunk
};

constexpr int kPtrBits = 56;
constexpr int kNumelBits = 40;
constexpr int64_t kMaxLaunchChunks = (int64_t(1) << (64 - kNumelBits)) - 1;

GC_HD void* slot_data(const Slot& s) {
  return reinterpret_cast<void*>(static_cast<uintptr_t>(s.a & ((uint64_t(1) << kPtrBits) - 1)));
}
GC_HD DType slot_dtype(const Slot& s) { return static_cast<DType>((s.a >> kPtrBits) & 3); }
GC_HD bool slot_skip_writes(const Slot& s) { return ((s.a >> (kPtrBits + 2)) & 1) != 0; }
GC_HD int64_t slot_numel(const Slot& s) { return static_cast<int64_t>(s.b & ((uint64_t(1) << kNumelBits) - 1)); }
GC_HD int32_t slot_first_chunk(const Slot& s) { return static_cast<int32_t>(s.b >> kNumelBits); }

// The header of every launch table; the kernels take Table<N> (or DeviceTable) by value (__grid_constant__).
struct TableHeader {
  int64_t chunk_base;   // plan-wide index of this launch's first chunk (its partials' place in scratch)
  int32_t tensor_base;  // plan-wide index of its first tensor
  int32_t n_tensors;    // slots used
  int32_t n_chunks;     // chunks in this launch (blocks of a non-persistent launch)
  int32_t last;         // 1 on the plan's last launch, which finishes the total
};

template <int N>
struct Table {
  TableHeader h;
  Slot slots[N];
};

// A launch's table in device memory (sets that would need several parameter tables: one launch per pass instead;
// clip_cuda.cu, launches_for): its header by value, its slots through a pointer. The kernels are templates over the
// table type and read `tab.h` and `tab.slots` alike.
struct DeviceTable {
  TableHeader h;
  const Slot* slots;
};

// The layout the host writes and the kernels read: no padding the two sides could disagree on, 8-byte words.
static_assert(sizeof(Slot) == 16 && alignof(Slot) == 8, "a slot is two 64-bit words");
static_assert(sizeof(TableHeader) == 24 && sizeof(TableHeader) % 8 == 0, "the table header is three 64-bit words");
static_assert(sizeof(Table<1>) == sizeof(TableHeader) + sizeof(Slot), "no padding between header and slots");

// Table capacities: a small one (cheap to pass) and the largest that fits the 32,764 bytes of kernel parameters
// CUDA 12.1+ allows on Volta and newer, leaving room for the kernels' other arguments.
constexpr int kSmallSlots = 64;
constexpr int kLargeSlots = 2016;
static_assert(sizeof(Table<kLargeSlots>) <= 32764 - 256, "a launch table must fit the kernel parameters");
static_assert(sizeof(Table<kSmallSlots>) % 8 == 0 && sizeof(Table<kLargeSlots>) % 8 == 0, "tables are 64-bit words");

// The chunk size of the CUDA kernels (elements): one block reduces (or scales) one chunk. The partials of the chunks,
// and so the norm, depend on this constant and the tensors' sizes only, never on how the plan is cut into launches.
constexpr int64_t kCudaChunk = int64_t(1) << 16;

// Packs: a tensor of 1 .. chunk_elems / kPackTensors elements (4,096 for the kernels' chunk) is "small": one warp
// reduces (or scales) it whole, and up to kPackTensors consecutive small tensors form one chunk, a pack, that one
// block takes (a warp per tensor); any other tensor (empty, or larger) closes a pack. Packs are formed over the plan
// in order, whatever the capacity of the tables (at least kPackTensors; the kernels use 64 and 2,016), and a launch
// is cut only between packs: a small tensor's partial (its warp's, in a fixed order) and a pack's partial (its
// members' in member order) depend on the tensors alone, never on the launch split or on fused vs two launches. So
// 5,000 tensors of 256 elements take 313 blocks of 16 busy warps, not 5,000 blocks of which one warp in eight loads.
constexpr int kPackTensors = 16;  // a warp each: kCudaThreads / 32 (static_assert in clip_cuda.cu)

GC_HD int64_t pack_max_elems(int64_t chunk_elems) { return chunk_elems / kPackTensors; }
GC_HD bool slot_small(const Slot& s, int64_t chunk_elems) {
  const int64_t n = slot_numel(s);
  return n > 0 && n <= pack_max_elems(chunk_elems);
}

struct ChunkRef {
  void* data;     // the chunk's first element
  int64_t size;   // elements
  DType dtype;
  bool skip_writes;
};

// The owner of chunk k (0 <= k < header.n_chunks) of a launch: the last slot whose first chunk is <= k (an empty
// tensor owns no chunk and shares its first-chunk index with the next tensor, so the search passes over it; the
// members of a pack share its index, so the search ends on its last member).
GC_HD int32_t chunk_owner(const Slot* slots, int32_t n_tensors, int32_t k) {
  int32_t lo = 0, hi = n_tensors;  // invariant: slots[lo].first <= k < slots[hi].first (hi = n: past the end)
  while (hi - lo > 1) {
    const int32_t mid = (lo + hi) / 2;
    if (slot_first_chunk(slots[mid]) <= k) lo = mid;
    else hi = mid;
  }
  return lo;
}

// Member w (0 .. kPackTensors - 1, counted back from the last) of the pack that is chunk k, owned by slot `owner`
// (slot_small): its slot, or -1 when the pack has no member w.
GC_HD int32_t pack_member(const Slot* slots, int32_t owner, int32_t k, int w, int64_t chunk_elems) {
  const int32_t s = owner - w;
  return (s >= 0 && slot_first_chunk(slots[s]) == k && slot_small(slots[s], chunk_elems)) ? s : -1;
}

// The whole of the tensor in slot s, as a chunk (a pack member).
GC_HD ChunkRef slot_chunk(const Slot& s) {
  return {slot_data(s), slot_numel(s), slot_dtype(s), slot_skip_writes(s)};
}

// Chunk k of a launch owned by slot s, not a pack (s is not small): elements [j * chunk_elems, min((j + 1) *
// chunk_elems, numel)) of s, j = k - its first chunk.
GC_HD ChunkRef owner_chunk(const Slot& s, int32_t k, int64_t chunk_elems) {
  const int64_t begin = int64_t(k - slot_first_chunk(s)) * chunk_elems;
  const int64_t rest = slot_numel(s) - begin;
  const DType dt = slot_dtype(s);
  return {static_cast<char*>(slot_data(s)) + begin * dtype_size(dt), rest < chunk_elems ? rest : chunk_elems, dt,
          slot_skip_writes(s)};
}

GC_HD ChunkRef locate_chunk(const Slot* slots, int32_t n_tensors, int32_t k, int64_t chunk_elems) {
  return owner_chunk(slots[chunk_owner(slots, n_tensors, k)], k, chunk_elems);
}

GC_HD int64_t chunks_of(int64_t numel, int64_t chunk_elems) { return (numel + chunk_elems - 1) / chunk_elems; }

// ---- visiting one chunk, 16 bytes at a time ----
//
// A chunk of n elements of `elem_size` bytes at address `addr` (a multiple of elem_size, as every tensor's data is)
// is visited in three parts: `head` scalar elements up to the first 16-byte boundary, `vecs` 16-byte vectors of
// `per_vec` elements each (from element head on, so every vector access is 16-byte aligned), and `tail` scalar
// elements after them. head and tail are below per_vec (at most 7), so one scalar access per thread covers each.
struct ChunkParts {
  int64_t head;
  int64_t vecs;
  int64_t tail;
  int per_vec;
};

GC_HD ChunkParts chunk_parts(uintptr_t addr, int64_t n, int elem_size) {
  const int per_vec = 16 / elem_size;
  int64_t head = static_cast<int64_t>((16 - addr % 16) % 16) / elem_size;
  if (head > n) head = n;
  const int64_t vecs = (n - head) / per_vec;
  return {head, vecs, n - head - vecs * per_vec, per_vec};
}

// What thread `tid` of `threads` (>= 16 / elem_size) visits of a chunk split by chunk_parts: head element tid (if
// tid < head); vectors tid, tid + threads, ..., first in groups of U (group(i): vectors i, i + threads, ...,
// i + (U - 1) * threads, so U loads are in flight at once), then one at a time (one(i)); tail element tid (if tid <
// tail). scalar(j) takes an element index of the chunk, group and one a vector index (its first element is
// head + i * per_vec). The kernels (visit_chunk) and the CPU tests (bindings: chunk_visits) run this same code.
#ifdef __CUDACC__
#pragma nv_exec_check_disable
#endif
template <int U, typename Scalar, typename Group, typename One>
GC_HD void visit_parts(const ChunkParts& c, int tid, int threads, Scalar scalar, Group group, One one) {
  if (tid < c.head) scalar(static_cast<int64_t>(tid));
  int64_t i = tid;
  for (; i + int64_t(U - 1) * threads < c.vecs; i += int64_t(U) * threads) group(i);
  for (; i < c.vecs; i += threads) one(i);
  if (tid < c.tail) scalar(c.head + c.vecs * c.per_vec + tid);
}

// Threads per block of the CUDA kernels, and 16-byte loads in flight per thread (visit_parts' U).
constexpr int kCudaThreads = 512;
constexpr int kCudaUnroll = 4;

// Bytes of kernel parameters of these argument types, each at its alignment, in order (for static_asserts against
// the 32,764 bytes CUDA 12.1+ allows, and the 4,096 of older drivers).
constexpr size_t param_align_up(size_t x, size_t a) { return (x + a - 1) / a * a; }
template <typename... Args>
constexpr size_t param_bytes() {
  size_t off = 0;
  ((off = param_align_up(off, alignof(Args)) + sizeof(Args)), ...);
  return off;
}
constexpr size_t kMaxParamBytes = 32764;
constexpr size_t kMaxParamBytesOldDriver = 4096;

// One launch, as the host builds it.
struct LaunchSpec {
  TableHeader h;
  std::vector<Slot> slots;
};

// Cuts `tensors` into launches of at most `capacity` slots, small tensors packed (see kPackTensors; packs of at most
// min(kPackTensors, capacity) tensors, so that the builder's tests can use tiny capacities). `skip_writes` (empty, or
// one flag per tensor) marks repeats that an in-place pass must not write. Raises when a tensor has 2^40 elements or
// more, or more chunks than a launch holds.
std::vector<LaunchSpec> build_launches(const std::vector<TensorRef>& tensors, const std::vector<char>& skip_writes,
                                       int64_t chunk_elems, int capacity);

}  // namespace gradclip
