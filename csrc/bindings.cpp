// The Python module gradclip_cuda._C: build information, registration of the compiled kernels against the op
// schemas that gradclip_cuda/_ops.py defines, and the CPU fast path that reads `.grad` in C++.
#include <torch/extension.h>
#include <torch/library.h>
#include <torch/version.h>
#include <torch/csrc/autograd/python_variable.h>
#include <structmember.h>

#include <cmath>
#include <cstring>
#include <memory>
#include <optional>
#include <utility>
#include <vector>
#include <string>

#include "common/launch.h"
#include "common/plan.h"
#include "common/policy.h"
#include "cpu/clip_cpu.h"
#ifdef GRADCLIP_WITH_CUDA
#include <cuda_runtime_api.h>

#include "cuda/clip_cuda.h"
#endif

namespace py = pybind11;

namespace gradclip {
namespace {

std::unique_ptr<torch::Library> g_cpu_lib, g_cuda_lib;

// Registered on request (after _ops.py has checked that this library was built for the running torch), never
// from a static initialiser: a mismatched build must not put its kernels in the dispatcher.
void register_kernels() {
  if (g_cpu_lib) return;
  g_cpu_lib = std::make_unique<torch::Library>(torch::Library::IMPL, "gradclip_cuda", c10::DispatchKey::CPU,
                                               __FILE__, __LINE__);
  g_cpu_lib->impl("multi_tensor_norm", TORCH_FN(multi_tensor_norm_cpu));
  g_cpu_lib->impl("multi_tensor_scale_", TORCH_FN(multi_tensor_scale_cpu));
  g_cpu_lib->impl("multi_tensor_mul_", TORCH_FN(multi_tensor_mul_cpu));
  g_cpu_lib->impl("clip_grad_norm_", TORCH_FN(clip_grad_norm_cpu));
  g_cpu_lib->impl("clip_grad_value_", TORCH_FN(clip_grad_value_cpu));
  g_cpu_lib->impl("adaptive_clip_grad_", TORCH_FN(adaptive_clip_grad_cpu));
  g_cpu_lib->impl("clip_policy_step_", TORCH_FN(clip_policy_step_cpu));
#ifdef GRADCLIP_WITH_CUDA
  g_cuda_lib = std::make_unique<torch::Library>(torch::Library::IMPL, "gradclip_cuda", c10::DispatchKey::CUDA,
                                                __FILE__, __LINE__);
  g_cuda_lib->impl("multi_tensor_norm", TORCH_FN(multi_tensor_norm_cuda));
  g_cuda_lib->impl("multi_tensor_scale_", TORCH_FN(multi_tensor_scale_cuda));
  g_cuda_lib->impl("multi_tensor_mul_", TORCH_FN(multi_tensor_mul_cuda));
  g_cuda_lib->impl("clip_grad_norm_", TORCH_FN(clip_grad_norm_cuda));
  g_cuda_lib->impl("clip_grad_value_", TORCH_FN(clip_grad_value_cuda));
  g_cuda_lib->impl("adaptive_clip_grad_", TORCH_FN(adaptive_clip_grad_cuda));
  g_cuda_lib->impl("clip_policy_step_", TORCH_FN(clip_policy_step_cuda));
#endif
}

py::dict build_info() {
  py::dict d;
  d["torch"] = std::string(TORCH_VERSION);
#ifdef GRADCLIP_WITH_CUDA
  d["cuda"] = std::to_string(CUDART_VERSION / 1000) + "." + std::to_string(CUDART_VERSION / 10 % 100);
#else
  d["cuda"] = py::none();
#endif
  return d;
}

enum class FastOp : int { Norm = 0, Scale = 1, Clip = 2, Value = 3, NormEach = 4, Partials = 5 };

// The compiled kernels of one device type, for the fast path.
struct Kernels {
  std::tuple<at::Tensor, at::Tensor> (*norm)(at::TensorList, double, bool);
  void (*scale)(at::TensorList, const at::Tensor&, double, double);
  at::Tensor (*clip)(at::TensorList, double, double, double);
  void (*value)(at::TensorList, double);
  at::Tensor (*partials)(at::TensorList, double);
};
constexpr Kernels kCpuKernels{multi_tensor_norm_cpu, multi_tensor_scale_cpu, clip_grad_norm_cpu, clip_grad_value_cpu,
                              multi_tensor_partials_cpu};
#ifdef GRADCLIP_WITH_CUDA
constexpr Kernels kCudaKernels{multi_tensor_norm_cuda, multi_tensor_scale_cuda, clip_grad_norm_cuda,
                               clip_grad_value_cuda, multi_tensor_partials_cuda};
#endif

// A tensor the compiled kernels take as it is, on `device` (the first tensor's device when it is undefined).
bool plain_tensor(const at::Tensor& t, c10::Device& device) {
  const auto st = t.scalar_type();
  if (device.type() == c10::DeviceType::Meta) device = t.device();  // the first tensor
#ifdef GRADCLIP_WITH_CUDA
  const bool compiled_device = t.device().is_cpu() || t.device().is_cuda();
#else
  const bool compiled_device = t.device().is_cpu();
#endif
  return compiled_device && t.device() == device && t.layout() == at::kStrided &&
         (st == at::kFloat || st == at::kHalf || st == at::kBFloat16 || st == at::kDouble) &&
         !t.key_set().has(c10::DispatchKey::Python) && !t.key_set().has_any(c10::python_ks);
}

// Whether o is a tensor (torch.Tensor or a subclass), by its type's MRO: THPVariable_Check goes through the tensor
// metaclass's __instancecheck__ for subclasses (a Python call: DTensor parameters).
bool is_tensor(PyObject* o) {
  return PyType_IsSubtype(Py_TYPE(o), reinterpret_cast<PyTypeObject*>(THPVariableClass));
}

// The tensors of a Python list, held for one call without touching their reference counts. Taking a count on a
// tensor that has a Python object, and dropping it, costs a GIL round trip in torch's bookkeeping of that object
// (about 0.1 us a tensor: a third of the host time of a CPU pass over thousands of small tensors). The Python
// objects the caller passed own the tensors meanwhile, which is safe while this thread holds the GIL: no other
// thread can drop a `.grad`. `owned()` gives counted references for a pass that releases the GIL.
class Borrowed {
 public:
  explicit Borrowed(size_t n) { ts_.reserve(n); }
  // The tensors of a list or tuple (`what` names the caller in the errors).
  Borrowed(py::handle seq, const char* what) {
    TORCH_CHECK(PyList_Check(seq.ptr()) || PyTuple_Check(seq.ptr()), what, " takes a list or tuple of tensors");
    const Py_ssize_t n = PySequence_Fast_GET_SIZE(seq.ptr());
    PyObject** items = PySequence_Fast_ITEMS(seq.ptr());
    // Every element checked before any is borrowed: a constructor that throws runs no destructor, and the vector
    // would then drop references it never took.
    for (Py_ssize_t i = 0; i < n; ++i) {
      if (i + kPrefetchAhead < size_t(n)) prefetch(items[i + kPrefetchAhead]);
      TORCH_CHECK_TYPE(is_tensor(items[i]), what, ": element ", i, " is not a tensor");
    }
    ts_.reserve(n);
    for (Py_ssize_t i = 0; i < n; ++i) add(THPVariable_Unpack(items[i]));
  }
  Borrowed(const Borrowed&) = delete;
  Borrowed& operator=(const Borrowed&) = delete;
  ~Borrowed() {
    for (auto& t : ts_) c10::MaybeOwnedTraits<at::Tensor>::destroyBorrow(t);
  }
  void add(const at::Tensor& t) { ts_.push_back(c10::MaybeOwnedTraits<at::Tensor>::createBorrow(t)); }
  bool empty() const { return ts_.empty(); }
  at::TensorList list() const { return ts_; }
  std::vector<at::Tensor> owned() const { return {ts_.begin(), ts_.end()}; }

