// CPU kernels for the fused Runge–Kutta ops (schemas in ../ops.cpp).
//
// Each op is one pass over memory: the state is walked in tiles of kTile elements that stay in L1
// while every stage row is folded in, so y and each k[j] are read once and the output written once.
// The inner loops are plain arrays with restrict pointers, which GCC vectorises (-O3; see
// -fopt-info-vec); the norm's sum of squares is an `omp simd` reduction (-fopenmp-simd: lane
// order fixed at compile time, no OpenMP runtime). Large states are split into fixed chunks run
// on torch's intra-op thread pool (stable parallel_for); the chunking does not depend on the thread
// count, so the error norm's reduction order, and hence every result, is the same for any number
// of threads.
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "common/rk_args.h"

#include "cpu/cpu_common.h"

namespace flashode {
namespace {

constexpr int64_t kTile = 256;     // elements per tile: S * kTile * 8 bytes stays in L1/L2
constexpr int64_t kChunk = 16384;  // elements per parallel work item (fixed: deterministic sums)

template <typename T>
using acc_t = T;  // float32 states accumulate in float32, float64 in float64

// out[i] = y[i] + sum_t w_t * k[idx_t][i] for i in [i0, i0 + len).
template <typename T>
[[gnu::always_inline]] inline void combine_tile(const T* __restrict y, const T* __restrict k, int64_t n,
                         const StageTerms& terms, T* __restrict out, int64_t i0, int64_t len) {
  acc_t<T> acc[kTile];
  for (int64_t i = 0; i < len; ++i) acc[i] = 0;
  for (int t = 0; t < terms.count; ++t) {
    const acc_t<T> w = static_cast<acc_t<T>>(terms.weight[t]);
    const T* __restrict row = k + terms.index[t] * n + i0;
    for (int64_t i = 0; i < len; ++i) acc[i] += w * row[i];
  }
  const T* __restrict y0 = y + i0;
  T* __restrict o = out + i0;
  for (int64_t i = 0; i < len; ++i) o[i] = static_cast<T>(y0[i] + acc[i]);
}

// Runs body(begin, end) over [0, n) in fixed chunks, threaded when there is more than one chunk.
template <typename F>
inline void for_each_chunk(int64_t n, const F& body) {
  for_each_piece(n, kChunk, body);
}

template <typename T>
FLASHODE_CPU_CLONES void stage_range(const T* y, const T* k, int64_t n, const StageTerms& terms, T* out,
                                     int64_t begin, int64_t end) {
  for (int64_t i0 = begin; i0 < end; i0 += kTile) combine_tile(y, k, n, terms, out, i0, std::min(kTile, end - i0));
}

Tensor rk_stage_cpu(Tensor y, Tensor k, std::vector<double> a, double h) {
  StageCall call = prepare_stage(y, k, a, h);
  const int64_t n = call.y.numel();
  auto run = [&](auto tag) {
    using T = decltype(tag);
    const T* yp = call.y.const_data_ptr<T>();
    const T* kp = call.k.const_data_ptr<T>();
    T* op = call.out.mutable_data_ptr<T>();
    for_each_chunk(n, [&](int64_t begin, int64_t end) { stage_range(yp, kp, n, call.terms, op, begin, end); });
  };
  if (call.y.scalar_type() == ScalarType::Double) run(double{}); else run(float{});
  return call.out;
}

// What a finalised range contributes to the ratio: its sum of squared scaled errors (in a norm
// segment only) and the sum of (y1 - y1) over it, 0 when every y1 is finite and NaN otherwise.
struct RangeSums {
  double sumsq = 0.0;
  double finite = 0.0;
};

// Finalisation over [begin, end), which lies inside one norm segment (kNorm) or in the tail after
// the last segment end (!kNorm: no scaled error is computed): writes y1 (and err).
template <typename T, bool kNorm>
FLASHODE_CPU_CLONES RangeSums finalize_range(const T* __restrict y, const T* __restrict k, int64_t n,
                      const StageTerms& sol, const StageTerms& errw, const T* __restrict rtol,
                      const T* __restrict atol, bool tol_per_element, T* __restrict y1,
                      T* __restrict err_out, int64_t begin, int64_t end) {
  RangeSums sums;
  T err[kTile];
  const bool need_err = kNorm || err_out != nullptr;
  for (int64_t i0 = begin; i0 < end; i0 += kTile) {
    const int64_t len = std::min(kTile, end - i0);
    combine_tile(y, k, n, sol, y1, i0, len);
    const T* __restrict y1t = y1 + i0;
    if (need_err) {
      for (int64_t i = 0; i < len; ++i) err[i] = 0;
      for (int t = 0; t < errw.count; ++t) {
        const T w = static_cast<T>(errw.weight[t]);
        const T* __restrict row = k + errw.index[t] * n + i0;
        for (int64_t i = 0; i < len; ++i) err[i] += w * row[i];
      }
    }
    if constexpr (kNorm) {
      const T* __restrict y0 = y + i0;
      double partial = 0;  // squares in double: float32 scaled errors may exceed 1.8e19 or fall below 1e-19
      if (tol_per_element) {
        const T* __restrict rt = rtol + i0;
        const T* __restrict at = atol + i0;
#pragma omp simd reduction(+ : partial)
        for (int64_t i = 0; i < len; ++i) {
          const double r = err[i] / (at[i] + rt[i] * std::max(std::abs(y0[i]), std::abs(y1t[i])));
          partial += r * r;
        }
      } else {
        const T rt = rtol[0], at = atol[0];
#pragma omp simd reduction(+ : partial)
        for (int64_t i = 0; i < len; ++i) {
          const double r = err[i] / (at + rt * std::max(std::abs(y0[i]), std::abs(y1t[i])));
          partial += r * r;
        }
      }
      sums.sumsq += partial;
    }
    T finite = 0;  // a sum of zeros, NaN once some y1 is inf or NaN: cannot round or overflow
#pragma omp simd reduction(+ : finite)
    for (int64_t i = 0; i < len; ++i) finite += y1t[i] - y1t[i];
    sums.finite += finite;
    if (err_out != nullptr) std::copy(err, err + len, err_out + i0);
  }
  return sums;
}

template <typename T>
void finalize_impl(FinalizeCall& call) {
  const Tensor& y = call.y;
  const Segments& seg = call.seg;
  const int64_t n = y.numel();
  const T* yp = y.const_data_ptr<T>();
  const T* kp = call.k.const_data_ptr<T>();
  const T* rp = call.rtol.const_data_ptr<T>();
  const T* ap = call.atol.const_data_ptr<T>();
  T* err_out = call.return_error ? call.err.mutable_data_ptr<T>() : nullptr;
  const bool per_element = call.rtol.numel() != 1 || call.atol.numel() != 1;
  // Per-element tolerances are expanded so both pointers can be indexed alike.
  std::vector<T> rbuf, abuf;
  if (per_element && call.rtol.numel() == 1) {
    rbuf.assign(n, rp[0]);
    rp = rbuf.data();
  }
  if (per_element && call.atol.numel() == 1) {
    abuf.assign(n, ap[0]);
    ap = abuf.data();
  }
  T* y1p = call.y1.mutable_data_ptr<T>();
  // One row of partials per chunk: seg.count sums of squares, then the chunk's finiteness sum.
  const int64_t chunks = std::max<int64_t>(1, (n + kChunk - 1) / kChunk);
  const int64_t row = seg.count + 1;
  std::vector<double> partial(chunks * row, 0.0);
  for_each_chunk(n, [&](int64_t begin, int64_t end) {
    double* out = partial.data() + (begin / kChunk) * row;
    for (int s = 0; s < seg.count; ++s) {
      const int64_t lo = std::max(begin, seg.begin_of(s)), hi = std::min(end, seg.end[s]);
      if (lo < hi) {
        const RangeSums sums = finalize_range<T, true>(yp, kp, n, call.sol, call.errw, rp, ap, per_element,
                                                       y1p, err_out, lo, hi);
        out[s] = sums.sumsq;
        out[seg.count] += sums.finite;
      }
    }
    const int64_t lo = std::max(begin, seg.tail_begin());  // elements in no segment
    if (lo < end)
      out[seg.count] += finalize_range<T, false>(yp, kp, n, call.sol, call.errw, rp, ap, per_element, y1p,
                                                 err_out, lo, end).finite;
  });
  // Sums over chunks in chunk order (the same for any thread count); a non-finite y1 anywhere,
  // the tail included, makes every value NaN.
  double finite = 0.0;
  for (int64_t c = 0; c < chunks; ++c) finite += partial[c * row + seg.count];
  const double poison = std::isnan(finite) ? std::numeric_limits<double>::quiet_NaN() : 0.0;
  double* ratio = call.ratio.mutable_data_ptr<double>();
  double largest = 0.0;
  bool any_nan = false;
  for (int s = 0; s < seg.count; ++s) {
    const int64_t size = seg.end[s] - seg.begin_of(s);
    double sumsq = 0.0;
    for (int64_t c = 0; c < chunks; ++c) sumsq += partial[c * row + s];
    const double rms = (size == 0 ? 0.0 : std::sqrt(sumsq / static_cast<double>(size))) + poison;
    if (call.per_segment) ratio[s] = rms;
    any_nan = any_nan || std::isnan(rms);
    largest = std::max(largest, rms);
  }
  // Mixed norm: the largest per-segment RMS; NaN in any segment makes it NaN.
  if (!call.per_segment) *ratio = any_nan ? std::numeric_limits<double>::quiet_NaN() : largest;
}

std::tuple<Tensor, Tensor, Tensor> rk_finalize_cpu(Tensor y, Tensor k, std::vector<double> b,
                                                   std::vector<double> b_error, double h,
                                                   Tensor rtol, Tensor atol,
                                                   std::vector<int64_t> segment_ends,
                                                   bool return_error, bool per_segment) {
  FinalizeCall call =
      prepare_finalize(y, k, b, b_error, h, rtol, atol, segment_ends, return_error, per_segment);
  if (call.y.scalar_type() == ScalarType::Double) finalize_impl<double>(call); else finalize_impl<float>(call);
  return {call.y1, call.err, call.ratio};
}

template <typename T>
FLASHODE_CPU_CLONES void dense_range(const T* y, const T* k, int64_t n, const StageTerms* terms,
                                     int64_t outputs, T* out, int64_t begin, int64_t end) {
  for (int64_t i0 = begin; i0 < end; i0 += kTile) {
    const int64_t len = std::min(kTile, end - i0);
    for (int64_t m = 0; m < outputs; ++m) combine_tile(y, k, n, terms[m], out + m * n, i0, len);
  }
}

Tensor rk_dense_cpu(Tensor y, Tensor k, std::vector<double> poly, std::vector<double> theta,
                    double h) {
  DenseCall call = prepare_dense(y, k, poly, theta, h);
  const int64_t n = call.y.numel(), outputs = static_cast<int64_t>(call.terms.size());
  // The tile loop is outermost (inside dense_range) so each k tile is read from memory once and
  // reused from cache for every output time.
  auto run = [&](auto tag) {
    using T = decltype(tag);
    const T* yp = call.y.const_data_ptr<T>();
    const T* kp = call.k.const_data_ptr<T>();
    T* op = call.out.mutable_data_ptr<T>();
    for_each_chunk(n, [&](int64_t begin, int64_t end) {
      dense_range(yp, kp, n, call.terms.data(), outputs, op, begin, end);
    });
  };
  if (call.y.scalar_type() == ScalarType::Double) run(double{}); else run(float{});
  return call.out;
}

}  // namespace
}  // namespace flashode

STABLE_TORCH_LIBRARY_IMPL(flashode, CPU, m) {
  m.impl("rk_stage", TORCH_BOX(&flashode::rk_stage_cpu));
  m.impl("rk_finalize", TORCH_BOX(&flashode::rk_finalize_cpu));
  m.impl("rk_dense", TORCH_BOX(&flashode::rk_dense_cpu));
}
