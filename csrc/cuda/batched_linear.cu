// Why ATen's bmm/baddbmm and not a hand-written or directly-called GEMM:
//  - every fuser of a stage has the same shapes and the weights are stacked, so a run of
//    fusers is one strided view and the whole stage is one strided-batched GEMM; a grouped
//    GEMM (cuBLASLt grouped, CUTLASS grouped) only pays off when shapes differ per group;
//  - at::bmm_out lowers to cuBLAS(Lt) strided-batched GEMMs (fp32 accumulation, tensor cores
//    for fp16/bf16, the user's TF32 setting for fp32) on torch's handle bound to the current
//    stream, with torch's graph-safe workspace: capturable, and no cuBLAS link of our own;
//  - the residual add is the GEMM's own beta = 1 (accumulate into the residual stream); the
//    other epilogues cuBLASLt could fuse do not match the fuser (its GELU is the tanh
//    approximation, 4.7e-4 from the exact one; it has no RMSNorm), so those are row kernels
//    in gather_norm.cu instead (docs/cuda.md counts what that costs).
#include "cuda/batched_linear.h"

#include <c10/util/Exception.h>

namespace c2c::cuda {

std::vector<FuserRun> fuser_runs(const std::vector<int64_t>& fusers) {
  std::vector<FuserRun> runs;
  const int64_t entries = static_cast<int64_t>(fusers.size());
  for (int64_t e = 0; e < entries;) {
    FuserRun run{e, fusers[e], 1, 1};
    if (e + 1 < entries && fusers[e + 1] > fusers[e]) {
      run.step = fusers[e + 1] - fusers[e];
      while (e + run.count < entries && fusers[e + run.count] - fusers[e + run.count - 1] == run.step) ++run.count;
    }
    runs.push_back(run);
    e += run.count;
  }
  return runs;
}

void batched_linear(const at::Tensor& out, const at::Tensor& in, const at::Tensor& weight,
                    const std::vector<FuserRun>& runs, bool accumulate) {
  TORCH_CHECK(weight.dim() == 3 && in.dim() == 3 && out.dim() == 3 && weight.size(2) == in.size(2) &&
                  weight.size(1) == out.size(2),
              "c2c: batched_linear shape mismatch: out ", out.sizes(), ", in ", in.sizes(), ", weight ",
              weight.sizes());
  for (const FuserRun& run : runs) {
    const int64_t last = run.fuser + (run.count - 1) * run.step;
    // [count, N, K] -> [count, K, N]: a transposed operand, which cuBLAS reads without a copy.
    const at::Tensor w = weight.slice(0, run.fuser, last + 1, run.step).transpose(1, 2);
    const at::Tensor x = in.narrow(0, run.entry, run.count);
    at::Tensor y = out.narrow(0, run.entry, run.count);
    if (accumulate) {
      at::baddbmm_out(y, y, x, w);
    } else {
      at::bmm_out(y, x, w);
    }
  }
}

}  // namespace c2c::cuda