 private:
  std::vector<at::Tensor> ts_;
};

// A pass over at least this many elements releases the GIL (taking counted references first): on a CPU it runs for
// a millisecond or more. Shorter passes keep it, and the borrowed references.
constexpr int64_t kReleaseGilElems = int64_t(1) << 22;


// The device of `seq` (a list or tuple of tensors) when every tensor is one the compiled kernels take as it is
// (plain_tensor: a CPU or CUDA tensor, strided, float32/float16/bfloat16/float64, not a subclass), all on one device;
// else None. Lets the Python layer skip its per-tensor checks and device grouping for such a list.
py::object plain_device(py::handle seq) {
  if (!PyList_Check(seq.ptr()) && !PyTuple_Check(seq.ptr())) return py::none();
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(seq.ptr());
  PyObject** items = PySequence_Fast_ITEMS(seq.ptr());
  c10::Device device(c10::DeviceType::Meta);
  for (Py_ssize_t i = 0; i < n; ++i) {
    if (!is_tensor(items[i])) return py::none();
    if (!plain_tensor(THPVariable_Unpack(items[i]), device)) return py::none();
  }
  if (n == 0) return py::none();
  return py::cast(device);
}

// torch's dtype for a total norm of the tensors of `seq` (a list or tuple): their promoted dtype, its real
// counterpart for complex; None when an element is not a tensor or the list is empty.
py::object result_dtype(py::handle seq) {
  if (!PyList_Check(seq.ptr()) && !PyTuple_Check(seq.ptr())) return py::none();
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(seq.ptr());
  PyObject** items = PySequence_Fast_ITEMS(seq.ptr());
  if (n == 0) return py::none();
  at::ScalarType st = at::ScalarType::Undefined;
  for (Py_ssize_t i = 0; i < n; ++i) {
    if (!is_tensor(items[i])) return py::none();
    const at::ScalarType t = THPVariable_Unpack(items[i]).scalar_type();
    st = i == 0 ? t : c10::promoteTypes(st, t);
  }
  return py::cast(c10::toRealValueType(st));
}

// Whether any element of `seq` (a list or tuple) is an instance of the type `cls` (a C loop over the types: a
// Python any(isinstance(...)) costs 0.3 us an element).
bool any_instance(py::handle seq, py::handle cls) {
  TORCH_CHECK(PyList_Check(seq.ptr()) || PyTuple_Check(seq.ptr()), "any_instance takes a list or tuple");
  TORCH_CHECK_TYPE(PyType_Check(cls.ptr()), "any_instance takes a type");
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(seq.ptr());
  PyObject** items = PySequence_Fast_ITEMS(seq.ptr());
  auto* type = reinterpret_cast<PyTypeObject*>(cls.ptr());
  for (Py_ssize_t i = 0; i < n; ++i) {
    if (i + kPrefetchAhead < size_t(n)) prefetch(items[i + kPrefetchAhead]);
    if (PyType_IsSubtype(Py_TYPE(items[i]), type)) return true;
  }
  return false;
}

// The `.grad` of each parameter of `seq` (a list or tuple of tensors), Nones left out, read in C++: for tensor
// subclasses (DTensor parameters) Python's `.grad` goes through the subclass's attribute machinery, microseconds a
// parameter. None when an element is not a tensor.
// Reading a parameter's `.grad` chases four cold pointers (its Python object, its TensorImpl, its autograd metadata,
// the gradient's TensorImpl, whose Python object is then looked up): perf put 60% of a pass over 5,000 parameters
// on those loads. Each stage fetches the next link of a parameter further ahead, so the misses overlap.
void prefetch_grad_chain(PyObject* const* items, Py_ssize_t n, Py_ssize_t i) {
  constexpr Py_ssize_t kStage = 6;  // parameters between stages
  if (i + 4 * kStage < n) prefetch(items[i + 4 * kStage]);
  if (i + 3 * kStage < n && is_tensor(items[i + 3 * kStage]))
    prefetch_lines(THPVariable_Unpack(items[i + 3 * kStage]).unsafeGetTensorImpl(), sizeof(c10::TensorImpl));
  if (i + 2 * kStage < n && is_tensor(items[i + 2 * kStage]))
    if (const auto* meta = THPVariable_Unpack(items[i + 2 * kStage]).unsafeGetTensorImpl()->autograd_meta())
      prefetch_lines(meta, 192);
  if (i + kStage < n && is_tensor(items[i + kStage])) {
    const at::Tensor& g = THPVariable_Unpack(items[i + kStage]).grad();
    if (g.defined()) prefetch_lines(g.unsafeGetTensorImpl(), sizeof(c10::TensorImpl));
  }
}

py::object grads_of(py::handle seq) {
  if (!PyList_Check(seq.ptr()) && !PyTuple_Check(seq.ptr())) return py::none();
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(seq.ptr());
  PyObject** items = PySequence_Fast_ITEMS(seq.ptr());
  py::list out;
  for (Py_ssize_t i = 0; i < n; ++i) {
    prefetch_grad_chain(items, n, i);
    if (!is_tensor(items[i])) return py::none();
    const at::Tensor& g = THPVariable_Unpack(items[i]).grad();
    if (g.defined()) out.append(py::reinterpret_steal<py::object>(THPVariable_Wrap(g)));
  }
  return out;
}

// DTensor gradients read in one C++ pass (gradclip_cuda/distributed.py): `seq` a list or tuple of tensors (None
// skipped), or of parameters when `from_params` (their `.grad` read here, undefined ones skipped, with the prefetching
// of grads_of); each DTensor (an instance of `dtensor_cls`) is read as its local shard (`_local_tensor`) and the
// (mesh, placements) of its spec (`_spec`), a plain tensor as itself. Returns (local tensors grouped by their
// (mesh, placements), stable; runs: [(unique index, count)] in that order; uniques: [(mesh, placements)], with
// (None, None) for plain tensors; the one device of the local tensors when every one is a tensor the compiled
// kernels take as it is (plain_tensor), else None; torch's dtype of their total norm (result_dtype), None when there
// are none; whether any gradient is a DTensor), or None when an element is neither a tensor nor None. One pass: the
// device and dtype checks read each local TensorImpl while it is in cache (three later passes over thousands of cold
// TensorImpls cost more than the reading itself). Placements are compared by identity first, then by equality (==),
// with the (mesh, placements) of the previous DTensor tried first: the gradients of a model share a handful.
// The byte offset at which instances of `type` hold attribute `name`, when generic attribute lookup reads it from an
// object slot (a __slots__ member), else -1.
Py_ssize_t member_offset(PyTypeObject* type, PyObject* name) {
  if (type->tp_getattro != PyObject_GenericGetAttr) return -1;
  PyObject* d = _PyType_Lookup(type, name);  // borrowed
  if (d == nullptr || Py_TYPE(d) != &PyMemberDescr_Type) return -1;
  const PyMemberDef* member = reinterpret_cast<PyMemberDescrObject*>(d)->d_member;
  return member->type == T_OBJECT_EX && !(member->flags & READ_RESTRICTED) ? member->offset : -1;
}

py::object dtensor_locals(py::handle seq, py::handle dtensor_cls, bool from_params) {
  if (!PyList_Check(seq.ptr()) && !PyTuple_Check(seq.ptr())) return py::none();
  if (!PyType_Check(dtensor_cls.ptr())) return py::none();
  static PyObject* const s_local = PyUnicode_InternFromString("_local_tensor");
  static PyObject* const s_spec = PyUnicode_InternFromString("_spec");
  static PyObject* const s_mesh = PyUnicode_InternFromString("mesh");
  static PyObject* const s_placements = PyUnicode_InternFromString("placements");
  auto* const cls = reinterpret_cast<PyTypeObject*>(dtensor_cls.ptr());
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(seq.ptr());
  PyObject** items = PySequence_Fast_ITEMS(seq.ptr());
  // Staged passes, each chasing one cold pointer per gradient with the next ones prefetched (one pass chasing the
  // whole chain stalls on each link in turn): the gradients' Python objects; their local shards and specs; the
  // shards' TensorImpls.
  std::vector<py::object> grads;
  grads.reserve(n);
  for (Py_ssize_t i = 0; i < n; ++i) {
    if (from_params) {
      prefetch_grad_chain(items, n, i);
      if (!is_tensor(items[i])) return py::none();
      const at::Tensor& grad = THPVariable_Unpack(items[i]).grad();
      if (grad.defined()) {
        grads.push_back(py::reinterpret_steal<py::object>(THPVariable_Wrap(grad)));
        if (!grads.back()) throw py::error_already_set();
      }
    } else if (items[i] != Py_None) {
      grads.push_back(py::reinterpret_borrow<py::object>(items[i]));
    }
  }
  const size_t m = grads.size();
  // Counted references: reading a spec's mesh and comparing placements may run Python code, which could rebind a
  // DTensor's slots. Read straight from the instance where the attribute is a __slots__ member of the DTensor class
  // itself (what generic attribute lookup would read), else through getattr.
  std::vector<py::object> locals_(m), specs_(m);  // specs_[i] null: a plain tensor
  const Py_ssize_t local_at = member_offset(cls, s_local), spec_at = member_offset(cls, s_spec);
  bool any_dt = false;
  auto attr = [&](PyObject* g, Py_ssize_t offset, PyObject* name) {
    if (offset >= 0 && Py_TYPE(g) == cls)
      if (PyObject* v = *reinterpret_cast<PyObject**>(reinterpret_cast<char*>(g) + offset))
        return py::reinterpret_borrow<py::object>(v);
    auto v = py::reinterpret_steal<py::object>(PyObject_GetAttr(g, name));
    if (!v) throw py::error_already_set();
    return v;
  };
  for (size_t i = 0; i < m; ++i) {
    if (i + kPrefetchAhead < m) prefetch_lines(grads[i + kPrefetchAhead].ptr(), 160);  // header and slots
    PyObject* g = grads[i].ptr();
    if (!is_tensor(g)) return py::none();
    if (PyType_IsSubtype(Py_TYPE(g), cls)) {
      any_dt = true;
      locals_[i] = attr(g, local_at, s_local);
      specs_[i] = attr(g, spec_at, s_spec);
      if (!is_tensor(locals_[i].ptr())) return py::none();
    } else {
      locals_[i] = grads[i];
    }
  }
  std::vector<std::pair<py::object, py::object>> uniques;  // (mesh, placements); (None, None): plain tensors
  std::vector<std::vector<PyObject*>> members;
  std::vector<std::pair<PyObject*, int>> seen;  // specs seen (the gradients of a model share a few), and their slot
  int plain = -1, last = -1;
  bool all_plain = true;
  c10::Device device(c10::DeviceType::Meta);
  at::ScalarType st = at::ScalarType::Undefined;
  for (size_t i = 0; i < m; ++i) {
    if (i + 2 * kPrefetchAhead < m) prefetch(locals_[i + 2 * kPrefetchAhead].ptr());
    if (i + kPrefetchAhead < m)
      prefetch_lines(THPVariable_Unpack(locals_[i + kPrefetchAhead].ptr()).unsafeGetTensorImpl(),
                     sizeof(c10::TensorImpl));
    int slot = -1;
    PyObject* spec = specs_[i].ptr();
    if (spec != nullptr) {
      for (const auto& [sp, j] : seen)
        if (sp == spec) slot = j;
      if (slot < 0) {
        py::object mesh = py::reinterpret_steal<py::object>(PyObject_GetAttr(spec, s_mesh));
        py::object pl = py::reinterpret_steal<py::object>(PyObject_GetAttr(spec, s_placements));
        if (!mesh || !pl) throw py::error_already_set();
        auto same = [&](int j) {
          if (j < 0 || j == plain || uniques[j].first.ptr() != mesh.ptr()) return false;
          if (uniques[j].second.ptr() == pl.ptr()) return true;
          const int eq = PyObject_RichCompareBool(uniques[j].second.ptr(), pl.ptr(), Py_EQ);
          if (eq < 0) throw py::error_already_set();
          return eq == 1;
        };
        if (same(last)) slot = last;
        for (int j = 0; slot < 0 && j < static_cast<int>(uniques.size()); ++j)
          if (same(j)) slot = j;
        if (slot < 0) {
          slot = static_cast<int>(uniques.size());
          uniques.emplace_back(mesh, pl);
          members.emplace_back();
        }
        // A bounded list (specs_ holds them): the gradients of a model share a handful of specs.
        if (seen.size() < 16) seen.emplace_back(spec, slot);
      }
      last = slot;
    } else {
      if (plain < 0) {
        plain = static_cast<int>(uniques.size());
        uniques.emplace_back(py::none(), py::none());
        members.emplace_back();
      }
      slot = plain;
    }
    const at::Tensor& t = THPVariable_Unpack(locals_[i].ptr());
    if (all_plain) all_plain = plain_tensor(t, device);
    st = st == at::ScalarType::Undefined ? t.scalar_type() : c10::promoteTypes(st, t.scalar_type());
    members[slot].push_back(locals_[i].ptr());  // held by locals_
  }
  py::list locals(m), runs, uniq;
  size_t pos = 0;
  for (size_t j = 0; j < uniques.size(); ++j) {
    for (PyObject* t : members[j]) {
      Py_INCREF(t);
      PyList_SET_ITEM(locals.ptr(), pos++, t);
    }
    runs.append(py::make_tuple(j, members[j].size()));
    uniq.append(py::make_tuple(uniques[j].first, uniques[j].second));
  }
  const bool empty = st == at::ScalarType::Undefined;
  return py::make_tuple(locals, runs, uniq, all_plain && !empty ? py::cast(device) : py::none(),
                        empty ? py::none() : py::cast(c10::toRealValueType(st)), any_dt);
}

// The local shards of one distributed call (gradclip_cuda/distributed.py), held from its norm to its scale: the
// list is walked once for both and, on the CPU, one plan serves both passes. `seq`: the call's own list of local
// shards on `device` (from dtensor_locals, which found them plain; the plan's checks run all the same). The reference
// held on that list keeps every shard alive, so the shards are borrowed, and a CPU pass over kReleaseGilElems or more
// releases the GIL (as `fast` does) without counted references: the list must not change while the set lives (the
// caller's list is private to one call). Between `partials` and `scale` the shards must keep their storage (the CPU
// plan holds their data pointers): within one clip nothing else touches them. The in-place pass's checks (partly
// overlapping shards) run in `scale`, after the collectives, as on CUDA, so that every rank joins them. CUDA passes
// only enqueue work: they keep the GIL. Finite p > 0 only (the per-key partials are sums).
class LocalSet {
 public:
  LocalSet(py::list seq, c10::Device device, bool writes)
      : seq_(std::move(seq)), ts_(seq_, "LocalSet"), device_(device), writes_(writes) {
    TORCH_CHECK(!ts_.empty(), "LocalSet takes at least one tensor");
    TORCH_CHECK(device.is_cpu()
#ifdef GRADCLIP_WITH_CUDA
                    || device.is_cuda()
#endif
                    , "LocalSet takes CPU or CUDA tensors, got ", device);
  }

