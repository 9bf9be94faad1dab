// Switching between fibers of the CPU emulator: a saved stack pointer and a few lines of
// assembly on x86-64 Linux (no system call per switch: glibc's swapcontext makes one to save
// the signal mask, which dominated the emulator's time), ucontext elsewhere.
#pragma once

#include <cstddef>
#include <cstdint>

#if defined(__x86_64__) && defined(__linux__)

// c2c_emulator_switch(&from, to): saves the callee-saved registers, MXCSR and the x87
// control word on the current stack, stores the stack pointer in *from, then loads `to` and
// restores the same from there.
extern "C" void c2c_emulator_switch(void** from, void* to);

namespace c2c::cuda::emulator {

struct FiberContext {
  void* sp = nullptr;
};

// Prepares `context` to start entry() (which must never return) on the given stack.
inline void start_context(FiberContext& context, void* stack, size_t size, void (*entry)()) {
  uint32_t mxcsr;
  uint16_t fpcw;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpcw));
  uintptr_t top = (reinterpret_cast<uintptr_t>(stack) + size) & ~uintptr_t{15};
  void** sp = reinterpret_cast<void**>(top);
  *--sp = nullptr;                           // entry's return address: entry never returns
  *--sp = reinterpret_cast<void*>(entry);    // where the switch's `ret` lands (rsp % 16 == 8 there)
  for (int i = 0; i < 6; ++i) *--sp = nullptr;  // rbp, rbx, r12-r15
  --sp;
  *reinterpret_cast<uint64_t*>(sp) = mxcsr | (uint64_t{fpcw} << 32);
  context.sp = sp;
}

inline void switch_context(FiberContext& from, FiberContext& to) { c2c_emulator_switch(&from.sp, to.sp); }

}  // namespace c2c::cuda::emulator

#else

#include <ucontext.h>

namespace c2c::cuda::emulator {

struct FiberContext {
  ucontext_t context;
};

inline void start_context(FiberContext& context, void* stack, size_t size, void (*entry)()) {
  getcontext(&context.context);
  context.context.uc_stack.ss_sp = stack;
  context.context.uc_stack.ss_size = size;
  context.context.uc_link = nullptr;
  makecontext(&context.context, entry, 0);
}

inline void switch_context(FiberContext& from, FiberContext& to) { swapcontext(&from.context, &to.context); }

}  // namespace c2c::cuda::emulator

#endif
