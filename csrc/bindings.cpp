// The Python module gradclip_cuda._C: build information, registration of the compiled kernels against the op
// schemas that gradclip_cuda/_ops.py defines, and the CPU fast path that reads `.grad` in C++.
#include <torch/extension.h>
#include <torch/library.h>
#include <torch/version.h>
#include <torch/csrc/autograd/python_variable.h>

#include <memory>
#include <string>

#include "cpu/clip_cpu.h"

namespace py = pybind11;

namespace gradclip {
namespace {

std::unique_ptr<torch::Library> g_cpu_lib;

// Registered on request (after _ops.py has checked that this library was built for the running torch), never
// from a static initialiser: a mismatched build must not put its kernels in the dispatcher.
void register_kernels() {
  if (g_cpu_lib) return;
  g_cpu_lib = std::make_unique<torch::Library>(torch::Library::IMPL, "gradclip_cuda", c10::DispatchKey::CPU,
                                               __FILE__, __LINE__);
  g_cpu_lib->impl("multi_tensor_norm", TORCH_FN(multi_tensor_norm_cpu));
  g_cpu_lib->impl("multi_tensor_scale_", TORCH_FN(multi_tensor_scale_cpu));
  g_cpu_lib->impl("clip_grad_norm_", TORCH_FN(clip_grad_norm_cpu));
  g_cpu_lib->impl("clip_grad_value_", TORCH_FN(clip_grad_value_cpu));
}

py::dict build_info() {
  py::dict d;
  d["torch"] = std::string(TORCH_VERSION);
#ifdef GRADCLIP_WITH_CUDA
  d["cuda"] = std::to_string(CUDA_VERSION / 1000) + "." + std::to_string(CUDA_VERSION / 10 % 100);
#else
  d["cuda"] = py::none();
#endif
  return d;
}

enum class FastOp : int { Norm = 0, Scale = 1, Clip = 2, Value = 3 };

bool plain_cpu_tensor(const at::Tensor& t) {
  const auto st = t.scalar_type();
  return t.device().is_cpu() && t.layout() == at::kStrided &&
         (st == at::kFloat || st == at::kHalf || st == at::kBFloat16 || st == at::kDouble) &&
         !t.key_set().has(c10::DispatchKey::Python) && !t.key_set().has_any(c10::python_ks);
}

// The hot path of the drop-in API on the CPU, with no Python loop over the tensors: `seq` is a list or tuple of
// parameters (grads_of: their `.grad`, Nones skipped) or of tensors. Returns None when the fast path does not
// apply (nothing to do, another device, a tensor subclass, an unsupported dtype or layout): the caller then
// takes the general path through the ops, which raises the proper errors.
py::object cpu_fast(py::handle seq, bool grads_of, int op, double a, double b, std::optional<at::Tensor> total) {
  if (!PyList_Check(seq.ptr()) && !PyTuple_Check(seq.ptr())) return py::none();
  PyObject* fast = seq.ptr();
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
  PyObject** items = PySequence_Fast_ITEMS(fast);
  std::vector<at::Tensor> ts;
  ts.reserve(n);
  static PyObject* const parameter = py::object(py::module_::import("torch.nn").attr("Parameter")).release().ptr();
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* o = items[i];
    // Exactly torch.Tensor or torch.nn.Parameter: a subclass may override `.grad` or dispatch.
    if (Py_TYPE(o) != reinterpret_cast<PyTypeObject*>(THPVariableClass) &&
        Py_TYPE(o) != reinterpret_cast<PyTypeObject*>(parameter))
      return py::none();
    const at::Tensor& v = THPVariable_Unpack(o);
    if (grads_of) {
      const at::Tensor& g = v.grad();
      if (!g.defined()) continue;
      if (!plain_cpu_tensor(g)) return py::none();
      ts.push_back(g);
    } else {
      if (!plain_cpu_tensor(v)) return py::none();
      ts.push_back(v);
    }
  }
  if (ts.empty()) return py::none();
  at::Tensor result;
  {
    py::gil_scoped_release nogil;
    switch (static_cast<FastOp>(op)) {
      case FastOp::Norm: result = std::get<0>(multi_tensor_norm_cpu(ts, a, false)); break;
      case FastOp::Scale: multi_tensor_scale_cpu(ts, total.value(), a); break;
      case FastOp::Clip: result = clip_grad_norm_cpu(ts, a, b); break;
      case FastOp::Value: clip_grad_value_cpu(ts, a); break;
    }
  }
  if (result.defined()) return py::cast(result);
  return py::cast(true);
}

}  // namespace
}  // namespace gradclip

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("build_info", &gradclip::build_info, "torch and CUDA versions this library was built against");
  m.def("register_kernels", &gradclip::register_kernels, "register the compiled kernels with the dispatcher");
  m.def("cpu_fast", &gradclip::cpu_fast, py::arg("seq"), py::arg("grads_of"), py::arg("op"), py::arg("a"),
        py::arg("b") = 0.0, py::arg("total") = py::none());
}
