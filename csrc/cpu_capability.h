// Selects at::vec's instruction set from what the compiler targets (CMakeLists.txt compiles with
// -march=native by default, since pip builds the extension on the machine that runs it). Must be included
// before any ATen vec header. The namespace name differs from libtorch's DEFAULT one, so the inline vec
// functions compiled here never collide with libtorch's copies.
#pragma once

#if !defined(CPU_CAPABILITY)
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__)
#define CPU_CAPABILITY_AVX512
#define CPU_CAPABILITY AVX512
#elif defined(__AVX2__) && defined(__FMA__)
#define CPU_CAPABILITY_AVX2
#define CPU_CAPABILITY AVX2
#else
#define CPU_CAPABILITY CONVRET_SCALAR
#endif
#endif

#define CONVRET_STRINGIFY_(x) #x
#define CONVRET_STRINGIFY(x) CONVRET_STRINGIFY_(x)
#define CONVRET_VEC_ISA CONVRET_STRINGIFY(CPU_CAPABILITY)
