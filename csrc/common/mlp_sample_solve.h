// The fused MLP solve for ONE sample, forward and backward, as host/device templates over the
// state's dtype T. The CUDA kernels (cuda/mlp_solve_kernels.cu) run it one thread per sample; the
// host per-sample path (cpu/mlp_solve_per_sample.cpp) runs the very same code one sample at a time,
// so the CUDA algorithm is exercised on machines without a GPU.
//
// It takes the decisions of the CPU lane kernel (cpu/mlp_solve_kernels.cpp) in the same arithmetic
// order: the network's sums in the lane kernel's interleaved partial sums, its activations from the
// same exp polynomial (not libm's or CUDA's exp, which round differently), the stage sums, error
// norm, dense output, controller (batch_args.h) and start (mlp_solve_args.h) alike. Nothing may be
// contracted into an FMA: the host library is built with -ffp-contract=off and the CUDA sources with
// -fmad=false. Times are float64; values and sums in T (float32 at least).
//
// Per-sample vectors are Columns: values `stride` apart, so that a CUDA block can lay its threads'
// vectors out column by column (thread t's value i at i * threads + t: neighbouring threads touch
// neighbouring addresses) and the host can use plain arrays (stride 1).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "common/mlp_activation_constants.h"
#include "common/mlp_solve_args.h"

#if defined(__CUDACC__)
#define FLASHODE_UNROLL _Pragma("unroll")
#else
#define FLASHODE_UNROLL _Pragma("GCC unroll 16")
#endif

namespace flashode {
namespace sample {

template <typename T>
struct Column {
  T* p = nullptr;
  int64_t stride = 1;
  FLASHODE_HOST_DEVICE T& operator[](int64_t i) const { return p[i * stride]; }
  FLASHODE_HOST_DEVICE Column at(int64_t offset) const { return Column{p + offset * stride, stride}; }
};

// ------------------------------------------------------------------------------------------------
// Scalar math of the lane kernel's activations (cpu/mlp_solve_kernels.cpp: SimdMath), operation
// for operation: exp by Cody & Waite's reduction and a Taylor polynomial, for arguments <= 0 only,
// on the constants both take from common/mlp_activation_constants.h.

template <typename T>
struct ScalarMath {
  using E = ExpConstants<T>;
  using Bits = typename E::Bits;

  FLASHODE_HOST_DEVICE static T abs(T z) { return z < 0 ? -z : z; }  // a NaN stays NaN

  // exp(x) = scale * (1 + p) for x <= 0 (clamped at kLowest; a NaN passes through into p).
  FLASHODE_HOST_DEVICE static void exp_parts(T x, T& scale, T& p) {
    x = x < E::kLowest ? static_cast<T>(E::kLowest) : x;
    const T shifted = x * E::kLog2e + E::kShifter;
    const T n = shifted - E::kShifter;
    const T r = (x - n * E::kLn2Hi) - n * E::kLn2Lo;
    T q = static_cast<T>(inv_factorial(E::kExpTerms));
    FLASHODE_UNROLL
    for (int i = E::kExpTerms - 1; i >= 1; --i) q = q * r + static_cast<T>(inv_factorial(i));
    p = q * r;
    Bits bits, shifter_bits;
    const T shifter = E::kShifter;
    memcpy(&bits, &shifted, sizeof(T));
    memcpy(&shifter_bits, &shifter, sizeof(T));
    bits = (bits - shifter_bits + E::kBias) << E::kMantissa;  // 2^n
    memcpy(&scale, &bits, sizeof(T));
  }
  FLASHODE_HOST_DEVICE static T exp_nonpositive(T x) {
    T scale, p;
    exp_parts(x, scale, p);
    return scale + scale * p;
  }
  FLASHODE_HOST_DEVICE static T expm1_nonpositive(T x) {
    T scale, p;
    exp_parts(x, scale, p);
    return scale * p + (scale - 1);
  }
  // log(1 + u) for 0 <= u <= 1 as 2 atanh(u / (2 + u)).
  FLASHODE_HOST_DEVICE static T log1p_unit(T u) {
    const T s = u / (2 + u), s2 = s * s;
    constexpr int K = E::kAtanhTerms;
    T q = static_cast<T>(1.0 / (2 * K - 1));
    FLASHODE_UNROLL
    for (int k = K - 2; k >= 0; --k) q = q * s2 + static_cast<T>(1.0 / (2 * k + 1));
    return 2 * s * q;
  }
  FLASHODE_HOST_DEVICE static T sigmoid(T z, T& e) {
    e = exp_nonpositive(-abs(z));
    const T r = 1 / (1 + e);
    return z < 0 ? e * r : r;
  }

  // float32 tanh as the lane kernel computes it: x P(x^2) / Q(x^2) on x = z clamped (TanhRational).
  FLASHODE_HOST_DEVICE static T tanh_rational(T z) {
    using R = TanhRational;
    const T x = z > R::kClamp ? T(R::kClamp) : z < -R::kClamp ? T(-R::kClamp) : z;
    const T s = x * x;
    const T p = (((R::kP4 * s + R::kP3) * s + R::kP2) * s + R::kP1) * s + 1;
    const T q = (((R::kQ4 * s + R::kQ3) * s + R::kQ2) * s + R::kQ1) * s + 1;
    return x * p / q;
  }

