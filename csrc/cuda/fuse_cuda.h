// CUDA kernels of the fuser (csrc/cuda): current-stream, no host sync, graph-capturable;
// the gated merge writes the cache in place.
#pragma once

#include <torch/types.h>

#include <tuple>
#include <vector>

namespace c2c::cuda {

void fuse(const std::vector<at::Tensor>& receiver_caches, const std::vector<at::Tensor>& sharer_caches,
          const at::Tensor& receiver_slots, const at::Tensor& sharer_slots,
          const std::vector<at::Tensor>& weights, const std::vector<int64_t>& fusers);

std::tuple<at::Tensor, at::Tensor> project(const std::vector<at::Tensor>& receiver_caches,
                                           const std::vector<at::Tensor>& sharer_caches,
                                           const at::Tensor& receiver_slots, const at::Tensor& sharer_slots,
                                           const std::vector<at::Tensor>& weights,
                                           const std::vector<int64_t>& fusers);

void merge(const std::vector<at::Tensor>& receiver_caches, const at::Tensor& receiver_slots,
           const std::vector<at::Tensor>& projections, const std::vector<at::Tensor>& head_scales);

}  // namespace c2c::cuda
