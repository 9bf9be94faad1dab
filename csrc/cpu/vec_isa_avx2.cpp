// The at::vec row kernels (cpu/vec_at.h) for AVX2, FMA and F16C. The translation unit is compiled for
// the default target like every other; only the code after the target pragma below (at::vec's
// AVX2 implementation, in its own namespaces, and our kernels) may use those instructions, and
// it runs only after vec() has checked the CPU for them. The headers at::vec pulls in are
// included first, for the default target, so no inline function shared with the rest of the
// extension is ever compiled for AVX2.
#include "cpu/vec.h"

#if (defined(__x86_64__) || defined(_M_X64)) && defined(__GNUC__) && !defined(__clang__)
#define C2C_HAVE_VEC_ISA 1
#include "cpu/vec_isa_prelude.h"

#pragma GCC push_options
#pragma GCC diagnostic push
// at::vec headers define (unused) lambdas returning vectors; GCC warns they would change the ABI.
#pragma GCC diagnostic ignored "-Wpsabi"
#pragma GCC target("avx2,fma,f16c")
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
#define CPU_CAPABILITY c2c_avx2  // at::vec's inline namespace: ours alone, never shared with libtorch's
#define CPU_CAPABILITY_AVX2
#define C2C_VEC_NS avx2
#define C2C_VEC_NAME "avx2 (at::vec)"
#include "cpu/vec_at.h"
#pragma GCC diagnostic pop
#pragma GCC pop_options
#endif

namespace c2c::cpu {

const VecOps* vec_avx2() {
#if defined(C2C_HAVE_VEC_ISA)
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  return ok ? &avx2::ops() : nullptr;
#else
  return nullptr;
#endif
}

}  // namespace c2c::cpu
