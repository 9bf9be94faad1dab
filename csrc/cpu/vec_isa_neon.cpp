// The at::vec row kernels (cpu/vec_at.h) on 64-bit ARM, where at::vec's default implementation
// is NEON, part of the baseline instruction set (no target switch, no CPU check needed).
#include "cpu/vec.h"

#if defined(__aarch64__)
#define CPU_CAPABILITY c2c_neon  // at::vec's inline namespace: ours alone, never shared with libtorch's
#define C2C_VEC_NS neon
#define C2C_VEC_NAME "neon (at::vec)"
#include "cpu/vec_at.h"
#endif

namespace c2c::cpu {

const VecOps* vec_neon() {
#if defined(__aarch64__)
  return &neon::ops();
#else
  return nullptr;
#endif
}

}  // namespace c2c::cpu
