// One fuser (keys or values of one layer) over the valid tokens of a call: gather, the FFN
// stack around the GEMMs, and either the gated merge into the receiver cache (fuse) or the
// fp32 corrections (project).
#pragma once

#include <ATen/ATen.h>

#include <vector>

#include "cpu/common.h"
#include "cpu/gemm.h"

namespace c2c::cpu {

// The stacked weight tensors of c2c_kernels.FuserWeights (in the order of fuser_weights.h),
// checked once per call.
struct StackedWeights {
  std::vector<at::Tensor> t;
  int64_t fusers, hidden, intermediate, blocks, sharer_width, receiver_width, receiver_heads;
  c10::ScalarType dtype;

  explicit StackedWeights(const std::vector<at::Tensor>& weights);
  bool gate_open(int64_t fuser) const;
  // First element of stack i for `fuser` (and FFN `block` for the [P, B, ...] stacks).
  const char* at(size_t i, int64_t fuser, int64_t block = 0) const;
};

// Where a fuser's result goes.
struct Sink {
  // fuse: x += G * sigmoid(a) * y into this receiver view (rows at tokens.receiver).
  const at::Tensor* receiver = nullptr;
  // project: rows tokens.index[m] of projection [T, Kt] and head_scale [T, Ht] (fp32).
  float* projection = nullptr;
  float* head_scale = nullptr;
};

// Runs fuser `fuser` of `w` on the valid tokens, reading `receiver` (for x) and `sharer`.
// Reuses `workspace` (grown as needed) across calls.
void run_fuser(const StackedWeights& w, int64_t fuser, Engine engine, const at::Tensor& receiver,
               const at::Tensor& sharer, const Tokens& tokens, const Sink& sink, std::vector<at::Tensor>& workspace);

}  // namespace c2c::cpu
