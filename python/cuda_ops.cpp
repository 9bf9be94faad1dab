// CUDA implementations of torch.ops.c2c_native (kernels in csrc/cuda).
#include <torch/library.h>

#include "cuda/fuse_cuda.h"

TORCH_LIBRARY_FRAGMENT(c2c_native, m) {
  // The slot rules of c2c_kernels/slots.py on the device, one launch, no host sync: the int64
  // (receiver, sharer) slots that fuse / project / merge then run on (skipped tokens get
  // receiver slot -1), out-of-range slots recorded in `status` (c2c_kernels/status.py).
  // CUDA only: the CPU backends walk the slots on the host and raise at once.
  m.def(
      "prepare_slots(Tensor receiver_slots, Tensor? sharer_slots, int receiver_rows, int sharer_rows, "
      "bool dedupe, Tensor(a!) status) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(c2c_native, CUDA, m) {
  m.impl("fuse", &c2c::cuda::fuse);
  m.impl("project", &c2c::cuda::project);
  m.impl("merge", &c2c::cuda::merge);
  m.impl("prepare_slots", &c2c::cuda::prepare_slots);
}
