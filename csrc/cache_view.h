// Addressing of one KV-cache view, shared by the CPU and CUDA kernels.
//
// Every engine layout reaches a 4-D strided view [page, entry, head, dim] without a copy
// (see c2c_kernels/layouts.py). A slot s names page s / page_size, entry s % page_size.
// Only the dim stride is assumed to be 1; the other three are taken as given, so HND pages,
// interleaved K/V storage and permuted HF tensors are all read and written in place.
//
// row() divides by page_size: host code that builds a view takes the page size through
// addressing_page_size(), so a pool with page size 0 (it has no rows: every slot is out of
// range and skipped or rejected before row() is reached) can never divide by zero.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define C2C_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define C2C_HOST_DEVICE inline
#endif

namespace c2c {

// The page size a view addresses with: the pool's, or 1 for an empty pool of page size 0.
C2C_HOST_DEVICE int64_t addressing_page_size(int64_t page_size) { return page_size > 0 ? page_size : 1; }

template <typename T>
struct CacheView {
  T* base;
  int64_t page_stride;
  int64_t entry_stride;
  int64_t head_stride;
  int64_t page_size;
  int32_t heads;
  int32_t head_dim;

  // First element of head `head` of the row at `slot` (slot must be non-negative).
  C2C_HOST_DEVICE T* row(int64_t slot, int32_t head) const {
    const int64_t page = slot / page_size;
    const int64_t entry = slot - page * page_size;
    return base + page * page_stride + entry * entry_stride + head * head_stride;
  }
};

}  // namespace c2c
