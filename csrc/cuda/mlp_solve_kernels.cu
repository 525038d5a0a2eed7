// CUDA kernels of the fused MLP solve (schemas in ../ops.cpp, checks in ../common/mlp_solve_args.h),
// same semantics as ../cpu/mlp_solve_kernels.cpp: one thread integrates one sample with the shared
// per-sample code (../common/mlp_sample_solve.h), which takes the CPU lane kernel's decisions in its
// arithmetic order. This file is compiled with -fmad=false (CMakeLists.txt) so that no multiply-add
// is contracted; CUDA's pow (the controller) may still round differently from glibc's in the last
// bit, so step sizes agree with the CPU's to rounding.
//
// Memory. Each block copies the packed parameters into dynamic shared memory once (every thread
// reads every weight, in the same order: broadcasts), followed by the hidden activations of its
// threads, column by column (thread t's value i at i * threads + t: no bank conflicts). Everything
// else a sample needs (state, stages, the backward's records of every stage) lives in a global work
// buffer laid out the same way across the grid, so a warp's accesses coalesce. The grid is sized
// to what the device keeps resident (at most), and threads stride over the samples.
//
// Checkpoints (record). A sample's step count is known only once it has been solved, so the
// forward records into per-sample slots of a first-guess capacity (sample::slot_capacity), keeps
// counting past it, and then the host reads the counts: ONE device->host synchronisation per
// recorded solve (none without record). The samples that overflowed are solved again (the solve is
// deterministic) straight into their rows of the (K, 2, D) / (K, 3) outputs, the others' slots are
// compacted into theirs: rows in per-sample order, as the CPU op returns them.
//
// Parameter gradients. Each block sums its samples' contributions into a shared-memory copy with
// atomicAdd, then adds it to the output with one atomicAdd per parameter and block: the order of
// those additions is the scheduler's, so gradients agree with the CPU's to rounding, not bit for
// bit, and may differ in the last bits from run to run.
#include <cuda_runtime.h>

#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>

#include <algorithm>
#include <string>
#include <tuple>
#include <vector>

#include "common/mlp_sample_solve.h"
#include "cuda/cuda_common.cuh"

namespace flashode {
namespace {

// Threads per block: kBlockThreads when the shared memory allows, else kMinBlockThreads (one warp).
// python/flashode/_mlp_cuda.py (cuda_fit_reason) mirrors the fit rule.
constexpr int kBlockThreads = 64;
constexpr int kMinBlockThreads = 32;
// The global work buffers of one launch stay below this (fewer resident blocks otherwise).
constexpr int64_t kWorkBytes = int64_t{512} << 20;
// Kernel parameters beyond 4 KiB need CUDA 12.1 and sm_70 (the arguments carry the tableau).
constexpr size_t kMaxKernelParams = 32764;

// Dynamic shared memory: the parameters (and, backward, their gradients), then the hidden columns.
template <typename T>
size_t shared_bytes(const sample::SampleShape& shape, bool gradients, int threads) {
  const int64_t values = (gradients ? 2 : 1) * shape.mlp.params + threads * shape.hidden_size;
  return static_cast<size_t>(values) * sizeof(T);
}

// The device's opt-in limit of dynamic shared memory per block.
int shared_limit(int device) {
  int limit = 0;
  FLASHODE_CUDA_CHECK(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  return limit;
}

// The block size whose shared memory fits, or a clear error (the Python layer checks the same rule
// first and takes the generic path instead).
template <typename T>
int block_threads(const sample::SampleShape& shape, bool gradients, int device, const char* op) {
  const int limit = shared_limit(device);
  for (int threads : {kBlockThreads, kMinBlockThreads}) {
    if (shared_bytes<T>(shape, gradients, threads) <= static_cast<size_t>(limit)) return threads;
  }
  std::string widths;
  for (int l = 0; l <= shape.mlp.layers; ++l) widths += (l ? "," : "") + std::to_string(shape.mlp.width[l]);
  STD_TORCH_CHECK(false, "flashode.", op, ": the MLP with widths [", widths, "] (", shape.mlp.params,
                  " parameters) needs ", shared_bytes<T>(shape, gradients, kMinBlockThreads),
                  " bytes of shared memory per block of ", kMinBlockThreads, " threads (",
                  gradients ? "parameters, their gradients" : "parameters", " and hidden activations in ",
                  sizeof(T) == 4 ? "float32" : "float64", "), more than this GPU's limit of ", limit,
                  " bytes; use the generic solver for this network");
  return 0;
}

// Blocks for `count` samples: no more than the device keeps resident, nor than kWorkBytes of work
// columns allow.
template <typename Kernel>
int grid_blocks(Kernel kernel, int threads, size_t shared, int64_t count, int64_t work_bytes_per_thread, int device) {
  if (shared > 48 * 1024)
    FLASHODE_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                             static_cast<int>(shared)));
  int per_sm = 0, sms = 0;
  FLASHODE_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, shared));
  FLASHODE_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const int64_t needed = (count + threads - 1) / threads;
  const int64_t affordable = std::max<int64_t>(1, kWorkBytes / std::max<int64_t>(1, work_bytes_per_thread * threads));
  return static_cast<int>(std::max<int64_t>(1, std::min({needed, int64_t{std::max(per_sm, 1)} * sms, affordable})));
}

