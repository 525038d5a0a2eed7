// The fused MLP solve one sample at a time on the host, with the per-sample code of the CUDA
// kernels (common/mlp_sample_solve.h) and their checkpoint scheme: slots of a first-guess capacity,
// the samples that overflowed solved again into their exact rows, the rest compacted. It exists to
// test that code where no GPU is: its results equal the lane kernel's (cpu/mlp_solve_kernels.cpp).
#include "cpu/mlp_solve_per_sample.h"

#include <cstdlib>
#include <cstring>
#include <vector>

#include "common/mlp_sample_solve.h"
#include "cpu/cpu_common.h"

namespace flashode {
namespace {

// Samples per piece of the thread split; each piece has its own work columns.
constexpr int64_t kSamplesPerPiece = 16;

// The first-guess slot capacity, small on purpose: the tests' solves then take both the direct and
// the overflow path of the scheme the CUDA forward uses.
constexpr int64_t kHostSlotSteps = 8;

// Parameter gradients on the host: a plain sum (one buffer per piece of samples).
template <typename T>
struct PlainAdd {
  T* grad;
  void add(int64_t i, T v) const { grad[i] += v; }
};

// Runs the forward of samples[i] for i in [0, count) (or sample i when samples is null), sample s's
// checkpoints into slot_of(s).
template <typename T, typename Slot>
void run_forward(const sample::ForwardData<T>& data, const T* params, const int64_t* samples, int64_t count,
                 const Slot& slot_of) {
  for_each_piece(count, kSamplesPerPiece, [&](int64_t i0, int64_t i1) {
    std::vector<T> hidden(data.shape.hidden_size), work(data.shape.forward_size);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t s = samples == nullptr ? i : samples[i];
      sample::SampleForward<T>(data, params, s, sample::Column<T>{hidden.data(), 1},
                               sample::Column<T>{work.data(), 1}, slot_of(s))
          .run();
    }
  });
}

template <typename T>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> solve(const MlpSolveCall& call) {
  const int64_t batch = call.batch, dim = call.dim;
  const MlpSolveOutputs out(call);
  Tensor offsets = new_contiguous(call.y0, {batch + 1}, aoti_torch_dtype_int64());
  const sample::ForwardData<T> data = sample::forward_data<T>(call, out);
  const T* params = call.params.template const_data_ptr<T>();
  int64_t* off = offsets.template mutable_data_ptr<int64_t>();

  const int64_t capacity = call.record ? std::min(kHostSlotSteps, call.ctrl.max_steps) : 0;
  std::vector<T> slot_y(static_cast<size_t>(batch * capacity * 2 * dim));
  std::vector<double> slot_t(static_cast<size_t>(batch * capacity * 3));
  const auto slot = [&](int64_t s) {
    return sample::CheckpointSlot<T>{slot_y.data() + s * capacity * 2 * dim, slot_t.data() + s * capacity * 3,
                                     capacity};
  };
  run_forward(data, params, nullptr, batch, slot);

  std::vector<int64_t> overflowed;
  int64_t rows = 0;
  if (call.record)
    rows = sample::checkpoint_offsets(data.stats, batch, capacity, off, &overflowed);
  else
    std::fill(off, off + batch + 1, int64_t{0});
  Tensor ckpt_y = new_contiguous(call.y0, {rows, 2, dim}, dtype_code(call.y0));
  Tensor ckpt_t = new_contiguous(call.y0, {rows, 3}, aoti_torch_dtype_float64());
  T* cy = ckpt_y.template mutable_data_ptr<T>();
  double* ct = ckpt_t.template mutable_data_ptr<double>();
  const auto exact = [&](int64_t s) {
    return sample::CheckpointSlot<T>{cy + off[s] * 2 * dim, ct + off[s] * 3, off[s + 1] - off[s]};
  };
  // The solve is deterministic: the second run repeats the first, step for step.
  run_forward(data, params, overflowed.data(), static_cast<int64_t>(overflowed.size()), exact);
  for (int64_t s = 0; s < batch && call.record; ++s) {
    const sample::CheckpointSlot<T> rows_of = exact(s);
    if (rows_of.capacity <= capacity) sample::copy_checkpoints(slot(s), rows_of.capacity, dim, rows_of.y, rows_of.t);
  }
  return {out.ys, out.status, out.t_final, out.stats, ckpt_y, ckpt_t, offsets, out.out_step};
}

template <typename T>
std::tuple<Tensor, Tensor> backward(const MlpBackwardCall& call) {
  const int64_t batch = call.batch, dim = call.dim, params = call.mlp.params;
  Tensor grad_y0 = new_contiguous(call.grad_ys, {batch, dim}, dtype_code(call.grad_ys));
  Tensor grad_params = new_contiguous(call.grad_ys, {params}, dtype_code(call.grad_ys));
  const sample::BackwardData<T> data = sample::backward_data<T>(call, grad_y0);
  const T* p = call.params.template const_data_ptr<T>();
  // One gradient buffer per fixed piece of samples, added in order: independent of the threads.
  const int64_t pieces = std::max<int64_t>(1, (batch + kSamplesPerPiece - 1) / kSamplesPerPiece);
  std::vector<T> partial(static_cast<size_t>(pieces * params), T(0));
  for_each_piece(batch, kSamplesPerPiece, [&](int64_t s0, int64_t s1) {
    std::vector<T> hidden(data.shape.hidden_size), work(data.shape.backward_size);
    const PlainAdd<T> grad{partial.data() + (s0 / kSamplesPerPiece) * params};
    for (int64_t s = s0; s < s1; ++s) {
      sample::SampleBackward<T, PlainAdd<T>>(data, p, s, sample::Column<T>{hidden.data(), 1},
                                             sample::Column<T>{work.data(), 1}, grad)
          .run();
    }
  });
  T* gp = grad_params.template mutable_data_ptr<T>();
  std::copy(partial.begin(), partial.begin() + params, gp);
  for (int64_t piece = 1; piece < pieces; ++piece)
    for (int64_t i = 0; i < params; ++i) gp[i] += partial[piece * params + i];
  return {grad_y0, grad_params};
}

}  // namespace

bool mlp_per_sample_selected() {
  static const bool selected = [] {
    const char* kernel = std::getenv("FLASHODE_MLP_KERNEL");
    return kernel != nullptr && std::strcmp(kernel, "per_sample") == 0;
  }();
  return selected;
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> mlp_solve_per_sample_cpu(
    const MlpSolveCall& call) {
  return call.y0.scalar_type() == ScalarType::Double ? solve<double>(call) : solve<float>(call);
}

std::tuple<Tensor, Tensor> mlp_solve_backward_per_sample_cpu(const MlpBackwardCall& call) {
  return call.grad_ys.scalar_type() == ScalarType::Double ? backward<double>(call) : backward<float>(call);
}

}  // namespace flashode
