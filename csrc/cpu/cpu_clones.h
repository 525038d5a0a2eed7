// Function multi-versioning for the CPU kernels' hot loops.
#pragma once

// The hot loops are compiled twice, for baseline x86-64 (SSE2) and for x86-64-v3 (AVX2), and the
// loader picks the best one for the running CPU (GCC function multi-versioning): the ops with many
// stage rows (finalize, dense) are compute-bound at SSE2 width. -ffp-contract=off keeps both clones
// free of FMA contraction so every CPU rounds exactly alike.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FLASHODE_CPU_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define FLASHODE_CPU_CLONES
#endif
