// CUDA kernels for the fused Runge–Kutta ops (schemas in ../ops.cpp), same semantics as
// ../cpu/rk_kernels.cpp and python/flashode/_reference.py.
//
// Elementwise passes use grid-stride loops with 16-byte vector loads (float4 / double2) when every
// row is aligned, and scalar loads otherwise. The error norm is a one-pass block reduction: each
// block writes one partial sum per segment and the last block to finish folds the partials, so
// rk_finalize is a single kernel launch. Kernels run on the caller's current stream.
#include <cuda_runtime.h>

#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/csrc/stable/accelerator.h>

#include <algorithm>
#include <vector>

#include "common/rk_args.h"

namespace flashode {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxBlocks = 1024;

#define FLASHODE_CUDA_CHECK(expr)                                                            \
  do {                                                                                       \
    cudaError_t _err = (expr);                                                               \
    STD_TORCH_CHECK(_err == cudaSuccess, "flashode CUDA error: ", cudaGetErrorString(_err)); \
  } while (0)

cudaStream_t current_stream(const Tensor& t) {
  void* stream = nullptr;
  STABLE_TORCH_ERROR_CODE_CHECK(aoti_torch_get_current_cuda_stream(t.get_device_index(), &stream));
  return static_cast<cudaStream_t>(stream);
}

int blocks_for(int64_t work) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(kMaxBlocks, (work + kThreads - 1) / kThreads)));
}

// Vector types for 16-byte loads.
template <typename T> struct Vec;
template <> struct Vec<float> { using type = float4; static constexpr int width = 4; };
template <> struct Vec<double> { using type = double2; static constexpr int width = 2; };

template <typename T>
__device__ inline T lane(const typename Vec<T>::type& v, int l);
template <>
__device__ inline float lane<float>(const float4& v, int l) {
  return l == 0 ? v.x : l == 1 ? v.y : l == 2 ? v.z : v.w;
}
template <>
__device__ inline double lane<double>(const double2& v, int l) { return l == 0 ? v.x : v.y; }

// sum_t w_t k[idx_t][i] for one element.
template <typename T>
__device__ inline T combine(const T* __restrict__ k, int64_t n, const StageTerms& terms, int64_t i) {
  T acc = 0;
  for (int t = 0; t < terms.count; ++t) acc += static_cast<T>(terms.weight[t]) * k[terms.index[t] * n + i];
  return acc;
}

// out = y + sum_t w_t k[idx_t]; `vectorised` means n % width == 0 and all pointers 16-byte aligned.
template <typename T>
__global__ void stage_kernel(const T* __restrict__ y, const T* __restrict__ k, int64_t n,
                             StageTerms terms, T* __restrict__ out, bool vectorised) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (vectorised) {
    using V = typename Vec<T>::type;
    constexpr int W = Vec<T>::width;
    const int64_t nv = n / W;
    for (int64_t v = first; v < nv; v += stride) {
      T acc[W] = {};
      for (int t = 0; t < terms.count; ++t) {
        const V kv = reinterpret_cast<const V*>(k + terms.index[t] * n)[v];
        const T w = static_cast<T>(terms.weight[t]);
        for (int l = 0; l < W; ++l) acc[l] += w * lane<T>(kv, l);
      }
      const V yv = reinterpret_cast<const V*>(y)[v];
      V ov;
      T* o = reinterpret_cast<T*>(&ov);
      for (int l = 0; l < W; ++l) o[l] = lane<T>(yv, l) + acc[l];
      reinterpret_cast<V*>(out)[v] = ov;
    }
  } else {
    for (int64_t i = first; i < n; i += stride) out[i] = y[i] + combine(k, n, terms, i);
  }
}

struct Tolerances {
  const void* rtol;
  const void* atol;
  bool rtol_per_element;
  bool atol_per_element;
};

struct SegmentArgs {
  Segments seg;
};

