// CUDA implementations of torch.ops.c2c_native (kernels in csrc/cuda).
#include <torch/library.h>

#include "cuda/fuse_cuda.h"

TORCH_LIBRARY_IMPL(c2c_native, CUDA, m) {
  m.impl("fuse", &c2c::cuda::fuse);
  m.impl("project", &c2c::cuda::project);
  m.impl("merge", &c2c::cuda::merge);
}
