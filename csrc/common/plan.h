// The launch plan: which chunk of which tensor each worker (a CPU task, later a CUDA block) handles.
//
// Host C++ only, built once per call (or reused) and consumed by the CPU kernels and the CUDA launchers alike.
// Every tensor is split into chunks of at most `chunk_elems` elements; offsets are 64-bit throughout. Each tensor
// entry carries its dtype, so one pass covers a list with mixed fp32/fp16/bf16/fp64 tensors.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <cstdint>
#include <utility>
#include <vector>

#include "arith.h"
#include "launch.h"

namespace gradclip {

struct Chunk {
  int32_t tensor;  // index into Plan::tensors
  int64_t begin;   // element offset inside that tensor
  int64_t size;    // elements, 1 .. chunk_elems
};

// Which tensors an in-place pass must not write, and whether it may write at all. A tensor whose memory lies
// inside the memory of a tensor listed before it in address order, of the same dtype and at a whole-element offset
// (the same gradient listed twice, a view such as `base[:50]` beside `base`, a transposed view of a listed
// gradient), is skipped: the containing tensor's pass writes each of its elements once, with the same coefficient.
// Two tensors whose memory overlaps in any other way (partly, or with another dtype) set `overlap`: no order of
// writes scales each element once there, and make_plan refuses them for an in-place pass before anything runs.
// Tensors processed through copies have memory of their own and never overlap. O(n) when the tensors' spans are
// in increasing or decreasing address order, O(n log n) otherwise.
struct WriteSkips {
  std::vector<char> skip;  // one flag per tensor (empty: none skipped)
  bool any = false;        // some flag is set
  bool overlap = false;    // partly overlapping tensors: an in-place pass must refuse them
};
WriteSkips write_skips(const std::vector<TensorRef>& tensors);

struct Plan {
  std::vector<TensorRef> tensors;
  std::vector<Chunk> chunks;             // tensor order; a tensor's chunks are consecutive
  std::vector<int64_t> first_chunk;      // size tensors+1: tensor t owns chunks [first_chunk[t], first_chunk[t+1])
  int64_t total_elems = 0;
  bool any_f64 = false;
  at::ScalarType result_dtype = at::kFloat;  // torch's dtype for a total of these tensors: their promoted dtype
  // Tensors that are not dense and non-overlapping are processed through a contiguous copy (pairs: original,
  // copy), kept alive here; after a pass that wrote, finish_writes copies them back into the originals.
  std::vector<std::pair<at::Tensor, at::Tensor>> copies;
  bool writes = false;  // built for an in-place pass: `skips` computed (and no overlap)
  WriteSkips skips;
};

// What the caller needs checked while the plan is built, before anything is written.
struct PlanCheck {
  bool norm = false;            // the pass computes a norm of order p
  double p = 2.0;
  bool writes = false;          // an in-place pass follows: compute the write skips, refuse overlapping tensors
};

// Starts loading the cache line at p (a hint: no fault, no effect on results). Loops over thousands of small tensors
// wait on their cold metadata (Python objects, TensorImpl, StorageImpl); they fetch a few tensors ahead.
inline void prefetch(const void* p) {
#if defined(__GNUC__) && defined(__x86_64__)
  asm volatile("prefetcht0 %0" : : "m"(*static_cast<const char*>(p)));  // gcc 12 dropped __builtin_prefetch here
#else
  __builtin_prefetch(p);
#endif
}
inline void prefetch_lines(const void* p, size_t bytes) {
  for (size_t line = 0; line < bytes; line += 64) prefetch(static_cast<const char*>(p) + line);
}
constexpr size_t kPrefetchAhead = 8;

// Builds the plan for `xs` (at least one tensor); chunk_elems = 0 builds no chunk list (the CUDA launch tables
// derive chunks from the sizes). raises (torch's error type and, where torch has one, its wording) on a sparse,
// integer or complex tensor, on tensors on more than one device, and on an empty tensor when the norm of
// order p has no identity (inf, -inf, p < 0), and, for an in-place pass, on tensors whose memory overlaps partly
// (see WriteSkips). Nothing is written before these checks pass.
Plan make_plan(at::TensorList xs, int64_t chunk_elems, const PlanCheck& check);

// Makes a plan built without PlanCheck::writes ready for an in-place pass: computes its write skips and refuses
// partly overlapping tensors (the check make_plan runs when asked), before anything is written. Idempotent.
void prepare_writes(Plan& plan);

// Copies written results back into the non-dense tensors the plan processed through copies.
void finish_writes(Plan& plan);

// For the CPU passes that write, after any norm pass over the same plan: drops the chunks of skipped tensors.
void drop_repeated_tensors(Plan& plan);

// The chunk size the CPU kernels use (elements). A chunk's partial is accumulated in 16 lanes, so the summation
// order inside a chunk, and the order chunks combine in, are fixed by the plan alone: the norm does not depend
// on the number of threads.
constexpr int64_t kCpuChunk = int64_t(1) << 16;

// AGC's view of a gradient (and its parameter) in contiguous element order: element i belongs to unit
// (i / inner) % units; tensors of at most one dimension are one unit (outer = units = 1).
struct UnitShape {
  int64_t outer, units, inner;
};

struct AgcCheck {
  std::vector<UnitShape> shapes;  // one per gradient
};

// The checks of an AGC pass over the whole list, before anything is written (torch's error types): one parameter
// per gradient, of its shape, on one device; floating-point dense gradients and parameters; unit_axis in range;
// gradients that share no memory (a unit-wise pass cannot scale shared elements consistently).
AgcCheck check_agc(at::TensorList grads, at::TensorList params, int64_t unit_axis);

// What the AGC kernels take, after check_agc: each non-empty gradient and its parameter contiguous (copies where they
// are not; a gradient's copy is written back by finish_agc) with its unit shape.
struct AgcInputs {
  struct Item {
    at::Tensor grad, param;
    UnitShape shape;
  };
  std::vector<Item> items;
  std::vector<std::pair<at::Tensor, at::Tensor>> back;  // (gradient, its contiguous copy)
};
AgcInputs prepare_agc(at::TensorList grads, at::TensorList params, int64_t unit_axis);
void finish_agc(AgcInputs& in);

// The kernels' dtype code of a scalar type; raises (torch's wording for integers) on any other dtype.
DType dtype_of(at::ScalarType st);

// In-place writes through raw pointers: tell autograd the tensors changed, as an in-place torch op would.
void bump_versions(at::TensorList xs);

}  // namespace gradclip
