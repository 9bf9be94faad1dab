// Per-stage time counters (see profile.h).
#include "cpu/profile.h"

#include <mutex>
#include <sstream>

namespace c2c::cpu::prof {
namespace {

const char* const kNames[kStages] = {"gather",      "params", "gemm_input", "gemm_up", "gemm_down", "gemm_output",
                                     "norms",       "head_logits", "merge", "gelu_thread_s", "widen_thread_s",
                                     "zero_c"};
std::mutex mu;
double totals[kStages] = {};
int64_t calls = 0;

}  // namespace

std::atomic<bool> enabled{false};

void add(Stage s, double seconds) {
  std::lock_guard<std::mutex> lock(mu);
  totals[s] += seconds;
}

void count_call() {
  if (!enabled.load(std::memory_order_relaxed)) return;
  std::lock_guard<std::mutex> lock(mu);
  ++calls;
}

std::string take(bool enable) {
  std::ostringstream out;
  std::lock_guard<std::mutex> lock(mu);
  out << "calls=" << calls;
  for (int i = 0; i < kStages; ++i) {
    out << " " << kNames[i] << "=" << totals[i];
    totals[i] = 0;
  }
  calls = 0;
  enabled.store(enable, std::memory_order_relaxed);
  return out.str();
}

}  // namespace c2c::cpu::prof
