// The fuser's Linears for every entry of a call: strided-batched GEMMs over runs of fusers.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

namespace c2c::cuda {

// `count` consecutive entries starting at `entry` whose fusers advance by a constant step
// (`fuser`, fuser + step, ...): their weights are one strided view of the stacked weights,
// so the run is one batched GEMM.
struct FuserRun {
  int64_t entry;
  int64_t fuser;
  int64_t step;
  int64_t count;
};

// Greedy split of the per-entry fuser indices into runs (one run for the usual 0..R-1).
std::vector<FuserRun> fuser_runs(const std::vector<int64_t>& fusers);

// out[e] = in[e] @ weight[fuser(e)]^T, or out[e] += ... when `accumulate`, for every entry e.
// in [R, T, K] and out [R, T, N] are dense; weight is [P, N, K] with any strides.
void batched_linear(const at::Tensor& out, const at::Tensor& in, const at::Tensor& weight,
                    const std::vector<FuserRun>& runs, bool accumulate);

}  // namespace c2c::cuda
