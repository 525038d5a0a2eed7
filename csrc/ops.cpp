// Every flashode op schema, in one place. Kernels live in cpu/ and cuda/; autograd formulas and
// fake (meta) implementations are registered from Python (python/flashode/_ops.py).
//
// All ops see the state as a flat vector of N elements. `k` is the stacked stage buffer with
// k.size(0) = S rows of N elements each. Coefficients are host data (`float[]`), so a kernel never
// hard-codes a method: the Butcher tableaus live in python/flashode/tableaus.py.
#include <torch/csrc/stable/library.h>

STABLE_TORCH_LIBRARY(flashode, m) {
  // y + h * sum_j a[j] * k[j], over the first len(a) stages.
  m.def("rk_stage(Tensor y, Tensor k, float[] a, float h) -> Tensor");
  // One pass: y1 = y + h * sum_j b[j] k[j]; err = h * sum_j b_error[j] k[j]; and the error ratio
  // from RMS_s(err / (atol + rtol * max(|y|, |y1|))) over each segment s (0 for an empty one).
  // segment_ends are the cumulative ends of the segments, non-decreasing, the last <= N
  // ([] = one segment [0, N)); elements after the last end are finalised but in no segment (the
  // adjoint's seminorm). err is returned only if return_error (otherwise an empty tensor). The
  // ratio is float64: the max over segments as a 0-dim tensor, or with per_segment every RMS_s,
  // shape (number of segments,). A non-finite y1 anywhere, the tail included, makes every ratio
  // value NaN.
  m.def(
      "rk_finalize(Tensor y, Tensor k, float[] b, float[] b_error, float h, Tensor rtol, "
      "Tensor atol, int[] segment_ends, bool return_error, bool per_segment=False) "
      "-> (Tensor, Tensor, Tensor)");
  // Continuous extension at M points theta in [0, 1] of one step:
  // out[m] = y + h * sum_j B_j(theta_m) k[j], with B_j(x) = sum_p poly[j * D + p] x^(p + 1).
  m.def("rk_dense(Tensor y, Tensor k, float[] poly, float[] theta, float h) -> Tensor");

  // Batch-parallel ops (csrc/common/batch_args.h): y is (B, N), k (S, B, N), and every sample b has
  // its own float64 time t[b] and signed step h[b] (0 once it has stopped).
  // A stage per sample: (y + h[b] * sum_j a[j] k[j][b], and the stage times t + c * h in y's dtype).
  m.def("batch_stage(Tensor y, Tensor k, float[] a, Tensor h, Tensor t, float c) -> (Tensor, Tensor)");
  // A whole step's end per sample in one pass, for the samples still running: y1 and the error
  // ratio (as rk_finalize, per sample), accept (ratio <= 1), y_next = accept ? y1 : y, f_next (the
  // next step's first stage) = accept ? k[S-1] : k[0], every output time in t_eval (B, T) the step
  // reached written to ys (B, T, N) from the dense output `poly` (as rk_dense), then the new t, dt,
  // h, status, stats (B, 4: f-evals, steps, accepted, rejected), next output index and PID history
  // from the controller (batch_args.h: Controller). Stopped samples copy y and k[0] and change
  // nothing else. Returns the accept mask (B,) bool. No autograd formula is registered (an op that
  // writes its outputs in place cannot have one): recorded eager solves wrap the kernel in an
  // autograd.Function (python/flashode/_ops.py: _BatchStepFunction).
  m.def(
      "batch_step(Tensor y, Tensor k, Tensor rtol, Tensor atol, float[] b, float[] b_error, float[] poly, "
      "Tensor t_eval, Tensor t_end, Tensor direction, Tensor(a!) y_next, Tensor(b!) f_next, Tensor(c!) ys, "
      "Tensor(d!) t, Tensor(e!) dt, Tensor(f!) h, Tensor(g!) status, Tensor(h!) stats, Tensor(i!) next_out, "
      "Tensor(j!) history, float[] controller, int max_steps) -> Tensor");

  // Whole-solve fusion for MLP vector fields (csrc/common/mlp_solve_args.h): B samples y0 (B, D),
  // each with its own adaptive steps from t_start[b] to t_end[b] (float64 (B,)), the field an MLP
  // whose Linear layers (widths[0] -> ... -> widths[L]; input D, plus the time when time_concat;
  // output D) are packed in `params` (per layer its (out, in) weight, then its bias when `bias`),
  // with activation code `activation` between layers. The method is a tableau (a: the strictly
  // lower rows concatenated; b, b_error, c) and its dense output `poly` (as batch_step); order is
  // the controller's (also the initial step heuristic's). step_size > 0 runs a fixed grid instead
  // (odeint's: no error control). first_step: (B,) float64, or empty for solve_ivp's heuristic.
  // controller and max_steps as batch_step's. Returns ys (B, T, D) at t_eval ((T,) or (B, T),
  // float64; NaN where not reached), status (B,), t_final (B,), stats (B, 4), and with `record`
  // the checkpoints of every accepted step: ckpt_y (K, 2, D) (the state and the first stage at
  // its start), ckpt_t (K, 3) float64 (t0, h, t1), ckpt_offsets (B + 1,) (sample b's steps are
  // rows offsets[b] .. offsets[b + 1]), and out_step (B, T): the step that wrote each output
  // (-1: copied from y0, -2: not reached). Without `record`, K = 0.
  m.def(
      "mlp_solve(Tensor y0, Tensor params, int[] widths, int activation, bool time_concat, bool bias, "
      "Tensor t_eval, Tensor t_start, Tensor t_end, Tensor rtol, Tensor atol, Tensor first_step, float[] a, "
      "float[] b, float[] b_error, float[] c, float[] poly, int order, float[] controller, int max_steps, "
      "float step_size, bool record) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Gradients of the discrete mlp_solve with respect to y0 and params, from the cotangent of ys and
  // the forward's checkpoints: (grad_y0 (B, D), grad_params). Step sizes are not differentiated.
  m.def(
      "mlp_solve_backward(Tensor grad_ys, Tensor params, int[] widths, int activation, bool time_concat, "
      "bool bias, Tensor t_eval, Tensor ckpt_y, Tensor ckpt_t, Tensor ckpt_offsets, Tensor out_step, float[] a, "
      "float[] b, float[] c, float[] poly, float step_size) -> (Tensor, Tensor)");
}
