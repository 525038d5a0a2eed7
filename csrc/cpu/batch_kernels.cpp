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
#include "cpu/cpu_common.h"

namespace flashode {
namespace {

constexpr int64_t kTile = 256;
constexpr int64_t kChunkElements = 16384;

// Runs body(b0, b1) over the samples [0, batch) in fixed groups of whole samples.
template <typename F>
void for_each_sample_group(int64_t batch, int64_t n, const F& body) {
  for_each_piece(batch, std::max<int64_t>(1, kChunkElements / std::max<int64_t>(n, 1)), body);
}

// out[i] = y[i] + sum_j w[j] * k_row_j[i] over one sample's n elements (rows `stride` apart): the
// dense outputs, a few per step at most.
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

// The elements of a batch are walked flat, in tiles that may span several samples (a sample may
// have only a couple of elements): each tile first spreads the per-sample step h over its
// elements, so the stage loops below are plain vectorisable loops whatever N is. Weights are
// (T)(coefficient * h), exactly the per-sample weights rk_stage/rk_finalize would use.
struct TileSamples {
  int64_t first;  // the sample of the tile's first element
  int64_t offset;  // that element's index within its sample
};

inline TileSamples tile_start(int64_t i0, int64_t n) { return {i0 / n, i0 % n}; }

// hb[i] = h of element i's sample; sample[i] = that sample's index, for len elements from `at`.
inline void spread(const double* h, int64_t n, TileSamples at, int64_t len, double* hb, int64_t* sample) {
  if (at.offset + len <= n) {  // one sample
    std::fill(hb, hb + len, h[at.first]);
    std::fill(sample, sample + len, at.first);
    return;
  }
  int64_t b = at.first, r = at.offset;
  for (int64_t i = 0; i < len; ++i) {
    hb[i] = h[b];
    sample[i] = b;
    if (++r == n) {
      r = 0;
      ++b;
    }
  }
}

// Samples of at least this many elements are walked in tiles that never cross a sample boundary,
// so every tile has one step h and its stage weights are scalars.
constexpr int64_t kAlignedTilesFrom = 32;

// Calls body(i0, len, at) for consecutive tiles covering [begin, end) (at: the first element's sample).
template <typename F>
inline void for_each_tile(int64_t begin, int64_t end, int64_t n, const F& body) {
  for (int64_t i0 = begin; i0 < end;) {
    const TileSamples at = tile_start(i0, n);
    const int64_t len = std::min(end - i0, n >= kAlignedTilesFrom ? std::min(kTile, n - at.offset) : kTile);
    body(i0, len, at);
    i0 += len;
  }
}

// acc[i] = sum_j (T)(w[j] * hb[i]) * k_j[i] over a tile (rows `stride` apart).
template <typename T>
inline void fold_stages(const T* __restrict k, int64_t stride, const double* w, int count, const double* __restrict hb,
                        bool one_sample, int64_t len, T* __restrict acc) {
  for (int64_t i = 0; i < len; ++i) acc[i] = 0;
  for (int j = 0; j < count; ++j) {
    if (w[j] == 0.0) continue;
    const double wj = w[j];
    const T* __restrict row = k + j * stride;
    if (one_sample) {
      const T weight = static_cast<T>(wj * hb[0]);
      for (int64_t i = 0; i < len; ++i) acc[i] += weight * row[i];
    } else {
      for (int64_t i = 0; i < len; ++i) acc[i] += static_cast<T>(wj * hb[i]) * row[i];
    }
  }
}

// Runs body(begin, end) over the flat range [0, total) in fixed chunks (threaded when several).
template <typename F>
void for_each_flat_chunk(int64_t total, const F& body) {
  for_each_piece(total, kChunkElements, body);
}

template <typename T>
FLASHODE_CPU_CLONES void stage_range(const T* yp, const T* kp, int64_t total, int64_t n, const double* a, int count,
                                     const double* hp, T* op, int64_t begin, int64_t end) {
  double hb[kTile];
  int64_t sample[kTile];
  T acc[kTile];
  for_each_tile(begin, end, n, [&](int64_t i0, int64_t len, TileSamples at) {
    spread(hp, n, at, len, hb, sample);
    fold_stages(kp + i0, total, a, count, hb, at.offset + len <= n, len, acc);
    // A stopped sample (h = 0) keeps its state exactly, whatever k holds (0 * inf is NaN).
    for (int64_t i = 0; i < len; ++i) op[i0 + i] = static_cast<T>(yp[i0 + i] + (hb[i] == 0.0 ? T(0) : acc[i]));
  });
}

template <typename T>
void batch_stage_impl(BatchStageCall& call) {
  const int64_t batch = call.y.size(0), n = batch == 0 ? 0 : call.y.numel() / batch;
  const int64_t total = batch * n;
  const T* yp = call.y.const_data_ptr<T>();
  const T* kp = call.k.const_data_ptr<T>();
  const double* hp = call.h.const_data_ptr<double>();
  const double* tp = call.t.const_data_ptr<double>();
  T* op = call.out.mutable_data_ptr<T>();
  T* top = call.t_out.mutable_data_ptr<T>();
  for (int64_t b = 0; b < batch; ++b) top[b] = static_cast<T>(tp[b] + call.c * hp[b]);
  for_each_flat_chunk(total, [&](int64_t begin, int64_t end) {
    stage_range(yp, kp, total, n, call.a.data(), static_cast<int>(call.a.size()), hp, op, begin, end);
  });
}

std::tuple<Tensor, Tensor> batch_stage_cpu(Tensor y, Tensor k, std::vector<double> a, Tensor h, Tensor t,
                                           double c) {
  BatchStageCall call = prepare_batch_stage(y, k, a, h, t, c);
  if (call.y.scalar_type() == ScalarType::Double) batch_stage_impl<double>(call); else batch_stage_impl<float>(call);
  return {call.out, call.t_out};
}

// A tolerance's values for the tile of len elements from flat index i0 (element r0 of its sample).
template <typename T>
inline void tolerance_tile(const T* tol, ToleranceLayout layout, int64_t i0, int64_t r0, int64_t n, int64_t len,
                           T* out) {
  switch (layout) {
    case ToleranceLayout::kScalar:
      std::fill(out, out + len, tol[0]);
      break;
    case ToleranceLayout::kPerSampleElement:
      std::copy(tol + i0, tol + i0 + len, out);
      break;
    case ToleranceLayout::kPerElement:
      for (int64_t i = 0, r = r0; i < len; ++i, r = (r + 1 == n ? 0 : r + 1)) out[i] = tol[r];
      break;
  }
}

// Pass 1 of batch_step over the samples [b0, b1): y1 into y_next, and per sample the sum of squared
// scaled errors (in element order) and a finiteness sum (NaN once some y1 is not finite).
template <typename T>
FLASHODE_CPU_CLONES void finalize_samples(const BatchStepCall& call, int64_t b0, int64_t b1, double* sumsq, double* finite) {
  const int64_t n = call.n, total = call.batch * n;
  const int count = static_cast<int>(call.b.size());
  const T* yp = call.y.const_data_ptr<T>();
  const T* kp = call.k.const_data_ptr<T>();
  const T* rp = call.rtol.const_data_ptr<T>();
  const T* ap = call.atol.const_data_ptr<T>();
  const double* hp = call.h.const_data_ptr<double>();
  T* y1p = call.y_next.mutable_data_ptr<T>();
  double hb[kTile], sq[kTile];
  int64_t sample[kTile];
  T acc[kTile], err[kTile], rt[kTile], at[kTile];
  for (int64_t b = b0; b < b1; ++b) sumsq[b - b0] = finite[b - b0] = 0.0;
  for_each_tile(b0 * n, b1 * n, n, [&](int64_t i0, int64_t len, TileSamples at0) {
    spread(hp, n, at0, len, hb, sample);
    const bool one_sample = at0.offset + len <= n;
    fold_stages(kp + i0, total, call.b.data(), count, hb, one_sample, len, acc);
    fold_stages(kp + i0, total, call.b_error.data(), count, hb, one_sample, len, err);
    const T* __restrict y0 = yp + i0;
    T* __restrict y1 = y1p + i0;
    for (int64_t i = 0; i < len; ++i) y1[i] = static_cast<T>(y0[i] + acc[i]);
    tolerance_tile(rp, call.rtol_layout, i0, at0.offset, n, len, rt);
    tolerance_tile(ap, call.atol_layout, i0, at0.offset, n, len, at);
    for (int64_t i = 0; i < len; ++i) {
      const double ratio = err[i] / (at[i] + rt[i] * std::max(std::abs(y0[i]), std::abs(y1[i])));
      sq[i] = ratio * ratio;
    }
    for (int64_t i = 0; i < len; ++i) {
      sumsq[sample[i] - b0] += sq[i];
      finite[sample[i] - b0] += static_cast<double>(y1[i] - y1[i]);
    }
  });
}

template <typename T>
void batch_step_impl(BatchStepCall& call) {
  const int64_t batch = call.batch, n = call.n, outputs = call.outputs;
  const int64_t stride = batch * n;
  const int count = static_cast<int>(call.b.size());
  const Controller& ctrl = call.ctrl;
  const T* yp = call.y.const_data_ptr<T>();
  const T* kp = call.k.const_data_ptr<T>();
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
  const T* last_row = kp + (count - 1) * stride;

  for_each_sample_group(batch, n, [&](int64_t b0, int64_t b1) {
    std::vector<double> sumsq(b1 - b0), finite(b1 - b0);
    finalize_samples<T>(call, b0, b1, sumsq.data(), finite.data());
    double wd[kMaxStages];
    for (int64_t b = b0; b < b1; ++b) {
      const T* y = yp + b * n;
      if (status[b] != kRunning) {  // stopped: state and carried stage stay as they are
        accept_out[b] = false;
        continue;
      }
      const double h = hp[b], t0 = tp[b];
      const double ratio = finite[b - b0] != finite[b - b0]
                               ? std::numeric_limits<double>::quiet_NaN()
                               : (n == 0 ? 0.0 : std::sqrt(sumsq[b - b0] / static_cast<double>(n)));
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
      }
      const SampleState s{tp + b, dtp + b, hp + b, status + b, stats + b * kStatColumns, history + 2 * b};
      advance_sample(ctrl, s, ratio, accept, t1, j >= outputs, t_end[b], dir[b]);
    }
    // Pass 3: a rejected or stopped sample keeps y, and carries k[0]; an accepted one carries k[S-1].
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t i0 = b * n;
      if (accept_out[b]) {
        std::copy(last_row + i0, last_row + i0 + n, f_next + i0);
      } else {
        std::copy(yp + i0, yp + i0 + n, y_next + i0);
        std::copy(kp + i0, kp + i0 + n, f_next + i0);
      }
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