// This thread's columns: `hidden` in shared memory (after `skip` values), `work` in the global buffer.
template <typename T>
__device__ sample::Column<T> hidden_column(T* shared, int64_t skip) {
  return sample::Column<T>{shared + skip + threadIdx.x, blockDim.x};
}

template <typename T>
__device__ sample::Column<T> work_column(T* work) {
  return sample::Column<T>{work + blockIdx.x * blockDim.x + threadIdx.x, int64_t{gridDim.x} * blockDim.x};
}

template <typename T>
__device__ T* shared_values() {
  extern __shared__ __align__(16) unsigned char shared_raw[];
  return reinterpret_cast<T*>(shared_raw);
}

// ------------------------------------------------------------------------------------------------
// Forward.

template <typename T>
struct ForwardArgs {
  sample::ForwardData<T> data;
  const T* params;
  T* work;
  // Pass 1: every sample, sample s's checkpoints into its slot (s * capacity rows of slot_y/slot_t).
  T* slot_y;
  double* slot_t;
  int64_t capacity;
  // Pass 2 (subset != null): samples subset[0 .. count), straight into their rows of ckpt_y/ckpt_t.
  const int64_t* subset;
  int64_t count;
  const int64_t* offsets;
  T* ckpt_y;
  double* ckpt_t;
};

template <typename T>
__device__ void copy_params(T* shared, const T* params, int64_t count) {
  for (int64_t i = threadIdx.x; i < count; i += blockDim.x) shared[i] = params[i];
}

template <typename T>
__global__ void __launch_bounds__(kBlockThreads) mlp_forward_kernel(const __grid_constant__ ForwardArgs<T> a) {
  const sample::SampleShape& shape = a.data.shape;
  T* params = shared_values<T>();
  copy_params(params, a.params, shape.mlp.params);
  __syncthreads();
  const sample::Column<T> hidden = hidden_column(params, shape.mlp.params);
  const sample::Column<T> work = work_column(a.work);
  const int64_t dim = shape.dim;
  const int64_t stride = int64_t{gridDim.x} * blockDim.x;
  for (int64_t i = blockIdx.x * blockDim.x + threadIdx.x; i < a.count; i += stride) {
    const int64_t s = a.subset == nullptr ? i : a.subset[i];
    sample::CheckpointSlot<T> slot{a.slot_y + s * a.capacity * 2 * dim, a.slot_t + s * a.capacity * 3, a.capacity};
    if (a.subset != nullptr) {
      const int64_t row = a.offsets[s];
      slot = sample::CheckpointSlot<T>{a.ckpt_y + row * 2 * dim, a.ckpt_t + row * 3, a.offsets[s + 1] - row};
    }
    sample::SampleForward<T>(a.data, params, s, hidden, work, slot).run();
  }
}

