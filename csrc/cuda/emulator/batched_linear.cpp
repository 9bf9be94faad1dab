// csrc/cuda/batched_linear.cu compiled for the CPU emulator (a .cpp, so that the host compiler takes it).
#include "cuda/batched_linear.cu"
