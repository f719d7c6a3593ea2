// Portability macros for the CPU kernels.
#pragma once

// Runtime dispatch to AVX-512 / AVX2 code on x86-64 with GCC or Clang (ELF ifuncs): the
// extension is built without -march flags so it loads on any x86-64 CPU, and the hot loops
// still use the widest vectors the machine has. Define DANCEGRPO_NO_TARGET_CLONES to opt out.
#if defined(__x86_64__) && defined(__linux__) && (defined(__GNUC__) || defined(__clang__)) && \
    !defined(DANCEGRPO_NO_TARGET_CLONES)
#define DANCEGRPO_TARGET_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define DANCEGRPO_TARGET_CLONES
#endif

#if defined(_OPENMP)
#define DANCEGRPO_PRAGMA(x) _Pragma(#x)
#else
#define DANCEGRPO_PRAGMA(x)
#endif