// Every sample whose checkpoints fit its slot: the slot's rows to the sample's output rows.
template <typename T>
__global__ void compact_checkpoints_kernel(const T* slot_y, const double* slot_t, int64_t capacity,
                                           const int64_t* offsets, int64_t batch, int64_t dim, T* ckpt_y,
                                           double* ckpt_t) {
  const int64_t s = blockIdx.x * int64_t{blockDim.x} + threadIdx.x;
  if (s >= batch) return;
  const int64_t row = offsets[s], rows = offsets[s + 1] - row;
  if (rows > capacity) return;  // solved again into its rows
  const sample::CheckpointSlot<T> slot{const_cast<T*>(slot_y) + s * capacity * 2 * dim,
                                       const_cast<double*>(slot_t) + s * capacity * 3, capacity};
  sample::copy_checkpoints(slot, rows, dim, ckpt_y + row * 2 * dim, ckpt_t + row * 3);
}

// Launches the forward over a.count samples on `stream`, with a work buffer of its own.
template <typename T>
void launch_forward(ForwardArgs<T> a, const Tensor& like, int device, cudaStream_t stream) {
  static_assert(sizeof(ForwardArgs<T>) <= kMaxKernelParams, "the forward's arguments must fit a launch");
  if (a.count == 0) return;
  const sample::SampleShape& shape = a.data.shape;
  const int threads = block_threads<T>(shape, false, device, "mlp_solve");
  const size_t shared = shared_bytes<T>(shape, false, threads);
  const int blocks = grid_blocks(mlp_forward_kernel<T>, threads, shared, a.count,
                                 shape.forward_size * static_cast<int64_t>(sizeof(T)), device);
  Tensor work = new_contiguous(like, {int64_t{blocks} * threads * shape.forward_size}, dtype_code(like));
  a.work = work.mutable_data_ptr<T>();
  mlp_forward_kernel<T><<<blocks, threads, shared, stream>>>(a);
  FLASHODE_CUDA_CHECK(cudaGetLastError());
}

Tensor device_copy(const Tensor& like, const std::vector<int64_t>& values, cudaStream_t stream) {
  Tensor out = new_contiguous(like, {static_cast<int64_t>(values.size())}, aoti_torch_dtype_int64());
  // From pageable memory: the call returns once `values` is staged, so it may go out of scope.
  FLASHODE_CUDA_CHECK(cudaMemcpyAsync(out.mutable_data_ptr<int64_t>(), values.data(), values.size() * sizeof(int64_t),
                                      cudaMemcpyHostToDevice, stream));
  return out;
}

Tensor zero_offsets(const Tensor& like, int64_t batch, cudaStream_t stream) {
  Tensor out = new_contiguous(like, {batch + 1}, aoti_torch_dtype_int64());
  FLASHODE_CUDA_CHECK(cudaMemsetAsync(out.mutable_data_ptr<int64_t>(), 0, (batch + 1) * sizeof(int64_t), stream));
  return out;
}

using SolveOutputs = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

