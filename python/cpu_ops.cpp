// CPU implementations of torch.ops.c2c_native (kernels in csrc/cpu).
#include <torch/library.h>

#include "cpu/fuse_cpu.h"

TORCH_LIBRARY_IMPL(c2c_native, CPU, m) {
  m.impl("fuse", &c2c::cpu::fuse);
  m.impl("project", &c2c::cpu::project);
  m.impl("merge", &c2c::cpu::merge);
}
