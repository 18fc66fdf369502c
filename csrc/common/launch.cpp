#include "launch.h"

#include <c10/util/Exception.h>

namespace gradclip {

std::vector<LaunchSpec> build_launches(const std::vector<TensorRef>& tensors, const std::vector<char>& skip_writes,
                                       int64_t chunk_elems, int capacity) {
  TORCH_CHECK(chunk_elems > 0 && capacity > 0, "gradclip_cuda: bad launch table parameters");
  std::vector<LaunchSpec> launches;
  int64_t plan_chunks = 0;
  auto open = [&](int32_t t) {
    LaunchSpec l{};
    l.h.chunk_base = plan_chunks;
    l.h.tensor_base = t;
    l.slots.reserve(std::min<size_t>(capacity, tensors.size() - t));
    launches.push_back(std::move(l));
  };
  open(0);
  for (size_t t = 0; t < tensors.size(); ++t) {
    const TensorRef& r = tensors[t];
    const auto ptr = reinterpret_cast<uintptr_t>(r.data);
    TORCH_CHECK(r.numel >= 0 && r.numel < (int64_t(1) << kNumelBits), "gradclip_cuda: tensor ", t, " has ", r.numel,
                " elements; the CUDA kernels take up to 2^40 per tensor");
    TORCH_CHECK((static_cast<uint64_t>(ptr) >> kPtrBits) == 0, "gradclip_cuda: a data pointer above 2^56");
    const int64_t n = chunks_of(r.numel, chunk_elems);
    TORCH_CHECK(n <= kMaxLaunchChunks, "gradclip_cuda: tensor ", t, " has more chunks than one launch holds");
    LaunchSpec* l = &launches.back();
    if (static_cast<int>(l->slots.size()) == capacity || l->h.n_chunks + n > kMaxLaunchChunks) {
      open(static_cast<int32_t>(t));
      l = &launches.back();
    }
    const bool skip = !skip_writes.empty() && skip_writes[t];
    const uint64_t a = static_cast<uint64_t>(ptr) | (uint64_t(r.dtype) << kPtrBits) |
                       (uint64_t(skip) << (kPtrBits + 2));
    const uint64_t b = static_cast<uint64_t>(r.numel) | (static_cast<uint64_t>(l->h.n_chunks) << kNumelBits);
    l->slots.push_back({a, b});
    l->h.n_tensors += 1;
    l->h.n_chunks += static_cast<int32_t>(n);
    plan_chunks += n;
  }
  launches.back().h.last = 1;
  return launches;
}

}  // namespace gradclip