// grid = (blocks, segments). Each block covers part of one segment, writes y1/err, and adds its
// partial sum of squared scaled errors to partials[segment * gridDim.x + block]. The last block to
// finish (a ticket counter zeroed before the launch) folds the partials into the ratio.
template <typename T>
__global__ void finalize_kernel(const T* __restrict__ y, const T* __restrict__ k, int64_t n,
                                StageTerms sol, StageTerms errw, Tolerances tol, SegmentArgs segs,
                                T* __restrict__ y1, T* __restrict__ err_out,
                                double* __restrict__ partials, unsigned int* __restrict__ ticket,
                                double* __restrict__ ratio) {
  const int s = blockIdx.y;
  const int64_t seg_begin = s == 0 ? 0 : segs.seg.end[s - 1];
  const int64_t seg_end = segs.seg.end[s];
  const T* rtol = static_cast<const T*>(tol.rtol);
  const T* atol = static_cast<const T*>(tol.atol);
  double local = 0.0;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = seg_begin + static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < seg_end;
       i += stride) {
    const T y0 = y[i];
    const T y1i = y0 + combine(k, n, sol, i);
    const T e = combine(k, n, errw, i);
    y1[i] = y1i;
    if (err_out != nullptr) err_out[i] = e;
    const T rt = rtol[tol.rtol_per_element ? i : 0];
    const T at = atol[tol.atol_per_element ? i : 0];
    const T r = e / (at + rt * max(abs(y0), abs(y1i))) + (y1i - y1i);  // NaN when y1 is not finite
    local += static_cast<double>(r) * static_cast<double>(r);
  }
  // Block reduction: warp shuffles, then one value per warp through shared memory.
  __shared__ double warp_sums[kThreads / 32];
  for (int offset = 16; offset > 0; offset >>= 1) local += __shfl_down_sync(0xffffffffu, local, offset);
  if ((threadIdx.x & 31) == 0) warp_sums[threadIdx.x >> 5] = local;
  __syncthreads();
  __shared__ bool last_block;
  if (threadIdx.x == 0) {
    double block_sum = 0.0;
    for (int w = 0; w < kThreads / 32; ++w) block_sum += warp_sums[w];
    partials[s * gridDim.x + blockIdx.x] = block_sum;
    __threadfence();
    const unsigned int done = atomicAdd(ticket, 1u);
    last_block = done == gridDim.x * gridDim.y - 1;
  }
  __syncthreads();
  if (last_block && threadIdx.x == 0) {
    __threadfence();
    double result = 0.0;
    bool nan = false;
    for (int sg = 0; sg < gridDim.y; ++sg) {
      const int64_t begin = sg == 0 ? 0 : segs.seg.end[sg - 1];
      const int64_t size = segs.seg.end[sg] - begin;
      if (size == 0) continue;
      double sumsq = 0.0;  // fixed order: deterministic for a given launch shape
      for (int b = 0; b < gridDim.x; ++b) sumsq += partials[sg * gridDim.x + b];
      const double rms = sqrt(sumsq / static_cast<double>(size));
      nan = nan || isnan(rms);
      result = fmax(result, rms);
    }
    *ratio = nan ? __longlong_as_double(0x7ff8000000000000LL) : result;
  }
}

template <typename T>
__global__ void dense_kernel(const T* __restrict__ y, const T* __restrict__ k, int64_t n,
                             const StageTerms* __restrict__ terms, int64_t outputs,
                             T* __restrict__ out) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const T y0 = y[i];
    for (int64_t m = 0; m < outputs; ++m) out[m * n + i] = y0 + combine(k, n, terms[m], i);
  }
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

void check_cuda_inputs(const Tensor& y, const char* op) {
  STD_TORCH_CHECK(y.is_cuda(), "flashode.", op, ": expected a CUDA tensor");
}

Tensor rk_stage_cuda(Tensor y, Tensor k, std::vector<double> a, double h) {
  check_cuda_inputs(y, "rk_stage");
  torch::stable::accelerator::DeviceGuard guard(y.get_device_index());
  StageCall call = prepare_stage(y, k, a, h);
  const int64_t n = call.y.numel();
  if (n == 0) return call.out;
  cudaStream_t stream = current_stream(call.y);
  auto launch = [&](auto tag) {
    using T = decltype(tag);
    const T* yp = call.y.const_data_ptr<T>();
    const T* kp = call.k.const_data_ptr<T>();
    T* op = call.out.mutable_data_ptr<T>();
    const bool vec = n % Vec<T>::width == 0 && aligned16(yp) && aligned16(kp) && aligned16(op);
    stage_kernel<T><<<blocks_for(vec ? n / Vec<T>::width : n), kThreads, 0, stream>>>(yp, kp, n, call.terms, op, vec);
  };
  if (call.y.scalar_type() == ScalarType::Double) launch(double{}); else launch(float{});
  FLASHODE_CUDA_CHECK(cudaGetLastError());
  return call.out;
}

