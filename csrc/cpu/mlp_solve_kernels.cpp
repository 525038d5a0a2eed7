// CPU kernels of the fused MLP solve (schemas in ../ops.cpp, checks in ../common/mlp_solve_args.h).
//
// When the vector field is a small MLP, a whole batch solve runs here, forward and backward: no
// Python and no per-op dispatch inside the step loop.
//
// Tiles. Samples run in tiles of kLanes (one sample per lane; 64 bytes of lanes: 16 float32 or 8
// float64). Every row of a tile's network activations holds one value per lane ("structure of
// arrays"), so one evaluation of the network for the whole tile is a chain of small matrix
// products (layer width x lanes) with the weights in cache, and the activations and every other
// elementwise pass run across the lanes in vector registers.
//
// Lanes are independent. Each has its own sample, time, step size and phase (the start's
// evaluations, or stage i of a step); one tile evaluation computes every lane at its own input.
// When a lane's sample stops, the lane takes the next unstarted sample from a queue shared by the
// threads, so lanes stay busy until the queue is empty. A sample's arithmetic never depends on its
// lane, tile or thread, and the per-sample control is batch_args.h's (that of solve_ivp), so
// results are the same for any thread count, and the steps are solve_ivp's.
//
// Backward. The forward pass records every accepted step (t, h, the state and the carried first
// stage): a checkpoint per step, one float64 triple and 2 D values. The backward pass walks each
// sample's steps in reverse, a tile of samples at a time (one step of each lane per round),
// re-evaluates the step's stages keeping the network's activations, and takes the vector-Jacobian
// products of the outputs' dense output, the step's stage sums and the network. Parameter
// gradients are summed per fixed piece of samples and the pieces added in order, so they too do
// not depend on the thread count.
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "common/mlp_activation_constants.h"
#include "common/mlp_solve_args.h"
#include "cpu/cpu_common.h"
#include "cpu/mlp_solve_per_sample.h"

namespace flashode {
namespace {

// Lanes of a tile: one 64-byte row (an AVX-512 register, two AVX2 ones).
template <typename T>
constexpr int kLanes = static_cast<int>(64 / sizeof(T));

// At most this many fixed pieces of samples in the backward pass (each holds a parameter-gradient
// buffer), and at least this many tiles' worth of samples in one.
constexpr int64_t kMaxPieces = 64;
constexpr int64_t kMinPieceTiles = 8;

// ------------------------------------------------------------------------------------------------
// The compute-bound passes (matrix products, activations) on explicit vectors: GCC vector
// extensions of the widest width the CPU has (64 bytes with AVX-512, 32 with AVX2, 16 otherwise).
// A width that does not match the target is lowered badly (measured: 4x slower), and GCC does not
// auto-vectorise the activations' selects, so unlike the other CPU kernels these are not
// FLASHODE_CPU_CLONES of plain loops: the same templates are instantiated once per instruction-set
// level with that level's width, and the level is picked once per process by GCC's function
// multiversioning (the CPU detection FLASHODE_CPU_CLONES uses). Every lane computes the same
// sequence of operations. The AVX2 and AVX-512 levels contract a * b + c into fused multiply-adds
// (their functions alone are built with fp-contract=fast: the same expressions, so the same
// contractions, and those levels give the same bits; the matrix products take about half the
// instructions); the base level (SSE2 has no FMA) rounds the product and the sum apart, so it
// differs from them by rounding only. The step control outside these passes never contracts.

// The vector helpers below are always inlined into their level's target functions, so no vector
// ever crosses a call boundary: GCC's note that such a call's ABI depends on the target is moot.
#pragma GCC diagnostic ignored "-Wpsabi"

template <typename T, int Bytes>
struct Simd {
  typedef T V __attribute__((vector_size(Bytes)));
  typedef T Unaligned __attribute__((vector_size(Bytes), aligned(sizeof(T)), may_alias));
  typedef typename std::conditional<sizeof(T) == 4, uint32_t, uint64_t>::type Bits;
  typedef Bits UBits __attribute__((vector_size(Bytes)));
  static constexpr int kWidth = Bytes / static_cast<int>(sizeof(T));

  [[gnu::always_inline]] static V load(const T* p) { return *reinterpret_cast<const Unaligned*>(p); }
  [[gnu::always_inline]] static void store(T* p, V v) { *reinterpret_cast<Unaligned*>(p) = v; }
  [[gnu::always_inline]] static V splat(T c) { return V{} + c; }
};

// Activations from +, *, / and bit operations: exp by Cody & Waite's reduction and a Taylor
// polynomial. Only arguments <= 0 are needed: every activation is written with exp(-|z|).

// 1 / i! for the exp polynomial's Horner steps, as a table: a constant load per step.
template <size_t... I>
constexpr std::array<double, sizeof...(I)> inv_factorials(std::index_sequence<I...>) {
  return {inv_factorial(static_cast<int>(I))...};
}
constexpr auto kInvFactorial = inv_factorials(std::make_index_sequence<ExpConstants<double>::kExpTerms + 1>{});

template <typename T, int Bytes>
struct SimdMath : Simd<T, Bytes> {
  using S = Simd<T, Bytes>;
  using V = typename S::V;
  using UBits = typename S::UBits;
  using E = ExpConstants<T>;

  // exp(x) = scale * (1 + p) for x <= 0 (clamped at kLowest; a NaN passes through into p).
  [[gnu::always_inline]] static void exp_parts(V x, V& scale, V& p) {
    x = x < E::kLowest ? S::splat(E::kLowest) : x;
    const V shifted = x * E::kLog2e + E::kShifter;  // n = round(x / ln 2) in the low mantissa bits
    const V n = shifted - E::kShifter;
    const V r = (x - n * E::kLn2Hi) - n * E::kLn2Lo;
    V q = S::splat(static_cast<T>(kInvFactorial[E::kExpTerms]));
    for (int i = E::kExpTerms - 1; i >= 1; --i) q = q * r + static_cast<T>(kInvFactorial[i]);
    p = q * r;
    const UBits bits = ((UBits)shifted - (UBits)S::splat(E::kShifter) + E::kBias) << E::kMantissa;  // 2^n
    scale = (V)bits;
  }
  [[gnu::always_inline]] static V exp_nonpositive(V x) {
    V scale, p;
    exp_parts(x, scale, p);
    return scale + scale * p;
  }
  // expm1(x) = 2^n p + (2^n - 1): accurate near 0, where exp(x) - 1 would cancel.
  [[gnu::always_inline]] static V expm1_nonpositive(V x) {
    V scale, p;
    exp_parts(x, scale, p);
    return scale * p + (scale - 1);
  }
  // log(1 + u) for 0 <= u <= 1: 2 atanh(s), s = u / (2 + u) <= 1/3, as its series.
  [[gnu::always_inline]] static V log1p_unit(V u) {
    const V s = u / (2 + u), s2 = s * s;
    constexpr int K = E::kAtanhTerms;
    V q = S::splat(static_cast<T>(1.0 / (2 * K - 1)));
    for (int k = K - 2; k >= 0; --k) q = q * s2 + static_cast<T>(1.0 / (2 * k + 1));
    return 2 * s * q;
  }
  [[gnu::always_inline]] static V abs(V z) { return z < 0 ? -z : z; }  // a NaN stays NaN
  // sigmoid(z) from e = exp(-|z|) (never overflows); also returns e.
  [[gnu::always_inline]] static V sigmoid(V z, V& e) {
    e = exp_nonpositive(-abs(z));
    const V r = 1 / (1 + e);
    return z < 0 ? e * r : r;
  }

  // float32 tanh(z) = x P(x^2) / Q(x^2) (TanhRational; P(0) = Q(0) = 1, so tanh(z) = z to rounding
  // near 0): 2e-8 (0.4 ulp) from tanh in exact arithmetic; evaluated in float32 at most 4.5 ulp from
  // tanh (near +-1, where P and Q are large), about 1 ulp typically. Half the operations of expm1 and
  // a division, and tanh is most of a tile's elementwise work. A NaN passes.
  [[gnu::always_inline]] static V tanh_rational(V z) {
    using R = TanhRational;
    const V x = z > R::kClamp ? S::splat(R::kClamp) : z < -R::kClamp ? S::splat(-R::kClamp) : z;
    const V s = x * x;
    const V p = (((R::kP4 * s + R::kP3) * s + R::kP2) * s + R::kP1) * s + 1;
    const V q = (((R::kQ4 * s + R::kQ3) * s + R::kQ2) * s + R::kQ1) * s + 1;
    return x * p / q;
  }

  // Each activation as value a = act(z) and derivative g = act'(z), in the form of torch's backward.
  template <int Activation>
  [[gnu::always_inline]] static void eval(V z, V& a, V& g) {
    const V zero = V{}, one = S::splat(1);
    V e;
    if (Activation == kTanh) {
      if constexpr (std::is_same<T, float>::value) {
        a = tanh_rational(z);
      } else {
        const V m = expm1_nonpositive(-2 * abs(z));  // tanh|z| = -m / (m + 2)
        const V t = -m / (m + 2);
        a = z < 0 ? -t : t;
      }
      g = 1 - a * a;
    } else if (Activation == kSoftplus) {  // beta 1, threshold 20 (torch's defaults): z above it
      const V s = sigmoid(z, e);
      a = z > 20 ? z : (z < 0 ? zero : z) + log1p_unit(e);
      g = z > 20 ? one : s;
    } else if (Activation == kRelu) {
      a = z < 0 ? zero : z;
      g = z > 0 ? one : zero;
    } else if (Activation == kSilu) {
      const V s = sigmoid(z, e);
      a = z * s;
      g = s * (1 + z * (1 - s));
    } else if (Activation == kElu) {  // alpha 1
      const V m = expm1_nonpositive(z < 0 ? z : zero);
      a = z > 0 ? z : m;
      g = z > 0 ? one : m + 1;
    } else {
      a = sigmoid(z, e);
      g = a * (1 - a);
    }
  }

