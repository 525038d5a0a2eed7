// The fused MLP solve (mlp_solve, mlp_solve_backward): argument checks, the packed-parameter
// layout, the method's coefficients, and the per-sample pieces of the algorithm (start of a solve,
// fixed grid) that a CPU and a CUDA kernel share, so both accept the same inputs and take the same
// decisions. The step-size control itself is batch_args.h's (Controller, advance_sample), the one
// solve_ivp uses: a fused solve takes the steps solve_ivp takes.
//
// The vector field is an MLP: Linear layers widths[0] -> widths[1] -> ... -> widths[L], with the
// activation between consecutive layers (not after the last). Its input is the state (D values),
// followed by the time when time_concat; its output is dy/dt (D values).
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

#include "common/batch_args.h"

namespace flashode {

// Activation codes (python/flashode/fused_mlp.py: ACTIVATIONS).
enum MlpActivation : int64_t {
  kTanh = 0,
  kSoftplus = 1,  // torch's default beta = 1, threshold = 20
  kRelu = 2,
  kSilu = 3,
  kElu = 4,  // alpha = 1
  kSigmoid = 5,
  kActivationCount = 6,
};

constexpr int kMaxMlpLayers = 16;
// Every hidden row of a tile lives in cache next to the weights; wider layers belong to a GEMM
// library, not to a fused per-sample solver.
constexpr int64_t kMaxMlpWidth = 1024;

// Where each layer lives in the packed parameter vector: for each Linear layer l its weight
// (widths[l + 1] x widths[l], row-major as nn.Linear stores it), then its bias when `bias`.
struct MlpLayout {
  int layers = 0;
  int64_t width[kMaxMlpLayers + 1] = {};
  int64_t weight_offset[kMaxMlpLayers] = {};
  int64_t bias_offset[kMaxMlpLayers] = {};  // -1 without biases
  int64_t bias_row[kMaxMlpLayers] = {};     // the layer's first bias among all biases
  int64_t biases = 0;                       // bias values in all
  int64_t params = 0;
  int64_t max_width = 0;
  int64_t state_dim = 0;
  int activation = kTanh;
  bool time_concat = false;
  bool bias = true;

