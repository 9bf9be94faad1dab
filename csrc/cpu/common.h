// Shared helpers of the CPU kernels: dtype mapping, byte-addressed cache views, slots, the
// list of valid (non-padding) tokens and per-thread scratch rows.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <vector>

#include "cache_view.h"
#include "cpu/vec.h"

namespace c2c::cpu {

inline Dt dt_of(c10::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return Dt::F32;
    case at::kBFloat16:
      return Dt::BF16;
    case at::kHalf:
      return Dt::F16;
    default:
      TORCH_CHECK(false, "c2c cpu: unsupported dtype ", t, " (expected float32, float16 or bfloat16)");
  }
}

// A cache view addressed in bytes (strides scaled by the element size), so one code path
// serves every dtype; `row(slot, head)` points at head_dim elements of the view's dtype.
inline CacheView<char> byte_view(const at::Tensor& v) {
  TORCH_CHECK(v.dim() == 4, "c2c cpu: expected a 4-D [page, entry, head, dim] cache view");
  TORCH_CHECK(v.size(3) <= 1 || v.stride(3) == 1, "c2c cpu: cache views need a unit head_dim stride");
  const int64_t es = v.element_size();
  return CacheView<char>{static_cast<char*>(v.data_ptr()), v.stride(0) * es, v.stride(1) * es, v.stride(2) * es,
                         v.size(1), static_cast<int32_t>(v.size(2)), static_cast<int32_t>(v.size(3))};
}

// Reads slot t of an int32 or int64 1-D tensor (any stride).
struct Slots {
  const char* p;
  int64_t stride_bytes;
  bool wide;

  explicit Slots(const at::Tensor& s) {
    TORCH_CHECK(s.dim() == 1, "c2c cpu: slots must be 1-D");
    TORCH_CHECK(s.scalar_type() == at::kInt || s.scalar_type() == at::kLong, "c2c cpu: slots must be int32 or int64");
    wide = s.scalar_type() == at::kLong;
    p = static_cast<const char*>(s.data_ptr());
    stride_bytes = s.stride(0) * s.element_size();
  }
  int64_t operator[](int64_t t) const {
    const char* q = p + t * stride_bytes;
    return wide ? *reinterpret_cast<const int64_t*>(q) : *reinterpret_cast<const int32_t*>(q);
  }
};

// The tokens that are fused (receiver slot >= 0), in order: their index in the slot tensors
// and both slots. Sharer slots of padding tokens are never read.
struct Tokens {
  std::vector<int64_t> index, receiver, sharer;
  int64_t size() const { return static_cast<int64_t>(index.size()); }
};

inline Tokens valid_tokens(const at::Tensor& receiver_slots, const at::Tensor* sharer_slots) {
  Tokens out;
  const Slots rs(receiver_slots);
  const int64_t t = receiver_slots.size(0);
  out.index.reserve(t);
  out.receiver.reserve(t);
  for (int64_t i = 0; i < t; ++i) {
    const int64_t r = rs[i];
    if (r < 0) continue;
    out.index.push_back(i);
    out.receiver.push_back(r);
  }
  if (sharer_slots != nullptr) {
    TORCH_CHECK(sharer_slots->size(0) == t, "c2c cpu: sharer_slots and receiver_slots differ in length");
    const Slots ss(*sharer_slots);
    out.sharer.reserve(out.index.size());
    for (int64_t i : out.index) out.sharer.push_back(ss[i]);
  }
  return out;
}

// Per-thread fp32 scratch row `which` (0..3) of at least n elements.
inline float* scratch(int which, int64_t n) {
  thread_local std::vector<float> bufs[4];
  auto& b = bufs[which];
  if (static_cast<int64_t>(b.size()) < n) b.resize(n);
  return b.data();
}

// Rows per task of the row-parallel passes (small enough to split 64 tokens over threads).
constexpr int64_t kRowGrain = 8;

// Runs fn(task) for every task in [0, tasks) on the intra-op threads, handing tasks out one
// at a time (a thread that falls behind, e.g. preempted on a busy machine, takes fewer).
template <typename F>
void parallel_tasks(int64_t tasks, const F& fn) {
  if (tasks <= 0) return;
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), tasks);
  if (threads <= 1 || at::in_parallel_region()) {
    for (int64_t i = 0; i < tasks; ++i) fn(i);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (int64_t i = next.fetch_add(1, std::memory_order_relaxed); i < tasks;
         i = next.fetch_add(1, std::memory_order_relaxed)) {
      fn(i);
    }
  });
}

// fn(row) for rows [0, m), in tasks of kRowGrain rows.
template <typename F>
void for_rows(int64_t m, const F& fn) {
  parallel_tasks((m + kRowGrain - 1) / kRowGrain, [&](int64_t task) {
    const int64_t end = std::min(m, (task + 1) * kRowGrain);
    for (int64_t i = task * kRowGrain; i < end; ++i) fn(i);
  });
}

}  // namespace c2c::cpu
