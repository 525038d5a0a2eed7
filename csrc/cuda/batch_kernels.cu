// CUDA kernels for the batch-parallel ops (schemas in ../ops.cpp), same semantics as
// ../cpu/batch_kernels.cpp; the per-sample decisions come from the same host/device functions
// (../common/batch_args.h), so both devices accept, write outputs and pick steps alike.
//
// batch_stage is elementwise over the flat (B, N) state. batch_step gives each sample a group of
// G threads: G = 32 (a warp) strides over the sample's elements, G = 1 (a thread per sample) for
// states of a few elements, where a warp would idle. Every lane of a group computes the sample's
// scalar decisions itself from the same reduced values (shuffle-xor reductions leave the sum in
// every lane), so no broadcast is needed; lane 0 alone writes the per-sample bookkeeping. One
// launch per op, on the caller's stream, no host synchronisation and no allocation beyond the
// outputs: a solve's steps can be captured in a CUDA graph.
#include <cuda_runtime.h>

#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>

#include <algorithm>
#include <vector>

#include "common/batch_args.h"

namespace flashode {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxBlocks = 4096;
// Samples of at most this many elements get one thread each in batch_step (else a warp).
constexpr int64_t kThreadPerSampleUpTo = 8;

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

int blocks_for(int64_t threads) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(kMaxBlocks, (threads + kThreads - 1) / kThreads)));
}

// Stage coefficients by value (kernel parameters): no host-to-device copy per step.
struct Coefficients {
  int count = 0;
  double value[kMaxStages];
};

