// A CPU emulator for the CUDA kernels of csrc/cuda, so that their exact sources run in tests
// on machines without a GPU. Compiled only with C2C_CUDA_EMULATOR (see
// c2c_kernels/backends/cuda_emulator.py); the real build never includes this file.
//
// A launch runs its blocks one after another; inside a block every CUDA thread is a fiber
// (its own stack, switched on one OS thread by fiber_context.h: a few lines of assembly on
// x86-64 Linux, ucontext elsewhere). __syncthreads parks the calling
// fiber until every live thread of the block has arrived, which is what the warp-shuffle
// reductions need as well. Exited threads do not hold a barrier up, as on the hardware.
//
// The CUDA subset it supports, and its contract, are in csrc/cuda/emulator/README.md.
//
// What it checks that a GPU would otherwise report as a fault: launch configurations (block
// size, grid limits), 16-byte alignment of vector accesses, shuffles with lanes that exited.
// Errors are raised as c10::Error when the launch returns, naming the kernel's first fault.
// What it cannot see: races between blocks (they run in order), timing, register limits,
// and the exact rounding of device math functions.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>

// CUDA qualifiers: plain (inline) host functions here.
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __grid_constant__
#define __launch_bounds__(...)
// One block runs at a time per OS thread, so a block's shared memory can be a static.
#define __shared__ static thread_local

using cudaStream_t = void*;

struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }

// The 16-bit types with the toolkit's round-to-nearest-even conversions.
using __half = c10::Half;
using __nv_bfloat16 = c10::BFloat16;
inline float __half2float(__half v) { return static_cast<float>(v); }
inline __half __float2half_rn(float v) { return __half(v); }
inline float __bfloat162float(__nv_bfloat16 v) { return static_cast<float>(v); }
inline __nv_bfloat16 __float2bfloat16_rn(float v) { return __nv_bfloat16(v); }

namespace c2c::cuda {

// The built-in variables of the running fiber, set by the scheduler before it resumes one.
extern thread_local uint3 blockIdx;
extern thread_local uint3 threadIdx;
extern thread_local dim3 blockDim;
extern thread_local dim3 gridDim;

void __syncthreads();
float __shfl_xor_sync(unsigned mask, float value, int lane_mask);

// Atomics: real read-modify-write instructions on the given address (global or __shared__
// memory alike), so they stay atomic even if two launches ran on different OS threads. They
// return the old value, as CUDA's do. Only the overloads csrc/cuda uses exist.
template <typename T>
inline T emulator_atomic_cas(T* address, T compare, T value) {
  __atomic_compare_exchange_n(address, &compare, value, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
  return compare;  // on failure the builtin stored the value it found there
}
inline int atomicCAS(int* address, int compare, int value) { return emulator_atomic_cas(address, compare, value); }
inline unsigned atomicCAS(unsigned* address, unsigned compare, unsigned value) {
  return emulator_atomic_cas(address, compare, value);
}
inline unsigned long long atomicCAS(unsigned long long* address, unsigned long long compare,
                                    unsigned long long value) {
  return emulator_atomic_cas(address, compare, value);
}
inline int atomicMin(int* address, int value) {
  int old = __atomic_load_n(address, __ATOMIC_SEQ_CST);
  while (value < old &&
         !__atomic_compare_exchange_n(address, &old, value, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {
  }
  return old;
}

using std::min;
inline float rsqrtf(float x) { return 1.f / std::sqrt(x); }

namespace emulator {

// Runs body() once per thread of every block of the grid; throws c10::Error with the first
// fault (also a bad configuration) once the grid is done.
void run_grid(const char* kernel, dim3 grid, dim3 block, const std::function<void()>& body);

// Records a fault of the running thread (the first one of a launch is reported).
void fault(const char* what, const char* file, int line);

// Thrown to stop a thread at a fault it must not run past (the access would be undefined
// here too); the scheduler records it like any other fault.
struct ThreadFault {};

inline void check_aligned16(const void* pointer, const char* file, int line) {
  if (reinterpret_cast<uintptr_t>(pointer) % 16 != 0) {
    fault("misaligned 16-byte access", file, line);
    throw ThreadFault{};
  }
}

template <typename... Params>
struct Launch {
  const char* name;
  dim3 grid, block;
  void (*kernel)(Params...);

  template <typename... Args>
  void operator()(const Args&... args) const {
    run_grid(name, grid, block, [&] { kernel(args...); });
  }
};

template <typename... Params>
Launch<Params...> launch(const char* name, dim3 grid, dim3 block, void (*kernel)(Params...)) {
  return Launch<Params...>{name, grid, block, kernel};
}

}  // namespace emulator
}  // namespace c2c::cuda

#define C2C_LAUNCH(grid, block, stream, ...) ::c2c::cuda::emulator::launch(#__VA_ARGS__, grid, block, &__VA_ARGS__)
#define C2C_CHECK_ALIGNED16(pointer) ::c2c::cuda::emulator::check_aligned16(pointer, __FILE__, __LINE__)
