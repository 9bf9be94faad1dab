// csrc/cuda/merge_op.cu compiled for the CPU emulator (a .cpp, so that the host compiler takes it).
#include "cuda/merge_op.cu"
