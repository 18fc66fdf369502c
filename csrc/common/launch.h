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

// The header of every launch table; the kernels take Table<N> by value (__grid_constant__).
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

// Table capacities: a small one (cheap to pass) and the largest that fits the 32,764 bytes of kernel parameters
// CUDA 12.1+ allows on Volta and newer, leaving room for the kernels' other arguments.
constexpr int kSmallSlots = 64;
constexpr int kLargeSlots = 2016;
static_assert(sizeof(Table<kLargeSlots>) <= 32764 - 256, "a launch table must fit the kernel parameters");

// The chunk size of the CUDA kernels (elements): one block reduces (or scales) one chunk. The partials of the chunks,
// and so the norm, depend on this constant and the tensors' sizes only, never on how the plan is cut into launches.
constexpr int64_t kCudaChunk = int64_t(1) << 16;

struct ChunkRef {
  void* data;     // the chunk's first element
  int64_t size;   // elements
  DType dtype;
  bool skip_writes;
};

// Chunk k (0 <= k < header.n_chunks) of a launch: the last slot whose first chunk is <= k owns it (an empty tensor
// owns no chunk and shares its first-chunk index with the next tensor, so the search passes over it).
GC_HD ChunkRef locate_chunk(const Slot* slots, int32_t n_tensors, int32_t k, int64_t chunk_elems) {
  int32_t lo = 0, hi = n_tensors;  // invariant: slots[lo].first <= k < slots[hi].first (hi = n: past the end)
  while (hi - lo > 1) {
    const int32_t mid = (lo + hi) / 2;
    if (slot_first_chunk(slots[mid]) <= k) lo = mid;
    else hi = mid;
  }
  const Slot& s = slots[lo];
  const int64_t begin = int64_t(k - slot_first_chunk(s)) * chunk_elems;
  const int64_t rest = slot_numel(s) - begin;
  const DType dt = slot_dtype(s);
  return {static_cast<char*>(slot_data(s)) + begin * dtype_size(dt), rest < chunk_elems ? rest : chunk_elems, dt,
          slot_skip_writes(s)};
}

GC_HD int64_t chunks_of(int64_t numel, int64_t chunk_elems) { return (numel + chunk_elems - 1) / chunk_elems; }

// One launch, as the host builds it.
struct LaunchSpec {
  TableHeader h;
  std::vector<Slot> slots;
};

// Cuts `tensors` into launches of at most `capacity` slots. `skip_writes` (empty, or one flag per tensor) marks
// repeats that an in-place pass must not write. Raises when a tensor has 2^40 elements or more, or more chunks
// than a launch holds.
std::vector<LaunchSpec> build_launches(const std::vector<TensorRef>& tensors, const std::vector<char>& skip_writes,
                                       int64_t chunk_elems, int capacity);

}  // namespace gradclip
