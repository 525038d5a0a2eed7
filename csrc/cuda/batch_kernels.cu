// CUDA kernels for the batch-parallel ops (schemas in ../ops.cpp), same semantics as
// ../cpu/batch_kernels.cpp: every sample has its own step, and the step-size control is the shared
// per-sample code in ../common/batch_args.h.
//
// Samples are independent, so each one is handled by a group of G threads: G = 1..32 lanes of a
// warp (several samples per warp) for small states, or a whole block for large ones, picked from N
// at launch (group_size_for). The lanes of a group stride over the sample's N elements, its error
// norm is a butterfly reduction within the group (plus shared memory across the warps of a block),
// and rank 0 runs the controller. One launch per op, on the caller's current stream, with every
// coefficient passed by value as a kernel parameter: no allocation beyond the outputs, no host
// synchronisation, so a solver loop built from these ops can be captured in a CUDA graph.
//
// Arithmetic uses the explicitly rounded intrinsics (__fmul_rn, __dadd_rn, ...) where nvcc would
// otherwise contract a multiply and an add into an FMA: the CPU kernels are built with
// -ffp-contract=off, and so the states, stage values and dense outputs match them element for
// element. Only the per-sample sum of squares is summed in a different order. The file is also
// compiled with -fmad=false (CMakeLists.txt), which covers the code shared with the CPU in
// common/batch_args.h (dense weights, the controller); CUDA's pow may still differ from glibc's in
// the last bit, so step sizes agree to rounding, not bit for bit.
#include <cuda_runtime.h>

#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/csrc/stable/accelerator.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "common/batch_args.h"
#include "cuda/cuda_common.cuh"

namespace flashode {
namespace {

constexpr int kThreads = 256;

// a * b and a + b rounded once each, never fused into an FMA (see the top of the file).
__device__ inline float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ inline double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ inline float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ inline double add_rn(double a, double b) { return __dadd_rn(a, b); }

// acc + (T)(w * h) * k: one stage term, with the per-sample weight rounded to T as the CPU does.
template <typename T>
__device__ inline T add_term(T acc, double w, double h, T k) {
  return add_rn(acc, mul_rn(static_cast<T>(w * h), k));
}

// |x| in x's type, spelled per type so that no overload can route a float through int or double.
__device__ inline float magnitude(float x) { return fabsf(x); }
__device__ inline double magnitude(double x) { return fabs(x); }

// std::max's NaN behaviour (the first argument when unordered), not fmax's.
template <typename T>
__device__ inline T max_like_std(T a, T b) { return a < b ? b : a; }

// The group of G threads that handles one sample: G lanes of a warp (G a power of two up to 32,
// groups never straddling a warp) or, for G = kThreads, the whole block.
template <int G>
struct Group {
  static constexpr bool kWholeBlock = G > 32;
  static_assert(kWholeBlock ? G == kThreads : (G & (G - 1)) == 0, "a group is 1..32 lanes or a block");

  int64_t sample;  // the sample this thread works on (>= batch for the idle groups of the last block)
  int rank;        // 0..G-1 within the group: elements rank, rank + G, ...
  unsigned mask;   // the group's lanes within its warp

  __device__ Group() {
    if constexpr (kWholeBlock) {
      sample = blockIdx.x;
      rank = threadIdx.x;
      mask = 0xffffffffu;
    } else {
      sample = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / G;
      rank = threadIdx.x % G;
      if constexpr (G == 32) {
        mask = 0xffffffffu;
      } else {
        mask = ((1u << G) - 1u) << ((threadIdx.x & 31) & ~(G - 1));
      }
    }
  }

