// The fused MLP solve one sample at a time on the host (mlp_solve_per_sample.cpp): the per-sample
// code the CUDA kernels run (common/mlp_sample_solve.h), so it is tested on machines without a GPU.
// Selected instead of the lane kernel by FLASHODE_MLP_KERNEL=per_sample.
#pragma once

#include <tuple>

#include "common/mlp_solve_args.h"

namespace flashode {

// Whether FLASHODE_MLP_KERNEL=per_sample (read once per process; anything else: the lane kernel).
bool mlp_per_sample_selected();

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> mlp_solve_per_sample_cpu(
    const MlpSolveCall& call);

std::tuple<Tensor, Tensor> mlp_solve_backward_per_sample_cpu(const MlpBackwardCall& call);

}  // namespace flashode