  FLASHODE_HOST_DEVICE int64_t in(int l) const { return width[l]; }
  FLASHODE_HOST_DEVICE int64_t out(int l) const { return width[l + 1]; }
};

inline MlpLayout check_mlp(const Tensor& params, const std::vector<int64_t>& widths, int64_t activation,
                           bool time_concat, bool bias, int64_t state_dim, const Tensor& like, const char* op) {
  MlpLayout m;
  STD_TORCH_CHECK(widths.size() >= 2 && widths.size() <= static_cast<size_t>(kMaxMlpLayers) + 1, "flashode.", op,
                  ": widths must list the input width and every layer's output width (1 to ", kMaxMlpLayers,
                  " Linear layers), got ", widths.size(), " values");
  STD_TORCH_CHECK(activation >= 0 && activation < kActivationCount, "flashode.", op, ": unknown activation code ",
                  activation);
  m.layers = static_cast<int>(widths.size()) - 1;
  for (size_t l = 0; l < widths.size(); ++l) {
    STD_TORCH_CHECK(widths[l] >= 1 && widths[l] <= kMaxMlpWidth, "flashode.", op, ": layer widths must be in [1, ",
                    kMaxMlpWidth, "], got ", widths[l]);
    m.width[l] = widths[l];
    m.max_width = std::max(m.max_width, widths[l]);
  }
  const int64_t in = state_dim + (time_concat ? 1 : 0);
  STD_TORCH_CHECK(widths.front() == in, "flashode.", op, ": the first layer takes ", widths.front(),
                  " inputs, but the state has ", state_dim, time_concat ? " values plus the time" : " values");
  STD_TORCH_CHECK(widths.back() == state_dim, "flashode.", op, ": the last layer gives ", widths.back(),
                  " outputs, but the state has ", state_dim, " values");
  int64_t offset = 0;
  for (int l = 0; l < m.layers; ++l) {
    m.weight_offset[l] = offset;
    offset += m.out(l) * m.in(l);
    m.bias_offset[l] = bias ? offset : -1;
    offset += bias ? m.out(l) : 0;
    m.bias_row[l] = m.biases;
    m.biases += bias ? m.out(l) : 0;
  }
  m.params = offset;
  m.state_dim = state_dim;
  m.activation = static_cast<int>(activation);
  m.time_concat = time_concat;
  m.bias = bias;
  STD_TORCH_CHECK(params.dim() == 1 && params.numel() == offset, "flashode.", op,
                  ": params must be a 1-d tensor of every weight and bias packed (", offset,
                  " values for these widths), got ", params.numel(), " values in ", params.dim(), " dims");
  STD_TORCH_CHECK(params.scalar_type() == like.scalar_type(), "flashode.", op,
                  ": params must have the state's dtype, got ", dtype_name(params.scalar_type()), " for a ",
                  dtype_name(like.scalar_type()), " state");
  STD_TORCH_CHECK(params.get_device_index() == like.get_device_index() && params.is_cuda() == like.is_cuda(),
                  "flashode.", op, ": params must be on the state's device");
  return m;
}

// The method: an explicit tableau (c, strictly lower a given row by row, b) with, for adaptive
// methods, error weights and a dense output (poly, as batch_step's). A fixed-grid method
// (step_size > 0) has no error weights; its outputs use `poly` too (the Python layer passes the
// linear interpolant, odeint's fixed-grid default).
// A row of coefficients with its zeros dropped (a zero coefficient skips its stage entirely, as in
// batch_stage / batch_step: 0 * inf must not poison a state).
struct CoefficientRow {
  int count = 0;
  int index[kMaxStages] = {};
  double coef[kMaxStages] = {};
};

inline CoefficientRow nonzero_terms(const double* coef, int n) {
  CoefficientRow row;
  for (int j = 0; j < n; ++j) {
    if (coef[j] == 0.0) continue;
    row.index[row.count] = j;
    row.coef[row.count] = coef[j];
    ++row.count;
  }
  return row;
}

struct SolveMethod {
  int stages = 0;
  int degree = 0;
  bool fixed = false;
  double step_size = 0.0;
  double a[kMaxStages][kMaxStages] = {};
  double b[kMaxStages] = {};
  double b_error[kMaxStages] = {};
  double c[kMaxStages] = {};
  double poly[kMaxStages * kMaxDenseDegree] = {};
  CoefficientRow a_rows[kMaxStages];  // stage i's input: y + h sum_j a[i][j] k_j
  CoefficientRow b_row, b_error_row;
};

inline SolveMethod check_method(const std::vector<double>& a, const std::vector<double>& b,
                                const std::vector<double>& b_error, const std::vector<double>& c,
                                const std::vector<double>& poly, double step_size, const char* op) {
  SolveMethod m;
  const size_t s = c.size();
  STD_TORCH_CHECK(s >= 1 && s <= static_cast<size_t>(kMaxStages), "flashode.", op, ": c must hold 1 to ",
                  kMaxStages, " stage times, got ", s);
  STD_TORCH_CHECK(a.size() == s * (s - 1) / 2, "flashode.", op, ": a must hold the ", s * (s - 1) / 2,
                  " coefficients below the diagonal, row by row, got ", a.size());
  STD_TORCH_CHECK(b.size() == s, "flashode.", op, ": b needs one weight per stage (", s, ")");
  STD_TORCH_CHECK(std::isfinite(step_size) && step_size >= 0.0, "flashode.", op,
                  ": step_size must be 0 (adaptive) or positive (fixed grid)");
  m.fixed = step_size > 0.0;
  m.step_size = step_size;
  STD_TORCH_CHECK(m.fixed ? b_error.empty() || b_error.size() == s : b_error.size() == s, "flashode.", op,
                  ": an adaptive method needs one error weight per stage (", s, ")");
  STD_TORCH_CHECK(m.fixed || s >= 2, "flashode.", op, ": an adaptive method needs at least two stages");
  STD_TORCH_CHECK(!poly.empty() && poly.size() % s == 0 && poly.size() / s <= static_cast<size_t>(kMaxDenseDegree),
                  "flashode.", op, ": poly must hold S * D dense-output coefficients, D <= ", kMaxDenseDegree);
  m.stages = static_cast<int>(s);
  m.degree = static_cast<int>(poly.size() / s);
  size_t next = 0;
  for (size_t i = 1; i < s; ++i)
    for (size_t j = 0; j < i; ++j) m.a[i][j] = a[next++];
  for (size_t j = 0; j < s; ++j) {
    m.b[j] = b[j];
    m.b_error[j] = b_error.empty() ? 0.0 : b_error[j];
    m.c[j] = c[j];
  }
  std::copy(poly.begin(), poly.end(), m.poly);
  for (size_t i = 0; i < s; ++i) m.a_rows[i] = nonzero_terms(m.a[i], static_cast<int>(i));
  m.b_row = nonzero_terms(m.b, m.stages);
  m.b_error_row = nonzero_terms(m.b_error, m.stages);
  return m;
}

// ------------------------------------------------------------------------------------------------
// Per-sample pieces shared by the devices.

// The fixed grid of one sample, as odeint's fixed-grid solver builds it in its internal time
// tau = dir * t: ceil(span / step + 1) points tau_0 + i * step, the last one moved onto the end.
// Returns the number of steps (points - 1).
FLASHODE_HOST_DEVICE inline int64_t fixed_grid_steps(double t_start, double t_end, double dir, double step) {
  const double span = (t_end - t_start) * dir;
  return span > 0.0 ? static_cast<int64_t>(ceil(span / step + 1.0)) - 1 : 0;
}

// Grid point n of `steps` (user time).
FLASHODE_HOST_DEVICE inline double fixed_grid_time(int64_t n, int64_t steps, double t_start, double t_end,
                                                   double dir, double step) {
  return n >= steps ? t_end : dir * (static_cast<double>(n) * step + dir * t_start);
}

// The initial step heuristic of solve_ivp (BatchSolver._initial_step: Hairer, Nørsett & Wanner), per
// sample in the state's dtype, in its two halves around the second evaluation of f. d0, d1 are
// the RMS norms of y0 and f0 scaled by atol + rtol |y0|.
template <typename T>
FLASHODE_HOST_DEVICE inline T initial_h0(T d0, T d1) {
  const bool small = d0 < static_cast<T>(1e-5) || d1 < static_cast<T>(1e-5);
  T h0 = small ? static_cast<T>(1e-6) : static_cast<T>(0.01) * d0 / d1;
  h0 = h0 < 0 ? -h0 : h0;
  return h0 - h0 == 0 ? h0 : static_cast<T>(1e-6);  // not finite: the placeholder
}

// d2 is the RMS of (f1 - f0) / scale, f1 = f(t0 + h0, y0 + h0 f0); returns the first step (float64).
template <typename T>
FLASHODE_HOST_DEVICE inline double initial_dt(T h0, T d1, T rms_df, int order) {
  T d2 = rms_df / h0;
  d2 = d2 < 0 ? -d2 : d2;
  const bool flat = d1 <= static_cast<T>(1e-15) && d2 <= static_cast<T>(1e-15);
  T h1;
  if (flat) {
    h1 = h0 * static_cast<T>(1e-3);
    h1 = h1 < static_cast<T>(1e-6) ? static_cast<T>(1e-6) : h1;
  } else {
    const T big = d1 > d2 ? d1 : d2;
    // pow in float64, rounded once to the state's dtype: the same on every device.
    h1 = static_cast<T>(pow(static_cast<double>(static_cast<T>(0.01) / big), static_cast<double>(static_cast<T>(1.0 / order))));
  }
  h1 = h1 < 0 ? -h1 : h1;
  const T hundred = static_cast<T>(100) * h0;
  const double dt = static_cast<double>(hundred < h1 ? hundred : h1);
  return dt - dt == 0.0 && dt > 0.0 ? dt : 1e-6;
}

// A sample's status and signed step before its first step (BatchSolver._start): done when its
// span is empty and every output is written; non-finite when y0 or f(t0, y0) is; below dt_min
// it underflows. Returns the status; *h is the signed first step (0 unless running), *dt the
// controller's proposal.
FLASHODE_HOST_DEVICE inline int64_t start_sample(const Controller& c, double dt, bool finite, bool outputs_done,
                                                 double t_start, double t_end, double dir, double* dt_out,
                                                 double* h) {
  dt = dt > c.dt_max ? c.dt_max : dt;
  const double remaining = (t_end - t_start) * dir;
  const double step = c.clip_to_end && dt >= remaining ? remaining : dt;
  const bool done = remaining <= 0.0 && outputs_done;
  int64_t status = done ? kSuccess : (finite ? kRunning : kNonFinite);
  if (status == kRunning && !(dt >= c.dt_min)) status = kDtUnderflow;
  *dt_out = dt;
  *h = status == kRunning ? dir * step : 0.0;
  return status;
}

// Output markers (out_step): the step that wrote each output (its index among the sample's
// accepted steps), or one of these.
constexpr int64_t kOutputAtStart = -1;  // copied from y0 (t_eval[0] == t_start)
constexpr int64_t kOutputNotReached = -2;

// ------------------------------------------------------------------------------------------------
// The ops' arguments.

struct MlpSolveCall {
  Tensor y0, params, t_eval, t_start, t_end, rtol, atol, first_step;
  MlpLayout mlp;
  SolveMethod method;
  Controller ctrl;
  int order;
  bool record;
  bool shared_times;  // t_eval is (T,), one row for every sample
  int64_t batch, dim, outputs;
  ToleranceLayout rtol_layout, atol_layout;
};

// The per-sample outputs of mlp_solve, allocated alike by every kernel: ys (B, T, D), status (B,),
// t_final (B,) float64, stats (B, kStatColumns) and out_step (B, T).
struct MlpSolveOutputs {
  Tensor ys, status, t_final, stats, out_step;

