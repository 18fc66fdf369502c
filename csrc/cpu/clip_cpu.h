// CPU implementations of the gradclip_cuda ops (schemas: gradclip_cuda/_ops.py).
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace gradclip {

// Total (0-d, in the promoted dtype of xs, as torch returns it) and, when asked, the norm of each tensor.
std::tuple<at::Tensor, at::Tensor> multi_tensor_norm_cpu(at::TensorList xs, double p, bool per_tensor);
void multi_tensor_scale_cpu(at::TensorList xs, const at::Tensor& total, double max_norm);
at::Tensor clip_grad_norm_cpu(at::TensorList xs, double max_norm, double p);
void clip_grad_value_cpu(at::TensorList xs, double clip_value);

// Which build of the inner loops runs: "avx2" (AVX2 + FMA + F16C) or "generic" (GRADCLIP_CPU_GENERIC=1 forces it).
const char* cpu_kernel_isa();

}  // namespace gradclip
