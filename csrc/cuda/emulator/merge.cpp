// csrc/cuda/merge.cu compiled for the CPU emulator (a .cpp, so that the host compiler takes it).
#include "cuda/merge.cu"