  explicit MlpSolveOutputs(const MlpSolveCall& call)
      : ys(new_contiguous(call.y0, {call.batch, call.outputs, call.dim}, dtype_code(call.y0))),
        status(new_contiguous(call.y0, {call.batch}, aoti_torch_dtype_int64())),
        t_final(new_contiguous(call.y0, {call.batch}, aoti_torch_dtype_float64())),
        stats(new_contiguous(call.y0, {call.batch, kStatColumns}, aoti_torch_dtype_int64())),
        out_step(new_contiguous(call.y0, {call.batch, call.outputs}, aoti_torch_dtype_int64())) {}
};

inline void check_times(const Tensor& t_eval, const Tensor& like, int64_t batch, const char* op) {
  STD_TORCH_CHECK(t_eval.scalar_type() == ScalarType::Double && (t_eval.dim() == 1 || t_eval.dim() == 2),
                  "flashode.", op, ": t_eval must be a float64 (T,) or (B, T) tensor");
  STD_TORCH_CHECK(t_eval.dim() == 1 || t_eval.size(0) == batch, "flashode.", op, ": t_eval has ", t_eval.size(0),
                  " rows for ", batch, " samples");
  STD_TORCH_CHECK(t_eval.size(t_eval.dim() - 1) >= 1, "flashode.", op, ": t_eval needs at least one time");
  STD_TORCH_CHECK(t_eval.get_device_index() == like.get_device_index() && t_eval.is_cuda() == like.is_cuda(),
                  "flashode.", op, ": t_eval must be on the state's device");
}

inline void check_mlp_state(const Tensor& y, const char* op) {
  check_state(y, op);
  STD_TORCH_CHECK(y.dim() == 2, "flashode.", op, ": y0 must be a (B, D) tensor, got ", y.dim(), " dims");
  STD_TORCH_CHECK(y.size(1) >= 1, "flashode.", op, ": the state needs at least one value");
}

inline MlpSolveCall prepare_mlp_solve(const Tensor& y0, const Tensor& params, const std::vector<int64_t>& widths,
                                      int64_t activation, bool time_concat, bool bias, const Tensor& t_eval,
                                      const Tensor& t_start, const Tensor& t_end, const Tensor& rtol,
                                      const Tensor& atol, const Tensor& first_step, const std::vector<double>& a,
                                      const std::vector<double>& b, const std::vector<double>& b_error,
                                      const std::vector<double>& c, const std::vector<double>& poly, int64_t order,
                                      const std::vector<double>& controller, int64_t max_steps, double step_size,
                                      bool record) {
  const char* op = "mlp_solve";
  check_mlp_state(y0, op);
  const int64_t batch = y0.size(0), dim = y0.size(1);
  MlpSolveCall call;
  call.mlp = check_mlp(params, widths, activation, time_concat, bias, dim, y0, op);
  call.method = check_method(a, b, b_error, c, poly, step_size, op);
  call.ctrl = unpack_controller(controller, max_steps);
  STD_TORCH_CHECK(order >= 1, "flashode.mlp_solve: order must be positive");
  check_times(t_eval, y0, batch, op);
  check_batch_vector(t_start, batch, ScalarType::Double, y0, "t_start", op);
  check_batch_vector(t_end, batch, ScalarType::Double, y0, "t_end", op);
  STD_TORCH_CHECK(first_step.numel() == 0 || first_step.numel() == batch, "flashode.mlp_solve: first_step must be "
                  "empty (the initial step heuristic) or hold one value per sample");
  if (first_step.numel() != 0) check_batch_vector(first_step, batch, ScalarType::Double, y0, "first_step", op);
  for (const Tensor* tol : {&rtol, &atol}) {
    STD_TORCH_CHECK(tol->numel() == 1 || tol->numel() == dim || tol->numel() == batch * dim,
                    "flashode.mlp_solve: rtol and atol must have 1, D or B * D values, got ", tol->numel());
    STD_TORCH_CHECK(tol->scalar_type() == y0.scalar_type(), "flashode.mlp_solve: rtol and atol must have the "
                    "state's dtype");
    STD_TORCH_CHECK(tol->get_device_index() == y0.get_device_index() && tol->is_cuda() == y0.is_cuda(),
                    "flashode.mlp_solve: rtol and atol must be on the state's device");
  }
  call.y0 = as_contiguous(y0);
  call.params = as_contiguous(params);
  call.t_eval = as_contiguous(t_eval);
  call.t_start = t_start;
  call.t_end = t_end;
  call.rtol = as_contiguous(rtol);
  call.atol = as_contiguous(atol);
  call.first_step = first_step;
  call.order = static_cast<int>(order);
  call.record = record;
  call.shared_times = t_eval.dim() == 1;
  call.batch = batch;
  call.dim = dim;
  call.outputs = t_eval.size(t_eval.dim() - 1);
  call.rtol_layout = tolerance_layout(rtol, dim);
  call.atol_layout = tolerance_layout(atol, dim);
  return call;
}

struct MlpBackwardCall {
  Tensor grad_ys, params, t_eval, ckpt_y, ckpt_t, offsets, out_step;
  MlpLayout mlp;
  SolveMethod method;
  bool shared_times;
  int64_t batch, dim, outputs, rows;
};

inline MlpBackwardCall prepare_mlp_solve_backward(const Tensor& grad_ys, const Tensor& params,
                                                  const std::vector<int64_t>& widths, int64_t activation,
                                                  bool time_concat, bool bias, const Tensor& t_eval,
                                                  const Tensor& ckpt_y, const Tensor& ckpt_t, const Tensor& offsets,
                                                  const Tensor& out_step, const std::vector<double>& a,
                                                  const std::vector<double>& b, const std::vector<double>& c,
                                                  const std::vector<double>& poly, double step_size) {
  const char* op = "mlp_solve_backward";
  check_state(grad_ys, op);
  STD_TORCH_CHECK(grad_ys.dim() == 3, "flashode.mlp_solve_backward: grad_ys must be a (B, T, D) tensor");
  const int64_t batch = grad_ys.size(0), outputs = grad_ys.size(1), dim = grad_ys.size(2);
  MlpBackwardCall call;
  call.mlp = check_mlp(params, widths, activation, time_concat, bias, dim, grad_ys, op);
  // The error weights do not enter the gradients (step sizes are not differentiated).
  const std::vector<double> no_error(step_size > 0.0 ? 0 : c.size(), 0.0);
  call.method = check_method(a, b, no_error, c, poly, step_size, op);
  check_times(t_eval, grad_ys, batch, op);
  STD_TORCH_CHECK(t_eval.size(t_eval.dim() - 1) == outputs, "flashode.mlp_solve_backward: t_eval and grad_ys "
                  "disagree on the number of outputs");
  const int64_t rows = ckpt_y.dim() == 3 ? ckpt_y.size(0) : -1;
  STD_TORCH_CHECK(rows >= 0 && ckpt_y.size(1) == 2 && ckpt_y.size(2) == dim &&
                      ckpt_y.scalar_type() == grad_ys.scalar_type(),
                  "flashode.mlp_solve_backward: ckpt_y must be a (K, 2, D) tensor in the state's dtype");
  STD_TORCH_CHECK(ckpt_t.dim() == 2 && ckpt_t.size(0) == rows && ckpt_t.size(1) == 3 &&
                      ckpt_t.scalar_type() == ScalarType::Double,
                  "flashode.mlp_solve_backward: ckpt_t must be a float64 (K, 3) tensor");
  check_batch_vector(offsets, batch + 1, ScalarType::Long, grad_ys, "ckpt_offsets", op);
  check_batch_vector(out_step, batch * outputs, ScalarType::Long, grad_ys, "out_step", op);
  for (const Tensor* t : {&ckpt_y, &ckpt_t}) {
    STD_TORCH_CHECK(t->get_device_index() == grad_ys.get_device_index() && t->is_cuda() == grad_ys.is_cuda(),
                    "flashode.mlp_solve_backward: the checkpoints must be on the state's device");
  }
  call.grad_ys = as_contiguous(grad_ys);
  call.params = as_contiguous(params);
  call.t_eval = as_contiguous(t_eval);
  call.ckpt_y = as_contiguous(ckpt_y);
  call.ckpt_t = as_contiguous(ckpt_t);
  call.offsets = offsets;
  call.out_step = out_step;
  call.shared_times = t_eval.dim() == 1;
  call.batch = batch;
  call.dim = dim;
  call.outputs = outputs;
  call.rows = rows;
  return call;
}

}  // namespace flashode
