// Builds a CacheView from a torch tensor (host side only).
#pragma once

#include <torch/types.h>

#include "cache_view.h"

namespace c2c {

template <typename T>
CacheView<T> make_view(const at::Tensor& view) {
  TORCH_CHECK(view.dim() == 4, "c2c: expected a 4-D [page, entry, head, dim] cache view");
  TORCH_CHECK(view.size(3) <= 1 || view.stride(3) == 1, "c2c: cache views need a unit head_dim stride");
  return CacheView<T>{view.data_ptr<T>(), view.stride(0), view.stride(1), view.stride(2),
                      view.size(1), static_cast<int32_t>(view.size(2)), static_cast<int32_t>(view.size(3))};
}

}  // namespace c2c