  // z <- act(z) over n values (a multiple of the width), and deriv <- act'(z) when given. Unrolled:
  // each vector is one long dependent chain (polynomial, division), so several are interleaved.
  template <int Activation>
  [[gnu::always_inline]] static void activate_all(T* __restrict z, T* __restrict deriv, int64_t n) {
    if (deriv == nullptr) {
#pragma GCC unroll 4
      for (int64_t i = 0; i < n; i += S::kWidth) {
        V a, g;
        eval<Activation>(S::load(z + i), a, g);
        S::store(z + i, a);
      }
      return;
    }
#pragma GCC unroll 4
    for (int64_t i = 0; i < n; i += S::kWidth) {
      V a, g;
      eval<Activation>(S::load(z + i), a, g);
      S::store(z + i, a);
      S::store(deriv + i, g);
    }
  }

  [[gnu::always_inline]] static void activate(int activation, T* z, T* deriv, int64_t n) {
    switch (activation) {
      case kTanh: return activate_all<kTanh>(z, deriv, n);
      case kSoftplus: return activate_all<kSoftplus>(z, deriv, n);
      case kRelu: return activate_all<kRelu>(z, deriv, n);
      case kSilu: return activate_all<kSilu>(z, deriv, n);
      case kElu: return activate_all<kElu>(z, deriv, n);
      default: return activate_all<kSigmoid>(z, deriv, n);
    }
  }
};

// ------------------------------------------------------------------------------------------------
// Small matrix products C (rows x cols) = start + A (rows x depth) B (depth x cols), row-major with
// leading dimensions. Every element sums its depth terms in order onto its start value, however
// the product is blocked, so a lane's results never depend on the other lanes.

enum class Start { kZero, kBias, kAccumulate };  // C starts at 0, at bias[row], or at C itself

template <typename T>
struct GemmArgs {
  int64_t rows, cols, depth;
  const T* a;
  int64_t lda;
  const T* b;
  int64_t ldb;
  T* c;
  int64_t ldc;
  const T* bias;
};

template <typename T, int Bytes>
struct SimdGemm : Simd<T, Bytes> {
  using S = Simd<T, Bytes>;
  using V = typename S::V;
  static constexpr int kPer = kLanes<T> / S::kWidth;  // vectors per row of lanes
  // Rows per block: 2 kRows kPer accumulators of the registers' 16 (SSE2, AVX2) or 32 (AVX-512);
  // 16 rows with AVX-512 measured no faster.
  static constexpr int kRows = Bytes == 16 ? 2 : Bytes == 32 ? 4 : 8;

  // R rows by one row of lanes: the accumulators stay in registers while the depth is walked, one
  // broadcast weight per row and step. The depth is summed in C interleaved partial sums (k mod C),
  // added up in order at the end: a product of few rows (the output layer: D rows) is otherwise one
  // long dependent chain of additions. C depends on the product's row count only, never on the
  // level's blocking, so every level sums in the same order.
  template <int R, int C, Start start>
  [[gnu::always_inline]] static void block(const T* __restrict a, int64_t lda, const T* __restrict b, int64_t ldb,
                                           int64_t depth, T* __restrict c, int64_t ldc, const T* __restrict bias) {
    V acc[C][R][kPer];
    for (int q = 0; q < C; ++q)
      for (int r = 0; r < R; ++r)
        for (int p = 0; p < kPer; ++p) {
          acc[q][r][p] = V{};
          if (q == 0 && start == Start::kBias) acc[q][r][p] = S::splat(bias[r]);
          if (q == 0 && start == Start::kAccumulate) acc[q][r][p] = S::load(c + r * ldc + p * S::kWidth);
        }
    int64_t k = 0;
    for (; k + C <= depth; k += C)
      for (int q = 0; q < C; ++q) step(a, lda, b, ldb, k + q, acc[q]);
    for (; k < depth; ++k) step(a, lda, b, ldb, k, acc[0]);
    for (int q = 1; q < C; ++q)
      for (int r = 0; r < R; ++r)
        for (int p = 0; p < kPer; ++p) acc[0][r][p] += acc[q][r][p];
    for (int r = 0; r < R; ++r)
      for (int p = 0; p < kPer; ++p) S::store(c + r * ldc + p * S::kWidth, acc[0][r][p]);
  }

  template <int R>
  [[gnu::always_inline]] static void step(const T* __restrict a, int64_t lda, const T* __restrict b, int64_t ldb,
                                          int64_t k, V (&acc)[R][kPer]) {
    V row[kPer];
    for (int p = 0; p < kPer; ++p) row[p] = S::load(b + k * ldb + p * S::kWidth);
    for (int r = 0; r < R; ++r) {
      const T w = a[r * lda + k];
      for (int p = 0; p < kPer; ++p) acc[r][p] += w * row[p];
    }
  }

  template <Start start>
  [[gnu::always_inline]] static void run(const GemmArgs<T>& g) {
    if (g.rows >= 4) return run_chains<1, start>(g);
    if (g.rows >= 2) return run_chains<2, start>(g);
    run_chains<4, start>(g);
  }

  template <int C, Start start>
  [[gnu::always_inline]] static void run_chains(const GemmArgs<T>& g) {
    constexpr int N = kLanes<T>;
    int64_t n0 = 0;
    for (; n0 + N <= g.cols; n0 += N) {
      int64_t r0 = 0;
      for (; r0 + kRows <= g.rows; r0 += kRows) block<kRows, C, start>(g, r0, n0);
      if (kRows > 4 && r0 + 4 <= g.rows) {
        block<4, C, start>(g, r0, n0);
        r0 += 4;
      }
      if (kRows > 2 && r0 + 2 <= g.rows) {
        block<2, C, start>(g, r0, n0);
        r0 += 2;
      }
      for (; r0 < g.rows; ++r0) block<1, C, start>(g, r0, n0);
    }
    // Columns past the last whole row of lanes, element by element, in the same order.
    for (int64_t r = 0; r < g.rows; ++r)
      for (int64_t n = n0; n < g.cols; ++n) {
        T part[C] = {};
        part[0] = start == Start::kZero ? T(0) : start == Start::kBias ? g.bias[r] : g.c[r * g.ldc + n];
        int64_t k = 0;
        for (; k + C <= g.depth; k += C)
          for (int q = 0; q < C; ++q) part[q] += g.a[r * g.lda + k + q] * g.b[(k + q) * g.ldb + n];
        for (; k < g.depth; ++k) part[0] += g.a[r * g.lda + k] * g.b[k * g.ldb + n];
        for (int q = 1; q < C; ++q) part[0] += part[q];
        g.c[r * g.ldc + n] = part[0];
      }
  }

  template <int R, int C, Start start>
  [[gnu::always_inline]] static void block(const GemmArgs<T>& g, int64_t r0, int64_t n0) {
    block<R, C, start>(g.a + r0 * g.lda, g.lda, g.b + n0, g.ldb, g.depth, g.c + r0 * g.ldc + n0, g.ldc,
                       g.bias == nullptr ? nullptr : g.bias + r0);
  }
};

// Rows of lanes transposed: out (lanes x rows) from in (rows x lanes), in W x W blocks transposed in
// registers (log2 W rounds of two-vector shuffles); rows past the last whole block one by one.
template <typename T, int Bytes>
struct SimdTranspose : Simd<T, Bytes> {
  using S = Simd<T, Bytes>;
  using V = typename S::V;
  static constexpr int W = S::kWidth;
  static constexpr int kPer = kLanes<T> / W;
  typedef typename std::conditional<sizeof(T) == 4, int32_t, int64_t>::type Index;
  typedef Index IV __attribute__((vector_size(Bytes)));

  // Round H swaps the off-diagonal H x H blocks of every 2H x 2H block: v[i] takes the first H of
  // each 2H elements from v[i] and the next H from v[i + H]'s first ones; v[i + H] the rest.
  template <int H, size_t... J>
  static constexpr IV low_mask(std::index_sequence<J...>) {
    return IV{static_cast<Index>((J & H) == 0 ? J : W + J - H)...};
  }
  template <int H, size_t... J>
  static constexpr IV high_mask(std::index_sequence<J...>) {
    return IV{static_cast<Index>((J & H) == 0 ? J + H : W + J)...};
  }
  template <int H>
  [[gnu::always_inline]] static void round(V (&v)[W]) {
    constexpr IV lo = low_mask<H>(std::make_index_sequence<W>{});
    constexpr IV hi = high_mask<H>(std::make_index_sequence<W>{});
    for (int i = 0; i < W; ++i) {
      if (i & H) continue;
      const V a = v[i], b = v[i + H];
      v[i] = __builtin_shuffle(a, b, lo);
      v[i + H] = __builtin_shuffle(a, b, hi);
    }
    if constexpr (H > 1) round<H / 2>(v);
  }

  [[gnu::always_inline]] static void run(const T* __restrict in, int64_t rows, T* __restrict out) {
    int64_t r0 = 0;
    for (; r0 + W <= rows; r0 += W)
      for (int p = 0; p < kPer; ++p) {
        V v[W];
        for (int i = 0; i < W; ++i) v[i] = S::load(in + (r0 + i) * kLanes<T> + p * W);
        round<W / 2>(v);
        for (int i = 0; i < W; ++i) S::store(out + (p * W + i) * rows + r0, v[i]);
      }
    for (; r0 < rows; ++r0)
      for (int n = 0; n < kLanes<T>; ++n) out[n * rows + r0] = in[r0 * kLanes<T> + n];
  }
};

// ------------------------------------------------------------------------------------------------
// The forward's per-evaluation step arithmetic across a tile's lanes (rows of lanes, like the
// network's activations): each lane's stage input, the stages stored, the step's end. Every lane
// takes exactly the operations, in the order, of the per-sample code (common/mlp_sample_solve.h):
// the terms of a coefficient row summed onto +0 in increasing stage order, a lane's terms past its
// row or zero in the method skipped by a select (never multiplied by 0, which would turn a stale
// non-finite stage into NaN). These passes are never contracted (their level functions are built
// without fp-contract=fast): the steps must stay solve_ivp's.

// A per-lane index (a coefficient row, a stage) in the integer type of T's width, so that comparing
// a vector of them gives a select mask for T's vectors.
template <typename T>
using LaneIndex = typename std::conditional<sizeof(T) == 4, uint32_t, uint64_t>::type;

// x (its first D rows) = y + sum_j w[r][j] k_j, lane by lane, r = the lane's coefficient row.
// weights (rows x stages x lanes) holds each lane's (T)(a[r][j] h) of every row r it may take;
// uses[r * stages + j] whether row r has a term j. A row whose sum starts from -0 instead of +0
// (signed_zero[r]) gives exactly its first term (or y itself when it has none).
template <typename T>
struct StageInputArgs {
  const LaneIndex<T>* row;
  const T* weights;
  const uint8_t* uses;
  const uint8_t* signed_zero;
  int rows, stages;
  int64_t dim;
  const T *y, *k;
  T* x;
};

// The end of every lane's step (only those at their last stage use it): y1 = y + sum_t b_t h k_t,
// err = sum_t e_t h k_t (terms: the method's nonzero b and b_error, weights (T)(coef_t h) per lane)
// and the error ratio, the RMS over the state of err / (atol + rtol max(|y|, |y1|)) in float64 (NaN
// when y1 is not finite).
template <typename T>
struct StepEndArgs {
  const CoefficientRow *b, *e;
  const T *b_weights, *e_weights;  // term x lanes
  const T *atol, *rtol;            // D x lanes
  int64_t dim;
  const T *y, *k;
  T *y1, *scaled;  // D x lanes
  double *sumsq, *nonfinite, *ratio;  // lanes
  bool adaptive;
};

template <typename T, int Bytes>
struct SimdControl : Simd<T, Bytes> {
  using S = Simd<T, Bytes>;
  using V = typename S::V;
  using UBits = typename S::UBits;
  static constexpr int N = kLanes<T>;
  static constexpr int W = S::kWidth;
  typedef LaneIndex<T> UIndex __attribute__((vector_size(Bytes), aligned(sizeof(T)), may_alias));

