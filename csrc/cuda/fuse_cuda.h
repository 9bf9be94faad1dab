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

// How run() splits `tokens` tokens of `entries` fusers of these widths: (tokens per chunk,
// chunks, workspace bytes), for a device of `device_memory` bytes (0: unknown) and the
// C2C_CUDA_WORKSPACE_BYTES override, with the weight branch folded (`head_fold`, the default
// path) or not. For tests and docs/cuda.md; the call computes the same.
std::tuple<int64_t, int64_t, int64_t> chunk_plan(int64_t entries, int64_t tokens, int64_t sharer_width,
                                                 int64_t receiver_width, int64_t hidden, int64_t inner, int64_t heads,
                                                 int64_t element_size, int64_t device_memory, bool head_fold);

// Weight stacks whose concatenated W_in (the [S; X] GEMM's, fuse.cu) is kept, freed ones not counted.
int64_t input_weight_cache_entries();

// Pairs of weight stacks (W_head, W2h) whose head fold [W_head, V = W_head W2h] is kept (fuse.cu).
int64_t head_fold_cache_entries();
// Derived weight tensors (concatenated W_in, head folds) kept alive for captured CUDA graphs.
int64_t captured_derived_tensors();

void merge(const std::vector<at::Tensor>& receiver_caches, const at::Tensor& receiver_slots,
           const std::vector<at::Tensor>& projections, const std::vector<at::Tensor>& head_scales);

// The (receiver, sharer) int64 slots of c2c_kernels.slots.prepare() for pools of receiver_rows /
// sharer_rows rows, computed in one launch; out-of-range slots are recorded in `status` (the
// int64 [8] buffer of c2c_kernels/status.py). No sharer slots: merge (only receivers checked).
std::tuple<at::Tensor, at::Tensor> prepare_slots(const at::Tensor& receiver_slots,
                                                 const std::optional<at::Tensor>& sharer_slots, int64_t receiver_rows,
                                                 int64_t sharer_rows, bool dedupe, const at::Tensor& status);

}  // namespace c2c::cuda