template <typename T>
SolveOutputs mlp_solve_impl(const MlpSolveCall& call) {
  const int64_t batch = call.batch, dim = call.dim;
  const int device = call.y0.get_device_index();
  cudaStream_t stream = current_stream(call.y0);
  const MlpSolveOutputs out(call);
  ForwardArgs<T> a{};
  a.data = sample::forward_data<T>(call, out);
  a.params = call.params.template const_data_ptr<T>();
  a.count = batch;
  a.capacity = call.record ? sample::slot_capacity(batch, dim, call.ctrl.max_steps, sizeof(T)) : 0;
  Tensor slot_y = new_contiguous(call.y0, {batch * a.capacity * 2 * dim}, dtype_code(call.y0));
  Tensor slot_t = new_contiguous(call.y0, {batch * a.capacity * 3}, aoti_torch_dtype_float64());
  a.slot_y = slot_y.mutable_data_ptr<T>();
  a.slot_t = slot_t.mutable_data_ptr<double>();
  launch_forward(a, call.y0, device, stream);

  std::vector<int64_t> offsets(static_cast<size_t>(batch + 1), 0), overflowed;
  if (call.record && batch > 0) {  // the one device->host read of a recorded solve
    std::vector<int64_t> host_stats(static_cast<size_t>(batch * kStatColumns));
    FLASHODE_CUDA_CHECK(cudaMemcpyAsync(host_stats.data(), out.stats.const_data_ptr<int64_t>(),
                                        host_stats.size() * sizeof(int64_t), cudaMemcpyDeviceToHost, stream));
    FLASHODE_CUDA_CHECK(cudaStreamSynchronize(stream));
    sample::checkpoint_offsets(host_stats.data(), batch, a.capacity, offsets.data(), &overflowed);
  }
  const int64_t rows = offsets.back();
  // Without record nothing is copied from the host, so such a solve can be captured in a CUDA graph.
  Tensor ckpt_offsets = call.record ? device_copy(call.y0, offsets, stream) : zero_offsets(call.y0, batch, stream);
  Tensor ckpt_y = new_contiguous(call.y0, {rows, 2, dim}, dtype_code(call.y0));
  Tensor ckpt_t = new_contiguous(call.y0, {rows, 3}, aoti_torch_dtype_float64());
  if (rows == 0) return {out.ys, out.status, out.t_final, out.stats, ckpt_y, ckpt_t, ckpt_offsets, out.out_step};

  a.offsets = ckpt_offsets.const_data_ptr<int64_t>();
  a.ckpt_y = ckpt_y.mutable_data_ptr<T>();
  a.ckpt_t = ckpt_t.mutable_data_ptr<double>();
  if (!overflowed.empty()) {
    // Freed before the kernel runs, safely: the caching allocator reuses memory in stream order.
    const Tensor subset = device_copy(call.y0, overflowed, stream);
    a.subset = subset.const_data_ptr<int64_t>();
    a.count = static_cast<int64_t>(overflowed.size());
    launch_forward(a, call.y0, device, stream);
  }
  constexpr int kCopyThreads = 256;
  const int copy_blocks = static_cast<int>((batch + kCopyThreads - 1) / kCopyThreads);
  compact_checkpoints_kernel<T><<<copy_blocks, kCopyThreads, 0, stream>>>(
      a.slot_y, a.slot_t, a.capacity, a.offsets, batch, dim, a.ckpt_y, a.ckpt_t);
  FLASHODE_CUDA_CHECK(cudaGetLastError());
  return {out.ys, out.status, out.t_final, out.stats, ckpt_y, ckpt_t, ckpt_offsets, out.out_step};
}

SolveOutputs mlp_solve_cuda(Tensor y0, Tensor params, std::vector<int64_t> widths, int64_t activation,
                            bool time_concat, bool bias, Tensor t_eval, Tensor t_start, Tensor t_end, Tensor rtol,
                            Tensor atol, Tensor first_step, std::vector<double> a, std::vector<double> b,
                            std::vector<double> b_error, std::vector<double> c, std::vector<double> poly,
                            int64_t order, std::vector<double> controller, int64_t max_steps, double step_size,
                            bool record) {
  check_cuda_inputs(y0, "mlp_solve");
  torch::stable::accelerator::DeviceGuard guard(y0.get_device_index());
  const MlpSolveCall call = prepare_mlp_solve(y0, params, widths, activation, time_concat, bias, t_eval, t_start,
                                              t_end, rtol, atol, first_step, a, b, b_error, c, poly, order,
                                              controller, max_steps, step_size, record);
  return call.y0.scalar_type() == ScalarType::Double ? mlp_solve_impl<double>(call) : mlp_solve_impl<float>(call);
}

// ------------------------------------------------------------------------------------------------
// Backward.

// Parameter gradients into the block's shared-memory sums.
template <typename T>
struct SharedAtomicAdd {
  T* grad;
  __device__ void add(int64_t i, T v) const { atomicAdd(grad + i, v); }
};

template <typename T>
struct BackwardArgs {
  sample::BackwardData<T> data;
  const T* params;
  T* grad_params;  // zeroed; every block adds its sums
  T* work;
};