  [[gnu::always_inline]] static UBits load_index(const LaneIndex<T>* p) {
    return *reinterpret_cast<const UIndex*>(p);
  }

  [[gnu::always_inline]] static void stage_inputs(const StageInputArgs<T>& g) {
    for (int o = 0; o < N; o += W) {
      const UBits row = load_index(g.row + o);
      V init = V{};
      for (int r = 0; r < g.rows; ++r)
        if (g.signed_zero[r]) init = row == static_cast<LaneIndex<T>>(r) ? S::splat(T(-0.0)) : init;
      for (int64_t d = 0; d < g.dim; ++d) S::store(g.x + d * N + o, init);
      for (int j = 0; j < g.stages; ++j) {
        V w = V{};
        auto take = row != row;  // false
        bool any = false;
        for (int r = 0; r < g.rows; ++r) {
          if (!g.uses[r * g.stages + j]) continue;
          const auto mine = row == static_cast<LaneIndex<T>>(r);
          w = mine ? S::load(g.weights + (r * g.stages + j) * N + o) : w;
          take = take | mine;
          any = true;
        }
        if (!any) continue;
        for (int64_t d = 0; d < g.dim; ++d) {
          const V acc = S::load(g.x + d * N + o);
          S::store(g.x + d * N + o, take ? acc + w * S::load(g.k + (j * g.dim + d) * N + o) : acc);
        }
      }
      for (int64_t d = 0; d < g.dim; ++d) {
        T* x = g.x + d * N + o;
        S::store(x, S::load(g.y + d * N + o) + S::load(x));
      }
    }
  }

  // k[stage[lane]] <- f for every lane (a lane whose stage is >= stages stores nothing).
  [[gnu::always_inline]] static void store_stage(const T* f, const LaneIndex<T>* stage, int64_t dim, int stages,
                                                 T* k) {
    for (int o = 0; o < N; o += W) {
      const UBits at = load_index(stage + o);
      for (int j = 0; j < stages; ++j) {
        const auto mine = at == static_cast<LaneIndex<T>>(j);
        for (int64_t d = 0; d < dim; ++d) {
          T* kj = k + (j * dim + d) * N + o;
          S::store(kj, mine ? S::load(f + d * N + o) : S::load(kj));
        }
      }
    }
  }

  // sum over the row's terms of weight_t k[index_t] (row d of the stages), onto +0.
  [[gnu::always_inline]] static V terms(const CoefficientRow& row, const T* weights, const T* k, int64_t dim,
                                        int64_t d, int o) {
    V acc = V{};
    for (int t = 0; t < row.count; ++t)
      acc += S::load(weights + t * N + o) * S::load(k + (row.index[t] * dim + d) * N + o);
    return acc;
  }

  [[gnu::always_inline]] static void step_ends(const StepEndArgs<T>& g) {
    for (int64_t d = 0; d < g.dim; ++d)
      for (int o = 0; o < N; o += W) {
        const V y = S::load(g.y + d * N + o);
        const V y1 = y + terms(*g.b, g.b_weights, g.k, g.dim, d, o);
        S::store(g.y1 + d * N + o, y1);
        if (!g.adaptive) continue;
        const V err = terms(*g.e, g.e_weights, g.k, g.dim, d, o);
        const V ay = SimdMath<T, Bytes>::abs(y), ay1 = SimdMath<T, Bytes>::abs(y1);
        const V scale = S::load(g.atol + d * N + o) + S::load(g.rtol + d * N + o) * (ay < ay1 ? ay1 : ay);
        S::store(g.scaled + d * N + o, err / scale);
      }
    if (!g.adaptive) return;
    // The float64 sums, lane by lane over the state in order (plain loops: vectorised as they are).
    for (int l = 0; l < N; ++l) g.sumsq[l] = g.nonfinite[l] = 0.0;
    for (int64_t d = 0; d < g.dim; ++d)
      for (int l = 0; l < N; ++l) {
        const double q = g.scaled[d * N + l];
        g.sumsq[l] += q * q;
        g.nonfinite[l] += static_cast<double>(g.y1[d * N + l] - g.y1[d * N + l]);
      }
    for (int l = 0; l < N; ++l)
      g.ratio[l] = g.nonfinite[l] != g.nonfinite[l] ? std::numeric_limits<double>::quiet_NaN()
                                                    : std::sqrt(g.sumsq[l] / static_cast<double>(g.dim));
  }
};

// The passes of one instruction-set level, compiled for its target.
template <typename T>
struct TilePasses {
  void (*gemm[3])(const GemmArgs<T>&);  // by Start
  void (*activate)(int, T*, T*, int64_t);
  void (*transpose)(const T*, int64_t, T*);
  void (*add)(T*, const T*, int64_t);       // a += b
  void (*multiply)(T*, const T*, int64_t);  // a *= b
  void (*stage_inputs)(const StageInputArgs<T>&);
  void (*store_stage)(const T*, const LaneIndex<T>*, int64_t, int, T*);
  void (*step_ends)(const StepEndArgs<T>&);
};

template <typename T, int Bytes>
[[gnu::always_inline]] inline void add_lanes(T* a, const T* b, int64_t n) {
  using S = Simd<T, Bytes>;
  for (int64_t i = 0; i < n; i += S::kWidth) S::store(a + i, S::load(a + i) + S::load(b + i));
}

template <typename T, int Bytes>
[[gnu::always_inline]] inline void multiply_lanes(T* a, const T* b, int64_t n) {
  using S = Simd<T, Bytes>;
  for (int64_t i = 0; i < n; i += S::kWidth) S::store(a + i, S::load(a + i) * S::load(b + i));
}

// TARGET: the network's passes (contracted on the FMA levels); EXACT: the step arithmetic's (never).
#define FLASHODE_MLP_LEVEL(NAME, TARGET, EXACT, BYTES)                                                        \
  template <typename T>                                                                                      \
  struct NAME {                                                                                              \
    TARGET static void gemm_zero(const GemmArgs<T>& g) { SimdGemm<T, BYTES>::template run<Start::kZero>(g); } \
    TARGET static void gemm_bias(const GemmArgs<T>& g) { SimdGemm<T, BYTES>::template run<Start::kBias>(g); } \
    TARGET static void gemm_accumulate(const GemmArgs<T>& g) {                                               \
      SimdGemm<T, BYTES>::template run<Start::kAccumulate>(g);                                               \
    }                                                                                                        \
    TARGET static void activate(int act, T* z, T* deriv, int64_t n) {                                        \
      SimdMath<T, BYTES>::activate(act, z, deriv, n);                                                        \
    }                                                                                                        \
    TARGET static void transpose(const T* in, int64_t rows, T* out) {                                        \
      SimdTranspose<T, BYTES>::run(in, rows, out);                                                           \
    }                                                                                                        \
    TARGET static void add(T* a, const T* b, int64_t n) { add_lanes<T, BYTES>(a, b, n); }                    \
    TARGET static void multiply(T* a, const T* b, int64_t n) { multiply_lanes<T, BYTES>(a, b, n); }          \
    EXACT static void stage_inputs(const StageInputArgs<T>& g) { SimdControl<T, BYTES>::stage_inputs(g); }     \
    EXACT static void store_stage(const T* f, const LaneIndex<T>* stage, int64_t dim, int stages, T* k) {    \
      SimdControl<T, BYTES>::store_stage(f, stage, dim, stages, k);                                          \
    }                                                                                                        \
    EXACT static void step_ends(const StepEndArgs<T>& g) { SimdControl<T, BYTES>::step_ends(g); }            \
    static TilePasses<T> passes() {                                                                          \
      return {{&gemm_zero, &gemm_bias, &gemm_accumulate}, &activate, &transpose, &add, &multiply,             \
              &stage_inputs, &store_stage, &step_ends};                                                      \
    }                                                                                                        \
  };

FLASHODE_MLP_LEVEL(BaseLevel, , , 16)

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
FLASHODE_MLP_LEVEL(Avx2Level, __attribute__((target("arch=x86-64-v3"), optimize("fp-contract=fast"))),
                   __attribute__((target("arch=x86-64-v3"))), 32)
FLASHODE_MLP_LEVEL(Avx512Level, __attribute__((target("arch=x86-64-v4"), optimize("fp-contract=fast"))),
                   __attribute__((target("arch=x86-64-v4"))), 64)

// The widest level the CPU runs (GCC picks the version, as for target_clones).
__attribute__((target("default"))) int cpu_simd_level() { return 0; }
__attribute__((target("arch=x86-64-v3"))) int cpu_simd_level() { return 1; }
__attribute__((target("arch=x86-64-v4"))) int cpu_simd_level() { return 2; }

// FLASHODE_MLP_SIMD=base|avx2 lowers the level (read once per process): tests compare the levels
// (AVX2 and AVX-512: the same bits; base: the same to rounding).
int simd_level() {
  const char* forced = std::getenv("FLASHODE_MLP_SIMD");
  const int cpu = cpu_simd_level();
  if (forced == nullptr) return cpu;
  const std::string name(forced);
  return std::min(cpu, name == "base" ? 0 : name == "avx2" ? 1 : 2);
}

template <typename T>
const TilePasses<T>& tile_passes() {
  static const int level = simd_level();
  static const TilePasses<T> passes = level == 2   ? Avx512Level<T>::passes()
                                      : level == 1 ? Avx2Level<T>::passes()
                                                   : BaseLevel<T>::passes();
  return passes;
}
#else
template <typename T>
const TilePasses<T>& tile_passes() {
  static const TilePasses<T> passes = BaseLevel<T>::passes();
  return passes;
}
#endif

template <typename T, Start start>
inline void gemm(int64_t rows, int64_t cols, int64_t depth, const T* a, int64_t lda, const T* b, int64_t ldb, T* c,
                 int64_t ldc, const T* bias) {
  tile_passes<T>().gemm[static_cast<int>(start)](GemmArgs<T>{rows, cols, depth, a, lda, b, ldb, c, ldc, bias});
}

template <typename T>
inline void activate(int activation, T* z, T* deriv, int64_t n) {
  tile_passes<T>().activate(activation, z, deriv, n);
}

// out (lanes x rows) = in (rows x lanes) transposed.
template <typename T>
inline void transpose_lanes(const T* in, int64_t rows, T* out) {
  tile_passes<T>().transpose(in, rows, out);
}

// ------------------------------------------------------------------------------------------------
// The network over a tile.

template <typename T>
struct MlpNet {
  MlpLayout m;
  const T* params;
  std::vector<T> transposed;  // every weight as (in x out), at its offset: the backward's W^T