  // Each key's sum of |x|^p over its shards: float64, one value per key, on the device. `runs`: (key, count) of
  // consecutive shards, covering the list.
  at::Tensor partials(double p, const std::vector<std::pair<int64_t, int64_t>>& runs, int64_t n_keys) {
    TORCH_CHECK(std::isfinite(p) && p > 0, "LocalSet: partials are sums for finite p > 0, got p = ", p);
    int64_t covered = 0;
    for (const auto& [k, count] : runs) {
      TORCH_CHECK(k >= 0 && k < n_keys && count >= 0, "LocalSet: bad run (", k, ", ", count, ")");
      covered += count;
    }
    TORCH_CHECK(covered == static_cast<int64_t>(ts_.list().size()), "LocalSet: runs cover ", covered, " of ",
                ts_.list().size(), " tensors");
    at::Tensor each;
    if (device_.is_cpu()) {
      const Plan& plan = cpu_plan(p);
      std::optional<py::gil_scoped_release> nogil;
      if (plan.total_elems >= kReleaseGilElems) nogil.emplace();
      each = partials_of_plan(plan, p);
    }
#ifdef GRADCLIP_WITH_CUDA
    else {
      each = multi_tensor_partials_cuda(ts_.list(), p);
    }
#endif
    if (n_keys == 1 && runs.size() == 1) return each.sum().reshape({1});
    std::vector<at::Tensor> per_key(n_keys);
    int64_t start = 0;
    for (const auto& [k, count] : runs) {
      const at::Tensor s = each.narrow(0, start, count).sum();
      per_key[k] = per_key[k].defined() ? per_key[k] + s : s;
      start += count;
    }
    for (at::Tensor& v : per_key)
      if (!v.defined()) v = at::zeros({}, each.options());
    return at::stack(per_key);
  }

