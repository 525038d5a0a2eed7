// CUDA kernels for the fused Runge–Kutta ops (schemas in ../ops.cpp), same semantics as
// ../cpu/rk_kernels.cpp and python/flashode/_reference.py.
//
// Elementwise passes use grid-stride loops with 16-byte vector loads (float4 / double2) when every
// row is aligned, and scalar loads otherwise. The error norm is a one-pass block reduction: each
// block writes one partial sum for its segment and the last block to finish folds the partials,
// so rk_finalize is a single kernel launch. Kernels run on the caller's current stream.
#include <cuda_runtime.h>

#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/csrc/stable/accelerator.h>

#include <algorithm>
#include <vector>

#include "common/rk_args.h"
#include "cuda/cuda_common.cuh"

namespace flashode {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxBlocks = 1024;

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

// Everything finalize_kernel reads, passed by value as its one kernel parameter (coefficients and
// segment ends included: no host-to-device copy per step).
template <typename T>
struct FinalizeArgs {
  const T* y;
  const T* k;
  const T* rtol;
  const T* atol;
  T* y1;
  T* err_out;               // nullptr unless return_error
  double* partials;         // [block * seg.count + segment]: each block's sum of squares
  unsigned int* counters;   // [0] ticket, [1] non-finite flag: both zero before the launch
  double* ratio;            // 1 value, or seg.count with per_segment
  int64_t n;
  StageTerms sol, errw;
  Segments seg;
  bool rtol_per_element, atol_per_element, per_segment;
};
// Kernel parameters are limited to 4 KB (the kMaxSegments segment ends are most of it).
static_assert(sizeof(FinalizeArgs<float>) <= 4096 && sizeof(FinalizeArgs<double>) <= 4096,
              "rk_finalize's kernel arguments exceed CUDA's 4 KB parameter limit");

// max that propagates NaN from either side (fmax drops it).
__device__ inline double max_or_nan(double a, double b) { return isnan(a) || a > b ? a : b; }

// grid = (blocks, rows): rows 0..seg.count-1 are the norm segments, and a last row, when elements
// follow the last segment end, is that tail. Each block covers part of one row, writes y1/err,
// adds its partial sum of squared scaled errors to partials (segment rows only) and raises the
// non-finite flag if it saw a non-finite y1 (any row). The last block to finish (a ticket counter)
// folds the partials: thread s sums segment s's partials in block order (deterministic for a given
// launch shape), then writes each RMS (per_segment) or thread 0 takes their max.
template <typename T>
__global__ void __launch_bounds__(kThreads) finalize_kernel(const FinalizeArgs<T> a) {
  const T* __restrict__ y = a.y;
  const T* __restrict__ k = a.k;
  const T* __restrict__ rtol = a.rtol;
  const T* __restrict__ atol = a.atol;
  T* __restrict__ y1 = a.y1;
  T* __restrict__ err_out = a.err_out;
  const int64_t n = a.n;
  const int row = blockIdx.y;
  const bool in_norm = row < a.seg.count;
  const int64_t begin = in_norm ? a.seg.begin_of(row) : a.seg.tail_begin();
  const int64_t end = in_norm ? a.seg.end[row] : n;
  double local = 0.0;
  bool nonfinite = false;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = begin + static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < end; i += stride) {
    const T y0 = y[i];
    const T y1i = y0 + combine(k, n, a.sol, i);
    y1[i] = y1i;
    nonfinite = nonfinite || !isfinite(y1i);
    if (in_norm || err_out != nullptr) {
      const T e = combine(k, n, a.errw, i);
      if (err_out != nullptr) err_out[i] = e;
      if (in_norm) {
        const T rt = rtol[a.rtol_per_element ? i : 0];
        const T at = atol[a.atol_per_element ? i : 0];
        const T r = e / (at + rt * max(abs(y0), abs(y1i)));
        local += static_cast<double>(r) * static_cast<double>(r);
      }
    }
  }
  const bool block_nonfinite = __syncthreads_or(nonfinite);
  // Block reduction: warp shuffles, then one value per warp through shared memory.
  __shared__ double warp_sums[kThreads / 32];
  for (int offset = 16; offset > 0; offset >>= 1) local += __shfl_down_sync(0xffffffffu, local, offset);
  if ((threadIdx.x & 31) == 0) warp_sums[threadIdx.x >> 5] = local;
  __syncthreads();
  __shared__ bool last_block;
  if (threadIdx.x == 0) {
    if (in_norm) {
      double block_sum = 0.0;
      for (int w = 0; w < kThreads / 32; ++w) block_sum += warp_sums[w];
      a.partials[static_cast<int64_t>(blockIdx.x) * a.seg.count + row] = block_sum;
    }
    if (block_nonfinite) atomicOr(&a.counters[1], 1u);
    __threadfence();
    const unsigned int done = atomicAdd(&a.counters[0], 1u);
    last_block = done == gridDim.x * gridDim.y - 1;
  }
  __syncthreads();
  if (!last_block) return;  // the rest runs in the last block only (a block-uniform branch)
  __threadfence();
  __shared__ bool poisoned;
  if (threadIdx.x == 0) poisoned = atomicAdd(&a.counters[1], 0u) != 0u;
  __syncthreads();
  // A non-finite y1 anywhere, the tail included, makes every value NaN.
  const double poison = poisoned ? __longlong_as_double(0x7ff8000000000000LL) : 0.0;
  double largest = 0.0;
  for (int s = threadIdx.x; s < a.seg.count; s += blockDim.x) {
    const int64_t size = a.seg.end[s] - a.seg.begin_of(s);
    double sumsq = 0.0;  // fixed order; __ldcg reads L2, where the other blocks' writes are
    for (int b = 0; b < gridDim.x; ++b)
      sumsq += __ldcg(a.partials + static_cast<int64_t>(b) * a.seg.count + s);
    const double rms = (size == 0 ? 0.0 : sqrt(sumsq / static_cast<double>(size))) + poison;
    if (a.per_segment) a.ratio[s] = rms;
    largest = max_or_nan(largest, rms);
  }
  if (!a.per_segment) {
    __shared__ double thread_max[kThreads];
    thread_max[threadIdx.x] = largest;
    __syncthreads();
    if (threadIdx.x == 0) {
      double result = 0.0;
      for (int t = 0; t < kThreads; ++t) result = max_or_nan(result, thread_max[t]);
      *a.ratio = result;
    }
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
                                                    bool return_error, bool per_segment) {
  check_cuda_inputs(y, "rk_finalize");
  torch::stable::accelerator::DeviceGuard guard(y.get_device_index());
  FinalizeCall call =
      prepare_finalize(y, k, b, b_error, h, rtol, atol, segment_ends, return_error, per_segment);
  const int64_t n = call.y.numel();
  const Segments& seg = call.seg;
  const int64_t tail = n - seg.tail_begin();
  int64_t largest = tail;
  for (int s = 0; s < seg.count; ++s) largest = std::max(largest, seg.end[s] - seg.begin_of(s));
  const int blocks = blocks_for(largest);
  const int rows = seg.count + (tail > 0 ? 1 : 0);  // the segments, then the tail if any
  // Scratch: partial sums, then one slot for the two counters that must start at zero.
  const int64_t slots = static_cast<int64_t>(blocks) * seg.count + 1;
  Tensor scratch = new_contiguous(call.y, {slots}, aoti_torch_dtype_float64());
  double* partials = scratch.mutable_data_ptr<double>();
  unsigned int* counters = reinterpret_cast<unsigned int*>(partials + slots - 1);
  cudaStream_t stream = current_stream(call.y);
  FLASHODE_CUDA_CHECK(cudaMemsetAsync(counters, 0, sizeof(double), stream));
  auto launch = [&](auto tag) {
    using T = decltype(tag);
    FinalizeArgs<T> args{call.y.const_data_ptr<T>(),
                         call.k.const_data_ptr<T>(),
                         call.rtol.const_data_ptr<T>(),
                         call.atol.const_data_ptr<T>(),
                         call.y1.mutable_data_ptr<T>(),
                         return_error ? call.err.mutable_data_ptr<T>() : nullptr,
                         partials,
                         counters,
                         call.ratio.mutable_data_ptr<double>(),
                         n,
                         call.sol,
                         call.errw,
                         seg,
                         call.rtol.numel() != 1,
                         call.atol.numel() != 1,
                         per_segment};
    finalize_kernel<T><<<dim3(blocks, rows), kThreads, 0, stream>>>(args);
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