  // a = act(z), g = act'(z), in the lane kernel's forms.
  template <int Activation>
  FLASHODE_HOST_DEVICE static void eval(T z, T& a, T& g) {
    T e;
    if (Activation == kTanh) {
      if constexpr (std::is_same<T, float>::value) {
        a = tanh_rational(z);
      } else {
        const T m = expm1_nonpositive(-2 * abs(z));
        const T t = -m / (m + 2);
        a = z < 0 ? -t : t;
      }
      g = 1 - a * a;
    } else if (Activation == kSoftplus) {
      const T s = sigmoid(z, e);
      a = z > 20 ? z : (z < 0 ? T(0) : z) + log1p_unit(e);
      g = z > 20 ? T(1) : s;
    } else if (Activation == kRelu) {
      a = z < 0 ? T(0) : z;
      g = z > 0 ? T(1) : T(0);
    } else if (Activation == kSilu) {
      const T s = sigmoid(z, e);
      a = z * s;
      g = s * (1 + z * (1 - s));
    } else if (Activation == kElu) {
      const T m = expm1_nonpositive(z < 0 ? z : T(0));
      a = z > 0 ? z : m;
      g = z > 0 ? T(1) : m + 1;
    } else {
      a = sigmoid(z, e);
      g = a * (1 - a);
    }
  }

  template <int Activation>
  FLASHODE_HOST_DEVICE static void activate_all(Column<T> z, Column<T> deriv, bool keep, int64_t n) {
    for (int64_t i = 0; i < n; ++i) {
      T a, g;
      eval<Activation>(z[i], a, g);
      z[i] = a;
      if (keep) deriv[i] = g;
    }
  }

