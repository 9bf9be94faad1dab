// csrc/cuda/prepare_slots.cu compiled for the CPU emulator.
#include "cuda/prepare_slots.cu"
