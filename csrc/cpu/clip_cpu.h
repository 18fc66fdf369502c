// CPU implementations of the gradclip_cuda ops (schemas: gradclip_cuda/_ops.py).
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

#include "common/plan.h"

namespace gradclip {

// Total (0-d, in the promoted dtype of xs, as torch returns it) and, when asked, the norm of each tensor.
std::tuple<at::Tensor, at::Tensor> multi_tensor_norm_cpu(at::TensorList xs, double p, bool per_tensor);
// Each tensor's un-finalised partial in float64, as the total combines it (sum of |x|^p for finite p; max |x|, min |x|;
// the nonzero count for p = 0): what a distributed total reduces across ranks. Not an op: _C.fast only.
at::Tensor multi_tensor_partials_cpu(at::TensorList xs, double p);
void multi_tensor_scale_cpu(at::TensorList xs, const at::Tensor& total, double max_norm, double eps);
// The same two passes over a plan (make_plan with kCpuChunk) built once for both: a distributed clip's norm and
// scale (bindings.cpp, LocalSet); scale_plan writes xs, the tensors the plan was built from.
at::Tensor partials_of_plan(const Plan& plan, double p);
void scale_plan(Plan& plan, at::TensorList xs, const at::Tensor& total, double max_norm, double eps);
void multi_tensor_mul_cpu(at::TensorList xs, const at::Tensor& coef);
at::Tensor clip_grad_norm_cpu(at::TensorList xs, double max_norm, double p, double eps);
void clip_grad_value_cpu(at::TensorList xs, double clip_value);
void adaptive_clip_grad_cpu(at::TensorList grads, at::TensorList params, double clip_factor, double eps, double p,
                            int64_t unit_axis);

// The stateful clipping policies' step (common/rules.h): advances `state` in place, returns the coefficient.
at::Tensor clip_policy_step_cpu(const at::Tensor& state, const at::Tensor& total, int64_t policy,
                                at::ArrayRef<double> args);
// The op's argument checks, shared with the CUDA kernel.
void check_policy_state(const at::Tensor& state, const at::Tensor& total, int64_t policy, at::ArrayRef<double> args);

// Which build of the inner loops runs: "avx2" (AVX2 + FMA + F16C) or "generic" (GRADCLIP_CPU_GENERIC=1 forces it).
const char* cpu_kernel_isa();

}  // namespace gradclip