std::tuple<Tensor, Tensor, Tensor> rk_finalize_cuda(Tensor y, Tensor k, std::vector<double> b,
                                                    std::vector<double> b_error, double h,
                                                    Tensor rtol, Tensor atol,
                                                    std::vector<int64_t> segment_ends,
                                                    bool return_error) {
  check_cuda_inputs(y, "rk_finalize");
  torch::stable::accelerator::DeviceGuard guard(y.get_device_index());
  FinalizeCall call = prepare_finalize(y, k, b, b_error, h, rtol, atol, segment_ends, return_error);
  const int64_t n = call.y.numel();
  SegmentArgs segs{call.seg};
  int64_t largest = 0, prev = 0;
  for (int s = 0; s < segs.seg.count; ++s) {
    largest = std::max(largest, segs.seg.end[s] - prev);
    prev = segs.seg.end[s];
  }
  const int blocks = blocks_for(largest);
  // Scratch: partial sums, then one ticket counter that must start at zero.
  const int64_t slots = static_cast<int64_t>(blocks) * segs.seg.count + 1;
  Tensor scratch = new_contiguous(call.y, {slots}, aoti_torch_dtype_float64());
  double* partials = scratch.mutable_data_ptr<double>();
  unsigned int* ticket = reinterpret_cast<unsigned int*>(partials + slots - 1);
  cudaStream_t stream = current_stream(call.y);
  FLASHODE_CUDA_CHECK(cudaMemsetAsync(ticket, 0, sizeof(double), stream));
  Tolerances tol{call.rtol.const_data_ptr(), call.atol.const_data_ptr(), call.rtol.numel() != 1,
                 call.atol.numel() != 1};
  const dim3 grid(blocks, segs.seg.count);
  auto launch = [&](auto tag) {
    using T = decltype(tag);
    finalize_kernel<T><<<grid, kThreads, 0, stream>>>(
        call.y.const_data_ptr<T>(), call.k.const_data_ptr<T>(), n, call.sol, call.errw, tol, segs,
        call.y1.mutable_data_ptr<T>(), return_error ? call.err.mutable_data_ptr<T>() : nullptr,
        partials, ticket, call.ratio.mutable_data_ptr<double>());
  };
  if (call.y.scalar_type() == ScalarType::Double) launch(double{}); else launch(float{});
  FLASHODE_CUDA_CHECK(cudaGetLastError());
  return {call.y1, call.err, call.ratio};
}

Tensor rk_dense_cuda(Tensor y, Tensor k, std::vector<double> poly, std::vector<double> theta,
                     double h) {
  check_cuda_inputs(y, "rk_dense");
  torch::stable::accelerator::DeviceGuard guard(y.get_device_index());
  DenseCall call = prepare_dense(y, k, poly, theta, h);
  const int64_t n = call.y.numel(), outputs = static_cast<int64_t>(call.terms.size());
  if (n == 0 || outputs == 0) return call.out;
  // The per-output coefficient sets go to the device in one stream-ordered copy.
  const int64_t bytes = outputs * static_cast<int64_t>(sizeof(StageTerms));
  Tensor dev_terms = new_contiguous(call.y, {bytes}, aoti_torch_dtype_uint8());
  cudaStream_t stream = current_stream(call.y);
  FLASHODE_CUDA_CHECK(cudaMemcpyAsync(dev_terms.mutable_data_ptr(), call.terms.data(), bytes,
                                      cudaMemcpyHostToDevice, stream));
  auto launch = [&](auto tag) {
    using T = decltype(tag);
    dense_kernel<T><<<blocks_for(n), kThreads, 0, stream>>>(
        call.y.const_data_ptr<T>(), call.k.const_data_ptr<T>(), n,
        static_cast<const StageTerms*>(dev_terms.const_data_ptr()), outputs,
        call.out.mutable_data_ptr<T>());
  };
  if (call.y.scalar_type() == ScalarType::Double) launch(double{}); else launch(float{});
  FLASHODE_CUDA_CHECK(cudaGetLastError());
  return call.out;
}

}  // namespace
}  // namespace flashode

STABLE_TORCH_LIBRARY_IMPL(flashode, CUDA, m) {
  m.impl("rk_stage", TORCH_BOX(&flashode::rk_stage_cuda));
  m.impl("rk_finalize", TORCH_BOX(&flashode::rk_finalize_cuda));
  m.impl("rk_dense", TORCH_BOX(&flashode::rk_dense_cuda));
}
