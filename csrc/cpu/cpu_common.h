// Pieces shared by the CPU kernels: function multi-versioning and the fixed-chunk thread split.
#pragma once

#include <torch/csrc/stable/ops.h>

#include <algorithm>
#include <cstdint>

// The hot loops are compiled twice, for baseline x86-64 (SSE2) and for x86-64-v3 (AVX2), and the
// loader picks the best one for the running CPU (GCC function multi-versioning): the ops with many
// stage rows (finalize, dense) are compute-bound at SSE2 width. -ffp-contract=off keeps both clones
// free of FMA contraction so every CPU rounds exactly alike.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FLASHODE_CPU_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define FLASHODE_CPU_CLONES
#endif

namespace flashode {

// Runs body(begin, end) over [0, count) in fixed pieces of `per_piece` items, on torch's intra-op
// thread pool when there is more than one piece. The split never depends on the thread count, so
// any reduction done per piece gives the same result however many threads run.
template <typename F>
inline void for_each_piece(int64_t count, int64_t per_piece, const F& body) {
  const int64_t pieces = (count + per_piece - 1) / per_piece;
  if (pieces <= 1) {
    body(int64_t{0}, count);
    return;
  }
  torch::stable::parallel_for(0, pieces, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) body(p * per_piece, std::min(count, (p + 1) * per_piece));
  });
}

}  // namespace flashode