  // z <- act(z) over n values, and deriv <- act'(z) when `keep`.
  FLASHODE_HOST_DEVICE static void activate(int activation, Column<T> z, Column<T> deriv, bool keep, int64_t n) {
    switch (activation) {
      case kTanh: return activate_all<kTanh>(z, deriv, keep, n);
      case kSoftplus: return activate_all<kSoftplus>(z, deriv, keep, n);
      case kRelu: return activate_all<kRelu>(z, deriv, keep, n);
      case kSilu: return activate_all<kSilu>(z, deriv, keep, n);
      case kElu: return activate_all<kElu>(z, deriv, keep, n);
      default: return activate_all<kSigmoid>(z, deriv, keep, n);
    }
  }
};

// Magnitude and square root in T (float stays float on both devices).
FLASHODE_HOST_DEVICE inline float magnitude(float x) { return fabsf(x); }
FLASHODE_HOST_DEVICE inline double magnitude(double x) { return fabs(x); }
FLASHODE_HOST_DEVICE inline float square_root(float x) { return sqrtf(x); }
FLASHODE_HOST_DEVICE inline double square_root(double x) { return sqrt(x); }
FLASHODE_HOST_DEVICE inline bool is_finite(float x) { return x - x == 0.0f; }
FLASHODE_HOST_DEVICE inline bool is_finite(double x) { return x - x == 0.0; }

// ------------------------------------------------------------------------------------------------
// The network for one sample.

// start + sum_k a[k * a_stride] * b[k] in the lane kernel's order (SimdGemm): C interleaved partial
// sums (k mod C), the first starting at `start`, added up in order at the end.
template <int C, typename T>
FLASHODE_HOST_DEVICE inline T chained_dot(T start, const T* a, int64_t a_stride, Column<T> b, int64_t depth) {
  T part[C];
  part[0] = start;
  FLASHODE_UNROLL
  for (int q = 1; q < C; ++q) part[q] = 0;
  int64_t k = 0;
  for (; k + C <= depth; k += C) {
    FLASHODE_UNROLL
    for (int q = 0; q < C; ++q) part[q] += a[(k + q) * a_stride] * b[k + q];
  }
  for (; k < depth; ++k) part[0] += a[k * a_stride] * b[k];
  FLASHODE_UNROLL
  for (int q = 1; q < C; ++q) part[0] += part[q];
  return part[0];
}

// out[r] = start[r] + sum_k a[r * a_row + k * a_stride] b[k] for r < rows: a product of `rows` rows,
// whose row count picks the lane kernel's number of partial sums.
template <typename T>
FLASHODE_HOST_DEVICE inline void matvec(int64_t rows, int64_t depth, const T* a, int64_t a_row, int64_t a_stride,
                                        const T* start, Column<T> b, Column<T> out) {
  const int chains = rows >= 4 ? 1 : rows >= 2 ? 2 : 4;
  for (int64_t r = 0; r < rows; ++r) {
    const T s = start == nullptr ? T(0) : start[r];
    const T* ar = a + r * a_row;
    out[r] = chains == 1   ? chained_dot<1>(s, ar, a_stride, b, depth)
             : chains == 2 ? chained_dot<2>(s, ar, a_stride, b, depth)
                           : chained_dot<4>(s, ar, a_stride, b, depth);
  }
}

// Where one evaluation's records live in a column: the input (in), then per hidden layer its
// activation and the activation's derivative (width each).
struct RecordLayout {
  int64_t act[kMaxMlpLayers] = {};
  int64_t deriv[kMaxMlpLayers] = {};
  int64_t size = 0;
};

inline RecordLayout record_layout(const MlpLayout& m) {
  RecordLayout r;
  r.size = m.in(0);
  for (int l = 0; l + 1 < m.layers; ++l) {
    r.act[l] = r.size;
    r.deriv[l] = r.size + m.out(l);
    r.size += 2 * m.out(l);
  }
  return r;
}

// out (D values) = f(x) for x (in values). Without a record (rec.p == nullptr) the hidden layers
// alternate between the two halves of `hidden` (2 x max width); with one, they and the activations'
// derivatives are kept in it (x must then be the record's input).
template <typename T>
FLASHODE_HOST_DEVICE inline void mlp_eval(const MlpLayout& m, const RecordLayout& rl, const T* params, Column<T> x,
                                          Column<T> out, Column<T> hidden, Column<T> rec) {
  Column<T> in = x;
  for (int l = 0; l < m.layers; ++l) {
    const bool last = l + 1 == m.layers;
    const Column<T> z = last ? out : rec.p != nullptr ? rec.at(rl.act[l]) : hidden.at((l % 2) * m.max_width);
    const T* bias = m.bias ? params + m.bias_offset[l] : nullptr;
    matvec(m.out(l), m.in(l), params + m.weight_offset[l], m.in(l), int64_t{1}, bias, in, z);
    if (!last) {
      const bool keep = rec.p != nullptr;
      ScalarMath<T>::activate(m.activation, z, keep ? rec.at(rl.deriv[l]) : Column<T>{}, keep, m.out(l));
    }
    in = z;
  }
}

// v (D values) = (df/dy)^T kappa at the recorded evaluation, and grad.add(i, d<kappa, f>/dparam_i)
// for every parameter. `hidden` holds 2 x max width values.
template <typename T, typename Grad>
FLASHODE_HOST_DEVICE inline void mlp_vjp(const MlpLayout& m, const RecordLayout& rl, const T* params, Column<T> rec,
                                         Column<T> kappa, Column<T> v, Column<T> hidden, const Grad& grad) {
  Column<T> delta = kappa;  // d<kappa, f> / d(layer output)
  for (int l = m.layers - 1; l >= 0; --l) {
    const int64_t in = m.in(l), out = m.out(l);
    const Column<T> x = l == 0 ? rec : rec.at(rl.act[l - 1]);
    const int64_t w = m.weight_offset[l];
    for (int64_t o = 0; o < out; ++o) {
      const T d = delta[o];
      for (int64_t i = 0; i < in; ++i) grad.add(w + o * in + i, d * x[i]);
      if (m.bias) grad.add(m.bias_offset[l] + o, d);
    }
    // W^T delta: W's column i, read with stride in (the lane kernel reads a transposed copy).
    if (l == 0) {  // the state's inputs only (not the time's)
      matvec(m.state_dim, out, params + w, int64_t{1}, in, static_cast<const T*>(nullptr), delta, v);
      break;
    }
    const Column<T> g = hidden.at((l % 2) * m.max_width);
    matvec(in, out, params + w, int64_t{1}, in, static_cast<const T*>(nullptr), delta, g);
    const Column<T> deriv = rec.at(rl.deriv[l - 1]);
    for (int64_t i = 0; i < in; ++i) g[i] = g[i] * deriv[i];
    delta = g;
  }
}

// ------------------------------------------------------------------------------------------------
// Stage sums and dense output.

// What the per-sample code reads of the method: SolveMethod without its dense matrices, small
// enough that the CUDA kernels take it as a kernel argument.
struct SampleMethod {
  int stages = 0;
  int degree = 0;
  bool fixed = false;
  double step_size = 0.0;
  double c[kMaxStages] = {};
  double poly[kMaxStages * kMaxDenseDegree] = {};
  CoefficientRow a_rows[kMaxStages];
  CoefficientRow b_row, b_error_row;
};

inline SampleMethod sample_method(const SolveMethod& m) {
  SampleMethod s;
  s.stages = m.stages;
  s.degree = m.degree;
  s.fixed = m.fixed;
  s.step_size = m.step_size;
  std::copy(m.c, m.c + kMaxStages, s.c);
  std::copy(m.poly, m.poly + kMaxStages * kMaxDenseDegree, s.poly);
  std::copy(m.a_rows, m.a_rows + kMaxStages, s.a_rows);
  s.b_row = m.b_row;
  s.b_error_row = m.b_error_row;
  return s;
}

// The nonzero terms (T)(coef * h) of a coefficient row, in order.
template <typename T>
struct Terms {
  int count = 0;
  int index[kMaxStages];
  T weight[kMaxStages];
};

template <typename T>
FLASHODE_HOST_DEVICE inline Terms<T> scaled_terms(const CoefficientRow& row, double h) {
  Terms<T> t;
  t.count = row.count;
  for (int j = 0; j < row.count; ++j) {
    t.index[j] = row.index[j];
    t.weight[j] = static_cast<T>(row.coef[j] * h);
  }
  return t;
}

// The dense output's weights h * B_j(theta) (as batch_step computes them), zeros dropped.
template <typename T>
FLASHODE_HOST_DEVICE inline Terms<T> dense_terms(const SampleMethod& method, double theta, double h) {
  Terms<T> t;
  for (int j = 0; j < method.stages; ++j) {
    const double w = dense_weight(method.poly, method.degree, j, theta, h);
    if (w == 0.0) continue;
    t.index[t.count] = j;
    t.weight[t.count] = static_cast<T>(w);
    ++t.count;
  }
  return t;
}

// out = y + sum_t weight_t k[index_t] (stage j's row at k.at(j * dim)); without y the sum alone.
template <typename T>
FLASHODE_HOST_DEVICE inline void combine(const Column<T>* y, Column<T> k, const Terms<T>& terms, int64_t dim,
                                         Column<T> out) {
  for (int64_t d = 0; d < dim; ++d) {
    T acc = 0;
    for (int t = 0; t < terms.count; ++t) acc += terms.weight[t] * k[terms.index[t] * dim + d];
    out[d] = y == nullptr ? acc : static_cast<T>((*y)[d] + acc);
  }
}

// The transpose of combine for cotangent g: lam_y += g, kappa[index_t] += weight_t g.
template <typename T>
FLASHODE_HOST_DEVICE inline void add_terms(Column<T> g, const Terms<T>& terms, int64_t dim, Column<T> kappa,
                                           Column<T> lam_y) {
  for (int64_t d = 0; d < dim; ++d) lam_y[d] += g[d];
  for (int t = 0; t < terms.count; ++t) {
    const Column<T> kj = kappa.at(terms.index[t] * dim);
    for (int64_t d = 0; d < dim; ++d) kj[d] += terms.weight[t] * g[d];
  }
}

FLASHODE_HOST_DEVICE inline const double* times_of(const double* t_eval, bool shared, int64_t sample,
                                                   int64_t outputs) {
  return shared ? t_eval : t_eval + sample * outputs;
}

// ------------------------------------------------------------------------------------------------
// Shapes of the per-sample work columns (besides `hidden`, 2 x max width values).

struct SampleShape {
  MlpLayout mlp;
  RecordLayout record;
  int stages = 0;
  int64_t dim = 0;
  // Forward: the network input x (in), y (D), k (S x D), y1 (D), err (D).
  int64_t fwd_x = 0, fwd_y = 0, fwd_k = 0, fwd_y1 = 0, fwd_err = 0, forward_size = 0;
  // Backward: S records, the stage values kv (S x D), their cotangents kappa (S x D), lam, mu,
  // lam_y, v (D each).
  int64_t bwd_kv = 0, bwd_kappa = 0, bwd_lam = 0, bwd_mu = 0, bwd_lam_y = 0, bwd_v = 0, backward_size = 0;
  int64_t hidden_size = 0;
};

inline SampleShape sample_shape(const MlpLayout& m, int stages) {
  SampleShape s;
  s.mlp = m;
  s.record = record_layout(m);
  s.stages = stages;
  s.dim = m.state_dim;
  const int64_t d = m.state_dim;
  s.fwd_x = 0;
  s.fwd_y = m.in(0);
  s.fwd_k = s.fwd_y + d;
  s.fwd_y1 = s.fwd_k + stages * d;
  s.fwd_err = s.fwd_y1 + d;
  s.forward_size = s.fwd_err + d;
  s.bwd_kv = stages * s.record.size;
  s.bwd_kappa = s.bwd_kv + stages * d;
  s.bwd_lam = s.bwd_kappa + stages * d;
  s.bwd_mu = s.bwd_lam + d;
  s.bwd_lam_y = s.bwd_mu + d;
  s.bwd_v = s.bwd_lam_y + d;
  s.backward_size = s.bwd_v + d;
  s.hidden_size = 2 * m.max_width;
  return s;
}

// ------------------------------------------------------------------------------------------------
// Forward.

// A sample's checkpoint rows: step n's (y, k0) at y + 2 D n and (t0, h, t1) at t + 3 n, written only
// while n < capacity (the step count goes on: the caller learns how many it needs).
template <typename T>
struct CheckpointSlot {
  T* y = nullptr;
  double* t = nullptr;
  int64_t capacity = 0;
};

// Everything one sample's forward reads and writes (pointers into the op's contiguous tensors).
template <typename T>
struct ForwardData {
  SampleShape shape;
  SampleMethod method;
  Controller ctrl;
  int order = 1;
  bool record = false, shared_times = true;
  int64_t batch = 0, outputs = 0;
  ToleranceLayout rtol_layout = ToleranceLayout::kScalar, atol_layout = ToleranceLayout::kScalar;
  const T *y0 = nullptr, *rtol = nullptr, *atol = nullptr;
  const double *t_eval = nullptr, *t_start = nullptr, *t_end = nullptr, *first_step = nullptr;
  T* ys = nullptr;
  int64_t* status = nullptr;
  double* t_final = nullptr;
  int64_t* stats = nullptr;
  int64_t* out_step = nullptr;
};

// One sample's whole solve, the lane kernel's ForwardTile for one lane.
template <typename T>
class SampleForward {
 public:
  FLASHODE_HOST_DEVICE SampleForward(const ForwardData<T>& data, const T* params, int64_t sample, Column<T> hidden,
                                     Column<T> work, CheckpointSlot<T> slot)
      : d_(data), m_(data.shape.mlp), method_(data.method), params_(params), s_(sample), dim_(data.shape.dim),
        hidden_(hidden), x_(work.at(data.shape.fwd_x)), y_(work.at(data.shape.fwd_y)), k_(work.at(data.shape.fwd_k)),
        y1_(work.at(data.shape.fwd_y1)), err_(work.at(data.shape.fwd_err)), slot_(slot) {}

