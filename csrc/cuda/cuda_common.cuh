// Pieces shared by the CUDA kernels: error checks, the caller's stream, input device checks.
#pragma once

#include <cuda_runtime.h>

#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/util/Exception.h>

namespace flashode {

#define FLASHODE_CUDA_CHECK(expr)                                                            \
  do {                                                                                       \
    cudaError_t _err = (expr);                                                               \
    STD_TORCH_CHECK(_err == cudaSuccess, "flashode CUDA error: ", cudaGetErrorString(_err)); \
  } while (0)

// The current CUDA stream of t's device: kernels run where the caller's other work runs.
inline cudaStream_t current_stream(const torch::stable::Tensor& t) {
  void* stream = nullptr;
  STABLE_TORCH_ERROR_CODE_CHECK(aoti_torch_get_current_cuda_stream(t.get_device_index(), &stream));
  return static_cast<cudaStream_t>(stream);
}

inline void check_cuda_inputs(const torch::stable::Tensor& y, const char* op) {
  STD_TORCH_CHECK(y.is_cuda(), "flashode.", op, ": expected a CUDA tensor");
}

}  // namespace flashode
