// CPU kernels for the batch-parallel ops (schemas in ../ops.cpp): every sample has its own step.
//
// Samples are independent, so work is split by sample: fixed groups of whole samples (about
// kChunkElements elements each) run on torch's intra-op thread pool, and each sample's error norm is
// summed by one thread in element order: results do not depend on the thread count. Within a
// sample the state is walked in tiles that stay in L1 while the stage rows are folded in.
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "common/batch_args.h"

namespace flashode {
namespace {

constexpr int64_t kTile = 256;
constexpr int64_t kChunkElements = 16384;

// Runs body(b0, b1) over the samples [0, batch) in fixed groups of whole samples.
template <typename F>
void for_each_sample_group(int64_t batch, int64_t n, const F& body) {
  const int64_t per_group = std::max<int64_t>(1, kChunkElements / std::max<int64_t>(n, 1));
  const int64_t groups = (batch + per_group - 1) / per_group;
  if (groups <= 1) {
    body(int64_t{0}, batch);
    return;
  }
  torch::stable::parallel_for(0, groups, 1, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) body(g * per_group, std::min(batch, (g + 1) * per_group));
  });
}

// out[i] = y[i] + sum_j w[j] * k_row_j[i] over one sample's n elements (rows `stride` apart).
template <typename T>
void combine_sample(const T* __restrict y, const T* __restrict k, int64_t stride, const double* w, int count,
                    T* __restrict out, int64_t n) {
  for (int64_t i0 = 0; i0 < n; i0 += kTile) {
    const int64_t len = std::min(kTile, n - i0);
    T acc[kTile];
    for (int64_t i = 0; i < len; ++i) acc[i] = 0;
    for (int j = 0; j < count; ++j) {
      if (w[j] == 0.0) continue;  // a zero weight skips the row (0 * inf must not poison y)
      const T wj = static_cast<T>(w[j]);
      const T* __restrict row = k + j * stride + i0;
      for (int64_t i = 0; i < len; ++i) acc[i] += wj * row[i];
    }
    for (int64_t i = 0; i < len; ++i) out[i0 + i] = static_cast<T>(y[i0 + i] + acc[i]);
  }
}

template <typename T>
void batch_stage_impl(BatchStageCall& call) {
  const int64_t batch = call.y.size(0), n = batch == 0 ? 0 : call.y.numel() / batch;
  const int64_t stride = batch * n;
  const T* yp = call.y.const_data_ptr<T>();
  const T* kp = call.k.const_data_ptr<T>();
  const double* hp = call.h.const_data_ptr<double>();
  const double* tp = call.t.const_data_ptr<double>();
  T* op = call.out.mutable_data_ptr<T>();
  T* top = call.t_out.mutable_data_ptr<T>();
  const int count = static_cast<int>(call.a.size());
  for_each_sample_group(batch, n, [&](int64_t b0, int64_t b1) {
    double w[kMaxStages];
    for (int64_t b = b0; b < b1; ++b) {
      top[b] = static_cast<T>(tp[b] + call.c * hp[b]);
      if (hp[b] == 0.0) {  // a stopped sample: its stage state is its state, whatever k holds
        std::copy(yp + b * n, yp + (b + 1) * n, op + b * n);
        continue;
      }
      for (int j = 0; j < count; ++j) w[j] = call.a[j] * hp[b];
      combine_sample(yp + b * n, kp + b * n, stride, w, count, op + b * n, n);
    }
  });
}

std::tuple<Tensor, Tensor> batch_stage_cpu(Tensor y, Tensor k, std::vector<double> a, Tensor h, Tensor t,
                                           double c) {
  BatchStageCall call = prepare_batch_stage(y, k, a, h, t, c);
  if (call.y.scalar_type() == ScalarType::Double) batch_stage_impl<double>(call); else batch_stage_impl<float>(call);
  return {call.out, call.t_out};
}

// One sample's finalisation: writes y1 and returns RMS(err / (atol + rtol max(|y|, |y1|))), NaN if
// any y1 is not finite. Squares are summed in double in element order.
template <typename T>
double finalize_sample(const T* __restrict y, const T* __restrict k, int64_t stride, const double* wb,
                       const double* we, int count, const T* rtol, const T* atol, bool tol_scalar,
                       T* __restrict y1, int64_t n) {
  double sumsq = 0.0;
  T finite = 0;
  for (int64_t i0 = 0; i0 < n; i0 += kTile) {
    const int64_t len = std::min(kTile, n - i0);
    T acc[kTile], err[kTile];
    for (int64_t i = 0; i < len; ++i) acc[i] = err[i] = 0;
    for (int j = 0; j < count; ++j) {
      const T* __restrict row = k + j * stride + i0;
      if (wb[j] != 0.0) {
        const T w = static_cast<T>(wb[j]);
        for (int64_t i = 0; i < len; ++i) acc[i] += w * row[i];
      }
      if (we[j] != 0.0) {
        const T w = static_cast<T>(we[j]);
        for (int64_t i = 0; i < len; ++i) err[i] += w * row[i];
      }
    }
    const T* __restrict y0 = y + i0;
    T* __restrict y1t = y1 + i0;
    for (int64_t i = 0; i < len; ++i) y1t[i] = static_cast<T>(y0[i] + acc[i]);
    double partial = 0.0;
    if (tol_scalar) {
      const T rt = rtol[0], at = atol[0];
#pragma omp simd reduction(+ : partial)
      for (int64_t i = 0; i < len; ++i) {
        const double r = err[i] / (at + rt * std::max(std::abs(y0[i]), std::abs(y1t[i])));
        partial += r * r;
      }
    } else {
      const T* __restrict rt = rtol + i0;
      const T* __restrict at = atol + i0;
#pragma omp simd reduction(+ : partial)
      for (int64_t i = 0; i < len; ++i) {
        const double r = err[i] / (at[i] + rt[i] * std::max(std::abs(y0[i]), std::abs(y1t[i])));
        partial += r * r;
      }
    }
    sumsq += partial;
    T f = 0;  // a sum of zeros, NaN once some y1 is inf or NaN
#pragma omp simd reduction(+ : f)
    for (int64_t i = 0; i < len; ++i) f += y1t[i] - y1t[i];
    finite += f;
  }
  if (finite != finite) return std::numeric_limits<double>::quiet_NaN();
  return n == 0 ? 0.0 : std::sqrt(sumsq / static_cast<double>(n));
}