  MlpNet(const MlpLayout& layout, const T* p, bool with_transposed) : m(layout), params(p) {
    if (!with_transposed) return;
    transposed.assign(static_cast<size_t>(m.params), T(0));
    for (int l = 0; l < m.layers; ++l) {
      const T* w = weight(l);
      T* wt = transposed.data() + m.weight_offset[l];
      for (int64_t o = 0; o < m.out(l); ++o)
        for (int64_t i = 0; i < m.in(l); ++i) wt[i * m.out(l) + o] = w[o * m.in(l) + i];
    }
  }
  const T* weight(int l) const { return params + m.weight_offset[l]; }
  const T* weight_t(int l) const { return transposed.data() + m.weight_offset[l]; }
  const T* bias(int l) const { return m.bias ? params + m.bias_offset[l] : nullptr; }
};

// One evaluation's records for its vector-Jacobian product: the input (in x lanes) and, per
// hidden layer, its activation and the activation's derivative (width x lanes each).
template <typename T>
struct EvalRecord {
  T* input = nullptr;
  T* act[kMaxMlpLayers] = {};
  T* deriv[kMaxMlpLayers] = {};
};

// Values one record needs: input + 2 x every hidden width, times the lanes.
inline int64_t record_size(const MlpLayout& m, int lanes) {
  int64_t size = m.in(0);
  for (int l = 0; l + 1 < m.layers; ++l) size += 2 * m.out(l);
  return size * lanes;
}

template <typename T>
EvalRecord<T> carve_record(const MlpLayout& m, T* base) {
  constexpr int N = kLanes<T>;
  EvalRecord<T> rec;
  rec.input = base;
  base += m.in(0) * N;
  for (int l = 0; l + 1 < m.layers; ++l) {
    rec.act[l] = base;
    rec.deriv[l] = base + m.out(l) * N;
    base += 2 * m.out(l) * N;
  }
  return rec;
}

// out (D x lanes) = f(x) for x (in x lanes). Without a record the hidden layers alternate between
// the two halves of `scratch` (2 x max width x lanes); with one they are kept in it.
template <typename T>
void mlp_eval(const MlpNet<T>& net, const T* x, T* out, T* scratch, const EvalRecord<T>* rec) {
  constexpr int N = kLanes<T>;
  const MlpLayout& m = net.m;
  const T* in = x;
  for (int l = 0; l < m.layers; ++l) {
    const bool last = l + 1 == m.layers;
    T* z = last ? out : rec != nullptr ? rec->act[l] : scratch + (l % 2) * m.max_width * N;
    if (m.bias)
      gemm<T, Start::kBias>(m.out(l), N, m.in(l), net.weight(l), m.in(l), in, N, z, N, net.bias(l));
    else
      gemm<T, Start::kZero>(m.out(l), N, m.in(l), net.weight(l), m.in(l), in, N, z, N, nullptr);
    if (!last) activate(m.activation, z, rec != nullptr ? rec->deriv[l] : nullptr, m.out(l) * N);
    in = z;
  }
}

// Whether layer l's weight gradient is accumulated transposed, (in x out): its products run along
// the wider of the layer's two sides, a whole number of vectors (the first layer: D inputs, many
// outputs), instead of element by element.
inline bool gradient_transposed(const MlpLayout& m, int l) { return m.out(l) > m.in(l); }

// For every lane, v (D x lanes) = (df/dy)^T kappa at the recorded evaluation, and
// grad (packed like the parameters) += d<kappa, f>/dweights summed over the lanes, except that a
// layer with gradient_transposed accumulates its weight's gradient transposed at the same offset;
// the biases' gradients are kept per lane, bias_lanes[(bias_row + o) * lanes + lane] (summed over the lanes
// once, at the end: no reduction across a vector per call). Lanes with a zero kappa contribute
// nothing. `scratch` holds 3 x max width x lanes values.
template <typename T>
void mlp_vjp(const MlpNet<T>& net, const EvalRecord<T>& rec, const T* kappa, T* v, T* grad, T* bias_lanes,
             T* scratch) {
  constexpr int N = kLanes<T>;
  const MlpLayout& m = net.m;
  T* flipped = scratch;  // one operand transposed (lanes x width)
  T* buffers[2] = {scratch + m.max_width * N, scratch + 2 * m.max_width * N};
  const T* delta = kappa;  // d<kappa, f> / d(layer output), out x lanes
  for (int l = m.layers - 1; l >= 0; --l) {
    const int64_t in = m.in(l), out = m.out(l);
    const T* x = l == 0 ? rec.input : rec.act[l - 1];
    T* gw = grad + m.weight_offset[l];
    if (gradient_transposed(m, l)) {  // dW^T (in x out) += x (in x lanes) delta^T (lanes x out)
      transpose_lanes(delta, out, flipped);
      gemm<T, Start::kAccumulate>(in, out, N, x, N, flipped, out, gw, out, nullptr);
    } else {  // dW (out x in) += delta (out x lanes) x^T (lanes x in)
      transpose_lanes(x, in, flipped);
      gemm<T, Start::kAccumulate>(out, in, N, delta, N, flipped, in, gw, in, nullptr);
    }
    if (m.bias) tile_passes<T>().add(bias_lanes + m.bias_row[l] * N, delta, out * N);
    if (l == 0) {  // the state's rows of the input only (not the time's)
      gemm<T, Start::kZero>(m.state_dim, N, out, net.weight_t(0), out, delta, N, v, N, nullptr);
      break;
    }
    T* g = buffers[l % 2];
    gemm<T, Start::kZero>(in, N, out, net.weight_t(l), out, delta, N, g, N, nullptr);
    tile_passes<T>().multiply(g, rec.deriv[l - 1], in * N);
    delta = g;
  }
}

// Puts the gradients mlp_vjp accumulated transposed or per lane in the parameters' layout.
template <typename T>
void finish_gradients(const MlpLayout& m, T* grad, const T* bias_lanes) {
  constexpr int N = kLanes<T>;
  for (int l = 0; m.bias && l < m.layers; ++l)
    for (int64_t o = 0; o < m.out(l); ++o) {
      T sum = 0;
      for (int n = 0; n < N; ++n) sum += bias_lanes[(m.bias_row[l] + o) * N + n];
      grad[m.bias_offset[l] + o] = sum;
    }
  std::vector<T> block;
  for (int l = 0; l < m.layers; ++l) {
    if (!gradient_transposed(m, l)) continue;
    const int64_t in = m.in(l), out = m.out(l);
    T* gw = grad + m.weight_offset[l];
    block.assign(gw, gw + in * out);
    for (int64_t i = 0; i < in; ++i)
      for (int64_t o = 0; o < out; ++o) gw[o * in + i] = block[i * out + o];
  }
}

// ------------------------------------------------------------------------------------------------
// Per-lane pieces shared by the forward and backward tiles.

// out = y + sum_t (T)(coef_t * h) k[index_t] over D values (stage rows `stride` apart), with the
// weights rounded as batch_stage / batch_step round them; y = nullptr: the sum alone.
template <typename T>
[[gnu::always_inline]] inline void combine(const T* __restrict y, const T* __restrict k, int64_t stride,
                                           const CoefficientRow& row, double h, int64_t dim, T* __restrict out) {
  T w[kMaxStages];
  for (int t = 0; t < row.count; ++t) w[t] = static_cast<T>(row.coef[t] * h);
  for (int64_t d = 0; d < dim; ++d) {
    T acc = 0;
    for (int t = 0; t < row.count; ++t) acc += w[t] * k[row.index[t] * stride + d];
    out[d] = y == nullptr ? acc : static_cast<T>(y[d] + acc);
  }
}

inline const double* times_of(const double* t_eval, bool shared, int64_t sample, int64_t outputs) {
  return shared ? t_eval : t_eval + sample * outputs;
}

// ------------------------------------------------------------------------------------------------
// Forward.

// Checkpoints a worker recorded, in the order its lanes took the steps: per row the sample and
// its step index (where the row goes), t0, h, t1, and the state and first stage at t0.
template <typename T>
struct CheckpointLog {
  std::vector<int64_t> where;  // 2 per row
  std::vector<double> times;   // 3 per row
  std::vector<T> values;       // 2 D per row
};

template <typename T>
struct ForwardJob {
  const MlpSolveCall& call;
  const MlpNet<T>& net;
  T* ys;
  int64_t* status;
  double* t_final;
  int64_t* stats;
  int64_t* out_step;
  std::atomic<int64_t> next_sample{0};
};

// A lane's phases besides "evaluating stage i" (i >= 0).
enum LanePhase : int { kIdle = -3, kFirstEval = -2, kSecondEval = -1 };

template <typename T>
class ForwardTile {
 public:
  ForwardTile(ForwardJob<T>& job, CheckpointLog<T>& log)
      : job_(job), call_(job.call), method_(job.call.method), log_(log), dim_(job.call.dim),
        stages_(job.call.method.stages), probe_row_(stages_), copy_row_(stages_ + 1), rows_(stages_ + 2) {
    const MlpLayout& m = call_.mlp;
    x_.assign(m.in(0) * N, T(0));
    out_.assign(dim_ * N, T(0));
    scratch_.assign(2 * m.max_width * N, T(0));
    y_.assign(dim_ * N, T(0));
    k_.assign(stages_ * dim_ * N, T(0));
    y1_.assign(dim_ * N, T(0));
    scaled_.assign(dim_ * N, T(0));
    atol_.assign(dim_ * N, T(0));
    rtol_.assign(dim_ * N, T(0));
    stage_weights_.assign(rows_ * stages_ * N, T(0));
    b_weights_.assign(method_.b_row.count * N, T(0));
    e_weights_.assign(method_.b_error_row.count * N, T(0));
    describe_rows();
    poly_by_power_.resize(method_.degree * stages_);
    for (int i = 0; i < stages_; ++i)
      for (int p = 0; p < method_.degree; ++p) poly_by_power_[p * stages_ + i] = method_.poly[i * method_.degree + p];
    y0_ = call_.y0.template const_data_ptr<T>();
    rtol_in_ = call_.rtol.template const_data_ptr<T>();
    atol_in_ = call_.atol.template const_data_ptr<T>();
    t_eval_ = call_.t_eval.template const_data_ptr<double>();
    t_start_ = call_.t_start.template const_data_ptr<double>();
    t_end_ = call_.t_end.template const_data_ptr<double>();
    first_step_ = call_.first_step.numel() ? call_.first_step.template const_data_ptr<double>() : nullptr;
  }

