// Host-side CUDA runtime pieces of the backend (the current stream, the device guard, the
// launch check, the device type tensors must live on), or their CPU emulator versions.
#pragma once

#include <ATen/ATen.h>

#include "cuda/device_types.h"

#if defined(C2C_CUDA_EMULATOR)

namespace c2c::cuda {
constexpr at::DeviceType kKernelDevice = at::kCPU;
inline cudaStream_t current_stream() { return nullptr; }
// Tests stand in for a CUDA-graph capture (set_emulated_capture in python/cuda_emulator.cpp),
// so the host code's capture paths run on the CPU too.
inline bool& emulated_capture() {
  static bool on = false;
  return on;
}
inline bool stream_capturing(cudaStream_t) { return emulated_capture(); }
inline int64_t device_memory_bytes() { return 0; }  // unknown: the host code's default applies
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
// Whether launches on `stream` are being captured into a CUDA graph (a query legal during capture).
inline bool stream_capturing(cudaStream_t stream) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &status));
  return status != cudaStreamCaptureStatusNone;
}
// The current device's memory (cached device properties: no driver call, legal during capture).
inline int64_t device_memory_bytes() {
  return static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->totalGlobalMem);
}
using DeviceGuard = c10::cuda::CUDAGuard;
}  // namespace c2c::cuda
#define C2C_KERNEL_LAUNCH_CHECK() C10_CUDA_KERNEL_LAUNCH_CHECK()

#endif
