// Placeholder: the CUDA kernels land here.
#include "cuda/fuse_cuda.h"

namespace c2c::cuda {

void fuse(const std::vector<at::Tensor>&, const std::vector<at::Tensor>&, const at::Tensor&, const at::Tensor&,
          const std::vector<at::Tensor>&, const std::vector<int64_t>&) {
  TORCH_CHECK(false, "c2c: the CUDA fuse kernel is not implemented yet");
}

std::tuple<at::Tensor, at::Tensor> project(const std::vector<at::Tensor>&, const std::vector<at::Tensor>&,
                                           const at::Tensor&, const at::Tensor&, const std::vector<at::Tensor>&,
                                           const std::vector<int64_t>&) {
  TORCH_CHECK(false, "c2c: the CUDA project kernel is not implemented yet");
}

void merge(const std::vector<at::Tensor>&, const at::Tensor&, const std::vector<at::Tensor>&,
           const std::vector<at::Tensor>&) {
  TORCH_CHECK(false, "c2c: the CUDA merge kernel is not implemented yet");
}

}  // namespace c2c::cuda