  // Per evaluation: the lanes' inputs, the network, the stages stored and the steps' ends across the
  // lanes; then each lane's own (cheap) decisions.
  void run() {
    const TilePasses<T>& passes = tile_passes<T>();
    while (refill()) {
      bool ending = false;
      for (int l = 0; l < N; ++l) ending = prepare(l) || ending;
      passes.stage_inputs(StageInputArgs<T>{row_, stage_weights_.data(), uses_.data(), signed_zero_.data(), rows_,
                                            stages_, dim_, y_.data(), k_.data(), x_.data()});
      mlp_eval(job_.net, x_.data(), out_.data(), scratch_.data(), static_cast<const EvalRecord<T>*>(nullptr));
      passes.store_stage(out_.data(), store_at_, dim_, stages_, k_.data());
      if (ending)
        passes.step_ends(StepEndArgs<T>{&method_.b_row, &method_.b_error_row, b_weights_.data(), e_weights_.data(),
                                        atol_.data(), rtol_.data(), dim_, y_.data(), k_.data(), y1_.data(),
                                        scaled_.data(), sumsq_, nonfinite_, ratio_, !method_.fixed});
      for (int l = 0; l < N; ++l) consume(l);
    }
  }

 private:
  static constexpr int N = kLanes<T>;
  static constexpr int kDenseGroup = 4;  // dense outputs evaluated side by side

  struct Lane {
    int64_t sample = -1;
    int phase = kIdle;
    double t = 0, dt = 0, h = 0, t_start = 0, t_end = 0, dir = 1;
    double history[2] = {1.0, 1.0};
    int64_t status = kRunning;
    int64_t stats[kStatColumns] = {};
    int64_t next_out = 0;
    int64_t grid_steps = 0, grid_index = 0;  // fixed grid
    T h0 = 0, d1 = 0;                        // the initial step heuristic between its evaluations
    T probe_h = 0;                           // its signed probe step h0
    bool finite = true;
  };

  // Rows of lanes: value d of lane l at [d * N + l]; stage j's rows follow one another.
  T& y_at(int l, int64_t d) { return y_[d * N + l]; }
  T& k_at(int l, int j, int64_t d) { return k_[(j * dim_ + d) * N + l]; }
  T& stage_weight(int row, int j, int l) { return stage_weights_[(row * stages_ + j) * N + l]; }

  // The coefficient rows a lane's input may take: stage i's (y + sum_j (T)(a_ij h) k_j, summed onto
  // +0 as combine sums), the initial step's probe (y0 + h0 f0: exactly its one term, so onto -0)
  // and a copy of y (the first evaluation, an idle lane).
  void describe_rows() {
    uses_.assign(rows_ * stages_, 0);
    signed_zero_.assign(rows_, 0);
    for (int i = 0; i < stages_; ++i)
      for (int t = 0; t < method_.a_rows[i].count; ++t) uses_[i * stages_ + method_.a_rows[i].index[t]] = 1;
    uses_[probe_row_ * stages_] = 1;
    signed_zero_[probe_row_] = signed_zero_[copy_row_] = 1;
  }

  T tol(const T* values, ToleranceLayout layout, int64_t sample, int64_t d) const {
    return values[tolerance_index(layout, sample * dim_ + d, d)];
  }

  // Loads samples into idle lanes; false once every lane is idle and the queue is empty.
  bool refill() {
    bool any = false;
    for (int l = 0; l < N; ++l) {
      while (lanes_[l].phase == kIdle && !drained_) {
        const int64_t s = job_.next_sample.fetch_add(1);
        if (s >= call_.batch) {
          drained_ = true;
          break;
        }
        load(l, s);
      }
      any = any || lanes_[l].phase != kIdle;
    }
    return any;
  }

  void load(int l, int64_t s) {
    Lane& lane = lanes_[l];
    lane = Lane();
    lane.sample = s;
    lane.t_start = lane.t = t_start_[s];
    lane.t_end = t_end_[s];
    lane.dir = lane.t_end >= lane.t_start ? 1.0 : -1.0;
    const int64_t outputs = call_.outputs;
    T* ys = job_.ys + s * outputs * dim_;
    int64_t* marks = job_.out_step + s * outputs;
    std::fill(ys, ys + outputs * dim_, std::numeric_limits<T>::quiet_NaN());
    std::fill(marks, marks + outputs, kOutputNotReached);
    const T* y0 = y0_ + s * dim_;
    if (times_of(t_eval_, call_.shared_times, s, outputs)[0] == lane.t_start) {
      std::copy(y0, y0 + dim_, ys);  // as given, even when not finite
      marks[0] = kOutputAtStart;
      lane.next_out = 1;
    }
    // A sample with a non-finite start is carried as zeros (the network never sees its NaN).
    for (int64_t d = 0; d < dim_; ++d) lane.finite = lane.finite && std::isfinite(y0[d]);
    for (int64_t d = 0; d < dim_; ++d) {
      y_at(l, d) = lane.finite ? y0[d] : T(0);
      atol_[d * N + l] = tol(atol_in_, call_.atol_layout, s, d);
      rtol_[d * N + l] = tol(rtol_in_, call_.rtol_layout, s, d);
    }
    if (!method_.fixed) {
      lane.phase = kFirstEval;
      return;
    }
    lane.grid_steps = fixed_grid_steps(lane.t_start, lane.t_end, lane.dir, method_.step_size);
    const bool done = lane.grid_steps == 0;
    lane.status = done ? kSuccess : (lane.finite ? kRunning : kNonFinite);
    if (lane.status != kRunning) return finish(l);
    lane.h = grid_time(lane, 1) - lane.t;
    start_attempt(l, 0);
  }

  double grid_time(const Lane& lane, int64_t n) const {
    return fixed_grid_time(n, lane.grid_steps, lane.t_start, lane.t_end, lane.dir, method_.step_size);
  }

  // A step attempt of size lane.h begins at stage `phase`: its weights (T)(coef h), once per attempt.
  void start_attempt(int l, int phase) {
    Lane& lane = lanes_[l];
    lane.phase = phase;
    for (int i = 0; i < stages_; ++i) {
      const CoefficientRow& row = method_.a_rows[i];
      for (int t = 0; t < row.count; ++t) stage_weight(i, row.index[t], l) = static_cast<T>(row.coef[t] * lane.h);
    }
    for (int t = 0; t < method_.b_row.count; ++t)
      b_weights_[t * N + l] = static_cast<T>(method_.b_row.coef[t] * lane.h);
    for (int t = 0; t < method_.b_error_row.count; ++t)
      e_weights_[t * N + l] = static_cast<T>(method_.b_error_row.coef[t] * lane.h);
  }

  // Lane l's row for the stage inputs, its time in x_ and where its result goes; whether its step
  // ends with this evaluation.
  bool prepare(int l) {
    const Lane& lane = lanes_[l];
    T time = 0;
    if (lane.phase == kIdle) {
      row_[l] = copy_row_;
    } else if (lane.phase == kFirstEval) {
      row_[l] = copy_row_;
      time = static_cast<T>(lane.t_start);
    } else if (lane.phase == kSecondEval) {
      row_[l] = probe_row_;
      time = static_cast<T>(lane.t_start + static_cast<double>(lane.probe_h));
    } else {
      row_[l] = lane.phase;
      time = static_cast<T>(lane.t + method_.c[lane.phase] * lane.h);
    }
    store_at_[l] = lane.phase >= 0 ? lane.phase : lane.phase == kFirstEval ? 0 : stages_;
    if (call_.mlp.time_concat) x_[dim_ * N + l] = time;
    return lane.phase == stages_ - 1;
  }

  void consume(int l) {
    Lane& lane = lanes_[l];
    if (lane.phase == kIdle) return;
    if (lane.phase == kFirstEval) return first_evaluated(l);
    if (lane.phase == kSecondEval) return second_evaluated(l);
    if (lane.phase + 1 < stages_) {
      ++lane.phase;
      return;
    }
    if (method_.fixed)
      end_fixed_step(l);
    else
      end_adaptive_step(l);
  }

