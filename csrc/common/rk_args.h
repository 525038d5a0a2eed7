// Argument checking and coefficient packing shared by the CPU and CUDA kernels, so that both
// devices accept and reject exactly the same inputs.
#pragma once

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

// Helpers used by the CUDA kernels too.
#if defined(__CUDACC__)
#define FLASHODE_HOST_DEVICE __host__ __device__
#else
#define FLASHODE_HOST_DEVICE
#endif

namespace flashode {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

// Makes a tensor contiguous once; already-contiguous inputs skip the dispatcher round trip.
inline Tensor as_contiguous(const Tensor& t) {
  return t.is_contiguous() ? t : torch::stable::contiguous(t);
}

// A new contiguous tensor on `like`'s device. The shim's empty_strided is a direct C call, several
// times cheaper per op than torch::stable::empty_like/new_empty, which look the aten op up by name
// and box its arguments on every call: at small states that is most of an op's cost.
inline Tensor new_contiguous(const Tensor& like, const std::vector<int64_t>& sizes, int32_t dtype) {
  std::vector<int64_t> strides(sizes.size());
  int64_t stride = 1;
  for (size_t d = sizes.size(); d-- > 0;) {
    strides[d] = stride;
    stride *= std::max<int64_t>(sizes[d], 1);
  }
  int32_t device_type = 0, device_index = 0;
  STABLE_TORCH_ERROR_CODE_CHECK(aoti_torch_get_device_type(like.get(), &device_type));
  STABLE_TORCH_ERROR_CODE_CHECK(aoti_torch_get_device_index(like.get(), &device_index));
  AtenTensorHandle handle = nullptr;
  STABLE_TORCH_ERROR_CODE_CHECK(aoti_torch_empty_strided(static_cast<int64_t>(sizes.size()), sizes.data(),
                                                         strides.data(), dtype, device_type, device_index,
                                                         &handle));
  return Tensor(handle);
}

inline int32_t dtype_code(const Tensor& t) {
  int32_t code = 0;
  STABLE_TORCH_ERROR_CODE_CHECK(aoti_torch_get_dtype(t.get(), &code));
  return code;
}

inline std::vector<int64_t> shape_of(const Tensor& t) {
  const auto sizes = t.sizes();
  return std::vector<int64_t>(sizes.begin(), sizes.end());
}

// A contiguous tensor with t's shape, dtype and device.
inline Tensor new_like(const Tensor& t) { return new_contiguous(t, shape_of(t), dtype_code(t)); }

// Upper bounds that let the CUDA kernels receive coefficients by value (kernel parameters).
constexpr int kMaxStages = 32;
constexpr int kMaxDenseDegree = 8;
constexpr int kMaxSegments = 256;

// A stage combination y + sum_t weight[t] * k[index[t]] with zero coefficients dropped and h folded
// into the weights once on the host.
struct StageTerms {
  int count = 0;
  int index[kMaxStages];
  double weight[kMaxStages];
};

inline const char* dtype_name(ScalarType t) {
  switch (t) {
    case ScalarType::Float: return "float32";
    case ScalarType::Double: return "float64";
    case ScalarType::Half: return "float16";
    case ScalarType::BFloat16: return "bfloat16";
    default: return "a non-floating dtype";
  }
}

inline void check_state(const Tensor& y, const char* op) {
  const ScalarType t = y.scalar_type();
  STD_TORCH_CHECK(t == ScalarType::Float || t == ScalarType::Double, "flashode.", op,
                  ": states must be float32 or float64, got ", dtype_name(t),
                  " (float16/bfloat16 states lose too much precision in an ODE solve; "
                  "cast y0 to float32)");
}

// k must hold S >= needed rows of y.numel() elements, same dtype and device as y.
inline int64_t check_stages(const Tensor& y, const Tensor& k, int64_t needed, const char* op) {
  STD_TORCH_CHECK(k.dim() >= 1, "flashode.", op, ": k must have a leading stage dimension");
  const int64_t stages = k.size(0);
  STD_TORCH_CHECK(k.numel() == stages * y.numel(), "flashode.", op,
                  ": k must have shape (S, *y.shape); got ", k.numel(), " elements for S=", stages,
                  " and y with ", y.numel(), " elements");
  STD_TORCH_CHECK(k.scalar_type() == y.scalar_type(), "flashode.", op,
                  ": k and y must have the same dtype");
  STD_TORCH_CHECK(k.get_device_index() == y.get_device_index() && k.is_cuda() == y.is_cuda(),
                  "flashode.", op, ": k and y must be on the same device");
  STD_TORCH_CHECK(stages >= needed, "flashode.", op, ": ", needed,
                  " coefficients need at least as many stages, k has ", stages);
  STD_TORCH_CHECK(stages <= kMaxStages, "flashode.", op, ": at most ", kMaxStages,
                  " stages are supported, got ", stages);
  return stages;
}

inline StageTerms pack_terms(const std::vector<double>& coeffs, double h) {
  STD_TORCH_CHECK(static_cast<int64_t>(coeffs.size()) <= kMaxStages,
                  "flashode: at most ", kMaxStages, " stage coefficients are supported");
  StageTerms terms;
  for (size_t j = 0; j < coeffs.size(); ++j) {
    const double weight = coeffs[j] * h;
    if (weight != 0.0) {  // a zero weight skips the row entirely (0 * inf must not poison y)
      terms.index[terms.count] = static_cast<int>(j);
      terms.weight[terms.count] = weight;
      ++terms.count;
    }
  }
  return terms;
}

// Segments of the flat state for the mixed error norm: cumulative ends, the last at most n. The
// elements after the last end (the tail) are finalised but belong to no segment: the seminorm of
// the adjoint solve leaves the parameter-gradient channels out of the error this way.
struct Segments {
  int count = 0;
  int64_t end[kMaxSegments];

