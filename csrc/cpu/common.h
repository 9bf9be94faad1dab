// Shared helpers of the CPU kernels: dtype mapping, byte-addressed cache views, slots, the
// list of valid (non-padding) tokens and per-thread scratch rows.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
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

// Rows of a [page, entry, head, dim] pool: pages * page_size, the valid slots are [0, rows).
inline int64_t pool_rows(const at::Tensor& v) {
  TORCH_CHECK(v.dim() == 4, "c2c cpu: expected a 4-D [page, entry, head, dim] cache view");
  int64_t rows = 0;
  TORCH_CHECK_VALUE(!__builtin_mul_overflow(v.size(0), v.size(1), &rows), "c2c cpu: a cache view of ", v.size(0),
                    " pages x ", v.size(1), " entries has more rows than int64 can count");
  return rows;
}

// A cache view addressed in bytes (strides scaled by the element size), so one code path
// serves every dtype; `row(slot, head)` points at head_dim elements of the view's dtype.
// Callers pass only slots in [0, pool_rows(v)) (valid_tokens checks them), so row() stays
// inside the view; an empty pool would divide by a page size of 0 there, hence the check.
inline CacheView<char> byte_view(const at::Tensor& v) {
  TORCH_CHECK(v.dim() == 4, "c2c cpu: expected a 4-D [page, entry, head, dim] cache view");
  TORCH_CHECK(v.size(3) <= 1 || v.stride(3) == 1, "c2c cpu: cache views need a unit head_dim stride");
  TORCH_CHECK_VALUE(v.size(0) > 0 && v.size(1) > 0, "c2c cpu: a cache view of ", v.size(0), " pages x ", v.size(1),
                    " entries (page size) has no rows to address");
  constexpr int64_t kMax32 = std::numeric_limits<int32_t>::max();
  TORCH_CHECK_VALUE(v.size(2) <= kMax32 && v.size(3) <= kMax32, "c2c cpu: ", v.size(2), " heads x ", v.size(3),
                    " dims is too large for a cache view");
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

// The tokens that are fused, in order: their index in the slot tensors and both slots
// (c2c_kernels/slots.py). Padding (receiver slot < 0) is dropped; its sharer slot is never read.
struct Tokens {
  std::vector<int64_t> index, receiver, sharer;
  int64_t size() const { return static_cast<int64_t>(index.size()); }
};

// The ValueError of an out-of-range slot, worded as c2c_kernels.status.slot_error().
[[noreturn]] inline void slot_error(bool receiver, int64_t index, int64_t value, int64_t limit) {
  TORCH_CHECK_VALUE(false, receiver ? "receiver_slots[" : "sharer_slots[", index, "] = ", value,
                    receiver ? "" : " for a non-padding token", " is out of range [0, ", limit, ") for the ",
                    receiver ? "receiver pool" : "sharer pool", " of ", limit, " rows");
  std::abort();  // not reached
}

// Walks the slots once, before anything is written: the first token (lowest index) with a
// receiver slot >= receiver_rows or, when `sharer_slots` is given, a sharer slot outside
// [0, sharer_rows) raises. This is what keeps every row() inside its view for any slot
// value. With `dedupe` (fuse, merge) only the last token of each receiver slot is kept, so
// a row is written once, by one thread, with the last token's result (last wins, as if the
// rows had been written in token order); project keeps every token.
inline Tokens valid_tokens(const at::Tensor& receiver_slots, int64_t receiver_rows, const at::Tensor* sharer_slots,
                           int64_t sharer_rows, bool dedupe) {
  Tokens out;
  const Slots rs(receiver_slots);
  const int64_t t = receiver_slots.size(0);
  TORCH_CHECK_VALUE(sharer_slots == nullptr || sharer_slots->size(0) == t, "c2c cpu: sharer_slots has ",
                    sharer_slots == nullptr ? 0 : sharer_slots->size(0), " slots, expected one per receiver slot (",
                    t, ")");
  const Slots ss = sharer_slots != nullptr ? Slots(*sharer_slots) : rs;
  out.index.reserve(t);
  out.receiver.reserve(t);
  if (sharer_slots != nullptr) out.sharer.reserve(t);
  for (int64_t i = 0; i < t; ++i) {
    const int64_t r = rs[i];
    if (r < 0) continue;
    if (r >= receiver_rows) slot_error(true, i, r, receiver_rows);
    if (sharer_slots != nullptr) {
      const int64_t s = ss[i];
      if (s < 0 || s >= sharer_rows) slot_error(false, i, s, sharer_rows);
      out.sharer.push_back(s);
    }
    out.index.push_back(i);
    out.receiver.push_back(r);
  }
  if (!dedupe || out.size() < 2) return out;
  // Token positions ordered by (slot, position): the last of each run of equal slots wins.
  const int64_t n = out.size();
  std::vector<int64_t> order(n);
  for (int64_t m = 0; m < n; ++m) order[m] = m;
  std::sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
    return out.receiver[a] != out.receiver[b] ? out.receiver[a] < out.receiver[b] : a < b;
  });
  std::vector<char> keep(n, 1);
  bool any_dropped = false;
  for (int64_t k = 0; k + 1 < n; ++k) {
    if (out.receiver[order[k]] == out.receiver[order[k + 1]]) keep[order[k]] = 0, any_dropped = true;
  }
  if (!any_dropped) return out;
  Tokens kept;
  for (int64_t m = 0; m < n; ++m) {
    if (!keep[m]) continue;
    kept.index.push_back(out.index[m]);
    kept.receiver.push_back(out.receiver[m]);
    if (!out.sharer.empty()) kept.sharer.push_back(out.sharer[m]);
  }
  return kept;
}

// C2C_POISON_WORKSPACES=1 (read once, like c2c_kernels.workspace): every workspace and
// scratch buffer is filled with NaN each time it is handed out, so a read of memory the
// kernels have not written in this call (by our code or by a library GEMM) turns the
// result into NaN on any machine instead of depending on what the allocator left there.
inline bool poisoning() {
  static const bool on = [] {
    const char* v = std::getenv("C2C_POISON_WORKSPACES");
    return v != nullptr && std::strcmp(v, "1") == 0;
  }();
  return on;
}

inline void poison(float* p, int64_t n) {
  if (poisoning()) std::fill(p, p + n, std::numeric_limits<float>::quiet_NaN());
}

// Per-thread fp32 scratch row `which` (0..3) of at least n elements.
inline float* scratch(int which, int64_t n) {
  thread_local std::vector<float> bufs[4];
  auto& b = bufs[which];
  if (static_cast<int64_t>(b.size()) < n) b.resize(n);
  poison(b.data(), n);
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
