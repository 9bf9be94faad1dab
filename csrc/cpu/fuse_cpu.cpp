// Placeholder: the CPU kernels land here.
#include "cpu/fuse_cpu.h"

namespace c2c::cpu {

void fuse(const std::vector<at::Tensor>&, const std::vector<at::Tensor>&, const at::Tensor&, const at::Tensor&,
          const std::vector<at::Tensor>&, const std::vector<int64_t>&) {
  TORCH_CHECK(false, "c2c: the CPU fuse kernel is not implemented yet");
}

std::tuple<at::Tensor, at::Tensor> project(const std::vector<at::Tensor>&, const std::vector<at::Tensor>&,
                                           const at::Tensor&, const at::Tensor&, const std::vector<at::Tensor>&,
                                           const std::vector<int64_t>&) {
  TORCH_CHECK(false, "c2c: the CPU project kernel is not implemented yet");
}

void merge(const std::vector<at::Tensor>&, const at::Tensor&, const std::vector<at::Tensor>&,
           const std::vector<at::Tensor>&) {
  TORCH_CHECK(false, "c2c: the CPU merge kernel is not implemented yet");
}

}  // namespace c2c::cpu