template <typename T>
void batch_step_impl(BatchStepCall& call) {
  const int64_t batch = call.batch, n = call.n, outputs = call.outputs;
  const int64_t stride = batch * n;
  const int count = static_cast<int>(call.b.size());
  const Controller& ctrl = call.ctrl;
  const T* yp = call.y.const_data_ptr<T>();
  const T* kp = call.k.const_data_ptr<T>();
  const T* rp = call.rtol.const_data_ptr<T>();
  const T* ap = call.atol.const_data_ptr<T>();
  const double* t_eval = call.t_eval.const_data_ptr<double>();
  const double* t_end = call.t_end.const_data_ptr<double>();
  const double* dir = call.dir.const_data_ptr<double>();
  T* y_next = call.y_next.mutable_data_ptr<T>();
  T* f_next = call.f_next.mutable_data_ptr<T>();
  T* ys = call.ys.mutable_data_ptr<T>();
  double* tp = call.t.mutable_data_ptr<double>();
  double* dtp = call.dt.mutable_data_ptr<double>();
  double* hp = call.h.mutable_data_ptr<double>();
  int64_t* status = call.status.mutable_data_ptr<int64_t>();
  int64_t* stats = call.stats.mutable_data_ptr<int64_t>();
  int64_t* next_out = call.next_out.mutable_data_ptr<int64_t>();
  double* history = call.history.mutable_data_ptr<double>();
  bool* accept_out = call.accept.mutable_data_ptr<bool>();
  const int64_t per_element = call.rtol.numel() == 1 ? 0 : 1;  // rtol/atol indexed per element
  const T* last_row = kp + (count - 1) * stride;

  for_each_sample_group(batch, n, [&](int64_t b0, int64_t b1) {
    double wb[kMaxStages], we[kMaxStages], wd[kMaxStages];
    for (int64_t b = b0; b < b1; ++b) {
      const T* y = yp + b * n;
      T* yn = y_next + b * n;
      T* fn = f_next + b * n;
      if (status[b] != kRunning) {  // stopped: state and carried stage stay as they are
        std::copy(y, y + n, yn);
        std::copy(kp + b * n, kp + (b + 1) * n, fn);
        accept_out[b] = false;
        continue;
      }
      const double h = hp[b], t0 = tp[b];
      for (int j = 0; j < count; ++j) {
        wb[j] = call.b[j] * h;
        we[j] = call.b_error[j] * h;
      }
      const T* rt = rp + per_element * b * call.tol_stride;
      const T* at = ap + per_element * b * call.tol_stride;
      const double ratio = finalize_sample(y, kp + b * n, stride, wb, we, count, rt, at, call.tol_scalar, yn, n);
      const bool accept = ratio <= 1.0;
      accept_out[b] = accept;
      double t1 = t0;
      int64_t j = next_out[b];
      if (accept) {
        t1 = lands_on_end(ctrl, t0, h, t_end[b]) ? t_end[b] : t0 + h;
        const double* te = t_eval + b * outputs;
        // Every output time this step reached, from the step's dense output.
        for (; j < outputs && (te[j] - t1) * dir[b] <= 0.0; ++j) {
          const double theta = (te[j] - t0) / h;
          for (int s = 0; s < count; ++s) wd[s] = dense_weight(call.poly.data(), call.degree, s, theta, h);
          combine_sample(y, kp + b * n, stride, wd, count, ys + (b * outputs + j) * n, n);
        }
        next_out[b] = j;
        std::copy(last_row + b * n, last_row + (b + 1) * n, fn);
      } else {
        std::copy(y, y + n, yn);
        std::copy(kp + b * n, kp + (b + 1) * n, fn);
      }
      const SampleState s{tp + b, dtp + b, hp + b, status + b, stats + b * kStatColumns, history + 2 * b};
      advance_sample(ctrl, s, ratio, accept, t1, j >= outputs, t_end[b], dir[b]);
    }
  });
}

Tensor batch_step_cpu(Tensor y, Tensor k, Tensor rtol, Tensor atol, std::vector<double> b,
                      std::vector<double> b_error, std::vector<double> poly, Tensor t_eval, Tensor t_end,
                      Tensor direction, Tensor y_next, Tensor f_next, Tensor ys, Tensor t, Tensor dt, Tensor h,
                      Tensor status, Tensor stats, Tensor next_out, Tensor history, std::vector<double> controller,
                      int64_t max_steps) {
  BatchStepCall call = prepare_batch_step(y, k, rtol, atol, b, b_error, poly, t_eval, t_end, direction, y_next,
                                          f_next, ys, t, dt, h, status, stats, next_out, history, controller,
                                          max_steps);
  if (call.y.scalar_type() == ScalarType::Double) batch_step_impl<double>(call); else batch_step_impl<float>(call);
  return call.accept;
}

}  // namespace
}  // namespace flashode

STABLE_TORCH_LIBRARY_IMPL(flashode, CPU, m) {
  m.impl("batch_stage", TORCH_BOX(&flashode::batch_stage_cpu));
  m.impl("batch_step", TORCH_BOX(&flashode::batch_step_cpu));
}