  FLASHODE_HOST_DEVICE void run() {
    if (!load()) return finish();
    if (method_.fixed) {
      while (status_ == kRunning) fixed_step();
    } else {
      if (!start()) return finish();
      while (status_ == kRunning) adaptive_step();
    }
    finish();
  }

 private:
  FLASHODE_HOST_DEVICE T tol(const T* values, ToleranceLayout layout, int64_t d) const {
    return values[tolerance_index(layout, s_ * dim_ + d, d)];
  }

  // f(time, x_) into out.
  FLASHODE_HOST_DEVICE void eval(T time, Column<T> out) {
    if (m_.time_concat) x_[dim_] = time;
    mlp_eval(m_, d_.shape.record, params_, x_, out, hidden_, Column<T>{});
  }

  // The outputs before the first step, the state; false when the sample is already finished.
  FLASHODE_HOST_DEVICE bool load() {
    t_start_ = t_ = d_.t_start[s_];
    t_end_ = d_.t_end[s_];
    dir_ = t_end_ >= t_start_ ? 1.0 : -1.0;
    te_ = times_of(d_.t_eval, d_.shared_times, s_, d_.outputs);
    T* ys = d_.ys + s_ * d_.outputs * dim_;
    int64_t* marks = d_.out_step + s_ * d_.outputs;
    const T nan = static_cast<T>(NAN);
    for (int64_t i = 0; i < d_.outputs * dim_; ++i) ys[i] = nan;
    for (int64_t j = 0; j < d_.outputs; ++j) marks[j] = kOutputNotReached;
    const T* y0 = d_.y0 + s_ * dim_;
    if (te_[0] == t_start_) {
      for (int64_t i = 0; i < dim_; ++i) ys[i] = y0[i];  // as given, even when not finite
      marks[0] = kOutputAtStart;
      next_out_ = 1;
    }
    // A sample with a non-finite start is carried as zeros (the network never sees its NaN).
    for (int64_t i = 0; i < dim_; ++i) finite_ = finite_ && is_finite(y0[i]);
    for (int64_t i = 0; i < dim_; ++i) y_[i] = finite_ ? y0[i] : T(0);
    if (!method_.fixed) return true;
    grid_steps_ = fixed_grid_steps(t_start_, t_end_, dir_, method_.step_size);
    status_ = grid_steps_ == 0 ? kSuccess : (finite_ ? kRunning : kNonFinite);
    h_ = grid_time(1) - t_;
    return status_ == kRunning;
  }

