// CUDA kernels of the fuser (csrc/cuda): current-stream, no host sync, graph-capturable;
// the gated merge writes the cache in place.
#pragma once

#include <torch/types.h>

#include <optional>
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

// The (receiver, sharer) int64 slots of c2c_kernels.slots.prepare() for pools of receiver_rows /
// sharer_rows rows, computed in one launch; out-of-range slots are recorded in `status` (the
// int64 [8] buffer of c2c_kernels/status.py). No sharer slots: merge (only receivers checked).
std::tuple<at::Tensor, at::Tensor> prepare_slots(const at::Tensor& receiver_slots,
                                                 const std::optional<at::Tensor>& sharer_slots, int64_t receiver_rows,
                                                 int64_t sharer_rows, bool dedupe, const at::Tensor& status);

}  // namespace c2c::cuda