template <typename T>
__global__ void __launch_bounds__(kBlockThreads) mlp_backward_kernel(const __grid_constant__ BackwardArgs<T> a) {
  const sample::SampleShape& shape = a.data.shape;
  const int64_t count = shape.mlp.params;
  T* params = shared_values<T>();
  T* grad = params + count;
  copy_params(params, a.params, count);
  for (int64_t i = threadIdx.x; i < count; i += blockDim.x) grad[i] = T(0);
  __syncthreads();
  const SharedAtomicAdd<T> sums{grad};
  const sample::Column<T> hidden = hidden_column(params, 2 * count);
  const sample::Column<T> work = work_column(a.work);
  const int64_t stride = int64_t{gridDim.x} * blockDim.x;
  for (int64_t s = blockIdx.x * blockDim.x + threadIdx.x; s < a.data.batch; s += stride)
    sample::SampleBackward<T, SharedAtomicAdd<T>>(a.data, params, s, hidden, work, sums).run();
  __syncthreads();
  for (int64_t i = threadIdx.x; i < count; i += blockDim.x) atomicAdd(a.grad_params + i, grad[i]);
}

template <typename T>
std::tuple<Tensor, Tensor> mlp_solve_backward_impl(const MlpBackwardCall& call) {
  static_assert(sizeof(BackwardArgs<T>) <= kMaxKernelParams, "the backward's arguments must fit a launch");
  const int64_t batch = call.batch, dim = call.dim;
  const int device = call.grad_ys.get_device_index();
  cudaStream_t stream = current_stream(call.grad_ys);
  Tensor grad_y0 = new_contiguous(call.grad_ys, {batch, dim}, dtype_code(call.grad_ys));
  Tensor grad_params = new_contiguous(call.grad_ys, {call.mlp.params}, dtype_code(call.grad_ys));
  BackwardArgs<T> a{};
  a.data = sample::backward_data<T>(call, grad_y0);
  a.params = call.params.template const_data_ptr<T>();
  a.grad_params = grad_params.mutable_data_ptr<T>();
  FLASHODE_CUDA_CHECK(cudaMemsetAsync(a.grad_params, 0, call.mlp.params * sizeof(T), stream));
  if (batch == 0) return {grad_y0, grad_params};
  const sample::SampleShape& shape = a.data.shape;
  const int threads = block_threads<T>(shape, true, device, "mlp_solve_backward");
  const size_t shared = shared_bytes<T>(shape, true, threads);
  const int blocks = grid_blocks(mlp_backward_kernel<T>, threads, shared, batch,
                                 shape.backward_size * static_cast<int64_t>(sizeof(T)), device);
  Tensor work = new_contiguous(call.grad_ys, {int64_t{blocks} * threads * shape.backward_size},
                               dtype_code(call.grad_ys));
  a.work = work.mutable_data_ptr<T>();
  mlp_backward_kernel<T><<<blocks, threads, shared, stream>>>(a);
  FLASHODE_CUDA_CHECK(cudaGetLastError());
  return {grad_y0, grad_params};
}

std::tuple<Tensor, Tensor> mlp_solve_backward_cuda(Tensor grad_ys, Tensor params, std::vector<int64_t> widths,
                                                   int64_t activation, bool time_concat, bool bias, Tensor t_eval,
                                                   Tensor ckpt_y, Tensor ckpt_t, Tensor ckpt_offsets,
                                                   Tensor out_step, std::vector<double> a, std::vector<double> b,
                                                   std::vector<double> c, std::vector<double> poly,
                                                   double step_size) {
  check_cuda_inputs(grad_ys, "mlp_solve_backward");
  torch::stable::accelerator::DeviceGuard guard(grad_ys.get_device_index());
  const MlpBackwardCall call = prepare_mlp_solve_backward(grad_ys, params, widths, activation, time_concat, bias,
                                                          t_eval, ckpt_y, ckpt_t, ckpt_offsets, out_step, a, b, c,
                                                          poly, step_size);
  return call.grad_ys.scalar_type() == ScalarType::Double ? mlp_solve_backward_impl<double>(call)
                                                          : mlp_solve_backward_impl<float>(call);
}

}  // namespace
}  // namespace flashode

STABLE_TORCH_LIBRARY_IMPL(flashode, CUDA, m) {
  m.impl("mlp_solve", TORCH_BOX(&flashode::mlp_solve_cuda));
  m.impl("mlp_solve_backward", TORCH_BOX(&flashode::mlp_solve_backward_cuda));
}
