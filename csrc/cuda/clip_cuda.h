// CUDA implementations of the gradclip_cuda ops (schemas: gradclip_cuda/_ops.py). Same contracts as csrc/cpu/.
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace gradclip {

std::tuple<at::Tensor, at::Tensor> multi_tensor_norm_cuda(at::TensorList xs, double p, bool per_tensor);
// As multi_tensor_partials_cpu (the norm kernel's per-tensor partials, left in its float64 scratch).
at::Tensor multi_tensor_partials_cuda(at::TensorList xs, double p);
void multi_tensor_scale_cuda(at::TensorList xs, const at::Tensor& total, double max_norm, double eps);
void multi_tensor_mul_cuda(at::TensorList xs, const at::Tensor& coef);
at::Tensor clip_grad_norm_cuda(at::TensorList xs, double max_norm, double p, double eps);
void clip_grad_value_cuda(at::TensorList xs, double clip_value);
at::Tensor clip_policy_step_cuda(const at::Tensor& state, const at::Tensor& total, int64_t policy,
                                 at::ArrayRef<double> args);
// csrc/cuda/agc_cuda.cu
void adaptive_clip_grad_cuda(at::TensorList grads, at::TensorList params, double clip_factor, double eps, double p,
                             int64_t unit_axis);

// The driver's CUDA version (cudaDriverGetVersion), read once per process.
int driver_version();

// What the last call on this thread did: kernel launches, memsets (the norm's ticket word), whether it took the fused
// single launch, whether its launch tables came from the cache. For tests and the benchmark.
struct CudaCallInfo {
  int launches = 0;
  int memsets = 0;
  bool fused = false;
  bool cached = false;
  bool device_table = false;  // the launch tables were read from device memory
};
CudaCallInfo last_cuda_call();

}  // namespace gradclip