Coefficients pack(const std::vector<double>& c) {
  Coefficients out;
  out.count = static_cast<int>(c.size());
  std::copy(c.begin(), c.end(), out.value);
  return out;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    batch_stage_kernel(const T* __restrict__ y, const T* __restrict__ k, const double* __restrict__ h,
                       const double* __restrict__ t, int64_t batch, int64_t n, Coefficients a, double c,
                       T* __restrict__ out, T* __restrict__ t_out) {
  const int64_t total = batch * n;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  for (int64_t b = first; b < batch; b += stride) t_out[b] = static_cast<T>(t[b] + c * h[b]);
  for (int64_t i = first; i < total; i += stride) {
    const double hb = h[i / n];
    if (hb == 0.0) {  // a stopped sample keeps its state exactly, whatever k holds (0 * inf is NaN)
      out[i] = y[i];
      continue;
    }
    T acc = 0;
    for (int j = 0; j < a.count; ++j) {
      if (a.value[j] != 0.0) acc += static_cast<T>(a.value[j] * hb) * k[j * total + i];
    }
    out[i] = y[i] + acc;
  }
}

std::tuple<Tensor, Tensor> batch_stage_cuda(Tensor y, Tensor k, std::vector<double> a, Tensor h, Tensor t,
                                            double c) {
  STD_TORCH_CHECK(y.is_cuda(), "flashode.batch_stage: expected a CUDA tensor");
  torch::stable::accelerator::DeviceGuard guard(y.get_device_index());
  BatchStageCall call = prepare_batch_stage(y, k, a, h, t, c);
  const int64_t batch = call.y.size(0), n = batch == 0 ? 0 : call.y.numel() / batch;
  if (batch == 0) return {call.out, call.t_out};
  cudaStream_t stream = current_stream(call.y);
  auto launch = [&](auto tag) {
    using T = decltype(tag);
    batch_stage_kernel<T><<<blocks_for(std::max(batch * n, batch)), kThreads, 0, stream>>>(
        call.y.const_data_ptr<T>(), call.k.const_data_ptr<T>(), call.h.const_data_ptr<double>(),
        call.t.const_data_ptr<double>(), batch, n, pack(call.a), c,
        call.out.mutable_data_ptr<T>(), call.t_out.mutable_data_ptr<T>());
  };
  if (call.y.scalar_type() == ScalarType::Double) launch(double{}); else launch(float{});
  FLASHODE_CUDA_CHECK(cudaGetLastError());
  return {call.out, call.t_out};
}

// Everything batch_step_kernel reads, by value (one kernel parameter, under CUDA's 4 KB limit).
template <typename T>
struct StepArgs {
  const T* y;
  const T* k;
  const T* rtol;
  const T* atol;
  const double* t_eval;
  const double* t_end;
  const double* dir;
  T* y_next;
  T* f_next;
  T* ys;
  double* t;
  double* dt;
  double* h;
  int64_t* status;
  int64_t* stats;
  int64_t* next_out;
  double* history;
  bool* accept;
  int64_t batch, n, outputs;
  ToleranceLayout rtol_layout, atol_layout;
  Coefficients b, b_error;
  double poly[kMaxStages * kMaxDenseDegree];
  int degree;
  Controller ctrl;
};
static_assert(sizeof(StepArgs<double>) <= 4096, "batch_step's kernel arguments exceed CUDA's 4 KB limit");

// Sum over the G lanes of a group (G = 1 or 32), left in every lane.
template <int G>
__device__ inline double group_sum(double v) {
  if constexpr (G > 1) {
    for (int offset = G / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  }
  return v;
}

template <typename T, int G>
__global__ void __launch_bounds__(kThreads) batch_step_kernel(const StepArgs<T> a) {
  const int lane = threadIdx.x % G;
  const int64_t groups = static_cast<int64_t>(gridDim.x) * (blockDim.x / G);
  const int64_t n = a.n, total = a.batch * a.n;
  const int count = a.b.count;
  const T* __restrict__ last_row = a.k + (count - 1) * total;
  // Whole groups run the loop together (same trip count), as the shuffles need.
  for (int64_t b = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / G; b < a.batch; b += groups) {
    const int64_t base = b * n;
    if (a.status[b] != kRunning) {  // stopped: state and carried stage stay as they are
      for (int64_t r = lane; r < n; r += G) {
        a.y_next[base + r] = a.y[base + r];
        a.f_next[base + r] = a.k[base + r];
      }
      if (lane == 0) a.accept[b] = false;
      continue;
    }
    const double h = a.h[b], t0 = a.t[b];
    // Pass 1: y1 into y_next, the sum of squared scaled errors and a finiteness sum.
    double sumsq = 0.0, finite = 0.0;
    for (int64_t r = lane; r < n; r += G) {
      const int64_t i = base + r;
      T acc = 0, err = 0;
      for (int j = 0; j < count; ++j) {
        const T kj = a.k[j * total + i];
        if (a.b.value[j] != 0.0) acc += static_cast<T>(a.b.value[j] * h) * kj;
        if (a.b_error.value[j] != 0.0) err += static_cast<T>(a.b_error.value[j] * h) * kj;
      }
      const T y0 = a.y[i];
      const T y1 = y0 + acc;
      a.y_next[i] = y1;
      const T scale = a.atol[tolerance_index(a.atol_layout, i, r)] +
                      a.rtol[tolerance_index(a.rtol_layout, i, r)] * max(abs(y0), abs(y1));
      const double ratio = err / scale;
      sumsq += ratio * ratio;
      finite += static_cast<double>(y1 - y1);
    }
    sumsq = group_sum<G>(sumsq);
    finite = group_sum<G>(finite);
    const double ratio = finite != finite ? nan("") : (n == 0 ? 0.0 : sqrt(sumsq / static_cast<double>(n)));
    const bool accept = ratio <= 1.0;
    double t1 = t0;
    int64_t j = a.next_out[b];
    if (accept) {
      t1 = lands_on_end(a.ctrl, t0, h, a.t_end[b]) ? a.t_end[b] : t0 + h;
      const double* te = a.t_eval + b * a.outputs;
      // Every output time this step reached, from the step's dense output.
      for (; j < a.outputs && (te[j] - t1) * a.dir[b] <= 0.0; ++j) {
        const double theta = (te[j] - t0) / h;
        double w[kMaxStages];
        for (int s = 0; s < count; ++s) w[s] = dense_weight(a.poly, a.degree, s, theta, h);
        T* out = a.ys + (b * a.outputs + j) * n;
        for (int64_t r = lane; r < n; r += G) {
          T acc = 0;
          for (int s = 0; s < count; ++s) {
            if (w[s] != 0.0) acc += static_cast<T>(w[s]) * a.k[s * total + base + r];
          }
          out[r] = a.y[base + r] + acc;
        }
      }
    }
    // A rejected sample keeps y and carries k[0]; an accepted one carries k[S-1].
    for (int64_t r = lane; r < n; r += G) {
      if (accept) {
        a.f_next[base + r] = last_row[base + r];
      } else {
        a.y_next[base + r] = a.y[base + r];
        a.f_next[base + r] = a.k[base + r];
      }
    }
    if (lane == 0) {
      a.accept[b] = accept;
      if (accept) a.next_out[b] = j;
      const SampleState s{a.t + b, a.dt + b, a.h + b, a.status + b, a.stats + b * kStatColumns, a.history + 2 * b};
      advance_sample(a.ctrl, s, ratio, accept, t1, j >= a.outputs, a.t_end[b], a.dir[b]);
    }
  }
}

Tensor batch_step_cuda(Tensor y, Tensor k, Tensor rtol, Tensor atol, std::vector<double> b,
                       std::vector<double> b_error, std::vector<double> poly, Tensor t_eval, Tensor t_end,
                       Tensor direction, Tensor y_next, Tensor f_next, Tensor ys, Tensor t, Tensor dt, Tensor h,
                       Tensor status, Tensor stats, Tensor next_out, Tensor history, std::vector<double> controller,
                       int64_t max_steps) {
  STD_TORCH_CHECK(y.is_cuda(), "flashode.batch_step: expected a CUDA tensor");
  torch::stable::accelerator::DeviceGuard guard(y.get_device_index());
  BatchStepCall call = prepare_batch_step(y, k, rtol, atol, b, b_error, poly, t_eval, t_end, direction, y_next,
                                          f_next, ys, t, dt, h, status, stats, next_out, history, controller,
                                          max_steps);
  if (call.batch == 0) return call.accept;
  cudaStream_t stream = current_stream(call.y);
  auto launch = [&](auto tag) {
    using T = decltype(tag);
    StepArgs<T> args{call.y.const_data_ptr<T>(), call.k.const_data_ptr<T>(), call.rtol.const_data_ptr<T>(),
                     call.atol.const_data_ptr<T>(), call.t_eval.const_data_ptr<double>(),
                     call.t_end.const_data_ptr<double>(), call.dir.const_data_ptr<double>(),
                     call.y_next.mutable_data_ptr<T>(), call.f_next.mutable_data_ptr<T>(),
                     call.ys.mutable_data_ptr<T>(), call.t.mutable_data_ptr<double>(),
                     call.dt.mutable_data_ptr<double>(), call.h.mutable_data_ptr<double>(),
                     call.status.mutable_data_ptr<int64_t>(), call.stats.mutable_data_ptr<int64_t>(),
                     call.next_out.mutable_data_ptr<int64_t>(), call.history.mutable_data_ptr<double>(),
                     call.accept.mutable_data_ptr<bool>(), call.batch, call.n, call.outputs, call.rtol_layout,
                     call.atol_layout, pack(call.b), pack(call.b_error), {}, call.degree, call.ctrl};
    std::copy(call.poly.begin(), call.poly.end(), args.poly);
    if (call.n <= kThreadPerSampleUpTo) {
      batch_step_kernel<T, 1><<<blocks_for(call.batch), kThreads, 0, stream>>>(args);
    } else {
      batch_step_kernel<T, 32><<<blocks_for(call.batch * 32), kThreads, 0, stream>>>(args);
    }
  };
  if (call.y.scalar_type() == ScalarType::Double) launch(double{}); else launch(float{});
  FLASHODE_CUDA_CHECK(cudaGetLastError());
  return call.accept;
}

}  // namespace
}  // namespace flashode

STABLE_TORCH_LIBRARY_IMPL(flashode, CUDA, m) {
  m.impl("batch_stage", TORCH_BOX(&flashode::batch_stage_cuda));
  m.impl("batch_step", TORCH_BOX(&flashode::batch_step_cuda));
}
