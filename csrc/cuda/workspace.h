// Scratch and output buffers of the CUDA host code, and the debug mode that poisons them.
//
// With C2C_POISON_WORKSPACES=1 in the environment (read once per process; the test suite sets
// it, c2c_kernels/workspace.py reads the same variable for the Python backends) every buffer
// allocated here is filled with NaN (floating point) or 0x5A5A5A5A (integers) before use, so
// a kernel that reads memory it has not written fails the tests on every machine instead of
// passing where the allocator happens to hand back zeros. The fill is one more launch on the
// current stream: still graph-capturable.
#pragma once

#include <ATen/ATen.h>

#include <cstdlib>
#include <cstring>
#include <limits>

namespace c2c::cuda {

inline bool poison_workspaces() {
  static const bool on = [] {
    const char* value = std::getenv("C2C_POISON_WORKSPACES");
    return value != nullptr && std::strcmp(value, "1") == 0;
  }();
  return on;
}

// Like c2c_kernels.workspace.POISON_INT: far out of the tests' pools, so a poisoned slot that is
// used is skipped as out of range (or trips AddressSanitizer where a check is missing).
constexpr int64_t kPoisonInt = 0x5A5A5A5A;

inline at::Tensor workspace_empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = at::empty(sizes, options);
  if (poison_workspaces() && t.numel() > 0) {
    if (at::isFloatingType(t.scalar_type())) {
      t.fill_(std::numeric_limits<double>::quiet_NaN());
    } else {
      t.fill_(kPoisonInt);
    }
  }
  return t;
}

}  // namespace c2c::cuda