  FLASHODE_HOST_DEVICE double grid_time(int64_t n) const {
    return fixed_grid_time(n, grid_steps_, t_start_, t_end_, dir_, method_.step_size);
  }

  // RMS over the state of x(i) / (atol + rtol |y|), in T.
  template <typename F>
  FLASHODE_HOST_DEVICE T scaled_rms(const F& x) const {
    T sum = 0;
    for (int64_t i = 0; i < dim_; ++i) {
      const T scale = tol(d_.atol, d_.atol_layout, i) + tol(d_.rtol, d_.rtol_layout, i) * magnitude(y_[i]);
      const T v = x(i) / scale;
      sum += v * v;
    }
    return square_root(sum / static_cast<T>(dim_));
  }

  // f(t0, y0), the initial step (given, or the heuristic's second evaluation), the first status.
  FLASHODE_HOST_DEVICE bool start() {
    const Column<T> f0 = k_;
    for (int64_t i = 0; i < dim_; ++i) x_[i] = y_[i];
    eval(static_cast<T>(t_start_), f0);
    for (int64_t i = 0; i < dim_; ++i) finite_ = finite_ && is_finite(f0[i]);
    double dt;
    if (d_.first_step != nullptr) {
      stats_[kFEvals] = 1;
      dt = d_.first_step[s_];
    } else {
      const Column<T> y = y_, f1 = y1_;
      const T d0 = scaled_rms([&](int64_t i) { return y[i]; });
      const T d1 = scaled_rms([&](int64_t i) { return f0[i]; });
      const T h0 = initial_h0(d0, d1);
      // y0 + h0 f0 at t0 + h0, the heuristic's probe (BatchSolver._initial_step)
      const T signed_h0 = static_cast<T>(dir_ * static_cast<double>(h0));
      for (int64_t i = 0; i < dim_; ++i) x_[i] = y[i] + signed_h0 * f0[i];
      eval(static_cast<T>(t_start_ + static_cast<double>(signed_h0)), f1);
      const T rms_df = scaled_rms([&](int64_t i) { return f1[i] - f0[i]; });
      stats_[kFEvals] = 2;
      dt = initial_dt(h0, d1, rms_df, d_.order);
    }
    status_ = start_sample(d_.ctrl, dt, finite_, next_out_ >= d_.outputs, t_start_, t_end_, dir_, &dt_, &h_);
    if (!finite_)
      for (int64_t i = 0; i < dim_; ++i) f0[i] = T(0);
    return status_ == kRunning;
  }

  // Stages first..S-1 of the step from (t_, y_) with h_.
  FLASHODE_HOST_DEVICE void stages(int first) {
    for (int i = first; i < method_.stages; ++i) {
      combine(&y_, k_, scaled_terms<T>(method_.a_rows[i], h_), dim_, x_);
      eval(static_cast<T>(t_ + method_.c[i] * h_), k_.at(i * dim_));
    }
  }