  // RMS over the state of x(d) / (atol + rtol |y0|), in the state's dtype.
  template <typename F>
  T scaled_rms(int l, const F& x) {
    T sum = 0;
    for (int64_t d = 0; d < dim_; ++d) {
      const T scale = atol_[d * N + l] + rtol_[d * N + l] * std::abs(y_at(l, d));
      const T v = x(d) / scale;
      sum += v * v;
    }
    return std::sqrt(sum / static_cast<T>(dim_));
  }

  // f0 = f(t0, y0) is stage 0 now.
  void first_evaluated(int l) {
    Lane& lane = lanes_[l];
    for (int64_t d = 0; d < dim_; ++d) lane.finite = lane.finite && std::isfinite(k_at(l, 0, d));
    if (first_step_ != nullptr) {
      lane.stats[kFEvals] = 1;
      return begin(l, first_step_[lane.sample]);
    }
    const T d0 = scaled_rms(l, [&](int64_t d) { return y_at(l, d); });
    lane.d1 = scaled_rms(l, [&](int64_t d) { return k_at(l, 0, d); });
    lane.h0 = initial_h0(d0, lane.d1);
    // y0 + h0 f0 at t0 + h0, the heuristic's probe (BatchSolver._initial_step)
    lane.probe_h = static_cast<T>(lane.dir * static_cast<double>(lane.h0));
    stage_weight(probe_row_, 0, l) = lane.probe_h;
    lane.phase = kSecondEval;
  }

  void second_evaluated(int l) {
    Lane& lane = lanes_[l];
    const T rms_df = scaled_rms(l, [&](int64_t d) { return out_[d * N + l] - k_at(l, 0, d); });
    lane.stats[kFEvals] = 2;
    begin(l, initial_dt(lane.h0, lane.d1, rms_df, call_.order));
  }

  void begin(int l, double dt) {
    Lane& lane = lanes_[l];
    lane.status = start_sample(call_.ctrl, dt, lane.finite, lane.next_out >= call_.outputs, lane.t_start,
                               lane.t_end, lane.dir, &lane.dt, &lane.h);
    if (!lane.finite)
      for (int64_t d = 0; d < dim_; ++d) k_at(l, 0, d) = T(0);
    if (lane.status != kRunning) return finish(l);
    start_attempt(l, 1);
  }

  // Writes every output time the accepted step [t0, t1] reached from its dense output, a group of
  // outputs at a time: the stages' weights h B_j(theta) as batch_step computes them, zero ones
  // skipped, summed as combine sums.
  void write_outputs(int l, double t0, double t1) {
    Lane& lane = lanes_[l];
    const int64_t s = lane.sample, outputs = call_.outputs;
    const double* te = times_of(t_eval_, call_.shared_times, s, outputs);
    int64_t end = lane.next_out;
    while (end < outputs && (te[end] - t1) * lane.dir <= 0.0) ++end;
    for (int64_t j0 = lane.next_out; j0 < end; j0 += kDenseGroup) {
      const int count = static_cast<int>(std::min<int64_t>(kDenseGroup, end - j0));
      double theta[kDenseGroup];
      for (int q = 0; q < kDenseGroup; ++q) theta[q] = (te[j0 + std::min(q, count - 1)] - t0) / lane.h;
      T weight[kMaxStages][kDenseGroup];
      bool term[kMaxStages][kDenseGroup];
      dense_weights(theta, lane.h, weight, term);
      const T* __restrict y = y_.data() + l;  // lane l's column (the outputs are elsewhere)
      const T* __restrict k = k_.data() + l;
      for (int q = 0; q < count; ++q) {
        T* __restrict out = job_.ys + (s * outputs + j0 + q) * dim_;
        for (int64_t d = 0; d < dim_; ++d) {
          T acc = 0;
          for (int i = 0; i < stages_; ++i)
            if (term[i][q]) acc += weight[i][q] * k[(i * dim_ + d) * N];
          out[d] = static_cast<T>(y[d * N] + acc);
        }
        job_.out_step[s * outputs + j0 + q] = lane.stats[kAccepted];
      }
    }
    lane.next_out = end;
  }

  // dense_weight(poly, degree, i, theta_q, h) of every stage i and output q, operation for
  // operation, as T (and whether it is nonzero); the outputs side by side in the inner loops, so
  // that they vectorise.
  void dense_weights(const double* theta, double h, T (*weight)[kDenseGroup], bool (*term)[kDenseGroup]) const {
    double acc[kMaxStages][kDenseGroup], power[kDenseGroup];
    for (int q = 0; q < kDenseGroup; ++q) power[q] = theta[q];
    for (int i = 0; i < stages_; ++i)
      for (int q = 0; q < kDenseGroup; ++q) acc[i][q] = 0.0;
    for (int p = 0; p < method_.degree; ++p) {
      const double* coef = poly_by_power_.data() + p * stages_;
      for (int i = 0; i < stages_; ++i)
        for (int q = 0; q < kDenseGroup; ++q) acc[i][q] += coef[i] * power[q];
      for (int q = 0; q < kDenseGroup; ++q) power[q] *= theta[q];
    }
    for (int i = 0; i < stages_; ++i)
      for (int q = 0; q < kDenseGroup; ++q) {
        const double w = acc[i][q] * h;
        term[i][q] = w != 0.0;
        weight[i][q] = static_cast<T>(w);
      }
  }

  void record(int l, double t0, double t1) {
    if (!call_.record) return;
    const Lane& lane = lanes_[l];
    log_.where.push_back(lane.sample);
    log_.where.push_back(lane.stats[kAccepted]);
    log_.times.insert(log_.times.end(), {t0, lane.h, t1});
    for (int64_t d = 0; d < dim_; ++d) log_.values.push_back(y_at(l, d));
    for (int64_t d = 0; d < dim_; ++d) log_.values.push_back(k_at(l, 0, d));
  }

  // y <- y1 (step_ends' result) after an accepted step.
  void take_y1(int l) {
    for (int64_t d = 0; d < dim_; ++d) y_at(l, d) = y1_[d * N + l];
  }

  // batch_step for one sample, from step_ends' y1 and error ratio: accept, outputs, the controller.
  void end_adaptive_step(int l) {
    Lane& lane = lanes_[l];
    const double ratio = ratio_[l];
    const bool accept = ratio <= 1.0;
    const double t0 = lane.t;
    double t1 = t0;
    if (accept) {
      t1 = lands_on_end(call_.ctrl, t0, lane.h, lane.t_end) ? lane.t_end : t0 + lane.h;
      record(l, t0, t1);
      write_outputs(l, t0, t1);
    }
    const SampleState state{&lane.t, &lane.dt, &lane.h, &lane.status, lane.stats, lane.history};
    advance_sample(call_.ctrl, state, ratio, accept, t1, lane.next_out >= call_.outputs, lane.t_end, lane.dir);
    if (accept) {
      take_y1(l);
      for (int64_t d = 0; d < dim_; ++d) k_at(l, 0, d) = k_at(l, stages_ - 1, d);  // the last stage is the next first
    }
    if (lane.status != kRunning) return finish(l);
    start_attempt(l, 1);
  }

  // One step of the fixed grid: every stage evaluated afresh, no error control.
  void end_fixed_step(int l) {
    Lane& lane = lanes_[l];
    bool finite = true;
    for (int64_t d = 0; d < dim_; ++d) finite = finite && std::isfinite(y1_[d * N + l]);
    lane.stats[kFEvals] += stages_;
    lane.stats[kSteps] += 1;
    if (!finite) {  // the step is not taken: the sample stops where it was
      lane.stats[kRejected] += 1;
      lane.status = kNonFinite;
      return finish(l);
    }
    const double t0 = lane.t, t1 = grid_time(lane, lane.grid_index + 1);
    record(l, t0, t1);  // both name the step by its index, the accepted count before it
    write_outputs(l, t0, t1);
    lane.stats[kAccepted] += 1;
    take_y1(l);
    lane.t = t1;
    ++lane.grid_index;
    if (lane.grid_index >= lane.grid_steps) {
      lane.status = kSuccess;
    } else if (lane.stats[kSteps] >= call_.ctrl.max_steps) {
      lane.status = kMaxStepsReached;
    } else {
      lane.h = grid_time(lane, lane.grid_index + 1) - t1;
      start_attempt(l, 0);
      return;
    }
    finish(l);
  }

  void finish(int l) {
    Lane& lane = lanes_[l];
    const int64_t s = lane.sample;
    job_.status[s] = lane.status;
    job_.t_final[s] = lane.t;
    std::copy(lane.stats, lane.stats + kStatColumns, job_.stats + s * kStatColumns);
    lane.phase = kIdle;
    lane.sample = -1;
  }

