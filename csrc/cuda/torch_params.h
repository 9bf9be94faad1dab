// Host side: torch tensors -> the kernel parameter blocks of params.h, and the checks that
// memory safety needs (the op layer in c2c_kernels/ops.py validated everything else).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <utility>

#include "cache_view.h"
#include "cuda/device_types.h"
#include "cuda/params.h"

namespace c2c::cuda {

template <typename T>
struct TypeTag {
  using type = T;
};

// Calls fn(TypeTag<T>{}) with the CUDA element type of a cache dtype.
template <typename F>
decltype(auto) dispatch_cache_dtype(at::ScalarType dtype, const char* what, F&& fn) {
  switch (dtype) {
    case at::kFloat:
      return fn(TypeTag<float>{});
    case at::kHalf:
      return fn(TypeTag<__half>{});
    case at::kBFloat16:
      return fn(TypeTag<__nv_bfloat16>{});
    default:
      TORCH_CHECK(false, what, ": dtype ", dtype, " is not supported (float32, float16 or bfloat16)");
  }
}

inline bool aligned16(const void* pointer) { return reinterpret_cast<uintptr_t>(pointer) % 16 == 0; }

// Slot i of the result is slots[first + i].
inline SlotList slot_list(const at::Tensor& slots, int64_t first) {
  const bool is_int64 = slots.scalar_type() == at::kLong;
  const char* base = static_cast<const char*>(slots.data_ptr()) + first * slots.stride(0) * slots.element_size();
  return SlotList{base, slots.stride(0), is_int64};
}

template <typename T>
CacheView<T> cache_view(const at::Tensor& view) {
  return CacheView<T>{static_cast<T*>(view.data_ptr()), view.stride(0), view.stride(1), view.stride(2),
                      addressing_page_size(view.size(1)), static_cast<int32_t>(view.size(2)),
                      static_cast<int32_t>(view.size(3))};
}

// Rows of a [page, entry, head, dim] pool: the valid slots are [0, rows). The kernels skip
// every other slot, so an empty pool (0 pages or page size 0) is never addressed.
inline int64_t pool_rows(const at::Tensor& view) { return view.size(0) * view.size(1); }

// 16-byte accesses to head rows of this view are aligned: whole vectors per head and every
// stride that can move the address (its dimension is longer than 1) a multiple of a vector.
template <typename T>
bool vectorizable(const at::Tensor& view) {
  constexpr int64_t V = vector_width<T>();
  if (view.size(3) % V != 0 || !aligned16(view.data_ptr())) return false;
  for (int d = 0; d < 3; ++d) {
    if (view.size(d) > 1 && view.stride(d) % V != 0) return false;
  }
  return true;
}

// A 1-D or 2-D tensor whose last dimension the kernels walk with unit stride.
inline at::Tensor unit_inner_stride(const at::Tensor& t) {
  return t.dim() == 0 || t.size(-1) <= 1 || t.stride(-1) == 1 ? t : t.contiguous();
}

inline void check_cache_view(const at::Tensor& view, const char* name, int64_t index, at::ScalarType dtype,
                             const at::Device& device) {
  TORCH_CHECK(view.dim() == 4, name, "[", index, "]: expected a 4-D [page, entry, head, dim] view, got ",
              view.sizes());
  TORCH_CHECK(view.scalar_type() == dtype, name, "[", index, "]: dtype ", view.scalar_type(), ", expected ", dtype);
  TORCH_CHECK(view.device() == device, name, "[", index, "]: on ", view.device(), ", expected ", device);
  TORCH_CHECK(view.size(3) <= 1 || view.stride(3) == 1, name, "[", index,
              "]: the head_dim stride must be 1, got ", view.stride(3));
  TORCH_CHECK(view.size(1) <= INT32_MAX && view.size(2) <= INT32_MAX && view.size(3) <= INT32_MAX, name, "[", index,
              "]: page size, heads and head_dim must each be below 2^31");
}

inline void check_slots(const at::Tensor& slots, const char* name, const at::Device& device) {
  TORCH_CHECK(slots.dim() == 1, name, ": expected a 1-D tensor of slots, got ", slots.sizes());
  TORCH_CHECK(slots.scalar_type() == at::kInt || slots.scalar_type() == at::kLong, name, ": dtype ",
              slots.scalar_type(), ", expected int32 or int64");
  TORCH_CHECK(slots.device() == device, name, ": on ", slots.device(), ", expected ", device);
}

// Calls fn(begin, count) for consecutive groups of at most `limit` entries.
template <typename F>
void for_each_entry_group(int64_t entries, int64_t limit, F&& fn) {
  for (int64_t begin = 0; begin < entries; begin += limit) fn(begin, std::min(limit, entries - begin));
}

}  // namespace c2c::cuda