  // Every output time the accepted step [t0, t1] reached, from its dense output.
  FLASHODE_HOST_DEVICE void write_outputs(double t0, double t1) {
    for (; next_out_ < d_.outputs && (te_[next_out_] - t1) * dir_ <= 0.0; ++next_out_) {
      const int64_t j = next_out_;
      const Column<T> out{d_.ys + (s_ * d_.outputs + j) * dim_, 1};
      combine(&y_, k_, dense_terms<T>(method_, (te_[j] - t0) / h_, h_), dim_, out);
      d_.out_step[s_ * d_.outputs + j] = stats_[kAccepted];
    }
  }

  // The accepted step's checkpoint: its state and first stage at t0, (t0, h, t1).
  FLASHODE_HOST_DEVICE void record(double t0, double t1) {
    const int64_t n = stats_[kAccepted];
    if (!d_.record || n >= slot_.capacity) return;
    T* row = slot_.y + 2 * dim_ * n;
    for (int64_t i = 0; i < dim_; ++i) {
      row[i] = y_[i];
      row[dim_ + i] = k_[i];
    }
    double* times = slot_.t + 3 * n;
    times[0] = t0;
    times[1] = h_;
    times[2] = t1;
  }

  // batch_step for one sample: y1, the error ratio, accept, outputs, the controller.
  FLASHODE_HOST_DEVICE void adaptive_step() {
    stages(1);
    combine(&y_, k_, scaled_terms<T>(method_.b_row, h_), dim_, y1_);
    combine(static_cast<const Column<T>*>(nullptr), k_, scaled_terms<T>(method_.b_error_row, h_), dim_, err_);
    double sumsq = 0.0, finite = 0.0;
    for (int64_t i = 0; i < dim_; ++i) {
      const T y = magnitude(y_[i]), y1 = magnitude(y1_[i]);
      const T scale = tol(d_.atol, d_.atol_layout, i) + tol(d_.rtol, d_.rtol_layout, i) * (y < y1 ? y1 : y);
      const double ratio = err_[i] / scale;
      sumsq += ratio * ratio;
      finite += static_cast<double>(y1_[i] - y1_[i]);
    }
    const double ratio = finite != finite ? static_cast<double>(NAN) : sqrt(sumsq / static_cast<double>(dim_));
    const bool accept = ratio <= 1.0;
    const double t0 = t_;
    double t1 = t0;
    if (accept) {
      t1 = lands_on_end(d_.ctrl, t0, h_, t_end_) ? t_end_ : t0 + h_;
      record(t0, t1);
      write_outputs(t0, t1);
    }
    const SampleState state{&t_, &dt_, &h_, &status_, stats_, history_};
    advance_sample(d_.ctrl, state, ratio, accept, t1, next_out_ >= d_.outputs, t_end_, dir_);
    if (!accept) return;
    const Column<T> last = k_.at((method_.stages - 1) * dim_);
    for (int64_t i = 0; i < dim_; ++i) {
      y_[i] = y1_[i];
      k_[i] = last[i];  // the last stage is the next first
    }
  }

  // One step of the fixed grid: every stage evaluated afresh, no error control.
  FLASHODE_HOST_DEVICE void fixed_step() {
    stages(0);
    combine(&y_, k_, scaled_terms<T>(method_.b_row, h_), dim_, y1_);
    bool finite = true;
    for (int64_t i = 0; i < dim_; ++i) finite = finite && is_finite(y1_[i]);
    stats_[kFEvals] += method_.stages;
    stats_[kSteps] += 1;
    if (!finite) {  // the step is not taken: the sample stops where it was
      stats_[kRejected] += 1;
      status_ = kNonFinite;
      return;
    }
    const double t0 = t_, t1 = grid_time(grid_index_ + 1);
    record(t0, t1);
    write_outputs(t0, t1);
    stats_[kAccepted] += 1;
    for (int64_t i = 0; i < dim_; ++i) y_[i] = y1_[i];
    t_ = t1;
    ++grid_index_;
    if (grid_index_ >= grid_steps_) {
      status_ = kSuccess;
    } else if (stats_[kSteps] >= d_.ctrl.max_steps) {
      status_ = kMaxStepsReached;
    } else {
      h_ = grid_time(grid_index_ + 1) - t1;
    }
  }

  FLASHODE_HOST_DEVICE void finish() {
    d_.status[s_] = status_;
    d_.t_final[s_] = t_;
    for (int c = 0; c < kStatColumns; ++c) d_.stats[s_ * kStatColumns + c] = stats_[c];
  }