  ForwardJob<T>& job_;
  const MlpSolveCall& call_;
  const SolveMethod& method_;
  CheckpointLog<T>& log_;
  const int64_t dim_;
  const int stages_;
  const int probe_row_, copy_row_, rows_;  // coefficient rows besides the stages'
  Lane lanes_[N];
  bool drained_ = false;
  // Rows of lanes: the network's input and output, the state, the stages, the step's end, the
  // tolerances; the weights of every coefficient row, b and b_error.
  std::vector<T> x_, out_, scratch_, y_, k_, y1_, scaled_, atol_, rtol_, stage_weights_, b_weights_, e_weights_;
  std::vector<uint8_t> uses_, signed_zero_;
  std::vector<double> poly_by_power_;  // the dense output's coefficients, power by power (degree x stages)
  LaneIndex<T> row_[N] = {}, store_at_[N] = {};
  double sumsq_[N] = {}, nonfinite_[N] = {}, ratio_[N] = {};
  const T *y0_, *rtol_in_, *atol_in_;
  const double *t_eval_, *t_start_, *t_end_, *first_step_;
};

// Moves every worker's checkpoints to their rows: sample s's step n goes to offsets[s] + n.
template <typename T>
void gather_checkpoints(const std::vector<CheckpointLog<T>>& logs, const int64_t* offsets, int64_t dim, T* values,
                        double* times) {
  for_each_piece(static_cast<int64_t>(logs.size()), 1, [&](int64_t w0, int64_t w1) {
    for (int64_t w = w0; w < w1; ++w) {
      const CheckpointLog<T>& log = logs[w];
      const size_t rows = log.times.size() / 3;
      for (size_t r = 0; r < rows; ++r) {
        const int64_t row = offsets[log.where[2 * r]] + log.where[2 * r + 1];
        std::copy(log.times.begin() + 3 * r, log.times.begin() + 3 * r + 3, times + 3 * row);
        std::copy(log.values.begin() + 2 * dim * r, log.values.begin() + 2 * dim * (r + 1), values + 2 * dim * row);
      }
    }
  });
}

using SolveOutputs = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

template <typename T>
SolveOutputs mlp_solve_impl(const MlpSolveCall& call) {
  const int64_t batch = call.batch, dim = call.dim, outputs = call.outputs;
  Tensor ys = new_contiguous(call.y0, {batch, outputs, dim}, dtype_code(call.y0));
  Tensor status = new_contiguous(call.y0, {batch}, aoti_torch_dtype_int64());
  Tensor t_final = new_contiguous(call.y0, {batch}, aoti_torch_dtype_float64());
  Tensor stats = new_contiguous(call.y0, {batch, kStatColumns}, aoti_torch_dtype_int64());
  Tensor out_step = new_contiguous(call.y0, {batch, outputs}, aoti_torch_dtype_int64());
  Tensor offsets = new_contiguous(call.y0, {batch + 1}, aoti_torch_dtype_int64());

  const MlpNet<T> net(call.mlp, call.params.template const_data_ptr<T>(), false);
  ForwardJob<T> job{call, net, ys.template mutable_data_ptr<T>(), status.template mutable_data_ptr<int64_t>(),
                    t_final.template mutable_data_ptr<double>(), stats.template mutable_data_ptr<int64_t>(),
                    out_step.template mutable_data_ptr<int64_t>()};
  // One worker (a tile and its checkpoint log) per thread, all fed from one queue of samples.
  const int64_t tiles = (batch + kLanes<T> - 1) / kLanes<T>;
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(torch::stable::get_num_threads(), tiles));
  std::vector<CheckpointLog<T>> logs(workers);
  if (batch > 0) {
    for_each_piece(workers, 1, [&](int64_t w0, int64_t w1) {
      for (int64_t w = w0; w < w1; ++w) ForwardTile<T>(job, logs[w]).run();
    });
  }

  int64_t* off = offsets.template mutable_data_ptr<int64_t>();
  const int64_t* st = job.stats;
  off[0] = 0;
  for (int64_t s = 0; s < batch; ++s) off[s + 1] = off[s] + (call.record ? st[s * kStatColumns + kAccepted] : 0);
  const int64_t rows = off[batch];
  Tensor ckpt_y = new_contiguous(call.y0, {rows, 2, dim}, dtype_code(call.y0));
  Tensor ckpt_t = new_contiguous(call.y0, {rows, 3}, aoti_torch_dtype_float64());
  if (rows > 0)
    gather_checkpoints(logs, off, dim, ckpt_y.template mutable_data_ptr<T>(), ckpt_t.template mutable_data_ptr<double>());
  return {ys, status, t_final, stats, ckpt_y, ckpt_t, offsets, out_step};
}

SolveOutputs mlp_solve_cpu(Tensor y0, Tensor params, std::vector<int64_t> widths, int64_t activation,
                           bool time_concat, bool bias, Tensor t_eval, Tensor t_start, Tensor t_end, Tensor rtol,
                           Tensor atol, Tensor first_step, std::vector<double> a, std::vector<double> b,
                           std::vector<double> b_error, std::vector<double> c, std::vector<double> poly,
                           int64_t order, std::vector<double> controller, int64_t max_steps, double step_size,
                           bool record) {
  const MlpSolveCall call = prepare_mlp_solve(y0, params, widths, activation, time_concat, bias, t_eval, t_start,
                                              t_end, rtol, atol, first_step, a, b, b_error, c, poly, order,
                                              controller, max_steps, step_size, record);
  if (mlp_per_sample_selected()) return mlp_solve_per_sample_cpu(call);  // the CUDA kernels' code, for tests
  return call.y0.scalar_type() == ScalarType::Double ? mlp_solve_impl<double>(call) : mlp_solve_impl<float>(call);
}

// ------------------------------------------------------------------------------------------------
// Backward.

template <typename T>
struct BackwardJob {
  const MlpBackwardCall& call;
  const MlpNet<T>& net;
  T* grad_y0;
};

// One fixed piece of samples, walked a tile at a time: each round, every lane takes one step of its
// sample backwards (its last remaining one).
template <typename T>
class BackwardTile {
 public:
  BackwardTile(BackwardJob<T>& job, int64_t begin, int64_t end, T* grad)
      : job_(job), call_(job.call), method_(job.call.method), dim_(job.call.dim), stages_(job.call.method.stages),
        next_(begin), end_(end), grad_(grad) {
    const MlpLayout& m = call_.mlp;
    const int64_t per_record = record_size(m, N);
    records_.assign(stages_ * per_record, T(0));
    for (int i = 0; i < stages_; ++i) rec_[i] = carve_record(m, records_.data() + i * per_record);
    out_.assign(dim_ * N, T(0));
    kappa_in_.assign(dim_ * N, T(0));
    queue_kappa_.assign(dim_ * N, T(0));
    v_.assign(dim_ * N, T(0));
    scratch_.assign(3 * m.max_width * N, T(0));
    lam_.assign(N * dim_, T(0));
    mu_.assign(N * dim_, T(0));
    lam_y_.assign(N * dim_, T(0));
    kv_.assign(N * stages_ * dim_, T(0));
    kappa_.assign(N * stages_ * dim_, T(0));
    tmp_.assign(dim_, T(0));
    bias_lanes_.assign(m.biases * N, T(0));
    grad_ys_ = call_.grad_ys.template const_data_ptr<T>();
    t_eval_ = call_.t_eval.template const_data_ptr<double>();
    ckpt_y_ = call_.ckpt_y.template const_data_ptr<T>();
    ckpt_t_ = call_.ckpt_t.template const_data_ptr<double>();
    offsets_ = call_.offsets.template const_data_ptr<int64_t>();
    out_step_ = call_.out_step.template const_data_ptr<int64_t>();
  }

  void run() {
    run_rounds();
    flush_first_stages();
    finish_gradients(call_.mlp, grad_, bias_lanes_.data());
  }

 private:
  static constexpr int N = kLanes<T>;

  // One round: every lane walks one step back. The first stage is evaluated in a round only on a
  // fixed grid (every step evaluates it afresh); an adaptive solve evaluates it once per sample,
  // at its start, and those products are queued and taken a full tile at a time.
  void run_rounds() {
    while (refill()) {
      recompute_stages(method_.fixed);
      for (int l = 0; l < N; ++l) seed_cotangents(l);
      for (int i = stages_ - 1; i >= 1; --i) stage_vjp(i);
      if (method_.fixed) stage_vjp(0);
      for (int l = 0; l < N; ++l) close_step(l);
    }
  }

  // The product of a sample's first f(t0, y0) (an adaptive solve), for the queued samples at once;
  // it adds to their dL/dy0.
  void flush_first_stages() {
    if (queued_ == 0) return;
    const EvalRecord<T>& rec = rec_[0];
    mlp_eval(job_.net, rec.input, out_.data(), scratch_.data(), &rec);
    mlp_vjp(job_.net, rec, queue_kappa_.data(), v_.data(), grad_, bias_lanes_.data(), scratch_.data());
    for (int q = 0; q < queued_; ++q) {
      T* g = job_.grad_y0 + queue_[q] * dim_;
      for (int64_t d = 0; d < dim_; ++d) g[d] += v_[d * N + q];
    }
    std::fill(rec.input, rec.input + call_.mlp.in(0) * N, T(0));
    std::fill(queue_kappa_.begin(), queue_kappa_.end(), T(0));
    queued_ = 0;
  }

  void queue_first_stage(int l) {
    const Lane& lane = lanes_[l];
    const EvalRecord<T>& rec = rec_[0];
    const T* kappa = row(kappa_, l, 0);
    for (int64_t d = 0; d < dim_; ++d) {
      rec.input[d * N + queued_] = lane.y[d];
      queue_kappa_[d * N + queued_] = kappa[d];
    }
    if (call_.mlp.time_concat) rec.input[dim_ * N + queued_] = static_cast<T>(lane.t0);
    queue_[queued_++] = lane.sample;
  }

  struct Lane {
    int64_t sample = -1;
    int64_t step = 0;        // the step being walked back (index among the sample's accepted steps)
    int64_t output = 0;      // the last output not yet back-propagated
    const T* y = nullptr;    // the step's checkpoint: state and first stage at t0
    const T* k0 = nullptr;
    double t0 = 0, h = 0;
  };


  T* row(std::vector<T>& v, int l, int64_t j = 0) { return v.data() + (l * stages_ + j) * dim_; }
  T* lane_vec(std::vector<T>& v, int l) { return v.data() + l * dim_; }
  const T* grad_out(int64_t s, int64_t j) const { return grad_ys_ + (s * call_.outputs + j) * dim_; }

  bool refill() {
    bool any = false;
    for (int l = 0; l < N; ++l) {
      while (lanes_[l].sample < 0 && next_ < end_) load(l, next_++);
      if (lanes_[l].sample >= 0) {
        open_step(l);
        any = true;
      }
    }
    return any;
  }

  void load(int l, int64_t s) {
    const int64_t steps = offsets_[s + 1] - offsets_[s];
    Lane& lane = lanes_[l];
    lane = Lane();
    std::fill(lane_vec(lam_, l), lane_vec(lam_, l) + dim_, T(0));
    std::fill(lane_vec(mu_, l), lane_vec(mu_, l) + dim_, T(0));
    lane.output = call_.outputs - 1;
    while (lane.output >= 0 && out_step_[s * call_.outputs + lane.output] == kOutputNotReached) --lane.output;
    if (steps == 0) {
      finish(l, s);
      return;
    }
    lane.sample = s;
    lane.step = steps - 1;
  }

  void open_step(int l) {
    Lane& lane = lanes_[l];
    const int64_t r = offsets_[lane.sample] + lane.step;
    lane.y = ckpt_y_ + 2 * dim_ * r;
    lane.k0 = lane.y + dim_;
    lane.t0 = ckpt_t_[3 * r];
    lane.h = ckpt_t_[3 * r + 1];
  }

