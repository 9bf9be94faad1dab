// csrc/cuda/fuse.cu compiled for the CPU emulator (a .cpp, so that the host compiler takes it).
#include "cuda/fuse.cu"
