// Per-stage wall times of the CPU backend, for benchmarks (torch.ops.c2c_native.cpu_stage_times).
// Off by default: a stage scope then costs one relaxed atomic load. Times are wall seconds of
// the calling thread, summed over calls and over the entries (K and V fusers) of a call; the
// stages marked "thread-seconds" are summed over the threads that ran them inside a GEMM stage.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <string>

namespace c2c::cpu::prof {

enum Stage : int {
  Gather,        // slots -> dense s, x rows
  Params,        // small parameters widened to fp32
  GemmInput,     // input Linear (sharer and receiver parts)
  GemmUp,        // FFN W1 and head W1 GEMMs, GELU epilogue included
  GemmDown,      // FFN W2 and head W2 GEMMs
  GemmOutput,    // output Linear
  Norms,         // row passes: bias, residual adds, RMS norms, 16-bit conversions
  HeadLogits,    // weight branch row pass: w = u + FFN_w, logits, sigmoid
  Merge,         // output row pass: bias, gated add, store to the cache (or the corrections)
  Gelu,          // thread-seconds: GELU epilogues (inside GemmUp)
  Widen,         // thread-seconds: 16-bit weights widened to fp32 (inside the GEMM stages)
  ZeroC,         // 16-bit GEMM outputs zeroed before the GEMM (inside the GEMM stages)
  kStages,
};

extern std::atomic<bool> enabled;

void add(Stage s, double seconds);
// Counts one fuse/project call (the stage times are divided by it).
void count_call();
// The times accumulated since the last call, as "calls=N stage=seconds ...", then resets them;
// `enable` turns collection on or off from now on.
std::string take(bool enable);

class Scope {
 public:
  explicit Scope(Stage s) : s_(s), on_(enabled.load(std::memory_order_relaxed)) {
    if (on_) t0_ = std::chrono::steady_clock::now();
  }
  ~Scope() { stop(); }
  // Ends the stage before the end of the scope.
  void stop() {
    if (on_) add(s_, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0_).count());
    on_ = false;
  }
  Scope(const Scope&) = delete;
  Scope& operator=(const Scope&) = delete;

 private:
  Stage s_;
  bool on_;
  std::chrono::steady_clock::time_point t0_{};
};

}  // namespace c2c::cpu::prof
