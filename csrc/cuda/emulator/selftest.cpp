// Kernels that test the CPU emulator itself (tests/test_cuda_emulator.py): a block-wide
// reduction through shared memory, barriers and shuffles, atomics, and one kernel per fault the
// emulator must report instead of running on silently.
#include <c10/util/Exception.h>

#include <string>
#include <vector>

#include "cuda/common.cuh"

namespace c2c::cuda::emulator {
namespace {

// out[block] = sum of in[block * blockDim.x + thread], reduced like gather_norm.cu's rows.
__global__ void block_sum_kernel(const float* in, float* out) {
  __shared__ float warp_sums[32];
  float value = in[blockIdx.x * blockDim.x + threadIdx.x];
  for (int offset = 16; offset > 0; offset /= 2) value += __shfl_xor_sync(0xffffffffu, value, offset);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) warp_sums[warp] = value;
  __syncthreads();
  value = lane < static_cast<int>((blockDim.x + 31) / 32) ? warp_sums[lane] : 0.f;
  for (int offset = 16; offset > 0; offset /= 2) value += __shfl_xor_sync(0xffffffffu, value, offset);
  if (threadIdx.x == 0) out[blockIdx.x] = value;
}

// Every thread tries to set *flag from 0 to 1 (one may win), counts its win with a
// compare-and-swap loop, and lowers *lowest to a value only the grid's last thread holds.
__global__ void atomics_kernel(unsigned long long* flag, int* wins, int* lowest) {
  const int index = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  if (atomicCAS(flag, 0ull, 1ull) == 0ull) {
    int seen = *wins, before;
    while ((before = atomicCAS(wins, seen, seen + 1)) != seen) seen = before;
  }
  atomicMin(lowest, static_cast<int>(gridDim.x * blockDim.x) - 1 - index);
}

__global__ void misaligned_kernel(const float* data) {
  float v[4];
  load_vector<4>(data + 1, v);  // 4 bytes past a 16-byte boundary
}

__global__ void late_barrier_kernel() {
  if (blockIdx.x > 0) __syncthreads();  // the first block meets no barrier
}

__global__ void exited_lane_kernel() {
  if (threadIdx.x == 1) return;
  __shfl_xor_sync(0xffffffffu, 1.f, 1);
}

__global__ void throwing_kernel() {
  if (threadIdx.x == 3) TORCH_CHECK(false, "thread 3 failed");
}

__global__ void idle_kernel() {}

}  // namespace

// Runs one self-test; returns the block sums for "block_sum", [flag, wins, lowest] for "atomics",
// raises the emulator's error else.
std::vector<float> selftest(const std::string& name, int64_t blocks, int64_t threads) {
  const dim3 grid(static_cast<unsigned>(blocks)), block(static_cast<unsigned>(threads));
  std::vector<float> out(blocks > 0 ? blocks : 0, 0.f);
  if (name == "block_sum") {
    std::vector<float> in(blocks * threads);
    for (size_t i = 0; i < in.size(); ++i) in[i] = static_cast<float>(i % 7) - 2.f;
    C2C_LAUNCH(grid, block, nullptr, block_sum_kernel)(in.data(), out.data());
  } else if (name == "atomics") {
    unsigned long long flag = 0;
    int wins = 0, lowest = 1 << 30;
    C2C_LAUNCH(grid, block, nullptr, atomics_kernel)(&flag, &wins, &lowest);
    out = {static_cast<float>(flag), static_cast<float>(wins), static_cast<float>(lowest)};
  } else if (name == "misaligned") {
    alignas(16) float data[8] = {};
    C2C_LAUNCH(grid, block, nullptr, misaligned_kernel)(static_cast<const float*>(data));
  } else if (name == "late_barrier") {
    C2C_LAUNCH(grid, block, nullptr, late_barrier_kernel)();
  } else if (name == "exited_lane") {
    C2C_LAUNCH(grid, block, nullptr, exited_lane_kernel)();
  } else if (name == "throwing") {
    C2C_LAUNCH(grid, block, nullptr, throwing_kernel)();
  } else if (name == "launch") {
    C2C_LAUNCH(grid, block, nullptr, idle_kernel)();
  } else {
    TORCH_CHECK(false, "unknown self-test ", name);
  }
  return out;
}

}  // namespace c2c::cuda::emulator
