// The fiber scheduler of the CPU emulator (see emulator.h).
#include "cuda/emulator/emulator.h"

#include <c10/util/Exception.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include "cuda/emulator/fiber_context.h"

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#endif

#if defined(__x86_64__) && defined(__linux__)
// See fiber_context.h. The stack layout from the saved pointer up: MXCSR and the x87 control
// word (8 bytes), r15, r14, r13, r12, rbx, rbp, return address.
asm(R"(
  .text
  .globl c2c_emulator_switch
  .hidden c2c_emulator_switch
  .type c2c_emulator_switch, @function
c2c_emulator_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size c2c_emulator_switch, .-c2c_emulator_switch
)");
#endif

namespace c2c::cuda {

thread_local uint3 blockIdx;
thread_local uint3 threadIdx;
thread_local dim3 blockDim;
thread_local dim3 gridDim;

namespace emulator {
namespace {

constexpr size_t kStackBytes = 256 * 1024;  // kernels, and the unwinding of a fault, stay far below
constexpr unsigned kMaxThreadsPerBlock = 1024;
constexpr unsigned kMaxGridY = 65535, kMaxGridZ = 65535;
constexpr unsigned kWarp = 32;

// A fiber stack with an inaccessible guard page below it, so an overflow faults at once.
class Stack {
 public:
  Stack() {
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    bytes_ = kStackBytes + page;
    void* memory = mmap(nullptr, bytes_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    TORCH_CHECK(memory != MAP_FAILED, "cuda emulator: cannot map a fiber stack");
    mprotect(memory, page, PROT_NONE);
    memory_ = static_cast<char*>(memory);
    page_ = page;
  }
  ~Stack() { munmap(memory_, bytes_); }
  Stack(const Stack&) = delete;
  Stack& operator=(const Stack&) = delete;
  void* base() const { return memory_ + page_; }  // lowest usable address, above the guard page
  size_t size() const { return bytes_ - page_; }

 private:
  char* memory_;
  size_t bytes_, page_;
};

enum class State { kReady, kWaiting, kDone };

struct Fiber {
  FiberContext context;
  State state;
  uint3 index;
  void* stack_bottom;
  size_t stack_size;
  void* asan_fake_stack;
};

// The block being run on this OS thread.
struct Block {
  FiberContext scheduler;
  const void* scheduler_bottom = nullptr;  // the OS thread's stack, as AddressSanitizer sees it
  size_t scheduler_size = 0;
  void* scheduler_fake_stack = nullptr;
  std::vector<Fiber> fibers;
  int current = 0;
  bool direct = false;      // threads run as plain calls, without fibers
  uint64_t generation = 0;  // barriers released so far
  std::vector<float> exchange;
  std::vector<uint64_t> exchange_generation;
  const std::function<void()>* body = nullptr;
};

thread_local Block* active = nullptr;
thread_local std::vector<std::unique_ptr<Stack>> stacks;
thread_local std::string first_fault;

// "csrc/...:line, block (x, y, z), thread (x, y, z)" of the running thread.
std::string where(const char* file, int line) {
  std::string path(file);
  const size_t source_root = path.rfind("csrc/");
  if (source_root != std::string::npos) path.erase(0, source_root);
  return path + ":" + std::to_string(line) + ", block (" + std::to_string(blockIdx.x) + ", " +
         std::to_string(blockIdx.y) + ", " + std::to_string(blockIdx.z) + "), thread (" +
         std::to_string(threadIdx.x) + ", " + std::to_string(threadIdx.y) + ", " + std::to_string(threadIdx.z) +
         ")";
}

// AddressSanitizer is told of every stack switch (before it: the stack being entered; after
// it: back on a stack), or it warns and may misreport after an exception on a fiber stack.
// Both are no-ops in a normal build.
inline void before_switch(void** fake_stack_save, const void* bottom, size_t size) {
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_start_switch_fiber(fake_stack_save, bottom, size);
#else
  (void)fake_stack_save, (void)bottom, (void)size;
#endif
}

inline void after_switch(void* fake_stack, const void** bottom_old = nullptr, size_t* size_old = nullptr) {
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_finish_switch_fiber(fake_stack, bottom_old, size_old);
#else
  (void)fake_stack, (void)bottom_old, (void)size_old;
#endif
}

// threadIdx of the i-th thread of a block (x fastest).
uint3 thread_index(unsigned i) {
  return uint3{i % blockDim.x, (i / blockDim.x) % blockDim.y, i / (blockDim.x * blockDim.y)};
}

// Runs the current thread's body; what it throws becomes the launch's fault (on a fiber,
// nothing may unwind further: there is no caller below fiber_main).
void run_thread(Block& block) {
  try {
    (*block.body)();
  } catch (const ThreadFault&) {  // recorded already
  } catch (const std::exception& e) {
    if (first_fault.empty()) first_fault = std::string("exception in a kernel thread: ") + e.what();
  } catch (...) {
    if (first_fault.empty()) first_fault = "unknown exception in a kernel thread";
  }
}

// A fiber's first frame: runs the thread, then hands back to the scheduler for good.
void fiber_main() {
  Block& block = *active;
  after_switch(nullptr, &block.scheduler_bottom, &block.scheduler_size);
  run_thread(block);
  Fiber& fiber = block.fibers[block.current];
  fiber.state = State::kDone;
  before_switch(nullptr, block.scheduler_bottom, block.scheduler_size);  // null: this stack is done
  switch_context(fiber.context, block.scheduler);
  std::abort();  // a finished fiber is never resumed
}

// Parks the running fiber and returns to the scheduler.
void park(State state) {
  Block& block = *active;
  Fiber& fiber = block.fibers[block.current];
  fiber.state = state;
  before_switch(&fiber.asan_fake_stack, block.scheduler_bottom, block.scheduler_size);
  switch_context(fiber.context, block.scheduler);
  after_switch(fiber.asan_fake_stack);
}

// The first block of a launch runs on fibers. When none of its threads waited at a barrier,
// the kernel is taken to have none and the other blocks' threads run as plain calls, which
// is many times faster; a barrier met there after all is reported as a fault, not ignored.
void run_block_direct(Block& block) {
  const unsigned threads = blockDim.x * blockDim.y * blockDim.z;
  block.direct = true;
  for (unsigned i = 0; i < threads; ++i) {
    block.current = static_cast<int>(i);
    threadIdx = thread_index(i);
    run_thread(block);
  }
}

void run_block(Block& block) {
  const unsigned threads = blockDim.x * blockDim.y * blockDim.z;
  while (stacks.size() < threads) stacks.push_back(std::make_unique<Stack>());
  block.fibers.resize(threads);
  for (unsigned i = 0; i < threads; ++i) {
    Fiber& fiber = block.fibers[i];
    fiber.index = thread_index(i);
    fiber.state = State::kReady;
    fiber.stack_bottom = stacks[i]->base();
    fiber.stack_size = stacks[i]->size();
    fiber.asan_fake_stack = nullptr;
#if defined(__SANITIZE_ADDRESS__)
    // The frames of the stack's last fiber left AddressSanitizer poison behind.
    ASAN_UNPOISON_MEMORY_REGION(stacks[i]->base(), stacks[i]->size());
#endif
    start_context(fiber.context, stacks[i]->base(), stacks[i]->size(), fiber_main);
  }
  for (;;) {
    bool waiting = false;
    for (unsigned i = 0; i < threads; ++i) {
      Fiber& fiber = block.fibers[i];
      if (fiber.state != State::kReady) continue;
      block.current = static_cast<int>(i);
      threadIdx = fiber.index;
      before_switch(&block.scheduler_fake_stack, fiber.stack_bottom, fiber.stack_size);
      switch_context(block.scheduler, fiber.context);
      after_switch(block.scheduler_fake_stack);
      waiting = waiting || fiber.state == State::kWaiting;
    }
    if (!waiting) return;  // every thread exited
    // Every live thread is at the barrier: release it.
    ++block.generation;
    for (Fiber& fiber : block.fibers) {
      if (fiber.state == State::kWaiting) fiber.state = State::kReady;
    }
  }
}

}  // namespace

void fault(const char* what, const char* file, int line) {
  if (first_fault.empty()) first_fault = std::string(what) + " at " + where(file, line);
}

void run_grid(const char* kernel, dim3 grid, dim3 block_dim, const std::function<void()>& body) {
  const uint64_t threads = uint64_t{block_dim.x} * block_dim.y * block_dim.z;
  TORCH_CHECK(threads >= 1 && threads <= kMaxThreadsPerBlock, "cuda emulator: ", kernel, " launched with ", threads,
              " threads per block; a CUDA block holds 1 to ", kMaxThreadsPerBlock);
  TORCH_CHECK(grid.x >= 1 && grid.x <= 0x7fffffffu && grid.y >= 1 && grid.y <= kMaxGridY && grid.z >= 1 &&
                  grid.z <= kMaxGridZ,
              "cuda emulator: ", kernel, " launched with grid (", grid.x, ", ", grid.y, ", ", grid.z,
              "), outside CUDA's limits");
  TORCH_CHECK(active == nullptr, "cuda emulator: a kernel launched another kernel");
  Block block;
  block.body = &body;
  block.exchange.assign(threads, 0.f);
  block.exchange_generation.assign(threads, ~uint64_t{0});
  first_fault.clear();
  gridDim = grid;
  blockDim = block_dim;
  active = &block;
  struct Deactivate {  // also when a block throws (a stack that cannot be mapped)
    ~Deactivate() { active = nullptr; }
  } deactivate;
  const uint64_t blocks = uint64_t{grid.x} * grid.y * grid.z;
  for (uint64_t b = 0; b < blocks && first_fault.empty(); ++b) {
    blockIdx = uint3{static_cast<unsigned>(b % grid.x), static_cast<unsigned>(b / grid.x % grid.y),
                     static_cast<unsigned>(b / (uint64_t{grid.x} * grid.y))};
    if (b == 0 || block.generation != 0) {
      run_block(block);
    } else {
      run_block_direct(block);
    }
  }
  if (!first_fault.empty()) {
    std::string message = std::move(first_fault);
    first_fault.clear();
    TORCH_CHECK(false, "cuda emulator: ", kernel, ": ", message);
  }
}

}  // namespace emulator

void __syncthreads() {
  TORCH_CHECK(emulator::active != nullptr, "cuda emulator: __syncthreads outside a kernel");
  if (emulator::active->direct) {
    // Cannot wait without fibers; the thread goes on, and the launch reports the fault.
    emulator::fault("__syncthreads in a block of a kernel whose first block met no barrier "
                    "(the emulator ran it without fibers)", __FILE__, __LINE__);
    return;
  }
  emulator::park(emulator::State::kWaiting);
}

// The lanes exchange through the block's buffer between two barriers. Every thread of the
// block must shuffle together, which holds for the block-wide reductions of csrc/cuda.
float __shfl_xor_sync(unsigned mask, float value, int lane_mask) {
  emulator::Block& block = *emulator::active;
  const unsigned self = static_cast<unsigned>(block.current);
  const unsigned lane = self % emulator::kWarp;
  const unsigned partner = self - lane + (lane ^ static_cast<unsigned>(lane_mask));
  if (!(mask >> lane & 1u) || !(mask >> (lane ^ static_cast<unsigned>(lane_mask)) & 1u)) {
    emulator::fault("__shfl_xor_sync with a lane outside its mask", __FILE__, __LINE__);
  }
  block.exchange[self] = value;
  block.exchange_generation[self] = block.generation;
  const uint64_t generation = block.generation;
  __syncthreads();
  float result = value;
  if (partner >= block.exchange.size() || block.exchange_generation[partner] != generation) {
    emulator::fault("__shfl_xor_sync with a lane that did not take part (exited, or past the block)", __FILE__,
                    __LINE__);
  } else {
    result = block.exchange[partner];
  }
  __syncthreads();
  return result;
}

}  // namespace c2c::cuda
