// One c2c_native::fuse / project call, validated and unpacked once: the cache views, the
// slots, the stacked weights (fuser_weights.h) and the shapes every stage needs. The op layer
// (c2c_kernels/ops.py) checked the arguments already; this re-checks what memory safety needs.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

#include "cuda/batched_linear.h"
#include "cuda/runtime.h"
#include "cuda/torch_params.h"
#include "fuser_weights.h"

namespace c2c::cuda {

constexpr int kRowEpilogueMaxWidth = 8 * 1024;  // gather_norm.cu keeps 8 values per thread

// A validated call, unpacked once.
struct Call {
  std::vector<at::Tensor> receivers, sharers, w;
  at::Tensor receiver_slots, sharer_slots;
  std::vector<int64_t> fusers;
  std::vector<FuserRun> runs;
  int64_t entries, tokens, hidden, inner, blocks, heads, head_dim, sharer_heads, sharer_head_dim;
};

inline Call unpack(const std::vector<at::Tensor>& receiver_caches, const std::vector<at::Tensor>& sharer_caches,
                   const at::Tensor& receiver_slots, const at::Tensor& sharer_slots,
                   const std::vector<at::Tensor>& weights, const std::vector<int64_t>& fusers) {
  TORCH_CHECK(weights.size() == kNumWeights, "weights: expected the ", int(kNumWeights),
              " stacked tensors of FuserWeights, got ", weights.size());
  const int64_t entries = static_cast<int64_t>(receiver_caches.size());
  TORCH_CHECK(static_cast<int64_t>(sharer_caches.size()) == entries && static_cast<int64_t>(fusers.size()) == entries,
              "receiver_caches, sharer_caches and fusers must have one entry per fused cache: got ", entries, ", ",
              sharer_caches.size(), " and ", fusers.size());
  Call c;
  c.w.reserve(kNumWeights);
  for (const at::Tensor& t : weights) c.w.push_back(t);
  // The row kernels walk bias and norm vectors with unit stride.
  for (int i : {kBIn, kFfnNorm, kHeadNorm, kBHead, kBOut}) c.w[i] = unit_inner_stride(c.w[i]);
  const at::Device device = c.w[kWInSharer].device();
  const at::ScalarType dtype = c.w[kWInSharer].scalar_type();
  TORCH_CHECK(device.type() == kKernelDevice, "weights: expected ", kKernelDevice, " tensors, got ", device);
  for (int i = 0; i < kNumWeights; ++i) {
    TORCH_CHECK(!kWeightFp32[i] || (c.w[i].scalar_type() == at::kFloat && c.w[i].dim() == kWeightRank[i]), "weights.",
                kWeightNames[i], ": expected a ", kWeightRank[i], "-D float32 tensor");
  }
  for (int i = 0; i < kNumWeights; ++i) {
    TORCH_CHECK(c.w[i].device() == device, "weights[", i, "]: on ", c.w[i].device(), ", expected ", device);
    TORCH_CHECK(kWeightFp32[i] || c.w[i].scalar_type() == dtype, "weights[", i, "]: dtype ", c.w[i].scalar_type(),
                ", expected ", dtype);
  }
  const int64_t num_fusers = c.w[kWInSharer].size(0);
  for (size_t i = 0; i < fusers.size(); ++i) {
    TORCH_CHECK(fusers[i] >= 0 && fusers[i] < num_fusers, "fusers[", i, "] = ", fusers[i],
                " is out of range: the weights stack ", num_fusers, " fusers");
  }
  c.hidden = c.w[kWInSharer].size(1);
  c.inner = c.w[kFfnW1].size(2);
  c.blocks = c.w[kFfnW1].size(1);
  c.heads = c.w[kWHead].size(1);
  TORCH_CHECK(c.blocks >= 2, "weights.ffn_w1: expected >= 2 FFN blocks, got ", c.blocks);
  TORCH_CHECK(c.hidden <= kRowEpilogueMaxWidth, "weights: hidden width ", c.hidden,
              " is above the CUDA backend's limit of ", kRowEpilogueMaxWidth);
  for (int64_t i = 0; i < entries; ++i) {
    check_cache_view(receiver_caches[i], "receiver_caches", i, dtype, device);
    check_cache_view(sharer_caches[i], "sharer_caches", i, dtype, device);
    TORCH_CHECK(receiver_caches[i].sizes() == receiver_caches[0].sizes() &&
                    sharer_caches[i].sizes() == sharer_caches[0].sizes(),
                "receiver_caches/sharer_caches[", i, "]: every entry must share one pool geometry");
  }
  check_slots(receiver_slots, "receiver_slots", device);
  check_slots(sharer_slots, "sharer_slots", device);
  TORCH_CHECK(sharer_slots.size(0) == receiver_slots.size(0), "sharer_slots: ", sharer_slots.size(0),
              " slots, expected one per receiver slot (", receiver_slots.size(0), ")");
  if (entries > 0) {
    TORCH_CHECK(receiver_caches[0].size(2) * receiver_caches[0].size(3) == c.w[kWInReceiver].size(2) &&
                    receiver_caches[0].size(2) == c.heads,
                "receiver_caches: ", receiver_caches[0].size(2), " heads x ", receiver_caches[0].size(3),
                " dims do not match the fuser's receiver width");
    TORCH_CHECK(sharer_caches[0].size(2) * sharer_caches[0].size(3) == c.w[kWInSharer].size(2),
                "sharer_caches: ", sharer_caches[0].size(2), " heads x ", sharer_caches[0].size(3),
                " dims do not match the fuser's sharer width");
    c.head_dim = receiver_caches[0].size(3);
    c.sharer_heads = sharer_caches[0].size(2);
    c.sharer_head_dim = sharer_caches[0].size(3);
  }
  c.receivers = receiver_caches;
  c.sharers = sharer_caches;
  c.receiver_slots = receiver_slots;
  c.sharer_slots = sharer_slots;
  c.fusers = fusers;
  c.runs = fuser_runs(fusers);
  c.entries = entries;
  c.tokens = receiver_slots.size(0);
  return c;
}

}  // namespace c2c::cuda
