// Device helpers of the CUDA kernels: fp32 conversions of the cache dtypes, 16-byte vector
// loads and stores, slot reads and row addressing through a CacheView.
#pragma once

#include <cstdint>

#include "cache_view.h"
#include "cuda/device_types.h"
#include "cuda/params.h"

namespace c2c::cuda {

// torch builds with __CUDA_NO_HALF_CONVERSIONS__ and friends, so convert explicitly.
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// N consecutive elements at a 16-byte aligned address, as fp32 (N * sizeof(T) is a multiple of 16).
template <int N, typename T>
__device__ __forceinline__ void load_vector(const T* src, float (&out)[N]) {
  constexpr int kPerWord = 16 / sizeof(T);
  static_assert(N % kPerWord == 0, "whole 16-byte words only");
#pragma unroll
  for (int w = 0; w < N / kPerWord; ++w) {
    C2C_CHECK_ALIGNED16(src + w * kPerWord);
    alignas(16) T elems[kPerWord];
    *reinterpret_cast<uint4*>(elems) = reinterpret_cast<const uint4*>(src)[w];
#pragma unroll
    for (int k = 0; k < kPerWord; ++k) out[w * kPerWord + k] = to_float(elems[k]);
  }
}

template <int N, typename T>
__device__ __forceinline__ void store_vector(T* dst, const float (&in)[N]) {
  constexpr int kPerWord = 16 / sizeof(T);
  static_assert(N % kPerWord == 0, "whole 16-byte words only");
#pragma unroll
  for (int w = 0; w < N / kPerWord; ++w) {
    alignas(16) T elems[kPerWord];
#pragma unroll
    for (int k = 0; k < kPerWord; ++k) elems[k] = from_float<T>(in[w * kPerWord + k]);
    C2C_CHECK_ALIGNED16(dst + w * kPerWord);
    reinterpret_cast<uint4*>(dst)[w] = *reinterpret_cast<const uint4*>(elems);
  }
}

__device__ __forceinline__ int64_t load_slot(const SlotList& slots, int64_t token) {
  const int64_t offset = token * slots.stride;
  return slots.is_int64 ? static_cast<const int64_t*>(slots.data)[offset]
                        : static_cast<const int32_t*>(slots.data)[offset];
}

// First element of head `head` of the row at a non-negative `slot`. Same addressing as
// CacheView::row, with a 32-bit division when the slot fits (real pools hold < 2^31 slots):
// a 64-bit division costs several times more instructions per thread.
template <typename T>
__device__ __forceinline__ T* slot_row(const CacheView<T>& view, int64_t slot, int32_t head) {
  if (slot <= INT32_MAX && view.page_size <= INT32_MAX) {
    const uint32_t page = static_cast<uint32_t>(slot) / static_cast<uint32_t>(view.page_size);
    const int64_t entry = slot - static_cast<int64_t>(page) * view.page_size;
    return view.base + page * view.page_stride + entry * view.entry_stride + head * view.head_stride;
  }
  return view.row(slot, head);
}

// One thread's piece of a launch over tokens x heads x ceil(head_dim / V) chunks of V elements
// (blockIdx.x, threadIdx.x flat; the host keeps the count below 2^31).
struct RowChunk {
  int32_t token;
  int32_t head;
  int32_t chunk;
};

// This thread's chunk; false for the threads past the end of the last block.
template <int V>
__device__ __forceinline__ bool this_thread_chunk(int32_t tokens, int32_t heads, int32_t head_dim, RowChunk& out) {
  const uint32_t chunks = (head_dim + V - 1) / V;
  const uint32_t index = blockIdx.x * blockDim.x + threadIdx.x;
  const uint32_t per_token = heads * chunks;
  if (index >= static_cast<uint32_t>(tokens) * per_token) return false;
  const uint32_t token = index / per_token;
  const uint32_t rest = index - token * per_token;
  const uint32_t head = rest / chunks;
  out = {static_cast<int32_t>(token), static_cast<int32_t>(head), static_cast<int32_t>(rest - head * chunks)};
  return true;
}

}  // namespace c2c::cuda