  // The step's stages again (as the forward computed them), with the network's records; the first
  // one (f(t0, y0)) only with `first`, else its value is the checkpoint's.
  void recompute_stages(bool first) {
    for (int l = 0; l < N; ++l) {
      if (lanes_[l].sample >= 0) std::copy(lanes_[l].k0, lanes_[l].k0 + dim_, row(kv_, l, 0));
    }
    for (int i = first ? 0 : 1; i < stages_; ++i) {
      const EvalRecord<T>& rec = rec_[i];
      for (int l = 0; l < N; ++l) {
        const Lane& lane = lanes_[l];
        T time = 0;
        if (lane.sample < 0) {
          std::fill(tmp_.begin(), tmp_.end(), T(0));
        } else {
          combine(lane.y, row(kv_, l), dim_, method_.a_rows[i], lane.h, dim_, tmp_.data());
          time = static_cast<T>(lane.t0 + method_.c[i] * lane.h);
        }
        for (int64_t d = 0; d < dim_; ++d) rec.input[d * N + l] = tmp_[d];
        if (call_.mlp.time_concat) rec.input[dim_ * N + l] = time;
      }
      mlp_eval(job_.net, rec.input, out_.data(), scratch_.data(), &rec);
      if (i == 0) continue;  // the first stage's value is the checkpoint's
      for (int l = 0; l < N; ++l)
        for (int64_t d = 0; d < dim_; ++d) row(kv_, l, i)[d] = out_[d * N + l];
    }
  }

  // The cotangents entering the step from its outputs, its end state and (adaptive) the next
  // step's first stage: lam_y = dL/dy0 so far, kappa_j = dL/dk_j so far.
  void seed_cotangents(int l) {
    Lane& lane = lanes_[l];
    T* kappa = row(kappa_, l);
    T* lam_y = lane_vec(lam_y_, l);
    std::fill(kappa, kappa + stages_ * dim_, T(0));
    std::fill(lam_y, lam_y + dim_, T(0));
    if (lane.sample < 0) return;
    const int64_t s = lane.sample;
    const double* te = times_of(t_eval_, call_.shared_times, s, call_.outputs);
    for (; lane.output >= 0 && out_step_[s * call_.outputs + lane.output] == lane.step; --lane.output) {
      const T* g = grad_out(s, lane.output);
      add_dense_terms(g, (te[lane.output] - lane.t0) / lane.h, lane.h, kappa, lam_y);
    }
    add_terms(lane_vec(lam_, l), method_.b_row, lane.h, kappa, lam_y);
    if (!method_.fixed) {
      const T* mu = lane_vec(mu_, l);
      T* last = kappa + (stages_ - 1) * dim_;
      for (int64_t d = 0; d < dim_; ++d) last[d] += mu[d];
    }
  }

  // Transposes out = y + sum_t (T)(coef_t h) k[index_t] for cotangent g: lam_y += g and
  // kappa[index_t] += (T)(coef_t h) g.
  void add_terms(const T* g, const CoefficientRow& row, double h, T* kappa, T* lam_y) {
    for (int64_t d = 0; d < dim_; ++d) lam_y[d] += g[d];
    for (int t = 0; t < row.count; ++t) {
      const T w = static_cast<T>(row.coef[t] * h);
      T* kj = kappa + row.index[t] * dim_;
      for (int64_t d = 0; d < dim_; ++d) kj[d] += w * g[d];
    }
  }

  // add_terms for an output's dense output: weights (T) h B_j(theta) as batch_step computes them,
  // zero ones skipped.
  void add_dense_terms(const T* g, double theta, double h, T* kappa, T* lam_y) {
    for (int64_t d = 0; d < dim_; ++d) lam_y[d] += g[d];
    for (int j = 0; j < stages_; ++j) {
      const double w = dense_weight(method_.poly, method_.degree, j, theta, h);
      if (w == 0.0) continue;
      const T wt = static_cast<T>(w);
      T* kj = kappa + j * dim_;
      for (int64_t d = 0; d < dim_; ++d) kj[d] += wt * g[d];
    }
  }

  // Back through stage i's evaluation and its input y + sum_{j<i} a_ij h k_j.
  void stage_vjp(int i) {
    for (int l = 0; l < N; ++l) {
      const bool take = lanes_[l].sample >= 0;
      const T* kappa = row(kappa_, l, i);
      for (int64_t d = 0; d < dim_; ++d) kappa_in_[d * N + l] = take ? kappa[d] : T(0);
    }
    mlp_vjp(job_.net, rec_[i], kappa_in_.data(), v_.data(), grad_, bias_lanes_.data(), scratch_.data());
    for (int l = 0; l < N; ++l) {
      const Lane& lane = lanes_[l];
      if (lane.sample < 0) continue;
      for (int64_t d = 0; d < dim_; ++d) tmp_[d] = v_[d * N + l];
      add_terms(tmp_.data(), method_.a_rows[i], lane.h, row(kappa_, l), lane_vec(lam_y_, l));
    }
  }

  // After the stage products: on an adaptive solve, the first stage's cotangent goes to the
  // previous step's last stage (it was that stage's value), or, at the sample's first step, to the
  // queue for f(t0, y0)'s product.
  void close_step(int l) {
    Lane& lane = lanes_[l];
    if (lane.sample < 0) return;
    if (!method_.fixed) std::copy(row(kappa_, l), row(kappa_, l) + dim_, lane_vec(mu_, l));
    std::copy(lane_vec(lam_y_, l), lane_vec(lam_y_, l) + dim_, lane_vec(lam_, l));
    if (--lane.step >= 0) return;
    const int64_t s = lane.sample;
    finish(l, s);  // before the queued product adds to dL/dy0
    if (!method_.fixed) {
      queue_first_stage(l);
      if (queued_ == N) flush_first_stages();
    }
    lane.sample = -1;
  }

  // dL/dy0: the cotangent carried back through the steps plus that of an output at the start.
  void finish(int l, int64_t s) {
    T* out = job_.grad_y0 + s * dim_;
    const T* lam = lane_vec(lam_, l);
    const bool at_start = call_.outputs > 0 && out_step_[s * call_.outputs] == kOutputAtStart;
    const T* g = grad_out(s, 0);
    for (int64_t d = 0; d < dim_; ++d) out[d] = lam[d] + (at_start ? g[d] : T(0));
  }

  BackwardJob<T>& job_;
  const MlpBackwardCall& call_;
  const SolveMethod& method_;
  const int64_t dim_;
  const int stages_;
  int64_t next_, end_;
  T* grad_;
  Lane lanes_[N];
  int64_t queue_[N] = {};  // samples whose first stage's product is pending (rec_[0], queue_kappa_)
  int queued_ = 0;
  EvalRecord<T> rec_[kMaxStages];
  std::vector<T> records_, out_, kappa_in_, queue_kappa_, v_, scratch_, lam_, mu_, lam_y_, kv_, kappa_, tmp_, bias_lanes_;
  const T* grad_ys_;
  const double* t_eval_;
  const T* ckpt_y_;
  const double* ckpt_t_;
  const int64_t *offsets_, *out_step_;
};

template <typename T>
std::tuple<Tensor, Tensor> mlp_solve_backward_impl(const MlpBackwardCall& call) {
  const int64_t batch = call.batch, dim = call.dim;
  Tensor grad_y0 = new_contiguous(call.grad_ys, {batch, dim}, dtype_code(call.grad_ys));
  Tensor grad_params = new_contiguous(call.grad_ys, {call.mlp.params}, dtype_code(call.grad_ys));
  const MlpNet<T> net(call.mlp, call.params.template const_data_ptr<T>(), true);
  BackwardJob<T> job{call, net, grad_y0.template mutable_data_ptr<T>()};
  // Fixed pieces (their number depends on B only): per-piece parameter gradients, added in order.
  const int64_t per_piece = std::max<int64_t>(kMinPieceTiles * kLanes<T>, (batch + kMaxPieces - 1) / kMaxPieces);
  const int64_t pieces = std::max<int64_t>(1, (batch + per_piece - 1) / per_piece);
  std::vector<T> partial(static_cast<size_t>(pieces * call.mlp.params), T(0));
  if (batch > 0) {
    for_each_piece(batch, per_piece, [&](int64_t b0, int64_t b1) {
      BackwardTile<T>(job, b0, b1, partial.data() + (b0 / per_piece) * call.mlp.params).run();
    });
  }
  T* gp = grad_params.template mutable_data_ptr<T>();
  std::copy(partial.begin(), partial.begin() + call.mlp.params, gp);
  for (int64_t p = 1; p < pieces; ++p) {
    const T* part = partial.data() + p * call.mlp.params;
    for (int64_t i = 0; i < call.mlp.params; ++i) gp[i] += part[i];
  }
  return {grad_y0, grad_params};
}

std::tuple<Tensor, Tensor> mlp_solve_backward_cpu(Tensor grad_ys, Tensor params, std::vector<int64_t> widths,
                                                  int64_t activation, bool time_concat, bool bias, Tensor t_eval,
                                                  Tensor ckpt_y, Tensor ckpt_t, Tensor ckpt_offsets, Tensor out_step,
                                                  std::vector<double> a, std::vector<double> b, std::vector<double> c,
                                                  std::vector<double> poly, double step_size) {
  const MlpBackwardCall call = prepare_mlp_solve_backward(grad_ys, params, widths, activation, time_concat, bias,
                                                          t_eval, ckpt_y, ckpt_t, ckpt_offsets, out_step, a, b, c,
                                                          poly, step_size);
  if (mlp_per_sample_selected()) return mlp_solve_backward_per_sample_cpu(call);
  return call.grad_ys.scalar_type() == ScalarType::Double ? mlp_solve_backward_impl<double>(call)
                                                          : mlp_solve_backward_impl<float>(call);
}

}  // namespace
}  // namespace flashode

STABLE_TORCH_LIBRARY_IMPL(flashode, CPU, m) {
  m.impl("mlp_solve", TORCH_BOX(&flashode::mlp_solve_cpu));
  m.impl("mlp_solve_backward", TORCH_BOX(&flashode::mlp_solve_backward_cpu));
}
