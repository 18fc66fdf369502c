#include "plan.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <sstream>

namespace gradclip {

DType dtype_of(at::ScalarType st) {
  switch (st) {
    case at::kFloat: return DType::F32;
    case at::kHalf: return DType::F16;
    case at::kBFloat16: return DType::BF16;
    case at::kDouble: return DType::F64;
    default: break;
  }
  // torch.linalg.vector_norm's wording for integer input; complex is refused by name.
  TORCH_CHECK(at::isFloatingType(st) || at::isComplexType(st),
              "linalg.vector_norm: Expected a floating point or complex tensor as input. Got ", st);
  TORCH_CHECK_NOT_IMPLEMENTED(false, "gradclip_cuda: gradients of dtype ", st,
              " are not supported by the compiled kernels (float32, float16, bfloat16 and float64 are); "
              "use backend=\"torch\"");
}

static std::string format_p(double p) {
  std::ostringstream s;
  if (p == std::floor(p) && std::isfinite(p)) s << static_cast<int64_t>(p);
  else s << p;
  return s.str();
}

// Thousands of small tensors make this loop wait on memory: each tensor's TensorImpl and StorageImpl are cold cache
// lines (measured: two loads took 70% of make_plan's time over 5,000 tensors). Fetching ahead overlaps those misses:
// the TensorImpl kFar tensors ahead, and the StorageImpl of the one kNear ahead, whose TensorImpl has arrived.
static void prefetch_tensor(at::TensorList xs, size_t i) {
  constexpr size_t kNear = kPrefetchAhead / 2, kFar = kPrefetchAhead;
  if (i + kFar < xs.size()) {
    prefetch_lines(xs[i + kFar].unsafeGetTensorImpl(), sizeof(c10::TensorImpl));
  }
  if (i + kNear < xs.size()) {
    const c10::TensorImpl* impl = xs[i + kNear].unsafeGetTensorImpl();
    if (impl->unsafe_storage()) prefetch(impl->unsafe_storage().unsafeGetStorageImpl());
  }
}

Plan make_plan(at::TensorList xs, int64_t chunk_elems, const PlanCheck& check) {
  Plan plan;
  const size_t n = xs.size();
  TORCH_CHECK(n < size_t(INT32_MAX), "gradclip_cuda: too many tensors");
  const NormKind kind = norm_kind(check.p);
  const bool needs_nonempty = check.norm && (kind == NormKind::Inf || kind == NormKind::NegInf || check.p < 0);
  plan.tensors.reserve(n);
  plan.first_chunk.reserve(n + 1);
  // Building the plan writes nothing, so raising from inside this loop leaves every tensor untouched.
  for (size_t i = 0; i < n; ++i) {
    prefetch_tensor(xs, i);
    const at::Tensor& t = xs[i];
    TORCH_CHECK(t.defined(), "gradclip_cuda: tensor ", i, " is undefined");
    TORCH_CHECK(t.layout() == at::kStrided, "gradclip_cuda: gradient ", i, " has layout ", t.layout(),
                "; sparse gradients are not supported, call .to_dense() on them first");
    const DType dt = dtype_of(t.scalar_type());
    TORCH_CHECK(t.device() == xs[0].device(), "gradclip_cuda: all tensors must be on one device, got ",
                xs[0].device(), " and ", t.device(), " (the Python API groups tensors by device)");
    const int64_t numel = t.numel();
    TORCH_CHECK(!needs_nonempty || numel > 0, "linalg.vector_norm cannot compute the ", format_p(check.p),
                " norm on an empty tensor because the operation does not have an identity");
    void* data = t.data_ptr();
    if (!t.is_non_overlapping_and_dense()) {
      plan.copies.emplace_back(t, t.contiguous());
      data = plan.copies.back().second.data_ptr();
    }
    plan.any_f64 |= dt == DType::F64;
    plan.result_dtype = i == 0 ? t.scalar_type() : c10::promoteTypes(plan.result_dtype, t.scalar_type());
    plan.tensors.push_back({data, numel, dt});
    plan.first_chunk.push_back(static_cast<int64_t>(plan.chunks.size()));
    for (int64_t b = 0; chunk_elems > 0 && b < numel; b += chunk_elems)
      plan.chunks.push_back({static_cast<int32_t>(i), b, std::min(chunk_elems, numel - b)});
    plan.total_elems += numel;
  }
  plan.first_chunk.push_back(static_cast<int64_t>(plan.chunks.size()));
  if (check.writes) prepare_writes(plan);
  return plan;
}

void prepare_writes(Plan& plan) {
  if (plan.writes) return;
  plan.skips = write_skips(plan.tensors);
  TORCH_CHECK(!plan.skips.overlap, "gradclip_cuda: two gradients share part of their memory (overlapping views, "
              "or views of one buffer with different dtypes); an in-place pass cannot change each element exactly "
              "once, so nothing was written. Pass each gradient once, or views that do not overlap.");
  plan.writes = true;
}

AgcCheck check_agc(at::TensorList grads, at::TensorList params, int64_t unit_axis) {
  TORCH_CHECK(grads.size() == params.size(), "gradclip_cuda: adaptive_clip_grad_ takes one parameter per gradient, got ",
              grads.size(), " gradients and ", params.size(), " parameters");
  AgcCheck out;
  std::vector<std::pair<uintptr_t, uintptr_t>> spans;  // [first byte, past the last byte) of each gradient
  for (size_t i = 0; i < grads.size(); ++i) {
    const at::Tensor& g = grads[i];
    const at::Tensor& w = params[i];
    TORCH_CHECK(g.defined() && w.defined(), "gradclip_cuda: gradient or parameter ", i, " is undefined");
    TORCH_CHECK_NOT_IMPLEMENTED(g.layout() == at::kStrided && w.layout() == at::kStrided,
                                "gradclip_cuda: adaptive_clip_grad_ takes dense (strided) gradients and parameters "
                                "only; nothing was written");
    const DType gd = dtype_of(g.scalar_type());
    TORCH_CHECK(at::isFloatingType(w.scalar_type()), "gradclip_cuda: adaptive_clip_grad_ takes floating-point "
                "parameters, got ", w.scalar_type(), "; nothing was written");
    dtype_of(w.scalar_type());
    TORCH_CHECK(g.sizes() == w.sizes(), "gradclip_cuda: a gradient of shape ", g.sizes(),
                " belongs to a parameter of shape ", w.sizes(), "; nothing was written");
    TORCH_CHECK(g.device() == grads[0].device() && w.device() == g.device(), "gradclip_cuda: adaptive_clip_grad_ "
                "takes gradients and parameters on one device; nothing was written");
    const int64_t nd = g.dim();
    UnitShape s{1, 1, g.numel()};
    if (nd > 1) {
      TORCH_CHECK_INDEX(unit_axis >= -nd && unit_axis < nd, "gradclip_cuda: unit_axis ", unit_axis,
                        " is out of range for a gradient of ", nd, " dimensions");
      const int64_t a = unit_axis < 0 ? unit_axis + nd : unit_axis;
      s.units = g.size(a);
      s.outer = 1;
      for (int64_t d = 0; d < a; ++d) s.outer *= g.size(d);
      s.inner = 1;
      for (int64_t d = a + 1; d < nd; ++d) s.inner *= g.size(d);
    }
    TORCH_CHECK(s.units <= INT32_MAX, "gradclip_cuda: a gradient of more than 2^31 - 1 AGC units; nothing was "
                "written");
    out.shapes.push_back(s);
    if (g.numel() > 0) {  // the bytes from its first element to its last, gaps included
      int64_t last = 0;
      for (int64_t d = 0; d < nd; ++d) last += (g.size(d) - 1) * g.stride(d);
      const auto start = reinterpret_cast<uintptr_t>(g.data_ptr());
      spans.emplace_back(start, start + uintptr_t(last + 1) * g.element_size());
    }
    (void)gd;
  }
  std::sort(spans.begin(), spans.end());
  for (size_t i = 1; i < spans.size(); ++i)
    TORCH_CHECK(spans[i].first >= spans[i - 1].second, "gradclip_cuda: two gradients share memory (the same "
                "gradient twice, or views of one buffer, interleaved ones included); a unit-wise pass cannot scale "
                "shared elements consistently, so nothing was written");
  return out;
}

AgcInputs prepare_agc(at::TensorList grads, at::TensorList params, int64_t unit_axis) {
  const AgcCheck check = check_agc(grads, params, unit_axis);
  AgcInputs in;
  for (size_t i = 0; i < grads.size(); ++i) {
    if (grads[i].numel() == 0) continue;
    at::Tensor g = grads[i];
    if (!g.is_contiguous()) {
      in.back.emplace_back(g, g.contiguous());
      g = in.back.back().second;
    }
    in.items.push_back({g, params[i].contiguous(), check.shapes[i]});
  }
  return in;
}

void finish_agc(AgcInputs& in) {
  for (auto& [original, copy] : in.back) original.copy_(copy);
}

WriteSkips write_skips(const std::vector<TensorRef>& ts) {
  const size_t n = ts.size();
  WriteSkips w;
  if (n < 2) return w;
  auto begin = [&](size_t i) { return reinterpret_cast<uintptr_t>(ts[i].data); };
  auto end = [&](size_t i) { return begin(i) + uintptr_t(ts[i].numel) * dtype_size(ts[i].dtype); };
  // Nonempty tensors in address order (start ascending, then end descending, then list order): a tensor's container,
  // if it has one, comes before it.
  std::vector<int32_t> order;
  order.reserve(n);
  for (size_t i = 0; i < n; ++i)
    if (ts[i].numel > 0) order.push_back(static_cast<int32_t>(i));
  auto before = [&](int32_t a, int32_t b) {
    if (begin(a) != begin(b)) return begin(a) < begin(b);
    if (end(a) != end(b)) return end(a) > end(b);
    return a < b;
  };
  // The usual lists are already in increasing (or, gradients allocated by backward, decreasing) address order.
  bool up = true, down = true;
  for (size_t k = 1; k < order.size() && (up || down); ++k) {
    up &= end(order[k - 1]) <= begin(order[k]);
    down &= end(order[k]) <= begin(order[k - 1]);
  }
  if (up || down) return w;
  std::sort(order.begin(), order.end(), before);
  int32_t c = -1;  // the tensor whose memory holds the current run of overlapping tensors
  for (const int32_t i : order) {
    if (c < 0 || begin(i) >= end(c)) {
      c = i;
      continue;
    }
    const int es = dtype_size(ts[i].dtype);
    if (end(i) <= end(c) && ts[i].dtype == ts[c].dtype && (begin(i) - begin(c)) % es == 0) {
      if (w.skip.empty()) w.skip.assign(n, 0);
      w.skip[i] = 1;
      w.any = true;
    } else {
      w.overlap = true;
    }
  }
  return w;
}

void drop_repeated_tensors(Plan& plan) {
  if (!plan.skips.any) return;
  plan.chunks.erase(std::remove_if(plan.chunks.begin(), plan.chunks.end(),
                                   [&](const Chunk& c) { return plan.skips.skip[c.tensor] != 0; }),
                    plan.chunks.end());
}

void bump_versions(at::TensorList xs) {
  for (const auto& x : xs)
    if (!x.is_inference()) x.unsafeGetTensorImpl()->bump_version();
}

void finish_writes(Plan& plan) {
  for (auto& [original, copy] : plan.copies) original.copy_(copy);
}

}  // namespace gradclip
