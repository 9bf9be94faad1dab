// Host-side CUDA runtime pieces of the backend (the current stream, the device guard, the
// launch check, the device type tensors must live on), or their CPU emulator versions.
#pragma once

#include <ATen/ATen.h>

#include "cuda/device_types.h"

#if defined(C2C_CUDA_EMULATOR)

namespace c2c::cuda {
constexpr at::DeviceType kKernelDevice = at::kCPU;
inline cudaStream_t current_stream() { return nullptr; }
struct DeviceGuard {
  explicit DeviceGuard(const at::Device&) {}
};
}  // namespace c2c::cuda
// The emulator raises a launch's errors when the launch returns.
#define C2C_KERNEL_LAUNCH_CHECK() ((void)0)

#else

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

namespace c2c::cuda {
constexpr at::DeviceType kKernelDevice = at::kCUDA;
inline cudaStream_t current_stream() { return at::cuda::getCurrentCUDAStream(); }
using DeviceGuard = c10::cuda::CUDAGuard;
}  // namespace c2c::cuda
#define C2C_KERNEL_LAUNCH_CHECK() C10_CUDA_KERNEL_LAUNCH_CHECK()

#endif
