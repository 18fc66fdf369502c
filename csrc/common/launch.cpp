#include "launch.h"

#include <c10/util/Exception.h>

#include <algorithm>

namespace gradclip {

std::vector<LaunchSpec> build_launches(const std::vector<TensorRef>& tensors, const std::vector<char>& skip_writes,
                                       int64_t chunk_elems, int capacity) {
  TORCH_CHECK(chunk_elems > 0 && capacity > 0, "gradclip_cuda: bad launch table parameters");
  const size_t n = tensors.size();
  const int64_t small_max = pack_max_elems(chunk_elems);
  auto small = [&](size_t t) { return tensors[t].numel > 0 && tensors[t].numel <= small_max; };

  // The packs, over the whole plan in order (independent of where launches are cut): pack[t] is the number of
  // tensors of the pack that tensor t opens, 0 for a tensor that joins the pack before it or is not small.
  const int pack_cap = std::min(kPackTensors, capacity);
  std::vector<int> pack(n, 0);
  for (size_t t = 0, opener = 0; t < n; ++t) {
    if (!small(t)) continue;
    if (t > 0 && small(t - 1) && pack[opener] < pack_cap) {
      pack[opener] += 1;  // joins the pack of the small tensor before it
    } else {
      opener = t;
      pack[t] = 1;
    }
  }

  std::vector<LaunchSpec> launches;
  int64_t plan_chunks = 0;
  auto open = [&](int32_t t) {
    LaunchSpec l{};
    l.h.chunk_base = plan_chunks;
    l.h.tensor_base = t;
    l.slots.reserve(std::min<size_t>(capacity, n - t));
    launches.push_back(std::move(l));
  };
  open(0);
  for (size_t t = 0; t < n; ++t) {
    const TensorRef& r = tensors[t];
    const auto ptr = reinterpret_cast<uintptr_t>(r.data);
    TORCH_CHECK(r.numel >= 0 && r.numel < (int64_t(1) << kNumelBits), "gradclip_cuda: tensor ", t, " has ", r.numel,
                " elements; the CUDA kernels take up to 2^40 per tensor");
    TORCH_CHECK((static_cast<uint64_t>(ptr) >> kPtrBits) == 0, "gradclip_cuda: a data pointer above 2^56");
    const bool joins = small(t) && pack[t] == 0;
    // chunks this tensor adds: a pack's one (by its first member), a larger tensor's, none for an empty one
    const int64_t add = small(t) ? (joins ? 0 : 1) : chunks_of(r.numel, chunk_elems);
    TORCH_CHECK(add <= kMaxLaunchChunks, "gradclip_cuda: tensor ", t, " has more chunks than one launch holds");
    LaunchSpec* l = &launches.back();
    // Cut only between packs: a pack's members all go to the launch of its first.
    const int need = small(t) ? pack[t] : 1;
    if (!joins && !l->slots.empty() &&
        (static_cast<int>(l->slots.size()) + need > capacity || l->h.n_chunks + add > kMaxLaunchChunks)) {
      open(static_cast<int32_t>(t));
      l = &launches.back();
    }
    const bool skip = !skip_writes.empty() && skip_writes[t];
    const int64_t first = joins ? l->h.n_chunks - 1 : l->h.n_chunks;  // members share their pack's index
    const uint64_t a = static_cast<uint64_t>(ptr) | (uint64_t(r.dtype) << kPtrBits) |
                       (uint64_t(skip) << (kPtrBits + 2));
    const uint64_t b = static_cast<uint64_t>(r.numel) | (static_cast<uint64_t>(first) << kNumelBits);
    l->slots.push_back({a, b});
    l->h.n_tensors += 1;
    l->h.n_chunks += static_cast<int32_t>(add);
    plan_chunks += add;
  }
  launches.back().h.last = 1;
  return launches;
}

}  // namespace gradclip
