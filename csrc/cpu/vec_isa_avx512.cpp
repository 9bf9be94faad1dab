// The at::vec row kernels (cpu/vec_at.h) for AVX-512 F/BW/VL/DQ. The translation unit is compiled for
// the default target like every other; only the code after the target pragma below (at::vec's
// AVX512 implementation, in its own namespaces, and our kernels) may use those instructions, and
// it runs only after vec() has checked the CPU for them. The headers at::vec pulls in are
// included first, for the default target, so no inline function shared with the rest of the
// extension is ever compiled for AVX512.
#include "cpu/vec.h"

#if (defined(__x86_64__) || defined(_M_X64)) && defined(__GNUC__) && !defined(__clang__)
#define C2C_HAVE_VEC_ISA 1
#include "cpu/vec_isa_prelude.h"

#pragma GCC push_options
#pragma GCC diagnostic push
// at::vec headers define (unused) lambdas returning vectors; GCC warns they would change the ABI.
#pragma GCC diagnostic ignored "-Wpsabi"
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
// GCC's target pragma does not define the feature macros that sleef.h and at::vec test, so
// they are defined here, for this part of this file only (the prelude is already included).
#ifndef __AVX__
#define __AVX__ 1
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#endif
#ifndef __FMA__
#define __FMA__ 1
#endif
#ifndef __F16C__
#define __F16C__ 1
#endif
#ifndef __AVX512F__
#define __AVX512F__ 1
#endif
#ifndef __AVX512BW__
#define __AVX512BW__ 1
#endif
#ifndef __AVX512VL__
#define __AVX512VL__ 1
#endif
#ifndef __AVX512DQ__
#define __AVX512DQ__ 1
#endif
#define CPU_CAPABILITY c2c_avx512  // at::vec's inline namespace: ours alone, never shared with libtorch's
#define CPU_CAPABILITY_AVX512
#define C2C_VEC_NS avx512
#define C2C_VEC_NAME "avx512 (at::vec)"
#include "cpu/vec_at.h"
#pragma GCC diagnostic pop
#pragma GCC pop_options
#endif

namespace c2c::cpu {

const VecOps* vec_avx512() {
#if defined(C2C_HAVE_VEC_ISA)
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                         __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  return ok ? &avx512::ops() : nullptr;
#else
  return nullptr;
#endif
}

}  // namespace c2c::cpu