  FLASHODE_HOST_DEVICE int64_t begin_of(int s) const { return s == 0 ? 0 : end[s - 1]; }
  FLASHODE_HOST_DEVICE int64_t tail_begin() const { return end[count - 1]; }  // count >= 1 always
};

inline Segments check_segments(const std::vector<int64_t>& ends, int64_t n) {
  Segments seg;
  if (ends.empty()) {
    seg.count = 1;
    seg.end[0] = n;
    return seg;
  }
  STD_TORCH_CHECK(static_cast<int64_t>(ends.size()) <= kMaxSegments, "flashode.rk_finalize: at most ",
                  kMaxSegments, " norm segments are supported, got ", ends.size());
  int64_t prev = 0;
  for (size_t s = 0; s < ends.size(); ++s) {
    STD_TORCH_CHECK(ends[s] >= prev,
                    "flashode.rk_finalize: segment_ends must be non-negative and non-decreasing");
    prev = ends[s];
    seg.end[s] = ends[s];
  }
  STD_TORCH_CHECK(prev <= n, "flashode.rk_finalize: the last segment end (", prev,
                  ") must not exceed the state size (", n, ")");
  seg.count = static_cast<int>(ends.size());
  return seg;
}

// Tolerances are a scalar (numel 1) or one value per state element, in the state's dtype.
inline void check_tolerance(const Tensor& tol, const Tensor& y, const char* name) {
  STD_TORCH_CHECK(tol.numel() == 1 || tol.numel() == y.numel(), "flashode.rk_finalize: ", name,
                  " must have 1 or ", y.numel(), " elements, got ", tol.numel());
  STD_TORCH_CHECK(tol.scalar_type() == y.scalar_type(), "flashode.rk_finalize: ", name,
                  " must have the state's dtype");
  STD_TORCH_CHECK(tol.get_device_index() == y.get_device_index() && tol.is_cuda() == y.is_cuda(),
                  "flashode.rk_finalize: ", name, " must be on the state's device");
}

// Dense output: one packed stage combination per output time, with weights h * B_j(theta_m)
// evaluated once on the host.
inline std::vector<StageTerms> dense_terms(const std::vector<double>& poly,
                                           const std::vector<double>& theta, int64_t stages,
                                           double h) {
  STD_TORCH_CHECK(stages > 0 && poly.size() % stages == 0,
                  "flashode.rk_dense: poly must hold S * D coefficients for S = ", stages,
                  " stages, got ", poly.size());
  const size_t degree = poly.size() / stages;
  STD_TORCH_CHECK(degree <= static_cast<size_t>(kMaxDenseDegree), "flashode.rk_dense: degree ",
                  degree, " exceeds the supported ", kMaxDenseDegree);
  std::vector<StageTerms> terms(theta.size());
  std::vector<double> row(stages);
  for (size_t m = 0; m < theta.size(); ++m) {
    STD_TORCH_CHECK(std::isfinite(theta[m]), "flashode.rk_dense: theta must be finite");
    for (int64_t j = 0; j < stages; ++j) {
      double power = theta[m], acc = 0.0;
      for (size_t p = 0; p < degree; ++p) {
        acc += poly[j * degree + p] * power;
        power *= theta[m];
      }
      row[j] = acc;
    }
    terms[m] = pack_terms(row, h);
  }
  return terms;
}

// ------------------------------------------------------------------------------------------------
// Each op's arguments checked, made contiguous once, and its outputs allocated: the CPU and CUDA
// entry points share these and differ only in how they launch the pass.

struct StageCall {
  Tensor y, k, out;
  StageTerms terms;
};

inline StageCall prepare_stage(const Tensor& y, const Tensor& k, const std::vector<double>& a, double h) {
  check_state(y, "rk_stage");
  check_stages(y, k, static_cast<int64_t>(a.size()), "rk_stage");
  StageCall call{as_contiguous(y), as_contiguous(k), Tensor(), pack_terms(a, h)};
  call.out = new_like(call.y);
  return call;
}

struct FinalizeCall {
  Tensor y, k, rtol, atol, y1, err, ratio;
  StageTerms sol, errw;
  Segments seg;
  bool return_error;
  bool per_segment;  // ratio holds one RMS per segment (shape (seg.count,)) instead of their max
};

inline FinalizeCall prepare_finalize(const Tensor& y, const Tensor& k, const std::vector<double>& b,
                                     const std::vector<double>& b_error, double h, const Tensor& rtol,
                                     const Tensor& atol, const std::vector<int64_t>& segment_ends,
                                     bool return_error, bool per_segment) {
  check_state(y, "rk_finalize");
  check_stages(y, k, static_cast<int64_t>(std::max(b.size(), b_error.size())), "rk_finalize");
  check_tolerance(rtol, y, "rtol");
  check_tolerance(atol, y, "atol");
  FinalizeCall call{as_contiguous(y), as_contiguous(k), as_contiguous(rtol), as_contiguous(atol),
                    Tensor(), Tensor(), Tensor(), pack_terms(b, h), pack_terms(b_error, h),
                    check_segments(segment_ends, y.numel()), return_error, per_segment};
  call.y1 = new_like(call.y);
  call.err = return_error ? new_like(call.y) : new_contiguous(call.y, {0}, dtype_code(call.y));
  const std::vector<int64_t> ratio_shape =
      per_segment ? std::vector<int64_t>{call.seg.count} : std::vector<int64_t>{};
  call.ratio = new_contiguous(call.y, ratio_shape, aoti_torch_dtype_float64());
  return call;
}

struct DenseCall {
  Tensor y, k, out;
  std::vector<StageTerms> terms;  // one per output time
};

inline DenseCall prepare_dense(const Tensor& y, const Tensor& k, const std::vector<double>& poly,
                               const std::vector<double>& theta, double h) {
  check_state(y, "rk_dense");
  const int64_t stages = check_stages(y, k, 1, "rk_dense");
  DenseCall call{as_contiguous(y), as_contiguous(k), Tensor(), dense_terms(poly, theta, stages, h)};
  std::vector<int64_t> shape{static_cast<int64_t>(theta.size())};
  for (int64_t d : call.y.sizes()) shape.push_back(d);
  call.out = new_contiguous(call.y, shape, dtype_code(call.y));
  return call;
}

}  // namespace flashode
