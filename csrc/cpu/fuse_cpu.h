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
// " workspaces=poisoned" under C2C_POISON_WORKSPACES=1. The engine is the one C2C_CPU_GEMM
// forces (always fp32 for fp32 caches), else "auto (... prior <engine>)".
std::string config(c10::ScalarType dtype);

// The engine a call with `tokens` valid tokens and fuser hidden width `hidden` runs (measured
// and cached at the first call of its class, see cpu/gemm.h).
std::string choose_engine_name(c10::ScalarType dtype, int64_t tokens, int64_t hidden);
// The measured choices so far, one line each; `clear` forgets them.
std::string engine_choices(bool clear);
// The packed engine's weight cache: "entries=N bytes=B"; `clear` empties it.
std::string packed_cache(bool clear);
// The head-fold cache (head_fold.h): "entries=N bytes=B fusers=F".
std::string head_fold_cache(bool clear);

// Per-stage seconds of the fuse/project calls since the last call ("calls=N gather=... "),
// reset on every call; `enable` turns collection on or off from now on (off at start).
std::string stage_times(bool enable);

}  // namespace c2c::cpu
