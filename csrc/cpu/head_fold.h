// The weight branch's second GEMM folded into the head weights (docs/cpu.md, "Head fold").
//
// The branch's output w = u + W2h g (g = gelu(W1h norm(u))) is only ever used through the head
// logits a = W_head w + b_head, so a = W_head u + V g + b_head with V = W_head W2h, a small
// [Ht, H] fp32 matrix per fuser. With V at hand the [M, H] x [H, H] W2h GEMM (about 12% of a
// published fuser's FLOPs) is not run at all. V is computed in fp32 from the stored weights
// and cached per pair of weight stacks, stale-safe as the packed weights are (gemm.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>

#include "cpu/fuser.h"

namespace c2c::cpu {

// V of fuser `f` of `w` as an fp32 [Ht, H] tensor (row-major), `w_head` being that fuser's
// W_head as fp32 [Ht, H]; or an undefined tensor when the call runs the W2h GEMM instead:
// C2C_CPU_HEAD_FOLD=0 (read on every call), or weights whose fold cannot be cached (inference
// tensors, which have no version counter) on a call of fewer than 2 Ht tokens (computing V
// costs Ht H^2 multiply-adds, the GEMM it replaces M H^2).
at::Tensor head_fold(const StackedWeights& w, int64_t f, const float* w_head, int64_t tokens);

// Whether C2C_CPU_HEAD_FOLD leaves the fold on (the default).
bool head_fold_enabled();

// The cache of folds: "entries=N bytes=B fusers=F" (F folded fusers over all entries);
// `clear` empties it.
std::string head_fold_info(bool clear);

}  // namespace c2c::cpu