  // The finalised total of `combined` (the reduced partial, one value): (the total, 0-d in `dtype` on the device;
  // the total the coefficient takes: float64 when `dtype` is, else float32). On the CPU from the value itself.
  std::pair<at::Tensor, at::Tensor> finish(const at::Tensor& combined, double p, at::ScalarType dtype) const {
    TORCH_CHECK(combined.numel() == 1, "LocalSet: finish takes one value, got ", combined.numel());
    const at::ScalarType acc = dtype == at::kDouble ? at::kDouble : at::kFloat;
    if (device_.is_cpu() && combined.is_cpu()) {
      const auto f64 = at::TensorOptions().dtype(at::kDouble);
      double v = combined.to(at::kDouble).item<double>();  // a CPU value: no device to wait for
      // sqrt is correctly rounded everywhere; other roots through torch's pow, as the general path takes them
      v = p == 1.0 ? v : p == 2.0 ? std::sqrt(v) : at::scalar_tensor(v, f64).pow(1.0 / p).item<double>();
      return {at::scalar_tensor(v, f64).to(dtype), at::scalar_tensor(v, f64).to(acc)};
    }
    at::Tensor t = combined.reshape({}).to(device_, at::kDouble);
    t = p == 1.0 ? t : p == 2.0 ? t.sqrt() : t.pow(1.0 / p);
    return {t.to(dtype), t.to(acc)};
  }

