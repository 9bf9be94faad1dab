// CPU kernels of the fuser: gather through slots, fused norm/GELU/residual around ATen GEMMs,
// and the gated merge back into the cache.
#pragma once

#include <torch/types.h>

#include <string>
#include <tuple>
#include <vector>

namespace c2c::cpu {

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

// "gemm=<engine> vec=<row kernels> threads=<n>" for caches of `dtype` on this CPU, plus
// " workspaces=poisoned" under C2C_POISON_WORKSPACES=1.
std::string config(c10::ScalarType dtype);

}  // namespace c2c::cpu
