// The batch-parallel ops (batch_stage, batch_step): argument checks, and the per-sample step-size
// control shared by the CPU and CUDA kernels, so both devices accept the same inputs and take the
// same decisions (to the last bit of pow, which CUDA's libdevice and glibc may round differently).
//
// A batch state is y (B, N): B independent samples of N elements each, every sample with its own
// time t[b], direction dir[b] = +-1, the controller's step proposal dt[b] > 0 and the signed step
// it takes next, h[b] = dir[b] * dt[b], or less when clipped to land on t_end (0 once the sample
// has stopped). Times are float64 whatever the state's dtype.
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

#include "common/rk_args.h"

namespace flashode {

// Per-sample status codes (python/flashode/batch.py: Status).
enum SampleStatus : int64_t {
  kRunning = -1,
  kSuccess = 0,
  kMaxStepsReached = 1,
  kDtUnderflow = 2,
  kNonFinite = 3,
};

// Columns of the (B, 4) int64 stats tensor.
enum StatColumn : int { kFEvals = 0, kSteps = 1, kAccepted = 2, kRejected = 3, kStatColumns = 4 };

// The step-size controller, unpacked from the op's `controller` float list (same order; see
// batch.py: Controller.pack): the integral controller is the PID one with beta2 = beta3 = 0.
struct Controller {
  bool pid;
  double safety, ifactor, dfactor;
  double beta1, beta2, beta3;  // exponents of 1/ratio_n, 1/ratio_{n-1}, 1/ratio_{n-2}
  double dt_min, dt_max;
  bool clip_to_end;     // shorten the step that would pass t_end so it lands on t_end exactly
  int64_t stage_evals;  // evaluations of f per step attempt (for the stats)
  int64_t max_steps;    // step attempts per sample before kMaxStepsReached
};

constexpr int kControllerFields = 11;

inline Controller unpack_controller(const std::vector<double>& c, int64_t max_steps) {
  STD_TORCH_CHECK(c.size() == kControllerFields, "flashode.batch_step: controller must hold ",
                  kControllerFields, " values, got ", c.size());
  STD_TORCH_CHECK(c[1] > 0 && c[2] >= 1 && c[3] > 0 && c[3] <= 1,
                  "flashode.batch_step: need safety > 0, ifactor >= 1 and 0 < dfactor <= 1");
  STD_TORCH_CHECK(c[7] >= 0 && c[8] > 0 && c[7] <= c[8], "flashode.batch_step: need 0 <= dt_min <= dt_max");
  STD_TORCH_CHECK(max_steps > 0, "flashode.batch_step: max_steps must be positive");
  return Controller{c[0] != 0.0, c[1], c[2], c[3], c[4], c[5], c[6], c[7], c[8], c[9] != 0.0,
                    static_cast<int64_t>(c[10]), max_steps};
}

// The proposal after a step with error ratio `ratio` (NaN for a non-finite state). The integral
// controller is torchdiffeq's: dt * clamp(safety * ratio^(-1/order), dfactor or 1, ifactor), with
// the lower clamp 1 after an accepted step; the PID one (diffrax's PIDController form) multiplies
// in the two previous accepted ratios.
FLASHODE_HOST_DEVICE inline double propose_dt(const Controller& c, double dt, double ratio, double prev,
                                              double prev_prev) {
  if (ratio == 0.0) return dt * c.ifactor;
  if (!(ratio == ratio) || ratio == INFINITY) return dt * c.dfactor;
  double factor;
  if (c.pid) {
    // Ratios are floored so 1/ratio stays finite (a zero error once must not poison the next two).
    const double floor = 1e-12;
    factor = c.safety * pow(1.0 / fmax(ratio, floor), c.beta1) * pow(1.0 / fmax(prev, floor), c.beta2) *
             pow(1.0 / fmax(prev_prev, floor), c.beta3);
  } else {
    factor = c.safety / pow(ratio, c.beta1);  // beta1 = 1/order: the exact torchdiffeq expression
  }
  const double lower = ratio < 1.0 ? 1.0 : c.dfactor;
  return dt * fmin(c.ifactor, fmax(factor, lower));
}

// One sample's bookkeeping after its step attempt: the stats, the PID history, the new dt, h and
// status. `t1` is the sample's time after the step (its old time when rejected) and `outputs_done`
// whether every output time has been written.
struct SampleState {
  double* t;
  double* dt;
  double* h;
  int64_t* status;
  int64_t* stats;    // kStatColumns values
  double* history;   // the last two accepted ratios
};

FLASHODE_HOST_DEVICE inline void advance_sample(const Controller& c, const SampleState& s, double ratio,
                                                bool accept, double t1, bool outputs_done, double t_end,
                                                double dir) {
  s.stats[kFEvals] += c.stage_evals;
  s.stats[kSteps] += 1;
  s.stats[accept ? kAccepted : kRejected] += 1;
  // The proposal scales the step actually taken, |h|: after a step clipped to t_end that is less
  // than dt, the proposal it was clipped from.
  const double dt_new = fmin(propose_dt(c, fabs(*s.h), ratio, s.history[0], s.history[1]), c.dt_max);
  if (accept) {
    s.history[1] = s.history[0];
    s.history[0] = ratio;
    *s.t = t1;
  }
  // dt keeps the unclipped proposal, so a solve resumed from here (the adjoint's next interval)
  // does not restart from a clipped remainder.
  *s.dt = dt_new;
  const double remaining = (t_end - *s.t) * dir;
  if (accept && outputs_done && remaining <= 0.0) {
    *s.status = kSuccess;
    *s.h = 0.0;
    return;
  }
  int64_t status = kRunning;
  if (s.stats[kSteps] >= c.max_steps) {
    status = kMaxStepsReached;
  } else if (!(dt_new >= c.dt_min) || !(*s.t + dir * dt_new != *s.t) || !(dt_new < INFINITY)) {
    // Too small to make progress (or NaN): after non-finite states, say so.
    status = (ratio == ratio && ratio != INFINITY) ? kDtUnderflow : kNonFinite;
  }
  const double step = c.clip_to_end && remaining > 0.0 && dt_new >= remaining ? remaining : dt_new;
  *s.status = status;
  *s.h = status == kRunning ? dir * step : 0.0;
}

// Whether a sample's step of signed size h from t0 is the clipped last step (it then lands on
// t_end exactly: t0 + h may differ from t_end by rounding).
FLASHODE_HOST_DEVICE inline bool lands_on_end(const Controller& c, double t0, double h, double t_end) {
  return c.clip_to_end && h == t_end - t0;
}

// h * B_j(theta) for one output time: the dense-output weight of stage j.
FLASHODE_HOST_DEVICE inline double dense_weight(const double* poly, int degree, int j, double theta, double h) {
  double acc = 0.0, power = theta;
  for (int p = 0; p < degree; ++p) {
    acc += poly[j * degree + p] * power;
    power *= theta;
  }
  return acc * h;
}

// ------------------------------------------------------------------------------------------------
// Argument checks. Every per-sample tensor is contiguous with B entries (the Python layer owns and
// allocates them), so they are checked, not copied: the kernels write into them.

inline void check_batch_vector(const Tensor& x, int64_t batch, ScalarType dtype, const Tensor& like,
                               const char* name, const char* op) {
  STD_TORCH_CHECK(x.numel() == batch && x.is_contiguous(), "flashode.", op, ": ", name,
                  " must be a contiguous tensor with one entry per sample (", batch, "), got ", x.numel());
  STD_TORCH_CHECK(x.scalar_type() == dtype, "flashode.", op, ": ", name, " has the wrong dtype");
  STD_TORCH_CHECK(x.get_device_index() == like.get_device_index() && x.is_cuda() == like.is_cuda(),
                  "flashode.", op, ": ", name, " must be on the state's device");
}

// y is (B, N) (any trailing shape flattened) and k (S, B, N); returns S.
inline int64_t check_batch_state(const Tensor& y, const Tensor& k, int64_t needed, const char* op) {
  check_state(y, op);
  STD_TORCH_CHECK(y.dim() >= 1, "flashode.", op, ": y must have a leading batch dimension");
  return check_stages(y, k, needed, op);
}

struct BatchStageCall {
  Tensor y, k, h, t, out, t_out;
  std::vector<double> a;
  double c;
};

inline BatchStageCall prepare_batch_stage(const Tensor& y, const Tensor& k, const std::vector<double>& a,
                                          const Tensor& h, const Tensor& t, double c) {
  check_batch_state(y, k, static_cast<int64_t>(a.size()), "batch_stage");
  const int64_t batch = y.size(0);
  STD_TORCH_CHECK(a.size() <= static_cast<size_t>(kMaxStages), "flashode.batch_stage: at most ", kMaxStages,
                  " stage coefficients are supported");
  check_batch_vector(h, batch, ScalarType::Double, y, "h", "batch_stage");
  check_batch_vector(t, batch, ScalarType::Double, y, "t", "batch_stage");
  BatchStageCall call{as_contiguous(y), as_contiguous(k), h, t, Tensor(), Tensor(), a, c};
  call.out = new_like(call.y);
  call.t_out = new_contiguous(call.y, {batch}, dtype_code(call.y));
  return call;
}

// How a tolerance tensor covers the (B, N) state: one value, one per element (shared by the
// samples), or one per sample and element. rtol and atol are sized independently.
enum class ToleranceLayout : int { kScalar, kPerElement, kPerSampleElement };

// The tolerance's index for flat element i = b * N + r.
FLASHODE_HOST_DEVICE inline int64_t tolerance_index(ToleranceLayout layout, int64_t i, int64_t r) {
  return layout == ToleranceLayout::kScalar ? 0 : layout == ToleranceLayout::kPerElement ? r : i;
}

inline ToleranceLayout tolerance_layout(const Tensor& tol, int64_t n) {
  if (tol.numel() == 1) return ToleranceLayout::kScalar;
  return tol.numel() == n ? ToleranceLayout::kPerElement : ToleranceLayout::kPerSampleElement;
}

struct BatchStepCall {
  Tensor y, k, rtol, atol, t_eval, t_end, dir;
  Tensor y_next, f_next, ys, t, dt, h, status, stats, next_out, history, accept;
  std::vector<double> b, b_error, poly;
  int degree;
  Controller ctrl;
  int64_t batch, n, outputs;
  ToleranceLayout rtol_layout, atol_layout;
};

inline void check_batch_tolerance(const Tensor& tol, const Tensor& y, int64_t batch, int64_t n, const char* name) {
  STD_TORCH_CHECK(tol.numel() == 1 || tol.numel() == n || tol.numel() == batch * n, "flashode.batch_step: ",
                  name, " must have 1, ", n, " (per element) or ", batch * n, " (per sample and element) values, got ",
                  tol.numel());
  STD_TORCH_CHECK(tol.scalar_type() == y.scalar_type(), "flashode.batch_step: ", name, " must have the state's dtype");
  STD_TORCH_CHECK(tol.get_device_index() == y.get_device_index() && tol.is_cuda() == y.is_cuda(),
                  "flashode.batch_step: ", name, " must be on the state's device");
}

inline BatchStepCall prepare_batch_step(const Tensor& y, const Tensor& k, const Tensor& rtol, const Tensor& atol,
                                        const std::vector<double>& b, const std::vector<double>& b_error,
                                        const std::vector<double>& poly, const Tensor& t_eval, const Tensor& t_end,
                                        const Tensor& dir, const Tensor& y_next, const Tensor& f_next,
                                        const Tensor& ys, const Tensor& t, const Tensor& dt, const Tensor& h,
                                        const Tensor& status, const Tensor& stats, const Tensor& next_out,
                                        const Tensor& history, const std::vector<double>& controller,
                                        int64_t max_steps) {
  const char* op = "batch_step";
  const int64_t stages = check_batch_state(y, k, static_cast<int64_t>(std::max(b.size(), b_error.size())), op);
  STD_TORCH_CHECK(stages >= 1, "flashode.batch_step: k needs at least one stage");
  const int64_t batch = y.size(0);
  const int64_t n = batch == 0 ? 0 : y.numel() / batch;
  STD_TORCH_CHECK(b.size() == static_cast<size_t>(stages) && b_error.size() == static_cast<size_t>(stages),
                  "flashode.batch_step: b and b_error need one weight per stage (", stages, ")");
  STD_TORCH_CHECK(!poly.empty() && poly.size() % stages == 0 && poly.size() / stages <= kMaxDenseDegree,
                  "flashode.batch_step: poly must hold S * D dense-output coefficients, D <= ", kMaxDenseDegree);
  check_batch_tolerance(rtol, y, batch, n, "rtol");
  check_batch_tolerance(atol, y, batch, n, "atol");
  for (const Tensor* out : {&y_next, &f_next}) {
    STD_TORCH_CHECK(out->numel() == y.numel() && out->is_contiguous() && out->scalar_type() == y.scalar_type() &&
                        out->get_device_index() == y.get_device_index() && out->is_cuda() == y.is_cuda(),
                    "flashode.batch_step: y_next and f_next must be contiguous like y");
  }
  STD_TORCH_CHECK(t_eval.dim() == 2 && t_eval.size(0) == batch && t_eval.is_contiguous() &&
                      t_eval.scalar_type() == ScalarType::Double,
                  "flashode.batch_step: t_eval must be a contiguous float64 (B, T) tensor");
  const int64_t outputs = t_eval.size(1);
  STD_TORCH_CHECK(ys.numel() == batch * outputs * n && ys.is_contiguous() && ys.scalar_type() == y.scalar_type() &&
                      ys.get_device_index() == y.get_device_index() && ys.is_cuda() == y.is_cuda(),
                  "flashode.batch_step: ys must be a contiguous (B, T, N) tensor in the state's dtype");
  check_batch_vector(t_eval, batch * outputs, ScalarType::Double, y, "t_eval", op);
  check_batch_vector(t_end, batch, ScalarType::Double, y, "t_end", op);
  check_batch_vector(dir, batch, ScalarType::Double, y, "direction", op);
  check_batch_vector(t, batch, ScalarType::Double, y, "t", op);
  check_batch_vector(dt, batch, ScalarType::Double, y, "dt", op);
  check_batch_vector(h, batch, ScalarType::Double, y, "h", op);
  check_batch_vector(status, batch, ScalarType::Long, y, "status", op);
  check_batch_vector(stats, batch * kStatColumns, ScalarType::Long, y, "stats", op);
  check_batch_vector(next_out, batch, ScalarType::Long, y, "next_out", op);
  check_batch_vector(history, batch * 2, ScalarType::Double, y, "history", op);
  BatchStepCall call{as_contiguous(y), as_contiguous(k), as_contiguous(rtol), as_contiguous(atol), t_eval, t_end,
                     dir, y_next, f_next, ys, t, dt, h, status, stats, next_out, history, Tensor(), b, b_error, poly,
                     static_cast<int>(poly.size() / stages), unpack_controller(controller, max_steps), batch, n,
                     outputs, tolerance_layout(rtol, n), tolerance_layout(atol, n)};
  call.accept = new_contiguous(call.y, {batch}, aoti_torch_dtype_bool());
  return call;
}

}  // namespace flashode