  // Scales every shard in place by min(max_norm / (total + eps), 1), as the scale op does.
  void scale(const at::Tensor& total, double max_norm, double eps) {
    TORCH_CHECK(writes_, "LocalSet: built for a read-only pass");
    if (device_.is_cpu()) {
      Plan& plan = cpu_plan(2.0);
      prepare_writes(plan);
      std::optional<py::gil_scoped_release> nogil;
      if (plan.total_elems >= kReleaseGilElems) nogil.emplace();
      scale_plan(plan, ts_.list(), total, max_norm, eps);
    }
#ifdef GRADCLIP_WITH_CUDA
    else {
      multi_tensor_scale_cuda(ts_.list(), total, max_norm, eps);
    }
#endif
  }

 private:
  // The CPU plan, built (with the GIL: it reads the tensors' metadata) on first use, for reading; p: the norm's order,
  // for the plan's checks. `scale` readies it for writing.
  Plan& cpu_plan(double p) {
    if (!plan_) plan_.emplace(make_plan(ts_.list(), kCpuChunk, {true, p}));
    return *plan_;
  }

  py::list seq_;
  Borrowed ts_;
  c10::Device device_;
  bool writes_;
  std::optional<Plan> plan_;
};

// The hot path of the drop-in API, with no Python loop over the tensors: `seq` is a list or tuple of parameters
// (grads_of: their `.grad`, Nones skipped) or of tensors, all on one device whose type is in `devices` (1: CPU,
// 2: CUDA). Returns None when the fast path does not apply (nothing to do, several devices, a device not asked for,
// a tensor subclass, an unsupported dtype or layout, a total on another device): the caller then takes the general
// path through the ops, which raises the proper errors. a, b: max_norm and p (clip), max_norm (scale), p (norm, and
// NormEach: the per-tensor norms; Partials: each tensor's un-finalised partial in float64), the clip value (value);
// eps: the coefficient's epsilon (scale, clip).
py::object fast(py::handle seq, bool grads_of, int devices, int op, double a, double b,
                std::optional<at::Tensor> total, double eps) {
  if (!PyList_Check(seq.ptr()) && !PyTuple_Check(seq.ptr())) return py::none();
  PyObject* fast = seq.ptr();
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
  PyObject** items = PySequence_Fast_ITEMS(fast);
  Borrowed ts(n);
  int64_t elems = 0;
  static PyObject* const parameter = py::object(py::module_::import("torch.nn").attr("Parameter")).release().ptr();
  c10::Device device(c10::DeviceType::Meta);
  for (Py_ssize_t i = 0; i < n; ++i) {
    if (i + kPrefetchAhead < size_t(n)) prefetch(items[i + kPrefetchAhead]);
    PyObject* o = items[i];
    // Exactly torch.Tensor or torch.nn.Parameter: a subclass may override `.grad` or dispatch.
    if (Py_TYPE(o) != reinterpret_cast<PyTypeObject*>(THPVariableClass) &&
        Py_TYPE(o) != reinterpret_cast<PyTypeObject*>(parameter))
      return py::none();
    const at::Tensor& v = THPVariable_Unpack(o);
    if (grads_of) {
      const at::Tensor& g = v.grad();
      if (!g.defined()) continue;
      if (!plain_tensor(g, device)) return py::none();
      ts.add(g);
      elems += g.numel();
    } else {
      if (!plain_tensor(v, device)) return py::none();
      ts.add(v);
      elems += v.numel();
    }
  }
  if (ts.empty() || !(devices & (device.is_cpu() ? 1 : 2))) return py::none();
  if (op == int(FastOp::Scale) && total->device() != device) return py::none();
  const Kernels& k =
#ifdef GRADCLIP_WITH_CUDA
      device.is_cuda() ? kCudaKernels :
#endif
      kCpuKernels;
  at::Tensor result;
  const bool release = elems >= kReleaseGilElems;
  const std::vector<at::Tensor> owned = release ? ts.owned() : std::vector<at::Tensor>();  // dropped with the GIL
  const at::TensorList list = release ? at::TensorList(owned) : ts.list();
  {
    std::optional<py::gil_scoped_release> nogil;
    if (release) nogil.emplace();
    switch (static_cast<FastOp>(op)) {
      case FastOp::Norm: result = std::get<0>(k.norm(list, a, false)); break;
      case FastOp::NormEach: result = std::get<1>(k.norm(list, a, true)); break;
      case FastOp::Scale: k.scale(list, total.value(), a, eps); break;
      case FastOp::Clip: result = k.clip(list, a, b, eps); break;
      case FastOp::Value: k.value(list, a); break;
      case FastOp::Partials: result = k.partials(list, a); break;
    }
  }
  if (result.defined()) return py::cast(result);
  return py::cast(true);
}

// The CUDA launch tables the builder cuts for tensors of these sizes and dtype codes (fake, distinct data
// addresses: tensor i starts at (i + 1) << 40), decoded by the search the kernels run: for each chunk k of a launch,
// the pieces its block visits, as (k, tensor, first element, elements, dtype code, skip writes): one piece of one
// tensor, or, for a pack, each member whole, in the order of the warps that take them (last member first).
// For the CPU tests.
py::list launch_tables(const std::vector<int64_t>& numels, const std::vector<int>& dtypes,
                       const std::vector<int>& skip, int64_t chunk_elems, int capacity) {
  std::vector<TensorRef> ts;
  for (size_t i = 0; i < numels.size(); ++i)
    ts.push_back({reinterpret_cast<void*>(uintptr_t(i + 1) << 40), numels[i], static_cast<DType>(dtypes[i])});
  std::vector<char> sk(skip.begin(), skip.end());
  py::list out;
  for (const LaunchSpec& l : build_launches(ts, sk, chunk_elems, capacity)) {
    py::list chunks;
    auto piece = [&](int32_t k, const ChunkRef& c) {
      const auto addr = reinterpret_cast<uintptr_t>(c.data);
      const int64_t tensor = int64_t(addr >> 40) - 1;
      chunks.append(py::make_tuple(k, tensor, int64_t(addr & ((uintptr_t(1) << 40) - 1)) / dtype_size(c.dtype),
                                   c.size, int(c.dtype), c.skip_writes));
    };
    for (int32_t k = 0; k < l.h.n_chunks; ++k) {
      const int32_t owner = chunk_owner(l.slots.data(), l.h.n_tensors, k);
      if (slot_small(l.slots[owner], chunk_elems)) {
        for (int w = 0; w < kPackTensors; ++w) {
          const int32_t s = pack_member(l.slots.data(), owner, k, w, chunk_elems);
          if (s >= 0) piece(k, slot_chunk(l.slots[s]));
        }
      } else {
        piece(k, locate_chunk(l.slots.data(), l.h.n_tensors, k, chunk_elems));
      }
    }
    py::dict d;
    d["chunk_base"] = l.h.chunk_base;
    d["tensor_base"] = l.h.tensor_base;
    d["n_tensors"] = l.h.n_tensors;
    d["n_chunks"] = l.h.n_chunks;
    d["last"] = bool(l.h.last);
    d["chunks"] = chunks;
    out.append(d);
  }
  return out;
}

// What thread tid (every tid of `threads`: a block's, or a warp's for a pack member) visits of a chunk of n elements
// of elem_size bytes at address addr, by the index arithmetic the kernels run (chunk_parts, visit_parts): the element
// indices of scalar
// accesses, and the first element index of each 16-byte vector access (vectors of vector groups listed one by one).
// For the CPU sweep over every misalignment (tests/test_cuda_host.py).
py::dict chunk_visits(uint64_t addr, int64_t n, int elem_size, int threads) {
  TORCH_CHECK(elem_size == 2 || elem_size == 4 || elem_size == 8, "elem_size must be 2, 4 or 8");
  TORCH_CHECK(threads == kCudaThreads || threads == 32, "threads: a block's or a warp's");
  const ChunkParts c = chunk_parts(static_cast<uintptr_t>(addr), n, elem_size);
  std::vector<int64_t> scalars, vectors;
  for (int tid = 0; tid < threads; ++tid) {
    visit_parts<kCudaUnroll>(
        c, tid, threads, [&](int64_t j) { scalars.push_back(j); },
        [&](int64_t i) {
          for (int u = 0; u < kCudaUnroll; ++u) vectors.push_back(c.head + (i + int64_t(u) * threads) * c.per_vec);
        },
        [&](int64_t i) { vectors.push_back(c.head + i * c.per_vec); });
  }
  py::dict d;
  d["head"] = c.head;
  d["vecs"] = c.vecs;
  d["tail"] = c.tail;
  d["per_vec"] = c.per_vec;
  d["scalars"] = scalars;
  d["vectors"] = vectors;
  return d;
}

// What identifies a set of tensors for the Triton path's cached chunk table: a 64-bit hash of the rest (8 bytes, so
// that a lookup need not hash the whole key: gradclip_cuda/triton, _Key), each tensor's address, size and dtype,
// and the device; its last byte is 1 when every tensor is dense (non-overlapping and dense: the Triton kernels take
// it in place), so the caller needs no per-tensor pass of its own for that. Runs the plan's checks (torch's errors)
// on the way, so a bad list raises before any kernel runs.
py::bytes tensor_key(py::handle seq, bool norm, double p) {
  const Borrowed borrowed(seq, "tensor_key");
  const at::TensorList xs = borrowed.list();
  const Plan plan = make_plan(xs, 0, {norm, p});
  std::string key(sizeof(uint64_t), '\0');  // room for the hash
  key.reserve(sizeof(uint64_t) + plan.tensors.size() * 17 + 3);
  uint64_t h = 0x9e3779b97f4a7c15ull;
  auto mix = [&h](uint64_t v) {
    h = (h ^ v) * 0xff51afd7ed558ccdull;
    h ^= h >> 33;
  };
  for (const TensorRef& t : plan.tensors) {
    key.append(reinterpret_cast<const char*>(&t.data), sizeof(t.data));
    key.append(reinterpret_cast<const char*>(&t.numel), sizeof(t.numel));
    key.push_back(static_cast<char>(t.dtype));
    mix(reinterpret_cast<uintptr_t>(t.data));
    mix(static_cast<uint64_t>(t.numel) << 8 | static_cast<uint64_t>(t.dtype));
  }
  if (!xs.empty()) {
    key.push_back(static_cast<char>(xs[0].device().type()));
    key.push_back(static_cast<char>(xs[0].device().index()));
    mix(static_cast<uint64_t>(xs[0].device().type()) << 8 | static_cast<uint8_t>(xs[0].device().index()));
  }
  key.push_back(static_cast<char>(plan.copies.empty() ? 1 : 0));
  mix(plan.copies.empty() ? 1 : 0);
  std::memcpy(key.data(), &h, sizeof(h));
  return py::bytes(key);
}

// Tells autograd that the tensors of `seq` (a list or tuple) changed, as the dispatcher does after an in-place op:
// one C++ pass with borrowed references (torch._C._increment_version converts the list, two reference-count
// round trips a tensor).
void bump_versions_of(py::handle seq) {
  bump_versions(Borrowed(seq, "bump_versions").list());
}

py::dict last_cuda_call_info() {
  py::dict d;
#ifdef GRADCLIP_WITH_CUDA
  const CudaCallInfo i = last_cuda_call();
  d["launches"] = i.launches;
  d["memsets"] = i.memsets;
  d["fused"] = i.fused;
  d["cached"] = i.cached;
  d["device_table"] = i.device_table;
#endif
  return d;
}

}  // namespace
}  // namespace gradclip

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("build_info", &gradclip::build_info, "torch and CUDA versions this library was built against");
  m.def("register_kernels", &gradclip::register_kernels, "register the compiled kernels with the dispatcher");
  m.def("grads_of", &gradclip::grads_of, py::arg("seq"), "the defined .grad of each parameter, or None");
  m.def("dtensor_locals", &gradclip::dtensor_locals, py::arg("seq"), py::arg("dtensor_cls"),
        py::arg("from_params") = false,
        "local shards of DTensor gradients grouped by (mesh, placements): (locals, runs, uniques, device, dtype, "
        "any DTensor), or None");
  m.def("any_instance", &gradclip::any_instance, py::arg("seq"), py::arg("cls"),
        "whether any element of a list or tuple is an instance of cls");
  m.def("result_dtype", &gradclip::result_dtype, py::arg("seq"),
        "torch's dtype for a total norm of a list of tensors, or None");
  m.def("plain_device", &gradclip::plain_device, py::arg("seq"),
        "the one device of a list of tensors the compiled kernels take as they are, else None");
  m.def("fast", &gradclip::fast, py::arg("seq"), py::arg("grads_of"), py::arg("devices"), py::arg("op"),
        py::arg("a"), py::arg("b") = 0.0, py::arg("total") = py::none(), py::arg("eps") = 1e-6);
  py::class_<gradclip::LocalSet>(m, "LocalSet")
      .def(py::init<py::list, c10::Device, bool>(), py::arg("seq"), py::arg("device"), py::arg("writes"))
      .def("partials", &gradclip::LocalSet::partials, py::arg("p"), py::arg("runs"), py::arg("n_keys"))
      .def("finish", &gradclip::LocalSet::finish, py::arg("combined"), py::arg("p"), py::arg("dtype"))
      .def("scale", &gradclip::LocalSet::scale, py::arg("total"), py::arg("max_norm"), py::arg("eps"));
  m.def("launch_tables", &gradclip::launch_tables, py::arg("numels"), py::arg("dtypes"), py::arg("skip"),
        py::arg("chunk_elems"), py::arg("capacity"));
  m.def("bump_versions", &gradclip::bump_versions_of, py::arg("seq"),
        "bump the version counter of every tensor of a list (after an in-place pass)");
  m.def("tensor_key", &gradclip::tensor_key, py::arg("xs"), py::arg("norm"), py::arg("p"));
  m.def("cpu_kernel_isa", &gradclip::cpu_kernel_isa, "which build of the CPU inner loops runs: avx2 or generic");
  m.def("last_cuda_call", &gradclip::last_cuda_call_info, "launches, fused, cached of this thread's last CUDA call");
  m.def("chunk_visits", &gradclip::chunk_visits, py::arg("addr"), py::arg("n"), py::arg("elem_size"),
        py::arg("threads") = gradclip::kCudaThreads,
        "scalar and vector accesses of every thread of a CUDA block over one chunk (host sweep of kernel indexing)");
  m.def("table_capacity", &gradclip::table_capacity, py::arg("n_tensors"), py::arg("driver_version"),
        py::arg("force_small"), "slots per CUDA launch table for a set of n_tensors under this driver version");
  m.def("fused_max_bytes", [](int64_t l2_bytes, std::optional<std::string> env) {
    return gradclip::fused_max_bytes(l2_bytes, env ? env->c_str() : nullptr);
  }, py::arg("l2_bytes"), py::arg("env") = py::none(), "the fused path's byte threshold for this L2 size and env");
  m.def("use_device_table", &gradclip::use_device_table, py::arg("param_launches"), py::arg("force_small"),
        py::arg("reusable"), "whether a CUDA set takes its launch tables in device memory");
  m.def("read_device_table", &gradclip::read_device_table, py::arg("capturing"), py::arg("upload_done"),
        "whether a CUDA call may read a set's uploaded device tables");
  m.def("take_fused", &gradclip::take_fused, py::arg("capturing"), py::arg("eager_fused_ok"), py::arg("one_table"),
        py::arg("bytes"), py::arg("max_bytes"), py::arg("l0"), py::arg("cooperative"),
        "whether a CUDA clip takes the fused cooperative launch");
  m.attr("CUDA_CHUNK") = gradclip::kCudaChunk;
  m.attr("CUDA_THREADS") = gradclip::kCudaThreads;
  m.attr("PACK_TENSORS") = gradclip::kPackTensors;
  m.attr("LARGE_PARAMS_DRIVER") = gradclip::kLargeParamsDriver;
  m.attr("TABLE_SLOTS") = py::make_tuple(gradclip::kSmallSlots, gradclip::kLargeSlots);
}