  const ForwardData<T>& d_;
  const MlpLayout& m_;
  const SampleMethod& method_;
  const T* params_;
  const int64_t s_, dim_;
  const Column<T> hidden_, x_, y_, k_, y1_, err_;
  const CheckpointSlot<T> slot_;
  const double* te_ = nullptr;
  double t_ = 0, dt_ = 0, h_ = 0, t_start_ = 0, t_end_ = 0, dir_ = 1;
  double history_[2] = {1.0, 1.0};
  int64_t status_ = kRunning;
  int64_t stats_[kStatColumns] = {};
  int64_t next_out_ = 0;
  int64_t grid_steps_ = 0, grid_index_ = 0;
  bool finite_ = true;
};

// Moves a sample's checkpoints from its slot to its rows offsets[s] .. offsets[s + 1] of the op's
// (K, 2, D) and (K, 3) outputs (the slot held all of them).
template <typename T>
FLASHODE_HOST_DEVICE inline void copy_checkpoints(CheckpointSlot<T> slot, int64_t rows, int64_t dim, T* ckpt_y,
                                                  double* ckpt_t) {
  for (int64_t i = 0; i < 2 * dim * rows; ++i) ckpt_y[i] = slot.y[i];
  for (int64_t i = 0; i < 3 * rows; ++i) ckpt_t[i] = slot.t[i];
}

// ------------------------------------------------------------------------------------------------
// Backward: the lane kernel's BackwardTile for one sample.

template <typename T>
struct BackwardData {
  SampleShape shape;
  SampleMethod method;
  bool shared_times = true;
  int64_t batch = 0, outputs = 0;
  const T *grad_ys = nullptr, *ckpt_y = nullptr;
  const double *t_eval = nullptr, *ckpt_t = nullptr;
  const int64_t *offsets = nullptr, *out_step = nullptr;
  T* grad_y0 = nullptr;
};

template <typename T, typename Grad>
class SampleBackward {
 public:
  FLASHODE_HOST_DEVICE SampleBackward(const BackwardData<T>& data, const T* params, int64_t sample,
                                      Column<T> hidden, Column<T> work, const Grad& grad)
      : d_(data), m_(data.shape.mlp), method_(data.method), params_(params), s_(sample), dim_(data.shape.dim),
        stages_(data.method.stages), hidden_(hidden), work_(work), kv_(work.at(data.shape.bwd_kv)),
        kappa_(work.at(data.shape.bwd_kappa)), lam_(work.at(data.shape.bwd_lam)), mu_(work.at(data.shape.bwd_mu)),
        lam_y_(work.at(data.shape.bwd_lam_y)), v_(work.at(data.shape.bwd_v)), grad_(grad) {}

  FLASHODE_HOST_DEVICE void run() {
    for (int64_t i = 0; i < dim_; ++i) lam_[i] = mu_[i] = T(0);
    const int64_t first = d_.offsets[s_], steps = d_.offsets[s_ + 1] - first;
    const int64_t* marks = d_.out_step + s_ * d_.outputs;
    int64_t output = d_.outputs - 1;
    while (output >= 0 && marks[output] == kOutputNotReached) --output;
    for (int64_t n = steps - 1; n >= 0; --n) step_back(first + n, n, &output);
    // dL/dy0: the cotangent carried back through the steps plus that of an output at the start.
    T* out = d_.grad_y0 + s_ * dim_;
    const bool at_start = marks[0] == kOutputAtStart;
    const T* g = d_.grad_ys + s_ * d_.outputs * dim_;
    for (int64_t i = 0; i < dim_; ++i) out[i] = lam_[i] + (at_start ? g[i] : T(0));
    if (method_.fixed || steps == 0) return;
    // An adaptive solve evaluated its first stage once, at its start: the product of f(t0, y0).
    const Column<T> rec = record(0);
    const T* y = d_.ckpt_y + 2 * dim_ * first;
    for (int64_t i = 0; i < dim_; ++i) rec[i] = y[i];
    if (m_.time_concat) rec[dim_] = static_cast<T>(d_.ckpt_t[3 * first]);
    mlp_eval(m_, d_.shape.record, params_, rec, v_, hidden_, rec);
    mlp_vjp(m_, d_.shape.record, params_, rec, mu_, v_, hidden_, grad_);
    for (int64_t i = 0; i < dim_; ++i) out[i] += v_[i];
  }

 private:
  FLASHODE_HOST_DEVICE Column<T> record(int i) const { return work_.at(i * d_.shape.record.size); }

  // Step n (checkpoint row r) backwards: its stages again, then the cotangents from its outputs,
  // its end state and the next step's first stage, through its stage sums and evaluations.
  FLASHODE_HOST_DEVICE void step_back(int64_t r, int64_t n, int64_t* output) {
    const T* ckpt = d_.ckpt_y + 2 * dim_ * r;
    const Column<T> y{const_cast<T*>(ckpt), 1}, k0{const_cast<T*>(ckpt + dim_), 1};
    const double t0 = d_.ckpt_t[3 * r], h = d_.ckpt_t[3 * r + 1];
    for (int64_t i = 0; i < dim_; ++i) kv_[i] = k0[i];
    for (int i = method_.fixed ? 0 : 1; i < stages_; ++i) {
      const Column<T> rec = record(i);
      combine(&y, kv_, scaled_terms<T>(method_.a_rows[i], h), dim_, rec);
      if (m_.time_concat) rec[dim_] = static_cast<T>(t0 + method_.c[i] * h);
      // The first stage's value is the checkpoint's; its evaluation is only recorded.
      mlp_eval(m_, d_.shape.record, params_, rec, i == 0 ? v_ : kv_.at(i * dim_), hidden_, rec);
    }
    for (int64_t i = 0; i < stages_ * dim_; ++i) kappa_[i] = T(0);
    for (int64_t i = 0; i < dim_; ++i) lam_y_[i] = T(0);
    const int64_t* marks = d_.out_step + s_ * d_.outputs;
    const double* te = times_of(d_.t_eval, d_.shared_times, s_, d_.outputs);
    for (; *output >= 0 && marks[*output] == n; --*output) {
      const Column<T> g{const_cast<T*>(d_.grad_ys + (s_ * d_.outputs + *output) * dim_), 1};
      add_terms(g, dense_terms<T>(method_, (te[*output] - t0) / h, h), dim_, kappa_, lam_y_);
    }
    add_terms(lam_, scaled_terms<T>(method_.b_row, h), dim_, kappa_, lam_y_);
    if (!method_.fixed) {
      const Column<T> last = kappa_.at((stages_ - 1) * dim_);
      for (int64_t i = 0; i < dim_; ++i) last[i] += mu_[i];
    }
    for (int i = stages_ - 1; i >= (method_.fixed ? 0 : 1); --i) {
      mlp_vjp(m_, d_.shape.record, params_, record(i), kappa_.at(i * dim_), v_, hidden_, grad_);
      add_terms(v_, scaled_terms<T>(method_.a_rows[i], h), dim_, kappa_, lam_y_);
    }
    // On an adaptive solve the first stage's cotangent goes to the previous step's last stage (it
    // was that stage's value) or, at the first step, to f(t0, y0)'s product.
    for (int64_t i = 0; i < dim_; ++i) {
      if (!method_.fixed) mu_[i] = kappa_[i];
      lam_[i] = lam_y_[i];
    }
  }