  // The group's sum, the same bits in every thread: a butterfly of commutative adds within each
  // warp (lanes i and i ^ offset add the same two values), then the warp sums in a fixed order.
  // It is also a barrier: what a thread read before it is read before any thread of the group
  // writes after it (rank 0 updates the per-sample state the others read at the start).
  __device__ double sum(double v) const {
    if constexpr (kWholeBlock) {
      __shared__ double warp_sums[kThreads / 32];
      for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
      if ((threadIdx.x & 31) == 0) warp_sums[threadIdx.x >> 5] = v;
      __syncthreads();
      double total = 0.0;
      for (int w = 0; w < kThreads / 32; ++w) total += warp_sums[w];
      return total;
    } else {
      __syncwarp(mask);
      for (int offset = G / 2; offset > 0; offset >>= 1) v += __shfl_xor_sync(mask, v, offset, G);
      return v;
    }
  }
};

// Lanes per sample: about 4 elements per lane (some memory-level parallelism per thread, and as
// few threads as possible idle while rank 0 runs the controller, whose pow calls dominate at small
// N), rounded up to a power of two; past 32 lanes a whole block takes the sample.
int group_size_for(int64_t n) {
  const int64_t target = (n + 3) / 4;
  int g = 1;
  while (g < target && g <= 32) g *= 2;
  return g > 32 ? kThreads : g;
}

// Calls f(std::integral_constant<int, G>) for n's group size: one template per size, not per dtype.
template <typename F>
void with_group_size(int64_t n, const F& f) {
  switch (group_size_for(n)) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 8: f(std::integral_constant<int, 8>{}); break;
    case 16: f(std::integral_constant<int, 16>{}); break;
    case 32: f(std::integral_constant<int, 32>{}); break;
    default: f(std::integral_constant<int, kThreads>{}); break;
  }
}

int blocks_for_groups(int64_t batch, int g) {
  const int64_t blocks = g == kThreads ? batch : (batch * g + kThreads - 1) / kThreads;
  STD_TORCH_CHECK(blocks <= 0x7fffffff, "flashode: batch of ", batch, " samples is too large for one launch");
  return static_cast<int>(blocks);
}

// ------------------------------------------------------------------------------------------------
// batch_stage

// Everything batch_stage_kernel reads, as its one kernel parameter.
template <typename T>
struct StageArgs {
  const T* y;
  const T* k;
  const double* h;
  const double* t;
  T* out;
  T* t_out;
  int64_t batch, n;
  double c;
  int count;
  double a[kMaxStages];
};

// out[b] = y[b] + sum_j (T)(a[j] * h[b]) * k[j][b], rows with a[j] = 0 skipped and nothing added
// when h[b] = 0 (a stopped sample keeps its state whatever k holds: 0 * inf is NaN);
// t_out[b] = (T)(t[b] + c * h[b]).
template <typename T, int G>
__global__ void __launch_bounds__(kThreads) batch_stage_kernel(const StageArgs<T> a) {
  const Group<G> group;
  const int64_t b = group.sample;
  if (b >= a.batch) return;  // a whole group at a time
  const double h = a.h[b];
  if (group.rank == 0) a.t_out[b] = static_cast<T>(__dadd_rn(a.t[b], __dmul_rn(a.c, h)));
  const int64_t stride = a.batch * a.n, first = b * a.n;
  const T* __restrict__ y = a.y + first;
  const T* __restrict__ k = a.k + first;
  T* __restrict__ out = a.out + first;
  for (int64_t i = group.rank; i < a.n; i += G) {
    T acc = 0;
    if (h != 0.0) {
      for (int j = 0; j < a.count; ++j)
        if (a.a[j] != 0.0) acc = add_term(acc, a.a[j], h, k[j * stride + i]);
    }
    out[i] = add_rn(y[i], acc);
  }
}

std::tuple<Tensor, Tensor> batch_stage_cuda(Tensor y, Tensor k, std::vector<double> a, Tensor h, Tensor t,
                                            double c) {
  check_cuda_inputs(y, "batch_stage");
  torch::stable::accelerator::DeviceGuard guard(y.get_device_index());
  BatchStageCall call = prepare_batch_stage(y, k, a, h, t, c);
  const int64_t batch = call.y.size(0);
  if (batch == 0) return {call.out, call.t_out};
  const int64_t n = call.y.numel() / batch;
  cudaStream_t stream = current_stream(call.y);
  auto launch = [&](auto tag) {
    using T = decltype(tag);
    StageArgs<T> args{call.y.const_data_ptr<T>(),
                      call.k.const_data_ptr<T>(),
                      call.h.const_data_ptr<double>(),
                      call.t.const_data_ptr<double>(),
                      call.out.mutable_data_ptr<T>(),
                      call.t_out.mutable_data_ptr<T>(),
                      batch,
                      n,
                      call.c,
                      static_cast<int>(call.a.size()),
                      {}};
    std::copy(call.a.begin(), call.a.end(), args.a);
    with_group_size(n, [&](auto g) {
      batch_stage_kernel<T, decltype(g)::value>
          <<<blocks_for_groups(batch, decltype(g)::value), kThreads, 0, stream>>>(args);
    });
  };
  if (call.y.scalar_type() == ScalarType::Double) launch(double{}); else launch(float{});
  FLASHODE_CUDA_CHECK(cudaGetLastError());
  return {call.out, call.t_out};
}

// ------------------------------------------------------------------------------------------------
// batch_step

// Everything batch_step_kernel reads, as its one kernel parameter (the tableau and the controller
// included: no host-to-device copy per step).
template <typename T>
struct StepArgs {
  const T* y;
  const T* k;
  const T* rtol;
  const T* atol;
  const double* t_eval;  // (B, T)
  const double* t_end;
  const double* dir;
  T* y_next;
  T* f_next;
  T* ys;                 // (B, T, N)
  double* t;
  double* dt;
  double* h;
  int64_t* status;
  int64_t* stats;        // (B, kStatColumns)
  int64_t* next_out;
  double* history;       // (B, 2)
  bool* accept;
  int64_t batch, n, outputs;
  ToleranceLayout rtol_layout, atol_layout;
  int count;             // stages S (b, b_error and the poly rows all have S entries)
  int degree;
  Controller ctrl;
  double b[kMaxStages];
  double b_error[kMaxStages];
  double poly[kMaxStages * kMaxDenseDegree];
};
static_assert(sizeof(StepArgs<float>) <= 4096 && sizeof(StepArgs<double>) <= 4096,
              "batch_step's kernel arguments exceed CUDA's 4 KB parameter limit");

// One group per sample. A running sample:
//   1. y1 = y + sum_j (T)(b[j] h) k[j] into y_next, and its scaled error into the group's sum of
//      squares (NaN when some y1 is not finite); f_next = k[S-1]. Both are written before the
//      decision because most steps are accepted: a rejection rewrites them, an acceptance has
//      nothing left to copy.
//   2. ratio = RMS, accept = ratio <= 1 (the same in every thread of the group, see Group::sum).
//   3. accepted: every output time the step reached, from the dense output around y;
//      rejected: y_next = y, f_next = k[0].
//   4. rank 0: accept, next_out and the controller (advance_sample).
// A stopped sample copies y and k[0] and changes nothing else.
template <typename T, int G>
__global__ void __launch_bounds__(kThreads) batch_step_kernel(const StepArgs<T> a) {
  const Group<G> group;
  const int64_t b = group.sample;
  if (b >= a.batch) return;  // a whole group at a time
  const int64_t n = a.n, stride = a.batch * n, first = b * n;
  const T* __restrict__ y = a.y + first;
  const T* __restrict__ k = a.k + first;  // k[j][b] is k + j * stride
  T* __restrict__ y_next = a.y_next + first;
  T* __restrict__ f_next = a.f_next + first;

  // Every per-sample value rank 0 may update is read here, before the group's sum (a barrier).
  if (a.status[b] != kRunning) {
    for (int64_t i = group.rank; i < n; i += G) {
      y_next[i] = y[i];
      f_next[i] = k[i];
    }
    if (group.rank == 0) a.accept[b] = false;
    return;
  }
  const double h = a.h[b], t0 = a.t[b], t_end = a.t_end[b], dir = a.dir[b];
  const int64_t out0 = a.next_out[b];

  // 1. y1, f_next and the sum of squared scaled errors.
  const T* __restrict__ last = k + (a.count - 1) * stride;
  double sumsq = 0.0;
  bool nonfinite = false;
  for (int64_t i = group.rank; i < n; i += G) {
    T acc = 0, err = 0;
    for (int s = 0; s < a.count; ++s) {
      const bool in_sol = a.b[s] != 0.0, in_err = a.b_error[s] != 0.0;
      if (!in_sol && !in_err) continue;  // a row neither combination uses is not even read
      const T ks = k[s * stride + i];
      if (in_sol) acc = add_term(acc, a.b[s], h, ks);
      if (in_err) err = add_term(err, a.b_error[s], h, ks);
    }
    const T y0 = y[i];
    const T y1 = add_rn(y0, acc);
    y_next[i] = y1;
    f_next[i] = last[i];
    nonfinite = nonfinite || !isfinite(y1);
    const T rt = a.rtol[tolerance_index(a.rtol_layout, first + i, i)];
    const T at = a.atol[tolerance_index(a.atol_layout, first + i, i)];
    const double r = err / add_rn(at, mul_rn(rt, max_like_std(magnitude(y0), magnitude(y1))));
    sumsq = __dadd_rn(sumsq, __dmul_rn(r, r));
  }
  // A non-finite y1 makes the sample's ratio NaN (as on the CPU): NaN survives the sum, and a
  // NaN sum of squares without one (an error that is NaN with y1 finite) is a NaN ratio on the
  // CPU too, so one reduction covers both.
  if (nonfinite) sumsq = __longlong_as_double(0x7ff8000000000000LL);

  // 2. The decision.
  const double total = group.sum(sumsq);
  const double ratio = n == 0 ? 0.0 : sqrt(total / static_cast<double>(n));
  const bool accept = ratio <= 1.0;

  // 3. Outputs, or the rejected step's carry.
  double t1 = t0;
  int64_t j = out0;
  if (accept) {
    t1 = lands_on_end(a.ctrl, t0, h, t_end) ? t_end : t0 + h;
    const double* te = a.t_eval + b * a.outputs;
    // Every thread walks the output times (the same values: a group-uniform loop) and writes its
    // elements of each one. The dense weights are evaluated per element rather than staged in an
    // array: a runtime-indexed array would live in local memory, and the degree-D polynomial is
    // a few FMAs against S loads.
    for (; j < a.outputs && (te[j] - t1) * dir <= 0.0; ++j) {
      const double theta = (te[j] - t0) / h;
      T* __restrict__ out = a.ys + (b * a.outputs + j) * n;
      for (int64_t i = group.rank; i < n; i += G) {
        T acc = 0;
        for (int s = 0; s < a.count; ++s) {
          const double w = dense_weight(a.poly, a.degree, s, theta, h);
          if (w != 0.0) acc = add_rn(acc, mul_rn(static_cast<T>(w), k[s * stride + i]));
        }
        out[i] = add_rn(y[i], acc);
      }
    }
  } else {
    for (int64_t i = group.rank; i < n; i += G) {
      y_next[i] = y[i];
      f_next[i] = k[i];
    }
  }

  // 4. The controller, once per sample.
  if (group.rank == 0) {
    a.accept[b] = accept;
    if (accept) a.next_out[b] = j;
    const SampleState s{a.t + b, a.dt + b, a.h + b, a.status + b, a.stats + b * kStatColumns, a.history + 2 * b};
    advance_sample(a.ctrl, s, ratio, accept, t1, j >= a.outputs, t_end, dir);
  }
}

Tensor batch_step_cuda(Tensor y, Tensor k, Tensor rtol, Tensor atol, std::vector<double> b,
                       std::vector<double> b_error, std::vector<double> poly, Tensor t_eval, Tensor t_end,
                       Tensor direction, Tensor y_next, Tensor f_next, Tensor ys, Tensor t, Tensor dt, Tensor h,
                       Tensor status, Tensor stats, Tensor next_out, Tensor history, std::vector<double> controller,
                       int64_t max_steps) {
  check_cuda_inputs(y, "batch_step");
  torch::stable::accelerator::DeviceGuard guard(y.get_device_index());
  BatchStepCall call = prepare_batch_step(y, k, rtol, atol, b, b_error, poly, t_eval, t_end, direction, y_next,
                                          f_next, ys, t, dt, h, status, stats, next_out, history, controller,
                                          max_steps);
  if (call.batch == 0) return call.accept;
  cudaStream_t stream = current_stream(call.y);
  auto launch = [&](auto tag) {
    using T = decltype(tag);
    StepArgs<T> args{call.y.const_data_ptr<T>(),
                     call.k.const_data_ptr<T>(),
                     call.rtol.const_data_ptr<T>(),
                     call.atol.const_data_ptr<T>(),
                     call.t_eval.const_data_ptr<double>(),
                     call.t_end.const_data_ptr<double>(),
                     call.dir.const_data_ptr<double>(),
                     call.y_next.mutable_data_ptr<T>(),
                     call.f_next.mutable_data_ptr<T>(),
                     call.ys.mutable_data_ptr<T>(),
                     call.t.mutable_data_ptr<double>(),
                     call.dt.mutable_data_ptr<double>(),
                     call.h.mutable_data_ptr<double>(),
                     call.status.mutable_data_ptr<int64_t>(),
                     call.stats.mutable_data_ptr<int64_t>(),
                     call.next_out.mutable_data_ptr<int64_t>(),
                     call.history.mutable_data_ptr<double>(),
                     call.accept.mutable_data_ptr<bool>(),
                     call.batch,
                     call.n,
                     call.outputs,
                     call.rtol_layout,
                     call.atol_layout,
                     static_cast<int>(call.b.size()),
                     call.degree,
                     call.ctrl,
                     {},
                     {},
                     {}};
    std::copy(call.b.begin(), call.b.end(), args.b);
    std::copy(call.b_error.begin(), call.b_error.end(), args.b_error);
    std::copy(call.poly.begin(), call.poly.end(), args.poly);
    with_group_size(call.n, [&](auto g) {
      batch_step_kernel<T, decltype(g)::value>
          <<<blocks_for_groups(call.batch, decltype(g)::value), kThreads, 0, stream>>>(args);
    });
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
