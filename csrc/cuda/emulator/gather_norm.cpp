// csrc/cuda/gather_norm.cu compiled for the CPU emulator (a .cpp, so that the host compiler takes it).
#include "cuda/gather_norm.cu"