  const BackwardData<T>& d_;
  const MlpLayout& m_;
  const SampleMethod& method_;
  const T* params_;
  const int64_t s_, dim_;
  const int stages_;
  const Column<T> hidden_, work_, kv_, kappa_, lam_, mu_, lam_y_, v_;
  const Grad& grad_;
};

// ------------------------------------------------------------------------------------------------
// Host-side setup shared by the devices.

// The forward's inputs and outputs for the per-sample code (record and outputs: the op's tensors).
template <typename T>
ForwardData<T> forward_data(const MlpSolveCall& call, const MlpSolveOutputs& out) {
  ForwardData<T> d;
  d.shape = sample_shape(call.mlp, call.method.stages);
  d.method = sample_method(call.method);
  d.ctrl = call.ctrl;
  d.order = call.order;
  d.record = call.record;
  d.shared_times = call.shared_times;
  d.batch = call.batch;
  d.outputs = call.outputs;
  d.rtol_layout = call.rtol_layout;
  d.atol_layout = call.atol_layout;
  d.y0 = call.y0.template const_data_ptr<T>();
  d.rtol = call.rtol.template const_data_ptr<T>();
  d.atol = call.atol.template const_data_ptr<T>();
  d.t_eval = call.t_eval.template const_data_ptr<double>();
  d.t_start = call.t_start.template const_data_ptr<double>();
  d.t_end = call.t_end.template const_data_ptr<double>();
  d.first_step = call.first_step.numel() != 0 ? call.first_step.template const_data_ptr<double>() : nullptr;
  d.ys = out.ys.template mutable_data_ptr<T>();
  d.status = out.status.template mutable_data_ptr<int64_t>();
  d.t_final = out.t_final.template mutable_data_ptr<double>();
  d.stats = out.stats.template mutable_data_ptr<int64_t>();
  d.out_step = out.out_step.template mutable_data_ptr<int64_t>();
  return d;
}

template <typename T>
BackwardData<T> backward_data(const MlpBackwardCall& call, Tensor& grad_y0) {
  BackwardData<T> d;
  d.shape = sample_shape(call.mlp, call.method.stages);
  d.method = sample_method(call.method);
  d.shared_times = call.shared_times;
  d.batch = call.batch;
  d.outputs = call.outputs;
  d.grad_ys = call.grad_ys.template const_data_ptr<T>();
  d.ckpt_y = call.ckpt_y.template const_data_ptr<T>();
  d.t_eval = call.t_eval.template const_data_ptr<double>();
  d.ckpt_t = call.ckpt_t.template const_data_ptr<double>();
  d.offsets = call.offsets.template const_data_ptr<int64_t>();
  d.out_step = call.out_step.template const_data_ptr<int64_t>();
  d.grad_y0 = grad_y0.template mutable_data_ptr<T>();
  return d;
}

// Checkpoints are recorded in per-sample slots of a first-guess capacity (the step counts are known
// only after the solve); samples that needed more are solved again into their exact rows.
// The guess: up to kSlotSteps steps per sample, less when a batch's slots would pass kSlotBytes.
constexpr int64_t kSlotSteps = 64;
constexpr int64_t kSlotBytes = int64_t{256} << 20;

inline int64_t slot_capacity(int64_t batch, int64_t dim, int64_t max_steps, int64_t value_bytes) {
  const int64_t row_bytes = 2 * dim * value_bytes + 3 * static_cast<int64_t>(sizeof(double));
  const int64_t affordable = kSlotBytes / (std::max<int64_t>(batch, 1) * row_bytes);
  return std::max<int64_t>(1, std::min({kSlotSteps, max_steps, affordable}));
}

// Rows offsets (B + 1) of the compacted checkpoints from the per-sample step counts (stats column
// kAccepted: every accepted step has one), and the samples whose slots overflowed.
inline int64_t checkpoint_offsets(const int64_t* stats, int64_t batch, int64_t capacity, int64_t* offsets,
                                  std::vector<int64_t>* overflowed) {
  offsets[0] = 0;
  for (int64_t s = 0; s < batch; ++s) {
    const int64_t rows = stats[s * kStatColumns + kAccepted];
    offsets[s + 1] = offsets[s] + rows;
    if (rows > capacity) overflowed->push_back(s);
  }
  return offsets[batch];
}

}  // namespace sample
}  // namespace flashode
