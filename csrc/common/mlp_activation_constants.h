// The constants of the fused MLP solve's activations, in one place for the CPU lane kernel's vector
// math (cpu/mlp_solve_kernels.cpp: SimdMath) and the per-sample scalar math the CUDA kernels and the
// host per-sample path run (common/mlp_sample_solve.h: ScalarMath). Both must evaluate the very
// same polynomials on the very same constants to take the same decisions, so neither keeps a copy.
// constexpr scalars only: usable in nvcc device code as they are.
#pragma once

#include <cstdint>

#include "common/rk_args.h"  // FLASHODE_HOST_DEVICE

namespace flashode {

// exp(x) for x <= 0 by Cody & Waite's reduction x = n ln2 + r (ln2 split in a high part with
// trailing zeros, so n * kLn2Hi is exact, and a low part) and the Taylor polynomial of expm1(r).
template <typename T>
struct ExpConstants;

template <>
struct ExpConstants<float> {
  using Bits = uint32_t;
  static constexpr float kLog2e = 1.44269504088896341f;
  static constexpr float kLn2Hi = 0.693145751953125f;
  static constexpr float kLn2Lo = 1.428606820309417e-06f;
  static constexpr float kShifter = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  static constexpr float kLowest = -87.0f;        // exp(kLowest) is still a normal number
  static constexpr int kMantissa = 23;
  static constexpr Bits kBias = 127;
  static constexpr int kExpTerms = 7;    // expm1(r) = sum_1^7 r^i / i! on |r| <= ln2 / 2: 2^-26 relative
  static constexpr int kAtanhTerms = 8;  // log1p series in s^2 <= 1/9: 1e-8 relative
};

template <>
struct ExpConstants<double> {
  using Bits = uint64_t;
  static constexpr double kLog2e = 1.4426950408889634;
  static constexpr double kLn2Hi = 6.93147180369123816490e-01;
  static constexpr double kLn2Lo = 1.90821492927058770002e-10;
  static constexpr double kShifter = 6755399441055744.0;  // 1.5 * 2^52
  static constexpr double kLowest = -700.0;
  static constexpr int kMantissa = 52;
  static constexpr Bits kBias = 1023;
  static constexpr int kExpTerms = 13;    // 1e-17 relative
  static constexpr int kAtanhTerms = 17;  // 2e-17 relative
};

// 1 / n!, correctly rounded (n! is exact in float64 for n <= 18); folded once the loops unroll.
FLASHODE_HOST_DEVICE constexpr double inv_factorial(int n) {
  double f = 1.0;
  for (int i = 2; i <= n; ++i) f *= i;
  return 1.0 / f;
}

// float32 tanh(z) = x P(x^2) / Q(x^2), x = z clamped to [-kClamp, kClamp] (beyond, tanh(z) rounds to
// +-1), P and Q of degree 4 with P(0) = Q(0) = 1: a rational fitted for the least maximum relative
// error on [0, 9]. Evaluated by Horner's rule from the highest coefficient: P = (((kP4 s + kP3) s +
// kP2) s + kP1) s + 1, likewise Q.
struct TanhRational {
  static constexpr float kClamp = 9.0f;
  static constexpr float kP4 = 1.341989453e-08f, kP3 = 2.066132220e-05f, kP2 = 3.498999868e-03f,
                         kP1 = 1.338398308e-01f;
  static constexpr float kQ4 = 7.804761140e-07f, kQ3 = 3.291044268e-04f, kQ2 = 2.589021996e-02f,
                         kQ1 = 4.671730399e-01f;
};

}  // namespace flashode
